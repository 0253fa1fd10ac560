"""VFlowOpt (Yang et al., ICCV'25, arXiv 2508.05211): attention + patch-entropy importance, progressive pruning
with token recycling. Two registered parts: ``vflowopt_vit`` (before the LLM) and ``vflowopt`` (in the LLM);
``--method vflowopt_vit+vflowopt`` runs both, as the authors do.

Facts (official code, github.com/sihany077/VFlowOpt, built on iLLaVA; docs/methods.md §VFlowOpt):

ViT stage (``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py``, selection in
``.../language_model/llava_qwen_training_free.py``):

* importance at encoder layer ``illava_vit_k`` (25: the last layer LLaVA-OneVision's SigLIP keeps, the one whose
  output the projector reads): the layer's softmax attention averaged over heads; each token's received
  attention (mean over the query rows); the "global" query rows are those whose token receives more than
  ``t`` times the mean; a token's score is the mean of its column over the global rows;
* patch entropy from the raw pixels: per 14 x 14 patch the grey value ``0.3333 (R + G + B)`` of the 8-bit pixels,
  rounded; the Shannon entropy (bits, ``log2(p + 1e-10)``) of its 256-bin histogram; the score gets
  ``alpha_v * softmax(entropy over the image's patches)`` added;
* selection after the tower on the projected features: ``round(L (1 - r))`` plus ``int(L / m^2)`` lowest-score
  tokens are removed; they are grouped by ``m x m`` grid cells (``floor(row / m), floor(col / m)``); each group
  is recycled into one token, the score-weighted mean (weights normalised to sum 1) of its members, placed at
  the member with the highest score, which stays;
* published strategy (``src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py``
  ``self.illava_config``, 10 %): ``illava_vit_k = [25]``, ``vit_t = 39.265``, ``alpha_v = 0``, ``vit_m = 17.387``,
  ``vit_r = 0.1166``; the 50 % and 25 % strategies there also have ``alpha_v = 0``.

LLM stage (``src/transformers-4.46.0/.../qwen2/modeling_qwen2.py`` ``forward_illava``; README ``illava_llm_k=9-18``,
``illava_llm_r = [1.0, 0.6011]``, each ratio of the current count): iLLaVA's attention path ranks the visual
tokens by the last position's attention in the layer that just ran (heads averaged), keeps the top ones and
recycles the ``r`` removed ones together with the lowest kept one into that token: a weighted mean with weights
``1 .. r + 1`` in descending score order; positions stay the original ones.

Differences (docs/methods.md): per crop on LLaVA-NeXT (the official code ranks the base view and the unpadded
grid together); the exact target per crop (the number removed is the smallest that leaves the target after
recycling; below one token per cell, plain top-target pruning); CLIP's CLS token is one of the rows and columns
of the attention, the scores are read at the patches; the 8-bit pixels are recovered from the processor's
normalisation (the official code multiplies the normalised values by 255); a crop without global rows uses every
row (the official code would average an empty set); the recycled LLM token follows the kept ones instead of
replacing the lowest kept one in place; in the cached evaluation path the official code reuses the ViT scores at
its LLM layers and drops without recycling, which an in-LLM stage cannot see (it scores with the LLM's attention,
as the iLLaVA path does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base import Flag, SampleScores, ScorerMethod, StageInputs
from ..encoder import EncoderInputs, EncoderMethod, EncoderSelection
from ..nms import stable_rank, topk_indices, work_dtype
from ..schedule import Schedule
from .fastv import last_position_scores

GREY = 0.3333  # the official weights of R, G and B


def patch_entropy(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, rows * cols) float32: the Shannon entropy (bits) of each patch's 256-bin histogram of grey values
    ``round(0.3333 (R + G + B))`` of ``pixels`` (N, 3, H, W), 8-bit values 0..255, patches in raster order."""
    N, C, H, W = pixels.shape
    rows, cols = grid
    ph, pw = H // rows, W // cols
    x = pixels.to(torch.float32)[:, :, : rows * ph, : cols * pw]
    grey = (x * GREY).sum(dim=1).round().clamp(0, 255).long()  # (N, H, W)
    patches = grey.view(N, rows, ph, cols, pw).permute(0, 1, 3, 2, 4).reshape(N * rows * cols, ph * pw)
    hist = torch.zeros(patches.shape[0], 256, dtype=torch.float32, device=pixels.device)
    hist.scatter_add_(1, patches, torch.ones_like(patches, dtype=torch.float32))
    p = hist / (ph * pw)
    return (-(p * torch.log2(p + 1e-10)).sum(dim=1)).view(N, rows * cols)


