"""FastV (Chen et al., ECCV'24, arXiv 2403.06764): rank visual tokens by the attention the last position pays them.

Facts (official code, pkunlp-icler/FastV; docs/methods.md §FastV):

* Pruning "at layer K" removes visual tokens before 0-based layer K runs, ranking them with the attention
  probabilities of 0-based layer K-1, the layer that just ran, computed on that layer's input: here, after
  1-based layer K with ``which="current"``. K = 2 in the paper's title and its released evaluation scripts.
* Score: the full causal softmax over every key of the *last* query row (the code's choice; the paper speaks of
  the average over all tokens, FastV issues #14, #44), averaged over heads, read at the visual keys.
* Keep the top-k visual tokens in their original order; text is never dropped. Kept tokens keep their original
  positions (gaps), as every official variant does (``positions="original"``).
* Budgets: FastV published no 192/128/64 configurations; the tables that report FastV at those budgets
  (SparseVLM, VisionZip, and the papers copying them) count the average over all 32 layers,
  ``(K * 576 + (32 - K) * kept) / 32`` (SparseVLM issues #4/#10, VisionZip issue #22). So ``--budget B`` keeps
  the count nearest to that average: 166 / 98 / 30 after layer 2 for 192 / 128 / 64.

Differences: the rows are recomputed explicitly (no eager attention for the whole model), batches of any
padding work (the last *valid* position of each sample), ties are broken by the lower index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base import ScorerMethod, StageInputs
from ..budget import same_share_of_depth
from ..schedule import Schedule


def last_valid(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of each row's last valid position."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), pos, -1).amax(dim=1, keepdim=True).clamp_min(0)


def last_position_scores(inputs: StageInputs, which: str) -> torch.Tensor:
    """(B, S): the attention each sample's last valid position pays every position in the ``which`` layer
    (softmax over every key, averaged over heads): FastV's score (``current``), PDrop's (``next``) and VFlowOpt's
    LLM stages' (``current``)."""
    probs = inputs.attention(last_valid(inputs.mask), which=which)  # (B, H, 1, S)
    with inputs.timed("score"):
        return probs.mean(dim=1)[:, 0]  # (B, S)


@dataclass(frozen=True)
class FastV(ScorerMethod):
    """FastV: one stage after layer K; the last position's head-averaged attention ranks the visual tokens."""

    name = "fastv"
    needs = frozenset({"hidden", "attention"})
    default_layers = (2,)
    family_defaults = {"llava_onevision": {"layers": same_share_of_depth((2,), 28)}}  # no OneVision setting: K = 2
    source = "FastV, ECCV'24, arXiv 2403.06764; github.com/pkunlp-icler/FastV (docs/methods.md)"

    schedule: Schedule
    positions: str = "original"

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if len(self.layers) != 1:
            raise ValueError(f"fastv prunes once, after one layer K; got layers {list(self.layers)} (use pdrop for "
                             "several stages)")

    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        return last_position_scores(inputs, "current")
