"""The encoder-side reduction step, the same for every family: it hands an encoder-side method what it asks for,
runs its selection per crop, and applies the kept tokens to each image's token sequence.

A family describes its vision tower to the step through an :class:`EncoderTower` (its capability flags, its
patch grid, and the needs it serves: CLIP's CLS attention and hidden states, Qwen2.5-VL's received attention, ...)
built for one call's encoded crops. Then, for every family::

    check_tower(method, tower.traits)                       # refused by name where the tower lacks a requirement
    reduced = reduce_crops(method, tower, features, crops, state)   # one ReducedCrop per crop
    tokens, record = apply_kept(layout, reduced, fill)      # per image, through its ImageLayout

:func:`apply_kept` is the one place kept encoder tokens are applied: it keeps exactly the kept patches (tokens of
no crop, LLaVA-NeXT's newlines, always), places merged features and a method's added tokens, and records where
each kept token sits in the unreduced sequence (:class:`pio.state.EncoderRecord`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from pio.encoder import TOWER_REQUIREMENTS, EncoderMethod, EncoderSelection, TowerTraits
from pio.state import EncoderRecord, SelectionEvent

from .layout import ImageLayout

__all__ = ["EncoderStage", "EncoderTower", "ReducedCrop", "apply_kept", "check_tower", "reduce_crops"]


@dataclass
class ReducedCrop:
    """One crop after the encoder-side step: ``mask`` (P,) bool, ``features`` (P, D) (kept rows possibly
    merged), ``lead`` (l, D) tokens before the crop's kept ones and ``extra`` (m, D) after them, or None."""

    mask: torch.Tensor
    features: torch.Tensor
    extra: torch.Tensor | None = None
    lead: torch.Tensor | None = None


class EncoderTower(Protocol):
    """A family's vision tower over one call's crops (N crops of one ``grid``), as the step reads it.

    Attributes:
        traits: its capability flags.
        grid: (rows, cols) of a crop's token grid.
        full_attention_layers: the encoder layers that attend over the whole crop.
        provides: the needs (:data:`pio.encoder.ENCODER_NEEDS`) it can serve, ``"features"`` always.
        sequence_length: the tokens one crop's encoder attention spans (CLS included), for the FLOPs accounting.

    The methods are :class:`pio.encoder.EncoderInputs`' own, over these N crops.
    """

    traits: TowerTraits
    grid: tuple[int, int]
    full_attention_layers: Sequence[int]
    provides: frozenset[str]
    sequence_length: int

    def cls_attention(self, layer: int) -> torch.Tensor: ...

    def hidden(self, index: int) -> torch.Tensor: ...

    def project(self, x: torch.Tensor) -> torch.Tensor: ...

    def keys(self, layer: int) -> torch.Tensor: ...

    def attention(self, layer: int) -> torch.Tensor: ...

    def received_attention(self, layer: int) -> torch.Tensor: ...

    def pixels(self) -> torch.Tensor: ...


_WHAT = {"cls_attention": "the CLS attention", "hidden": "the encoder's hidden states", "keys": "the encoder's keys",
         "attention": "the encoder's full attention", "received_attention": "the attention its tokens receive",
         "pixels": "the crops' pixels"}
_EVENTS = {"cls_attention": "encoder_attention", "keys": "encoder_keys", "attention": "encoder_received",
           "received_attention": "encoder_received"}  # what pio.flops counts for each


class EncoderStage:
    """:class:`pio.encoder.EncoderInputs` over N crops of one grid: supplies only what the method declared and
    what the tower provides (anything else is refused naming both), and records what it computed."""

    def __init__(self, method: EncoderMethod, tower: EncoderTower, features: torch.Tensor,
                 crops: Sequence[tuple[int, int]], state=None):
        self._method, self._tower, self._state = method, tower, state
        self.features = features  # (N, P, D)
        self.grid = tuple(tower.grid)
        self.tower = tower.traits
        self.full_attention_layers = tuple(tower.full_attention_layers)
        self.crops = list(crops)
        self.targets = [method.target(features.shape[1])] * features.shape[0]

    def _ask(self, what: str, layer: int | None = None):
        method = self._method
        if what not in method.needs:
            raise RuntimeError(f"method {method.name} asked for {what!r} without declaring it in its needs "
                               f"({', '.join(sorted(method.needs))})")
        if what not in self._tower.provides:
            raise ValueError(f"{method.name} needs {_WHAT[what]}, which this model's vision tower does not provide "
                             f"({'a CLS token' if self.tower.cls_token else 'no CLS token'}; it provides "
                             f"{', '.join(sorted(self._tower.provides))})")
        if what in _EVENTS and self._state is not None:  # rows = crops: the FLOPs accounting sums over them
            self._state.events.append(SelectionEvent(_EVENTS[what], layer or 0, self._tower.sequence_length,
                                                     self.features.shape[0]))
        return getattr(self._tower, what)

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self._ask("cls_attention", layer)(layer)

    def hidden(self, index: int) -> torch.Tensor:
        return self._ask("hidden")(index)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._ask("hidden")
        return self._tower.project(x)

    def keys(self, layer: int) -> torch.Tensor:
        return self._ask("keys", layer)(layer)

    def attention(self, layer: int) -> torch.Tensor:
        return self._ask("attention", layer)(layer)

    def received_attention(self, layer: int) -> torch.Tensor:
        return self._ask("received_attention", layer)(layer)

    def pixels(self) -> torch.Tensor:
        return self._ask("pixels")()

    def timed(self, name: str) -> AbstractContextManager:
        return nullcontext()  # the whole selection is timed once, as "encoder_selection" (no nested phases)


