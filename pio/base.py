"""The method interface: every visual-token reduction method is a small class behind it (DESIGN.md §2.4).

A method is a frozen dataclass whose fields are its hyper-parameters; its first field is the
:class:`~pio.schedule.Schedule` (after which decoder layers it acts, and how many visual tokens each stage
keeps). It declares what it needs from the model in :attr:`ReductionMethod.needs`:

``"hidden"``
    the hidden states at the pruning point, the valid-token mask and each sample's visual span (always given);
``"attention"``
    softmax attention probabilities of chosen query rows over all keys, computed explicitly for just those
    rows from a decoder layer's own queries and keys (:meth:`StageInputs.attention`), so the model keeps its
    attention backend (SDPA, eager, FlashAttention-2);
``"keys"``
    a decoder layer's rotated keys for every position (:meth:`StageInputs.keys`, DART's pivots);
``"norm"``
    the model's final norm (:meth:`StageInputs.final_norm`, DART's similarity features);
``"embeddings"``
    the prefill's input embeddings and visual spans (:meth:`StageInputs.embeddings`, SparseVLM's raters);
``"proxy"``
    PIO's layer-local proxy (:meth:`StageInputs.proxy`).

At each of its stages, in prefill, the model adapter hands the method a :class:`StageInputs` and the method
returns a :class:`Selection`: per sample the kept positions local to its visual span (ascending), and
optionally new merged tokens that follow them. Methods never touch the model; the adapter supplies only what
was declared, and :func:`pio.gather.build_keep_index` is the one place kept positions are applied.

A method that ranks the visual tokens and keeps the best ones subclasses :class:`ScorerMethod` (the shape of
NVIDIA/kvpress's ``ScorerPress``) and writes only ``score``; the per-sample loop (active samples, span slicing,
the stable top-k, kept indices ascending) is the base class's, and a method that does more than top-k (NMS,
recycling, merging) overrides its per-sample hook ``choose``.

Adding a method touches three places: its class (``pio/methods/<name>.py``), its registry entry (the list in
``pio/methods/__init__.py``) and its test entry (the naive reference in ``tests/test_methods.py``); and the README
names it (``docs/methods.md``, "Adding a method").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch

from .budget import Anchors
from .family import ModelFamily, model_family
from .gather import Span
from .nms import topk_indices
from .parse import parse_counts
from .proxy import ProxyFn
from .schedule import PAPER_N0, Schedule

__all__ = ["NEEDS", "Flag", "ReductionMethod", "SampleScores", "ScorerMethod", "Selection", "StageInputs",
           "active_samples"]

NEEDS = ("hidden", "attention", "keys", "norm", "embeddings", "proxy")
POSITIONS = ("renumber", "original")
LAYER_CHOICES = ("current", "next")


class StageInputs(Protocol):
    """What the model adapter hands a method at one pruning stage (prefill only).

    Attributes:
        layer: the 1-based decoder layer that just ran (pruning happens after it).
        stage: index of this stage in the method's schedule.
        hidden: (B, S, D) output of that layer, the residual stream at the pruning point.
        mask: (B, S) bool, valid (non-padding) tokens.
        spans: per sample ``(start, length)`` of its current visual span, or None (text only).
        targets: per sample the number of visual tokens to keep at this stage.
    """

    layer: int
    stage: int
    hidden: torch.Tensor
    mask: torch.Tensor
    spans: Sequence[Span | None]
    targets: Sequence[int]

    def attention(self, rows: torch.Tensor, which: str = "current") -> torch.Tensor:
        """Attention probabilities (B, H, R, S) float32 of the query rows ``rows`` (B, R) over all keys.

        ``which="current"``: the decoder layer that just ran (0-based ``layer-1``, on its input), as FastV
        reads it; ``"next"``: the first layer that will see the pruned sequence (0-based ``layer``, on
        ``hidden``), as PDrop recomputes it. Causal and padding-masked; rows of padding give a uniform row.
        Needs ``"attention"``.
        """
        ...

    def keys(self, which: str = "current", heads: bool = False) -> torch.Tensor:
        """Rotated keys (B, S, H_kv * head_dim) of the ``which`` decoder layer at every position; with ``heads``
        per key/value head, (B, S, H_kv, head_dim). Needs ``"keys"``."""
        ...

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm applied to ``x`` (B, S, D). Needs ``"norm"``."""
        ...

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor, Sequence[Span | None]]:
        """The prefill's decoder input (B, S0, D), its valid mask (B, S0) and each sample's visual span in it.
        Needs ``"embeddings"``."""
        ...

    def proxy(self, which: str = "next", impl: str = "sliced") -> ProxyFn:
        """PIO's proxy (:mod:`pio.proxy`) through the ``which`` decoder layer. Needs ``"proxy"``."""
        ...

    def timed(self, name: str) -> AbstractContextManager:
        """Accumulate the wall time of a phase of the selection under ``name`` when profiling."""
        ...


