"""Pruning schedules: which decoder layers prune, and to how many visual tokens.

Paper reference: PIO-FVLM / TRIO, §3 of ``docs/method.md`` (schedules and budget accounting).

A schedule is a strictly increasing tuple of 1-based layers ``l_1 < ... < l_K``. Pruning at ``l`` happens in
prefill right after decoder layer ``l`` (0-based index ``l-1``) has run, and shortens the sequence seen by the
0-based layers ``l ... L-1``. The target of every stage is given in exactly one of four ways:

``tokens``
    absolute visual counts ``c_1 >= ... >= c_K`` (the authors' ``--image_token_list``), clipped to each
    sample's initial visual count ``n0``.
``ratios``
    fractions in ``(0, 1]``. With ``ratio_mode="initial"`` (default) stage ``j`` keeps ``int(ratio_j * n0)``;
    with ``ratio_mode="current"`` it keeps ``int(ratio_j * c_{j-1})`` (multiplicative; the semantics of the
    authors' Qwen2.5-VL code, §3.3).
``budget``
    an *average* number of visual tokens per decoder layer (absolute), solved per sample (below).
``budget_ratio``
    the same average, as a fraction of each sample's ``n0`` (LLaVA-NeXT, where ``n0`` varies per image).

Every count is at least 1 when ``n0 >= 1``; a sample with ``n0 == 0`` (text only) gets zeros.

Average visual tokens per layer (the paper's accounting, §3.1), with ``c_0 = n0``, ``l_0 = 0``,
``l_{K+1} = L``::

    avg = (1/L) * sum_{j=0..K} c_j * (l_{j+1} - l_j)

e.g. layers (1, 10, 15), n0 = 576, counts (218, 128, 54), L = 32 gives (576 + 9*218 + 5*128 + 17*54)/32 = 128.

Budget solving
--------------
The only budgeted schedules the authors published are for LLaVA-1.5-7B (L = 32, n0 = 576) with layers
(1, 10, 15): budget 64 -> (92, 54, 22) and budget 128 -> (218, 128, 54), both taken from the authors' scripts
(``docs/method.md`` §3.2). The 192-token schedule is not in their code; (344, 202, 86) is the linear
extrapolation of the 64 -> 128 step and averages exactly 192.0 (§3.2, "candidates ... not confirmed"). These
three *anchor schedules* define, as a function of the budget fraction ``r = budget / n0``, the per-stage count
fractions ``f(r) = counts / 576``, with the extra anchors ``f(0) = 0`` and ``f(1) = 1`` and linear interpolation
in ``r`` in between. A budget is turned into counts for any layers, depth and ``n0`` as follows:

1. Stage fractions. Each stage ``j`` is placed at depth ``t_j = l_j / L``; the anchor stages sit at depths
   1/32, 10/32 and 15/32. ``f_j`` is the anchor fraction at that depth, linearly interpolated between anchor
   stages and held constant before the first and after the last. For layers (1, 10, 15) and L = 32 this is
   exactly ``f(r)``.
2. One scale factor. Find ``s`` (closed form) such that
   ``l_1 + sum_j (l_{j+1} - l_j) * min(1, s * f_j) = r * L``; for (1, 10, 15) / L = 32 and the anchor budgets
   ``s`` is exactly 1. The real-valued targets are ``x_j = n0 * min(1, s * f_j)``.
3. Rounding. ``c_j = clamp(round_half_up(x_j), 1, n0)`` (non-increasing because ``x`` is).
4. Residual correction, deterministic. With the residual ``e = budget*L - (n0*l_1 + sum_j c_j w_j)`` in
   token-layers (``w_j = l_{j+1} - l_j``): first a greedy pass over the stages in order of decreasing ``w_j``
   (ties: earlier stage first) adds ``round_half_up(e / w_j)`` to ``c_j`` within the bounds that keep the counts
   non-increasing and >= 1; then, for K <= 5, an exhaustive search over changes of at most +-2 per stage picks
   the one minimising ``|e|``, then the total change, then the first in lexicographic order. The greedy pass
   alone guarantees ``|e| <= min_j w_j / 2`` when no bound is hit; the search usually brings it to
   ``|e| <= 1/2`` (one token-layer), i.e. the realised average is within ``1/(2L)`` of the budget.

For n0 = 576 the three presets therefore reproduce (92, 54, 22), (218, 128, 54) and (344, 202, 86) exactly,
and for LLaVA-NeXT (n0 ~ 1700 ... 2880) a ``budget_ratio`` gives the same fractions times n0 (e.g. n0 = 2880,
r = 1/9 -> (460, 270, 110)). Budgets outside the achievable range ``[(n0*l_1 + (L - l_1)) / L, n0]`` raise.
"""

