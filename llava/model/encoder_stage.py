"""The encoder-side reduction step: hands an encoder-side method what it asks for, applies its selection per crop.

:func:`reduce_crops` runs on every crop of a batch's images after the projector and before LLaVA-NeXT tiles
the crops; the result is, per crop, a keep mask over its patches, the features to place (merged ones included)
and extra tokens after them. The tiling (:mod:`llava.model.llava_arch`) then keeps exactly the masked tokens,
newline tokens always, so the spans the language model sees have the reduced counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from pio.encoder import EncoderMethod, EncoderSelection
from pio.state import SelectionEvent


@dataclass
class ReducedCrop:
    """One crop after the encoder-side step: ``mask`` (P,) bool, ``features`` (P, D) (kept rows possibly
    merged), ``lead`` (l, D) tokens before the crop's kept ones and ``extra`` (m, D) after them, or None."""

    mask: torch.Tensor
    features: torch.Tensor
    extra: torch.Tensor | None = None
    lead: torch.Tensor | None = None


class _EncoderStage:
    """:class:`pio.encoder.EncoderInputs` over one batch of crops: supplies only what the method declared."""

    def __init__(self, method: EncoderMethod, tower, projector, hidden_states, features: torch.Tensor,
                 crops: Sequence[tuple[int, int]], state=None, pixels: torch.Tensor | None = None):
        self._method, self._tower, self._projector = method, tower, projector
        self._hidden, self._state, self._pixels = hidden_states, state, pixels
        self.features = features
        side = tower.num_patches_per_side
        self.grid = (side, side)
        self.encoder = "clip"
        self.full_attention_layers = tuple(range(len(hidden_states) - 1))
        self.crops = list(crops)
        self.targets = [method.target(features.shape[1])] * features.shape[0]

    def _need(self, what: str) -> None:
        if what not in self._method.needs:
            raise RuntimeError(f"method {self._method.name} asked for {what!r} without declaring it in its needs "
                               f"({', '.join(sorted(self._method.needs))})")

    def _event(self, kind: str) -> None:
        if self._state is not None:  # rows = crops: the FLOPs accounting sums over them
            self._state.events.append(SelectionEvent(kind, 0, self._hidden[0].shape[1], self.features.shape[0]))

    def cls_attention(self, layer: int) -> torch.Tensor:
        self._need("cls_attention")
        self._event("encoder_attention")
        return self._tower.cls_attention(self._hidden, layer)

    def hidden(self, index: int) -> torch.Tensor:
        self._need("hidden")
        return self._hidden[index]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._need("hidden")
        dtype = next(self._projector.parameters(), x).dtype
        return self._projector(x.to(dtype))

    def keys(self, layer: int) -> torch.Tensor:
        self._need("keys")
        self._event("encoder_keys")
        return self._tower.layer_keys(self._hidden, layer)

    def attention(self, layer: int) -> torch.Tensor:
        self._need("attention")
        self._event("encoder_received")  # every query row of the layer: counted as pio.flops counts those
        return self._tower.full_attention(self._hidden, layer)

    def pixels(self) -> torch.Tensor:
        self._need("pixels")
        if self._pixels is None:
            raise RuntimeError(f"method {self._method.name} needs the crops' pixels, which the caller did not pass")
        proc = getattr(self._tower, "image_processor", None)
        mean = getattr(proc, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as LLaVA's
        std = getattr(proc, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        x = self._pixels.to(torch.float64)
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.float32)

    def timed(self, name: str) -> AbstractContextManager:
        return nullcontext()  # the whole selection is timed once, as "encoder_selection" (no nested phases)


def reduce_crops(method: EncoderMethod, tower, projector, hidden_states, features: torch.Tensor,
                 crops: Sequence[tuple[int, int]], state=None, pixels: torch.Tensor | None = None) -> list[ReducedCrop]:
    """Run ``method`` on the crops' projected ``features`` (N, P, D); one :class:`ReducedCrop` per crop. ``pixels``:
    the crops' normalised pixel values (N, 3, H, W) as the tower got them (for methods that need ``"pixels"``)."""
    check_encoder(method, "clip")
    stage = _EncoderStage(method, tower, projector, hidden_states, features, crops, state, pixels)
    if stage.targets[0] >= features.shape[1]:  # a target of every patch leaves the crops as they are
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


class _MergedStage:
    """:class:`pio.encoder.EncoderInputs` over one image of a vision transformer that merges patches into the
    language model's tokens and has no CLS token (Qwen2.5-VL): the projected features (1, P, D) of its merged
    grid and, on request, the attention its tokens receive (``attention(layer)`` -> (P,), from the model)."""

    encoder = "merged"

    def __init__(self, method: EncoderMethod, features: torch.Tensor, grid: tuple[int, int],
                 full_attention_layers: Sequence[int], attention=None, state=None, patches_per_token: int = 4):
        self._method, self._attention, self._state = method, attention, state
        self._patches = features.shape[0] * patches_per_token
        self.features, self.grid = features[None], grid
        self.full_attention_layers = tuple(full_attention_layers)
        self.crops = [(0, 0)]
        self.targets = [method.target(features.shape[0])]

    def received_attention(self, layer: int) -> torch.Tensor:
        if "received_attention" not in self._method.needs or self._attention is None:
            raise RuntimeError(f"method {self._method.name} asked for 'received_attention' without declaring it")
        if self._state is not None:
            self._state.events.append(SelectionEvent("encoder_received", layer, self._patches, 1))
        return self._attention(layer)[None]

    def _missing(self, what: str):
        raise ValueError(f"{self._method.name} needs {what}, which this vision encoder does not provide (no CLS token)")

    def cls_attention(self, layer: int) -> torch.Tensor:
        self._missing("the CLS attention")

    def hidden(self, index: int) -> torch.Tensor:
        self._missing("the encoder's hidden states")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._missing("the projector")

    def keys(self, layer: int) -> torch.Tensor:
        self._missing("the encoder's keys")

    def attention(self, layer: int) -> torch.Tensor:
        self._missing("the encoder's full attention")

    def pixels(self) -> torch.Tensor:
        self._missing("the crops' pixels")

    def timed(self, name: str) -> AbstractContextManager:
        return nullcontext()


def check_encoder(method: EncoderMethod, encoder: str) -> None:
    """``method`` can read ``encoder`` (``"clip"`` or ``"merged"``), or a ValueError naming the ones that can."""
    if encoder not in method.encoders:
        from pio.encoder import EncoderMethod as Base
        from pio.registry import get_method, method_names

        able = [n for n in method_names() if issubclass(get_method(n), Base) and encoder in get_method(n).encoders]
        what = "the CLS attention of a CLIP tower" if encoder == "merged" else "a patch-merging vision transformer"
        raise ValueError(f"{method.name} needs {what}, which this model's vision encoder does not have; encoder-side "
                         f"methods that run here: {', '.join(able)}")


def reduce_image_features(method: EncoderMethod, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]],
                          full_attention_layers: Sequence[int] = (), attention=None, state=None,
                          patches_per_token: int = 4) -> list[ReducedCrop]:
    """Run ``method`` on each image's projected ``features`` (P_i, D) (grids of merged tokens ``grids``, e.g.
    Qwen2.5-VL's, one crop per image); one :class:`ReducedCrop` per image. ``attention(image, layer)`` gives the
    attention an image's tokens receive at an encoder layer (for methods that need it). Tokens merged into kept
    ones replace their features; extra tokens are not supported (they would need positions of their own)."""
    check_encoder(method, "merged")
    out = []
    with state.timed("encoder_selection", features[0].device) if state is not None and features else nullcontext():
        for i, (f, grid) in enumerate(zip(features, grids, strict=True)):
            per_image = (lambda layer, i=i: attention(i, layer)) if attention is not None else None
            stage = _MergedStage(method, f, grid, full_attention_layers, per_image, state, patches_per_token)
            if stage.targets[0] >= f.shape[0]:  # a target of every token leaves the image as it is
                out.append(ReducedCrop(torch.ones(f.shape[0], dtype=torch.bool, device=f.device), f))
                continue
            sel: EncoderSelection = method.select(stage)
            if (sel.extra is not None and sel.extra[0] is not None) or (sel.lead is not None and sel.lead[0] is not None):
                raise ValueError(f"{method.name} adds tokens of its own, which this model family cannot place")
            keep = sel.keep[0].to(f.device)
            mask = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
            mask[keep] = True
            feats = f
            if sel.features is not None and sel.features[0] is not None:
                feats = f.clone()
                feats[keep] = sel.features[0].to(f.dtype)
            out.append(ReducedCrop(mask, feats))
    return out
