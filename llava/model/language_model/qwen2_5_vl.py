"""Qwen2.5-VL with visual-token reduction: transformers' modules and weights, our forward and decoder loop.

:class:`Qwen2_5_VLForReduction` subclasses transformers' ``Qwen2_5_VLForConditionalGeneration`` without
touching its modules: the vision transformer, the merger, the decoder layers, rotary embedding, norm and head
are transformers' own, so the official checkpoint loads unchanged. Ours are the forward (the shared decoder
loop of :mod:`llava.model.pruning`, with the prune step after the layers a method acts at), the splicing of the
image and video features into the text (where an encoder-side method may drop some image tokens); the forward and
``generate`` are the ones every family shares (:class:`~llava.model.reducible.ReducibleLM`).

Positions are Qwen's 3-D M-RoPE ids (temporal, height, width; transformers' ``get_rope_index``). A pruned
token keeps its original ids (the PIO authors' choice; ``--positions renumber`` gives the kept tokens
contiguous 1-D ids instead), and decoding continues from the unpruned sequence's next position, so a pruned
run generates at the positions an unpruned one would. The per-call state (positions, rope deltas, what was
kept) lives in the call's :class:`pio.PruneState` and the generation kwargs, never on the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.constants import IGNORE_INDEX
from pio.encoder import EncoderMethod, TowerTraits
from pio.gather import Span, build_keep_index, contiguous_positions, gather_rows
from pio.state import PruneState

from ..encoder_stage import apply_kept, check_tower, reduce_crops
from ..layout import ImageLayout
from ..pruning import DecoderAdapter, Segment
from ..reducible import MultimodalInputs, ReducibleLM

__all__ = ["Qwen2_5_VLForReduction", "QwenAdapter", "QwenImageTower", "QwenVisual", "mrope_merge"]

VIDEO_KWARGS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class QwenVisual:
    """Qwen2.5-VL's visual inputs of one call, images and videos, under transformers' names; what a runner passes
    as ``images`` when a prompt holds a video (``to(device, dtype)`` moves it like a pixel tensor).

    Attributes:
        pixel_values: (sum of t*h*w over images, C*2*14*14) or None; image_grid_thw: (n_images, 3) long.
        pixel_values_videos: (sum of t*h*w over videos, C*2*14*14) or None; video_grid_thw: (n_videos, 3) long,
            ``t`` temporal patches of 2 frames each; second_per_grid_ts: (n_videos,) seconds per temporal patch
            (None: 1.0, as transformers).
    """

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> QwenVisual:
        """Pixels to ``device`` and ``dtype``; grids and times to ``device`` only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            pixels = f.name.startswith("pixel_values")
            out[f.name] = None if v is None else v.to(device, dtype) if pixels and dtype is not None else v.to(device)
        return QwenVisual(**out)

    @property
    def has_video(self) -> bool:
        return self.pixel_values_videos is not None

    @classmethod
    def join(cls, parts: Sequence[QwenVisual]) -> QwenVisual:
        """Several questions' visual inputs as one call's (a batch), in order; a video without
        ``second_per_grid_ts`` gets transformers' default 1.0."""
        out = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "second_per_grid_ts" and any(v is not None for v in values):
                values = [torch.ones(len(p.video_grid_thw)) if v is None and p.video_grid_thw is not None else v
                          for v, p in zip(values, parts, strict=True)]
            present = [v for v in values if v is not None]
            out[f.name] = torch.cat(present) if present else None
        return cls(**out)


def mrope_merge(x: torch.Tensor, sections: Sequence[int]) -> torch.Tensor:
    """(3, B, q, hd) rotary cos or sin of the three position axes -> (B, q, hd): M-RoPE takes the rotary
    channels in consecutive sections of ``sections`` (temporal, height, width, repeated for the second half of
    the head), each from its own axis. The result rotates queries and keys like a 1-D rotary embedding."""
    axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(list(sections) * 2)])
    if axis.numel() != x.shape[-1]:
        raise ValueError(f"mrope_section {list(sections)} covers {axis.numel()} rotary channels, the head has "
                         f"{x.shape[-1]}")
    index = axis.to(x.device).view(1, 1, 1, -1).expand(1, *x.shape[1:])
    return x.gather(0, index)[0]