from __future__ import annotations

import ast
import functools
import itertools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ANCHOR_COUNTS",
    "ANCHOR_LAYERS",
    "ANCHOR_N0",
    "ANCHOR_NUM_LAYERS",
    "PRESETS",
    "PROXY_MODES",
    "RATIO_MODES",
    "EncoderReductionNotImplementedError",
    "Schedule",
    "average_visual_tokens",
    "budget_counts",
    "parse_counts",
    "parse_layers",
    "parse_ratios",
    "preset",
    "realised_average",
    "schedule_from_args",
]

PROXY_MODES = ("next", "current")
RATIO_MODES = ("initial", "current")

# Anchor schedules (authors' scripts for 64/128; linear extrapolation for 192, see the module docstring).
ANCHOR_LAYERS: tuple[int, ...] = (1, 10, 15)
ANCHOR_NUM_LAYERS = 32
ANCHOR_N0 = 576
ANCHOR_COUNTS: dict[int, tuple[int, ...]] = {
    64: (92, 54, 22),
    128: (218, 128, 54),
    192: (344, 202, 86),
}

_REFINE_MAX_STAGES = 5
_REFINE_RADIUS = 2
_TOL = 1e-9


class EncoderReductionNotImplementedError(NotImplementedError, ValueError):
    """Raised for ``--visual_token_num`` other than 576 (encoder-side reduction is not implemented yet)."""


# --------------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------------


def average_visual_tokens(n0: int, layers: Sequence[int], counts: Sequence[int], num_layers: int) -> float:
    """Average visual tokens per decoder layer, ``(1/L) * sum_j c_j * (l_{j+1} - l_j)`` (§3.1).

    Args:
        n0: visual tokens entering layer 0 (``c_0``).
        layers: 1-based pruning layers ``l_1 < ... < l_K`` (each in ``1..L``).
        counts: visual tokens kept after each of them, ``c_1 ... c_K``.
        num_layers: decoder depth ``L``.
    """
    layers = tuple(int(x) for x in layers)
    counts = tuple(int(x) for x in counts)
    if len(layers) != len(counts):
        raise ValueError(f"{len(layers)} layers but {len(counts)} counts; give one count per pruning layer")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layers and (
        layers[0] < 1 or layers[-1] > num_layers or any(b <= a for a, b in zip(layers[:-1], layers[1:]))
    ):
        raise ValueError(f"layers must be strictly increasing within 1..{num_layers}, got {list(layers)}")
    bounds = (0, *layers, num_layers)
    stage_counts = (n0, *counts)
    total = sum(c * (bounds[j + 1] - bounds[j]) for j, c in enumerate(stage_counts))
    return total / num_layers


def realised_average(n0: int, layers: Sequence[int], kept_counts: Sequence[int], num_layers: int) -> float:
    """Average visual tokens per layer for the counts actually kept (for reporting; same formula, §3.1)."""
    return average_visual_tokens(n0, layers, kept_counts, num_layers)


# --------------------------------------------------------------------------------------------------------
# Budget solving
# --------------------------------------------------------------------------------------------------------


def _anchor_fractions(r: float) -> list[float]:
    """Anchor stage fractions ``f(r)`` for the anchor layers, piecewise linear in ``r`` (module docstring)."""
    k = len(ANCHOR_LAYERS)
    points: list[tuple[float, list[float]]] = [(0.0, [0.0] * k)]
    for budget in sorted(ANCHOR_COUNTS):
        points.append((budget / ANCHOR_N0, [c / ANCHOR_N0 for c in ANCHOR_COUNTS[budget]]))
    points.append((1.0, [1.0] * k))
    r = min(max(r, 0.0), 1.0)
    for (r_a, f_a), (r_b, f_b) in zip(points[:-1], points[1:]):
        if r <= r_b:
            if r == r_b:
                return list(f_b)
            w = (r - r_a) / (r_b - r_a)
            return [a + w * (b - a) for a, b in zip(f_a, f_b)]
    return [1.0] * k


