"""Analytic prefill FLOPs and KV-cache accounting (``docs/method.md`` §6).

Two FLOPs conventions, both counting one multiply-add as 2 FLOPs:

FastV convention (what the paper reports)
    per decoder layer on ``n`` tokens, ``f(n) = 4*n*d^2 + 2*n^2*d + 2*n*d*m`` (d hidden size, m FFN width);
    the MLP is counted as a single ``2*n*d*m`` term although SwiGLU has three matrices. With n = visual tokens
    only: ``32 * f(576) = 2.986e12`` (the README's 2.98 T for LLaVA-1.5-7B) and ``32 * f(2880) = 16.67e12``
    (LLaVA-NeXT-7B). The authors' proxy overhead is ``f(n_before)`` forward plus ``gamma * f(n_before)``
    backward with ``gamma = 2`` (:func:`fastv_proxy_flops`).

Exact convention (this architecture: LLaMA-style decoder with GQA, RoPE, SwiGLU, RMSNorm)
    every matmul of one decoder layer, labelled (:func:`exact_layer_flops`); attention is causal and counted
    over the full causal triangle; softmax, RoPE, RMSNorm, residual adds and the SwiGLU elementwise product are
    ignored (O(n*d), below 0.1 %).

Proxy cost per pruning event (:func:`proxy_flops`) follows the work the proxy really does, forward and the
backward with respect to the probe input only (the parameters need no gradients).

The vision tower (:func:`clip_vision_flops`) and projector (:func:`projector_flops`) are provided separately;
most papers leave them out.

KV cache: ``sum_l 2 * n_l * H_kv * head_dim * bytes`` (:func:`kv_cache_bytes`); LLaMA-7B in fp16 is 0.5 MiB per
token. :func:`measured_kv_bytes` sums the tensors of a real cache object (duck-typed, no transformers import).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "LMDims",
    "VICUNA_7B",
    "clip_vision_flops",
    "exact_layer_flops",
    "exact_prefill_flops",
    "fastv_layer_flops",
    "fastv_prefill_flops",
    "fastv_proxy_flops",
    "kv_cache_bytes",
    "measured_kv_bytes",
    "projector_flops",
    "encoder_selection_flops",
    "proxy_flops",
    "row_attention_flops",
    "selection_flops",
    "seq_lens_per_layer",
]


@dataclass(frozen=True)
class LMDims:
    """Dimensions of a LLaMA-style decoder-only language model.

    Attributes:
        hidden_size: d.
        intermediate_size: m (SwiGLU width).
        num_layers: L.
        num_heads: H (query heads).
        num_kv_heads: H_kv (key/value heads, GQA); equals H for LLaMA/Vicuna-7B.
        head_dim: per-head width (d / H unless the config says otherwise).
        vocab_size: V.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: Any) -> LMDims:
        """Read a transformers-style config (duck-typed); uses ``cfg.text_config`` when present.

        Reads ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``num_key_value_heads`` (default: the number of heads), ``head_dim`` (default ``d / heads``) and
        ``vocab_size``.
        """
        text = getattr(cfg, "text_config", None)
        if text is not None:
            cfg = text
        missing = [
            k
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
            )
            if getattr(cfg, k, None) is None
        ]
        if missing:
            raise ValueError(
                f"config lacks {', '.join(missing)}; cannot derive the language-model dimensions"
            )
        heads = int(cfg.num_attention_heads)
        kv = getattr(cfg, "num_key_value_heads", None)
        head_dim = getattr(cfg, "head_dim", None)
        return cls(
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size),
            num_layers=int(cfg.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=heads if kv is None else int(kv),
            head_dim=int(cfg.hidden_size) // heads if head_dim is None else int(head_dim),
            vocab_size=int(cfg.vocab_size),
        )


VICUNA_7B = LMDims(
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    vocab_size=32000,
)
"""LLaMA-2 / Vicuna-7B, the language model of LLaVA-1.5-7B and LLaVA-NeXT-7B (vicuna)."""


# --------------------------------------------------------------------------------------------------------
# Sequence lengths
# --------------------------------------------------------------------------------------------------------