@dataclass
class Selection:
    """A method's decision at one stage.

    Attributes:
        keep: per sample the kept indices local to its visual span (LongTensor, ascending), or None where the
            sample is left whole (no image, or already within its target).
        merged: optional, per sample a (m, D) tensor of new tokens (e.g. recycled ones) placed right after the
            kept visual tokens, or None.
    """

    keep: list[torch.Tensor | None]
    merged: list[torch.Tensor | None] | None = None


@dataclass(frozen=True)
class Flag:
    """A method-specific command-line flag for one field (``--<method>-<name>``)."""

    field: str
    name: str
    type: Any = None  # argparse type; None with ``const`` for a switch
    help: str = ""
    const: Any = None  # switches: the value stored when the flag is given
    choices: tuple | None = None


@dataclass(frozen=True)
class ReductionMethod(ABC):
    """Base of every method. Subclasses are frozen dataclasses; every field after these two has a default.

    Fields:
        schedule: after which decoder layers the method acts and how many visual tokens each stage keeps.
        positions: ``renumber`` (positions contiguous over the kept tokens, as PIO's, PDrop's and SparseVLM's
            LLaVA code does) or ``original`` (kept tokens keep their positions, with gaps, as FastV and DART
            do); each method defaults to its authors' choice.

    Class attributes:
        name: registry name (``--method NAME``).
        needs: what the method asks the model for, a subset of :data:`NEEDS`.
        where: ``"llm"``: after the decoder layers of its schedule (every method so far; a stage before the
            language model, on the encoder's features, is the next interface extension).
        default_layers: the layers of the method's published configuration.
        default_ratio_mode: how its ``--ratios`` are read (``initial`` or ``current``, :class:`Schedule`).
        ve_layers: its layers after an encoder-side stage (the paper's "w/ VE" rows); None: ``default_layers``.
        anchors: the published schedules that give the budget solver its shape (:mod:`pio.budget`);
            None: every stage keeps the same count.
        flags: method-specific command-line flags.
        source: where the defaults come from (paper, repository), for the docs and result files.
        family_defaults: per model family name (``"qwen2_5_vl"``), the authors' own settings there where they differ:
            ``layers``, ``ve_layers``, ``anchors`` and ``options`` (hyper-parameter defaults).
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"hidden"})
    where: ClassVar[str] = "llm"
    default_layers: ClassVar[tuple[int, ...]]
    default_ratio_mode: ClassVar[str] = "initial"
    ve_layers: ClassVar[tuple[int, ...] | None] = None
    anchors: ClassVar[Anchors | None] = None
    flags: ClassVar[tuple[Flag, ...]] = ()
    source: ClassVar[str] = ""
    family_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    schedule: Schedule
    positions: str = "renumber"

    @classmethod
    def defaults(cls, family: str | ModelFamily | None = None) -> dict[str, Any]:
        """``layers``, ``ve_layers``, ``anchors`` and the hyper-parameter ``options`` for a model ``family`` (a
        :class:`~pio.family.ModelFamily` or its registered name; None: the methods' published setting, LLaVA's):
        the family's options for every method (e.g. Qwen2.5-VL's original M-RoPE positions, the PIO authors' Qwen
        choice), then the method's own :attr:`family_defaults` for it."""
        fam = model_family(family)
        out: dict[str, Any] = {"layers": cls.default_layers, "ve_layers": cls.ve_layers, "anchors": cls.anchors,
                               "options": dict(fam.method_options) if fam is not None else {}}
        own = cls.family_defaults.get(fam.name if fam is not None else "", {})
        out.update({k: v for k, v in own.items() if k != "options"})
        out["options"] = {**out["options"], **own.get("options", {})}
        return out

    @classmethod
    def ve_preset(cls, pre: type, budget: float, family: str | ModelFamily | None = None, **options: Any) -> Any:
        """A published encoder + in-LLM configuration for the "w/ VE" budget ``budget`` on ``family`` with the
        encoder-side method ``pre`` (a :class:`pio.encoder.Pipeline`), or None: the generic w/ VE rule applies
        (:meth:`pio.encoder.Pipeline.from_budget`). VFlowOpt's OneVision strategies are one."""
        return None

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def schedule_for(
        cls,
        layers: Sequence[int] | None = None,
        *,
        budget: float | None = None,
        budget_ratio: float | None = None,
        budget_tokens: float | None = None,
        tokens: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None,
        ratio_mode: str = "initial",
        family: str | ModelFamily | None = None,
    ) -> Schedule:
        """The method's schedule for one target: a paper budget label ``budget`` (64, 128, 192: the average
        visual tokens per layer as a fraction of 576, so exactly that on LLaVA-1.5 and the same share of each
        image's tokens on LLaVA-NeXT), ``budget_ratio``, an absolute average ``budget_tokens``, or explicit
        ``tokens`` / ``ratios``. ``layers`` defaults to the method's published layers (for ``family``)."""
        given = {k: v for k, v in dict(budget=budget, budget_ratio=budget_ratio, budget_tokens=budget_tokens,
                                       tokens=tokens, ratios=ratios).items() if v is not None}
        if len(given) != 1:
            what = " and ".join(given) if given else "none"
            raise ValueError(f"{cls.name}: give exactly one of budget, budget_ratio, budget_tokens, tokens, "
                             f"ratios; got {what}")
        if budget is not None:
            if not 0 < budget <= PAPER_N0:
                raise ValueError(f"budget {budget:g} must be in (0, {PAPER_N0}]: the paper's average visual tokens "
                                 f"per layer out of LLaVA-1.5's {PAPER_N0} (e.g. 64, 128, 192)")
            budget_ratio = budget / PAPER_N0
        d = cls.defaults(family)
        return Schedule(
            layers=tuple(layers) if layers is not None else d["layers"],
            tokens=None if tokens is None else tuple(tokens),
            ratios=None if ratios is None else tuple(ratios),
            budget=budget_tokens,
            budget_ratio=budget_ratio,
            ratio_mode=ratio_mode,
            anchors=d["anchors"],
        )

    @classmethod
    def from_budget(cls, budget: float, layers: Sequence[int] | None = None, family: str | ModelFamily | None = None,
                    **options: Any) -> ReductionMethod:
        """The method at a paper budget label (64, 128, 192; see :meth:`schedule_for`) with its defaults for
        ``family``; ``options`` override them."""
        return cls(cls.schedule_for(layers, budget=budget, family=family),
                   **{**cls.defaults(family)["options"], **options})

    @classmethod
    def read_tokens(cls, text: Any) -> tuple[tuple[int, ...], dict[str, Any]]:
        """The per-stage counts of a ``tokens`` option as the user wrote it (``--tokens 92,54,22``, the authors'
        ``--image_token_list [92, 54, 22]``), and the options of the method that the same spelling gives (none
        here; a method whose authors write more per stage reads it, e.g. VisionDrop's ``[dominant, contextual]``
        pairs)."""
        return parse_counts(text), {}

    # -- what the model asks ----------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """1-based decoder layers after which the method acts."""
        return self.schedule.layers

    def counts(self, n0: int, num_layers: int) -> list[int]:
        """Visual tokens to keep after each stage for a sample with ``n0`` visual tokens."""
        return self.schedule.counts(n0, num_layers)

    def validate(self, num_layers: int) -> None:
        """Check the configuration against a ``num_layers``-layer decoder (raises ValueError)."""
        self.schedule.validate(num_layers)
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{self.name}: unknown needs {sorted(unknown)}; allowed: {', '.join(NEEDS)}")

    @abstractmethod
    def select(self, inputs: StageInputs) -> Selection:
        """Kept visual positions per sample at one stage (see :class:`Selection`)."""

    def encoder_stage(self) -> Any:
        """An encoder-side stage (:class:`pio.encoder.EncoderMethod`) the method runs itself before the language
        model, as its authors do (VisionDrop: VisionZip-style dominant and contextual tokens), or None. The model
        runs it like the first method of a composition (:func:`pio.encoder.split_reducer`)."""
        return None

    # -- reporting ----------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The hyper-parameters other than the schedule."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "schedule"}

    def config(self) -> dict[str, Any]:
        """The full configuration as JSON-serialisable data (method, schedule, hyper-parameters)."""
        return {"method": self.name, "schedule": self.schedule.to_dict(), **self.options()}

    def describe(self, n0: int = PAPER_N0) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}: {self.schedule.describe(n0)}" + (f" ({opts})" if opts else "")



