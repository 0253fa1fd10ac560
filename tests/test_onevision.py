"""LLaVA-OneVision (``llava/model/onevision.py``, ``llava/model/language_model/llava_onevision.py``): both checkpoint
layouts load through the builder and equal transformers' ``LlavaOnevisionForConditionalGeneration`` with the same
weights (token layout, logits, greedy text), the processor equals the original preprocessing, the original layout is
not taken for LLaVA-1.5, loading is strict, and the prune step works on OneVision's visual spans.

The tiny checkpoints keep the real geometry (SigLIP at 384 px, patch 14: 729 tokens per view; the 6 x 6 grid of
384-px pinpoints; anyres_max_9), so the image sizes below reproduce the real token counts: 300x300 takes a single
grid crop (729 + 27 x 28 = 1485 tokens), 640x480 a 2 x 2 grid (2929), 1920x1080 a 3 x 5 grid whose 75 x 135 map
exceeds 1.1^2 x 9 crops and is shrunk to 60 x 108 (7269).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaOnevisionForConditionalGeneration

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.eval.runner import chat_prompt
from llava.model.builder import load_pretrained_model
from llava.model.families import family_for_path, get_family
from llava.model.language_model.llava_onevision import LlavaOnevisionForReduction, visual_token_count
from llava.model.onevision import encode_prompt
from llava.model.tiny_onevision import main as tiny_main
from llava.model.tiny_onevision import write_tiny_onevision_checkpoint
from pio import PruneState, make_method
from pio.registry import get_method
from tests.helpers import image

LAYOUTS = ("original", "hf")
SIZES = {"single-crop": (300, 300), "2x2": (640, 480), "anyres_max_9": (1920, 1080)}  # (width, height)
COUNTS = {"single-crop": 1485, "2x2": 2929, "anyres_max_9": 7269}
QUESTION = "What is in the image?"


@pytest.fixture(scope="session")
def ov_paths(tmp_path_factory) -> dict[str, str]:
    """Both layouts of one tiny model with the real geometry (14-px patches; seed 3). The registry's tiny
    OneVision (tests/conftest.py) has 48-px patches, so the suites over every method stay fast."""
    root = tmp_path_factory.mktemp("onevision")
    return {layout: str(write_tiny_onevision_checkpoint(root / f"llava-onevision-tiny-{layout}", layout, seed=3))
            for layout in LAYOUTS}


@pytest.fixture(scope="module")
def ov(ov_paths) -> dict[str, tuple]:
    """``{layout: (tokenizer, model, processor)}`` loaded through the builder."""
    out = {}
    for layout, path in ov_paths.items():
        tok, model, proc, _ = load_pretrained_model(path, device="cpu", torch_dtype="float32")
        out[layout] = (tok, model, proc)
    return out


def encode(loaded, question: str, images) -> tuple[torch.Tensor, dict]:
    tok, model, proc = loaded
    prompt = chat_prompt("<image>\n" * len(images) + question, "qwen_1_5")
    ids, views, sizes = encode_prompt(prompt, list(images), tok, proc, model.config)
    return ids, ({"images": views, "image_sizes": sizes} if images else {})


def reference(model: LlavaOnevisionForReduction, layout: str, path: str):
    """transformers' own model with the same weights: loaded by transformers for the converted layout; for the
    original layout (which transformers cannot read) built from our translated config with an ``<image>`` id of an
    unused vocabulary row, and given our weights."""
    if layout == "hf":
        return LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval(), model.config.image_token_id
    cfg = copy.deepcopy(model.config)
    cfg.image_token_index = cfg.text_config.vocab_size - 1
    ref = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ref.load_state_dict(model.state_dict())
    return ref, cfg.image_token_index


def reference_inputs(loaded, ids: torch.Tensor, images, image_id: int) -> dict:
    """transformers' inputs for the same question: the processor's padded pixels and the prompt with each image's
    mark expanded to its visual tokens."""
    tok, model, proc = loaded
    px = proc(images=[list(images)], return_tensors="pt")
    single = len(images) > 1
    counts = iter(visual_token_count(s, model.config, single_view=single) for s in px["image_sizes"].tolist())
    row = []
    for t in ids[0].tolist():
        row.extend([image_id] * next(counts) if t == IMAGE_TOKEN_INDEX else [t])
    return {"input_ids": torch.tensor([row]), "pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"],
            "batch_num_images": px["batch_num_images"]}


# ------------------------------------------------------------------------------------------ token layout
def test_visual_token_count_equals_transformers_layout(ov):
    """The count rule (and so the converted prompts' <image> expansion) equals transformers' own packing, over
    shapes on both sides of the anyres_max_9 threshold; the documented figures hold."""
    model = ov["hf"][1]
    D = 4
    cases = [(384, 384), (300, 300), (480, 640), (640, 480), (1080, 1920), (1920, 1080), (2000, 700), (377, 1211),
             (1536, 1152), (768, 1920), (3000, 3000), (100, 1900), (50, 40)]
    counts = {}
    for h, w in cases:
        rows, cols = (len(range(0, p, 384)) for p in _best(h, w, model.config))
        feats = [torch.zeros(1 + rows * cols, 729, D)]
        packed, _ = model.model.pack_image_features(feats, torch.tensor([[h, w]]), image_newline=torch.zeros(D),
                                                    vision_aspect_ratio="anyres_max_9")
        counts[(h, w)] = visual_token_count((h, w), model.config)
        assert counts[(h, w)] == packed[0].shape[0], (h, w)
    assert [counts[(384, 384)], counts[(480, 640)], counts[(1080, 1920)]] == [1485, 2929, 7269]
    assert visual_token_count((480, 640), model.config, single_view=True) == 730


def _best(h, w, config):
    from llava.mm_utils import select_best_resolution

    return select_best_resolution((h, w), config.image_grid_pinpoints)


# ------------------------------------------------------------------------------------------ equivalence
# every size in the fast suite on one layout, the other layout's in the slow one (the two layouts hold one model:
# test_both_layouts_are_the_same_model ties them together in the fast suite)
EQUIVALENCE = [("single-crop", "hf"), ("2x2", "original"), ("anyres_max_9", "original")]
EQUIVALENCE += [pytest.param(size, layout, marks=pytest.mark.slow) for size in SIZES for layout in LAYOUTS
                if (size, layout) not in EQUIVALENCE]


@pytest.mark.parametrize("size, layout", EQUIVALENCE)
def test_unpruned_equals_transformers(ov, ov_paths, layout, size):
    """Prefill logits within 1e-5 (float32), the same greedy tokens, and each image's visual span as long as
    transformers' image features."""
    loaded = ov[layout]
    tok, ours, proc = loaded
    img = image(*SIZES[size], seed=len(size))
    ids, kw = encode(loaded, QUESTION, [img])
    ref, image_id = reference(ours, layout, ov_paths[layout])
    hf = reference_inputs(loaded, ids, [img], image_id)
    state = PruneState()
    with torch.no_grad():
        got = ours(ids, **kw, prune_state=state).logits
        want = ref(**hf).logits
        n_ref = ref.model.get_image_features(hf["pixel_values"], hf["image_sizes"])[0].shape[0]
    n = state.samples[0].n_visual
    assert n == n_ref == COUNTS[size] == visual_token_count(kw["image_sizes"][0].tolist(), ours.config)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    new = ours.generate(ids, **kw, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    ref_new = ref.generate(**hf, do_sample=False, max_new_tokens=3, min_new_tokens=3)[:, hf["input_ids"].shape[1]:]
    assert new.tolist() == ref_new.tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_several_images_get_one_view_each(ov, ov_paths, layout):
    """A question with two images: each a padded-square view and one newline (730 tokens), as lmms-eval's
    OneVision model and transformers process them; the same logits as transformers with batch_num_images."""
    loaded = ov[layout]
    tok, ours, proc = loaded
    imgs = [image(500, 300, seed=11), image(200, 420, seed=12)]
    ids, kw = encode(loaded, "Which picture is brighter?", imgs)
    assert [v.shape[0] for v in kw["images"]] == [1, 1]
    ref, image_id = reference(ours, layout, ov_paths[layout])
    hf = reference_inputs(loaded, ids, imgs, image_id)
    with torch.no_grad():
        got = ours(ids, **kw).logits
        want = ref(**hf).logits
        spans = ours.prepare_multimodal_inputs(ids, None, kw["images"], kw["image_sizes"]).spans
    assert [n for _, n in spans[0]] == [730, 730] and spans[0][1][0] > sum(spans[0][0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the processor's own batch form (padded views, batch_num_images) gives the same
    with torch.no_grad():
        again = ours(ids, images=hf["pixel_values"], image_sizes=hf["image_sizes"],
                     batch_num_images=hf["batch_num_images"]).logits
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_eager_attention_equals_sdpa(ov, ov_paths):
    ids, kw = encode(ov["original"], QUESTION, [image(300, 300, seed=8)])
    _, eager, _, _ = load_pretrained_model(ov_paths["original"], device="cpu", torch_dtype="float32",
                                           attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, **kw).logits, ov["original"][1](ids, **kw).logits, atol=1e-5, rtol=0)


def test_both_layouts_are_the_same_model(ov):
    """The tiny writer stores one model in both layouts; loaded, they give the same logits over the original
    vocabulary from the two prompt forms (-200 placeholder, expanded <image> tokens)."""
    img = image(640, 480, seed=5)
    out = {}
    for layout in LAYOUTS:
        ids, kw = encode(ov[layout], QUESTION, [img])
        with torch.no_grad():
            out[layout] = ov[layout][1](ids, **kw).logits
    assert (ov["original"][0](QUESTION).input_ids == ov["hf"][0](QUESTION).input_ids)
    V = out["original"].shape[-1]
    assert out["hf"].shape[-1] > V
    torch.testing.assert_close(out["hf"][..., :V], out["original"], atol=1e-5, rtol=0)


def test_batch_left_padding_equals_single(ov):
    """Two questions of different lengths and image sizes, left-padded: each row's logits and greedy tokens
    equal its own run."""
    tok, model, proc = ov["original"]
    items = [(QUESTION, image(300, 300, seed=1)), ("Count the red things, please.", image(380, 200, seed=2))]
    singles = [encode(ov["original"], q, [im]) for q, im in items]
    width = max(ids.shape[1] for ids, _ in singles)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, (row, _) in enumerate(singles):
        ids[b, width - row.shape[1]:], mask[b, width - row.shape[1]:] = row[0], 1
    images = [kw["images"][0] for _, kw in singles]
    sizes = torch.cat([kw["image_sizes"] for _, kw in singles])
    batch = model.generate(ids, attention_mask=mask, images=images, image_sizes=sizes, do_sample=False,
                           max_new_tokens=2, min_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    for b, (row, kw) in enumerate(singles):
        one = model.generate(row, **kw, do_sample=False, max_new_tokens=2, min_new_tokens=2, output_logits=True,
                             return_dict_in_generate=True)
        assert batch.sequences[b].tolist() == one.sequences[0].tolist()
        torch.testing.assert_close(batch.logits[0][b], one.logits[0][0], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ preprocessing
def original_views(img: Image.Image, pinpoints_wh, single: bool = False) -> torch.Tensor:
    """LLaVA-NeXT's preprocessing written out plainly with PIL (process_anyres_image / expand2square and its
    SigLipImageProcessor: bicubic, 1/255, mean = std = 0.5): the reference for the processor."""
    def normalise(im):
        x = np.asarray(im.resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
        return torch.from_numpy(((x - 0.5) / 0.5).astype(np.float32)).permute(2, 0, 1)

    img = img.convert("RGB")
    W, H = img.size
    if single:
        side = max(W, H)
        canvas = Image.new("RGB", (side, side), (127, 127, 127))
        canvas.paste(img, ((side - W) // 2, (side - H) // 2))
        return normalise(canvas)[None]
    best, key = None, None
    for w, h in pinpoints_wh:  # most detail kept, then least waste, the first listed on ties
        scale = min(w / W, h / H)
        eff = min(int(W * scale) * int(H * scale), W * H)
        if key is None or (eff, -(w * h - eff)) > key:
            best, key = (w, h), (eff, -(w * h - eff))
    w, h = best
    if w / W < h / H:
        nw, nh = w, min(int(np.ceil(H * w / W)), h)
    else:
        nw, nh = min(int(np.ceil(W * h / H)), w), h
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((w - nw) // 2, (h - nh) // 2))
    crops = [canvas.crop((x, y, x + 384, y + 384)) for y in range(0, h, 384) for x in range(0, w, 384)]
    return torch.stack([normalise(img)] + [normalise(c) for c in crops])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_processor_equals_the_original_preprocessing(ov, ov_paths, layout):
    tok, model, proc = ov[layout]
    with open(f"{ov_paths['original']}/config.json", encoding="utf-8") as f:
        pinpoints_wh = json.load(f)["image_grid_pinpoints"]
    for W, H in ((333, 517), (1920, 1080), (300, 300), (801, 1203)):
        img = image(W, H, seed=W)
        _, kw = encode(ov[layout], QUESTION, [img])
        torch.testing.assert_close(kw["images"][0], original_views(img, pinpoints_wh), atol=2e-6, rtol=0)
        assert kw["image_sizes"].tolist() == [[H, W]]
    imgs = [image(500, 300, seed=1), image(200, 420, seed=2)]
    _, kw = encode(ov[layout], QUESTION, imgs)
    for got, img in zip(kw["images"], imgs, strict=True):
        torch.testing.assert_close(got, original_views(img, pinpoints_wh, single=True), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_of_both_layouts(ov, ov_paths):
    prompt = chat_prompt("<image>\nIs there a dog?", "qwen_1_5")
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                      "Is there a dog?<|im_end|>\n<|im_start|>assistant\n")
    assert get_conv_template("qwen_2").get_prompt() == get_conv_template("qwen_1_5").get_prompt()
    img = image(640, 480, seed=1)
    ids_o, _ = encode(ov["original"], "Is there a dog?", [img])
    ids_h, _ = encode(ov["hf"], "Is there a dog?", [img])
    assert int((ids_o == IMAGE_TOKEN_INDEX).sum()) == 1
    image_id = ov["hf"][1].config.image_token_id
    assert int((ids_h == image_id).sum()) == 2929 and ids_h.shape[1] == ids_o.shape[1] - 1 + 2929
    keep = ids_h[0] != image_id
    assert ids_h[0][keep].tolist() == ids_o[0][ids_o[0] != IMAGE_TOKEN_INDEX].tolist()
    # the converted checkpoint's chat template renders the same prompt once given the system turn
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]}]
    with open(f"{ov_paths['hf']}/chat_template.json", encoding="utf-8") as f:
        template = json.load(f)["chat_template"]
    rendered = ov["hf"][0].apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                               tokenize=False)
    assert rendered == prompt
    with pytest.raises(ValueError, match="1 <image> mark"):
        encode_prompt(prompt, [img, img], *[ov["original"][i] for i in (0, 2)], ov["original"][1].config)


# ------------------------------------------------------------------------------------------ loading
def test_original_layout_is_not_taken_for_llava(ov, ov_paths, tmp_path):
    """architectures decide before model_type: the original OneVision config (model_type "llava") resolves to the
    OneVision family and loads as OneVision; a LLaVA-1.5 config with the same model_type stays LLaVA; an unknown
    architecture is refused by name; the runners take OneVision's template."""
    path = ov_paths["original"]
    with open(f"{path}/config.json", encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["model_type"] == "llava" and raw["architectures"] == ["LlavaQwenForCausalLM"]
    assert family_for_path(path) is family_for_path(ov_paths["hf"]) is get_family("llava_onevision")
    assert all(isinstance(ov[layout][1], LlavaOnevisionForReduction) for layout in LAYOUTS)
    for arch, family in (("LlavaLlamaForCausalLM", "llava"), ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl")):
        (tmp_path / arch).mkdir()
        (tmp_path / arch / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": [arch]}))
        assert family_for_path(str(tmp_path / arch)).name == family
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llava",
                                                                "architectures": ["LlavaMistralForCausalLM"]}))
    with pytest.raises(ValueError, match="architectures LlavaMistralForCausalLM .*: not a supported model family"):
        family_for_path(str(tmp_path / "other"))
    from llava.eval import runner

    args = runner.argparse.Namespace(model_path=path, conv_mode=None)
    runner.resolve_family_args(args)
    assert args.family.name == "llava_onevision" and args.conv_mode == "qwen_1_5"
    with pytest.raises(ValueError, match="is a LLaVA-OneVision checkpoint: it builds prompts with its own chat "
                                         "template; drop --conv-mode vicuna_v1"):
        runner.resolve_family_args(runner.argparse.Namespace(model_path=path, conv_mode="vicuna_v1"))


def test_original_config_translation(ov_paths, caplog):
    """The range form of the pinpoints expands as LLaVA-NeXT's (x crop size), each pair swapped to (height, width);
    settings the original code would treat differently are refused by name; a video pooling other than the one
    used is said."""
    from llava.model.language_model.llava_onevision import anyres_max_patches
    from llava.model.onevision import original_config, parse_onevision_pinpoints

    path = ov_paths["original"]
    with open(f"{path}/config.json", encoding="utf-8") as f:
        raw = json.load(f)
    assert parse_onevision_pinpoints("(1x1),...,(6x6)", 384) == raw["image_grid_pinpoints"]
    assert parse_onevision_pinpoints("[(384, 768), (768, 384)]", 384) == [[384, 768], [768, 384]]
    cfg, tower = original_config({**raw, "image_grid_pinpoints": [[384, 768], [768, 1152]]}, path)
    assert cfg.image_grid_pinpoints == [[768, 384], [1152, 768]] and tower == "vision_tower"
    assert (cfg.vision_config.num_hidden_layers, cfg.vision_config.vision_use_head) == (2, False)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_token_index) == (-1, "full", -200)
    assert anyres_max_patches("anyres_max_9") == 9
    for key, value, message in (("mm_projector_type", "linear", "mm_projector_type 'linear' is not supported"),
                                ("mm_patch_merge_type", "flat", "allowed: spatial_unpad"),
                                ("image_aspect_ratio", "anyres", "needs 'anyres_max_N'"),
                                ("mm_hidden_size", 1152, "differs from the tower's hidden size 32")):
        with pytest.raises(ValueError, match=message):
            original_config({**raw, key: value}, path)
    with caplog.at_level(logging.WARNING, logger="llava.model.onevision"):
        original_config(raw, path)
        assert not caplog.records  # the tiny checkpoint's stride 2 / bilinear: nothing to say
        original_config({**raw, "mm_spatial_pool_stride": 4, "mm_spatial_pool_mode": "average"}, path)
    assert "mm_spatial_pool_stride 4 / mm_spatial_pool_mode average are not used" in caplog.text


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_loading_is_strict_and_finds_the_tower(ov, ov_paths, tmp_path):
    path = ov_paths["original"]
    weights = load_file(f"{path}/model.safetensors")
    assert "model.image_newline" in weights and "model.mm_projector.0.weight" in weights
    assert not any(".layers.2." in k for k in weights if "vision_tower" in k)  # the tower's last layer is dropped

    extra = _copy(path, tmp_path / "extra")
    save_file({**weights, "model.mm_projector.1.weight": torch.zeros(2)}, f"{extra}/model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected \(model.mm_projector.1.weight\)"):
        load_pretrained_model(extra, device="cpu")
    missing = _copy(path, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if k != "model.image_newline"}, f"{missing}/model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing \(model.image_newline\)"):
        load_pretrained_model(missing, device="cpu")

    # without the tower's weights the checkpoint takes them from the tower itself (all but its last layer)
    towerless = _copy(path, tmp_path / "towerless")
    save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, f"{towerless}/model.safetensors")
    _, model, _, _ = load_pretrained_model(towerless, device="cpu")
    for name, value in ov["original"][1].model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], value), name

    # a hub id that is not cached: one line naming what to download
    hub = _copy(path, tmp_path / "hub")
    shutil.rmtree(f"{hub}/vision_tower")
    with open(f"{hub}/config.json", encoding="utf-8") as f:
        raw = json.load(f)
    raw["mm_vision_tower"] = "google/siglip-so400m-patch14-384-not-cached"
    with open(f"{hub}/config.json", "w", encoding="utf-8") as f:
        json.dump(raw, f)
    with pytest.raises(OSError, match="download it .*huggingface-cli download google/siglip"):
        load_pretrained_model(hub, device="cpu")


