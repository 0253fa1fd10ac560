"""Reduction before the language model: methods that act on each crop's visual features (DESIGN.md §1).

An encoder-side method sees every crop of every image at once (LLaVA-1.5: one 24 x 24 crop per image;
LLaVA-NeXT: the base view and every grid crop, before they are tiled), and returns per crop the patches it
keeps (ascending), optionally their new features (tokens merged into the kept ones) and extra tokens placed
after them (merged "contextual" tokens). What it may ask the model for (``needs``):

``"features"``
    the projected features (N, P, D), what the language model would see (always given);
``"cls_attention"``
    the vision encoder's attention of its CLS token over the patches at a layer (N, H, P), recomputed from that
    layer's input for the one row (the tower keeps its attention backend);
``"hidden"``
    the encoder's hidden states (N, 1 + P, C), CLS first, e.g. the selected feature layer's, and ``project`` to
    map such features through the projector (merging before the projector, as VisionZip does);
``"keys"``
    an encoder layer's keys of the patches (N, P, H, head_dim);
``"received_attention"``
    the attention each token receives at a layer, summed over heads and averaged over the query rows (and over
    the patches merged into one token): what a tower without a CLS token offers instead (Qwen2.5-VL's);
``"attention"``
    an encoder layer's full softmax attention over all its tokens (N, T, T; T = P, plus 1 for a CLS token,
    first), averaged over heads, recomputed from that layer's input (VFlowOpt's "global" query rows);
``"pixels"``
    the crops' 8-bit pixel values (N, 3, H, W) as the image processor resized them, its normalisation undone
    (VFlowOpt's patch entropy).

The model describes its vision tower by capability flags (:class:`TowerTraits`: a CLS token or not, how many
encoder patches make one language-model token, fixed-size crops or one grid per image) and serves the needs it
can; a method declares the flags it ``requires`` (VisionZip: ``{"cls_token"}``) and is refused by name, before
it runs, on a tower without them. Without a CLS token, ``hidden`` and ``attention`` have no CLS row.

A run composes an encoder-side method and an in-language-model one with :class:`Pipeline`
(``--method visionzip+pio``); the in-LLM stages then see the reduced span. The budget of a composition is still
the average number of visual tokens per decoder layer (:meth:`Pipeline.from_budget`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch

from .base import Flag, ReductionMethod
from .family import ModelFamily
from .schedule import PAPER_N0, _warn_once

__all__ = ["ENCODER_NEEDS", "TOWER_REQUIREMENTS", "EncoderInputs", "EncoderMethod", "EncoderSelection", "Pipeline",
           "TowerTraits", "split_reducer"]

ENCODER_NEEDS = ("features", "cls_attention", "hidden", "keys", "received_attention", "attention", "pixels")
LEAD, KEPT, EXTRA = "lead", "kept", "extra"


@dataclass(frozen=True)
class TowerTraits:
    """What a model's vision tower is, as the encoder-side methods see it.

    Attributes:
        cls_token: its hidden states start with a CLS token (CLIP); False for SigLIP and Qwen2.5-VL's tower.
        patches_per_token: encoder patches merged into one language-model token (Qwen2.5-VL: 4, its 2 x 2
            merger; CLIP and SigLIP: 1).
        per_crop: images arrive as fixed-size crops of one patch grid (LLaVA's base view and anyres crops);
            False: one grid per image, its size following the image (Qwen2.5-VL).
    """

    cls_token: bool
    patches_per_token: int = 1
    per_crop: bool = True

    @property
    def unmerged(self) -> bool:
        """Every language-model token is one encoder patch."""
        return self.patches_per_token == 1


TOWER_REQUIREMENTS = {
    "cls_token": "the CLS attention of a vision tower with a CLS token",
    "unmerged": "one encoder patch per language-model token",
    "per_crop": "a vision tower that encodes fixed-size crops",
}
"""The :class:`TowerTraits` flags a method may require (:attr:`EncoderMethod.requires`), and what each means."""


class EncoderInputs(Protocol):
    """What the model hands an encoder-side method: every crop of the batch's images.

    Attributes:
        features: (N, P, D) projected features of the N crops, P patches each.
        grid: (rows, cols) of a crop's patch grid (24 x 24 for CLIP ViT-L/14 at 336 px).
        crops: per crop ``(image index, crop index)``; crop 0 of an image is its base view.
        targets: per crop the number of tokens to keep.
        tower: what the vision tower is (:class:`TowerTraits`).
        full_attention_layers: the encoder layers that attend over the whole image (every layer of CLIP; Qwen's
            full-attention blocks between its windowed ones).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    crops: Sequence[tuple[int, int]]
    targets: Sequence[int]
    tower: TowerTraits
    full_attention_layers: Sequence[int]

    def cls_attention(self, layer: int) -> torch.Tensor:
        """(N, H, P) float32: the CLS query's softmax attention (over CLS and patches) at the patches, in encoder
        layer ``layer`` (0-based; negative counts from the end, ``-2``: the penultimate layer)."""
        ...

    def hidden(self, index: int) -> torch.Tensor:
        """(N, T, C), a CLS token first where the tower has one: the encoder's hidden states ``index``,
        transformers' indexing (0: the embeddings, ``i``: layer i-1's output, ``-2``: the penultimate layer's
        output, which LLaVA projects)."""
        ...

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The model's projector applied to encoder features ``x`` (..., C) -> (..., D). Needs ``"hidden"``."""
        ...

    def keys(self, layer: int) -> torch.Tensor:
        """(N, P, H, head_dim): layer ``layer``'s keys of the patches, per head."""
        ...

    def received_attention(self, layer: int) -> torch.Tensor:
        """(N, P) float32: the softmax attention each token receives in encoder layer ``layer`` (negative: from
        the end), summed over heads, averaged over the query rows and over the patches merged into the token."""
        ...

    def attention(self, layer: int) -> torch.Tensor:
        """(N, T, T) float32 (float64 for a float64 tower): encoder layer ``layer``'s softmax attention of every
        query over every key (a CLS token first where the tower has one), averaged over heads."""
        ...

    def pixels(self) -> torch.Tensor:
        """(N, 3, H, W) float32: each crop's pixel values 0..255 (the processor's normalisation undone, rounded)."""
        ...

    def timed(self, name: str) -> AbstractContextManager:
        ...


@dataclass
class EncoderSelection:
    """Per crop: ``keep`` the kept patch indices (ascending), optionally ``features`` (len(keep), D) to place at
    them (e.g. with dropped tokens merged in), ``lead`` (l, D) tokens placed before them (VisionZip's CLS token)
    and ``extra`` (m, D) tokens after them (merged contextual tokens). Features are in the projected space."""

    keep: list[torch.Tensor]
    features: list[torch.Tensor | None] | None = None
    lead: list[torch.Tensor | None] | None = None
    extra: list[torch.Tensor | None] | None = None


@dataclass(frozen=True)
class EncoderMethod(ABC):
    """Base of every encoder-side method: a frozen dataclass whose fields are its hyper-parameters.

    Fields:
        tokens: tokens the language model gets per crop (LLaVA-1.5: per image), merged ones included.

    Class attributes:
        needs: what it asks the model for, a subset of :data:`ENCODER_NEEDS`.
        requires: the :class:`TowerTraits` flags the vision tower must have (:data:`TOWER_REQUIREMENTS`);
            by default a CLS token, what most published encoder-side methods read.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"features"})
    requires: ClassVar[frozenset[str]] = frozenset({"cls_token"})
    where: ClassVar[str] = "pre_llm"
    flags: ClassVar[tuple[Flag, ...]] = ()
    source: ClassVar[str] = ""

    tokens: int

    @classmethod
    def from_budget(cls, budget: float, **options: Any) -> EncoderMethod:
        """The method at the paper's budget row B: B of a crop's 576 tokens in every decoder layer (the same share
        of a crop with another patch count)."""
        if not 0 < budget <= PAPER_N0:
            raise ValueError(f"budget {budget:g} must be in (0, {PAPER_N0}]: tokens per crop out of {PAPER_N0}")
        return cls(tokens=int(round(budget)), **options)

    def target(self, patches: int) -> int:
        """Tokens to keep of a crop with ``patches`` patches (``tokens`` out of 576, scaled, at most all); a crop
        whose target is all its patches is left whole (said once in the log)."""
        target = max(1, round(self.tokens * patches / PAPER_N0))
        if target >= patches:
            _warn_once(f"{self.name} keeps {self.tokens} tokens per crop of {PAPER_N0}: a crop of {patches} patches "
                       "keeps all of them and nothing is reduced before the language model")
        return min(patches, target)

    def validate(self, num_layers: int | None = None) -> None:
        """Check the configuration (``num_layers``, the decoder's depth, is not needed before the LLM)."""
        if self.tokens < 1:
            raise ValueError(f"{self.name}: tokens per crop must be >= 1, got {self.tokens}")
        unknown = set(self.needs) - set(ENCODER_NEEDS)
        if unknown:
            raise ValueError(f"{self.name}: unknown needs {sorted(unknown)}; allowed: {', '.join(ENCODER_NEEDS)}")
        unknown = set(self.requires) - set(TOWER_REQUIREMENTS)
        if unknown:
            raise ValueError(f"{self.name}: unknown requirements {sorted(unknown)}; allowed: "
                             f"{', '.join(TOWER_REQUIREMENTS)}")

    @classmethod
    def runs_on(cls, tower: TowerTraits) -> bool:
        """Whether ``tower`` has every flag the method :attr:`requires`."""
        return all(getattr(tower, r) for r in cls.requires)

    @abstractmethod
    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        """Per crop the kept patches and their features (see :class:`EncoderSelection`); called only when the
        target is fewer than the crop's patches (the model leaves a crop whole otherwise)."""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "where": self.where, **self.options()}

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.options().items())