def global_row_scores(attn: torch.Tensor, t: float) -> torch.Tensor:
    """(T,) per key: the mean attention row over the "global" queries, the tokens whose received attention (mean
    over all rows of ``attn`` (T, T)) exceeds ``t`` times its mean; every row if none does."""
    received = attn.mean(dim=0)
    rows = received > t * received.mean()
    if not bool(rows.any()):
        return received
    return attn[rows].mean(dim=0)


def cell_ids(grid: tuple[int, int], m: float, device) -> torch.Tensor:
    """(rows * cols,) the ``m x m`` cell of each patch, raster order."""
    rows, cols = grid
    per_row = math.floor((cols - 1) / m) + 1
    r = torch.div(torch.arange(rows, device=device, dtype=torch.float64), m, rounding_mode="floor").long()
    c = torch.div(torch.arange(cols, device=device, dtype=torch.float64), m, rounding_mode="floor").long()
    return (r[:, None] * per_row + c[None, :]).flatten()


def recycle_by_cells(score: torch.Tensor, feats: torch.Tensor, cells: torch.Tensor, target: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VFlowOpt's ViT-stage selection of one crop: ``(kept indices ascending, their features or None)``.

    The lowest-score tokens (stable: ties keep the lower index) are removed, as few as leave ``target`` tokens
    once each cell's removed ones are recycled into its member with the highest score (score-weighted mean of the
    projected features); when even removing every token leaves more cells than ``target``, the top ``target``
    are kept without recycling."""
    P = score.numel()
    order, rank = stable_rank(score)
    removal = order.flip(0)  # lowest first
    first = torch.zeros(P, dtype=torch.bool, device=score.device)
    seen_cells = cells[removal]
    _, inverse = torch.unique(seen_cells, return_inverse=True)
    first_pos = torch.full((int(inverse.max()) + 1,), P, dtype=torch.long, device=score.device)
    first_pos.scatter_reduce_(0, inverse, torch.arange(P, device=score.device), reduce="amin")
    first[first_pos] = True
    n = torch.arange(1, P + 1, device=score.device)
    left = P - n + torch.cumsum(first.long(), dim=0)  # tokens after removing the lowest n and recycling
    hits = (left == target).nonzero()
    if hits.numel() == 0:
        return topk_indices(score, target), None
    n_removed = int(hits[0]) + 1
    removed = removal[:n_removed]
    group = cells[removed]
    uniq, g = torch.unique(group, return_inverse=True)
    best = torch.full((uniq.numel(),), P, dtype=torch.long, device=score.device)
    best.scatter_reduce_(0, g, rank[removed], reduce="amin")
    reps = order[best]  # each cell's highest-score removed token
    w = score[removed]
    sums = torch.zeros(uniq.numel(), dtype=score.dtype, device=score.device).index_add_(0, g, w)
    w = w / sums[g]
    merged = torch.zeros(uniq.numel(), feats.shape[1], dtype=score.dtype, device=score.device)
    merged.index_add_(0, g, w[:, None] * feats[removed].to(score.dtype))
    out = feats.to(score.dtype).clone()
    out[reps] = merged
    keep = torch.sort(torch.cat([order[: P - n_removed], reps])).values
    return keep, out[keep]


@dataclass(frozen=True)
class Strategy:
    """One of VFlowOpt's published strategies: its ViT stage (``t``, ``m``, kept share ``r`` of each view, at encoder
    layer ``layer``) and its LLM stages (after ``llm_layers``, each keeping ``llm_ratios`` of the current count).
    ``share``: the average share of the visual tokens it keeps over the decoder's layers (its label)."""

    share: float
    t: float
    m: float
    r: float
    layer: int
    llm_layers: tuple[int, ...]
    llm_ratios: tuple[float, ...]

    def average(self, num_layers: int) -> float:
        """The share of the visual tokens the decoder's layers see on average, per unit of ViT share: after the
        ViT stage every layer sees ``r``; after each LLM stage a further ratio of it."""
        edges = (0, *self.llm_layers, num_layers)
        kept, total = 1.0, 0.0
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            if i:
                kept *= self.llm_ratios[i - 1]
            total += kept * (b - a)
        return total / num_layers


