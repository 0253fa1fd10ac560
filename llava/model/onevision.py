"""LLaVA-OneVision checkpoints in both layouts: config translation, strict loading, image processor, prompts.

Two layouts of the same model load into :class:`~llava.model.language_model.llava_onevision.LlavaOnevisionForReduction`
through :func:`load_onevision` (``load_pretrained_model`` calls it for either):

* **original** (``lmms-lab/llava-onevision-qwen2-{0.5b,7b}-ov``, what LLaVA-NeXT, VFlowOpt and lmms-eval's
  ``llava_onevision`` load): ``config.json`` with ``model_type "llava"``, ``architectures
  ["LlavaQwenForCausalLM"]``, the Qwen2 keys and LLaVA's ``mm_*`` keys; weights ``model.layers.*``,
  ``model.embed_tokens``, ``model.norm``, ``model.vision_tower.vision_tower.vision_model.*``,
  ``model.mm_projector.{0,2}.*``, ``model.image_newline``, ``lm_head`` (absent when tied, as for 0.5B); the
  SigLIP tower's config from ``mm_vision_tower`` (``google/siglip-so400m-patch14-384``); prompts with the ``-200``
  image placeholder (the tokenizer has no image token) in the ``qwen_1_5`` template.
* **hf** (``llava-hf/llava-onevision-qwen2-7b-ov-hf``): ``model_type llava_onevision``, transformers' own layout
  (its class renames the hub's ``language_model.model.*`` keys), ``<image>`` token 151646 expanded to the image's
  visual token count in the prompt, ``LlavaOnevisionImageProcessor`` config shipped.

Facts behind the original layout's translation (LLaVA-NeXT, commit df17966; transformers' conversion script
``convert_llava_onevision_weights_to_hf.py``):

* LLaVA-NeXT's ``SigLipVisionTower`` (``llava/model/multimodal_encoder/siglip_encoder.py``) deletes the tower's
  last encoder layer and its head (lines 570-571) and projects ``hidden_states[-1]`` of what is left (line 586),
  whatever ``mm_vision_select_layer`` says (-2 in the config: the same layer). So the checkpoint holds
  ``N - 1`` tower layers and the post-layernorm, no head; translated: ``num_hidden_layers = N - 1``,
  ``vision_use_head = False``, ``vision_feature_layer = -1``, strategy ``full`` (SigLIP has no CLS token), as
  the conversion script does (26 layers for so400m's 27).
* ``mm_projector_type mlp2x_gelu`` = Linear, exact GELU, Linear with biases = transformers' projector with
  ``projector_hidden_act "gelu"``.
* ``image_grid_pinpoints`` are ``(width, height)`` in LLaVA-NeXT (``select_best_resolution``, ``mm_utils.py``)
  and ``(height, width)`` in transformers; each pair is swapped, so the selection (first listed wins ties)
  is the original's exactly. The string form ``"(1x1),...,(6x6)"`` is expanded as LLaVA-NeXT does (multiples of
  the crop size).
* Image preprocessing: LLaVA-NeXT's ``SigLipImageProcessor`` is constructed with fixed values, not read from the
  tower folder: mean = std = (0.5, 0.5, 0.5), bicubic, rescale 1/255, 384 x 384 (``siglip_encoder.py`` line 35);
  ``process_anyres_image`` (``mm_utils.py``) squashes the whole image to the base view, fits the image into the
  best canvas (``ceil`` of the scaled side), pads it with black centred (odd margins to the bottom/right), cuts
  crop-size squares row by row, then the processor. transformers' slow ``LlavaOnevisionImageProcessor`` with
  the same values computes the same pixels (``tests/test_onevision.py`` checks it against a plain PIL version of
  the original's steps); a question with several images gets one view per image, padded to a square with the
  mean colour (lmms-eval's ``llava_onevision`` sets ``image_aspect_ratio = "pad"`` for multi-image questions;
  transformers pads images of such questions to squares).
* ``image_token_index`` is set to ``-200`` (the placeholder), so the model reads ``-200`` marks; the converted
  checkpoints' ``<image>`` token does not exist in the original tokenizer.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, IMAGE_TOKEN_INDEX

from .language_model.llava_onevision import (
    LlavaOnevisionForReduction,
    OnevisionVideos,
    anyres_max_patches,
    video_token_count,
    visual_token_count,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HF_ARCHITECTURES",
    "ORIGINAL_ARCHITECTURES",
    "ORIGINAL_KEY_MAPPING",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "checkpoint_layout",
    "encode_prompt",
    "encode_video_prompt",
    "image_processor_for",
    "load_onevision",
    "original_config",
    "parse_onevision_pinpoints",
    "tower_config",
]

ORIGINAL_ARCHITECTURES = ("LlavaQwenForCausalLM",)
HF_ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionForReduction")
HF_MODEL_TYPES = ("llava_onevision",)  # the converted layout's model_type
SIGLIP_MEAN = [0.5, 0.5, 0.5]  # LLaVA-NeXT SigLipImageProcessor defaults (siglip_encoder.py line 35)
SIGLIP_STD = [0.5, 0.5, 0.5]

# original checkpoint key -> transformers' LlavaOnevisionForConditionalGeneration key (first matching pattern wins)
ORIGINAL_KEY_MAPPING = {
    r"^model\.vision_tower\.vision_tower\.": "model.vision_tower.",
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.image_newline$": "model.image_newline",
    r"^model\.(embed_tokens|layers|norm)\.": r"model.language_model.\1.",
}
_TOWER_PREFIX = "model.vision_tower."
# old Qwen2 checkpoints may carry each layer's rotary buffer; it is recomputed (the conversion script skips it too)
_IGNORED_UNEXPECTED = re.compile(r"\.rotary_emb\.inv_freq$")


def _read_config(model_path: str) -> dict:
    if os.path.isdir(model_path):
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    return PretrainedConfig.get_config_dict(model_path)[0]


def checkpoint_layout(raw: dict) -> str:
    """``"original"`` or ``"hf"`` from a ``config.json`` dict (``architectures`` first, then ``model_type``)."""
    archs = raw.get("architectures") or []
    if any(a in ORIGINAL_ARCHITECTURES for a in archs):
        return "original"
    if any(a in HF_ARCHITECTURES for a in archs) or raw.get("model_type") in HF_MODEL_TYPES:
        return "hf"
    raise ValueError(f"not a LLaVA-OneVision config (architectures {archs}, model_type {raw.get('model_type')!r}); "
                     f"allowed architectures: {', '.join(ORIGINAL_ARCHITECTURES + HF_ARCHITECTURES)}")


def parse_onevision_pinpoints(value: Any, crop: int) -> list[list[int]]:
    """An original config's ``image_grid_pinpoints`` as ``(width, height)`` pairs: a list of pairs, its string form,
    or LLaVA-NeXT's range form ``"(1x1),...,(6x6)"`` (every grid from the first to the last, times ``crop``)."""
    if isinstance(value, str) and "x" in value:
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        if not found:
            raise ValueError(f"image_grid_pinpoints {value!r}: expected '(1x1),...,(6x6)' or a list of pairs")
        (a0, b0), (a1, b1) = (tuple(map(int, p)) for p in (found[0], found[-1]))
        return [[i * crop, j * crop] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    from llava.mm_utils import parse_grid_pinpoints

    return [list(p) for p in parse_grid_pinpoints(value)]


def tower_config(tower: str, model_path: str, where: str) -> SiglipVisionConfig:
    """The SigLIP tower's vision config: from a local folder (absolute, or relative to the checkpoint folder or
    the working directory) or the hub id. Offline and not cached: a one-line error naming what to download."""
    local = None
    if os.path.isabs(tower):
        if not os.path.isdir(tower):
            raise FileNotFoundError(f"{where}: the vision tower folder {tower} (mm_vision_tower) does not exist")
        local = tower
    elif os.path.isdir(model_path) and os.path.isdir(os.path.join(model_path, tower)):
        local = os.path.join(model_path, tower)
    elif os.path.isdir(tower):
        local = tower
    try:
        return SiglipVisionConfig.from_pretrained(local or tower)
    except (OSError, ValueError) as err:
        if local is not None:
            raise ValueError(f"{where}: the vision tower folder {local} has no readable SigLIP config ({err})") from err
        raise OSError(f"{where}: the vision tower {tower!r} (mm_vision_tower) is not a local folder and its config "
                      f"could not be read from the hub ({str(err).splitlines()[0]}); download it first (e.g. "
                      f"`huggingface-cli download {tower}`) or set mm_vision_tower to a local copy") from err


def original_config(raw: dict, model_path: str) -> tuple[LlavaOnevisionConfig, str]:
    """Translate an original-layout ``config.json`` dict into transformers' config; also return where the tower is
    (for its weights when the checkpoint lacks them). See the module docstring for the facts used."""
    where = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else f"{model_path} (config.json)"
    tower = raw.get("mm_vision_tower")
    if not tower:
        raise ValueError(f"{where}: no mm_vision_tower: not an original LLaVA-OneVision checkpoint")
    checks = {"mm_projector_type": ("mlp2x_gelu",), "mm_patch_merge_type": ("spatial_unpad",)}
    for key, allowed in checks.items():
        if raw.get(key) not in allowed:
            raise ValueError(f"{where}: {key} {raw.get(key)!r} is not supported; allowed: {', '.join(allowed)}")
    aspect = raw.get("image_aspect_ratio")
    anyres_max_patches(aspect)  # raises with what is allowed
    if raw.get("mm_newline_position", "one_token") != "one_token":
        raise ValueError(f"{where}: mm_newline_position {raw['mm_newline_position']!r} is not supported; allowed: "
                         "one_token (LLaVA-OneVision's: one newline after a video)")
    pool = (raw.get("mm_spatial_pool_stride", 2), raw.get("mm_spatial_pool_mode", "bilinear"))
    if pool != (2, "bilinear"):  # video frames only; lmms-eval's llava_onevision overrides both to these values
        logger.warning("%s: mm_spatial_pool_stride %s / mm_spatial_pool_mode %s are not used: video frames are pooled "
                       "at stride 2, bilinear (transformers' apply_pooling, the values lmms-eval sets for every "
                       "OneVision run)", where, *pool)
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise ValueError(f"{where}: mm_use_im_start_end / mm_use_im_patch_token are not supported (OneVision uses "
                         "neither)")
    vision = tower_config(str(tower), model_path, where)
    if vision.num_hidden_layers < 2:
        raise ValueError(f"{where}: the vision tower has {vision.num_hidden_layers} layer(s); LLaVA-OneVision drops "
                         "its last one, so it needs at least 2")
    if raw.get("mm_hidden_size") not in (None, vision.hidden_size):
        raise ValueError(f"{where}: mm_hidden_size {raw['mm_hidden_size']} differs from the tower's hidden size "
                         f"{vision.hidden_size} ({tower})")
    if "image_grid_pinpoints" not in raw:
        raise ValueError(f"{where}: {aspect} needs image_grid_pinpoints")
    pinpoints = parse_onevision_pinpoints(raw["image_grid_pinpoints"], vision.image_size)
    vision_cfg = vision.to_dict()
    vision_cfg.update(model_type="siglip_vision_model", num_hidden_layers=vision.num_hidden_layers - 1,
                      vision_use_head=False)
    qwen_keys = set(inspect.signature(Qwen2Config.__init__).parameters) - {"self", "kwargs"}
    text_cfg = {k: v for k, v in raw.items() if k in qwen_keys or k in ("bos_token_id", "eos_token_id",
                                                                        "pad_token_id")}
    tie = bool(raw.get("tie_word_embeddings", False))
    text_cfg.update(model_type="qwen2", tie_word_embeddings=tie)
    config = LlavaOnevisionConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        image_token_index=IMAGE_TOKEN_INDEX,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=aspect,
        image_grid_pinpoints=[[h, w] for w, h in pinpoints],
        tie_word_embeddings=tie,
        multimodal_projector_bias=True,
    )
    return config, str(tower)


