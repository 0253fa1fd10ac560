"""The LLaVA-OneVision family: transformers' SigLIP tower, projector and Qwen2 decoder, both checkpoint layouts.

Checkpoints: the original ``lmms-lab/llava-onevision-qwen2-{0.5b,7b}-ov`` (``architectures
["LlavaQwenForCausalLM"]``, ``model_type "llava"``: claimed here by its architecture, so it is never taken for
LLaVA-1.5) and the converted ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` (``LlavaOnevisionForConditionalGeneration``,
``model_type llava_onevision``); :mod:`llava.model.onevision` loads both. One variant, ``llava-onevision``: its
tiny checkpoint is written in the original layout (``write_tiny(..., layout="hf")`` or ``python -m
llava.model.tiny_onevision --layout hf`` for the converted one; both layouts make the same model) with 48-px
patches (8 x 8 tokens per view, so the registry's suites stay fast; ``patch_size=14`` is the real geometry).

An image is its base view (27 x 27 tokens at 384 px), then its ``anyres_max_9`` grid, unpadded, shrunk when
larger than nine crops, with a newline after every row (a question with several images: one padded view each,
plus one newline). A video is its frames (``uniform`` sampling, 32 by default), each one 384-px view pooled to
14 x 14 tokens, and one newline after them (:meth:`LlavaOnevisionFamily.encode_video`). Prompts use the
``qwen_1_5`` template (ChatML). The vision tower has no CLS token
(:class:`~pio.encoder.TowerTraits`): DivPrune, the authors' scan (its received-attention form) and VFlowOpt's
ViT stage run per view; the methods that need a CLS token are refused by name (docs/methods.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pio.encoder import TowerTraits

from .families import Family, Shape, register_family

ONEVISION_CONV_MODES = ("qwen_1_5", "qwen_2")  # LLaVA-NeXT's conv_qwen under both names
TINY_PATCH = 48  # the tiny checkpoint's patch side: 8 x 8 tokens per 384-px view (the real 14: 27 x 27)
SYSTEM_PREFIX = 14  # Qwen2 tokens of the qwen_1_5 prompt before the first image (iLLaVA's image start index)


@register_family
class LlavaOnevisionFamily(Family):
    """LLaVA-OneVision (``lmms-lab/llava-onevision-qwen2-7b-ov``, ``llava-hf/llava-onevision-qwen2-7b-ov-hf``)."""

    name = "llava_onevision"
    title = "LLaVA-OneVision"
    architectures = ("LlavaQwenForCausalLM", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionForReduction")
    model_types = ("llava_onevision",)
    hub_names = ("onevision",)
    variants = ("llava-onevision",)
    conv_mode = "qwen_1_5"
    conv_modes = ONEVISION_CONV_MODES
    exclusive = True
    tower = TowerTraits(cls_token=False, patches_per_token=1, per_crop=True)  # SigLIP so400m minus its last layer
    video_rule = "uniform"  # lmms-eval llava_onevision's load_video: linspace over the video, 32 frames (llava.video)
    shapes = (
        # llava-onevision-qwen2-7b-ov: Qwen2-7B, SigLIP so400m/14-384 with 26 of its 27 layers, mlp2x_gelu; a
        # 640 x 480 photo: base view + 2 x 2 grid = 5 views, 2929 visual tokens
        Shape("llava-onevision-7b", "llava-onevision",
              dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
                   vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                               image_size=384, patch_size=14)), (640, 480)),
        Shape("onevision-tiny", "llava-onevision",
              dict(hidden=64, intermediate=176, layers=28, heads=4, kv_heads=2, vocab=1024,  # 7B depth
                   vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=384, patch_size=14)), (640, 480)),
    )

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, model_path: str, *, device: torch.device, device_map: Any, load_kwargs: dict[str, Any],
             **options: Any) -> tuple[Any, Any, Any, int]:
        """:func:`llava.model.onevision.load_onevision` (either layout, strict weights)."""
        from .onevision import load_onevision

        return load_onevision(model_path, device, device_map, load_kwargs)

    def load_geometry(self, model_path: str, **options: Any) -> tuple[Any, Any]:
        from transformers import AutoConfig, LlavaOnevisionImageProcessor

        from .checkpoint_checks import read_config_json
        from .onevision import checkpoint_layout, image_processor_for, original_config

        raw = read_config_json(model_path)
        if checkpoint_layout(raw) == "original":
            config, _ = original_config(raw, model_path)
            return config, image_processor_for(config)
        return AutoConfig.from_pretrained(model_path), LlavaOnevisionImageProcessor.from_pretrained(model_path)

    # -- prompts ----------------------------------------------------------------------------------------
    def encode(self, prompt: str, images: Sequence[Any], tokenizer: Any, processor: Any, config: Any
               ) -> tuple[torch.Tensor, Any, Any]:
        """:func:`llava.model.onevision.encode_prompt`: ``-200`` per image (original layout) or ``<image>`` per
        visual token (converted); per-image views and ``(height, width)`` sizes."""
        from .onevision import encode_prompt

        return encode_prompt(prompt, images, tokenizer, processor, config)

    def encode_video(self, prompt: str, frames: np.ndarray, sample_fps: float, tokenizer: Any, processor: Any,
                     config: Any) -> tuple[torch.Tensor, Any, Any]:
        """:func:`llava.model.onevision.encode_video_prompt`: every frame one view, ``-200`` for the video (original
        layout) or ``<video>`` per visual token (converted); ``sample_fps`` is not used (no time positions)."""
        from .onevision import encode_video_prompt

        return encode_video_prompt(prompt, frames, tokenizer, processor, config)

    def video_grid(self, config: Any, processor: Any, frames: np.ndarray) -> tuple[int, int, int, int]:
        """One step per frame, its pooled ``grid x grid`` map row-major (the frame squashed onto one view), then the
        video's newline."""
        from .language_model.llava_onevision import video_frame_grid

        g = video_frame_grid(config)
        return frames.shape[0], g, g, 1

    # -- the image's tokens -----------------------------------------------------------------------------
    def _views(self, config: Any, size: tuple[int, int]) -> int:
        """Views of one image of ``(height, width)`` (the base view and its grid crops)."""
        from .language_model.llava_onevision import grid_shape

        rows, cols = grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        return 1 + rows * cols

    def image_layout(self, config: Any, processor: Any, image_size: tuple[int, int]):
        """The base view, then the unpadded grid with its newlines; a grid ``anyres_max_9`` shrinks names the crop
        patch nearest to each token (:func:`~llava.model.language_model.llava_onevision.onevision_image_layout`)."""
        from .language_model.llava_onevision import onevision_image_layout

        w, h = image_size
        layout, _ = onevision_image_layout(config, self._views(config, (h, w)), (h, w))
        return layout

    def image_views(self, config: Any, processor: Any, image: Any):
        """The base view (the image squashed onto one 384-px view) and the anyres grid (the image fitted onto the
        best canvas of the pinpoints, centred, cut into views)."""
        from llava.mm_utils import _fit_size

        from .family_llava import _cells
        from .language_model.llava_onevision import grid_shape, onevision_image_layout
        from .layout import CropView, ImageViews

        crop = config.vision_config.image_size
        side = crop // config.vision_config.patch_size
        cell = crop / side
        P = side * side
        w, h = image.size
        rows, cols = grid_shape((h, w), config.image_grid_pinpoints, crop)
        bw, bh = cols * crop, rows * crop
        nw, nh = _fit_size((w, h), (bw, bh))

        def grid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            cx, cy = x * nw / w + (bw - nw) // 2, y * nh / h + (bh - nh) // 2
            c, r = np.broadcast_arrays(np.floor(cx / cell).astype(np.int64), np.floor(cy / cell).astype(np.int64))
            inside = (c >= 0) & (c < cols * side) & (r >= 0) & (r < rows * side)
            ids = P * (1 + (r // side) * cols + c // side) + (r % side) * side + c % side
            return np.where(inside, ids, -1)

        note = ""
        if onevision_image_layout(config, 1 + rows * cols, (h, w))[1]:
            note = f"grid shrunk by {config.vision_aspect_ratio}: each token drawn at its nearest crop patch"
        return ImageViews(image, [CropView("base view", (0,), lambda x, y: _cells(x * crop / w, y * crop / h, side,
                                                                                  side, cell)),
                                  CropView("high-res grid", tuple(range(1, 1 + rows * cols)), grid)], note)

    def vision_flops(self, model: Any, state: Any) -> dict[str, int]:
        """SigLIP (no CLS token, the layers the checkpoint keeps) on every view (a video: every frame) and the
        two-layer projector on every patch (a video's pooling after it is not counted: a bilinear resize)."""
        from pio.flops import clip_vision_flops, encoder_selection_flops, projector_flops

        if not state.vision_crops:
            return {"vision": 0, "encoder_selection": 0}
        v = model.config.vision_config
        crops = state.vision_crops
        layers = len(model.model.vision_tower.vision_model.encoder.layers)
        total = clip_vision_flops(v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, layers, crops,
                                  cls_token=False)["total"]
        total += projector_flops(crops * (v.image_size // v.patch_size) ** 2, v.hidden_size,
                                 model.config.text_config.hidden_size, "mlp2x_gelu")
        return {"vision": total, "encoder_selection": encoder_selection_flops(state.events, v.hidden_size)}

    # -- benchmarks and tests ---------------------------------------------------------------------------
    def build_shape(self, shape: Shape, device: torch.device, dtype: torch.dtype, workdir: Path) -> tuple[Any, Any]:
        from transformers import LlavaOnevisionConfig

        from llava.constants import IMAGE_TOKEN_INDEX

        from .language_model.llava_onevision import LlavaOnevisionForReduction
        from .onevision import image_processor_for
        from .tiny import fill_random
        from .tiny_onevision import PINPOINTS

        s = shape.spec
        text = dict(model_type="qwen2", vocab_size=s["vocab"], hidden_size=s["hidden"],
                    intermediate_size=s["intermediate"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"], rope_theta=1e6, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)
        vision = dict(model_type="siglip_vision_model", vision_use_head=False, **s["vision"])
        cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_INDEX,
                                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9", multimodal_projector_bias=True,
                                   image_grid_pinpoints=[[h, w] for w, h in PINPOINTS], tie_word_embeddings=False)
        with torch.device("meta"):
            model = LlavaOnevisionForReduction._from_config(cfg, dtype=dtype)
        model.to_empty(device=device)
        fill_random(model, std=0.02, seed=0)
        model.requires_grad_(False).eval()
        return model, image_processor_for(cfg)

    def synthetic_input(self, model: Any, processor: Any, image: Any, n_text: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, Any, Any]:
        """The image after the ``qwen_1_5`` system prefix's length, marked by ``-200``."""
        from llava.constants import IMAGE_TOKEN_INDEX

        out = processor(images=[[image]], do_pad=False)
        views = [torch.from_numpy(np.asarray(v)) for v in out["pixel_values"]]
        sizes = torch.tensor([list(map(int, s)) for s in out["image_sizes"]], dtype=torch.long)
        text = rng.integers(3, model.config.text_config.vocab_size, size=n_text - 1).tolist()
        ids = [*text[:SYSTEM_PREFIX], IMAGE_TOKEN_INDEX, *text[SYSTEM_PREFIX:]]
        return torch.tensor([ids]), views, sizes

    def synthetic_video(self, model: Any, processor: Any, size: tuple[int, int], n_frames: int, n_text: int,
                        rng: np.random.Generator) -> tuple[torch.Tensor, Any, Any]:
        """``n_frames`` frames of ``size`` (a pattern moving right; the uniform rule keeps their size), every frame
        one view; the video after the ``qwen_1_5`` system prefix's length, marked by ``-200``."""
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.video import onevision_video_inputs

        from .language_model.llava_onevision import OnevisionVideos

        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        frames = np.stack([np.stack([(xx + 4 * k) % 256, yy % 256, rng.integers(0, 256, size=(h, w))], -1)
                           for k in range(n_frames)]).astype(np.uint8)  # (F, H, W, 3)
        text = rng.integers(3, model.config.text_config.vocab_size, size=n_text - 1).tolist()
        ids = [*text[:SYSTEM_PREFIX], IMAGE_TOKEN_INDEX, *text[SYSTEM_PREFIX:]]
        return torch.tensor([ids]), OnevisionVideos.of(onevision_video_inputs(frames, processor)), None

    def write_tiny(self, out_dir: str | os.PathLike, variant: str | None = None, seed: int = 0, layers: int = 4,
                   hidden: int | None = None, **overrides: Any) -> Path:
        """:func:`llava.model.tiny_onevision.write_tiny_onevision_checkpoint`; ``layout="hf"`` among the
        overrides writes the converted layout (default: the original). Its views have 48-px patches (8 x 8 tokens,
        :data:`TINY_PATCH`) unless ``patch_size`` says otherwise: the registry's suites run every method on it."""
        from .tiny_onevision import write_tiny_onevision_checkpoint

        self._variant(variant)
        overrides.setdefault("patch_size", TINY_PATCH)
        return write_tiny_onevision_checkpoint(out_dir, overrides.pop("layout", "original"), seed=seed, layers=layers,
                                               hidden=hidden or 64, **overrides)