# ------------------------------------------------------------------------------------------ refusals
def test_refusals(ov):
    tok, model, proc = ov["original"]
    ids, kw = encode(ov["original"], QUESTION, [image(300, 300, seed=4)])
    with pytest.raises(ValueError, match="^visionzip needs the CLS attention of a vision tower with a CLS token, "
                                         "which this model's vision tower does not have; encoder-side methods that "
                                         "run here: divprune, scan, vflowopt_vit$"):
        model(ids, **kw, reducer=make_method("visionzip", budget=64))
    big, big_kw = encode(ov["original"], QUESTION, [image(1920, 1080, seed=4)])  # its grid is shrunk
    with pytest.raises(ValueError, match="^divprune: an image of 1920x1080 has its grid shrunk by anyres_max_9"):
        model(big, **big_kw, reducer=make_method("divprune", budget=64))
    with pytest.raises(ValueError, match="^pass images or videos to one call, not both"):
        model(ids, **kw, pixel_values_videos=torch.zeros(1, 2, 3, 384, 384))
    with pytest.raises(ValueError, match="takes a 1 x 1 grid of crops, but it has 4"):
        model(ids, images=[torch.zeros(5, 3, 384, 384)], image_sizes=kw["image_sizes"])
    with pytest.raises(ValueError, match="mark images .* but no images were given"):
        model(ids)


