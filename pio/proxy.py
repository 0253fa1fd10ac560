"""The layer-local proxy of PIO: one decoder layer, the final norm and the LM head on a few rows.

The proxy loss (docs/method.md §2.3-2.4) reads the logits of K supervised rows only. Two exact
implementations of "decoder layer -> norm -> head on those rows":

* :func:`full_proxy` runs the decoder layer on every position with the model's own attention backend and an
  explicit causal + padding mask, then applies norm and head to the K rows.
* :func:`sliced_proxy` computes keys for every position but queries, attention output, o_proj and the MLP
  only for the K rows, and never projects values for all positions (see its docstring). It gives the same
  logits, hence the same gradient, for a fraction of the work.

Both duck-type a pre-norm rotary decoder layer as in LLaMA/Qwen2/Mistral: ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``self_attn.head_dim``, ``self_attn.scaling``, ``post_attention_layernorm``,
``mlp``. Nothing here imports a model implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ProxyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``proxy(x (B, S, D), rows (B, K) long) -> logits (B, K, V)``."""


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) -> (B, K, ...) at ``rows`` (B, K)."""
    idx = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(*rows.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _usable(t: torch.Tensor) -> torch.Tensor:
    # tensors made under torch.inference_mode cannot be saved for backward; a copy made outside it can
    # (the proxy runs inside ``torch.inference_mode(False)``)
    return t.clone() if t.is_inference() else t


def causal_padding_bias(key_mask: torch.Tensor, query_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, Q, S): a query at position p sees the valid keys at positions <= p.

    Args:
        key_mask: (B, S) bool, valid keys.
        query_pos: (B, Q) long, the query rows' positions in the key sequence.
    """
    S = key_mask.shape[1]
    keys = torch.arange(S, device=key_mask.device)
    valid = key_mask.bool()
    allowed = valid[:, None, :] & (keys[None, None, :] <= query_pos[:, :, None])  # (B, Q, S)
    # padding queries see every key: their outputs are never read, and a fully masked row would give NaN
    allowed |= ~valid.gather(1, query_pos)[:, :, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _grouped_scores(attn: Any, h: torch.Tensor, rows: torch.Tensor, key_mask: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """Masked attention scores (B, Hkv, G*R, S) float32 of the query rows ``rows`` (B, R) over every key.

    ``h`` (B, S, D) is the layer's normalised input; query heads are grouped by their key/value head (head
    ``kv * G + g``, row ``g * R + r``), so grouped-query attention needs no copy of the keys.
    """
    B, S, _ = h.shape
    R = rows.shape[1]
    hd = attn.head_dim
    k = attn.k_proj(h).view(B, S, -1, hd)  # (B, S, Hkv, hd): rotated in the projection's own layout
    k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    q = attn.q_proj(_rows(h, rows)).view(B, R, -1, hd).transpose(1, 2)  # (B, H, R, hd)
    q = q * _rows(cos, rows)[:, None] + _rotate_half(q) * _rows(sin, rows)[:, None]
    n_kv = k.shape[2]
    groups = q.shape[1] // n_kv
    q = q.reshape(B, n_kv, groups * R, hd)  # query heads grouped by their key/value head
    bias = causal_padding_bias(key_mask, rows, torch.float32).repeat(1, 1, groups, 1)
    return (q @ k.permute(0, 2, 3, 1)).float() * attn.scaling + bias  # (B, Hkv, G*R, S)


def layer_keys(layer: Any, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotated keys (B, S, H_kv * head_dim) of decoder layer ``layer`` on its input ``x`` (B, S, D)."""
    attn = layer.self_attn
    cos, sin = position_embeddings
    B, S, _ = x.shape
    k = attn.k_proj(layer.input_layernorm(x)).view(B, S, -1, attn.head_dim)
    return (k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]).flatten(2)


def row_attention(
    layer: Any, x: torch.Tensor, rows: torch.Tensor, key_mask: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Softmax attention (B, H, R, S) float32 of decoder layer ``layer`` for the query rows ``rows`` (B, R).

    Recomputed explicitly from the layer's own normalised input ``x`` (B, S, D), queries, keys and rotary
    ``position_embeddings`` with a causal + padding mask, for just those rows, so the model's attention backend
    is never switched (what FastV, PDrop and SparseVLM need). Rows that are padding see every key.
    """
    with torch.no_grad():
        cos, sin = position_embeddings
        scores = _grouped_scores(layer.self_attn, layer.input_layernorm(x), rows, key_mask.bool(), cos, sin)
        B, n_kv, GR, S = scores.shape
        R = rows.shape[1]
        return scores.softmax(dim=-1).view(B, n_kv, GR // R, R, S).reshape(B, -1, R, S)


def sliced_proxy(
    layer: Any,
    norm: torch.nn.Module,
    head: torch.nn.Module,
    key_mask: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> ProxyFn:
    """Proxy that runs the layer's queries, attention output and MLP only on the supervised rows.

    Keys are projected for every position (the attention weights need them). Values are not: since the
    attention output of a row is ``W_v (sum_i p_i LN(x_i)) + b_v`` (the weights sum to one), the normalised
    inputs are averaged with each head's weights first and projected afterwards, so the value projection and
    its backward pass cost O(rows * heads * S * D) instead of O(S * D^2). The result is the same function.

    Args:
        layer: the proxy decoder layer.
        norm, head: the model's final norm and LM head.
        key_mask: (B, S) bool, valid tokens of the current sequence.
        position_embeddings: rotary (cos, sin), each (B, S, head_dim), for the current positions.
    """
    attn = layer.self_attn

    def proxy(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        cos, sin = (_usable(t) for t in position_embeddings)
        B, S, D = x.shape
        K = rows.shape[1]
        hd = attn.head_dim
        h = layer.input_layernorm(x)  # (B, S, D)
        scores = _grouped_scores(attn, h, rows, _usable(key_mask), cos, sin)  # (B, Hkv, G*K, S)
        n_kv = scores.shape[1]
        groups = scores.shape[2] // K
        p = scores.softmax(dim=-1).to(h.dtype)
        # attention-weighted normalised inputs, one matmul over all heads: (B, Hkv*G*K, S) @ (B, S, D)
        mixed = (p.reshape(B, -1, S) @ h).view(B, n_kv, groups * K, D)
        w_v = attn.v_proj.weight.view(n_kv, hd, D)
        o = torch.einsum("bgkd,ghd->bgkh", mixed, w_v)  # (B, Hkv, G*K, hd)
        if attn.v_proj.bias is not None:
            o = o + attn.v_proj.bias.view(1, n_kv, 1, hd)
        o = o.reshape(B, n_kv * groups, K, hd).transpose(1, 2).reshape(B, K, -1)  # (B, K, H*hd)
        y = _rows(x, rows) + attn.o_proj(o)
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        return head(norm(y))

    return proxy


def full_proxy(layer: Any, norm: torch.nn.Module, head: torch.nn.Module, layer_kwargs: dict[str, Any]) -> ProxyFn:
    """Proxy that runs the whole decoder layer (the model's attention backend) and slices afterwards.

    ``layer_kwargs`` is what the layer is called with for the current sequence: its ``attention_mask`` in the
    form the backend expects for a causal + padding mask (a 4D additive mask for eager/SDPA, the 2D mask for
    FlashAttention-2; never ``None`` with padding), its rotary ``position_embeddings``, ...
    """
    def proxy(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        kwargs = {k: _usable_tree(v) for k, v in layer_kwargs.items()}
        out = layer(x, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        return head(norm(_rows(y, rows)))

    return proxy


def _usable_tree(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _usable(v)
    if isinstance(v, tuple):
        return tuple(_usable_tree(t) for t in v)
    return v
