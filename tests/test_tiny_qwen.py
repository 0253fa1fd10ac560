"""The tiny Qwen2.5-VL checkpoint (``llava/model/tiny_qwen.py``) loads offline into transformers' own Qwen2.5-VL
classes: config round trip, token ids, chat template, processor outputs, model forward/generate, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2TokenizerFast,
    Qwen2VLImageProcessor,
)
from transformers.utils import is_torchvision_available

from llava.model.tiny_qwen import QWEN_EXTRA_TOKENS, QWEN_SPECIAL_TOKENS, main, write_tiny_qwen_checkpoint

QUESTION = "Is there a dog?"
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a dog?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
FILES = (
    "chat_template.json", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
)


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor, which transformers 4.57 cannot build without torchvision
    (``AutoProcessor`` raises ImportError then, even for images)."""

    attributes = ["image_processor", "tokenizer"]
    video_processor = None


def load_processor(path: Path) -> Qwen2_5_VLProcessor:
    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    return ImageOnlyQwenProcessor.from_pretrained(path)


def gradient_image(width: int, height: int) -> Image.Image:
    """A deterministic RGB gradient."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")




def one_image_prompt(processor: Qwen2_5_VLProcessor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl-tiny", seed=0)


@pytest.fixture(scope="module")
def processor(ckpt) -> Qwen2_5_VLProcessor:
    return load_processor(ckpt)


@pytest.fixture(scope="module")
def model(ckpt) -> Qwen2_5_VLForConditionalGeneration:
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    return model.eval()


def test_files_and_flat_config_round_trip(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(FILES)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["model_type"] == "qwen2_5_vl" and "text_config" not in raw  # the hub's flat layout
    assert raw["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert raw["torch_dtype"] == "float32"

    cfg = AutoConfig.from_pretrained(ckpt)
    assert isinstance(cfg, Qwen2_5_VLConfig)
    text, vision = cfg.text_config, cfg.vision_config
    sizes = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert sizes == (64, 4, 4, 2)
    assert text.intermediate_size == 176 and text.rope_theta == 1e6 and text.max_position_embeddings == 32768
    assert not text.tie_word_embeddings and not text.use_sliding_window
    head_dim = text.hidden_size // text.num_attention_heads
    section = text.rope_scaling["mrope_section"]
    assert section == [2, 3, 3] and sum(section) == head_dim // 2
    assert cfg.hidden_size == 64 and cfg.vocab_size == text.vocab_size  # top-level reads go to text_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (4, 32, 2, 64)
    patches = (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size, vision.in_channels)
    assert patches == (14, 2, 2, 3)
    assert vision.window_size == 56 and vision.fullatt_block_indexes == [1, 3] and vision.out_hidden_size == 64
    assert cfg.dtype == torch.float32

    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor" and pre["processor_class"] == "Qwen2_5_VLProcessor"


def test_token_ids_match_tokenizer(ckpt):
    tok = AutoTokenizer.from_pretrained(ckpt)
    cfg = AutoConfig.from_pretrained(ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert isinstance(tok, Qwen2TokenizerFast)
    assert len(tok) == cfg.vocab_size
    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS))
    first = ids[0]
    assert ids == list(range(first, first + 22)) and first == len(tok) - 22  # like 151643..151664 after the BPE
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_end|>") == cfg.vision_end_token_id
    assert tok.convert_tokens_to_ids("<|vision_pad|>") == cfg.vision_token_id
    assert tok.convert_tokens_to_ids("<|endoftext|>") == cfg.bos_token_id == gen["pad_token_id"] == tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") == cfg.eos_token_id == tok.eos_token_id
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id]
    assert tok.bos_token is None  # no BOS, like Qwen2
    assert tok(QUESTION).input_ids == tok.convert_tokens_to_ids(tok.tokenize(QUESTION))
    special = set(tok.all_special_tokens)
    assert set(QWEN_SPECIAL_TOKENS) <= special and not set(QWEN_EXTRA_TOKENS) & special


def test_slow_and_fast_tokenizers_agree(ckpt, processor):
    prompt = one_image_prompt(processor)
    slow = AutoTokenizer.from_pretrained(ckpt, use_fast=False)
    assert type(slow).__name__ == "Qwen2Tokenizer"
    for text in (prompt, "Which object is larger, the cat or the bus? Answer with 24 HOURS.\n\n  ok"):
        assert slow(text).input_ids == processor.tokenizer(text).input_ids
    assert len(processor.tokenizer(prompt).input_ids) == 27  # every word of the chat format is one token


def test_chat_template(processor):
    assert isinstance(processor, Qwen2_5_VLProcessor)
    # the slow class here; with torchvision, AutoProcessor picks Qwen2VLImageProcessorFast in 4.57
    assert type(processor.image_processor).__name__.startswith(Qwen2VLImageProcessor.__name__)
    assert one_image_prompt(processor) == EXPECTED_PROMPT
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "video"}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
        "<|im_start|>user\nLook: <|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
    )
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == processor.apply_chat_template(
        messages, tokenize=False)


def test_auto_processor(ckpt):
    """With torchvision, AutoProcessor builds Qwen's processor; without it (the CPU install), transformers 4.57
    refuses, naming torchvision (the reason the loader builds the tokenizer and image processor itself)."""
    from transformers import AutoProcessor

    if not is_torchvision_available():
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            AutoProcessor.from_pretrained(ckpt)
        return
    proc = AutoProcessor.from_pretrained(ckpt)
    assert isinstance(proc, Qwen2_5_VLProcessor)
    assert one_image_prompt(proc) == EXPECTED_PROMPT


@pytest.mark.parametrize("size, grid", [((640, 480), [1, 18, 26]), ((500, 500), [1, 22, 22])])
def test_processor_outputs_and_windows(processor, model, size, grid):
    batch = processor(text=[one_image_prompt(processor)], images=[gradient_image(*size)], return_tensors="pt")
    thw = batch["image_grid_thw"]
    assert thw.tolist() == [grid]
    n_visual = int(thw.prod()) // 4
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n_visual
    assert batch["input_ids"].shape[1] == 27 - 1 + n_visual
    assert batch["pixel_values"].shape == (int(thw.prod()), 3 * 2 * 14 * 14)
    _, cu_window_seqlens = model.visual.get_window_index(thw)
    windows = len(torch.unique_consecutive(torch.tensor(cu_window_seqlens))) - 1
    merged_h, merged_w = grid[1] // 2, grid[2] // 2
    assert windows == -(-merged_h // 2) * -(-merged_w // 2) > 1  # 2x2 merged tokens per window


def test_model_forward_and_generate(processor, model):
    batch = processor(text=[one_image_prompt(processor)], images=[gradient_image(640, 480)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=3)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out, model.generate(**batch, max_new_tokens=3))  # top-k 1: the same every time


def test_cli_writes_identical_files_and_seed_changes_weights(ckpt, tmp_path, capsys):
    main(["--out", str(tmp_path / "again"), "--seed", "0"])
    assert "written to" in capsys.readouterr().out
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (ckpt / name).read_bytes(), name
    other = write_tiny_qwen_checkpoint(tmp_path / "seed1", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()