# ------------------------------------------------------------------------------------------ video
OV_VIDEOS = {"v8": (8, (96, 64)), "v16": (16, (64, 48))}  # frames, (width, height): 8 and 16 frames, two sizes


@pytest.fixture(scope="module")
def ov_clips(tmp_path_factory) -> dict[str, np.ndarray]:
    """name -> the frames the project reads back from a clip it wrote (the uniform rule, every frame)."""
    from llava.video import VideoSampling, encode_video, load_video
    from tests.test_qwen_video import moving_frames

    root = tmp_path_factory.mktemp("ovclips")
    out = {}
    for i, (name, (n, size)) in enumerate(OV_VIDEOS.items()):
        path = encode_video(root / f"{name}.mp4", moving_frames(n, size, seed=i), fps=4)
        out[name] = load_video(path, VideoSampling(rule="uniform", num_frames=n)).frames
    return out


def ov_video(loaded, frames, question: str = "What moves in the video?"):
    """``(input_ids (1, T), OnevisionVideos)`` of one video question in the qwen_1_5 template."""
    tok, model, proc = loaded
    prompt = chat_prompt("<video>\n" + question, "qwen_1_5")
    ids, videos, sizes = get_family("llava_onevision").encode_video(prompt, frames, 4.0, tok, proc, model.config)
    assert sizes is None
    return ids, videos


