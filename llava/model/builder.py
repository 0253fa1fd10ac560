"""``load_pretrained_model``: official LLaVA checkpoints (local directory or hub id) -> tokenizer, model."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import AutoTokenizer

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN

from .checkpoint_checks import check_checkpoint, read_config_json
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
REQUIRED_KEYS = ("mm_vision_tower", "mm_hidden_size", "hidden_size", "num_hidden_layers", "vocab_size")
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


def load_llava_config(model_path: str) -> LlavaConfig:
    """Read and check a LLaVA checkpoint's config; a relative vision tower path is resolved locally."""
    check_checkpoint_dir(model_path, tokenizer=False, weights=False)
    cfg = LlavaConfig.from_pretrained(model_path)
    where = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else f"{model_path} (config.json)"
    missing = [k for k in REQUIRED_KEYS if getattr(cfg, k, None) in (None, "")]
    if missing:
        raise ValueError(
            f"{where} lacks required key(s) {', '.join(missing)}: not a LLaVA checkpoint "
            "(expected a config with model_type 'llava_llama' and the mm_* keys)"
        )
    aspect = getattr(cfg, "image_aspect_ratio", "square")
    if aspect == "anyres" and not getattr(cfg, "image_grid_pinpoints", None):
        raise ValueError(f"{where}: image_aspect_ratio 'anyres' needs image_grid_pinpoints")
    if aspect not in ("pad", "anyres", "square", None):
        raise ValueError(f"{where}: image_aspect_ratio {aspect!r} is not supported; allowed: pad, anyres, square")
    tower = str(cfg.mm_vision_tower)
    if os.path.isdir(model_path) and not os.path.isabs(tower):
        local = os.path.join(model_path, tower)
        if os.path.isdir(local):
            cfg.mm_vision_tower = os.path.abspath(local)
        elif tower.count("/") != 1 or tower.startswith("."):  # not a hub id either
            raise FileNotFoundError(f"{where}: the vision tower {tower!r} (mm_vision_tower) is not a folder of "
                                    f"{model_path} ({local} is missing) nor a hub id such as "
                                    "openai/clip-vit-large-patch14-336")
    elif os.path.isabs(tower) and not os.path.isdir(tower):
        raise FileNotFoundError(f"{where}: the vision tower folder {tower} (mm_vision_tower) does not exist")
    return cfg


QWEN_PIXELS = 1008 * 1008  # the PIO authors' Qwen2.5-VL evaluation: min_pixels = max_pixels = 1008^2
FAMILIES = {"llava_llama": "llava", "llava": "llava", "qwen2_5_vl": "qwen2_5_vl"}


def checkpoint_family(model_path: str) -> str:
    """``"llava"`` or ``"qwen2_5_vl"`` from the checkpoint's ``model_type``; another model type is an error."""
    if os.path.isdir(model_path):
        check_checkpoint_dir(model_path, tokenizer=False, weights=False)
    model_type = read_config_json(model_path).get("model_type")  # a broken file or an unreachable hub id: one line
    if model_type not in FAMILIES:
        raise ValueError(f"{model_path}: model_type {model_type!r} is not supported; allowed: llava_llama (LLaVA-1.5, "
                         "LLaVA-NeXT Vicuna), qwen2_5_vl (Qwen2.5-VL)")
    return FAMILIES[model_type]


def _load_qwen(model_path: str, dev: torch.device, device_map: Any, load_kwargs: dict[str, Any],
               min_pixels: int | None, max_pixels: int | None) -> tuple[Any, Any, Any, int]:
    # the tokenizer and the image processor, not AutoProcessor: transformers 4.57 builds Qwen's video processor
    # with it, which needs torchvision; prompts are templated and their image tokens expanded by the runners
    from transformers import AutoImageProcessor

    from .language_model.qwen2_5_vl import Qwen2_5_VLForReduction

    check_checkpoint_dir(model_path)
    lo = QWEN_PIXELS if min_pixels is None else int(min_pixels)
    hi = QWEN_PIXELS if max_pixels is None else int(max_pixels)
    if not 0 < lo <= hi:
        raise ValueError(f"--min-pixels {lo} and --max-pixels {hi}: need 0 < min-pixels <= max-pixels")
    image_processor = AutoImageProcessor.from_pretrained(model_path, min_pixels=lo, max_pixels=hi)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model, info = Qwen2_5_VLForReduction.from_pretrained(model_path, low_cpu_mem_usage=True, output_loading_info=True,
                                                         **load_kwargs)
    check_loading_info(model_path, info, vision_optional=False)
    if device_map is None:
        model.to(dev)
    model.requires_grad_(False)
    model.eval()
    context_len = getattr(model.config.text_config, "max_position_embeddings", None) or 32768
    return tokenizer, model, image_processor, context_len


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
    """Load an official LLaVA-1.5 / LLaVA-NeXT (Vicuna) or Qwen2.5-VL checkpoint (by its ``model_type``).

    Args:
        model_path: directory or hub id, e.g. ``liuhaotian/llava-v1.5-7b``, ``liuhaotian/llava-v1.6-vicuna-7b``,
            ``Qwen/Qwen2.5-VL-7B-Instruct``.
        model_base: base LLM for projector-only checkpoints (``mm_projector.bin`` in ``model_path``).
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

    family = checkpoint_family(model_path)
    if family == "qwen2_5_vl":
        if model_base is not None:
            raise ValueError(f"{model_path} is a Qwen2.5-VL checkpoint; --model-base applies to LLaVA projector-only "
                             "checkpoints")
        return _load_qwen(model_path, dev, device_map, load_kwargs, min_pixels, max_pixels)
    if min_pixels is not None or max_pixels is not None:
        raise ValueError(f"{model_path} is a LLaVA checkpoint; --min-pixels/--max-pixels apply to Qwen2.5-VL (LLaVA's "
                         "resolution is its vision tower's)")
    if model_base is None:
        check_checkpoint_dir(model_path)
        cfg = load_llava_config(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
        model, info = LlavaLlamaForCausalLM.from_pretrained(model_path, config=cfg, low_cpu_mem_usage=True,
                                                            output_loading_info=True, **load_kwargs)
        check_loading_info(model_path, info)
    else:  # projector-only checkpoint on top of a base LLM
        cfg = load_llava_config(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_base, use_fast=False)
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=cfg, low_cpu_mem_usage=True,
                                                      **{**load_kwargs, "ignore_mismatched_sizes": False})
        proj_file = os.path.join(model_path, "mm_projector.bin")
        if not os.path.isfile(proj_file):
            raise FileNotFoundError(f"{proj_file} not found: a checkpoint with model_base needs its projector weights")
        weights = torch.load(proj_file, map_location="cpu", weights_only=True)
        weights = {k.split("mm_projector.", 1)[1]: v.to(dtype) for k, v in weights.items() if "mm_projector." in k}
        model.get_model().mm_projector.load_state_dict(weights)

    added = []
    if getattr(cfg, "mm_use_im_patch_token", False):
        added += [DEFAULT_IMAGE_PATCH_TOKEN]
    if getattr(cfg, "mm_use_im_start_end", False):
        added += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))

    if device_map is None:
        model.to(dev)
    vision_tower = model.get_vision_tower()
    vision_tower.load_model(device=model.device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    context_len = getattr(cfg, "max_sequence_length", None) or 2048
    return tokenizer, model, vision_tower.image_processor, context_len
