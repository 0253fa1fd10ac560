"""One image's tokens as the language model sees them, and where they lie on the picture.

Every family describes an image the same way: its vision tower encodes one or more *crops* (LLaVA-1.5: the
padded square; LLaVA-NeXT: the base view and the anyres crops; Qwen2.5-VL: the whole image as one grid of merged
tokens), ``P`` patches each, and the language model sees a sequence of tokens, each one crop patch (``crop * P +
patch``) or a token of no crop (LLaVA-NeXT's newline embeddings). :class:`ImageLayout` is that sequence; the
model builds the image's embeddings from it and applies an encoder-side method's kept tokens through it
(:func:`llava.model.encoder_stage.apply_kept`), and the pictures of kept tokens map positions to pixels through
it and the family's :class:`ImageViews`. One source, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["CropView", "ImageLayout", "ImageViews", "Run"]


@dataclass(frozen=True)
class Run:
    """A stretch ``[start, end)`` of an image's unreduced token sequence and the crops whose tokens added by an
    encoder-side method go with it: one crop's lead tokens before the run and its extra tokens after it, or, for
    crops ``tiled`` into the run (LLaVA-NeXT's anyres grid), every lead and then every extra after it."""

    start: int
    end: int
    crops: tuple[int, ...] = ()
    tiled: bool = False


@dataclass
class ImageLayout:
    """One image's unreduced token sequence.

    Attributes:
        source: (n,) long: the crop patch each token shows (``crop * patches + patch``), -1 for a token of no
            crop (a newline embedding), which no encoder-side method removes.
        patches: P, the patches (language-model tokens) of one crop.
        runs: the sequence cut into :class:`Run` s, in order, covering it.
    """

    source: torch.Tensor
    patches: int
    runs: tuple[Run, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.runs:
            self.runs = (Run(0, self.n, (0,) if self.crops == 1 else ()),)

    @property
    def n(self) -> int:
        """The number of tokens."""
        return int(self.source.numel())

    @property
    def crops(self) -> int:
        """The number of crops the tokens show."""
        shown = self.source[self.source >= 0]
        return int(shown.max()) // self.patches + 1 if shown.numel() else 0

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """The sequence position of each crop patch ``ids`` (any shape; -1 in, or a patch the sequence drops,
        gives -1)."""
        src = self.source.cpu().numpy()
        where = np.full(self.crops * self.patches, -1, dtype=np.int64)  # crop patch -> position
        shown = src >= 0
        where[src[shown]] = np.nonzero(shown)[0]
        ids = np.asarray(ids)
        out = np.full(ids.shape, -1, dtype=np.int64)
        valid = (ids >= 0) & (ids < where.size)
        out[valid] = where[ids[valid]]
        return out

    def tokens_of(self, crops: Sequence[int]) -> np.ndarray:
        """The sorted positions of the tokens that show one of ``crops``."""
        src = self.source.cpu().numpy()
        return np.nonzero((src >= 0) & np.isin(src // self.patches, list(crops)))[0]


@dataclass(frozen=True)
class CropView:
    """A named group of crops drawn as one panel (LLaVA-NeXT's "base view" and "high-res grid").

    ``patch_at(x, y)``: for canvas points (x (1, w), y (h, 1), pixel coordinates of :attr:`ImageViews.canvas`),
    the crop patch (``crop * P + patch``) of this view's crops that covers each one, -1 where none does.
    """

    name: str
    crops: tuple[int, ...]
    patch_at: Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class ImageViews:
    """The picture a family encodes for an image (LLaVA-1.5's padded square, else the image itself), a note on
    how it differs from the image, and its views."""

    canvas: Any
    views: list[CropView]
    note: str = ""