def image_processor_for(config: LlavaOnevisionConfig) -> LlavaOnevisionImageProcessor:
    """The original layout's image processor: transformers' slow class with LLaVA-NeXT's fixed SigLIP values
    (mean = std = 0.5, bicubic, 1/255, the tower's square size) and the config's ``(height, width)`` pinpoints."""
    size = config.vision_config.image_size
    return LlavaOnevisionImageProcessor(
        do_resize=True, size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints,
        resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, do_pad=True, do_convert_rgb=True)


def _load_tower_weights(model: LlavaOnevisionForReduction, tower: str, model_path: str, where: str) -> None:
    """The tower's own weights (all but its last layer and head), for a checkpoint that does not carry them."""
    from transformers import SiglipVisionModel

    local = os.path.join(model_path, tower) if os.path.isdir(model_path) else None
    source = local if local is not None and os.path.isdir(local) else tower
    try:
        full = SiglipVisionModel.from_pretrained(source).state_dict()
    except OSError as err:
        raise OSError(f"{where}: the checkpoint has no vision tower weights and {tower!r} could not be loaded "
                      f"({str(err).splitlines()[0]}); download it first or set mm_vision_tower to a local copy"
                      ) from err
    keep = model.model.vision_tower.state_dict()
    weights = {k: full[k] for k in keep if k in full}
    missing = sorted(set(keep) - set(weights))
    if missing:
        raise ValueError(f"{where}: the vision tower {tower!r} lacks {len(missing)} tensor(s) ({', '.join(missing[:4])})")
    model.model.vision_tower.load_state_dict(weights)
    logger.info("vision tower weights loaded from %s (the checkpoint carries none)", source)


