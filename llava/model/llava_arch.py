"""Vision tower + projector + multimodal input preparation (LLaVA-1.5 ``pad`` and LLaVA-NeXT ``anyres``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
from pio.encoder import EncoderMethod
from pio.gather import Span, contiguous_positions
from pio.state import EncoderRecord

from .encoder_stage import ReducedCrop, reduce_crops
from .multimodal_encoder.clip_encoder import CLIPVisionTower, build_vision_tower
from .multimodal_projector.builder import build_vision_projector

logger = logging.getLogger(__name__)



@dataclass
class MultimodalInputs:
    """A padded batch with images spliced in.

    Attributes:
        inputs_embeds: (B, S, D).
        attention_mask: (B, S) long, 1 for real tokens.
        position_ids: (B, S) long, 0.. over the real tokens (padding gets 1); Qwen2.5-VL: its M-RoPE ids (3, B, S).
        labels: (B, S) or None; image and padding positions are IGNORE_INDEX.
        spans: per sample, the (start, length) of each image's features in the padded sequence.
        padding_side: side the batch was padded on.
        encoder: per sample, what an encoder-side reduction did to each image (None: none ran).
        rope_deltas: Qwen2.5-VL: (B, 1) the position where decoding continues minus the sequence length.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    spans: list[list[Span]]
    padding_side: str
    encoder: list[list[EncoderRecord]] | None = None
    rope_deltas: torch.Tensor | None = None


