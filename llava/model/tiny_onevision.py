"""Write tiny, deterministic, random-weight LLaVA-OneVision checkpoints in both official layouts.

``python -m llava.model.tiny_onevision --out DIR --layout original|hf [--seed N] [--layers N] [--hidden N] [--tie]``

Both layouts hold the same random model (the same arguments give the same weights), at toy widths but the real
geometry: a SigLIP tower at 384 px with 14-px patches (27 x 27 = 729 tokens per view, which the original code
asserts), the 6 x 6 grid of 384-px pinpoints and ``anyres_max_9``, so the token layout and its counts are the
real ones (384x384 -> 1485, 640x480 -> 2929, 1920x1080 -> 7269 tokens).

* ``original`` (``lmms-lab/llava-onevision-qwen2-7b-ov``'s files): ``config.json`` with ``model_type "llava"``,
  ``architectures ["LlavaQwenForCausalLM"]``, the Qwen2 keys and the ``mm_*`` keys (``mm_vision_tower
  "vision_tower"``, a folder next to it instead of ``google/siglip-so400m-patch14-384``); ``model.safetensors``
  with LLaVA-NeXT's names (``model.layers.*``, ``model.vision_tower.vision_tower.vision_model.*`` with the
  tower's last layer dropped, ``model.mm_projector.{0,2}.*``, ``model.image_newline``, ``lm_head.weight`` unless
  tied); a Qwen2 byte-level BPE tokenizer whose only added tokens are ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>`` (151643-151645 in the real one); ``vision_tower/``: a whole tiny SigLIP (text and vision,
  ``model_type "siglip"`` like the hub's) with every vision layer and the head, its first layers equal to the
  checkpoint's copy, and its ``preprocessor_config.json`` (mean = std = 0.5, 384 x 384, bicubic).
* ``hf`` (``llava-hf/llava-onevision-qwen2-7b-ov-hf``'s files), made from the same model as transformers'
  conversion script does: ``config.json`` of ``LlavaOnevisionConfig`` (the tower with ``N - 1`` layers and no
  head, ``vision_feature_layer -1``, strategy ``full``, transformers' default pinpoint list), ``<image>`` and
  ``<video>`` added to the tokenizer right after ``<|im_end|>`` (151646/151647), the vocabulary grown to
  ``vocab_size + 2`` rounded up to a multiple of 64 with the new rows drawn around the mean embedding (the
  script samples them from a narrow normal there), weights under the hub's names (``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.linear_{1,2}.*``,
  ``image_newline``), ``preprocessor_config.json`` (``LlavaOnevisionImageProcessor``, SigLIP's values),
  ``processor_config.json`` and ``chat_template.json`` (the converted checkpoints' template: each message
  ``<|im_start|>{role}\\n``, one ``<image>\\n`` per image, the text, ``<|im_end|>\\n``; no default system turn).

The real vocabulary has unused rows after the tokenizer's last id (152064 rows for 151646 tokens); the tiny one is
rounded up to a multiple of 64 the same way, so ``<image>`` of the converted layout is one of those rows, as in
the real pair. Tokenizer files not listed above (e.g. the hub's chat template in ``tokenizer_config.json``) are
left out: nothing here reads them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from llava.constants import IMAGE_TOKEN_INDEX

from .onevision import SIGLIP_MEAN, SIGLIP_STD
from .tiny_qwen import DEFAULT_BPE_SIZE, _added_token, _train_bpe

logger = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "PINPOINTS", "write_tiny_onevision_checkpoint"]

LAYOUTS = ("original", "hf")
IMAGE_SIZE = 384
PATCH_SIZE = 14
PINPOINTS = [[IMAGE_SIZE * i, IMAGE_SIZE * j] for i in range(1, 7) for j in range(1, 7)]  # the checkpoints' list
QWEN2_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
HF_TOKENS = ("<image>", "<video>")
HEADS = 4  # the language model's attention heads (key-value heads: half as many)
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=IMAGE_SIZE,
              patch_size=PATCH_SIZE, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'video' %}{{ '<video>\\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(out: Path, bpe_size: int, layout: str) -> dict[str, int]:
    """Qwen2 byte-level BPE (trained on tiny_qwen's corpus) plus Qwen2's three added tokens (and, for ``hf``,
    ``<image>``/``<video>``); returns the added tokens' ids."""
    tok = _train_bpe(bpe_size)
    if tok.get_vocab_size() < bpe_size:
        raise ValueError(f"the tokenizer corpus supports at most {tok.get_vocab_size()} BPE tokens, got {bpe_size}")
    added = QWEN2_TOKENS + (HF_TOKENS if layout == "hf" else ())
    tok.add_special_tokens([_added_token(t, special=True) for t in added])
    ids = {t: tok.token_to_id(t) for t in added}
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    _write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                   single_word=False, special=True) for t in added},
        "additional_special_tokens": [t for t in added if t != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return ids


def _text_config(vocab: int, ids: dict[str, int], layers: int, hidden: int, tie: bool) -> dict:
    if hidden % (2 * HEADS) or hidden < 32:
        raise ValueError(f"hidden must be a multiple of {2 * HEADS} and at least 32, got {hidden}")
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, hidden_act="silu",
                max_position_embeddings=32768, max_window_layers=layers, rms_norm_eps=1e-6, rope_theta=1000000.0,
                rope_scaling=None, sliding_window=131072, use_sliding_window=False, attention_dropout=0.0,
                initializer_range=0.05, tie_word_embeddings=tie, use_cache=True,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])