def seq_lens_per_layer(n_initial: int, prune_events: Iterable[tuple[int, int]], num_layers: int) -> list[int]:
    """Input sequence length of every 0-based decoder layer in prefill.

    Args:
        n_initial: sequence length entering layer 0.
        prune_events: ``(layer_1based, removed_count)`` pairs; removing after layer ``l`` shortens the input of
            0-based layers ``l .. L-1``. Any order; several events at one layer add up.
        num_layers: L.

    Returns:
        ``L`` ints.
    """
    if n_initial < 0:
        raise ValueError(f"n_initial must be >= 0, got {n_initial}")
    removed_after = [0] * (num_layers + 1)
    for layer, removed in prune_events:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"prune event at layer {layer}: allowed 1..{num_layers} (1-based)")
        if removed < 0:
            raise ValueError(f"prune event at layer {layer} removes {removed} < 0 tokens")
        removed_after[layer] += removed
    out: list[int] = []
    cur = n_initial
    for i in range(num_layers):
        cur -= removed_after[i]  # events after 1-based layer i shorten 0-based layer i
        if cur < 0:
            raise ValueError(f"prune events remove more than the {n_initial} tokens present")
        out.append(cur)
    if cur - removed_after[num_layers] < 0:
        raise ValueError(f"prune events remove more than the {n_initial} tokens present")
    return out


# --------------------------------------------------------------------------------------------------------
# FastV convention
# --------------------------------------------------------------------------------------------------------


def fastv_layer_flops(n: int, d: int, m: int) -> int:
    """FastV's per-layer prefill FLOPs ``4*n*d^2 + 2*n^2*d + 2*n*d*m`` (n tokens, d hidden, m FFN width)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def fastv_prefill_flops(seq_lens_per_layer: Sequence[int], dims: LMDims) -> int:
    """Sum of :func:`fastv_layer_flops` over the layers' input lengths (``len == dims.num_layers``)."""
    _check_len(seq_lens_per_layer, dims)
    return sum(fastv_layer_flops(n, dims.hidden_size, dims.intermediate_size) for n in seq_lens_per_layer)


def fastv_proxy_flops(n_before: int, dims: LMDims, gamma: float = 2.0) -> dict[str, float]:
    """The authors' proxy-overhead estimate per pruning event (§6.1): ``f(n)`` forward, ``gamma*f(n)`` backward.

    Their full-vocabulary head is not counted. ``gamma = 2.0`` is their ``profile_backward_gamma``.
    """
    fwd = fastv_layer_flops(n_before, dims.hidden_size, dims.intermediate_size)
    return {"forward": float(fwd), "backward": gamma * fwd, "total": (1.0 + gamma) * fwd}


# --------------------------------------------------------------------------------------------------------
# Exact convention
# --------------------------------------------------------------------------------------------------------


def _causal_keys(n_query: int, n_past: int) -> int:
    """Sum over the ``n_query`` new queries of the keys each attends to (query i sees ``n_past + i + 1``)."""
    return n_query * n_past + n_query * (n_query + 1) // 2


def exact_layer_flops(n_query: int, n_past: int, dims: LMDims) -> dict[str, int]:
    """FLOPs of one LLaMA-style decoder layer on ``n_query`` new tokens after ``n_past`` cached ones.

    Terms (2 FLOPs per multiply-add), with q = H*head_dim and kv = H_kv*head_dim:
        q_proj, o_proj: ``2*n*d*q`` each; k_proj, v_proj: ``2*n*d*kv`` each;
        attn_scores (QK^T) and attn_values (AV): ``2*head_dim*H*keys`` each, causal, with
        ``keys = sum_i (n_past + i + 1)`` over the full causal triangle (no skipping of masked blocks);
        mlp: SwiGLU gate/up/down, ``3 * 2*n*d*m``.
    Ignored: softmax, RoPE, RMSNorm, residual adds, SiLU and the elementwise product.
    """
    n, d, m = n_query, dims.hidden_size, dims.intermediate_size
    q = dims.num_heads * dims.head_dim
    kv = dims.num_kv_heads * dims.head_dim
    keys = _causal_keys(n_query, n_past)
    out = {
        "q_proj": 2 * n * d * q,
        "k_proj": 2 * n * d * kv,
        "v_proj": 2 * n * d * kv,
        "o_proj": 2 * n * q * d,
        "attn_scores": 2 * dims.head_dim * dims.num_heads * keys,
        "attn_values": 2 * dims.head_dim * dims.num_heads * keys,
        "mlp": 3 * 2 * n * d * m,
    }
    out["total"] = sum(out.values())
    return out