ONEVISION_DEPTH = 28  # llava-onevision-qwen2-7b-ov's decoder, for which the strategies were published
ONEVISION_STRATEGIES = (
    # src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py, self.illava_config (lines 141-175):
    # illava_vit_k = [25] (the last of the tower's 26 kept layers: -1), alpha_v = 0, illava_llm_k 9-18 (README);
    # the 10 % row is the active one, 25 % and 50 % are commented out there
    Strategy(0.10, 39.26492840997221, 17.386981849158786, 0.11661529508161146, -1, (9, 18), (1.0, 0.6011)),
    Strategy(0.25, 34.759552803070484, 15.580797034937687, 0.2651026358526424, -1, (9, 18),
             (0.9833433139039235, 0.8773258179532721)),
    Strategy(0.50, 28.683047941520474, 11.756787150848968, 0.7233201448753168, -1, (9, 18),
             (0.748747637472693, 0.487)),
)
"""VFlowOpt's published strategies for LLaVA-OneVision-7B (each averages its label over the 28 layers)."""


@dataclass(frozen=True)
class VFlowOptViT(EncoderMethod):
    """VFlowOpt's ViT stage: attention of the global query rows plus ``alpha`` x softmax(patch entropy), the lowest
    tokens recycled per ``m x m`` cell into the cell's best one; ``tokens`` per crop."""

    name = "vflowopt_vit"
    needs = frozenset({"features", "attention", "pixels"})
    # its score reads the encoder's full attention and the patches' pixels, no CLS token (the authors run it on
    # OneVision's SigLIP); one encoder patch per token, as its pixel entropy is per patch
    requires = frozenset({"unmerged"})
    source = ("VFlowOpt, ICCV'25, arXiv 2508.05211; github.com/sihany077/VFlowOpt siglip_encoder.py, "
              "llava_qwen_training_free.py, llava_onevision_training_free.py (docs/methods.md)")
    flags = (
        Flag("t", "vflowopt-t", float, "global query rows: received attention above t x the mean (39.265)"),
        Flag("alpha", "vflowopt-alpha", float, "weight of softmax(patch entropy) (alpha_v, 0 as published)"),
        Flag("m", "vflowopt-m", float, "recycling cell side in patches (17.387; 0: no recycling)"),
        Flag("layer", "vflowopt-vit-layer", int, "encoder layer of the attention (-2: the one LLaVA projects)"),
    )

    tokens: int
    t: float = 39.26492840997221
    alpha: float = 0.0
    m: float = 17.386981849158786
    layer: int = -2

    def validate(self, num_layers: int | None = None) -> None:
        super().validate(num_layers)
        if self.m < 0 or self.t < 0:
            raise ValueError(f"{self.name}: t and m must be >= 0, got t={self.t}, m={self.m}")

    def scores(self, inputs: EncoderInputs) -> torch.Tensor:
        """(N, P) importance of every crop's patches (float32; float64 for a float64 tower)."""
        attn = inputs.attention(self.layer)  # (N, 1 + P, 1 + P)
        P = inputs.features.shape[1]
        score = torch.stack([global_row_scores(a, self.t)[-P:] for a in attn])
        if self.alpha:
            ent = patch_entropy(inputs.pixels(), inputs.grid).to(device=score.device, dtype=score.dtype)
            score = score + self.alpha * ent.softmax(dim=-1)
        return score

    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        feats = inputs.features
        target = inputs.targets[0]
        with inputs.timed("vflowopt_vit"):
            score = self.scores(inputs)
            cells = cell_ids(inputs.grid, self.m, feats.device) if self.m > 0 else None
            keep, new = [], []
            for c in range(feats.shape[0]):
                if cells is None:
                    k, f = topk_indices(score[c], target), None
                else:
                    k, f = recycle_by_cells(score[c], feats[c], cells, target)
                keep.append(k)
                new.append(None if f is None else f.to(feats.dtype))
        return EncoderSelection(keep, new if any(f is not None for f in new) else None)