VE_SHARE = 1.5
"""A composition's encoder keeps 1.5x the budget per crop (the authors' w/ VE: 96 at the encoder for 64)."""


@dataclass(frozen=True)
class Pipeline:
    """An encoder-side method followed by an in-language-model one (``--method visionzip+pio``)."""

    pre: EncoderMethod
    llm: ReductionMethod

    def __post_init__(self) -> None:
        own = self.llm.encoder_stage()
        if own is not None:
            raise ValueError(f"{self.llm.name} runs its own encoder stage ({own.describe()}); run --method "
                             f"{self.llm.name} alone, or give it explicit --tokens after {self.pre.name}")

    @property
    def name(self) -> str:
        return f"{self.pre.name}+{self.llm.name}"

    @classmethod
    def from_budget(cls, pre: type[EncoderMethod], llm: type[ReductionMethod], budget: float,
                    layers: Sequence[int] | None = None, family: str | ModelFamily | None = None,
                    **options: Any) -> Pipeline:
        """The paper's "w/ VE" row B: the encoder keeps ``1.5 B`` per crop (the authors' 96 for 64), then the
        in-LLM method, after its w/ VE layers (PIO: 16, the authors' README), keeps what makes the average over the
        decoder layers B: for one stage after layer L/2, a third of the encoder's tokens (96 -> 32)."""
        if not 0 < budget <= PAPER_N0 / VE_SHARE:
            raise ValueError(f"budget {budget:g} w/ VE must be in (0, {PAPER_N0 / VE_SHARE:g}]: the encoder keeps "
                             f"{VE_SHARE:g} x the budget per crop of {PAPER_N0} (the paper's 64, 128, 192)")
        if layers is None:
            preset = llm.ve_preset(pre, budget, family, **options)
            if preset is not None:
                return preset
        encoder_tokens = VE_SHARE * budget
        d = llm.defaults(family)
        layers = layers if layers is not None else (d["ve_layers"] or d["layers"])
        schedule = llm.schedule_for(layers, budget_ratio=1 / VE_SHARE, family=family)
        return cls(pre.from_budget(encoder_tokens), llm(schedule, **{**d["options"], **options}))

    def validate(self, num_layers: int) -> None:
        self.pre.validate()
        self.llm.validate(num_layers)

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "pre": self.pre.config(), "llm": self.llm.config()}

    def describe(self) -> str:
        return f"{self.pre.describe()}; then {self.llm.describe(self.pre.tokens)}"


def split_reducer(reducer: Any) -> tuple[EncoderMethod | None, ReductionMethod | None]:
    """``(encoder-side method, in-LLM method)`` of whatever a caller passed as ``reducer`` (an in-LLM method that
    runs its own encoder stage, :meth:`~pio.base.ReductionMethod.encoder_stage`, gives both)."""
    if reducer is None:
        return None, None
    if isinstance(reducer, Pipeline):
        return reducer.pre, reducer.llm
    if isinstance(reducer, EncoderMethod):
        return reducer, None
    if isinstance(reducer, ReductionMethod):
        return reducer.encoder_stage(), reducer
    raise TypeError(f"reducer must be a reduction method or a Pipeline, got {type(reducer).__name__}")
