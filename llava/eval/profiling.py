"""Per-sample efficiency records: timings, per-layer lengths, FLOPs (both conventions), KV cache, memory."""

from __future__ import annotations

import resource
from typing import Any

import torch

from pio import PruneState
from pio.flops import (
    LMDims,
    clip_vision_flops,
    encoder_selection_flops,
    exact_prefill_flops,
    fastv_prefill_flops,
    kv_cache_bytes,
    projector_flops,
    qwen_vision_flops,
    selection_flops,
)


def vision_flops(model: Any, state: PruneState) -> dict[str, int]:
    """``vision``: the tower on every crop plus the projector on every patch (what an encoder-side method does not
    save: it reduces after them); ``encoder_selection``: what such a method computed on top."""
    if getattr(state, "vision_grids", None) and hasattr(model.config, "vision_config"):  # Qwen2.5-VL
        v = model.config.vision_config
        total = qwen_vision_flops(state.vision_grids, v.hidden_size, v.intermediate_size, v.depth, v.out_hidden_size,
                                  v.fullatt_block_indexes, v.patch_size, v.temporal_patch_size, v.spatial_merge_size,
                                  v.window_size, v.in_chans)["total"]
        return {"vision": total, "encoder_selection": encoder_selection_flops(state.events, v.hidden_size)}
    tower = model.get_vision_tower() if hasattr(model, "get_vision_tower") else None
    if tower is None or not state.vision_crops:
        return {"vision": 0, "encoder_selection": 0}
    c = tower.config
    crops = state.vision_crops
    total = clip_vision_flops(c.image_size, c.patch_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                              crops)["total"]
    kind = "linear" if getattr(model.config, "mm_projector_type", "linear") == "linear" else "mlp2x_gelu"
    total += projector_flops(crops * tower.num_patches, c.hidden_size, model.config.hidden_size, kind)
    return {"vision": total, "encoder_selection": encoder_selection_flops(state.events, c.hidden_size)}


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
