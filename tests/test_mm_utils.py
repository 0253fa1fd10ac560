"""mm_utils (preprocessing, anyres arithmetic, prompt tokenisation) and the tiny tokenizer.

transformers' own LLaVA-NeXT code serves as the independent reference for anyres. Conventions differ: ours
(like upstream LLaVA and PIL) is (width, height) for image sizes and pinpoints, transformers' is
(height, width) for both. transformers reads a checkpoint's pinpoint list unchanged, so with the same list the
two pick transposed canvases whenever both orientations tie (square images, and small images that fit either
canvas whole); see test_transformers_reads_pinpoints_transposed. To compare like with like, the reference is
given the transposed list (HF_PINPOINTS), which reproduces upstream LLaVA's choice exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, CLIPImageProcessor, LlamaTokenizer, LlavaNextImageProcessor
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf_next
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    anyres_visual_token_count,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    parse_grid_pinpoints,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
    unpad_image,
    unpad_image_shape,
)
from llava.model.tiny_tokenizer import write_tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6
PINPOINTS_STR = "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"
HF_PINPOINTS = [[h, w] for w, h in PINPOINTS]  # the same canvases in transformers' (height, width) order
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(out, vocab_size=1000)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> LlamaTokenizer:
    return AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False)


@pytest.fixture(scope="module")
def clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


@pytest.fixture(scope="module")
def next_processor() -> LlavaNextImageProcessor:
    return LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        image_grid_pinpoints=HF_PINPOINTS,
    )


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB test image: smooth colour gradients plus a few hard-edged shapes."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            255 * xs / max(width - 1, 1),
            255 * ys / max(height - 1, 1),
            127 + 120 * np.sin((xs + ys + seed) / 17.0),
        ],
        axis=-1,
    )
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 5, height // 5, width // 2, height // 2], fill=(250, 20, 30))
    draw.ellipse([width // 2, height // 3, 9 * width // 10, 9 * height // 10], fill=(10, 200, 60))
    draw.line([0, height - 1, width - 1, 0], fill=(0, 0, 0), width=3)
    return image


# ---------------------------------------------------------------------------------------------- tiny tokenizer
def test_tiny_tokenizer_is_deterministic_and_loadable(tmp_path: Path, tokenizer_dir: Path) -> None:
    write_tiny_tokenizer(tmp_path / "again", vocab_size=1000)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (
        tokenizer_dir / "tokenizer.model"
    ).read_bytes()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["pad_token"], config["padding_side"], config["legacy"]) == ("<unk>", "right", False)
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["pad_token"] == "<unk>"

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False)
    assert isinstance(tok, LlamaTokenizer)
    assert len(tok) == 1000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    ids = tok("Is there a dog in the image?\n12").input_ids
    assert ids[0] == 1 and 2 not in ids
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["<0x0A>", "1", "2"]  # byte-fallback newline, split digits
    assert tok.decode(ids, skip_special_tokens=True) == "Is there a dog in the image?\n12"


def test_tiny_tokenizer_rejects_bad_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 400"):
        write_tiny_tokenizer(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="between 400 and"):
        write_tiny_tokenizer(tmp_path, vocab_size=50000)


# ---------------------------------------------------------------------------------------------- tokenizer_image_token
def test_tokenizer_image_token_splices_the_image_index(tokenizer: LlamaTokenizer) -> None:
    first, second = f"{SYSTEM} USER: ", "\nIs there a dog in the image? ASSISTANT:"
    ids = tokenizer_image_token(first + "<image>" + second, tokenizer)
    expected = (
        [tokenizer.bos_token_id]
        + tokenizer(first, add_special_tokens=False).input_ids
        + [IMAGE_TOKEN_INDEX]
        + tokenizer(second, add_special_tokens=False).input_ids
    )
    assert ids == expected
    assert ids.count(tokenizer.bos_token_id) == 1

    tensor = tokenizer_image_token(first + "<image>" + second, tokenizer, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.tolist() == expected
    assert tokenizer_image_token("a<image>b", tokenizer, image_token_index=-7).count(-7) == 1
    with pytest.raises(ValueError, match="allowed: None, 'pt'"):
        tokenizer_image_token("a<image>b", tokenizer, return_tensors="np")


def test_tokenizer_image_token_edge_cases(tokenizer: LlamaTokenizer, tokenizer_dir: Path) -> None:
    text = "Is there a cat? Answer the question using a single word or phrase."
    assert tokenizer_image_token(text, tokenizer) == tokenizer(text).input_ids  # no image

    rest = "\nWhat color is the bus?"
    ids = tokenizer_image_token("<image>" + rest, tokenizer)
    assert (
        ids
        == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX] + tokenizer(rest, add_special_tokens=False).input_ids
    )

    ids = tokenizer_image_token("<image><image>x<image>", tokenizer)
    assert ids == [
        tokenizer.bos_token_id,
        IMAGE_TOKEN_INDEX,
        IMAGE_TOKEN_INDEX,
        *tokenizer("x", add_special_tokens=False).input_ids,
        IMAGE_TOKEN_INDEX,
    ]

    no_bos = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False, add_bos_token=False)
    ids = tokenizer_image_token("a<image>b", no_bos)
    assert ids == no_bos("a").input_ids + [IMAGE_TOKEN_INDEX] + no_bos("b").input_ids
    assert no_bos.bos_token_id not in ids


# ---------------------------------------------------------------------------------------------- pad
def test_expand2square_centres_the_image() -> None:
    wide = make_image(40, 10)
    square = expand2square(wide, (1, 2, 3))
    assert square.size == (40, 40)
    assert np.array_equal(np.asarray(square)[15:25], np.asarray(wide))
    assert tuple(np.asarray(square)[0, 0]) == (1, 2, 3) and tuple(np.asarray(square)[39, 39]) == (1, 2, 3)
    tall = make_image(9, 20)  # odd margin: extra column on the right
    square = expand2square(tall, (0, 0, 0))
    assert np.array_equal(np.asarray(square)[:, 5:14], np.asarray(tall))
    same = make_image(12, 12)
    assert expand2square(same, (0, 0, 0)) is same


def test_pad_preprocessing_matches_hand_padded_image(clip_processor: CLIPImageProcessor) -> None:
    image = make_image(400, 250)
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    assert fill == (122, 116, 104)
    padded = Image.new("RGB", (400, 400), fill)
    padded.paste(image, (0, 75))
    expected = clip_processor(padded, return_tensors="pt")["pixel_values"]
    got = process_images([image], clip_processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert got.shape == (1, 3, 336, 336)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    square = make_image(336, 336, seed=3)
    got = process_images([square, square], clip_processor, {"image_aspect_ratio": "pad"})
    direct = clip_processor(square, return_tensors="pt")["pixel_values"]
    assert got.shape == (2, 3, 336, 336)
    torch.testing.assert_close(got[1:], direct, rtol=0, atol=0)


def test_plain_preprocessing_and_bad_mode(clip_processor: CLIPImageProcessor) -> None:
    image = make_image(500, 300)
    got = process_images([image], clip_processor, SimpleNamespace(image_aspect_ratio=None))
    torch.testing.assert_close(
        got, clip_processor([image], return_tensors="pt")["pixel_values"], rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="allowed: 'pad', 'anyres'"):
        process_images([image], clip_processor, SimpleNamespace(image_aspect_ratio="anyres_max_9"))
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        process_images([image], clip_processor, SimpleNamespace(image_aspect_ratio="anyres"))


# ---------------------------------------------------------------------------------------------- anyres
@pytest.mark.parametrize("size", [(640, 480), (500, 900), (1000, 300), (336, 336), (200, 150)])
def test_anyres_matches_transformers_llava_next_processor(
    size: tuple[int, int], clip_processor: CLIPImageProcessor, next_processor: LlavaNextImageProcessor
) -> None:
    image = make_image(*size, seed=size[0])
    ours = process_anyres_image(image, clip_processor, PINPOINTS)
    ref = next_processor(image, return_tensors="pt")
    grid_w, grid_h = get_anyres_image_grid_shape(size, PINPOINTS, 336)
    assert ours.shape == (1 + grid_w * grid_h, 3, 336, 336)
    assert ref["image_sizes"].tolist() == [[size[1], size[0]]]
    torch.testing.assert_close(ours, ref["pixel_values"][0], rtol=0, atol=1e-5)


def test_process_images_anyres_stacks_or_lists(clip_processor: CLIPImageProcessor) -> None:
    cfg = SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS_STR)
    same = process_images([make_image(640, 480), make_image(600, 500, seed=1)], clip_processor, cfg)
    assert isinstance(same, torch.Tensor) and same.shape == (2, 5, 3, 336, 336)
    mixed = process_images([make_image(640, 480), make_image(1000, 300)], clip_processor, cfg)
    assert isinstance(mixed, list) and [t.shape[0] for t in mixed] == [5, 4]


def test_resize_pad_and_divide() -> None:
    image = make_image(640, 427)
    canvas = resize_and_pad_image(image, (672, 672))
    assert canvas.size == (672, 672)
    pixels = np.asarray(canvas)
    # 640x427 fits as 672x449 (ceil), centred: 111 black rows above, 112 below.
    assert not pixels[:111].any() and pixels[111].any() and pixels[559].any() and not pixels[560:].any()
    patches = divide_to_patches(canvas, 336)
    assert len(patches) == 4 and all(p.size == (336, 336) for p in patches)
    assert np.array_equal(np.asarray(patches[1]), pixels[:336, 336:])  # row-major order


def test_select_best_resolution_cases() -> None:
    assert select_best_resolution((640, 480), PINPOINTS) == (672, 672)
    assert select_best_resolution((640, 427), PINPOINTS) == (672, 672)
    assert select_best_resolution((336, 336), PINPOINTS) == (336, 672)  # ties on detail: least waste, first
    assert select_best_resolution((1000, 300), PINPOINTS) == (1008, 336)
    assert select_best_resolution((300, 1000), PINPOINTS) == (336, 1008)
    assert select_best_resolution((2000, 900), PINPOINTS) == (1008, 336)
    assert select_best_resolution((400, 200), PINPOINTS) == (672, 336)


def test_select_best_resolution_agrees_with_transformers() -> None:
    rng = random.Random(0)
    for _ in range(300):
        width, height = rng.randint(20, 2500), rng.randint(20, 2500)
        ours = select_best_resolution((width, height), PINPOINTS)
        ref_h, ref_w = hf_select_best_resolution((height, width), HF_PINPOINTS)
        assert ours == (ref_w, ref_h), (width, height)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((640, 480), (2, 2)),
        ((336, 336), (1, 2)),
        ((1000, 300), (3, 1)),
        ((300, 1000), (1, 3)),
        ((900, 500), (2, 2)),
        ((400, 200), (2, 1)),
    ],
)
def test_grid_shape(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert get_anyres_image_grid_shape(size, PINPOINTS, 336) == grid
    assert get_anyres_image_grid_shape(size, PINPOINTS_STR, 336) == grid
    hf_rows, hf_cols = hf_next.get_anyres_image_grid_shape([size[1], size[0]], HF_PINPOINTS, 336)
    assert (hf_cols, hf_rows) == grid
    assert hf_next.image_size_to_num_patches([size[1], size[0]], HF_PINPOINTS, 336) == 1 + grid[0] * grid[1]


def test_parse_grid_pinpoints_errors() -> None:
    assert parse_grid_pinpoints(PINPOINTS_STR) == [tuple(p) for p in PINPOINTS]
    with pytest.raises(ValueError, match="literal list"):
        parse_grid_pinpoints("__import__('os')")
    with pytest.raises(ValueError, match="pair of positive ints"):
        parse_grid_pinpoints([[336, 672, 1]])
    with pytest.raises(ValueError, match="non-empty"):
        parse_grid_pinpoints([])


# Visual-token counts of the whole LLaVA-NeXT span (576 base + unpadded map + one newline per row).
TOKEN_COUNTS = {
    (640, 480): 2340,  # 672x672 canvas, 48x48 map -> 36x48, + 36 newlines
    (640, 427): 2144,  # 672x672 canvas, 48x48 map -> 32x48 (floor(427*48/640)=32), + 32 newlines
    (336, 336): 1176,  # 336x672 canvas (least waste), 48x24 map -> 24x24, + 24 newlines
    (1000, 300): 2182,  # 1008x336 canvas, 24x72 map -> 22x72, + 22 newlines
    (300, 1000): 2232,  # 336x1008 canvas, 72x24 map -> 72x22, + 72 newlines
    (200, 150): 1026,  # fits every canvas whole: first (336x672) wins, 48x24 map -> 18x24, + 18 newlines
    (150, 200): 1376,  # same canvas, 48x24 map -> 48x16, + 48 newlines
}


@pytest.fixture(scope="module")
def hf_next_processor(
    tokenizer: LlamaTokenizer, next_processor: LlavaNextImageProcessor
) -> LlavaNextProcessor:
    # patch_size 14 on 336 crops = 24x24 features; no CLS/extra token so counts include only the 576 base.
    return LlavaNextProcessor(
        image_processor=next_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=0,
    )


@pytest.mark.parametrize("size", sorted(TOKEN_COUNTS))
def test_visual_token_counts(size: tuple[int, int], hf_next_processor: LlavaNextProcessor) -> None:
    width, height = size
    count = anyres_visual_token_count(size, PINPOINTS)
    assert count == TOKEN_COUNTS[size]
    # Independent reference 1: transformers' processor count (base + unpadded + newlines).
    assert hf_next_processor._get_number_of_features(height, width, 336, 336) == count
    # Independent reference 2: transformers' modeling helpers on a real feature map.
    rows, cols = hf_next.get_anyres_image_grid_shape([height, width], HF_PINPOINTS, 336)
    unpadded = hf_next.unpad_image(torch.zeros(1, rows * 24, cols * 24), [height, width])
    assert 576 + unpadded.shape[1] * unpadded.shape[2] + unpadded.shape[1] == count
    assert anyres_visual_token_count(size, PINPOINTS, newline=False) == count - unpadded.shape[1]


def test_transformers_reads_pinpoints_transposed(clip_processor: CLIPImageProcessor) -> None:
    # The checkpoint's list handed to transformers unchanged: pairs are read as (height, width).
    square = make_image(336, 336)
    assert get_anyres_image_grid_shape((336, 336), PINPOINTS, 336) == (1, 2)  # ours/upstream: 1 wide, 2 tall
    assert hf_next.get_anyres_image_grid_shape([336, 336], PINPOINTS, 336) == (1, 2)  # HF: 1 tall, 2 wide
    as_is = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        image_grid_pinpoints=PINPOINTS,
    )
    ref = as_is(square, return_tensors="pt")["pixel_values"][0]
    ours = process_anyres_image(square, clip_processor, PINPOINTS)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-5)  # the base view agrees
    assert not torch.allclose(ours[1:], ref[1:], atol=1e-2)  # the crops are transposed
    # Token counts then differ for non-square images that tie: 200x150 gives 1026 here, 1368 in transformers.
    rows, cols = hf_next.get_anyres_image_grid_shape([150, 200], PINPOINTS, 336)
    unpadded = hf_next.unpad_image(torch.zeros(1, rows * 24, cols * 24), [150, 200])
    assert 576 + unpadded.shape[1] * (unpadded.shape[2] + 1) == 1368
    assert anyres_visual_token_count((200, 150), PINPOINTS) == 1026


def test_unpad_image_matches_transformers() -> None:
    rng = random.Random(1)
    sizes = [(176, 198), (110, 352), (640, 427), (9, 1000), (1000, 9)]
    sizes += [(rng.randint(10, 3000), rng.randint(10, 3000)) for _ in range(200)]
    for width, height in sizes:
        for map_h, map_w in ((48, 48), (24, 72), (72, 24), (48, 24)):
            feature = torch.arange(3 * map_h * map_w, dtype=torch.float32).reshape(3, map_h, map_w)
            ref = hf_next.unpad_image(feature, [height, width])
            got = unpad_image(feature, (width, height))
            assert torch.equal(got, ref), (width, height, map_h, map_w)
            assert unpad_image_shape(map_h, map_w, (width, height)) == tuple(ref.shape[1:])


def test_unpad_odd_margin_and_float_edge_case() -> None:
    # 48 - 33 = 15 rows of padding: 7 are cut from each end and one padded row stays (LLaVA-NeXT behaviour).
    assert unpad_image_shape(48, 48, (1000, 690)) == (34, 48)
    # Exact products: 198 * 24 / 176 = 27 and 110 * 48 / 352 = 15. Upstream LLaVA evaluates them in floats
    # (26.999..., 14.999...) and truncates to 26 / 14, which leaves (26, 24) / (48, 14). We use exact integer
    # arithmetic, as transformers does (round(x, 7)); test_unpad_image_matches_transformers covers these sizes.
    assert get_anyres_image_grid_shape((176, 198), PINPOINTS, 336) == (1, 2)
    assert unpad_image_shape(48, 24, (176, 198)) == (28, 24)
    assert get_anyres_image_grid_shape((110, 352), PINPOINTS, 336) == (1, 2)
    assert unpad_image_shape(48, 24, (110, 352)) == (48, 16)


# ---------------------------------------------------------------------------------------------- misc
def test_get_model_name_from_path() -> None:
    assert get_model_name_from_path("liuhaotian/llava-v1.5-7b") == "llava-v1.5-7b"
    assert (
        get_model_name_from_path("/ckpt/llava-v1.5-7b-lora/checkpoint-5000/")
        == "llava-v1.5-7b-lora_checkpoint-5000"
    )
    assert get_model_name_from_path("llava-v1.6-vicuna-7b") == "llava-v1.6-vicuna-7b"
    with pytest.raises(ValueError, match="model name"):
        get_model_name_from_path("/")


def test_keywords_stopping_criteria(tokenizer: LlamaTokenizer) -> None:
    prompt = tokenizer("USER: hi ASSISTANT:", return_tensors="pt").input_ids
    criteria = KeywordsStoppingCriteria(["###"], tokenizer, prompt)
    going = torch.cat(
        [prompt, tokenizer(" A dog", add_special_tokens=False, return_tensors="pt").input_ids], 1
    )
    done = torch.cat(
        [prompt, tokenizer(" A dog###", add_special_tokens=False, return_tensors="pt").input_ids], 1
    )
    assert criteria(going, None).tolist() == [False]
    assert criteria(done, None).tolist() == [True]
    # The prompt itself never triggers a stop, even if it contains the keyword.
    prompt_with_kw = tokenizer("Human: hi###Assistant:", return_tensors="pt").input_ids
    assert KeywordsStoppingCriteria(["###"], tokenizer, prompt_with_kw)(prompt_with_kw, None).tolist() == [
        False
    ]
    # Generation from inputs_embeds returns only new tokens: no prompt ids; special tokens can match.
    rows = [
        [*tokenizer("yes", add_special_tokens=False).input_ids, tokenizer.eos_token_id],
        tokenizer("no no no", add_special_tokens=False).input_ids,
    ]
    width = max(len(r) for r in rows)
    new_only = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])  # left-padded
    assert KeywordsStoppingCriteria(["</s>"], tokenizer)(new_only, None).tolist() == [True, False]
    with pytest.raises(ValueError, match="keyword"):
        KeywordsStoppingCriteria([""], tokenizer)
