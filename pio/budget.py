"""Budget solver: per-stage visual-token counts whose layer average meets a budget.

The papers state budgets as an *average* number of visual tokens per decoder layer (``docs/method.md`` §3.1,
:func:`pio.schedule.average_visual_tokens`). A method's published 192 / 128 / 64-token configurations fix the
*shape* of its schedule (how the count falls from stage to stage); the solver keeps that shape for any budget,
depth and initial count ``n0``.

Shape: :class:`Anchors`, the method's published schedules at its own layers for a reference ``n0`` and depth
(e.g. PIO: layers 1, 10, 15 of 32 at n0 = 576 with 92,54,22 / 218,128,54 / 344,202,86). As a function of the
budget fraction ``r = budget / n0`` they define per-stage count fractions ``f(r) = counts / n0``, with the extra
points ``f(0) = 0`` and ``f(1) = 1`` and linear interpolation in ``r`` in between. Without anchors the shape
is flat: every stage the same fraction.

A budget is turned into counts for any layers, depth and ``n0`` as follows:

1. Stage fractions. Each stage ``j`` is placed at depth ``t_j = l_j / L``; the anchor stages sit at their own
   depths. ``f_j`` is the anchor fraction at that depth, linearly interpolated between anchor stages and held
   constant before the first and after the last. At the anchor layers and depth this is exactly ``f(r)``.
2. One scale factor. Find ``s`` (closed form) such that
   ``l_1 + sum_j (l_{j+1} - l_j) * min(1, s * f_j) = r * L``; at the anchor layers and budgets ``s`` is 1.
   The real-valued targets are ``x_j = n0 * min(1, s * f_j)``.
3. Rounding. ``c_j = clamp(round_half_up(x_j), 1, n0)`` (non-increasing because ``x`` is).
4. Residual correction, deterministic. With the residual ``e = budget*L - (n0*l_1 + sum_j c_j w_j)`` in
   token-layers (``w_j = l_{j+1} - l_j``): first a greedy pass over the stages in order of decreasing ``w_j``
   (ties: earlier stage first) adds ``round_half_up(e / w_j)`` to ``c_j`` within the bounds that keep the counts
   non-increasing and >= 1; then, for K <= 5, an exhaustive search over changes of at most +-2 per stage picks
   the one minimising ``|e|``, then the total change, then the first in lexicographic order. The greedy pass
   alone guarantees ``|e| <= min_j w_j / 2`` when no bound is hit; the search usually brings it to
   ``|e| <= 1/2`` (one token-layer), i.e. the realised average is within ``1/(2L)`` of the budget.

So a method's anchor budgets at n0 = 576 reproduce its published counts exactly when they average exactly
their budget (PIO's), and for LLaVA-NeXT (n0 ~ 1700 ... 2880) a budget fraction gives the same fractions times
n0. Budgets outside the achievable range ``[(n0*l_1 + (L - l_1)) / L, n0]`` raise.

Published counts instead of an exact average (``Anchors.mode == "counts"``): some authors' configurations do
not average their nominal budget under this accounting (SparseVLM's lists were tuned with an off-by-one layer
count and merged tokens; DART's budget is the count kept after its layer). For such a method a budget *label*
(:attr:`pio.schedule.Schedule.budget_ratio`) maps to its published counts, ``c_j = round_half_up(n0 * f_j(r))``
(steps 1 and 3 only), so ``--budget 64`` runs the authors' 64-token configuration; the realised average is
logged. An absolute ``budget`` is always solved exactly (all four steps).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Anchors", "budget_counts", "round_half_up", "same_share_of_depth"]

_REFINE_MAX_STAGES = 5
_REFINE_RADIUS = 2
_TOL = 1e-9


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + _TOL))


@dataclass(frozen=True)
class Anchors:
    """A method's published schedules, the shape the budget solver keeps.

    Attributes:
        layers: the 1-based layers of the published schedules.
        num_layers: the depth they were published for (32 for the 7B models).
        n0: the initial visual count they were published for (576 for LLaVA-1.5).
        schedules: ``((budget, counts), ...)`` with one count per layer, budgets ascending.
        source: where the schedules come from (for the docs and result files).
        mode: ``"average"`` (a budget fraction is solved to that exact average) or ``"counts"`` (a budget
            fraction maps to the published counts, interpolated; module docstring).
    """

    layers: tuple[int, ...]
    num_layers: int
    n0: int
    schedules: tuple[tuple[int, tuple[int, ...]], ...]
    source: str = ""
    mode: str = "average"

    def __post_init__(self) -> None:
        for budget, counts in self.schedules:
            if len(counts) != len(self.layers):
                raise ValueError(f"anchor schedule for budget {budget} has {len(counts)} counts for "
                                 f"{len(self.layers)} layers")
        budgets = [b for b, _ in self.schedules]
        if budgets != sorted(set(budgets)):
            raise ValueError(f"anchor budgets must be ascending and distinct, got {budgets}")
        if self.mode not in ("average", "counts"):
            raise ValueError(f"anchor mode must be 'average' or 'counts', got {self.mode!r}")

    def published_counts(self, n0: int, layers: Sequence[int], num_layers: int, r: float) -> list[int]:
        """Counts for budget fraction ``r`` in ``"counts"`` mode: the published fractions at ``r`` (interpolated
        in budget and depth) times ``n0``, rounded half up, each in ``1..n0`` and non-increasing."""
        if n0 <= 0:
            return [0] * len(layers)
        counts = [min(n0, max(1, round_half_up(n0 * f))) for f in self.stage_fractions(r, layers, num_layers)]
        for j in range(1, len(counts)):
            counts[j] = min(counts[j], counts[j - 1])
        return counts

    def counts(self, budget: int) -> tuple[int, ...]:
        """The published counts for ``budget`` (KeyError if there are none)."""
        return dict(self.schedules)[budget]

    def fractions(self, r: float) -> list[float]:
        """Per-anchor-stage count fractions at budget fraction ``r``, piecewise linear in ``r``."""
        k = len(self.layers)
        points: list[tuple[float, list[float]]] = [(0.0, [0.0] * k)]
        points += [(b / self.n0, [c / self.n0 for c in counts]) for b, counts in self.schedules]
        points.append((1.0, [1.0] * k))
        r = min(max(r, 0.0), 1.0)
        for (r_a, f_a), (r_b, f_b) in zip(points[:-1], points[1:]):
            if r <= r_b:
                if r == r_b:
                    return list(f_b)
                w = (r - r_a) / (r_b - r_a)
                return [a + w * (b - a) for a, b in zip(f_a, f_b)]
        return [1.0] * k

    def stage_fractions(self, r: float, layers: Sequence[int], num_layers: int) -> list[float]:
        """Fractions for arbitrary layers: the anchor fractions interpolated in depth ``l / L``."""
        anchor_f = self.fractions(r)
        anchor_t = [a / self.num_layers for a in self.layers]
        out = []
        for layer in layers:
            t = layer / num_layers
            if t <= anchor_t[0]:
                out.append(anchor_f[0])
            elif t >= anchor_t[-1]:
                out.append(anchor_f[-1])
            else:
                i = max(j for j in range(len(anchor_t)) if anchor_t[j] <= t)
                if t == anchor_t[i]:
                    out.append(anchor_f[i])
                else:
                    w = (t - anchor_t[i]) / (anchor_t[i + 1] - anchor_t[i])
                    out.append(anchor_f[i] + w * (anchor_f[i + 1] - anchor_f[i]))
        return out


def _solve_scale(fracs: Sequence[float], widths: Sequence[int], head: int, target: float) -> float:
    """Closed-form ``s`` with ``head + sum_j w_j * min(1, s * f_j) == target`` (``f`` non-increasing, > 0)."""
    k = len(fracs)
    for c in range(k + 1):  # c = number of leading stages clipped at 1
        rest = sum(w * f for w, f in zip(widths[c:], fracs[c:]))
        if rest <= 0:
            return math.inf
        s = (target - head - sum(widths[:c])) / rest
        if (c == k or s * fracs[c] <= 1.0 + _TOL) and (c == 0 or s * fracs[c - 1] >= 1.0 - _TOL):
            return s
    return math.inf


def budget_counts(
    n0: int, layers: Sequence[int], num_layers: int, budget: float, anchors: Anchors | None = None
) -> list[int]:
    """Per-stage visual counts whose average over ``num_layers`` layers is as close as possible to ``budget``.

    The rule (shape from ``anchors`` or flat, one scale factor, rounding, deterministic residual correction) is
    described in the module docstring. ``budget`` is absolute (visual tokens per layer, averaged); ``layers``
    are 1-based.

    Raises:
        ValueError: if ``budget`` is outside ``[(n0*l_1 + (L - l_1)) / L, n0]``, the range achievable with
            counts in ``1..n0`` for this ``n0`` and depth.
    """
    return list(_budget_counts_cached(int(n0), tuple(int(x) for x in layers), int(num_layers), float(budget),
                                      anchors))


@functools.lru_cache(maxsize=4096)
def _budget_counts_cached(
    n0: int, layers: tuple[int, ...], num_layers: int, budget: float, anchors: Anchors | None
) -> tuple[int, ...]:
    """Cached core of :func:`budget_counts` (called once per sample and stage during generation)."""
    if n0 < 0:
        raise ValueError(f"n0 must be >= 0, got {n0}")
    if n0 == 0:
        return (0,) * len(layers)
    k = len(layers)
    head = layers[0]
    widths = [b - a for a, b in zip(layers, (*layers[1:], num_layers))]
    lo = (n0 * head + sum(widths)) / num_layers
    hi = float(n0)
    if not (lo - _TOL <= budget <= hi + _TOL):
        raise ValueError(
            f"budget {budget:g} visual tokens per layer is not achievable for n0={n0}, layers={list(layers)}, "
            f"L={num_layers}: the achievable range is [{lo:.4g}, {hi:g}] (the first {head} layer(s) always see "
            f"all n0 tokens and every later stage keeps at least 1)"
        )
    target_total = budget * num_layers  # token-layers
    r = budget / n0
    fracs = anchors.stage_fractions(r, layers, num_layers) if anchors is not None else [1.0] * k
    s = _solve_scale(fracs, widths, head, r * num_layers)
    counts = [min(n0, max(1, round_half_up(n0 * min(1.0, s * f)))) for f in fracs]
    for j in range(1, k):  # rounding is monotone, this only guards against float noise
        counts[j] = min(counts[j], counts[j - 1])

    def residual(cs: Sequence[int]) -> float:
        return target_total - (n0 * head + sum(c * w for c, w in zip(cs, widths)))

    def bounds(cs: Sequence[int], j: int) -> tuple[int, int]:
        upper = n0 if j == 0 else cs[j - 1]
        lower = 1 if j == k - 1 else cs[j + 1]
        return lower, upper

    # Greedy pass: widest stage first.
    for j in sorted(range(k), key=lambda i: (-widths[i], i)):
        lower, upper = bounds(counts, j)
        delta = round_half_up(residual(counts) / widths[j])
        counts[j] = min(upper, max(lower, counts[j] + delta))

    # Exhaustive refinement over small changes.
    if k <= _REFINE_MAX_STAGES:
        best_key: tuple[float, int] | None = None
        best = list(counts)
        span = range(-_REFINE_RADIUS, _REFINE_RADIUS + 1)
        for deltas in itertools.product(span, repeat=k):
            cand = [c + d for c, d in zip(counts, deltas)]
            if any(c < 1 or c > n0 for c in cand) or any(b > a for a, b in zip(cand[:-1], cand[1:])):
                continue
            key = (round(abs(residual(cand)), 6), sum(abs(d) for d in deltas))
            if best_key is None or key < best_key:
                best_key, best = key, cand
        counts = best
    return tuple(counts)


def same_share_of_depth(layers: Sequence[int], num_layers: int, published: int = 32) -> tuple[int, ...]:
    """1-based ``layers`` published for a ``published``-layer decoder moved to the same share of a ``num_layers``
    one (``round_half_up(l * num_layers / published)``, at least 1, kept strictly increasing): the layers of a
    method on a model its authors give no setting for, e.g. LLaVA-OneVision-7B's 28 layers
    (PIO's 1, 10, 15 of 32 -> 1, 9, 13)."""
    out: list[int] = []
    for layer in layers:
        moved = max(1, round_half_up(layer * num_layers / published), (out[-1] + 1) if out else 1)
        out.append(min(moved, num_layers))
    return tuple(out)

