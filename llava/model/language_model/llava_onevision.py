"""LLaVA-OneVision with visual-token reduction: transformers' modules and weights, our inputs and decoder loop.

:class:`LlavaOnevisionForReduction` subclasses transformers' ``LlavaOnevisionForConditionalGeneration`` without
touching its modules: the SigLIP tower, the two-layer projector, ``image_newline``, the Qwen2 decoder layers,
rotary embedding, norm and head are transformers' own, so both checkpoint layouts load into it unchanged
(:mod:`llava.model.onevision` translates the original one). Ours are, as separable steps:

1. :meth:`~LlavaOnevisionForReduction.encode_crops`: every view of every image through the tower (its hidden
   state at ``vision_feature_layer``) and the projector: ``(crops, 27 x 27, D)`` at 384 px / patch 14.
2. :meth:`~LlavaOnevisionForReduction.layout_image`: one image's visual sequence from its views. A single view
   (an image of a multi-image question, which the processor pads to a square) is its 729 tokens and one
   ``image_newline``. Otherwise the base 384 x 384 view (729 tokens, no newline), then the anyres grid: the grid
   crops tiled, unpadded to the image's aspect, shrunk bilinearly when larger than ``anyres_max_N`` allows
   (:func:`anyres_max_shape`), and one ``image_newline`` after each row.
3. :meth:`~LlavaOnevisionForReduction.video_features`: a video's frames, each one 384-px view, through the tower
   and projector, every frame's 27 x 27 map pooled bilinearly to 14 x 14 (transformers' ``get_video_features``),
   the frames in time order and one ``image_newline`` after the whole video: ``F x 196 + 1`` tokens.
4. :meth:`~LlavaOnevisionForReduction.prepare_multimodal_inputs`: the sequences spliced into the text
   (:func:`~llava.model.reducible.splice_visual`), at a ``-200`` placeholder (one per image or video: the original
   checkpoints' prompts) or over the ``<image>`` / ``<video>`` tokens the converted checkpoints' processor expands
   (one per visual token), with each image's or video's span recorded, so a reduction method sees exactly the
   visual tokens (base view, grid and its newlines; all of a video's frames and its newline).

The forward and ``generate`` are the ones every family shares (:class:`~llava.model.reducible.ReducibleLM`). The
decoder is Qwen2 with 1-D rotary positions, contiguous over the valid tokens, as in LLaVA:
:class:`llava.model.pruning.LlamaAdapter` serves it unchanged. An encoder-side method selects per view through
:class:`SiglipCrops` (no CLS token) and its kept patches are laid out by :func:`onevision_image_layout`. Image sizes are ``(height, width)`` and
``image_grid_pinpoints`` ``(height, width)`` canvases, transformers' convention (LLaVA-1.5/NeXT here use
``(width, height)``).

Sources (facts, not code): LLaVA-NeXT ``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``,
the ``anyres_max`` branch, the single-image branch and the video branch: ``get_2dPool`` with stride 2, bilinear,
``mm_newline_position "one_token"``) and transformers 4.57 ``models/llava_onevision/modeling_llava_onevision.py``
(``pack_image_features``, ``get_image_features``, ``get_video_features`` / ``apply_pooling``); docs/video-notes.md
§4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import select_best_resolution, unpad_image, unpad_image_shape
from pio.encoder import EncoderMethod, TowerTraits
from pio.nms import work_dtype
from pio.state import EncoderRecord, PruneState

from ..encoder_stage import ReducedCrop, apply_kept, check_tower, reduce_crops
from ..layout import ImageLayout, Run
from ..pruning import LlamaAdapter
from ..reducible import MultimodalInputs, ReducibleLM, splice_visual

__all__ = [
    "LlavaOnevisionForReduction",
    "OnevisionVideos",
    "SiglipCrops",
    "anyres_max_patches",
    "anyres_max_shape",
    "grid_shape",
    "onevision_image_layout",
    "video_frame_grid",
    "video_token_count",
    "visual_token_count",
]

RESIZE_SLACK = 1.1  # the feature map is shrunk only when it exceeds the anyres_max budget by more than 10 %


def anyres_max_patches(aspect_ratio: str) -> int:
    """The crop budget N of ``vision_aspect_ratio`` / ``image_aspect_ratio`` ``"anyres_max_N"`` (9 for OneVision)."""
    prefix = "anyres_max_"
    value = str(aspect_ratio)
    if not value.startswith(prefix) or not value[len(prefix):].isdigit() or int(value[len(prefix):]) < 1:
        raise ValueError(f"aspect ratio {aspect_ratio!r} is not supported; LLaVA-OneVision needs 'anyres_max_N' "
                         "(N >= 1, e.g. anyres_max_9)")
    return int(value[len(prefix):])


def grid_shape(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], crop: int) -> tuple[int, int]:
    """``(rows, cols)`` of anyres grid crops for an image of ``(height, width)``: the best ``(height, width)``
    canvas of ``pinpoints`` (most detail kept, then least area wasted, first listed on ties) in ``crop``-pixel
    squares."""
    h, w = (int(v) for v in image_size)
    best_h, best_w = select_best_resolution((h, w), pinpoints)  # symmetric in the two axes: (h, w) in, (h, w) out
    return best_h // crop, best_w // crop


def anyres_max_shape(height: int, width: int, side: int, max_patches: int) -> tuple[int, int]:
    """The unpadded grid feature map ``height x width`` after ``anyres_max_N``: unchanged unless it holds more than
    ``1.1^2 N`` crops' worth of ``side x side`` tokens, else bilinearly shrunk by ``ratio = sqrt(h w / (N side^2))``
    to ``(int(h // ratio), int(w // ratio))``."""
    ratio = math.sqrt(height * width / (max_patches * side**2))
    if ratio > RESIZE_SLACK:
        return int(height // ratio), int(width // ratio)
    return height, width


def visual_token_count(image_size: Sequence[int], config: Any, single_view: bool = False) -> int:
    """Visual tokens LLaVA-OneVision makes of an image of ``(height, width)``: ``side^2 + 1`` for a single view
    (an image of a multi-image question), else ``side^2`` (base view) plus the grid map and one newline per row.
    ``config`` is a ``LlavaOnevisionConfig``. 384x384 -> 1485, (480, 640) -> 2929, (1080, 1920) -> 7269."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if single_view:
        return side * side + 1
    rows, cols = grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    h, w = unpad_image_shape(rows * side, cols * side, (int(image_size[1]), int(image_size[0])))
    h, w = anyres_max_shape(h, w, side, anyres_max_patches(config.vision_aspect_ratio))
    return side * side + h * (w + 1)


def video_frame_grid(config: Any) -> int:
    """Tokens per side of one pooled video frame: ``ceil(side / 2)`` of the ``side x side`` view map (14 for 27:
    transformers' ``apply_pooling``; LLaVA-NeXT's ``get_2dPool`` at ``mm_spatial_pool_stride`` 2, bilinear)."""
    vision = config.vision_config
    return math.ceil(vision.image_size // vision.patch_size / 2)


def video_token_count(frames: int, config: Any) -> int:
    """Visual tokens of a video of ``frames`` frames: ``frames x grid^2 + 1`` (:func:`video_frame_grid`, one newline
    after the whole video). 32 frames -> 6273 at the real geometry."""
    return frames * video_frame_grid(config) ** 2 + 1


@dataclass
class OnevisionVideos:
    """The videos of one call, what a runner passes as ``images`` for a video prompt (``to(device, dtype)`` moves
    them like a pixel tensor).

    Attributes:
        frames: per video, its frames' pixel values (F_i, 3, S, S), each frame one ``S``-px view preprocessed as a
            single image (no anyres; :func:`llava.video.onevision_video_inputs`). Built from transformers'
            ``pixel_values_videos`` (n_videos, F, 3, S, S) by :meth:`of`.
    """

    frames: list[torch.Tensor]

    @classmethod
    def of(cls, pixel_values_videos: Any) -> OnevisionVideos:
        """From ``pixel_values_videos``: a (n_videos, F, 3, S, S) tensor or a list of (F_i, 3, S, S) tensors."""
        if isinstance(pixel_values_videos, OnevisionVideos):
            return pixel_values_videos
        videos = list(pixel_values_videos)
        if not videos or any(not torch.is_tensor(v) or v.dim() != 4 for v in videos):
            raise ValueError("pixel_values_videos: expected a (videos, frames, 3, H, W) tensor or a list of "
                             "(frames, 3, H, W) tensors")
        return cls(videos)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> OnevisionVideos:
        return OnevisionVideos([v.to(device=device, dtype=dtype) for v in self.frames])

    @classmethod
    def join(cls, parts: Sequence[OnevisionVideos]) -> OnevisionVideos:
        """Several questions' videos as one call's (a batch), in order."""
        return cls([f for p in parts for f in p.frames])


def onevision_image_layout(config: Any, views: int, image_size: Sequence[int]) -> tuple[ImageLayout, bool]:
    """One image's unreduced token sequence (:class:`~llava.model.layout.ImageLayout`) of ``views`` views
    (base view first) and ``(height, width)`` ``image_size``, and whether ``anyres_max_N`` shrinks its grid.

    A single view: its ``side^2`` patches and one newline. Otherwise the base view, then the grid crops tiled
    row-major, unpadded and followed by a newline per row, as :meth:`LlavaOnevisionForReduction.layout_image`
    builds the features. Where the map is shrunk bilinearly each token mixes up to four crop patches; the layout
    then names the patch nearest to the token's centre (enough to draw it; encoder-side methods refuse such an
    image, see :meth:`LlavaOnevisionForReduction.image_features`).
    """
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    P = side * side
    if views == 1:
        return ImageLayout(torch.cat([torch.arange(P), torch.tensor([-1])]), P, (Run(0, P, (0,)), Run(P, P + 1))), \
            False
    rows, cols = grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    if views - 1 != rows * cols:
        raise ValueError(f"an image of {tuple(int(v) for v in image_size)} (height, width) takes a {rows} x {cols} "
                         f"grid of crops, but it has {views - 1} besides the base view: preprocess it with the "
                         "checkpoint's image processor (same image_grid_pinpoints)")
    grid = (P + torch.arange(rows * cols * P)).view(rows, cols, side, side).permute(0, 2, 1, 3)  # (r, s, c, s)
    grid = unpad_image(grid.reshape(rows * side, cols * side), (int(image_size[1]), int(image_size[0])))
    h, w = grid.shape
    shape = anyres_max_shape(h, w, side, anyres_max_patches(config.vision_aspect_ratio))
    resized = shape != (h, w)
    if resized:  # the source patch nearest to each output token's centre (bilinear, align_corners False)
        r = ((torch.arange(shape[0]) + 0.5) * h / shape[0]).long().clamp(max=h - 1)
        c = ((torch.arange(shape[1]) + 0.5) * w / shape[1]).long().clamp(max=w - 1)
        grid = grid[r][:, c]
    grid = torch.cat([grid, grid.new_full((grid.shape[0], 1), -1)], dim=1)  # a newline after every row
    src = torch.cat([torch.arange(P), grid.flatten()])
    return ImageLayout(src, P, (Run(0, P, (0,)), Run(P, src.numel(), tuple(range(1, views)), tiled=True))), resized


def _layer_attention(block: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, T, T): a SigLIP encoder layer's softmax attention over its input ``x`` (N, T, C), averaged over heads,
    recomputed from its own projections (float32; float64 for a float64 tower)."""
    attn = block.self_attn
    h = block.layer_norm1(x)
    N, T, _ = h.shape
    work = work_dtype(h)
    q = attn.q_proj(h).view(N, T, attn.num_heads, attn.head_dim).to(work)
    k = attn.k_proj(h).view(N, T, attn.num_heads, attn.head_dim).to(work)
    out = torch.zeros(N, T, T, dtype=work, device=h.device)
    for i in range(attn.num_heads):  # one head at a time: (N, T, T) in memory, not (N, H, T, T)
        out += ((q[:, :, i] @ k[:, :, i].transpose(-1, -2)) * attn.scale).softmax(dim=-1)
    return out / attn.num_heads


class SiglipCrops:
    """LLaVA-OneVision's SigLIP tower over one call's views, as the encoder-side step reads it
    (:class:`llava.model.encoder_stage.EncoderTower`): no CLS token, one patch per language-model token,
    fixed-size views. It serves the projected features, every layer's full attention (heads averaged), the
    attention each patch receives (heads summed, query rows averaged: the no-CLS form of Qwen2.5-VL's tower)
    and the views' 8-bit pixels (mean = std = 0.5, SigLIP's normalisation in both layouts)."""

    traits = TowerTraits(cls_token=False, patches_per_token=1, per_crop=True)
    provides = frozenset({"features", "attention", "received_attention", "pixels"})

    def __init__(self, tower: Any, hidden_states: tuple[torch.Tensor, ...], pixels: torch.Tensor, side: int):
        self._layers = tower.vision_model.encoder.layers
        self._hidden, self._pixels = hidden_states, pixels
        self.grid = (side, side)
        self.full_attention_layers = tuple(range(len(self._layers)))
        self.sequence_length = side * side

    def _layer(self, layer: int) -> int:
        n = len(self._layers)
        if not -n <= layer < n:
            raise ValueError(f"encoder layer {layer} out of range for a {n}-layer vision tower")
        return layer % n

    @torch.no_grad()
    def attention(self, layer: int) -> torch.Tensor:
        layer = self._layer(layer)
        return _layer_attention(self._layers[layer], self._hidden[layer])

    def received_attention(self, layer: int) -> torch.Tensor:
        attn = self.attention(layer)  # (N, P, P)
        return (attn.mean(dim=1) * self._layers[self._layer(layer)].self_attn.num_heads).float()

    def pixels(self) -> torch.Tensor:
        """(N, 3, H, W) float32: the views' 8-bit values (SigLIP's normalisation undone, rounded)."""
        return ((self._pixels.to(torch.float64) * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.float32)

    def _none(self, *args: Any) -> torch.Tensor:
        raise NotImplementedError("LLaVA-OneVision's SigLIP tower has no CLS token")

    cls_attention = hidden = project = keys = _none


class LlavaOnevisionForReduction(ReducibleLM, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision (transformers' modules) with optional visual-token reduction, chosen per call; the forward
    and ``generate`` are the shared ones (:class:`~llava.model.reducible.ReducibleLM`).

    ``generate(input_ids, images=views, image_sizes=sizes, reducer=make_method("pio", budget=64))``: ``views``
    is a list of per-image ``(V_i, 3, 384, 384)`` tensors (base view first; ``V_i = 1`` for a single view) or
    transformers' processor output ``pixel_values`` ``(N, max V, 3, 384, 384)`` with ``batch_num_images``;
    ``sizes`` ``(N, 2)`` the images' ``(height, width)``. It returns the new tokens only. Videos:
    ``generate(input_ids, images=OnevisionVideos(...))`` or transformers' ``pixel_values_videos``.
    """

    image_aliases = {"pixel_values": "images"}
    prepare_text_only = True  # a prompt's image marks without images are refused, not embedded

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        images: Any | None = None,
        image_sizes: Any | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        reducer: Any = None,
        prune_state: PruneState | None = None,
        rope_deltas: torch.Tensor | None = None,
        mm_positions: torch.Tensor | None = None,
        batch_num_images: Any = None,
        **kwargs: Any,
    ):
        """:meth:`ReducibleLM.forward`; transformers' ``pixel_values`` (with ``batch_num_images``) are split into
        per-image views first; its ``pixel_values_videos`` (or :class:`OnevisionVideos` as ``images``) are videos
        (``image_sizes_videos`` is accepted and not needed: every frame is one view). The parameters are spelled out
        because transformers' generate checks its keyword arguments against this signature."""
        kwargs = self._views_kwargs(batch_num_images, {**kwargs, "images": images, "image_sizes": image_sizes})
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=return_dict, cache_position=cache_position,
            logits_to_keep=logits_to_keep, reducer=reducer, prune_state=prune_state, rope_deltas=rope_deltas,
            mm_positions=mm_positions, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, batch_num_images: Any = None, **kwargs: Any):
        """:meth:`ReducibleLM.generate` (images as in :meth:`forward`)."""
        return super().generate(*args, **self._views_kwargs(batch_num_images, kwargs))

    def _views_kwargs(self, batch_num_images: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        videos = kwargs.pop("pixel_values_videos", None)
        kwargs.pop("image_sizes_videos", None)  # every frame is one view: transformers reads no sizes either
        images, sizes = self._image_arguments(kwargs.pop("images", None), kwargs.pop("image_sizes", None), kwargs)
        if videos is not None:
            if images is not None:
                raise ValueError("pass images or videos to one call, not both (LLaVA-OneVision's prompts mark both "
                                 "with -200 in the original layout)")
            images = OnevisionVideos.of(videos)
        elif images is not None and not isinstance(images, (list, tuple, OnevisionVideos)):
            images = self.split_views(images, sizes, batch_num_images)
        return {**kwargs, "images": images, "image_sizes": sizes}

    # -- the decoder as the prune step sees it ---------------------------------------------------------------
    def decoder_adapter(self) -> LlamaAdapter:
        """Qwen2 layers with 1-D rotary positions, renumbered over the valid tokens, as LLaVA's."""
        text = self.config.text_config
        if getattr(text, "use_sliding_window", False):
            raise ValueError("the language model uses sliding-window attention in some layers; the decoder loop "
                             "gives every layer the same full causal mask (OneVision checkpoints do not use it)")
        return LlamaAdapter(self.model.language_model, self.lm_head)

    def vision_traits(self) -> TowerTraits:
        """The vision tower's capability flags: SigLIP has no CLS token, one patch per token, fixed-size views."""
        return SiglipCrops.traits

    # -- images: views -> features -> one sequence per image ------------------------------------------------
    @property
    def grid_side(self) -> int:
        """Tokens per side of one view: ``image_size // patch_size`` (27 for SigLIP at 384 px, patch 14)."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def _encode(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(N, 3, H, W) views -> (projected features (N, side^2, D), the tower's hidden states: state ``l``
        enters encoder layer ``l``)."""
        tower = self.model.vision_tower
        weight = next(tower.parameters())
        hidden = tower(crops.to(weight.device, weight.dtype), output_hidden_states=True).hidden_states
        layer = self.config.vision_feature_layer
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # a tower with a CLS token (SigLIP has none: strategy "full")
        return self.model.multi_modal_projector(feats), hidden

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) views -> projected features (N, side^2, D): the tower's hidden state at
        ``vision_feature_layer`` (several layers: concatenated), then the projector."""
        return self._encode(crops)[0]

    def layout_image(self, views: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """One image's visual sequence (n, D) from its projected views (V, side^2, D) and its ``(height, width)``."""
        newline = self.model.image_newline.to(views.dtype)
        base = views[0]
        if views.shape[0] == 1:  # a single view: its tokens and one newline
            return torch.cat([base, newline[None]])
        side, D = self.grid_side, views.shape[-1]
        rows, cols = grid_shape(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        if views.shape[0] - 1 != rows * cols:
            raise ValueError(f"an image of {tuple(int(v) for v in image_size)} (height, width) takes a {rows} x {cols} "
                             f"grid of crops, but it has {views.shape[0] - 1} besides the base view: preprocess it "
                             "with the checkpoint's image processor (same image_grid_pinpoints)")
        # (rows, cols, side, side, D) -> (D, rows * side, cols * side), crops tiled in row-major order
        grid = views[1:].view(rows, cols, side, side, D).permute(4, 0, 2, 1, 3).reshape(D, rows * side, cols * side)
        grid = unpad_image(grid, (int(image_size[1]), int(image_size[0])))  # (D, h, w)
        h, w = grid.shape[1:]
        shape = anyres_max_shape(h, w, side, anyres_max_patches(self.config.vision_aspect_ratio))
        if shape != (h, w):
            grid = nn.functional.interpolate(grid[None], size=list(shape), mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(D, shape[0], 1)], dim=2)  # (D, h', w' + 1)
        return torch.cat([base, grid.flatten(1).transpose(0, 1)])

    def split_views(self, images: torch.Tensor, image_sizes: Any, batch_num_images: Any = None) -> list[torch.Tensor]:
        """Per image, its (V, 3, H, W) views from transformers' processor output ((N, max V, 3, H, W) padded, or
        (sum V, 3, H, W)), whose counts follow from ``image_sizes`` and ``batch_num_images`` (a question with
        several images: one view each)."""
        if image_sizes is None:
            raise ValueError("images without image_sizes: pass each image's (height, width), as the processor returns")
        n_images = len(image_sizes)
        single = [False] * n_images
        if batch_num_images is not None:
            per_question = [int(n) for n in batch_num_images]
            if sum(per_question) != n_images:
                raise ValueError(f"batch_num_images {per_question} counts {sum(per_question)} images, image_sizes "
                                 f"{n_images}")
            single = [n > 1 for n in per_question for _ in range(n)]
        crop = self.config.vision_config.image_size
        counts = [1 if one else 1 + math.prod(grid_shape(size, self.config.image_grid_pinpoints, crop))
                  for size, one in zip(image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes, single,
                                       strict=True)]
        if images.dim() == 5:
            return [im[:n] for im, n in zip(images, counts, strict=True)]
        if images.dim() == 4 and images.shape[0] == sum(counts):
            return list(images.split(counts))
        raise ValueError(f"pixel values of shape {tuple(images.shape)} do not hold the {sum(counts)} views the "
                         f"{n_images} image sizes call for")

    def image_features(self, images: Sequence[torch.Tensor], image_sizes: Any, pre: EncoderMethod | None = None,
                       state: PruneState | None = None) -> tuple[list[torch.Tensor], list[EncoderRecord] | None]:
        """One (n_i, D) visual sequence per image (``images``: per-image (V, 3, H, W) views), and with an
        encoder-side method ``pre`` where each of its tokens sits in the unreduced sequence.

        ``pre`` selects per view (base view, grid crops, single views) and the kept patches are laid out through
        :func:`onevision_image_layout` (newlines kept). An image whose grid ``anyres_max_N`` shrinks is refused:
        there every token mixes several crop patches, so a per-patch selection does not apply to it.
        """
        views = [im[None] if im.dim() == 3 else im for im in images]
        counts = [v.shape[0] for v in views]
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        if sizes is None or len(sizes) != len(views):
            raise ValueError(f"{len(views)} images need {len(views)} image sizes (height, width), got "
                             f"{0 if sizes is None else len(sizes)}")
        pixels = torch.cat(views)
        feats, hidden = self._encode(pixels)
        if state is not None:
            state.vision_crops = sum(counts)
        if pre is None:
            return [self.layout_image(f, size) for f, size in zip(feats.split(counts), sizes, strict=True)], None
        check_tower(pre, self.vision_traits())
        layouts = []
        for n, size in zip(counts, sizes, strict=True):
            layout, resized = onevision_image_layout(self.config, n, size)
            if resized:
                raise ValueError(f"{pre.name}: an image of {size[1]}x{size[0]} has its grid shrunk by "
                                 f"{self.config.vision_aspect_ratio}, whose tokens mix several crop patches; "
                                 "encoder-side methods on LLaVA-OneVision need a grid of at most 1.21 x "
                                 f"{anyres_max_patches(self.config.vision_aspect_ratio)} crops (use an in-LLM method)")
            layouts.append(layout)
        tower = SiglipCrops(self.model.vision_tower, hidden, pixels, self.grid_side)
        ids = [(i, j) for i, n in enumerate(counts) for j in range(n)]
        reduced: list[ReducedCrop] = reduce_crops(pre, tower, feats, ids, state)
        out, records, offset = [], [], 0
        newline = self.model.image_newline
        for layout, n in zip(layouts, counts, strict=True):
            n_fill = int((layout.source < 0).sum())
            seq, record = apply_kept(layout, reduced[offset:offset + n], newline[None].expand(n_fill, -1))
            out.append(seq)
            records.append(record)
            offset += n
        if state is not None:
            state.encoder_images = records
        return out, records

    # -- videos: frames -> pooled features -> one sequence per video ---------------------------------------
    def video_features(self, videos: OnevisionVideos, state: PruneState | None = None) -> list[torch.Tensor]:
        """One (F_i x grid^2 + 1, D) visual sequence per video: every frame through the tower and the projector,
        its map pooled bilinearly to :func:`video_frame_grid` a side (transformers' ``get_video_features``, all
        videos' frames in one call), the frames in time order, then one ``image_newline``."""
        tower = next(self.model.vision_tower.parameters())
        counts = [v.shape[0] for v in videos.frames]
        frames = torch.cat(videos.frames).to(tower.device, tower.dtype)  # (sum F, 3, S, S)
        pooled = self.model.get_video_features(frames[None], self.config.vision_feature_layer,
                                               self.config.vision_feature_select_strategy)[0]  # (sum F * g^2, D)
        if state is not None:
            state.vision_crops = sum(counts)
        per_frame = video_frame_grid(self.config) ** 2
        newline = self.model.image_newline.to(pooled.dtype)[None]
        return [torch.cat([v, newline]) for v in pooled.split([n * per_frame for n in counts])]

    # -- splicing ------------------------------------------------------------------------------------------
    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: Any | None,
        image_sizes: Any | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        pre: EncoderMethod | None = None,
        state: PruneState | None = None,
    ) -> MultimodalInputs:
        """Every image's or video's visual sequence in place of its mark
        (:func:`~llava.model.reducible.splice_visual`), the batch re-padded on ``padding_side`` (default: the side
        ``attention_mask`` is padded on, else right), each image's or video's span recorded; ``pre`` (an
        encoder-side method) reduces each image's views first (:meth:`image_features`) and refuses videos.

        A mark is ``-200`` (one per image or video, the original checkpoints' prompts) or a run of
        ``config.image_token_id`` / ``config.video_token_id`` (one per visual token, as the converted checkpoints'
        processor expands ``<image>`` / ``<video>``; with ``pre`` an image's run is the unreduced count and gives
        way to the kept tokens); images or videos are taken in order over the batch. ``images``: per-image views
        (or the processor's ``pixel_values``, split by :meth:`split_views`), or :class:`OnevisionVideos` (one call
        holds images or videos). Returns :class:`~llava.model.reducible.MultimodalInputs` with 1-D
        ``position_ids`` (B, S) contiguous over the valid tokens.
        """
        embed = self.get_input_embeddings()
        input_ids = input_ids.to(embed.weight.device)
        valid = (attention_mask.to(input_ids.device).bool() if attention_mask is not None
                 else torch.ones_like(input_ids, dtype=torch.bool))
        side = padding_side or ("left" if bool((~valid[:, 0]).any()) else "right")
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        image_marks = ((input_ids == IMAGE_TOKEN_INDEX) | (input_ids == image_id)) & valid
        video_marks = (input_ids == video_id) & valid
        videos = images if isinstance(images, OnevisionVideos) else None
        feats: list[torch.Tensor] = []
        records: list[EncoderRecord] | None = None
        if videos is not None:
            if pre is not None:
                raise ValueError(f"{pre.name} is an encoder-side method, which runs on LLaVA-OneVision's images "
                                 "only; for videos use a method inside the language model (e.g. pio, fastv)")
            if image_id != IMAGE_TOKEN_INDEX and bool((input_ids == image_id).any()):
                raise ValueError("the prompts mark images (<image>) but videos were given; pass images or videos "
                                 "to one call, not both")
            if not bool((image_marks | video_marks).any()):
                raise ValueError(f"{len(videos.frames)} video(s) given but the prompts have no <video> mark")
            feats = self.video_features(videos, state)
        elif bool(video_marks.any()):
            raise ValueError("the prompts mark a video (<video>) but no videos were given (pass pixel_values_videos "
                             "or the family's encode_video inputs)")
        elif bool(image_marks.any()):
            if images is None:
                raise ValueError("the prompts mark images (<image> or the -200 placeholder) but no images were given")
            if not isinstance(images, (list, tuple)):
                images = self.split_views(images, image_sizes)
            feats, records = self.image_features(images, image_sizes, pre, state)
        elif images is not None:
            raise ValueError(f"{len(image_sizes) if image_sizes is not None else 'some'} image(s) given but the "
                             "prompts have no <image> mark")
        return splice_visual(embed, input_ids, attention_mask, feats, side=side, marks=image_marks | video_marks,
                             marked=[r.n for r in records] if records is not None else None, records=records,
                             labels=labels, max_length=self.config.text_config.max_position_embeddings,
                             what="video" if videos is not None else "image")
