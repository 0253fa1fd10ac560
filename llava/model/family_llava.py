"""The LLaVA family: LLaVA-1.5 and LLaVA-NeXT (Vicuna), one model class, the layout read from the config.

``image_aspect_ratio`` ``pad`` (LLaVA-1.5: one 24 x 24 crop of the padded square) or ``anyres`` (LLaVA-NeXT: the
base view and the anyres crops, tiled, unpadded and with newlines as ``mm_patch_merge_type`` says) is a layout
inside the family (:func:`llava.model.llava_arch.llava_image_layout`), not a family of its own. Variants (tiny
checkpoints, benchmark shapes): ``llava-v1.5`` and ``llava-v1.6``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pio.encoder import TowerTraits

from .families import Family, Option, Shape, register_family

VIT_L = "vit-l"  # the benchmark shapes' CLIP ViT-L/14-336
REQUIRED_KEYS = ("mm_vision_tower", "mm_hidden_size", "hidden_size", "num_hidden_layers", "vocab_size")


def load_llava_config(model_path: str) -> Any:
    """Read and check a LLaVA checkpoint's config; a relative vision tower path is resolved locally."""
    from .builder import check_checkpoint_dir
    from .language_model.llava_llama import LlavaConfig

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


@register_family
class LlavaFamily(Family):
    """LLaVA-1.5 / LLaVA-NeXT (Vicuna): ``model_type`` ``llava_llama`` (upstream's configs also say ``llava``)."""

    name = "llava"
    title = "LLaVA"
    architectures = ("LlavaLlamaForCausalLM",)
    model_types = ("llava_llama", "llava")
    variants = ("llava-v1.5", "llava-v1.6")
    conv_mode = "vicuna_v1"
    options = (Option("model_base", "--model-base", "projector-only checkpoints on a base language model"),)
    tower = TowerTraits(cls_token=True, patches_per_token=1, per_crop=True)  # CLIP ViT-L/14-336
    shapes = (
        Shape("llava-v1.5-7b", "llava-v1.5", dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000,
                                                  vision=VIT_L), (336, 336)),
        Shape("llava-v1.6-7b", "llava-v1.6", dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000,
                                                  vision=VIT_L), (640, 480)),
        Shape("tiny", "llava-v1.5", dict(hidden=64, intermediate=176, layers=4, heads=4, vocab=1000, vision="tiny"),
              (336, 336)),
    )

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, model_path: str, *, device: torch.device, device_map: Any, load_kwargs: dict[str, Any],
             model_base: str | None = None, **options: Any) -> tuple[Any, Any, Any, int]:
        from transformers import AutoTokenizer

        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN

        from .builder import check_checkpoint_dir, check_loading_info
        from .language_model.llava_llama import LlavaLlamaForCausalLM

        dtype = load_kwargs["dtype"]
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
                raise FileNotFoundError(f"{proj_file} not found: a checkpoint with model_base needs its projector "
                                        "weights")
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
            model.to(device)
        vision_tower = model.get_vision_tower()
        vision_tower.load_model(device=model.device, dtype=dtype)
        model.requires_grad_(False)
        model.eval()
        context_len = getattr(cfg, "max_sequence_length", None) or 2048
        return tokenizer, model, vision_tower.image_processor, context_len

    def load_geometry(self, model_path: str, **options: Any) -> tuple[Any, Any]:
        from transformers import CLIPImageProcessor

        cfg = load_llava_config(model_path)
        return cfg, CLIPImageProcessor.from_pretrained(cfg.mm_vision_tower)

    # -- prompts ----------------------------------------------------------------------------------------
    def default_conv_mode(self, args: Any) -> str:
        return getattr(args, "llava_conv_mode", None) or self.conv_mode  # the runner's upstream default

    def encode(self, prompt: str, images: Sequence[Any], tokenizer: Any, processor: Any, config: Any
               ) -> tuple[torch.Tensor, Any, Any]:
        """Upstream's ``tokenizer_image_token`` (each ``<image>`` one placeholder id) and ``process_images``;
        the sizes are the images' (width, height)."""
        from llava.mm_utils import process_images, tokenizer_image_token

        ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
        if not images:
            return ids, None, None
        return ids, process_images(list(images), processor, config), [im.size for im in images]

    # -- the image's tokens -----------------------------------------------------------------------------
    def _crop_geometry(self, config: Any) -> tuple[int, int]:
        """(patches per crop side, crop side in pixels) of the checkpoint's CLIP tower (its config only)."""
        from transformers import CLIPVisionConfig

        tower = CLIPVisionConfig.from_pretrained(config.mm_vision_tower)
        return tower.image_size // tower.patch_size, tower.image_size

    def image_layout(self, config: Any, processor: Any, image_size: tuple[int, int]):
        from llava.mm_utils import get_anyres_image_grid_shape

        from .llava_arch import llava_image_layout

        side, crop = self._crop_geometry(config)
        crops = 1
        if getattr(config, "image_aspect_ratio", None) == "anyres":
            gw, gh = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, crop)
            crops = 1 + gw * gh
        return llava_image_layout(config, crops, image_size, side, crop)

    def image_views(self, config: Any, processor: Any, image: Any):
        """LLaVA-1.5 (``pad``): the padded square it encodes, 24 x 24 patches over it; without padding the
        processor's resize and centre crop; LLaVA-NeXT: the base view (the image squashed onto a crop) and the
        anyres grid (the image fitted onto the best canvas of the pinpoints, centred, cut into crops)."""
        from llava.mm_utils import (
            _fit_size,
            _processor_sizes,
            expand2square,
            parse_grid_pinpoints,
            select_best_resolution,
        )

        from .layout import CropView, ImageViews

        side, _ = self._crop_geometry(config)
        base_side, crop = _processor_sizes(processor)
        cell = crop / side
        P = side * side
        aspect = getattr(config, "image_aspect_ratio", None)
        if aspect == "pad":  # centred on a square of side max(w, h), resized to the crop; drawn on that square
            canvas, note = image, ""
            if image.size[0] != image.size[1]:
                canvas = expand2square(image, tuple(int(v * 255) for v in processor.image_mean))
                note = "padded to a square"
            s = canvas.size[0]
            scale = crop / s
            return ImageViews(canvas, [CropView("image", (0,), lambda x, y: _cells(x * scale, y * scale, side, side,
                                                                                   cell))], note)
        w, h = image.size
        if aspect != "anyres":  # the processor's resize of the shortest edge, then its centre crop
            scale = base_side / min(w, h)
            rw, rh = int(round(w * scale)), int(round(h * scale))
            left, top = (rw - crop) // 2, (rh - crop) // 2
            return ImageViews(image, [CropView("image", (0,), lambda x, y: _cells(x * rw / w - left, y * rh / h - top,
                                                                                  side, side, cell))])
        bw, bh = select_best_resolution((w, h), parse_grid_pinpoints(config.image_grid_pinpoints))
        nw, nh = _fit_size((w, h), (bw, bh))
        gw, gh = bw // crop, bh // crop

        def grid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            # the image fitted onto the best canvas, centred; the crops' patches tile the canvas
            cx, cy = x * nw / w + (bw - nw) // 2, y * nh / h + (bh - nh) // 2
            c, r = np.broadcast_arrays(np.floor(cx / cell).astype(np.int64), np.floor(cy / cell).astype(np.int64))
            inside = (c >= 0) & (c < gw * side) & (r >= 0) & (r < gh * side)
            ids = P * (1 + (r // side) * gw + c // side) + (r % side) * side + c % side
            return np.where(inside, ids, -1)

        return ImageViews(image, [CropView("base view", (0,), lambda x, y: _cells(x * crop / w, y * crop / h, side,
                                                                                  side, cell)),
                                  CropView("high-res grid", tuple(range(1, 1 + gw * gh)), grid)])

    def vision_flops(self, model: Any, state: Any) -> dict[str, int]:
        """CLIP on every crop (CLS token included) and the projector on every patch."""
        from pio.flops import clip_vision_flops, encoder_selection_flops, projector_flops

        tower = model.get_vision_tower()
        if tower is None or not state.vision_crops:
            return {"vision": 0, "encoder_selection": 0}
        c = tower.config
        crops = state.vision_crops
        total = clip_vision_flops(c.image_size, c.patch_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                                  crops)["total"]
        kind = "linear" if getattr(model.config, "mm_projector_type", "linear") == "linear" else "mlp2x_gelu"
        total += projector_flops(crops * tower.num_patches, c.hidden_size, model.config.hidden_size, kind)
        return {"vision": total, "encoder_selection": encoder_selection_flops(state.events, c.hidden_size)}

    # -- benchmarks and tests ---------------------------------------------------------------------------
    def build_shape(self, shape: Shape, device: torch.device, dtype: torch.dtype, workdir: Path) -> tuple[Any, Any]:
        from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
        from .tiny import fill_random, tiny_config, vision_config, write_vision_configs

        s = shape.spec
        vcfg = vision_config(s["vision"])
        write_vision_configs(workdir / "vision_tower", vcfg)
        cfg = LlavaConfig(**tiny_config(
            shape.variant, s["vocab"], layers=s["layers"], hidden=s["hidden"], intermediate_size=s["intermediate"],
            num_attention_heads=s["heads"], num_key_value_heads=s["heads"], mm_hidden_size=vcfg.hidden_size,
            initializer_range=0.02, unfreeze_mm_vision_tower=True,  # build the tower inside the model, randomly
        ))
        cfg.mm_vision_tower = str(workdir / "vision_tower")
        with torch.device("meta"):
            model = LlavaLlamaForCausalLM._from_config(cfg, dtype=dtype)
        model.to_empty(device=device)
        fill_random(model, std=cfg.initializer_range, seed=0)
        model.requires_grad_(False).eval()
        return model, model.get_vision_tower().image_processor

    def synthetic_input(self, model: Any, processor: Any, image: Any, n_text: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, Any, Any]:
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images

        cfg = model.config
        text = rng.integers(3, cfg.vocab_size, size=n_text - 1).tolist()
        ids = [1, *text[:34], IMAGE_TOKEN_INDEX, *text[34:]]
        return torch.tensor([ids]), process_images([image], processor, cfg), [image.size]

    def bench_image_size(self, config: Any) -> tuple[int, int]:
        return (640, 480) if getattr(config, "image_aspect_ratio", "pad") == "anyres" else (336, 336)

    def write_tiny(self, out_dir: str | os.PathLike, variant: str | None = None, seed: int = 0, layers: int = 4,
                   hidden: int | None = None, **overrides: Any) -> Path:
        from .tiny import write_tiny_checkpoint

        if hidden is not None:
            overrides = {"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, **overrides}
        return write_tiny_checkpoint(out_dir, self._variant(variant), seed=seed, layers=layers, **overrides)


def _cells(u: np.ndarray, v: np.ndarray, cols: int, rows: int, cell: float) -> np.ndarray:
    """Row-major cell on a ``rows x cols`` grid of ``cell``-sized cells of the points (u, v); -1 outside."""
    c = np.floor(u / cell).astype(np.int64)
    r = np.floor(v / cell).astype(np.int64)
    c, r = np.broadcast_arrays(c, r)
    inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
    return np.where(inside, r * cols + c, -1)
