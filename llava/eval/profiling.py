"""Per-sample efficiency records: timings, per-layer lengths, FLOPs (both conventions), KV cache, memory."""

from __future__ import annotations

import resource
from typing import Any

import torch

from pio import PruneState
from pio.flops import LMDims, exact_prefill_flops, fastv_prefill_flops, kv_cache_bytes, selection_flops


def vision_flops(model: Any, state: PruneState) -> dict[str, int]:
    """``vision``: the vision tower on everything the call encoded (what an encoder-side method does not save: it
    reduces after it); ``encoder_selection``: what such a method computed on top (the model's family counts)."""
    from llava.model.families import family_of

    return family_of(model.config).vision_flops(model, state)


def profile_record(model: Any, state: PruneState, timing: dict | None) -> dict:
    """Everything ``--profile`` writes for one sample (batch size 1).

    FLOPs: ``fastv`` is FastV's convention (``4nd^2 + 2n^2d + 2ndm`` per layer on the realised input lengths,
    as the paper reports, here over all tokens); ``fastv_visual`` counts visual tokens only (the paper's
    baseline 32*f(576) = 2.98 T); ``exact`` is the real architecture (SwiGLU, GQA, causal attention, LM head on
    one row) and ``selection`` the reduction method's own work (PIO's proxy forward + backward, the attention rows
    or keys other methods ask for), computed from what it really did (:func:`pio.flops.selection_flops`).
    ``selection_s`` holds the wall time of each selection phase the method timed, and ``gather``.
    """
    dims = LMDims.from_config(model.config)
    lengths = list(state.layer_lengths)
    n_text = lengths[0] - (state.samples[0].n_visual if state.samples else 0) if lengths else 0
    visual = [n - n_text for n in lengths]
    elem = next(model.parameters()).element_size()
    rec: dict[str, Any] = {
        "seq_len_per_layer": lengths,
        "visual_per_layer": visual,
        "n_encoder": state.samples[0].n_encoder if state.samples else None,
        "flops": {
            "fastv": fastv_prefill_flops(lengths, dims) if lengths else 0,
            "fastv_visual": fastv_prefill_flops(visual, dims) if lengths else 0,
            "exact": exact_prefill_flops(lengths, dims)["total"] if lengths else 0,
            "selection": selection_flops(state.events, dims),
            **vision_flops(model, state),
        },
        "kv_bytes": {
            "analytic": kv_cache_bytes(lengths, dims, elem) if lengths else 0,
            "measured": state.kv_bytes,
        },
        "selection_s": {k: v for k, v in state.timings.items() if k != "vision"},
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
    }
    if timing:
        rec.update(timing)
    if model.device.type == "cuda":
        rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(model.device)
    else:  # process-wide high-water mark (kilobytes on Linux)
        rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rec