@dataclass(frozen=True)
class VFlowOpt(ScorerMethod):
    """VFlowOpt's LLM stages (iLLaVA's attention path): after each layer, the last position's attention in that
    layer ranks the visual tokens; the top ``target - 1`` stay and the rest are recycled into one token (weights
    ``1 .. r + 1`` in descending score order)."""

    name = "vflowopt"
    needs = frozenset({"hidden", "attention"})
    default_layers = (9, 18)
    default_ratio_mode = "current"
    source = ("VFlowOpt, ICCV'25, arXiv 2508.05211; github.com/sihany077/VFlowOpt modeling_qwen2.py forward_illava, "
              "README (illava_llm_k=9-18) (docs/methods.md)")
    flags = (Flag("recycle", "vflowopt-no-recycle", None, "drop the removed tokens instead of recycling them",
                  const=False),)

    schedule: Schedule
    positions: str = "original"
    recycle: bool = True

    family_defaults = {
        # the authors' own OneVision strategies (their only published model): --method vflowopt_vit+vflowopt
        # --budget B takes the one nearest to B/576 (see ve_preset); the LLM layers 9, 18 are default_layers
        "llava_onevision": {"ve_strategies": ONEVISION_STRATEGIES},
    }

    @classmethod
    def ve_preset(cls, pre: type[EncoderMethod], budget: float, family=None, **options):
        """``--method vflowopt_vit+vflowopt --budget B`` where the family has published strategies (OneVision):
        the strategy whose label is nearest to ``B / 576``, its ViT layer, ``t``, ``m`` and LLM layers and ratios
        as published, and its ViT kept share ``r`` solved so the decoder's average is ``B / 576`` (exactly the
        published ``r`` at B = 57.6, 144 and 288, the 10 %, 25 % and 50 % rows). None elsewhere."""
        from ..encoder import PAPER_N0, Pipeline

        strategies = cls.defaults(family).get("ve_strategies")
        if not strategies or pre is not VFlowOptViT:
            return None
        share = budget / PAPER_N0
        best = min(strategies, key=lambda s: abs(math.log(s.share / share)))
        r = best.r * share / best.share  # the average is linear in r
        if not 0 < r <= 1:
            raise ValueError(f"budget {budget:g}: VFlowOpt's OneVision strategy would keep {r:.3g} of each view; "
                             f"allowed budgets give a share in (0, 1] (up to {PAPER_N0 * best.share / best.r:.4g})")
        schedule = Schedule(best.llm_layers, ratios=best.llm_ratios, ratio_mode="current")
        encoder = VFlowOptViT(tokens=max(1, round(r * PAPER_N0)), t=best.t, alpha=0.0, m=best.m, layer=best.layer)
        return Pipeline(encoder, cls(schedule, **{**cls.defaults(family)["options"], **options}))

    @classmethod
    def schedule_for(cls, layers=None, *, ratio_mode: str = "current", **targets) -> Schedule:
        """As :meth:`ReductionMethod.schedule_for`; ratios are of the current count (``illava_llm_r``) unless told
        otherwise."""
        return super().schedule_for(layers, ratio_mode=ratio_mode, **targets)

    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        return last_position_scores(inputs, "current")

    def choose(self, inputs: StageInputs, sample: SampleScores, prepared: None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The top ``target - 1``, and the rest recycled with the lowest kept one into one token (weights ``1 .. r
        + 1`` in descending score order); plain top-k without ``recycle`` or for a target below 2."""
        k = sample.target
        if not self.recycle or k < 2:
            return super().choose(inputs, sample, prepared)
        order, _ = stable_rank(sample.scores)
        rest = order[k - 1 :]  # the lowest kept one and the removed ones, best first
        h = sample.span(inputs.hidden)
        work = work_dtype(h)
        w = torch.arange(1, rest.numel() + 1, device=h.device, dtype=work)
        return torch.sort(order[: k - 1]).values, ((w @ h[rest].to(work)) / w.sum()).to(h.dtype)[None]