def exact_prefill_flops(
    seq_lens_per_layer: Sequence[int], dims: LMDims, head_rows: int = 1
) -> dict[str, int]:
    """Exact prefill FLOPs over all layers (no past) plus the LM head on ``head_rows`` rows.

    ``head_rows = 1`` for generation (only the last row's logits are needed); pass the sequence length when
    all logits are computed. The head is ``2*head_rows*d*V``. Returns each term of :func:`exact_layer_flops`
    summed over layers, plus ``lm_head`` and ``total``.
    """
    _check_len(seq_lens_per_layer, dims)
    out: dict[str, int] = {}
    for n in seq_lens_per_layer:
        for key, val in exact_layer_flops(n, 0, dims).items():
            out[key] = out.get(key, 0) + val
    out.pop("total", None)
    out["lm_head"] = 2 * head_rows * dims.hidden_size * dims.vocab_size
    out["total"] = sum(out.values())
    return out


def proxy_flops(seq_len: int, rows: int, dims: LMDims, sliced: bool) -> dict[str, int]:
    """FLOPs of one PIO proxy pass (one decoder layer + final norm + LM head, then the input gradient).

    Args:
        seq_len: sequence length S at the pruning point (before the prune).
        rows: supervised rows (K_pos = 4 in the paper); taken as the last ``rows`` positions, so each attends
            to at most S keys (the authors' rows S-5..S-2 see one key fewer each: an upper bound by
            ``4*rows*head_dim*H`` FLOPs).
        dims: language-model dimensions.
        sliced: False: the full proxy runs the layer on all S positions, norm + head on ``rows`` rows.
            True (:func:`pio.proxy.sliced_proxy`): keys for all S positions; queries, o_proj and the MLP for
            ``rows``; each row's scores over all S keys (dense, masked afterwards); no value projection over S
            but the attention-weighted inputs ``P @ LN(x)`` (``2*H*rows*S*d``) projected per head
            (``2*rows*d*H*head_dim``).

    Backward w.r.t. the probe input only (parameters have ``requires_grad=False``): every linear on the gradient
    path needs one grad-input matmul ``dX = dY @ W^T``, the same FLOPs as its forward (no weight gradients);
    the two attention products (scores, and values or weighted inputs) need two matmuls each, i.e. twice their
    forward. The full proxy's backward runs over all S positions (autograd computes dense gradients even where
    the upstream gradient is zero). Softmax, norms and elementwise ops are ignored as in
    :func:`exact_layer_flops`.

    Returns:
        dict with ``layer_forward``, ``head_forward``, ``forward``, ``layer_backward``, ``head_backward``,
        ``backward``, ``total``.
    """
    if not 0 < rows <= seq_len:
        raise ValueError(f"rows must be in 1..seq_len={seq_len}, got {rows}")
    d, m = dims.hidden_size, dims.intermediate_size
    q = dims.num_heads * dims.head_dim
    kv = dims.num_kv_heads * dims.head_dim
    if sliced:
        heads = dims.num_heads * rows  # query rows over all heads
        # q_proj, k_proj over S, the per-head value projection of the weighted inputs, o_proj, MLP
        linear = 2 * rows * d * q + 2 * seq_len * d * kv + 2 * rows * d * q + 2 * rows * q * d + 3 * 2 * rows * d * m
        attention = 2 * heads * seq_len * dims.head_dim + 2 * heads * seq_len * d  # scores, P @ LN(x)
    else:
        layer = exact_layer_flops(seq_len, 0, dims)
        attention = layer["attn_scores"] + layer["attn_values"]
        linear = layer["total"] - attention
    head = 2 * rows * d * dims.vocab_size
    out = {
        "layer_forward": linear + attention,
        "head_forward": head,
        "layer_backward": linear + 2 * attention,
        "head_backward": head,
    }
    out["forward"] = out["layer_forward"] + out["head_forward"]
    out["backward"] = out["layer_backward"] + out["head_backward"]
    out["total"] = out["forward"] + out["backward"]
    return out


def row_attention_flops(seq_len: int, rows: int, dims: LMDims) -> int:
    """FLOPs of one explicit attention-row computation (:func:`pio.proxy.row_attention`): keys for all
    ``seq_len`` positions (``2*S*d*kv``), queries for ``rows`` rows (``2*R*d*q``) and their scores over every key
    (``2*H*R*S*head_dim``); softmax and RoPE ignored."""
    d = dims.hidden_size
    q = dims.num_heads * dims.head_dim
    kv = dims.num_kv_heads * dims.head_dim
    return 2 * seq_len * d * kv + 2 * rows * d * q + 2 * dims.num_heads * rows * seq_len * dims.head_dim


