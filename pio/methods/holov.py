"""HoloV (Zou et al., NeurIPS'25, arXiv 2510.02912): a holistic allocation of the budget over spatial crops.

Facts (official code, obananas/HoloV ``HoloV()`` in ``llava/model/utils.py``, called from ``llava_arch.py``;
docs/methods.md §HoloV), per image:

* the raster-ordered tokens are cut into ``num_patches`` consecutive chunks (sizes ``N // P``, one more for the
  first ``N % P``): bands of rows, not 2-D windows (HoloV issue #13);
* token score in a chunk: ``1000 a + alpha * lambda * v`` with ``a`` the CLS attention of encoder layer -2
  (heads averaged), ``v`` the spread of the token's cosine similarities (projected features) to the chunk's
  others (the zeroed self-similarity included in the sum), ``lambda = mean|1000 a| / (mean|v| + 1e-6)`` and
  ``alpha = 0.09``; a chunk's score is the mean of its tokens' (the plain mean attention for a single token);
* the budget ``K`` is split by the chunks' shares of the summed scores, floored; the remainder goes one token each to
  the chunks with the largest shares; a chunk keeps its top tokens by raw attention (all of it when its share is at
  least its size: the excess is lost).

Budgets: ``K`` = the budget, ``num_patches`` 16 at 64 (the code); for other budgets the authors' own rule from
their Qwen code, ``max(1, int(1024 / 576 * N / K))``: 8 at 128, 5 at 192. Differences: kept tokens in raster order
(the code orders a chunk's picks by attention) and no zero padding when a chunk overflows; per crop on LLaVA-NeXT
(the code runs once over the base view and the unpadded grid); float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Flag
from ..encoder import EncoderInputs, EncoderMethod, EncoderSelection
from ..nms import stable_rank, work_dtype


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` of ``chunks`` pieces of ``n`` tokens; the first ``n % chunks`` one longer."""
    base, rem = divmod(n, chunks)
    out, start = [], 0
    for p in range(chunks):
        size = base + (1 if p < rem else 0)
        if size:
            out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class HoloV(EncoderMethod):
    """HoloV: the budget split over spatial chunks by their attention and diversity, then top tokens per chunk."""

    name = "holov"
    needs = frozenset({"features", "cls_attention"})
    source = "HoloV, NeurIPS'25, arXiv 2510.02912; github.com/obananas/HoloV (docs/methods.md)"
    flags = (
        Flag("num_patches", "holov-num-patches", int, "spatial chunks per crop (default: 16 at 64 tokens)"),
        Flag("alpha", "holov-alpha", float, "weight of the similarity spread (0.09)"),
    )

    tokens: int
    num_patches: int | None = None
    alpha: float = 0.09
    layer: int = -2

    def chunks(self, n: int, target: int) -> int:
        return self.num_patches if self.num_patches is not None else max(1, int(1024 / 576 * n / target))

    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        feats = inputs.features
        P = feats.shape[1]
        target = inputs.targets[0]
        device = feats.device
        work = work_dtype(feats)
        attn = inputs.cls_attention(self.layer).mean(dim=1).to(work)  # (N, P)
        bounds = chunk_bounds(P, self.chunks(P, target))
        keep = []
        with inputs.timed("holov"):
            for c in range(feats.shape[0]):
                scores = torch.stack([self._chunk_score(feats[c, a:b].to(work), attn[c, a:b]) for a, b in bounds])
                share = scores / (scores.sum() + 1e-6)
                alloc = torch.floor(share * target).long()
                order, _ = stable_rank(share)
                alloc[order[: target - int(alloc.sum())]] += 1
                picks = []
                for (a, b), k in zip(bounds, alloc.tolist()):
                    if k >= b - a:
                        picks.append(torch.arange(a, b, device=device))
                    elif k > 0:
                        picks.append(a + stable_rank(attn[c, a:b])[0][:k])
                keep.append(torch.sort(torch.cat(picks)).values)
        return EncoderSelection(keep)

    def _chunk_score(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        n = f.shape[0]
        if n <= 1:
            return a.mean()
        g = f / (f.norm(dim=-1, keepdim=True) + 1e-6)
        S = (g @ g.T) * (1 - torch.eye(n, dtype=f.dtype, device=f.device))
        mu = S.sum(dim=1) / (n - 1)
        v = ((S - mu[:, None]) ** 2).sum(dim=1) / (n - 1)
        A = 1000 * a
        lam = A.abs().mean() / (v.abs().mean() + 1e-6)
        return (A + self.alpha * lam * v).mean()
