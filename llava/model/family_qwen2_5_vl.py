"""The Qwen2.5-VL family: transformers' modules and weights, its chat template, M-RoPE positions, merged patches.

One variant (``qwen2_5_vl``). Images are encoded at the PIO authors' resolution unless ``min_pixels`` /
``max_pixels`` say otherwise; every reduction method keeps the kept tokens' original M-RoPE ids by default.
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

QWEN_PIXELS = 1008 * 1008  # the PIO authors' Qwen2.5-VL evaluation: min_pixels = max_pixels = 1008^2
QWEN_CONV_MODE = "qwen2_5_vl"
QWEN_IMAGE_PAD = "<|image_pad|>"
QWEN_IMAGE = "<|vision_start|>" + QWEN_IMAGE_PAD + "<|vision_end|>"
QWEN_VIDEO_PAD = "<|video_pad|>"
QWEN_VIDEO = "<|vision_start|>" + QWEN_VIDEO_PAD + "<|vision_end|>"  # the chat template's video content
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)  # Qwen2.5-VL's, inside the 7B vocabulary


@register_family
class Qwen2_5_VLFamily(Family):
    """Qwen2.5-VL-Instruct (``Qwen/Qwen2.5-VL-7B-Instruct``)."""

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    architectures = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLForReduction")
    model_types = ("qwen2_5_vl",)
    hub_names = ("qwen2.5-vl",)
    variants = ("qwen2_5_vl",)
    conv_mode = QWEN_CONV_MODE
    conv_modes = (QWEN_CONV_MODE,)
    exclusive = True
    options = (Option("min_pixels", "--min-pixels", "its image resolution bounds"),
               Option("max_pixels", "--max-pixels", "its image resolution bounds"))
    method_options = {"positions": "original"}  # M-RoPE: kept tokens keep their ids (the PIO authors' Qwen choice)
    tower = TowerTraits(cls_token=False, patches_per_token=4, per_crop=False)  # 2 x 2 merger, one grid per image
    video_rule = "smart"  # qwen-vl-utils' smart_nframes / smart_resize (llava.video)
    shapes = (
        # Qwen2.5-VL-7B-Instruct at the PIO authors' resolution (min = max pixels = 1008^2: 1296 visual tokens)
        Shape("qwen2.5-vl-7b", "qwen2_5_vl", dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                                                  vocab=152064,
                                                  vision=dict(depth=32, hidden_size=1280, intermediate_size=3420,
                                                              num_heads=16, fullatt_block_indexes=[7, 15, 23, 31],
                                                              window_size=112),
                                                  pixels=1008 * 1008), (1008, 1008)),
        Shape("qwen-tiny", "qwen2_5_vl", dict(hidden=64, intermediate=176, layers=4, heads=4, kv_heads=2, vocab=1046,
                                              vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                                                          fullatt_block_indexes=[1, 3], window_size=56),
                                              pixels=336 * 336), (336, 336)),
    )

    # -- loading ----------------------------------------------------------------------------------------
    def _pixels(self, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        lo = QWEN_PIXELS if min_pixels is None else int(min_pixels)
        hi = QWEN_PIXELS if max_pixels is None else int(max_pixels)
        if not 0 < lo <= hi:
            raise ValueError(f"--min-pixels {lo} and --max-pixels {hi}: need 0 < min-pixels <= max-pixels")
        return lo, hi

    def load(self, model_path: str, *, device: torch.device, device_map: Any, load_kwargs: dict[str, Any],
             min_pixels: int | None = None, max_pixels: int | None = None, **options: Any
             ) -> tuple[Any, Any, Any, int]:
        """The tokenizer and the image processor, not ``AutoProcessor``: transformers 4.57 builds Qwen's video
        processor with it, which needs torchvision; prompts are templated and their image tokens expanded by
        :meth:`encode`."""
        from transformers import AutoImageProcessor, AutoTokenizer

        from .builder import check_checkpoint_dir, check_loading_info
        from .language_model.qwen2_5_vl import Qwen2_5_VLForReduction

        check_checkpoint_dir(model_path)
        lo, hi = self._pixels(min_pixels, max_pixels)
        image_processor = AutoImageProcessor.from_pretrained(model_path, min_pixels=lo, max_pixels=hi)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenizer.padding_side = "left"
        model, info = Qwen2_5_VLForReduction.from_pretrained(model_path, low_cpu_mem_usage=True,
                                                             output_loading_info=True, **load_kwargs)
        check_loading_info(model_path, info, vision_optional=False)
        if device_map is None:
            model.to(device)
        model.requires_grad_(False)
        model.eval()
        context_len = getattr(model.config.text_config, "max_position_embeddings", None) or 32768
        return tokenizer, model, image_processor, context_len

    def load_geometry(self, model_path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                      **options: Any) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoImageProcessor

        lo, hi = self._pixels(min_pixels, max_pixels)
        return AutoConfig.from_pretrained(model_path), AutoImageProcessor.from_pretrained(model_path, min_pixels=lo,
                                                                                          max_pixels=hi)

    # -- prompts ----------------------------------------------------------------------------------------
    def encode(self, prompt: str, images: Sequence[Any], tokenizer: Any, processor: Any, config: Any
               ) -> tuple[torch.Tensor, Any, Any]:
        """Each ``<image>`` (with the newline LLaVA puts after it) becomes Qwen's vision tokens, expanded to one
        ``<|image_pad|>`` per merged patch as its processor does; the sizes are its ``image_grid_thw``."""
        from llava.constants import DEFAULT_IMAGE_TOKEN

        text = prompt.replace(DEFAULT_IMAGE_TOKEN + "\n", QWEN_IMAGE).replace(DEFAULT_IMAGE_TOKEN, QWEN_IMAGE)
        if not images:
            return tokenizer(text, return_tensors="pt")["input_ids"], None, None
        out = processor(images=list(images), return_tensors="pt")
        merge = int(getattr(processor, "merge_size", 2))
        counts = (out["image_grid_thw"].prod(-1) // merge**2).tolist()
        parts = text.split(QWEN_IMAGE_PAD)  # one image token per merged patch, as Qwen's processor expands them
        text = parts[0] + "".join(QWEN_IMAGE_PAD * int(n) + rest for n, rest in zip(counts, parts[1:], strict=True))
        return tokenizer(text, return_tensors="pt")["input_ids"], out["pixel_values"], out["image_grid_thw"]

    def encode_video(self, prompt: str, frames: np.ndarray, sample_fps: float, tokenizer: Any, processor: Any,
                     config: Any) -> tuple[torch.Tensor, Any, Any]:
        """The ``<video>`` mark (with the newline after it) becomes Qwen's video content, ``<|video_pad|>`` expanded
        to one per merged patch (``t * h * w / merge**2``, as its processor does); the visual inputs are
        :func:`llava.video.qwen_video_inputs` of the frames in a :class:`QwenVisual`."""
        from llava.constants import DEFAULT_VIDEO_TOKEN
        from llava.video import qwen_video_inputs

        from .language_model.qwen2_5_vl import QwenVisual

        if prompt.count(DEFAULT_VIDEO_TOKEN) != 1:
            raise ValueError(f"a video prompt holds one {DEFAULT_VIDEO_TOKEN} mark, this one "
                             f"{prompt.count(DEFAULT_VIDEO_TOKEN)}")
        inputs = qwen_video_inputs(frames, processor, sample_fps)
        n = int(inputs["video_grid_thw"].prod()) // int(processor.merge_size) ** 2
        text = prompt.replace(DEFAULT_VIDEO_TOKEN + "\n", QWEN_VIDEO).replace(DEFAULT_VIDEO_TOKEN, QWEN_VIDEO)
        text = text.replace(QWEN_VIDEO_PAD, QWEN_VIDEO_PAD * n)
        return tokenizer(text, return_tensors="pt")["input_ids"], QwenVisual(**inputs), None

    # -- the image's tokens -----------------------------------------------------------------------------
    def _grid(self, processor: Any, image: Any) -> tuple[int, int]:
        """(rows, cols) of merged tokens the processor makes of ``image``."""
        out = processor(images=[image.convert("RGB")], return_tensors="pt")
        merge = int(getattr(processor, "merge_size", 2))
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0].tolist())
        return gh // merge, gw // merge

    def image_layout(self, config: Any, processor: Any, image_size: tuple[int, int]):
        from PIL import Image

        from .layout import ImageLayout

        rows, cols = self._grid(processor, Image.new("RGB", tuple(image_size)))
        return ImageLayout(torch.arange(rows * cols), rows * cols)

    def image_views(self, config: Any, processor: Any, image: Any):
        """One view: the image resized to the processor's grid, its merged 2 x 2 patches row-major."""
        from .layout import CropView, ImageViews

        rows, cols = self._grid(processor, image)
        w, h = image.size

        def cells(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            c, r = np.broadcast_arrays(np.floor(x * cols / w).astype(np.int64), np.floor(y * rows / h).astype(np.int64))
            inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
            return np.where(inside, r * cols + c, -1)

        return ImageViews(image, [CropView("image", (0,), cells)])

    def vision_flops(self, model: Any, state: Any) -> dict[str, int]:
        """The vision transformer (windowed and full-attention blocks) and the merger on every image's grid."""
        from pio.flops import encoder_selection_flops, qwen_vision_flops

        if not state.vision_grids:
            return {"vision": 0, "encoder_selection": 0}
        v = model.config.vision_config
        total = qwen_vision_flops(state.vision_grids, v.hidden_size, v.intermediate_size, v.depth, v.out_hidden_size,
                                  v.fullatt_block_indexes, v.patch_size, v.temporal_patch_size, v.spatial_merge_size,
                                  v.window_size, v.in_chans)["total"]
        return {"vision": total, "encoder_selection": encoder_selection_flops(state.events, v.hidden_size)}

    # -- benchmarks and tests ---------------------------------------------------------------------------
    def build_shape(self, shape: Shape, device: torch.device, dtype: torch.dtype, workdir: Path) -> tuple[Any, Any]:
        from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessor

        from .language_model.qwen2_5_vl import Qwen2_5_VLForReduction
        from .tiny import CLIP_MEAN, CLIP_STD, fill_random
        from .tiny_qwen import mrope_section

        s = shape.spec
        head_dim = s["hidden"] // s["heads"]
        ids = {k: min(v, s["vocab"] - 4 + i) for i, (k, v) in enumerate(QWEN_IDS.items())}
        rope = {"type": "mrope", "mrope_section": mrope_section(head_dim)}
        text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                    rope_scaling=rope, rope_theta=1e6, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, use_sliding_window=False)
        vision = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_chans=3,
                      out_hidden_size=s["hidden"], **s["vision"])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **text, **ids)
        with torch.device("meta"):
            model = Qwen2_5_VLForReduction._from_config(cfg, dtype=dtype)
        model.to_empty(device=device)
        fill_random(model, std=0.02, seed=0)
        rotary = model.model.visual.rotary_pos_emb  # a buffer fill_random does not know: recomputed (theta 10^4)
        dim = 2 * rotary.inv_freq.numel()
        rotary.inv_freq.copy_(1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        model.requires_grad_(False).eval()
        proc = Qwen2VLImageProcessor(min_pixels=s["pixels"], max_pixels=s["pixels"], patch_size=14,
                                     temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return model, proc

    def synthetic_input(self, model: Any, processor: Any, image: Any, n_text: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, Any, Any]:
        cfg = model.config
        out = processor(images=[image], return_tensors="pt")
        n = int(out["image_grid_thw"].prod()) // processor.merge_size**2
        special = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id)
        text = rng.integers(3, special, size=n_text - 1).tolist()
        image_ids = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id]
        ids = [*text[:34], *image_ids, *text[34:]]
        return torch.tensor([ids]), out["pixel_values"], out["image_grid_thw"]

    def video_grid(self, config: Any, processor: Any, frames: np.ndarray) -> tuple[int, int, int, int]:
        """One step per temporal patch (``temporal_patch_size`` frames, an odd last frame repeated), its merged
        ``merge x merge`` patches row-major (the order of ``qwen_video_inputs``); nothing after them."""
        tp, cell = int(processor.temporal_patch_size), int(processor.patch_size) * int(processor.merge_size)
        n, h, w = frames.shape[:3]
        return -(-n // tp), h // cell, w // cell, 0

    def synthetic_video(self, model: Any, processor: Any, size: tuple[int, int], n_frames: int, n_text: int,
                        rng: np.random.Generator) -> tuple[torch.Tensor, Any, Any]:
        """Frames as qwen-vl-utils reads a ``size`` video at its defaults (``num_frames = n_frames``, each frame
        resized to ``qwen_frame_size``), one second per frame pair (2 frames per second); the video after a
        system-prompt-long prefix."""
        from llava.video import VideoSampling, qwen_frame_size, qwen_video_inputs

        from .language_model.qwen2_5_vl import QwenVisual

        w, h = size
        fh, fw = qwen_frame_size(h, w, n_frames, VideoSampling(num_frames=n_frames))
        yy, xx = np.mgrid[0:fh, 0:fw]
        frames = np.stack([np.stack([(xx + 4 * k) % 256, yy % 256, rng.integers(0, 256, size=(fh, fw))], -1)
                           for k in range(n_frames)]).astype(np.uint8)  # (F, H, W, 3), a pattern moving right
        inputs = qwen_video_inputs(frames, processor, sample_fps=2.0)
        cfg = model.config
        n = int(inputs["video_grid_thw"].prod()) // processor.merge_size**2
        special = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id)
        text = rng.integers(3, special, size=n_text - 1).tolist()
        ids = [*text[:34], cfg.vision_start_token_id, *[cfg.video_token_id] * n, cfg.vision_end_token_id, *text[34:]]
        return torch.tensor([ids]), QwenVisual(**inputs), None

    def write_tiny(self, out_dir: str | os.PathLike, variant: str | None = None, seed: int = 0, layers: int = 4,
                   hidden: int | None = None, **overrides: Any) -> Path:
        from .tiny_qwen import write_tiny_qwen_checkpoint

        self._variant(variant)
        if hidden is not None:
            overrides["hidden"] = hidden
        return write_tiny_qwen_checkpoint(out_dir, seed=seed, layers=layers, **overrides)