def active_samples(inputs: StageInputs) -> list[bool]:
    """Samples pruned at this stage: an image whose span is longer than its target."""
    return [s is not None and 0 <= t < s[1] for s, t in zip(inputs.spans, inputs.targets)]


@dataclass(frozen=True)
class SampleScores:
    """One sample pruned at a stage, as :meth:`ScorerMethod.choose` sees it.

    Attributes:
        index: its row in the batch.
        start: where its visual span starts.
        length: the span's length ``n``.
        target: visual tokens to keep, fewer than ``n``.
        row: (S,) its scores at every position (:meth:`ScorerMethod.score`).
    """

    index: int
    start: int
    length: int
    target: int
    row: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        """(n,) the scores of the visual tokens."""
        return self.row[self.start : self.start + self.length]

    def span(self, x: torch.Tensor) -> torch.Tensor:
        """The visual span's rows of the batch tensor ``x`` (B, S, ...) -> (n, ...)."""
        return x[self.index, self.start : self.start + self.length]


@dataclass(frozen=True)
class ScorerMethod(ReductionMethod):
    """An in-LLM method that scores the visual tokens and keeps each sample's best ones (the shape of
    NVIDIA/kvpress's ``ScorerPress``).

    A subclass writes :meth:`score`, (B, S) scores of the whole batch; :meth:`select` runs the per-sample loop:
    samples without an image or already within their target are left whole, the others keep the top ``target``
    of their span by score, ties broken by the lower index, kept indices ascending. A method that does more than
    top-k (PIO's NMS, SparseVLM's and VFlowOpt's recycling, VisionDrop's merging) overrides the per-sample hook
    :meth:`choose`, and :meth:`prepare` for batch-level inputs that hook reads.

    Class attributes:
        phase: the profile phase the per-sample loop is timed under.
    """

    phase: ClassVar[str] = "score"

    @abstractmethod
    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """(B, S) scores of every position, higher kept; only the visual spans of the ``active`` samples (see
        :func:`active_samples`) are read."""

    def prepare(self, inputs: StageInputs, active: Sequence[bool]) -> Any:
        """Batch-level inputs of :meth:`choose`, computed once per stage after :meth:`score` (default: none)."""
        return None

    def choose(self, inputs: StageInputs, sample: SampleScores, prepared: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sample's kept indices local to its span (LongTensor, ascending) and the merged tokens (m, D) that
        follow them, or None: here the top ``sample.target`` by score, ties to the lower index."""
        return topk_indices(sample.scores, sample.target), None

    def select(self, inputs: StageInputs) -> Selection:
        active = active_samples(inputs)
        if not any(active):
            return Selection([None] * len(active))
        scores = self.score(inputs, active)  # (B, S)
        prepared = self.prepare(inputs, active)
        keep: list[torch.Tensor | None] = []
        merged: list[torch.Tensor | None] = []
        with inputs.timed(self.phase):
            for b, (span, target) in enumerate(zip(inputs.spans, inputs.targets)):
                kept, new = (None, None) if not active[b] else self.choose(
                    inputs, SampleScores(b, span[0], span[1], target, scores[b]), prepared)
                keep.append(kept)
                merged.append(new)
        return Selection(keep, merged if any(m is not None for m in merged) else None)