def selection_flops(events: Iterable[Any], dims: LMDims) -> int:
    """FLOPs of what a reduction method computed for its selection, from the prune state's events
    (:class:`pio.state.SelectionEvent`): PIO's proxy passes (:func:`proxy_flops`), attention rows
    (:func:`row_attention_flops`) and keys (``2*S*d*kv``). Per sample (batch size 1)."""
    total = 0
    kv = dims.num_kv_heads * dims.head_dim
    for ev in events:
        if ev.kind.startswith("encoder_"):
            continue  # :func:`encoder_selection_flops`
        if ev.kind == "proxy":
            total += proxy_flops(ev.seq_len, ev.rows, dims, sliced=ev.impl == "sliced")["total"]
        elif ev.kind == "attention":
            total += row_attention_flops(ev.seq_len, ev.rows, dims)
        elif ev.kind == "keys":
            total += 2 * ev.seq_len * dims.hidden_size * kv
        else:
            raise ValueError(f"unknown selection event kind {ev.kind!r}")
    return total


def encoder_selection_flops(events: Iterable[Any], width: int) -> int:
    """FLOPs an encoder-side method computed for its selection beyond the tower's own forward: per
    ``encoder_attention`` event one layer's keys for its ``seq_len`` tokens (``2*T*C^2``), the CLS query
    (``2*C^2``) and its scores (``2*T*C``); per ``encoder_keys`` event the keys (``2*T*C^2``); per
    ``encoder_received`` event (every query row of a block over its ``T`` patches) the q/k/v projection
    (``3*2*T*C^2``) and the scores (``2*T^2*C``); ``C`` the tower's width. Summed over the crops the events
    count."""
    total = 0
    for ev in events:
        if ev.kind == "encoder_attention":
            total += ev.rows * (2 * ev.seq_len * width * width + 2 * width * width + 2 * ev.seq_len * width)
        elif ev.kind == "encoder_keys":
            total += ev.rows * 2 * ev.seq_len * width * width
        elif ev.kind == "encoder_received":
            total += ev.rows * (3 * 2 * ev.seq_len * width * width + 2 * ev.seq_len * ev.seq_len * width)
    return total


# --------------------------------------------------------------------------------------------------------
# Vision tower and projector
# --------------------------------------------------------------------------------------------------------