@pytest.mark.parametrize("name", list(OV_VIDEOS))
def test_unpruned_video_equals_transformers(ov, ov_paths, ov_clips, name):
    """Converted layout: prefill logits within 1e-5 (float32) of transformers' model fed the same
    ``pixel_values_videos``, ``frames x 196 + 1`` visual tokens in one span; the original layout (one -200 mark for
    the video) gives the same logits from the same weights; greedy tokens equal transformers'."""
    from llava.model.language_model.llava_onevision import video_token_count

    frames = ov_clips[name]
    tok, ours, proc = ov["hf"]
    ids, videos = ov_video(ov["hf"], frames)
    pixels = videos.frames[0][None]  # (1, F, 3, 384, 384)
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_paths["hf"]).eval()
    state = PruneState()
    with torch.no_grad():
        got = ours(ids, images=videos, prune_state=state).logits
        want = ref(input_ids=ids, pixel_values_videos=pixels).logits
        named = ours(ids, pixel_values_videos=pixels).logits  # transformers' name for the same input
    n = len(frames) * 196 + 1
    assert [len(s.stages) for s in state.samples] == [0] and state.samples[0].n_visual == n
    assert int((ids == ours.config.video_token_id).sum()) == n == video_token_count(len(frames), ours.config)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(named, got, atol=0, rtol=0)
    o_ids, o_videos = ov_video(ov["original"], frames)
    assert int((o_ids == IMAGE_TOKEN_INDEX).sum()) == 1 and o_ids.shape[1] == ids.shape[1] - n + 1
    with torch.no_grad():
        original = ov["original"][1](o_ids, images=o_videos).logits
    torch.testing.assert_close(got[..., :original.shape[-1]], original, atol=1e-5, rtol=0)
    if name == "v8":
        gen = dict(do_sample=False, max_new_tokens=3, min_new_tokens=3)
        new = ours.generate(ids, images=videos, **gen)
        ref_new = ref.generate(input_ids=ids, pixel_values_videos=pixels, **gen)[:, ids.shape[1]:]
        assert new.tolist() == ref_new.tolist()


