"""Apply kept visual-token indices to a padded batch: the one routine every method uses.

A prune keeps, for each sample, all valid text positions and the chosen visual positions, in their original
order, optionally followed inside the visual span by new merged tokens, and re-pads the batch on the same side
as before. :func:`build_keep_index` returns the index of the kept old positions for every new position;
:func:`gather_rows` applies it to any per-position tensor (hidden states, masks, labels, position ids) so they
all stay aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Span = tuple[int, int]  # (start, length) in the current padded sequence


@dataclass
class KeepIndex:
    """Result of :func:`build_keep_index`.

    Attributes:
        index: (B, S') long, old position of every new position (padding slots point at 0); values ``S + j``
            stand for the sample's ``j``-th merged token.
        mask: (B, S') bool, True for real tokens.
        spans: per sample, the new visual span (start, length) or None.
        n_merged: the largest number of merged tokens of a sample (0: none).
    """

    index: torch.Tensor
    mask: torch.Tensor
    spans: list[Span | None]
    n_merged: int = 0


def build_keep_index(
    mask: torch.Tensor,
    spans: Sequence[Span | None],
    keep_local: Sequence[torch.Tensor | None],
    padding_side: str,
    n_merged: Sequence[int] | None = None,
) -> KeepIndex:
    """Positions to keep after one prune.

    Args:
        mask: (B, S) bool, valid tokens of the current sequence.
        spans: per sample (start, length) of its visual span in the current sequence, or None.
        keep_local: per sample, kept indices local to the span (ascending), or None to keep the sample whole.
        padding_side: "left" or "right", the side the batch is padded on (kept after the prune).
        n_merged: per sample the number of merged tokens placed right after its kept visual tokens.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    device = mask.device
    B, S = mask.shape
    rows: list[torch.Tensor] = []
    new_spans: list[Span | None] = []
    valid_all = mask.bool()
    positions = torch.arange(S, device=device)
    for b in range(B):
        span, keep = spans[b], keep_local[b]
        if span is None:
            rows.append(positions[valid_all[b]])
            new_spans.append(None)
            continue
        start, length = span
        before = positions[:start][valid_all[b, :start]]
        after = positions[start + length :][valid_all[b, start + length :]]
        kept = positions[start : start + length] if keep is None else keep.to(device, torch.long) + start
        extra = S + torch.arange(n_merged[b] if n_merged else 0, device=device)
        rows.append(torch.cat([before, kept, extra, after]))
        new_spans.append((before.numel(), kept.numel() + extra.numel()))
    width = max((r.numel() for r in rows), default=0)
    index = torch.zeros(B, width, dtype=torch.long, device=device)
    new_mask = torch.zeros(B, width, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        pad = width - r.numel() if padding_side == "left" else 0
        index[b, pad : pad + r.numel()] = r
        new_mask[b, pad : pad + r.numel()] = True
        if new_spans[b] is not None:
            new_spans[b] = (new_spans[b][0] + pad, new_spans[b][1])
    return KeepIndex(index=index, mask=new_mask, spans=new_spans, n_merged=max(n_merged or [0], default=0))


def gather_rows(x: torch.Tensor, keep: KeepIndex, fill: float | int = 0, merged: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Gather (B, S, ...) ``x`` along dim 1 with ``keep.index``; padding slots get ``fill``.

    ``merged`` (B, M, ...) holds each sample's merged tokens (rows past its own count are unused); without it
    merged positions get ``fill`` too.
    """
    if keep.n_merged:
        if merged is None:
            merged = x.new_full((x.shape[0], keep.n_merged, *x.shape[2:]), fill)
        x = torch.cat([x, merged.to(x.dtype)], dim=1)
    idx = keep.index
    if x.dim() > 2:
        idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    out = torch.gather(x, 1, idx)
    pad = ~keep.mask
    if pad.any():
        out = out.masked_fill(pad.view(*pad.shape, *([1] * (x.dim() - 2))), fill)
    return out


def contiguous_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..n-1 over the valid tokens of each row (padding gets 1, as transformers does)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(~mask.bool(), 1)
