"""``load_pretrained_model``: an official checkpoint (local directory or hub id) -> tokenizer, model, processor.

The checkpoint's family (:mod:`llava.model.families`) is resolved once from its config and does the loading.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .checkpoint_checks import check_checkpoint
from .families import family_for_path

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 elsewhere unless given; accepts names such as ``bfloat16``/``bf16``."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_checkpoint_dir(model_path: str, tokenizer: bool = True, weights: bool = True) -> None:
    """A local checkpoint directory has what loading reads; what is missing is named (before a slow load)."""
    if not os.path.isdir(model_path):
        if os.path.exists(model_path):
            raise NotADirectoryError(f"{model_path} is a file; a checkpoint is a directory (or a hub id)")
        return  # a hub id: transformers says what is missing
    files = set(os.listdir(model_path))
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if tokenizer and not files & set(TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES) + " (the tokenizer)")
    if weights and not files & set(WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[::2]) + " (the weights)")
    if missing:
        raise FileNotFoundError(f"checkpoint {model_path} has no {'; no '.join(missing)}")


def check_loading_info(model_path: str, info: dict, vision_optional: bool = True) -> None:
    """Strict loading: a tensor the model has but the checkpoint lacks (it would stay random), or one the model
    does not know, is an error listing them. The vision tower's own weights may be absent or present: the tower
    loads from its checkpoint unless the LLaVA checkpoint carries it (``unfreeze_mm_vision_tower``)."""
    def relevant(keys: list[str]) -> list[str]:
        return sorted(k for k in keys if not vision_optional or ".vision_tower." not in f".{k}")

    missing, unexpected = relevant(info.get("missing_keys", [])), relevant(info.get("unexpected_keys", []))
    mismatched = sorted(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", []))
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''})")
    if problems:
        raise ValueError(f"checkpoint {model_path} does not match the model: tensors {'; '.join(problems)}; a "
                         "missing tensor or one of the wrong shape would run with random weights")


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = None,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    use_flash_attn: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, int]:
    """Load an official checkpoint of any registered model family (LLaVA-1.5 / LLaVA-NeXT (Vicuna), Qwen2.5-VL),
    resolved from its config's ``architectures``, then ``model_type`` (:mod:`llava.model.families`).

    Args:
        model_path: directory or hub id, e.g. ``liuhaotian/llava-v1.5-7b``, ``liuhaotian/llava-v1.6-vicuna-7b``,
            ``Qwen/Qwen2.5-VL-7B-Instruct``.
        model_base: LLaVA: base LLM for projector-only checkpoints (``mm_projector.bin`` in ``model_path``).
        model_name: kept for upstream compatibility (LoRA checkpoints are recognised by "lora" in it).
        device: default CUDA if available, else CPU. ``device_map`` (e.g. "auto") spreads layers instead.
        torch_dtype: default fp16 on CUDA, fp32 on CPU.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2`` (``use_flash_attn=True``
            is upstream's spelling of the latter).
        min_pixels, max_pixels: Qwen2.5-VL's image resolution bounds (default both ``1008 * 1008``, the
            resolution the PIO authors evaluate at: about 1296 visual tokens per image).
    Returns:
        ``(tokenizer, model, image_processor, context_len)``; for Qwen2.5-VL the third is its processor (chat
        template and image processor).
    """
    if use_flash_attn:
        attn_implementation = "flash_attention_2"
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device torch can use "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {attn_implementation!r} unknown; allowed: {ATTN_IMPLEMENTATIONS}")
    if attn_implementation == "flash_attention_2":
        from llava.utils import require_flash_attn

        require_flash_attn()
    dtype = resolve_dtype(torch_dtype, dev)
    name = model_name or os.path.basename(os.path.normpath(model_path))
    if model_base is not None and "lora" in name.lower():
        raise NotImplementedError(
            f"{model_path} is a LoRA checkpoint; merge it into its base first (upstream merge_lora_weights) "
            "and load the merged directory"
        )
    check_checkpoint(model_path)  # broken or incomplete files named before the slow load
    # a tensor of the wrong shape is reported by check_loading_info, naming it, instead of raised mid-load
    load_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                                   "ignore_mismatched_sizes": True}
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_8bit, load_in_4bit=load_4bit, bnb_4bit_compute_dtype=dtype
        )
        device_map = device_map or {"": dev.index or 0}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    load_kwargs.update(kwargs)

    family = family_for_path(model_path)
    options = {"model_base": model_base, "min_pixels": min_pixels, "max_pixels": max_pixels}
    family.check_options(model_path, options)
    own = {o.name for o in family.options}
    return family.load(model_path, device=dev, device_map=device_map, load_kwargs=load_kwargs,
                       **{k: v for k, v in options.items() if k in own})
