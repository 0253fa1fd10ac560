"""SparseVLM (Zhang et al., ICML'25, arXiv 2410.04417), its v1.5 code: text raters, then top-k with recycling.

Facts (official code, Gumpest/SparseVLMs, branch v1.5: ``score.py``, ``modelling_sparse_llama.py``,
``utils.py``; docs/methods.md §SparseVLM):

* Stages after 0-based layers 2, 6, 15 have run in full (``layer_dict``), i.e. after 1-based layers 3, 7, 16,
  each ranking with the softmax attention of that same layer (``which="current"``).
* Text raters, once per prefill from the decoder's input embeddings: ``M = V T^T`` (visual embeddings against
  the embeddings of the text after the image, unscaled), softmax over the text tokens, mean over the visual
  ones; a text token rates when its share exceeds the mean (``1 / T``).
* Score of a visual token: the raters' attention to it, averaged over heads and raters (full softmax over
  every key, read at the visual keys). Keep the top ``min(c_s, n - 1)``; ``c_s`` from the budget's list:
  192 -> 300, 200, 110; 128 -> 303, 110, 36; 96 -> 238, 48, 26; 64 -> 66, 30, 17 (``score.py``).
* Recycling: of the deleted tokens, the ``int(0.3 n_del) + 1`` best by score are clustered into
  ``int(m / 10) + 1`` groups by DPC-kNN on this layer's output hidden states and each group is merged by its
  mean; the merged tokens follow the kept ones and count as visual tokens at later stages. Positions are
  renumbered.

Differences: a sample whose target is at least its span is left whole (the code always deletes one token);
the density-peak clustering has no random tie-break noise (ties by lower index); with no rater above the mean
(all shares equal) every text token rates instead of the code's NaN scores; any batch and padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base import Flag, SampleScores, ScorerMethod, StageInputs
from ..budget import Anchors, same_share_of_depth
from ..nms import stable_rank, topk_indices, work_dtype
from ..schedule import Schedule

ANCHORS = Anchors(
    layers=(3, 7, 16), num_layers=32, n0=576,
    schedules=((64, (66, 30, 17)), (96, (238, 48, 26)), (128, (303, 110, 36)), (192, (300, 200, 110))),
    source="Gumpest/SparseVLMs v1.5, llava/model/language_model/score.py (sparse_token_list_*, RETAIN_TOKN)",
    mode="counts",
)


def text_raters(embeds: torch.Tensor, span: tuple[int, int], text: torch.Tensor) -> torch.Tensor:
    """Rater offsets into ``text`` (positions of the text after the image) from the input ``embeds`` (S0, D)."""
    start, length = span
    work = work_dtype(embeds)
    v = embeds[start : start + length].to(work)
    t = embeds[text].to(work)
    share = (v @ t.T).softmax(dim=-1).mean(dim=0)  # (T,): each text token's share of the visual tokens' mass
    raters = (share > share.mean()).nonzero().flatten()
    return raters if raters.numel() else torch.arange(t.shape[0], device=embeds.device)


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Cluster the rows of ``x`` (m, C) by density peaks (k nearest neighbours, k = ``clusters``) and merge each
    cluster by its mean; returns (clusters, C) in the centres' score order (TCFormer's DPC-kNN as SparseVLM uses
    it: distances over sqrt(C), density ``exp(-mean of the k smallest squared distances)``, centre score density
    times the distance to the nearest denser token, the global largest distance when there is none)."""
    m, C = x.shape
    clusters = min(clusters, m)
    dist = torch.cdist(x, x) / math.sqrt(C)  # (m, m)
    near = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(near**2).mean(dim=-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, dist, dist.max()).amin(dim=-1)
    centres, _ = stable_rank(parent * density)
    centres = centres[:clusters]
    assign = dist[centres].argmin(dim=0)  # (m,): nearest centre of every row
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, C, dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=clusters).to(x.dtype)
    return sums / (counts[:, None] + 1e-6)  # the code divides by the count plus 1e-6