def load_onevision(model_path: str, device: torch.device, device_map: Any = None,
                   load_kwargs: dict[str, Any] | None = None) -> tuple[Any, LlavaOnevisionForReduction, Any, int]:
    """Load a LLaVA-OneVision checkpoint of either layout (local folder or hub id), strictly.

    Args:
        device: where the model goes (unless ``device_map`` spreads it).
        load_kwargs: ``from_pretrained`` arguments (``dtype``, ``attn_implementation``, quantisation, ...).
    Returns:
        ``(tokenizer, model, image_processor, context_len)``: the tokenizer left-padding, the model in eval mode
        without gradients, transformers' slow ``LlavaOnevisionImageProcessor`` (no torchvision needed), and the
        language model's ``max_position_embeddings``.
    Raises:
        ValueError: a tensor the model has is missing from the checkpoint, or one it does not know is present.
    """
    from .builder import check_checkpoint_dir, check_loading_info

    check_checkpoint_dir(model_path)
    kwargs = dict(load_kwargs or {})
    raw = _read_config(model_path)
    layout = checkpoint_layout(raw)
    where = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else model_path
    if layout == "original":
        config, tower = original_config(raw, model_path)
        model, info = LlavaOnevisionForReduction.from_pretrained(
            model_path, config=config, key_mapping=ORIGINAL_KEY_MAPPING, low_cpu_mem_usage=True,
            output_loading_info=True, **kwargs)
        tower_keys = {_TOWER_PREFIX + k for k in model.model.vision_tower.state_dict()}
        missing_tower = tower_keys & set(info["missing_keys"])
        if missing_tower == tower_keys:  # a checkpoint without the tower: its weights come from the tower itself
            _load_tower_weights(model, tower, model_path, where)
            info["missing_keys"] = [k for k in info["missing_keys"] if k not in tower_keys]
        image_processor = image_processor_for(config)
    else:
        model, info = LlavaOnevisionForReduction.from_pretrained(model_path, low_cpu_mem_usage=True,
                                                                 output_loading_info=True, **kwargs)
        image_processor = LlavaOnevisionImageProcessor.from_pretrained(model_path)
    info["unexpected_keys"] = [k for k in info["unexpected_keys"] if not _IGNORED_UNEXPECTED.search(k)]
    check_loading_info(model_path, info, vision_optional=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    image_id = model.config.image_token_id
    if image_id != IMAGE_TOKEN_INDEX and tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) != image_id:
        raise ValueError(f"{model_path}: the tokenizer's {DEFAULT_IMAGE_TOKEN} is not image_token_index "
                         f"{image_id} of the config")
    if device_map is None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return tokenizer, model, image_processor, int(model.config.text_config.max_position_embeddings)


