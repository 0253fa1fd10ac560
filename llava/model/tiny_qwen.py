"""Write a tiny, deterministic, random-weight Qwen2.5-VL checkpoint in the official layout.

``python -m llava.model.tiny_qwen --out DIR [--seed N] [--layers N] [--hidden N] [--min-pixels N] [--max-pixels N]``

The directory holds the same files as ``Qwen/Qwen2.5-VL-7B-Instruct``, at toy sizes:

* ``config.json``: model_type ``qwen2_5_vl`` in the hub's flat layout (text keys at the top level, the vision
  tower under ``vision_config``, ``rope_scaling = {"type": "mrope", "mrope_section": [...]}``), and
  ``generation_config.json`` with the Instruct model's generation defaults;
* ``model.safetensors``: a random :class:`~transformers.Qwen2_5_VLForConditionalGeneration` (float32);
* a byte-level BPE tokenizer (``tokenizer.json`` plus ``vocab.json``/``merges.txt`` and ``tokenizer_config.json``)
  trained in code on a fixed corpus, followed by Qwen's 22 added tokens in Qwen's order (``<|endoftext|>``,
  ``<|im_start|>``, ..., ``<|image_pad|>``, ``<|video_pad|>``, then the non-special tool/FIM tokens), so their
  ids are ``n_bpe + 0 ... n_bpe + 21`` where the real ones are ``151643 ... 151664``;
* ``preprocessor_config.json`` (``Qwen2VLImageProcessor``, patch 14, merge 2, CLIP mean/std, small
  ``min_pixels``/``max_pixels``) and ``chat_template.json``, so ``AutoProcessor`` gives a ``Qwen2_5_VLProcessor``
  (transformers 4.57 builds its video processor too, which needs torchvision; without it, load
  ``Qwen2_5_VLProcessor`` minus the video processor, as ``tests/test_tiny_qwen.py`` does).

With the default pixel bounds a 640x480 image becomes an 18x26 (height x width) patch grid, 117 visual tokens
after the 2x2 merge, and a 500x500 one a 22x22 grid, 121 tokens; the vision tower's 56-pixel windows cover 2x2
merged tokens, so such images span dozens of windows. The real model is evaluated at ``min_pixels = max_pixels =
1008 * 1008`` (1296 tokens for a square image, 1344 for 640x480): pass those to get the real token counts, at a
matching cost. Everything is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from .tiny import CLIP_MEAN, CLIP_STD
from .tiny_tokenizer import tiny_tokenizer_corpus

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "QWEN_CHAT_TEMPLATE",
    "QWEN_EXTRA_TOKENS",
    "QWEN_SPECIAL_TOKENS",
    "generation_config",
    "mrope_section",
    "preprocessor_config",
    "tiny_qwen_config",
    "tiny_qwen_corpus",
    "write_tiny_qwen_checkpoint",
    "write_tiny_qwen_tokenizer",
]

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # image sides are resized to multiples of 28 pixels
DEFAULT_MIN_PIXELS = FACTOR * FACTOR * 4  # 3136, the official lower bound
DEFAULT_MAX_PIXELS = FACTOR * FACTOR * 128  # at most 128 merged visual tokens per image
DEFAULT_BPE_SIZE = 1024
HEADS = 4  # attention heads of the language model (key-value heads: half as many)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's added tokens in id order: the special ones first (ids 151643-151656 in the real vocabulary)...
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# ...then the tool-call and fill-in-the-middle tokens, added but not special (151657-151664).
QWEN_EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2's pre-tokenisation pattern: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newline runs, other whitespace.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL-Instruct's prompt format for text, image and video content (written for this project). A message's
# content is a string or a list of items {"type": "text", "text": ...} / {"type": "image", ...} /
# {"type": "video", ...}; a default system turn is added when the conversation does not start with one.
QWEN_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Short answers the model is asked for in benchmarks, for the assistant turns of the corpus.
_ANSWERS = ("Yes.", "No.", "Yes", "No", "A", "B", "C", "D", "Two.", "It is red.")


def tiny_qwen_corpus() -> list[str]:
    """The fixed, ordered training text: the LLaVA tokenizer's corpus plus the chat format's plain-text parts.

    Special tokens are matched before the BPE model runs, so the corpus holds only what lies between them:
    ``system\\n<system prompt>``, ``user\\n<question>``, ``assistant\\n<answer>``.
    """
    base = tiny_tokenizer_corpus()
    lines = [f"system\n{DEFAULT_SYSTEM_PROMPT}", "system", "user", "assistant", "\n"]
    lines.extend(base)
    lines.extend(f"user\n{line}" for line in base if line.endswith("?"))
    lines.extend(f"assistant\n{answer}" for answer in _ANSWERS)
    return lines


def _train_bpe(bpe_size: int) -> Tokenizer:
    """Train Qwen2-style byte-level BPE (NFC, Qwen's split pattern, no unk) on :func:`tiny_qwen_corpus`."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = tiny_qwen_corpus()
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tok


def _added_token(content: str, special: bool) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def write_tiny_qwen_tokenizer(out_dir: str | os.PathLike, bpe_size: int = DEFAULT_BPE_SIZE) -> dict[str, int]:
    """Train the tiny Qwen2 tokenizer and write it into ``out_dir``; return the added tokens' ids.

    Writes ``tokenizer.json`` (fast), ``vocab.json`` + ``merges.txt`` (slow ``Qwen2Tokenizer``) and
    ``tokenizer_config.json`` (Instruct settings: no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``, the chat
    template). ``AutoTokenizer.from_pretrained(out_dir)`` gives a ``Qwen2TokenizerFast``.

    Args:
        bpe_size: size of the byte-level BPE vocabulary (256 byte symbols included) before the 22 added tokens,
            from 300 to 1145, where the corpus saturates (every word one token); ValueError outside.
    """
    if bpe_size < 300:
        raise ValueError(f"bpe_size must be at least 300, got {bpe_size}")
    tok = _train_bpe(bpe_size)
    if tok.get_vocab_size() < bpe_size:
        raise ValueError(f"the tokenizer corpus supports at most {tok.get_vocab_size()} BPE tokens, got {bpe_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.add_special_tokens([_added_token(t, special=True) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([_added_token(t, special=False) for t in QWEN_EXTRA_TOKENS])
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS}
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json and merges.txt
    added = {
        str(ids[t]): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                          special=t in QWEN_SPECIAL_TOKENS)
        for t in QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", config)
    logger.info("wrote a tiny Qwen2 tokenizer (%d BPE + %d added tokens) to %s", tok.get_vocab_size(False),
                len(ids), out)
    return ids


def mrope_section(head_dim: int) -> list[int]:
    """Split the ``head_dim / 2`` rotary frequencies over (time, height, width) in the 7B's 2:3:3 ratio.

    The 7B uses ``[16, 24, 24]`` for head_dim 128; head_dim 16 gives ``[2, 3, 3]``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def _check_hidden(hidden: int) -> None:
    if hidden % (2 * HEADS) or hidden < 32:
        raise ValueError(f"hidden must be a multiple of {2 * HEADS} and at least 32, got {hidden}")


def tiny_qwen_config(token_ids: dict[str, int], layers: int = 4, hidden: int = 64, **overrides: Any) -> dict:
    """The ``config.json`` of a tiny checkpoint, in the hub's flat layout (text keys at the top level).

    ``token_ids`` maps the added tokens to their ids (from :func:`write_tiny_qwen_tokenizer`); the vocabulary
    ends right after the last one. ``overrides`` replace top-level keys.
    """
    _check_hidden(hidden)
    cfg = dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        vocab_size=max(token_ids.values()) + 1,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,  # grouped-query attention, as the 7B (28 query / 4 key-value heads)
        hidden_act="silu",
        max_position_embeddings=32768,
        max_window_layers=layers,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section(hidden // HEADS)},
        sliding_window=32768,
        use_sliding_window=False,
        attention_dropout=0.0,
        initializer_range=0.05,  # a little wider than the real 0.02, for less uniform attention
        tie_word_embeddings=False,
        use_cache=True,
        torch_dtype="float32",
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        vision_token_id=token_ids["<|vision_pad|>"],
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_config=dict(
            depth=4,
            hidden_size=32,
            hidden_act="silu",
            intermediate_size=64,
            num_heads=2,
            in_chans=3,
            out_hidden_size=hidden,
            patch_size=PATCH_SIZE,
            spatial_patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            window_size=56,  # 2x2 merged tokens (4x4 patches) per window; the 7B's 112 covers 4x4 merged tokens
            fullatt_block_indexes=[1, 3],  # blocks 0 and 2 attend within windows, like 7B's all but 7/15/23/31
            tokens_per_second=2,
            initializer_range=0.05,
        ),
    )
    cfg.update(overrides)
    return cfg


def generation_config(token_ids: dict[str, int]) -> dict:
    """The Instruct model's ``generation_config.json`` (top-k 1 sampling, i.e. greedy, with a mild repetition
    penalty), with the tiny vocabulary's ids."""
    return dict(
        bos_token_id=token_ids["<|endoftext|>"],
        pad_token_id=token_ids["<|endoftext|>"],
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        do_sample=True,
        repetition_penalty=1.05,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
        transformers_version=transformers.__version__,
    )