@dataclass(frozen=True)
class SparseVLM(ScorerMethod):
    """SparseVLM v1.5: relevant text tokens rate the visual ones; deleted tokens are partly recycled."""

    name = "sparsevlm"
    needs = frozenset({"hidden", "attention", "embeddings"})
    default_layers = ANCHORS.layers
    family_defaults = {"llava_onevision": {"layers": same_share_of_depth(ANCHORS.layers, 28)}}  # 3, 6, 14
    anchors = ANCHORS
    source = "SparseVLM, ICML'25, arXiv 2410.04417; github.com/Gumpest/SparseVLMs branch v1.5 (docs/methods.md)"
    flags = (
        Flag("recycle", "sparsevlm-no-recycle", None, "drop deleted tokens instead of recycling them", const=False),
        Flag("recycle_ratio", "sparsevlm-recycle-ratio", float, "share of the deleted tokens recycled (0.3)"),
        Flag("cluster_ratio", "sparsevlm-cluster-ratio", float, "merged tokens per recycled token (0.1)"),
    )

    schedule: Schedule
    positions: str = "renumber"
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if not 0.0 <= self.recycle_ratio <= 1.0 or not 0.0 <= self.cluster_ratio <= 1.0:
            raise ValueError(f"sparsevlm: recycle and cluster ratios must be in [0, 1], got {self.recycle_ratio}, "
                             f"{self.cluster_ratio}")

    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """(B, S) the raters' attention (heads averaged, then raters) at every visual position of the active
        samples (zero elsewhere)."""
        embeds, mask0, spans0 = inputs.embeddings()
        mask = inputs.mask.bool()
        positions = torch.arange(mask.shape[1], device=mask.device)
        raters: list[torch.Tensor] = []
        with inputs.timed("raters"):
            for b, span in enumerate(inputs.spans):
                if not active[b]:
                    raters.append(torch.zeros(0, dtype=torch.long, device=mask.device))
                    continue
                s0, n0 = spans0[b]
                valid0 = mask0[b].bool()
                text0 = torch.arange(s0 + n0, valid0.shape[0], device=valid0.device)[valid0[s0 + n0:]]
                after = positions[span[0] + span[1]:][mask[b, span[0] + span[1]:]]  # the same text, now
                if after.numel() == 0:  # nothing follows the image: the last prompt position rates alone
                    raters.append(positions[mask[b]][-1:])
                    continue
                offsets = text_raters(embeds[b], spans0[b], text0)
                raters.append(after[offsets.to(after.device)])
        width = max(r.numel() for r in raters)
        last = mask.shape[1] - 1
        rows = torch.stack([torch.cat([r, r.new_full((width - r.numel(),), last)]) for r in raters])  # (B, R)
        probs = inputs.attention(rows, which="current").mean(dim=1)  # (B, R, S), heads averaged
        scores = probs.new_zeros(probs.shape[0], probs.shape[2])
        with inputs.timed("score"):
            for b, (start, length) in ((b, s) for b, s in enumerate(inputs.spans) if active[b]):
                scores[b, start : start + length] = probs[b, : raters[b].numel(), start : start + length].mean(dim=0)
        return scores

    def choose(self, inputs: StageInputs, sample: SampleScores, prepared: None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The top ``min(target, n - 1)`` (the code always deletes one), then the deleted tokens recycled."""
        kept = topk_indices(sample.scores, min(sample.target, sample.length - 1))
        return kept, self._recycle(sample.span(inputs.hidden), sample.scores, kept)

    def _recycle(self, feats: torch.Tensor, score: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
        """Merged tokens (c, D) from the best-scoring deleted tokens, or None when recycling is off."""
        if not self.recycle:
            return None
        deleted = torch.ones(score.shape[0], dtype=torch.bool, device=score.device)
        deleted[kept] = False
        deleted = deleted.nonzero().flatten()
        m = int(self.recycle_ratio * deleted.numel()) + 1
        order, _ = stable_rank(score[deleted])
        chosen = deleted[order[:m]]
        work = work_dtype(feats)
        merged = dpc_knn_merge(feats[chosen].to(work), int(self.cluster_ratio * m) + 1)
        return merged.to(feats.dtype)