def encode_prompt(prompt: str, images: Sequence[Any], tokenizer: Any, processor: Any,
                  config: LlavaOnevisionConfig) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
    """Token ids (1, T), per-image views and ``(height, width)`` sizes (N, 2) of a templated ``prompt`` whose
    ``<image>`` marks stand for ``images`` (PIL, in order; none for a text-only prompt).

    One image: the anyres views (base view first). Several: one padded-square view each. The original layout's
    ids mark each image with ``-200``; the converted layout's repeat ``<image>`` once per visual token, as its
    processor does.
    """
    from llava.mm_utils import tokenizer_image_token

    n_marks = prompt.count(DEFAULT_IMAGE_TOKEN)
    if n_marks != len(images):
        raise ValueError(f"the prompt has {n_marks} {DEFAULT_IMAGE_TOKEN} mark(s) for {len(images)} image(s)")
    views = sizes = None
    if images:
        out = processor(images=[list(images)], do_pad=False)  # nested: one question, so several -> single views
        views = [torch.from_numpy(np.asarray(v)) for v in out["pixel_values"]]
        sizes = torch.tensor([list(map(int, s)) for s in out["image_sizes"]], dtype=torch.long)
    if config.image_token_id == IMAGE_TOKEN_INDEX:
        return tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None], views, sizes
    if images:
        single = len(images) > 1
        counts = [visual_token_count(s, config, single_view=single) for s in sizes.tolist()]
        parts = prompt.split(DEFAULT_IMAGE_TOKEN)
        prompt = parts[0] + "".join(DEFAULT_IMAGE_TOKEN * n + rest for n, rest in zip(counts, parts[1:], strict=True))
    return tokenizer(prompt, return_tensors="pt")["input_ids"], views, sizes