def _random_model(seed: int, text: dict, tower_layers: int, vision: dict) -> LlavaOnevisionForConditionalGeneration:
    """The random model both layouts store (its tower: ``tower_layers - 1`` layers, as LLaVA-OneVision keeps)."""
    config = LlavaOnevisionConfig(
        text_config=dict(text, model_type="qwen2"),
        vision_config=dict(vision, model_type="siglip_vision_model", num_hidden_layers=tower_layers - 1,
                           vision_use_head=False),
        image_token_index=IMAGE_TOKEN_INDEX, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[list(p) for p in PINPOINTS],
        tie_word_embeddings=text["tie_word_embeddings"], initializer_range=0.05)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def _write_tower(out: Path, model: LlavaOnevisionForConditionalGeneration, seed: int, tower_layers: int,
                 vision: dict) -> None:
    """A whole tiny SigLIP (text + vision) whose vision part starts with the model's tower; its last layer and
    head are its own."""
    torch.manual_seed(seed + 1)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(vision, num_hidden_layers=tower_layers)))
    own = siglip.vision_model.state_dict()
    own.update(model.model.vision_tower.vision_model.state_dict())  # embeddings, the first N - 1 layers, final norm
    siglip.vision_model.load_state_dict(own)
    siglip.save_pretrained(out, safe_serialization=True)
    SiglipImageProcessor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                         do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=SIGLIP_MEAN,
                         image_std=SIGLIP_STD).save_pretrained(out)