def check_tower(method: EncoderMethod, tower: TowerTraits) -> None:
    """``method`` runs on a tower of ``tower``'s flags, or a ValueError naming what it needs and the encoder-side
    methods that run there."""
    missing = [r for r in sorted(method.requires) if not getattr(tower, r)]
    if missing:
        from pio.registry import get_method, method_names

        able = [n for n in method_names() if issubclass(get_method(n), EncoderMethod) and get_method(n).runs_on(tower)]
        raise ValueError(f"{method.name} needs {' and '.join(TOWER_REQUIREMENTS[r] for r in missing)}, which this "
                         f"model's vision tower does not have; encoder-side methods that run here: "
                         f"{', '.join(able) or 'none'}")


def reduce_crops(method: EncoderMethod, tower: EncoderTower, features: torch.Tensor,
                 crops: Sequence[tuple[int, int]], state=None) -> list[ReducedCrop]:
    """Run ``method`` on N crops' projected ``features`` (N, P, D) of one grid; one :class:`ReducedCrop` per
    crop. A target of every patch leaves the crops as they are."""
    check_tower(method, tower.traits)
    stage = EncoderStage(method, tower, features, crops, state)
    if stage.targets[0] >= features.shape[1]:
        return [ReducedCrop(torch.ones(features.shape[1], dtype=torch.bool, device=features.device), f)
                for f in features]
    with state.timed("encoder_selection", features.device) if state is not None else nullcontext():
        sel: EncoderSelection = method.select(stage)
    if len(sel.keep) != features.shape[0]:
        raise ValueError(f"{method.name} returned {len(sel.keep)} selections for {features.shape[0]} crops")
    out = []
    for c, keep in enumerate(sel.keep):
        keep = keep.to(features.device)
        mask = torch.zeros(features.shape[1], dtype=torch.bool, device=features.device)
        mask[keep] = True
        feats = features[c]
        if sel.features is not None and sel.features[c] is not None:
            feats = feats.clone()
            feats[keep] = sel.features[c].to(feats.dtype)
        extra = sel.extra[c].to(feats.dtype) if sel.extra is not None and sel.extra[c] is not None else None
        lead = sel.lead[c].to(feats.dtype) if sel.lead is not None and sel.lead[c] is not None else None
        out.append(ReducedCrop(mask, feats, extra, lead))
    return out


def whole(features: torch.Tensor) -> list[ReducedCrop]:
    """Crops (N, P, D) as they are, every patch kept (no encoder-side method)."""
    everything = torch.ones(features.shape[1], dtype=torch.bool, device=features.device)
    return [ReducedCrop(everything, f) for f in features]


def apply_kept(layout: ImageLayout, crops: Sequence[ReducedCrop], fill: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, EncoderRecord]:
    """One image's token sequence after the encoder-side step: the tokens of ``layout`` whose crop patch was kept
    (with its possibly merged feature), every token of no crop (``fill``: their features, (k, D), in order), and
    each run's lead and extra tokens (:class:`~llava.model.layout.Run`). Returns the sequence (m, D) and the
    record of where each of its tokens sits in the unreduced sequence (-1: added by the method)."""
    first = crops[0].features
    src = layout.source.to(first.device)
    shown = src >= 0
    if layout.crops > len(crops):
        raise ValueError(f"the image's layout shows {layout.crops} crops but {len(crops)} were encoded")
    keep = torch.ones(src.shape[0], dtype=torch.bool, device=first.device)
    keep[shown] = torch.cat([c.mask for c in crops])[src[shown]]
    seq = first.new_empty(src.shape[0], first.shape[-1])
    seq[shown] = torch.cat([c.features for c in crops])[src[shown]]
    if not bool(shown.all()):
        if fill is None or fill.shape[0] != int((~shown).sum()):
            raise ValueError(f"the layout has {int((~shown).sum())} tokens of no crop; give their features")
        seq[~shown] = fill.to(seq)
    pieces: list[torch.Tensor] = []
    origin: list[int] = []

    def added(ts: list[torch.Tensor | None]) -> None:
        for t in ts:
            if t is not None:
                pieces.append(t)
                origin.extend([-1] * t.shape[0])

    for run in layout.runs:
        index = torch.arange(run.start, run.end, device=first.device)[keep[run.start:run.end]]
        leads = [crops[c].lead for c in run.crops]
        extras = [crops[c].extra for c in run.crops]
        if not run.tiled:
            added(leads)
        pieces.append(seq[index])
        origin.extend(index.tolist())
        if run.tiled:
            added(leads)
        added(extras)
    return torch.cat(pieces), EncoderRecord(layout.n, origin)
