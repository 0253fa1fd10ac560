"""PyramidDrop / PDrop (Xing et al., CVPR'25, arXiv 2410.17247): several stages, each keeping a fraction.

Facts (official code, Cooperx521/PyramidDrop, ``pdrop_forward`` / ``pdrop_rank_drop``; docs/methods.md §PDrop):

* After layer ``l`` of ``layer_list`` (1-based, "the first l layers ran"), the visual tokens are ranked with the
  queries and keys of the layer about to run (0-based ``l``) on its input: here ``which="next"``.
* Query: the last instruction token (the last prompt position at inference). Score: the softmax over every key,
  averaged over heads, read at the visual keys.
* Stage ``s`` keeps ``int(N0 * ratio_s)`` tokens, ratios relative to the *initial* count N0 (the official eval
  scripts pass ``[1.0, 0.5, 0.25, 0.125]``); kept tokens stay in order, positions are renumbered.
* Defaults: layers 8, 16, 24 with ratios 0.5, 0.25, 0.125 (lambda = 0.5): ``--layers 8,16,24 --ratios
  0.5,0.25,0.125`` (an average of 270 tokens on LLaVA-1.5).
* Budgets: the authors published no 192/128/64 configurations (PDrop issues #10, #22, #27); with layers 8, 16,
  24 no lambda reaches an average below 144. The third-party re-runs we found use drops after layers 2, 8, 16, 24
  with kept fractions ``lambda^k``, lambda = 0.581 / 0.437 / 0.196 for 192 / 128 / 64 (7B), which average exactly
  the budget. ``--budget B`` therefore solves lambda for that average at those layers (any layers with
  ``--layers``): ``avg / N0 = (l_1 + sum_k (l_{k+1} - l_k) lambda^k) / L = B / 576``.

Differences: rows recomputed explicitly for any attention backend and padding; ties broken by the lower index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base import ScorerMethod, StageInputs
from ..budget import same_share_of_depth
from ..schedule import PAPER_N0, Schedule
from .fastv import last_position_scores

BUDGET_LAYERS = (2, 8, 16, 24)


def solve_lambda(layers: Sequence[int], num_layers: int, fraction: float) -> float:
    """The ``lambda`` in (0, 1] with ``(l_1 + sum_k (l_{k+1} - l_k) lambda^k) / L == fraction`` (bisection)."""
    widths = [b - a for a, b in zip(layers, (*layers[1:], num_layers))]

    def average(lam: float) -> float:
        return (layers[0] + sum(w * lam ** (k + 1) for k, w in enumerate(widths))) / num_layers

    if fraction <= average(0.0):
        raise ValueError(
            f"pdrop: an average of {fraction * PAPER_N0:.4g} of {PAPER_N0} visual tokens is not reachable after layers "
            f"{list(layers)} of {num_layers}: the first {layers[0]} layer(s) alone average "
            f"{average(0.0) * PAPER_N0:.4g}; prune earlier (--layers) or give a larger budget"
        )
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < fraction else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class PDrop(ScorerMethod):
    """PyramidDrop: after each stage's layer, the last instruction token's attention (of the next layer) ranks
    the visual tokens; each stage keeps its fraction of the initial count."""

    name = "pdrop"
    needs = frozenset({"hidden", "attention"})
    default_layers = BUDGET_LAYERS
    family_defaults = {"llava_onevision": {"layers": same_share_of_depth(BUDGET_LAYERS, 28)}}  # 2, 7, 14, 21
    source = "PyramidDrop, CVPR'25, arXiv 2410.17247; github.com/Cooperx521/PyramidDrop (docs/methods.md)"

    schedule: Schedule
    positions: str = "renumber"

    @classmethod
    def schedule_for(cls, layers=None, *, ratios=None, **targets) -> Schedule:
        """As :meth:`ReductionMethod.schedule_for`; ratios may carry the official eval scripts' leading 1.0
        (``--image_token_ratio_list "[1.0,0.5,0.25,0.125]"`` for three layers)."""
        n_layers = len(layers) if layers is not None else len(cls.default_layers)
        if ratios is not None and len(ratios) == n_layers + 1 and float(ratios[0]) == 1.0:
            ratios = tuple(ratios)[1:]
        return super().schedule_for(layers, ratios=ratios, **targets)

    def counts(self, n0: int, num_layers: int) -> list[int]:
        """A budget solves lambda for this depth and keeps ``int(N0 * lambda^k)`` after stage k (module
        docstring); explicit tokens or ratios are used as given."""
        s = self.schedule
        if s.budget is None and s.budget_ratio is None:
            return super().counts(n0, num_layers)
        s.validate(num_layers)
        if n0 <= 0:
            return [0] * len(s.layers)
        fraction = s.budget_ratio if s.budget_ratio is not None else s.budget / n0
        if fraction >= 1.0:
            return [n0] * len(s.layers)
        lam = solve_lambda(s.layers, num_layers, fraction)
        out, prev = [], n0
        for k in range(len(s.layers)):
            prev = max(1, min(prev, int(n0 * lam ** (k + 1))))
            out.append(prev)
        return out

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.layers[-1] >= num_layers:
            raise ValueError(f"pdrop ranks with the next layer's attention: layers must be in 1..{num_layers - 1} for a "
                             f"{num_layers}-layer decoder, got {list(self.layers)}")

    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        return last_position_scores(inputs, "next")