def test_video_frames_are_single_views(ov, ov_clips):
    """Every frame is preprocessed as one 384-px view, as LLaVA-NeXT's SigLipImageProcessor does for a video's
    frames (written out with PIL: bicubic to 384 x 384, 1/255, mean = std = 0.5; no padding, no anyres crops)."""
    from llava.video import onevision_video_inputs

    frames = ov_clips["v8"]
    got = onevision_video_inputs(frames, ov["original"][2])
    want = []
    for f in frames:
        x = np.asarray(Image.fromarray(f).resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
        want.append(torch.from_numpy(((x - 0.5) / 0.5).astype(np.float32)).permute(2, 0, 1))
    assert got.shape == (1, 8, 3, 384, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], torch.stack(want), atol=1e-6, rtol=0)
    # both layouts' processors preprocess alike
    torch.testing.assert_close(onevision_video_inputs(frames, ov["hf"][2]), got, atol=0, rtol=0)


def test_video_refusals_are_one_line(ov, ov_clips):
    """Encoder-side methods, a <video> mark without video, images and videos in one call, a prompt without the
    one <video> mark."""
    loaded = ov["hf"]
    tok, model, proc = loaded
    ids, videos = ov_video(loaded, ov_clips["v8"])
    start = int((ids[0] == model.config.video_token_id).nonzero()[0])
    short = torch.cat([ids[:, :start], ids[:, start + 5:]], dim=1)  # five of the video's marks missing
    errors = []
    for call, pattern in [
        (lambda: model(ids, images=videos, reducer=make_method("divprune", budget=32)),
         r"^divprune is an encoder-side method, which runs on LLaVA-OneVision's images only; for videos use a "
         r"method inside the language model"),
        (lambda: model(ids), r"^the prompts mark a video \(<video>\) but no videos were given"),
        (lambda: model(ids, images=[torch.zeros(1, 3, 384, 384)], image_sizes=torch.tensor([[384, 384]]),
                       pixel_values_videos=videos.frames[0][None]), r"^pass images or videos to one call, not both"),
        (lambda: model(short, images=videos), r"^video 0 makes 1569 visual tokens but its run of marks in the prompt "
                                               r"is shorter"),
        (lambda: get_family("llava_onevision").encode_video("<image>\nx", ov_clips["v8"], 4.0, tok, proc,
                                                            model.config),
         r"^a video prompt holds one <video> mark and no <image>"),
    ]:
        with pytest.raises(ValueError, match=pattern) as err:
            call()
        errors.append(str(err.value))
    assert all("\n" not in e for e in errors)