def _original_weights(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    """transformers' names -> LLaVA-NeXT's (the inverse of llava.model.onevision.ORIGINAL_KEY_MAPPING)."""
    renames = (("model.language_model.", "model."), ("model.vision_tower.", "model.vision_tower.vision_tower."),
               ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."))
    out = {}
    for key, value in state.items():
        if tie and key == "lm_head.weight":
            continue
        out[_rename(key, renames)] = value.contiguous()
    return out


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``key`` with its first matching prefix of ``renames`` (old, new) replaced."""
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _hf_weights(state: dict[str, torch.Tensor], vocab: int, seed: int, tie: bool) -> dict[str, torch.Tensor]:
    """The converted layout's tensors under the hub's names, the vocabulary grown to ``vocab`` rows."""
    gen = torch.Generator().manual_seed(seed + 2)
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.image_newline", "image_newline"))
    out = {}
    for key, value in state.items():
        if tie and key == "lm_head.weight":
            continue
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            extra = value.mean(0) + 1e-3 * value.std(0) * torch.randn(vocab - value.shape[0], value.shape[1],
                                                                        generator=gen)
            value = torch.cat([value, extra])
        out[_rename(key, renames)] = value.contiguous()
    return out


def write_tiny_onevision_checkpoint(
    out_dir: str | os.PathLike,
    layout: str = "original",
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    tower_layers: int = 3,
    tie: bool = False,
    bpe_size: int = DEFAULT_BPE_SIZE,
    patch_size: int = PATCH_SIZE,
) -> Path:
    """Write the checkpoint directory and return its path.

    Args:
        layout: ``original`` (lmms-lab's files) or ``hf`` (llava-hf's); the same other arguments give the same
            model in both.
        seed: seeds the random weights (the tokenizer does not depend on it).
        layers: decoder layers of the language model (4 query, 2 key-value heads).
        hidden: hidden size of the language model.
        tower_layers: the SigLIP tower's layers; the checkpoint keeps all but the last, as OneVision does.
        tie: tie the LM head to the embeddings (as the 0.5B model; the 7B does not).
        bpe_size: BPE vocabulary before the added tokens.
        patch_size: the tower's patch side in pixels (14, the real one: 27 x 27 tokens per 384-px view; a larger
            one gives fewer tokens per view with the same views, grids and ``anyres_max_9`` rule, e.g. 48: 8 x 8).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if tower_layers < 2:
        raise ValueError(f"tower_layers must be at least 2 (the checkpoint drops the last), got {tower_layers}")
    out = Path(out_dir)
    ids = _write_tokenizer(out, bpe_size, layout)
    n_tokens = min(ids.values()) + len(QWEN2_TOKENS)  # the original tokenizer's size
    vocab = _round_up(n_tokens)
    text = _text_config(vocab, ids, layers, hidden, tie)
    if not 0 < patch_size <= IMAGE_SIZE:  # SigLIP's convolution drops the remainder: 384 // 14 = 27 tokens a side
        raise ValueError(f"patch_size must be in [1, {IMAGE_SIZE}] (the view's side in pixels), got {patch_size}")
    vision = dict(VISION, patch_size=patch_size)
    model = _random_model(seed, text, tower_layers, vision)
    state = model.state_dict()
    if layout == "original":
        save_file(_original_weights(state, tie), str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_tower(out / "vision_tower", model, seed, tower_layers, vision)
        _write_json(out / "config.json", dict(
            text, architectures=["LlavaQwenForCausalLM"], model_type="llava", torch_dtype="float32",
            transformers_version=transformers.__version__,
            mm_vision_tower="vision_tower", mm_hidden_size=VISION["hidden_size"], mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="spatial_unpad",
            mm_newline_position="one_token", mm_spatial_pool_mode="bilinear",
            mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model", mm_use_im_start_end=False,
            mm_use_im_patch_token=False, image_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS,
            image_crop_resolution=None, image_split_resolution=None, tokenizer_model_max_length=32768,
            tokenizer_padding_side="right", use_mm_proj=True))
    else:
        hf_vocab = _round_up(vocab + len(HF_TOKENS))
        save_file(_hf_weights(state, hf_vocab, seed, tie), str(out / "model.safetensors"), metadata={"format": "pt"})
        config = LlavaOnevisionConfig(
            text_config=dict(text, model_type="qwen2", vocab_size=hf_vocab),
            vision_config=model.config.vision_config.to_dict(),
            image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[list(p) for p in PINPOINTS], tie_word_embeddings=tie,
            architectures=["LlavaOnevisionForConditionalGeneration"])
        config.save_pretrained(out)
        LlavaOnevisionImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=[list(p) for p in PINPOINTS],
            resample=3, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, do_pad=True, do_convert_rgb=True,
        ).save_pretrained(out)
        side = IMAGE_SIZE // patch_size
        _write_json(out / "processor_config.json", {"num_image_tokens": side * side,
                                                    "processor_class": "LlavaOnevisionProcessor",
                                                    "vision_feature_select_strategy": "full"})
        _write_json(out / "chat_template.json", {"chat_template": HF_CHAT_TEMPLATE})
    logger.info("wrote a tiny LLaVA-OneVision checkpoint (%s layout) to %s", layout, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--layout", choices=LAYOUTS, default="original",
                   help="original: lmms-lab's files (model_type llava); hf: llava-hf's converted files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the language model")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the embeddings (as the 0.5B model)")
    p.add_argument("--patch-size", type=int, default=PATCH_SIZE,
                   help="the tower's patch side (14: the real 27 x 27 tokens per view; 48: 8 x 8)")
    args = p.parse_args(argv)
    path = write_tiny_onevision_checkpoint(args.out, args.layout, seed=args.seed, layers=args.layers,
                                           hidden=args.hidden, tie=args.tie, patch_size=args.patch_size)
    print(f"tiny LLaVA-OneVision checkpoint ({args.layout} layout) written to {path}")


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)