class QwenAdapter(DecoderAdapter):
    """Qwen2.5-VL's language model: M-RoPE positions (3, B, q), kept tokens keep theirs."""

    def __init__(self, text_model: Any, head: torch.nn.Module | None):
        self.layers, self.norm, self.head, self._rotary = text_model.layers, text_model.norm, head, text_model.rotary_emb
        self.sections = text_model.config.rope_scaling["mrope_section"]
        self.attn_implementation = text_model.config._attn_implementation

    def positions(self, key_mask: torch.Tensor, q: int) -> torch.Tensor:
        return self.expand_positions(contiguous_positions(key_mask)[:, key_mask.shape[1] - q:])

    def expand_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None].expand(3, -1, -1)  # (B, q) -> the same id on the three M-RoPE axes (3, B, q)

    def gather_positions(self, position_ids: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return torch.gather(position_ids, 2, origin[None].expand(3, -1, -1))

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rotary(h, position_ids)
        return mrope_merge(cos, self.sections), mrope_merge(sin, self.sections)

    def layer_kwargs(self, seg: Segment) -> dict[str, Any]:
        # the layers take the three axes' (cos, sin) and pick the sections themselves; the merged ones, seen
        # on every axis, give the same rotation. No position_ids: transformers passes them only for packed
        # FlashAttention inputs.
        cos, sin = seg.position_embeddings
        return {"attention_mask": seg.attention_mask, "cache_position": seg.cache_position,
                "position_embeddings": (cos.expand(3, *cos.shape), sin.expand(3, *sin.shape))}


def visual_spans(is_visual: torch.Tensor) -> list[list[Span]]:
    """Per row of ``is_visual`` (B, S) bool, the (start, length) of each run of visual tokens (one per image)."""
    out = []
    for row in is_visual.bool():
        padded = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int()
        edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
        out.append([(a, b - a) for a, b in zip(edges[::2], edges[1::2], strict=True)])
    return out


def next_positions(position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1): one more than the largest position id of each row's valid tokens (where decoding continues)."""
    valid = mask.bool()[None].expand_as(position_ids)
    return position_ids.masked_fill(~valid, -1).amax(dim=(0, 2)).add(1)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def received_attention(block: Any, h: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], rows: int = 1024) -> torch.Tensor:
    """(S,) float32: the softmax attention each position of ``h`` (S, C), a vision block's input, receives in
    that block, summed over heads and averaged over the query rows of its attention group (``cu_seqlens``: the
    groups' boundaries, e.g. one per image in a full-attention block). Recomputed from the block's own queries
    and keys, ``rows`` query rows at a time, so the model's attention backend is untouched."""
    attn = block.attn
    S = h.shape[0]
    q, k, _ = attn.qkv(block.norm1(h)).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = (t.float()[:, None] for t in position_embeddings)
    q = q.float() * cos + _rotate_half(q.float()) * sin  # (S, H, hd)
    k = k.float() * cos + _rotate_half(k.float()) * sin
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(S, dtype=torch.float32, device=h.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        keys = k[a:b].transpose(0, 1)  # (H, n, hd)
        total = torch.zeros(b - a, dtype=torch.float32, device=h.device)
        for r in range(a, b, rows):
            queries = q[r:min(r + rows, b)].transpose(0, 1)  # (H, c, hd)
            total += ((queries @ keys.transpose(1, 2)) * scale).softmax(dim=-1).sum(dim=(0, 1))
        out[a:b] = total / (b - a)
    return out


class _VisionMaps:
    """The attention each image's merged tokens receive at the vision blocks an encoder-side method asks for,
    from the block inputs caught while the vision transformer ran (per call; nothing stays on the model)."""

    def __init__(self, visual: Any, grid_thw: torch.Tensor):
        self.visual, self.grid_thw = visual, grid_thw
        self.inputs: dict[int, tuple] = {}
        self._maps: dict[int, list[torch.Tensor]] = {}

    def catch(self):
        def hook(index):
            def pre(module, args, kwargs):
                self.inputs[index] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                                      kwargs["position_embeddings"])
            return pre
        return [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(self.visual.blocks)]

    def __call__(self, image: int, layer: int) -> torch.Tensor:
        layer = layer % len(self.visual.blocks)
        if layer not in self._maps:
            h, cu, pe = self.inputs[layer]
            per_patch = received_attention(self.visual.blocks[layer], h, cu, pe)  # the ViT's window order
            unit = self.visual.spatial_merge_unit
            window_index, _ = self.visual.get_window_index(self.grid_thw)
            merged = per_patch.view(-1, unit).mean(dim=1)[torch.argsort(window_index.to(h.device))]  # raster
            sizes = (self.grid_thw.prod(-1) // unit).tolist()
            self._maps[layer] = list(merged.split(sizes))
        return self._maps[layer][image]


class QwenImageTower:
    """Qwen2.5-VL's vision transformer over one image, as the encoder-side step reads it
    (:class:`llava.model.encoder_stage.EncoderTower`): no CLS token, ``spatial_merge_unit`` patches per
    language-model token, one grid per image; it serves the attention each merged token receives."""

    provides = frozenset({"features", "received_attention"})

    def __init__(self, visual: Any, grid: tuple[int, int], image: int, maps: _VisionMaps | None):
        self.traits = TowerTraits(cls_token=False, patches_per_token=int(visual.spatial_merge_unit), per_crop=False)
        self.grid = grid
        self.full_attention_layers = tuple(visual.fullatt_block_indexes)
        self.sequence_length = grid[0] * grid[1] * self.traits.patches_per_token
        self._maps, self._image = maps, image
        if maps is None:
            self.provides = frozenset({"features"})

    def received_attention(self, layer: int) -> torch.Tensor:
        return self._maps(self._image, layer)[None]  # (1, P)

    def _none(self, *args: Any) -> torch.Tensor:
        raise NotImplementedError("Qwen2.5-VL's vision tower serves the features and the received attention")

    cls_attention = hidden = project = keys = attention = pixels = _none


class Qwen2_5_VLForReduction(ReducibleLM, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL (transformers' modules) with optional visual-token reduction, chosen per call.

    ``generate(input_ids, images=pixel_values, image_sizes=image_grid_thw, reducer=make_method("pio",
    budget=64))`` takes the processor's outputs under the names every runner of this codebase passes (and
    ``pixel_values`` / ``image_grid_thw`` as well); it returns the new tokens only.
    """

    image_aliases = {"pixel_values": "images", "image_grid_thw": "image_sizes"}
    prepare_text_only = True  # M-RoPE positions and the image-token check come from the whole prompt

    def _image_arguments(self, images: Any, image_sizes: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``images`` / ``image_sizes`` as every family takes them, and transformers' video arguments
        (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``, popped from kwargs) gathered with
        them into one :class:`QwenVisual`."""
        images, image_sizes = super()._image_arguments(images, image_sizes, kwargs)
        video = {k: kwargs.pop(k, None) for k in VIDEO_KWARGS}
        if all(v is None for v in video.values()):
            return images, image_sizes
        if isinstance(images, QwenVisual):
            raise ValueError("pass videos either inside a QwenVisual or as pixel_values_videos / video_grid_thw, "
                             "not both")
        return QwenVisual(images, image_sizes, **video), None

    def decoder_adapter(self) -> QwenAdapter:
        """The language model as the prune step sees it (layers, norm, head, M-RoPE, positions)."""
        return QwenAdapter(self.model.language_model, self.lm_head)

    # -- inputs --------------------------------------------------------------------------------------------
    def prepare_multimodal_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: torch.Tensor | None,
        image_sizes: torch.Tensor | None = None, labels: torch.Tensor | None = None, padding_side: str | None = None,
        pre: EncoderMethod | None = None, state: PruneState | None = None,
    ) -> MultimodalInputs:
        """Embeddings with the images' features (``images``: the processor's ``pixel_values``; ``image_sizes``:
        its ``image_grid_thw``; or a :class:`QwenVisual` holding images and/or videos) in place of their
        ``<|image_pad|>`` / ``<|video_pad|>`` tokens, the M-RoPE position ids (3, B, S; a video's temporal ids
        from ``second_per_grid_ts`` as transformers' ``get_rope_index`` computes them) and each image's or
        video's span (a video is one span: all its frames' tokens); an encoder-side method ``pre`` first drops
        (and may merge) each image's tokens, which then leave the sequence with their position ids (and labels);
        on videos it is refused.

        Returns :class:`~llava.model.reducible.MultimodalInputs` with ``position_ids`` (3, B, S) and
        ``rope_deltas`` (B, 1) (the next position minus the sequence length).
        """
        device = self.lm_head.weight.device
        input_ids = input_ids.to(device)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device)
        side = padding_side or _padding_side(mask)
        embeds = self.get_input_embeddings()(input_ids)
        visual = images.to(device) if isinstance(images, QwenVisual) else QwenVisual(images, image_sizes)
        if visual.pixel_values is not None and visual.image_grid_thw is None:
            raise ValueError("pixel_values without image_grid_thw: pass both, as the processor returns them")
        if visual.pixel_values_videos is not None and visual.video_grid_thw is None:
            raise ValueError("pixel_values_videos without video_grid_thw: pass both, as the processor returns them")
        image_grid_thw = visual.image_grid_thw.to(device) if visual.image_grid_thw is not None else None
        video_grid_thw = visual.video_grid_thw.to(device) if visual.video_grid_thw is not None else None
        is_image = input_ids == self.config.image_token_id
        is_video = input_ids == self.config.video_token_id
        maps = None
        if pre is not None and visual.has_video:
            raise ValueError(f"{pre.name} is an encoder-side method, which runs on Qwen2.5-VL's images only; for "
                             "videos use a method inside the language model (e.g. pio, fastv)")
        features: list[torch.Tensor] = []
        if visual.pixel_values is not None:
            if pre is not None:
                check_tower(pre, self.vision_traits())
                if "received_attention" in pre.needs:
                    maps = _VisionMaps(self.model.visual, image_grid_thw)
            hooks = maps.catch() if maps is not None else []
            try:
                features = list(self.model.get_image_features(visual.pixel_values.to(device), image_grid_thw))
            finally:
                for hook in hooks:
                    hook.remove()
        embeds = self._splice(embeds, is_image, features, "image")
        videos: list[torch.Tensor] = []
        if visual.has_video:
            videos = list(self.model.get_video_features(visual.pixel_values_videos.to(device), video_grid_thw))
        embeds = self._splice(embeds, is_video, videos, "video")
        if state is not None:
            grids = [g for g in (image_grid_thw, video_grid_thw) if g is not None]
            state.vision_grids = [list(map(int, g)) for g in torch.cat(grids).tolist()] if grids else []
        times = visual.second_per_grid_ts
        positions, _ = self.model.get_rope_index(input_ids, image_grid_thw, video_grid_thw,
                                                 times.to(device) if times is not None else None, attention_mask=mask)
        spans = visual_spans((is_image | is_video) & mask.bool())
        encoder = None
        if pre is not None and features:
            embeds, mask, positions, labels, spans, encoder = self._reduce_images(
                pre, features, image_grid_thw, maps, embeds, mask, positions, labels, spans, side, state)
        return MultimodalInputs(embeds, mask.long(), positions, labels, spans, side, encoder,
                                next_positions(positions, mask) - mask.shape[1])

    @staticmethod
    def _splice(embeds: torch.Tensor, where: torch.Tensor, features: list[torch.Tensor], what: str) -> torch.Tensor:
        """``embeds`` (B, S, D) with ``features`` (per image or video, (n, D)) in the positions ``where`` (B, S)
        marks, in order; their counts must agree."""
        n_tokens, n_features = int(where.sum()), sum(int(f.shape[0]) for f in features)
        if n_tokens != n_features:
            raise ValueError(f"the prompts hold {n_tokens} {what} tokens but the {what}s give {n_features} features: "
                             f"build prompts and pixels with the same processor call")
        if not features:
            return embeds
        return embeds.masked_scatter(where[..., None].expand_as(embeds), torch.cat(features).to(embeds.dtype))

    def vision_traits(self) -> TowerTraits:
        """The vision tower's capability flags (no CLS token; patches merged into each token; one grid per
        image)."""
        return TowerTraits(cls_token=False, patches_per_token=int(self.model.visual.spatial_merge_unit),
                           per_crop=False)

    def _reduce_images(self, pre: EncoderMethod, features: list[torch.Tensor], image_grid_thw: torch.Tensor,
                       maps: _VisionMaps | None, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                       labels: torch.Tensor | None, spans: list[list[Span]], side: str, state: PruneState | None):
        """Apply the encoder-side method to every image (one crop each) and keep only its kept tokens, with
        their own position ids: the tokens of the spliced sequence are gathered, so a kept token keeps its id."""
        if any(len(s) > 1 for s in spans):
            raise ValueError("encoder-side reduction on Qwen2.5-VL handles one image per sample")
        visual = self.model.visual
        m = visual.spatial_merge_size
        grids = [(int(h) // m, int(w) // m) for _, h, w in image_grid_thw.tolist()]
        images = iter(range(len(features)))
        keep_local, records, kept_rows = [], [], []
        for s in spans:
            if not s:
                keep_local.append(None)
                records.append([])
                kept_rows.append(None)
                continue
            i = next(images)
            f = features[i]
            tower = QwenImageTower(visual, grids[i], i, maps)
            (crop,) = reduce_crops(pre, tower, f[None], [(i, 0)], state)
            rows, record = apply_kept(ImageLayout(torch.arange(f.shape[0]), f.shape[0]), [crop])
            if min(record.kept) < 0:
                raise ValueError(f"{pre.name} adds tokens of its own, which this model family cannot place (they "
                                 "would need position ids of their own)")
            keep_local.append(torch.tensor(record.kept, dtype=torch.long, device=embeds.device))
            records.append([record])
            kept_rows.append(rows)
        keep = build_keep_index(mask.bool(), [s[0] if s else None for s in spans], keep_local, side)
        embeds = gather_rows(embeds, keep)
        for b, (sp, rows) in enumerate(zip(keep.spans, kept_rows, strict=True)):  # the kept (merged) features
            if sp is not None:
                embeds[b, sp[0]:sp[0] + sp[1]] = rows.to(embeds.dtype)
        positions = torch.stack([gather_rows(p, keep, fill=1) for p in positions])
        if labels is not None:
            labels = gather_rows(labels.to(embeds.device), keep, fill=IGNORE_INDEX)
        new_spans = [[sp] if sp is not None else [] for sp in keep.spans]
        return embeds, keep.mask.long(), positions, labels, new_spans, records


def _padding_side(mask: torch.Tensor) -> str:
    """``"left"`` when some row is padded at its start, else ``"right"``."""
    return "left" if bool((mask[:, 0] == 0).any()) else "right"