# ------------------------------------------------------------------------------------------ the writer
def test_writer_is_deterministic_and_complete(ov_paths, tmp_path, capsys):
    tiny_main(["--out", str(tmp_path / "again"), "--layout", "hf", "--seed", "3"])
    assert "written to" in capsys.readouterr().out
    ref = ov_paths["hf"]
    names = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert names == ["chat_template.json", "config.json", "merges.txt", "model.safetensors",
                     "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                     "vocab.json"]
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == open(f"{ref}/{name}", "rb").read(), name
    with open(f"{ref}/config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava_onevision" and cfg["vision_config"]["num_hidden_layers"] == 2
    assert not cfg["vision_config"]["vision_use_head"] and cfg["vision_feature_layer"] == -1
    keys = load_file(f"{ref}/model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector",
                                               "image_newline"}
    with pytest.raises(ValueError, match="unknown layout 'next'; allowed: original, hf"):
        write_tiny_onevision_checkpoint(tmp_path / "x", "next")


# ------------------------------------------------------------------------------------------ methods' OneVision defaults
@pytest.fixture(scope="module")
def deep_ov(tmp_path_factory) -> str:
    """A tiny OneVision with the 7B model's 28 decoder layers (48-px patches: 8 x 8 tokens per view)."""
    from llava.model.families import get_family

    return str(get_family("llava_onevision").write_tiny(tmp_path_factory.mktemp("ckpt") / "ov-tiny-28", seed=5,
                                                        layers=28))


def test_methods_take_the_same_share_of_depth():
    """Where the authors publish nothing for OneVision, a method's layers are LLaVA's at the same share of the
    28-layer decoder; VFlowOpt keeps its own (9, 18)."""
    from pio.budget import same_share_of_depth

    assert same_share_of_depth((1, 10, 15), 28) == (1, 9, 13) and same_share_of_depth((1, 2, 3), 3, 32) == (1, 2, 3)
    want = {"pio": (1, 9, 13), "fastv": (2,), "pdrop": (2, 7, 14, 21), "sparsevlm": (3, 6, 14), "dart": (2,),
            "random": (1, 9, 13), "visiondrop": (7, 14, 21), "vflowopt": (9, 18)}
    family = get_family("llava_onevision")
    assert {n: get_method(n).defaults(family)["layers"] for n in want} == want
    assert get_method("pio").defaults(family)["ve_layers"] == (14,)


def test_vflowopt_published_strategy_is_the_preset(deep_ov):
    """``--method vflowopt_vit+vflowopt --budget B`` on OneVision is the authors' strategy: at 57.6 / 144 / 288 (10,
    25, 50 % of 576) their ViT layer, t, m and kept share and their LLM layers and ratios, averaging B/576 of the
    visual tokens over the 28 layers; it runs on a 28-layer tiny OneVision. On LLaVA the generic w/ VE rule holds."""
    from pio.build import build_reducer
    from pio.methods.vflowopt import ONEVISION_STRATEGIES

    for budget, s in zip((57.6, 144, 288), ONEVISION_STRATEGIES, strict=True):
        pipe = build_reducer("vflowopt_vit+vflowopt", {"budget": budget}, family="llava_onevision")
        assert (pipe.pre.t, pipe.pre.m, pipe.pre.layer, pipe.pre.alpha) == (s.t, s.m, -1, 0.0)
        assert pipe.pre.tokens == round(s.r * 576)
        assert pipe.llm.layers == (9, 18) and pipe.llm.schedule.ratios == s.llm_ratios
        assert s.r * s.average(28) == pytest.approx(s.share, abs=0.001)
    assert build_reducer("vflowopt_vit+vflowopt", {"budget": 64}, family="llava").pre.layer == -2
    tok, model, proc, _ = load_pretrained_model(deep_ov, device="cpu", torch_dtype="float32")
    family = get_family("llava_onevision")
    ids, views, sizes = family.encode(chat_prompt("<image>\n" + QUESTION, "qwen_1_5"), [image(500, 400, seed=2)],
                                      tok, proc, model.config)
    st = PruneState()
    reducer = build_reducer("vflowopt_vit+vflowopt", {"budget": 144}, family="llava_onevision")
    out = model.generate(ids, images=views, image_sizes=sizes, reducer=reducer, prune_state=st, do_sample=False,
                         max_new_tokens=2, min_new_tokens=2)
    rec = st.samples[0]
    assert out.shape == (1, 2) and rec.n_encoder > rec.n_visual and len(rec.stages) == 2


@pytest.mark.slow
def test_tune_vflowopt_strategy_on_onevision(deep_ov, tmp_path):
    """``llava.eval.tune --strategy vflowopt`` on a 28-layer tiny OneVision: PIO's OneVision layers kept, the
    budget met."""
    from llava.eval import tune
    from pio.schedule import average_visual_tokens

    root = tmp_path / "calib"
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(4):
        image(*[(400, 300), (300, 420)][i % 2], seed=20 + i).save(root / "images" / f"c{i}.png")
        lines.append({"question_id": i, "image": f"c{i}.png", "text": f"What is at place {i}?"})
    (root / "calib.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = tune.build_parser().parse_args([
        "--model-path", deep_ov, "--question-file", str(root / "calib.jsonl"), "--image-folder", str(root / "images"),
        "--out", str(tmp_path / "ov.json"), "--device", "cpu", "--answer-tokens", "2", "--method", "pio",
        "--budget", "64", "--trials", "4", "--strategy", "vflowopt", "--objective", "cosine"])
    tok, model, proc, _ = load_pretrained_model(deep_ov, device="cpu", torch_dtype="float32")
    out = tune.run(args, (tok, model, proc, "ov-tiny-28"))
    found = out["report"]["found"]
    assert found["layers"] == out["report"]["default"]["layers"] == [1, 9, 13]
    assert average_visual_tokens(576, found["layers"], found["tokens_at_576"], 28) == pytest.approx(64.0)