def preprocessor_config(min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The hub's ``preprocessor_config.json`` for ``Qwen2VLImageProcessor`` with the given pixel bounds."""
    if not FACTOR * FACTOR <= min_pixels <= max_pixels:
        raise ValueError(f"need {FACTOR * FACTOR} <= min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    return dict(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2_5_VLProcessor",
    )


def write_tiny_qwen_checkpoint(
    out_dir: str | os.PathLike,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    bpe_size: int = DEFAULT_BPE_SIZE,
    **overrides: Any,
) -> Path:
    """Write the checkpoint directory and return its path.

    Args:
        seed: seeds the random weights (the tokenizer does not depend on it).
        layers: decoder layers of the language model (the vision tower always has 4 blocks).
        hidden: hidden size of the language model and output width of the vision merger (4 heads).
        min_pixels, max_pixels: the image processor's bounds on ``height * width`` after resizing.
        bpe_size: BPE vocabulary size before Qwen's 22 added tokens.
        overrides: top-level ``config.json`` keys to replace (e.g. ``rms_norm_eps``).
    """
    _check_hidden(hidden)
    preprocessor = preprocessor_config(min_pixels, max_pixels)  # both check their arguments before any write
    out = Path(out_dir)
    token_ids = write_tiny_qwen_tokenizer(out, bpe_size=bpe_size)
    _write_json(out / "preprocessor_config.json", preprocessor)
    _write_json(out / "chat_template.json", {"chat_template": QWEN_CHAT_TEMPLATE})
    cfg = tiny_qwen_config(token_ids, layers=layers, hidden=hidden, **overrides)
    torch.manual_seed(seed)
    # Qwen2_5_VLConfig rewrites rope_scaling in place ("mrope" -> "default"), hence the copy.
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**copy.deepcopy(cfg)))
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes 4.57's nested layout (text_config, "dtype", rope type "default"); store the flat
    # layout of the hub's Qwen2.5-VL checkpoints instead, which loads into the same config.
    _write_json(out / "config.json", dict(cfg, transformers_version=transformers.__version__))
    _write_json(out / "generation_config.json", generation_config(token_ids))
    logger.info("wrote tiny Qwen2.5-VL checkpoint to %s", out)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the language model")
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS, help="image processor's min_pixels")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="image processor's max_pixels")
    args = p.parse_args(argv)
    path = write_tiny_qwen_checkpoint(args.out, seed=args.seed, layers=args.layers, hidden=args.hidden,
                                      min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(f"tiny Qwen2.5-VL checkpoint written to {path}")


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
