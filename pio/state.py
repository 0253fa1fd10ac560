"""Per-call pruning state: spans, realised counts and the masks decoding needs (DESIGN.md §2.5).

A :class:`PruneState` is created for each ``generate``/``forward`` call and never parked on the model. The
prefill fills it; cached decoding reads the per-stage masks from it, so positions continue from the counts
that were really kept.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .gather import KeepIndex, Span
from .schedule import realised_average


@dataclass
class StageRecord:
    layer: int
    before: int
    after: int
    kept: list[int]  # positions in the sample's original visual span


@dataclass
class SampleRecord:
    n_visual: int
    stages: list[StageRecord] = field(default_factory=list)


class PruneState:
    """What one call's prefill decided, for its own decoding steps and for logging.

    Args:
        forced_keep: optional ``{layer: [kept local indices per sample or None]}``; when given, those layers
            apply these indices instead of selecting (used to replay a prefill's decisions, e.g. to check
            cached decoding against recomputation).
        profile: when True, time the selection phases (synchronising CUDA around each).
    """

    def __init__(self, forced_keep: dict[int, Sequence[torch.Tensor | None]] | None = None, profile: bool = False):
        self.forced_keep = dict(forced_keep or {})
        self.profile = profile
        self.padding_side = "right"
        self.spans: list[Span | None] = []
        self.prefill_len: int | None = None
        self.stage_masks: dict[int, torch.Tensor] = {}
        self.keep_indices: dict[int, list[torch.Tensor | None]] = {}
        self.origin: torch.Tensor | None = None
        self.samples: list[SampleRecord] = []
        self.targets: list[list[int]] = []
        self.timings: dict[str, float] = defaultdict(float)
        self.layer_lengths: list[int] = []  # prefill input length of every decoder layer
        self.proxy_events: list[tuple[int, int]] = []  # (layer, sequence length) of every proxy pass
        self.kv_bytes: int | None = None  # measured after prefill when profiling
        self._orig_local: list[torch.Tensor | None] = []
        self._visual_spans: list[list[Span]] | None = None

    # ------------------------------------------------------------------ set-up by the model
    def set_inputs(self, spans: Sequence[Sequence[Span]], padding_side: str) -> None:
        """Visual spans of each sample in the (padded) input sequence, as prepared by the model."""
        self._visual_spans = [list(s) for s in spans]
        self.padding_side = padding_side

    def begin_prefill(self, mask: torch.Tensor, counts_fn: Any | None) -> None:
        """Reset for a prefill over ``mask`` (B, S); ``counts_fn(n0) -> per-stage targets``."""
        B, S = mask.shape
        spans = self._visual_spans if self._visual_spans is not None else [[] for _ in range(B)]
        if len(spans) != B:
            if len(spans) == 0 or B % len(spans):
                raise ValueError(f"prune state has spans for {len(spans)} samples but the batch has {B} rows")
            reps = B // len(spans)  # generate() expanded the batch (beams / num_return_sequences)
            spans = [s for s in spans for _ in range(reps)]
        for b, s in enumerate(spans):
            if len(s) > 1:
                raise ValueError(
                    f"sample {b} has {len(s)} images; PIO prunes one visual span per sample "
                    "(multi-image samples are not supported yet: run them without --pio-layers)"
                )
        self.spans = [s[0] if s else None for s in spans]
        self.prefill_len = S
        self.stage_masks.clear()
        self.keep_indices.clear()
        self.origin = torch.arange(S, device=mask.device).expand(B, S)
        self.samples = [SampleRecord(n_visual=s[1] if s else 0) for s in self.spans]
        self._orig_local = [torch.arange(s[1], device=mask.device) if s else None for s in self.spans]
        self.targets = [list(counts_fn(r.n_visual)) if counts_fn else [] for r in self.samples]
        self.layer_lengths = []
        self.proxy_events = []
        self.kv_bytes = None

    def record_prune(self, layer: int, keep: KeepIndex | None, keep_local: Sequence[torch.Tensor | None]) -> None:
        """Bookkeeping after the prune at 1-based ``layer``; ``keep`` is None when no sample was pruned."""
        if keep is not None:
            self.stage_masks[layer] = keep.mask
            self.keep_indices[layer] = list(keep_local)
            assert self.origin is not None
            self.origin = torch.gather(self.origin, 1, keep.index)
        for b, k in enumerate(keep_local):
            if self.spans[b] is None:
                continue
            before = int(self._orig_local[b].numel())
            if k is not None:
                self._orig_local[b] = self._orig_local[b][k.to(self._orig_local[b].device)]
            kept = self._orig_local[b].tolist()
            self.samples[b].stages.append(StageRecord(layer=layer, before=before, after=len(kept), kept=kept))
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
    def report(self, num_layers: int, layers: Sequence[int] | None) -> list[dict[str, Any]]:
        """One dict per sample: initial visual count, per-stage counts and kept positions, realised average."""
        out = []
        for rec in self.samples:
            counts = {st.layer: st.after for st in rec.stages}
            sched_layers = list(layers or [])
            kept_counts = []
            cur = rec.n_visual
            for lay in sched_layers:
                cur = counts.get(lay, cur)
                kept_counts.append(cur)
            avg = realised_average(rec.n_visual, sched_layers, kept_counts, num_layers)
            out.append(
                {
                    "n_visual": rec.n_visual,
                    "stages": [vars(st) for st in rec.stages],
                    "avg_visual_tokens": avg,
                }
            )
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
