"""Per-call pruning state: spans, realised counts and the masks decoding needs (DESIGN.md §2.5).

A :class:`PruneState` is created for each ``generate``/``forward`` call and never parked on the model. The
prefill fills it; cached decoding reads the per-stage masks from it, so positions continue from the counts
that were really kept. Per-layer sequence lengths, what the selection computed (proxy passes, attention rows)
and its phase timings are read from it by the profiler.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .gather import KeepIndex, Span
from .schedule import realised_average

if TYPE_CHECKING:
    from .base import Selection


@dataclass
class StageRecord:
    layer: int
    before: int
    after: int
    kept: list[int]  # positions in the sample's original visual span; -1 marks a merged token
    merged: int = 0  # merged tokens created at this stage (included in ``after``)


@dataclass(frozen=True)
class EncoderRecord:
    """One image through an encoder-side stage: ``n`` tokens before it and, for each token after it, its
    position among those ``n`` (-1: a token the method added, e.g. a merged contextual token)."""

    n: int
    kept: list[int]


@dataclass
class SampleRecord:
    n_visual: int
    stages: list[StageRecord] = field(default_factory=list)
    n_encoder: int | None = None  # visual tokens before an encoder-side reduction (None: none ran)
    encoder_kept: list[int] | None = None  # EncoderRecord.kept of the sample's image


@dataclass(frozen=True)
class SelectionEvent:
    """Extra work the selection did at one stage, for the FLOPs accounting.

    ``kind`` is ``"proxy"`` (one PIO proxy pass: ``rows`` supervised rows, ``impl`` sliced or full),
    ``"attention"`` (``rows`` query rows per sample of one layer over ``seq_len`` keys) or ``"keys"`` (one layer's
    keys at ``seq_len`` positions).
    """

    kind: str
    layer: int
    seq_len: int
    rows: int
    impl: str = ""


class PruneState:
    """What one call's prefill decided, for its own decoding steps and for logging.

    Args:
        forced: optional ``{layer: Selection}``; those layers apply these selections instead of selecting (used
            to replay a prefill's decisions, e.g. to check cached decoding against recomputation).
        profile: when True, time the selection phases (synchronising CUDA around each).
    """

    def __init__(self, forced: dict[int, Selection] | None = None, profile: bool = False):
        self.forced = dict(forced or {})
        self.profile = profile
        self.padding_side = "right"
        self.spans: list[Span | None] = []
        self.initial_spans: list[Span | None] = []
        self.positions = "renumber"
        self.prefill_len: int | None = None
        self.num_layers: int | None = None
        self.method_layers: tuple[int, ...] = ()
        self.stage_masks: dict[int, torch.Tensor] = {}
        self.selections: dict[int, Selection] = {}
        self.stage_widths: dict[int, int] = {}
        self.origin: torch.Tensor | None = None
        self.samples: list[SampleRecord] = []
        self.targets: list[list[int]] = []
        self.timings: dict[str, float] = defaultdict(float)
        self.events: list[SelectionEvent] = []
        self.kv_bytes: int | None = None  # measured after prefill when profiling
        self.encoder_images: list[EncoderRecord] | None = None  # per image of the batch, its encoder-side stage
        self.vision_crops = 0  # crops the vision tower encoded (every image's views)
        self.vision_grids: list[list[int]] = []  # patch grids (t, h, w) a Qwen-style vision transformer encoded
        self.first_logits: torch.Tensor | None = None  # (B, V) the prefill's next-token logits, when a caller asks
        self.step_logits: tuple[torch.Tensor, ...] = ()  # (B, V) per generated token, when a caller asks
        self._orig_local: list[torch.Tensor | None] = []
        self._visual_spans: list[list[Span]] | None = None
        self._encoder: list[list[EncoderRecord]] | None = None

    # ------------------------------------------------------------------ set-up by the model
    def set_inputs(self, spans: Sequence[Sequence[Span]], padding_side: str,
                   encoder: Sequence[Sequence[EncoderRecord]] | None = None) -> None:
        """Visual spans of each sample in the (padded) input sequence, as prepared by the model, and what an
        encoder-side stage did to each sample's images (None: no such stage)."""
        self._visual_spans = [list(s) for s in spans]
        self.padding_side = padding_side
        self._encoder = [list(c) for c in encoder] if encoder is not None else None

    def begin_prefill(self, mask: torch.Tensor, num_layers: int, layers: Sequence[int] = (),
                      counts_fn: Callable[[int], Sequence[int]] | None = None, positions: str = "renumber") -> None:
        """Reset for a prefill over ``mask`` (B, S) of a ``num_layers``-layer decoder; a method acting after
        ``layers`` keeps ``counts_fn(n0)`` visual tokens per stage, with ``positions`` renumbered or original."""
        B, S = mask.shape
        spans = self._visual_spans if self._visual_spans is not None else [[] for _ in range(B)]
        if len(spans) != B:
            if len(spans) == 0 or B % len(spans):
                raise ValueError(f"prune state has spans for {len(spans)} samples but the batch has {B} rows")
            reps = B // len(spans)  # generate() expanded the batch (beams / num_return_sequences)
            spans = [s for s in spans for _ in range(reps)]
        if layers:
            for b, s in enumerate(spans):
                if len(s) > 1:
                    raise ValueError(
                        f"sample {b} has {len(s)} images; visual-token reduction prunes one visual span per "
                        "sample (multi-image samples are not supported yet: run them without --method)"
                    )
        self.spans = [s[0] if s else None for s in spans]
        self.initial_spans = list(self.spans)
        self.positions = positions
        self.prefill_len = S
        self.num_layers = num_layers
        self.method_layers = tuple(layers)
        self.stage_masks.clear()
        self.selections.clear()
        self.stage_widths.clear()
        self.origin = torch.arange(S, device=mask.device).expand(B, S)
        encoder = self._encoder
        if encoder is not None and len(encoder) != B:
            encoder = [c for c in encoder for _ in range(B // max(len(encoder), 1))]  # generate() expanded the batch
        self.samples = [SampleRecord(n_visual=s[1] if s else 0) for s in self.spans]
        for b, rec in enumerate(self.samples if encoder is not None else []):
            rec.n_encoder = sum(e.n for e in encoder[b])
            rec.encoder_kept = list(encoder[b][0].kept) if len(encoder[b]) == 1 else None
        self._orig_local = [torch.arange(s[1], device=mask.device) if s else None for s in self.spans]
        self.targets = [list(counts_fn(r.n_visual)) if counts_fn else [] for r in self.samples]
        self.events = [e for e in self.events if e.kind.startswith("encoder_")]  # the encoder stage ran before
        self.kv_bytes = None

    def record(self, layer: int, selection: Selection, keep: KeepIndex | None) -> None:
        """Bookkeeping after the prune at 1-based ``layer``; ``keep`` is None when no sample was pruned."""
        self.selections[layer] = selection
        merged = selection.merged or [None] * len(selection.keep)
        if keep is not None:
            self.stage_masks[layer] = keep.mask
            self.stage_widths[layer] = keep.index.shape[1]
            assert self.origin is not None
            origin = self.origin
            if keep.n_merged:  # merged tokens have no origin: point them at the span's first token's origin
                starts = torch.tensor([s[0] if s else 0 for s in self.spans], device=origin.device)
                first = torch.gather(origin, 1, starts[:, None])
                origin = torch.cat([origin, first.expand(-1, keep.n_merged)], dim=1)
            self.origin = torch.gather(origin, 1, keep.index)
        for b, k in enumerate(selection.keep):
            if self.spans[b] is None:
                continue
            before = int(self._orig_local[b].numel())
            m = 0 if merged[b] is None else int(merged[b].shape[0])
            if k is not None:
                cur = self._orig_local[b]
                new = cur[k.to(cur.device)]
                self._orig_local[b] = torch.cat([new, torch.full((m,), -1, dtype=new.dtype, device=new.device)])
            kept = self._orig_local[b].tolist()
            self.samples[b].stages.append(StageRecord(layer=layer, before=before, after=len(kept), kept=kept,
                                                      merged=m))
        if keep is not None:
            self.spans = list(keep.spans)

    # ------------------------------------------------------------------ decoding
    def decode_mask(self, layer: int, attention_mask: torch.Tensor | None, total_len: int) -> torch.Tensor:
        """2D key mask of the layers after ``layer`` during decoding: kept prefill tokens + new tokens."""
        base = self.stage_masks[layer]
        assert self.prefill_len is not None
        n_new = total_len - self.prefill_len
        if attention_mask is not None:
            new = attention_mask[:, self.prefill_len : self.prefill_len + n_new].bool()
        else:
            new = torch.ones(base.shape[0], n_new, dtype=torch.bool, device=base.device)
        return torch.cat([base, new], dim=1)

    def gather_labels(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Labels (B, S) of the prefill input, aligned with the pruned sequence."""
        assert self.origin is not None and self.stage_masks
        last = self.stage_masks[max(self.stage_masks)]
        return torch.gather(labels, 1, self.origin).masked_fill(~last, ignore_index)

    # ------------------------------------------------------------------ reporting
    @property
    def layer_lengths(self) -> list[int]:
        """Prefill input length (padded width) of every decoder layer, from the stage records."""
        if self.prefill_len is None or self.num_layers is None:
            return []
        out, cur = [], self.prefill_len
        for i in range(self.num_layers):
            cur = self.stage_widths.get(i, cur)  # a prune after 1-based layer i shortens 0-based layer i
            out.append(cur)
        return out

    def report(self) -> list[dict[str, Any]]:
        """One dict per sample: initial visual count, per-stage counts and kept positions, realised average."""
        out = []
        for rec in self.samples:
            counts = {st.layer: st.after for st in rec.stages}
            kept_counts = []
            cur = rec.n_visual
            for lay in self.method_layers:
                cur = counts.get(lay, cur)
                kept_counts.append(cur)
            avg = (realised_average(rec.n_visual, self.method_layers, kept_counts, self.num_layers)
                   if self.num_layers else float(rec.n_visual))
            line = {"n_visual": rec.n_visual, "stages": [vars(st) for st in rec.stages], "avg_visual_tokens": avg}
            if rec.n_encoder is not None:
                line["n_encoder"] = rec.n_encoder  # before the encoder-side stage; n_visual is after it
            if rec.encoder_kept is not None:
                line["encoder_kept"] = rec.encoder_kept  # each visual token's position among the n_encoder
            out.append(line)
        return out

    @contextmanager
    def timed(self, name: str, device: torch.device):
        """Accumulate wall time of a phase into ``timings`` when profiling (CUDA is synchronised)."""
        if not self.profile:
            yield
            return
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
        sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(device)
            self.timings[name] += time.perf_counter() - t0