def head_rows(h: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The rows of ``h`` (B, S, D) the LM head reads: the last ``logits_to_keep`` (0: all) or the given indices.

    A slice of a few rows is copied into a compact tensor: bf16 matrix products on CPU take a slow path, 75x
    slower for LLaVA's head and 100x for Qwen2.5-VL's, on a row whose batch stride is the whole sequence's.
    """
    if isinstance(logits_to_keep, int):
        if logits_to_keep == 0 or logits_to_keep >= h.shape[1]:
            return h
        rows = h[:, -logits_to_keep:, :]
    else:
        rows = h[:, logits_to_keep, :]
    return rows.clone(memory_format=torch.contiguous_format) if rows.shape[1] < h.shape[1] else rows


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
        return self._encode(images)[0]

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(N, 3, H, W) -> (projected features (N, P, D), the tower's hidden states)."""
        feats, hidden = self.get_vision_tower().encode(images)
        proj = self.get_model().mm_projector
        dtype = next(proj.parameters(), feats).dtype
        return proj(feats.to(dtype)), hidden

    def image_features(self, images: Any, image_sizes: Any | None, pre: EncoderMethod | None = None,
                       state: Any | None = None) -> list[torch.Tensor]:
        """One (n_i, D) feature sequence per image, following ``mm_patch_merge_type``; ``pre`` (an encoder-side
        method) reduces every crop first (:mod:`llava.model.encoder_stage`). With ``state``, each image's token
        count without the reduction and the positions it kept are recorded (``state.encoder_images``)."""
        crops = _as_crops(images)
        counts = [c.shape[0] for c in crops]
        pixels = torch.cat(crops, dim=0)
        feats, hidden = self._encode(pixels)  # (N, P, D)
        if pre is not None:
            ids = [(i, j) for i, n in enumerate(counts) for j in range(n)]
            reduced = reduce_crops(pre, self.get_vision_tower(), self.get_model().mm_projector, hidden, feats, ids,
                                   state, pixels=pixels)
        else:
            everything = torch.ones(feats.shape[1], dtype=torch.bool, device=feats.device)
            reduced = [ReducedCrop(everything, f) for f in feats]
        out, records = [], []
        offset = 0
        for i, n in enumerate(counts):
            seq, record = self._merge_image(reduced[offset : offset + n], i, image_sizes)
            out.append(seq)
            records.append(record)
            offset += n
        if state is not None:
            state.encoder_images = records
            state.vision_crops = feats.shape[0]
        return out

    def _merge_image(self, crops: list[ReducedCrop], i: int, image_sizes: Any | None
                     ) -> tuple[torch.Tensor, EncoderRecord]:
        """One image's token sequence from its reduced crops, its length without the reduction and where each
        of its tokens sits in the sequence without the reduction (-1: added by the method)."""

        def kept(c: ReducedCrop) -> list[torch.Tensor]:
            return [t for t in (c.lead, c.features[c.mask], c.extra) if t is not None]

        def origin(c: ReducedCrop, offset: int) -> list[int]:
            added = [-1] * (len(c.lead) if c.lead is not None else 0)
            return added + (c.mask.nonzero().flatten() + offset).tolist() + [-1] * (
                len(c.extra) if c.extra is not None else 0)

        cfg = self.config
        merge = getattr(cfg, "mm_patch_merge_type", "flat")
        P = crops[0].mask.numel()
        if merge == "flat":
            return (torch.cat([t for c in crops for t in kept(c)]),
                    EncoderRecord(P * len(crops), [k for j, c in enumerate(crops) for k in origin(c, j * P)]))
        if not merge.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type {merge!r}; allowed: flat, spatial, spatial_unpad")
        newline = self.get_model().image_newline if "unpad" in merge else None
        base, base_origin = kept(crops[0]), origin(crops[0], 0)
        if len(crops) == 1:  # a single view: nothing to tile
            if newline is not None:
                base.append(newline[None].to(base[0]))
                base_origin.append(P)
            return torch.cat(base), EncoderRecord(P + (newline is not None), base_origin)
        if image_sizes is None or i >= len(image_sizes):
            raise ValueError("LLaVA-NeXT (anyres) images need image_sizes=[(width, height), ...] per image")
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        w, h = image_sizes[i]
        gw, gh = get_anyres_image_grid_shape((w, h), cfg.image_grid_pinpoints, tower.config.image_size)
        grid = torch.stack([c.features for c in crops[1:]]).view(gh, gw, side, side, -1)  # (gh, gw, side, side, D)
        mask = torch.stack([c.mask for c in crops[1:]]).view(gh, gw, side, side, 1)
        if newline is not None:
            # (C, gh*side, gw*side), then the rows/columns of the aspect-preserving padding removed
            grid = unpad_image(grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3), (w, h))
            mask = unpad_image(mask.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3), (w, h))
            nl = newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid)
            grid = torch.cat([grid, nl], dim=2).flatten(1, 2).transpose(0, 1)  # (rows*(cols+1), D)
            mask = torch.cat([mask, mask.new_ones(1, mask.shape[1], 1)], dim=2).flatten()  # newlines always kept
        else:
            grid = grid.permute(0, 2, 1, 3, 4).flatten(0, 3)
            mask = mask.permute(0, 2, 1, 3, 4).flatten()
        # the grid crops' own tokens after the tiled grid: their lead tokens, then their extra ones
        extras = [c.lead for c in crops[1:] if c.lead is not None] + [c.extra for c in crops[1:] if c.extra is not None]
        where = base_origin + (mask.nonzero().flatten() + P).tolist() + [-1] * sum(len(e) for e in extras)
        return torch.cat([*base, grid[mask], *extras]), EncoderRecord(P + mask.numel(), where)

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: Any | None,
        image_sizes: Any | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        pre: EncoderMethod | None = None,
        state: Any | None = None,
    ) -> MultimodalInputs:
        """Replace every ``IMAGE_TOKEN_INDEX`` placeholder by its image's features and pad the batch; ``pre``
        reduces each image's crops first (an encoder-side method, recorded in ``state``)."""
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
            feats = self.image_features(images, image_sizes, pre, state)
            if len(feats) < n_placeholders:
                raise ValueError(f"the prompts have {n_placeholders} <image> placeholders but {len(feats)} images")
        seqs: list[torch.Tensor] = []
        labs: list[torch.Tensor] = []
        spans: list[list[Span]] = []
        full = getattr(state, "encoder_images", None) if pre is not None else None
        encoder: list[list[EncoderRecord]] = []
        next_image = 0
        for b in range(B):
            ids = input_ids[b][valid[b]]
            lab = labels[b][valid[b]] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            bounds = [-1, *where, ids.numel()]
            text = ids.clone()
            text[text == IMAGE_TOKEN_INDEX] = 0
            text_emb = embed(text)
            parts, lparts, sample_spans, sample_full, length = [], [], [], [], 0
            for j in range(len(bounds) - 1):
                lo, hi = bounds[j] + 1, bounds[j + 1]
                parts.append(text_emb[lo:hi])
                lparts.append(lab[lo:hi])
                length += hi - lo
                if j < len(where):
                    f = feats[next_image].to(text_emb.dtype)
                    if full is not None:
                        sample_full.append(full[next_image])
                    next_image += 1
                    sample_spans.append((length, f.shape[0]))
                    parts.append(f)
                    lparts.append(torch.full((f.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                    length += f.shape[0]
            seqs.append(torch.cat(parts))
            labs.append(torch.cat(lparts))
            spans.append(sample_spans)
            encoder.append(sample_full)
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
        return MultimodalInputs(emb, mask, pos, lab_out if labels is not None else None, spans, side,
                                encoder if full is not None else None)

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