def clip_vision_flops(
    image_size: int = 336,
    patch_size: int = 14,
    hidden: int = 1024,
    intermediate: int = 4096,
    layers: int = 24,
    num_crops: int = 1,
    cls_token: bool = True,
) -> dict[str, int]:
    """FLOPs of a CLIP ViT on ``num_crops`` square crops (defaults: ViT-L/14-336 of LLaVA); ``cls_token=False``
    for a tower without one (SigLIP: ``N = P``).

    Patch embedding: a conv with ``3*p*p`` inputs per patch, ``2*P*3*p*p*hidden``. Each of ``layers`` layers on
    ``N = P + 1`` tokens (CLS included), bidirectional attention: q/k/v/o projections ``4 * 2*N*h^2``,
    QK^T and AV ``2 * 2*N^2*h``, GELU MLP with two matrices ``2 * 2*N*h*m``. LayerNorms, softmax, GELU and
    position embeddings are ignored. ``layers`` is the number of layers actually run (LLaVA selects the
    penultimate layer's output, but an unmodified ``CLIPVisionModel`` runs all 24).
    """
    patches = (image_size // patch_size) ** 2
    n = patches + int(cls_token)
    h, m = hidden, intermediate
    per_crop = {
        "patch_embed": 2 * patches * 3 * patch_size * patch_size * h,
        "attn_proj": layers * 4 * 2 * n * h * h,
        "attention": layers * 2 * 2 * n * n * h,
        "mlp": layers * 2 * 2 * n * h * m,
    }
    out = {k: v * num_crops for k, v in per_crop.items()}
    out["total"] = sum(out.values())
    return out


def qwen_vision_flops(grids: Sequence[Sequence[int]], hidden: int = 1280, intermediate: int = 3420, depth: int = 32,
                      out_dim: int = 3584, fullatt_blocks: Sequence[int] = (7, 15, 23, 31), patch_size: int = 14,
                      temporal_patch_size: int = 2, merge: int = 2, window_size: int = 112, in_chans: int = 3
                      ) -> dict[str, int]:
    """FLOPs of Qwen2.5-VL's vision transformer and merger on images of patch grids ``grids`` ((t, h, w) each,
    the processor's ``image_grid_thw``; defaults: Qwen2.5-VL-7B).

    Per image of ``N = t*h*w`` patches: the patch embedding (a conv over ``in_chans * temporal_patch_size *
    patch_size^2`` inputs), per block the q/k/v/o projections ``4 * 2*N*d^2``, attention ``2 * 2*d * sum of
    n^2`` over its attention groups (the whole image in the full-attention blocks ``fullatt_blocks``, windows of
    ``(window_size / patch_size)^2`` patches, ``merge x merge``-aligned and cut at the edges, elsewhere) and the
    SwiGLU MLP ``3 * 2*N*d*m``; the merger's two matrices on the ``N / merge^2`` merged tokens. Norms,
    activations and rotary embeddings are ignored.
    """
    d, m = hidden, intermediate
    side = window_size // patch_size // merge  # merged tokens per window side
    out = {"patch_embed": 0, "attn_proj": 0, "attention": 0, "mlp": 0, "merger": 0}
    n_full = sum(1 for b in fullatt_blocks if 0 <= b < depth)
    for t, h, w in grids:
        n = t * h * w
        hm, wm = h // merge, w // merge
        windows = 0
        for r in range(0, hm, side):
            for c in range(0, wm, side):
                windows += (min(side, hm - r) * min(side, wm - c) * merge * merge) ** 2
        windows *= t
        full = t * (h * w) ** 2  # every frame attends within itself
        out["patch_embed"] += 2 * n * in_chans * temporal_patch_size * patch_size * patch_size * d
        out["attn_proj"] += depth * 4 * 2 * n * d * d
        out["attention"] += 2 * 2 * d * (n_full * full + (depth - n_full) * windows)
        out["mlp"] += depth * 3 * 2 * n * d * m
        wide = d * merge * merge
        out["merger"] += 2 * (n // (merge * merge)) * wide * (wide + out_dim)
    out["total"] = sum(out.values())
    return out


def projector_flops(n_tokens: int, in_dim: int, out_dim: int, kind: str = "mlp2x_gelu") -> int:
    """FLOPs of the multimodal projector on ``n_tokens`` tokens.

    ``"linear"``: ``2*n*in*out``; ``"mlp2x_gelu"`` (LLaVA-1.5/NeXT: Linear(in,out), GELU, Linear(out,out)):
    ``2*n*in*out + 2*n*out*out`` (GELU ignored).
    """
    if kind == "linear":
        return 2 * n_tokens * in_dim * out_dim
    if kind == "mlp2x_gelu":
        return 2 * n_tokens * in_dim * out_dim + 2 * n_tokens * out_dim * out_dim
    raise ValueError(f"unknown projector kind {kind!r}; allowed: linear, mlp2x_gelu")


# --------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------


def kv_cache_bytes(seq_lens_per_layer: Sequence[int], dims: LMDims, bytes_per_elem: int = 2) -> int:
    """Analytic KV-cache size ``sum_l 2 * n_l * H_kv * head_dim * bytes_per_elem`` (§6.2).

    ``seq_lens_per_layer`` are the cached lengths per layer (after pruning); fp16/bf16: 2 bytes.
    """
    _check_len(seq_lens_per_layer, dims)
    per_token = 2 * dims.num_kv_heads * dims.head_dim * bytes_per_elem
    return sum(n * per_token for n in seq_lens_per_layer)


def _tensor_bytes(obj: Any) -> int:
    if obj is None:
        return 0
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return int(obj.numel()) * int(obj.element_size())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    return 0


def measured_kv_bytes(cache: Any) -> int:
    """Bytes held by a KV cache object: sum of ``numel * element_size`` over its key/value tensors.

    Duck-typed, no transformers import. Handles transformers 4.57 ``DynamicCache`` (``.layers``, each with
    ``.keys``/``.values``), older caches (``key_cache``/``value_cache`` lists) and the legacy tuple of
    ``(k, v)`` per layer. Pre-allocated caches (``StaticCache``) report their allocation, not their use.
    """
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(
            _tensor_bytes(getattr(x, "keys", None)) + _tensor_bytes(getattr(x, "values", None))
            for x in layers
        )
    key_cache = getattr(cache, "key_cache", None)
    value_cache = getattr(cache, "value_cache", None)
    if key_cache is not None or value_cache is not None:
        return _tensor_bytes(key_cache) + _tensor_bytes(value_cache)
    if isinstance(cache, (list, tuple)) or hasattr(cache, "numel"):
        return _tensor_bytes(cache)
    raise TypeError(f"cannot measure a KV cache of type {type(cache).__name__}")


def _check_len(seq_lens: Sequence[int], dims: LMDims) -> None:
    if len(seq_lens) != dims.num_layers:
        raise ValueError(f"{len(seq_lens)} per-layer lengths for a {dims.num_layers}-layer model")