def encode_video_prompt(prompt: str, frames: np.ndarray, tokenizer: Any, processor: Any,
                        config: LlavaOnevisionConfig) -> tuple[torch.Tensor, OnevisionVideos, None]:
    """Token ids (1, T) and :class:`~llava.model.language_model.llava_onevision.OnevisionVideos` of a templated
    ``prompt`` whose one ``<video>`` mark stands for ``frames`` (uint8 RGB (F, H, W, 3)).

    Every frame is one view (:func:`llava.video.onevision_video_inputs`). The original layout's ids mark the
    video with one ``-200`` (LLaVA-NeXT and lmms-eval's ``llava_onevision`` put one ``<image>`` in a video's
    prompt, ``modalities ["video"]``); the converted layout's repeat ``<video>`` once per visual token
    (:func:`~llava.model.language_model.llava_onevision.video_token_count`), as its processor does.
    """
    from llava.mm_utils import tokenizer_image_token
    from llava.video import onevision_video_inputs

    marks = prompt.count(DEFAULT_VIDEO_TOKEN)
    if marks != 1 or DEFAULT_IMAGE_TOKEN in prompt:
        raise ValueError(f"a video prompt holds one {DEFAULT_VIDEO_TOKEN} mark and no {DEFAULT_IMAGE_TOKEN}, this one "
                         f"{marks} and {prompt.count(DEFAULT_IMAGE_TOKEN)}")
    videos = OnevisionVideos.of(onevision_video_inputs(frames, processor))
    if config.image_token_id == IMAGE_TOKEN_INDEX:
        text = prompt.replace(DEFAULT_VIDEO_TOKEN, DEFAULT_IMAGE_TOKEN)
        return tokenizer_image_token(text, tokenizer, return_tensors="pt")[None], videos, None
    if tokenizer.convert_tokens_to_ids(DEFAULT_VIDEO_TOKEN) != config.video_token_id:
        raise ValueError(f"the tokenizer's {DEFAULT_VIDEO_TOKEN} is not video_token_index {config.video_token_id} of "
                         "the config")
    text = prompt.replace(DEFAULT_VIDEO_TOKEN, DEFAULT_VIDEO_TOKEN * video_token_count(len(frames), config))
    return tokenizer(text, return_tensors="pt")["input_ids"], videos, None
