"""Vision tower + projector + multimodal input preparation (LLaVA-1.5 ``pad`` and LLaVA-NeXT ``anyres``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
from pio.gather import Span, contiguous_positions

from .multimodal_encoder.clip_encoder import CLIPVisionTower, build_vision_tower
from .multimodal_projector.builder import build_vision_projector

logger = logging.getLogger(__name__)



@dataclass
class MultimodalInputs:
    """A padded batch with images spliced in.

    Attributes:
        inputs_embeds: (B, S, D).
        attention_mask: (B, S) long, 1 for real tokens.
        position_ids: (B, S) long, 0.. over the real tokens (padding gets 1).
        labels: (B, S) or None; image and padding positions are IGNORE_INDEX.
        spans: per sample, the (start, length) of each image's features in the padded sequence.
        padding_side: side the batch was padded on.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    spans: list[list[Span]]
    padding_side: str


class LlavaMetaModel:
    """Mixin for the base model: owns ``vision_tower``, ``mm_projector`` and ``image_newline``."""

    def __init__(self, config: Any):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", "flat"):
                # loaded from the checkpoint; initialised only so a fresh model holds no garbage
                self.image_newline = nn.Parameter(torch.randn(config.hidden_size) / config.hidden_size**0.5)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return getattr(self, "vision_tower", None)


def _as_crops(images: Any) -> list[torch.Tensor]:
    """Normalise ``images`` to one (P, 3, H, W) tensor per image."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return [im[None] for im in images]
        if images.dim() == 5:
            return list(images)
        raise ValueError(f"images must be (N, 3, H, W), (N, P, 3, H, W) or a list, got shape {tuple(images.shape)}")
    out = []
    for im in images:
        out.append(im[None] if im.dim() == 3 else im)
    return out


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: encodes images and splices them into the token embeddings."""

    def get_model(self) -> Any:
        return self.model

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> projected features (N, P, D)."""
        feats = self.get_vision_tower()(images)
        proj = self.get_model().mm_projector
        dtype = next(proj.parameters(), feats).dtype
        return proj(feats.to(dtype))

    def image_features(self, images: Any, image_sizes: Any | None) -> list[torch.Tensor]:
        """One (n_i, D) feature sequence per image, following ``mm_patch_merge_type``."""
        crops = _as_crops(images)
        counts = [c.shape[0] for c in crops]
        feats = self.encode_images(torch.cat(crops, dim=0)).split(counts, dim=0)  # each (P_i, 576, D)
        cfg = self.config
        merge = getattr(cfg, "mm_patch_merge_type", "flat")
        if merge == "flat":
            return [f.flatten(0, 1) for f in feats]
        if not merge.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type {merge!r}; allowed: flat, spatial, spatial_unpad")
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        out = []
        for i, f in enumerate(feats):
            if f.shape[0] == 1:  # a single view: nothing to tile
                base = f[0]
                if "unpad" in merge:
                    base = torch.cat([base, self.get_model().image_newline[None].to(base)], dim=0)
                out.append(base)
                continue
            if image_sizes is None or i >= len(image_sizes):
                raise ValueError("LLaVA-NeXT (anyres) images need image_sizes=[(width, height), ...] per image")
            w, h = image_sizes[i]
            gw, gh = get_anyres_image_grid_shape((w, h), cfg.image_grid_pinpoints, tower.config.image_size)
            grid = f[1:].view(gh, gw, side, side, -1)  # (gh, gw, side, side, D)
            if "unpad" in merge:
                grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, gh*side, gw*side)
                grid = unpad_image(grid, (w, h))
                nl = self.get_model().image_newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid)
                grid = torch.cat([grid, nl], dim=2).flatten(1, 2).transpose(0, 1)  # (rows*(cols+1), D)
            else:
                grid = grid.permute(0, 2, 1, 3, 4).flatten(0, 3)
            out.append(torch.cat([f[0], grid], dim=0))
        return out

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: Any | None,
        image_sizes: Any | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> MultimodalInputs:
        """Replace every ``IMAGE_TOKEN_INDEX`` placeholder by its image's features and pad the batch."""
        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        embed = self.get_model().embed_tokens
        device = embed.weight.device  # inputs may come from the CPU side of a data pipeline
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        labels = labels.to(device) if labels is not None else None
        B = input_ids.shape[0]
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        n_placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        feats: list[torch.Tensor] = []
        if n_placeholders:
            if images is None:
                raise ValueError(f"the prompt has {n_placeholders} <image> placeholder(s) but no images were given")
            feats = self.image_features(images, image_sizes)
            if len(feats) < n_placeholders:
                raise ValueError(f"the prompts have {n_placeholders} <image> placeholders but {len(feats)} images")
        seqs: list[torch.Tensor] = []
        labs: list[torch.Tensor] = []
        spans: list[list[Span]] = []
        next_image = 0
        for b in range(B):
            ids = input_ids[b][valid[b]]
            lab = labels[b][valid[b]] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            bounds = [-1, *where, ids.numel()]
            text = ids.clone()
            text[text == IMAGE_TOKEN_INDEX] = 0
            text_emb = embed(text)
            parts, lparts, sample_spans, length = [], [], [], 0
            for j in range(len(bounds) - 1):
                lo, hi = bounds[j] + 1, bounds[j + 1]
                parts.append(text_emb[lo:hi])
                lparts.append(lab[lo:hi])
                length += hi - lo
                if j < len(where):
                    f = feats[next_image].to(text_emb.dtype)
                    next_image += 1
                    sample_spans.append((length, f.shape[0]))
                    parts.append(f)
                    lparts.append(torch.full((f.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                    length += f.shape[0]
            seqs.append(torch.cat(parts))
            labs.append(torch.cat(lparts))
            spans.append(sample_spans)
        max_len = max(s.shape[0] for s in seqs)
        self._check_length(max_len)
        D = seqs[0].shape[1]
        dev = seqs[0].device
        emb = torch.zeros(B, max_len, D, dtype=seqs[0].dtype, device=dev)
        mask = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        lab_out = torch.full((B, max_len), IGNORE_INDEX, dtype=labs[0].dtype, device=dev)
        for b, s in enumerate(seqs):
            n = s.shape[0]
            lo = max_len - n if side == "left" else 0
            emb[b, lo : lo + n] = s
            mask[b, lo : lo + n] = 1
            lab_out[b, lo : lo + n] = labs[b]
            spans[b] = [(st + lo, ln) for st, ln in spans[b]]
        pos = contiguous_positions(mask)
        return MultimodalInputs(emb, mask, pos, lab_out if labels is not None else None, spans, side)

    def _check_length(self, n: int) -> None:
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and n > limit:
            raise ValueError(
                f"the multimodal sequence has {n} tokens, more than max_position_embeddings={limit}; "
                "shorten the prompt or use fewer/smaller images (nothing is truncated silently)"
            )
        soft = getattr(self.config, "tokenizer_model_max_length", None)
        if soft and n > soft:
            logger.warning("sequence of %d tokens exceeds tokenizer_model_max_length=%d (not truncated)", n, soft)

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        """Upstream LLaVA's 6-tuple interface, for code written against it."""
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        mm = self.prepare_multimodal_inputs(input_ids, attention_mask, images, image_sizes, labels)
        return None, mm.position_ids, mm.attention_mask, past_key_values, mm.inputs_embeds, mm.labels