def _stage_fractions(r: float, layers: Sequence[int], num_layers: int) -> list[float]:
    """Per-stage fractions for arbitrary layers: anchor fractions interpolated in depth ``l / L``."""
    anchor_f = _anchor_fractions(r)
    anchor_t = [a / ANCHOR_NUM_LAYERS for a in ANCHOR_LAYERS]
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


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + _TOL))


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


def budget_counts(n0: int, layers: Sequence[int], num_layers: int, budget: float) -> list[int]:
    """Per-stage visual counts whose average over ``num_layers`` layers is as close as possible to ``budget``.

    The rule (anchor schedules, one scale factor, rounding, deterministic residual correction) is described in
    the module docstring. ``budget`` is absolute (visual tokens per layer, averaged); ``layers`` are 1-based.

    Raises:
        ValueError: if ``budget`` is outside ``[(n0*l_1 + (L - l_1)) / L, n0]``, the range achievable with
            counts in ``1..n0`` for this ``n0`` and depth.
    """
    return list(_budget_counts_cached(int(n0), tuple(int(x) for x in layers), int(num_layers), float(budget)))


@functools.lru_cache(maxsize=4096)
def _budget_counts_cached(
    n0: int, layers: tuple[int, ...], num_layers: int, budget: float
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
    fracs = _stage_fractions(r, layers, num_layers)
    s = _solve_scale(fracs, widths, head, r * num_layers)
    counts = [min(n0, max(1, _round_half_up(n0 * min(1.0, s * f)))) for f in fracs]
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
        delta = _round_half_up(residual(counts) / widths[j])
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


# --------------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Which decoder layers prune, and to how many visual tokens (``docs/method.md`` §1, §3).

    Attributes:
        layers: strictly increasing 1-based layers; pruning after layer ``l`` (0-based ``l-1``) shortens the
            sequence for 0-based layers ``l .. L-1``. With the "next" proxy (LLaVA, default) each must be in
            ``1..L-1``; with the "current" proxy (Qwen fidelity) in ``1..L``.
        tokens: absolute targets per layer (non-increasing, >= 1), clipped to each sample's ``n0``.
        ratios: fractions in ``(0, 1]`` per layer, of ``n0`` (``ratio_mode="initial"``, non-increasing) or of
            the previous stage's count (``ratio_mode="current"``, authors' Qwen semantics).
        ratio_mode: "initial" or "current"; only used with ``ratios``.
        budget: average visual tokens per decoder layer (absolute), solved per sample.
        budget_ratio: average visual tokens per layer as a fraction of each sample's ``n0``, in ``(0, 1]``.

    Exactly one of ``tokens``, ``ratios``, ``budget``, ``budget_ratio`` must be given. Structural checks run
    at construction; :meth:`validate` adds the depth-dependent ones.
    """

    layers: tuple[int, ...]
    tokens: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    budget: float | None = None
    budget_ratio: float | None = None
    ratio_mode: str = "initial"

    def __post_init__(self) -> None:
        # Normalise lists to tuples so schedules stay hashable and comparable.
        object.__setattr__(self, "layers", tuple(self.layers) if self.layers is not None else ())
        if self.tokens is not None:
            object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.ratios is not None:
            object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        self._check_structure()

    # -- validation ---------------------------------------------------------------------------------------

    def _targets_given(self) -> list[str]:
        names = ("tokens", "ratios", "budget", "budget_ratio")
        return [n for n in names if getattr(self, n) is not None]

    def _check_structure(self) -> None:
        layers = self.layers
        if len(layers) == 0:
            raise ValueError(
                "schedule has no pruning layers; give at least one 1-based layer, e.g. (1, 10, 15)"
            )
        if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
            raise ValueError(f"layers must be integers (1-based decoder layers), got {list(layers)}")
        if any(b <= a for a, b in zip(layers[:-1], layers[1:])):
            raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
        if layers[0] < 1:
            raise ValueError(
                f"layers are 1-based (pruning after layer l); got {layers[0]} in {list(layers)}, the smallest "
                f"allowed is 1"
            )
        given = self._targets_given()
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(
                f"give exactly one target kind out of tokens, ratios, budget, budget_ratio; got {what}"
            )
        if self.ratio_mode not in RATIO_MODES:
            raise ValueError(f"unknown ratio_mode {self.ratio_mode!r}; allowed: {', '.join(RATIO_MODES)}")
        if self.tokens is not None:
            toks = self.tokens
            if len(toks) != len(layers):
                raise ValueError(
                    f"{len(toks)} token counts for {len(layers)} layers; give one count per pruning layer"
                )
            if any(isinstance(x, bool) or not isinstance(x, int) for x in toks):
                raise ValueError(f"token counts must be integers, got {list(toks)}")
            if any(x < 1 for x in toks):
                raise ValueError(f"token counts must be >= 1, got {list(toks)}")
            if any(b > a for a, b in zip(toks[:-1], toks[1:])):
                raise ValueError(
                    f"token counts must be non-increasing (pruning never adds tokens), got {list(toks)}"
                )
        if self.ratios is not None:
            rs = self.ratios
            if len(rs) != len(layers):
                raise ValueError(
                    f"{len(rs)} ratios for {len(layers)} layers; give one ratio per pruning layer"
                )
            if any(not (0.0 < x <= 1.0) for x in rs):
                raise ValueError(f"ratios must be in (0, 1], got {list(rs)}")
            if self.ratio_mode == "initial" and any(b > a for a, b in zip(rs[:-1], rs[1:])):
                raise ValueError(
                    f"with ratio_mode='initial' ratios are fractions of n0 and must be non-increasing, got "
                    f"{list(rs)} (use ratio_mode='current' for multiplicative per-stage ratios)"
                )
        if self.budget is not None and not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget (average visual tokens per layer) must be > 0, got {self.budget}")
        if self.budget_ratio is not None and not (0.0 < self.budget_ratio <= 1.0):
            raise ValueError(f"budget_ratio must be in (0, 1], got {self.budget_ratio}")

    def validate(self, num_layers: int, proxy: str = "next") -> None:
        """Check the schedule against a decoder of ``num_layers`` layers.

        Args:
            num_layers: decoder depth L.
            proxy: "next" (the proxy runs 0-based layer ``l`` after layer ``l-1``, so ``l`` must be in
                ``1..L-1``) or "current" (the proxy re-runs the layer that just ran; ``1..L``).

        Raises:
            ValueError: saying what is wrong and what is allowed.
        """
        if proxy not in PROXY_MODES:
            raise ValueError(f"unknown proxy {proxy!r}; allowed: {', '.join(PROXY_MODES)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self._check_structure()
        top = num_layers - 1 if proxy == "next" else num_layers
        bad = [x for x in self.layers if not (1 <= x <= top)]
        if bad:
            why = (
                "the 'next' proxy runs 0-based layer l after layer l-1"
                if proxy == "next"
                else "pruning happens after one of the L layers"
            )
            raise ValueError(
                f"layers {bad} out of range for a {num_layers}-layer decoder with proxy={proxy!r}: allowed "
                f"1..{top} ({why})"
            )
        if self.budget_ratio is not None and self.budget_ratio * num_layers <= self.layers[0] + _TOL:
            raise ValueError(
                f"budget_ratio {self.budget_ratio:g} is not achievable with first pruning layer {self.layers[0]} "
                f"of {num_layers}: the first {self.layers[0]} layer(s) alone already average "
                f"{self.layers[0] / num_layers:.4g} of n0; allowed ({self.layers[0] / num_layers:.4g}, 1]"
            )

    # -- counts -------------------------------------------------------------------------------------------

    def counts(self, n0: int, num_layers: int) -> list[int]:
        """Visual-token targets after each pruning layer for a sample with ``n0`` visual tokens.

        Returns ``K`` non-increasing ints, each in ``1..n0`` (all 0 when ``n0 == 0``).

        Raises:
            ValueError: invalid schedule for this depth, or a budget not achievable for this ``n0``.
        """
        self.validate(num_layers, proxy="current")
        n0 = int(n0)
        k = len(self.layers)
        if n0 < 0:
            raise ValueError(f"n0 must be >= 0, got {n0}")
        if n0 == 0:
            return [0] * k
        if self.tokens is not None:
            return [min(int(t), n0) for t in self.tokens]
        if self.ratios is not None:
            out: list[int] = []
            prev = n0
            for ratio in self.ratios:
                base = n0 if self.ratio_mode == "initial" else prev
                c = max(1, min(prev, int(ratio * base)))
                out.append(c)
                prev = c
            return out
        budget = self.budget if self.budget is not None else self.budget_ratio * n0
        return budget_counts(n0, self.layers, num_layers, budget)

    def average(self, n0: int, num_layers: int) -> float:
        """Average visual tokens per layer realised by :meth:`counts` for this ``n0`` (§3.1)."""
        return average_visual_tokens(n0, self.layers, self.counts(n0, num_layers), num_layers)

    # -- reporting ----------------------------------------------------------------------------------------

    def describe(self) -> str:
        """One-line human-readable description for logs."""
        where = "prune after layer(s) " + ",".join(str(x) for x in self.layers)
        if self.tokens is not None:
            return f"{where} to {','.join(str(x) for x in self.tokens)} visual tokens"
        if self.ratios is not None:
            base = "of the initial visual count" if self.ratio_mode == "initial" else "of the current count"
            return f"{where} to ratios {','.join(f'{x:g}' for x in self.ratios)} {base}"
        if self.budget is not None:
            return f"{where}, average budget {self.budget:g} visual tokens per layer"
        r = self.budget_ratio
        return (
            f"{where}, average budget {100 * r:.2f}% of each sample's visual tokens per layer "
            f"({r * ANCHOR_N0:.4g} of {ANCHOR_N0})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (all fields; unused targets are ``None``)."""
        return {
            "layers": list(self.layers),
            "tokens": None if self.tokens is None else list(self.tokens),
            "ratios": None if self.ratios is None else list(self.ratios),
            "ratio_mode": self.ratio_mode,
            "budget": self.budget,
            "budget_ratio": self.budget_ratio,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`."""
        return cls(
            layers=tuple(data["layers"]),
            tokens=None if data.get("tokens") is None else tuple(data["tokens"]),
            ratios=None if data.get("ratios") is None else tuple(data["ratios"]),
            budget=data.get("budget"),
            budget_ratio=data.get("budget_ratio"),
            ratio_mode=data.get("ratio_mode", "initial"),
        )


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------

PRESETS: dict[str, Schedule] = {
    str(b): Schedule(layers=ANCHOR_LAYERS, budget_ratio=b / ANCHOR_N0) for b in sorted(ANCHOR_COUNTS)
}


def preset(name: str | int) -> Schedule:
    """The paper's LLaVA-1.5 budget presets "64", "128", "192" (layers (1, 10, 15), budget as a fraction of 576).

    For n0 = 576 they give (92, 54, 22), (218, 128, 54), (344, 202, 86); for other n0 the same fractions.
    """
    return _lookup_preset(name)


def _lookup_preset(name: str | int) -> Schedule:
    key = str(name).strip()
    if key not in PRESETS:
        raise ValueError(f"unknown schedule preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[key]


# --------------------------------------------------------------------------------------------------------
# CLI parsing
# --------------------------------------------------------------------------------------------------------


def _split(text: Any, what: str) -> list[Any]:
    """Items of a CLI list: "1,10,15", "1 10 15", the Python-literal "[1, 10, 15]", or a sequence."""
    if isinstance(text, (list, tuple)):
        return list(text)
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [text]
    if not isinstance(text, str):
        raise ValueError(f"cannot parse {what} from {text!r}; use a comma-separated list such as '1,10,15'")
    s = text.strip()
    if not s:
        raise ValueError(f"empty {what}; use a comma-separated list such as '1,10,15'")
    if s[0] in "[(":
        try:
            value = ast.literal_eval(s)  # literals only, never eval()
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"cannot parse {what} from {text!r}: {err}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what} must be a list, got {text!r}")
        return list(value)
    return [p for p in re.split(r"[,\s]+", s) if p]


def _to_int(x: Any, what: str, text: Any) -> int:
    if isinstance(x, bool):
        raise ValueError(f"{what} must be integers, got {text!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        if x.is_integer():
            return int(x)
        raise ValueError(f"{what} must be integers, got {text!r}")
    try:
        return int(str(x))
    except ValueError:
        raise ValueError(f"{what} must be integers, got {text!r}") from None


def _to_float(x: Any, what: str, text: Any) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{what} must be numbers, got {text!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {text!r}") from None


def parse_layers(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse 1-based pruning layers: "1,10,15", "1 10 15" or the authors' "[1,10,15]" (``ast.literal_eval``)."""
    items = _split(text, "layers")
    if not items:
        raise ValueError(f"empty layers {text!r}; use e.g. '1,10,15'")
    return tuple(_to_int(x, "layers", text) for x in items)


def parse_counts(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse absolute visual-token counts: "218,128,54" or the authors' "[218, 128, 54]"."""
    items = _split(text, "token counts")
    if not items:
        raise ValueError(f"empty token counts {text!r}; use e.g. '218,128,54'")
    return tuple(_to_int(x, "token counts", text) for x in items)


def parse_ratios(text: str | Sequence[float]) -> tuple[float, ...]:
    """Parse ratios: "0.6,0.35,0.14" or "[0.6003, 0.3519, 0.1436]"."""
    items = _split(text, "ratios")
    if not items:
        raise ValueError(f"empty ratios {text!r}; use e.g. '0.6,0.35,0.14'")
    return tuple(_to_float(x, "ratios", text) for x in items)


def schedule_from_args(
    layers: str | Sequence[int] | None = None,
    tokens: str | Sequence[int] | None = None,
    ratios: str | Sequence[float] | None = None,
    budget: float | str | None = None,
    budget_ratio: float | str | None = None,
    preset: str | int | None = None,
    visual_token_num: int | str | None = None,
    ratio_mode: str = "initial",
) -> Schedule | None:
    """Build a :class:`Schedule` from runner flags; ``None`` (no pruning) when nothing is given.

    Args:
        layers: 1-based pruning layers (``--pio-layers`` / the authors' ``--layer_list``).
        tokens: absolute counts (the authors' ``--image_token_list``).
        ratios: per-stage ratios, interpreted by ``ratio_mode``.
        budget: average visual tokens per layer.
        budget_ratio: average as a fraction of each sample's n0.
        preset: "64", "128" or "192"; excludes every other schedule argument.
        visual_token_num: the authors' ``--visual_token_num``; only 576 (no encoder-side reduction) is
            supported.

    Raises:
        ValueError: inconsistent or malformed flags.
        EncoderReductionNotImplementedError: ``visual_token_num`` other than 576 (also a ValueError).
    """
    if visual_token_num is not None:
        vtn = _to_int(visual_token_num, "visual_token_num", visual_token_num)
        if vtn != ANCHOR_N0:
            raise EncoderReductionNotImplementedError(
                f"visual_token_num={vtn}: encoder-side reduction (the 'w/ VE' mode) is not implemented yet; "
                f"only {ANCHOR_N0} (keep every encoder token) is accepted"
            )
    explicit = {
        "layers": layers,
        "tokens": tokens,
        "ratios": ratios,
        "budget": budget,
        "budget_ratio": budget_ratio,
    }
    given = [k for k, v in explicit.items() if v is not None]
    if preset is not None:
        if given:
            raise ValueError(
                f"schedule preset {preset!r} cannot be combined with explicit {', '.join(given)}; give either a "
                f"preset or layers plus one target"
            )
        return _lookup_preset(preset)
    if not given:
        return None
    if layers is None:
        raise ValueError(
            f"{', '.join(given)} given without pruning layers; add layers such as '1,10,15' (or use a preset: "
            f"{', '.join(PRESETS)})"
        )
    targets = [k for k in given if k != "layers"]
    if not targets:
        raise ValueError(
            "pruning layers given without a target; add exactly one of tokens, ratios, budget, budget_ratio "
            f"(or use a preset: {', '.join(PRESETS)})"
        )
    return Schedule(
        layers=parse_layers(layers),
        tokens=None if tokens is None else parse_counts(tokens),
        ratios=None if ratios is None else parse_ratios(ratios),
        budget=None if budget is None else _to_float(budget, "budget", budget),
        budget_ratio=None if budget_ratio is None else _to_float(budget_ratio, "budget_ratio", budget_ratio),
        ratio_mode=ratio_mode,
    )
