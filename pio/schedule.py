"""Pruning schedules: which decoder layers prune, and to how many visual tokens (``docs/method.md`` §3).

A schedule is a strictly increasing tuple of 1-based layers ``l_1 < ... < l_K``. Pruning at ``l`` happens in
prefill right after decoder layer ``l`` (0-based index ``l-1``) has run, and shortens the sequence seen by the
0-based layers ``l ... L-1``. The target of every stage is given in exactly one of four ways:

``tokens``
    absolute visual counts ``c_1 >= ... >= c_K`` (the authors' ``--image_token_list``), clipped to each
    sample's initial visual count ``n0``.
``ratios``
    fractions in ``(0, 1]``. With ``ratio_mode="initial"`` (default) stage ``j`` keeps ``int(ratio_j * n0)``;
    with ``ratio_mode="current"`` it keeps ``int(ratio_j * c_{j-1})`` (multiplicative; the semantics of the
    authors' Qwen2.5-VL code and of PDrop's ratio lists).
``budget``
    an *average* number of visual tokens per decoder layer (absolute), solved per sample by
    :func:`pio.budget.budget_counts` with the schedule's ``anchors`` (the method's published shape).
``budget_ratio``
    the same average, as a fraction of each sample's ``n0`` (LLaVA-NeXT, where ``n0`` varies per image). The
    paper's budget labels 64 / 128 / 192 are fractions of LLaVA-1.5's 576 tokens (:data:`PAPER_N0`).

Every count is at least 1 when ``n0 >= 1``; a sample with ``n0 == 0`` (text only) gets zeros.

Average visual tokens per layer (the paper's accounting, §3.1), with ``c_0 = n0``, ``l_0 = 0``,
``l_{K+1} = L``::

    avg = (1/L) * sum_{j=0..K} c_j * (l_{j+1} - l_j)

e.g. layers (1, 10, 15), n0 = 576, counts (218, 128, 54), L = 32 gives (576 + 9*218 + 5*128 + 17*54)/32 = 128.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .budget import Anchors, budget_counts

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)

__all__ = ["PAPER_N0", "RATIO_MODES", "Schedule", "average_visual_tokens", "realised_average"]

RATIO_MODES = ("initial", "current")
PAPER_N0 = 576
"""Visual tokens of one LLaVA-1.5 image: the papers' budgets 64 / 128 / 192 are fractions of it."""

_TOL = 1e-9


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
# Schedule
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Which decoder layers prune, and to how many visual tokens (``docs/method.md`` §1, §3).

    Attributes:
        layers: strictly increasing 1-based layers in ``1..L``; pruning after layer ``l`` (0-based ``l-1``)
            shortens the sequence for 0-based layers ``l .. L-1``. A method may narrow the range (PIO's "next"
            proxy needs a layer after the pruning point).
        tokens: absolute targets per layer (non-increasing, >= 1), clipped to each sample's ``n0``.
        ratios: fractions in ``(0, 1]`` per layer, of ``n0`` (``ratio_mode="initial"``, non-increasing) or of
            the previous stage's count (``ratio_mode="current"``, authors' Qwen semantics).
        ratio_mode: "initial" or "current"; only used with ``ratios``.
        budget: average visual tokens per decoder layer (absolute), solved per sample.
        budget_ratio: average visual tokens per layer as a fraction of each sample's ``n0``, in ``(0, 1]``.
        anchors: the shape a budget is solved with (:class:`pio.budget.Anchors`, the method's published
            schedules); None: every stage the same count.

    Exactly one of ``tokens``, ``ratios``, ``budget``, ``budget_ratio`` must be given. Structural checks run
    at construction; :meth:`validate` adds the depth-dependent ones.
    """

    layers: tuple[int, ...]
    tokens: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    budget: float | None = None
    budget_ratio: float | None = None
    ratio_mode: str = "initial"
    anchors: Anchors | None = None

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

    def validate(self, num_layers: int) -> None:
        """Check the schedule against a decoder of ``num_layers`` layers.

        Raises:
            ValueError: saying what is wrong and what is allowed.
        """
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self._check_structure()
        bad = [x for x in self.layers if not (1 <= x <= num_layers)]
        if bad:
            raise ValueError(
                f"layers {bad} out of range for a {num_layers}-layer decoder: allowed 1..{num_layers} (pruning "
                "happens after one of the L layers)"
            )
        if self.budget_ratio is not None and self.budget_ratio * num_layers <= self.layers[0] + _TOL:
            floor = self.layers[0] / num_layers
            raise ValueError(
                f"budget {self.budget_ratio * PAPER_N0:.4g} of {PAPER_N0} (budget_ratio {self.budget_ratio:.4g}) is not "
                f"achievable with first pruning layer {self.layers[0]} of {num_layers}: the first "
                f"{self.layers[0]} layer(s) alone already average {floor:.4g} of the visual tokens "
                f"({floor * PAPER_N0:.4g} of {PAPER_N0}); give a larger budget or prune earlier (--layers)"
            )

    # -- counts -------------------------------------------------------------------------------------------

    def counts(self, n0: int, num_layers: int) -> list[int]:
        """Visual-token targets after each pruning layer for a sample with ``n0`` visual tokens.

        Returns ``K`` non-increasing ints, each in ``1..n0`` (all 0 when ``n0 == 0``).

        Raises:
            ValueError: invalid schedule for this depth, or a budget not achievable for this ``n0``.
        """
        self.validate(num_layers)
        n0 = int(n0)
        k = len(self.layers)
        if n0 < 0:
            raise ValueError(f"n0 must be >= 0, got {n0}")
        if n0 == 0:
            return [0] * k
        if self.tokens is not None:
            over = [(lay, t) for lay, t in zip(self.layers, self.tokens) if t >= n0]
            if over:
                _warn_once(f"a sample has {n0} visual tokens; stage(s) " + ", ".join(
                    f"after layer {lay} (keep {t})" for lay, t in over) + " keep all of them and prune nothing")
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
        if self.budget_ratio is not None and self.anchors is not None and self.anchors.mode == "counts":
            return self.anchors.published_counts(n0, self.layers, num_layers, self.budget_ratio)
        budget = self.budget if self.budget is not None else self.budget_ratio * n0
        return budget_counts(n0, self.layers, num_layers, budget, self.anchors)

    def average(self, n0: int, num_layers: int) -> float:
        """Average visual tokens per layer realised by :meth:`counts` for this ``n0`` (§3.1)."""
        return average_visual_tokens(n0, self.layers, self.counts(n0, num_layers), num_layers)

    # -- reporting ----------------------------------------------------------------------------------------

    def describe(self, n0: int = PAPER_N0) -> str:
        """One-line human-readable description for logs; ``n0``: the visual tokens per image the language model
        receives (576 for LLaVA-1.5; fewer after an encoder-side stage)."""
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
            f"({r * n0:.4g} of {n0})"
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
            "anchors": None if self.anchors is None else {
                "layers": list(self.anchors.layers), "num_layers": self.anchors.num_layers, "n0": self.anchors.n0,
                "schedules": {str(b): list(c) for b, c in self.anchors.schedules}, "source": self.anchors.source,
                "mode": self.anchors.mode,
            },
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
            anchors=None if data.get("anchors") is None else Anchors(
                layers=tuple(data["anchors"]["layers"]), num_layers=data["anchors"]["num_layers"],
                n0=data["anchors"]["n0"], source=data["anchors"].get("source", ""),
                mode=data["anchors"].get("mode", "average"),
                schedules=tuple((int(b), tuple(c)) for b, c in data["anchors"]["schedules"].items()),
            ),
        )


