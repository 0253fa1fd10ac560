"""The one prune step every model family calls, over a small decoder adapter (DESIGN.md §1).

A decoder forward (:func:`run_decoder`, shared by every family) builds a :class:`PruneStep` for the call and,
after each layer the method acts at, hands it the layer's input and output::

    step = PruneStep.begin(adapter, reducer, state, key_mask, attention_mask, h)
    seg = step.segment(h, key_mask, position_ids)
    for i, layer in enumerate(adapter.layers):
        h_in, h = h, layer(h, **adapter.layer_kwargs(seg))
        if i + 1 in step.layers:
            h, seg = step(i + 1, h_in, h, seg)

In prefill the step supplies what the method declared it needs (:class:`pio.base.StageInputs`), applies its
selection with :mod:`pio.gather` (the one place kept positions are applied) and records it in the call's
:class:`pio.PruneState`; in cached decoding it switches the layers after a stage to that stage's key mask, so
positions continue from what was really kept. The family-specific parts (rotary embedding, how positions
follow from a mask) are the adapter's: LLaVA renumbers positions contiguously over the kept tokens; an M-RoPE
family gathers its original 3-D positions with the kept tokens (``origin``).
"""

from __future__ import annotations

import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from pio.base import LAYER_CHOICES, ReductionMethod
from pio.gather import Span, build_keep_index, contiguous_positions, gather_rows
from pio.proxy import ProxyFn, causal_padding_bias, full_proxy, layer_keys, row_attention, sliced_proxy
from pio.state import PruneState, SelectionEvent

logger = logging.getLogger(__name__)


def backend_mask(impl: str, key_mask: torch.Tensor, q: int, dtype: torch.dtype, explicit: bool = False):
    """Causal + padding mask for ``q`` queries at the end of ``key_mask`` (B, K), in the backend's form.

    FlashAttention-2 takes the 2D padding mask (causality is its own); eager and SDPA take an additive
    (B, 1, q, K) mask. ``None`` is returned only where it means the same thing (no padding and SDPA's
    is_causal for a fresh sequence, or a single query) unless ``explicit`` is set.
    """
    all_valid = bool(key_mask.all())
    if impl == "flash_attention_2":
        return None if all_valid else key_mask.long()
    K = key_mask.shape[1]
    if all_valid and not explicit and (q == 1 or (q == K and impl == "sdpa")):
        return None
    query_pos = torch.arange(K - q, K, device=key_mask.device).expand(key_mask.shape[0], q)
    return causal_padding_bias(key_mask, query_pos, dtype)


@dataclass
class Segment:
    """Attention inputs shared by consecutive layers that see the same sequence."""

    key_mask: torch.Tensor  # (B, past + q) bool
    position_ids: torch.Tensor  # (B, q), or what the family's rotary embedding takes
    attention_mask: torch.Tensor | None  # what the backend gets
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin), each (B, q, head_dim)
    cache_position: torch.Tensor  # (q,)


class DecoderAdapter(ABC):
    """What the prune step needs to know about a decoder: its layers, final norm, LM head, attention backend,
    rotary embedding, and how positions follow from a key mask."""

    layers: Sequence[nn.Module]
    norm: nn.Module
    head: nn.Module | None
    attn_implementation: str

    @abstractmethod
    def positions(self, key_mask: torch.Tensor, q: int) -> torch.Tensor:
        """Position ids of the last ``q`` columns of ``key_mask`` (B, K), renumbered over its valid tokens."""

    def expand_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, q) positions in the form the family's rotary embedding takes (LLaMA: as they are)."""
        return positions

    def call_positions(self, position_ids: torch.Tensor | None, key_mask: torch.Tensor, q: int,
                       rope_deltas: torch.Tensor | None = None) -> torch.Tensor | None:
        """The positions of a call's ``q`` tokens at the end of ``key_mask`` (B, K): as given (2-D ones in the
        family's form), else, where the prefill recorded ``rope_deltas`` (B, 1), column index plus delta
        (decoding after an M-RoPE image continues after its largest id), else None: renumbered over the valid
        tokens by the prune step (:meth:`positions`)."""
        if position_ids is not None:
            return self.expand_positions(position_ids) if position_ids.dim() == 2 else position_ids
        if rope_deltas is None:
            return None
        K = key_mask.shape[1]
        pos = torch.arange(K - q, K, device=key_mask.device)[None] + rope_deltas.to(key_mask.device)
        return self.expand_positions(pos)

    def gather_positions(self, position_ids: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """The prefill's ``position_ids`` of the tokens ``origin`` (B, S') points at (kept tokens keep their
        original positions)."""
        return torch.gather(position_ids, 1, origin)

    @abstractmethod
    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin), each (B, q, head_dim), in the standard rotate-half layout."""

    def layer_kwargs(self, seg: Segment) -> dict[str, Any]:
        """What a decoder layer of this family is called with for ``seg`` (besides the cache)."""
        return {"attention_mask": seg.attention_mask, "position_ids": seg.position_ids,
                "cache_position": seg.cache_position, "position_embeddings": seg.position_embeddings}


class LlamaAdapter(DecoderAdapter):
    """LLaVA's language model: LLaMA layers, positions renumbered contiguously over the valid tokens."""

    def __init__(self, model: Any, head: nn.Module | None):
        self.layers, self.norm, self.head, self._rotary = model.layers, model.norm, head, model.rotary_emb
        self.attn_implementation = model.config._attn_implementation

    def positions(self, key_mask: torch.Tensor, q: int) -> torch.Tensor:
        return contiguous_positions(key_mask)[:, key_mask.shape[1] - q:]

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary(h, position_ids)


class _Stage:
    """:class:`pio.base.StageInputs` for one stage: supplies only what the method declared it needs."""

    def __init__(self, step: PruneStep, layer: int, stage: int, h_in: torch.Tensor, h: torch.Tensor,
                 seg: Segment, targets: list[int]):
        self._step, self._h_in, self._seg = step, h_in, seg
        self.layer, self.stage, self.hidden, self.mask = layer, stage, h, seg.key_mask
        self.spans, self.targets = step.state.spans, targets

    def _need(self, what: str) -> None:
        if what not in self._step.method.needs:
            raise RuntimeError(f"method {self._step.method.name} asked for {what!r} without declaring it in its "
                               f"needs ({', '.join(sorted(self._step.method.needs))})")

    def _decoder_layer(self, which: str) -> nn.Module:
        if which not in LAYER_CHOICES:
            raise ValueError(f"which must be one of {LAYER_CHOICES}, got {which!r}")
        index = self.layer - 1 if which == "current" else self.layer
        layers = self._step.adapter.layers
        if index >= len(layers):
            raise ValueError(f"{self._step.method.name} after layer {self.layer} asks for the next layer, but the "
                             f"decoder has only {len(layers)} layers (prune earlier)")
        return layers[index]

    def attention(self, rows: torch.Tensor, which: str = "current") -> torch.Tensor:
        self._need("attention")
        module = self._decoder_layer(which)
        x = self._h_in if which == "current" else self.hidden
        with self.timed("attention"):
            probs = row_attention(module, x, rows.to(x.device), self.mask, self._seg.position_embeddings)
        self._step.state.events.append(SelectionEvent("attention", self.layer, x.shape[1], int(rows.shape[1])))
        return probs

    def keys(self, which: str = "current", heads: bool = False) -> torch.Tensor:
        self._need("keys")
        module = self._decoder_layer(which)
        x = self._h_in if which == "current" else self.hidden
        with torch.no_grad(), self.timed("keys"):
            keys = layer_keys(module, x, self._seg.position_embeddings)
        self._step.state.events.append(SelectionEvent("keys", self.layer, x.shape[1], 0))
        return keys.unflatten(2, (-1, module.self_attn.head_dim)) if heads else keys

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        self._need("norm")
        with torch.no_grad():
            return self._step.adapter.norm(x)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor, Sequence[Span | None]]:
        self._need("embeddings")
        step = self._step
        return step.embeds, step.embeds_mask, step.state.initial_spans

    def proxy(self, which: str = "next", impl: str = "sliced") -> ProxyFn:
        self._need("proxy")
        adapter, seg = self._step.adapter, self._seg
        if adapter.head is None:
            raise ValueError("the proxy needs the LM head: the decoder was called without lm_head")
        module = self._decoder_layer(which)
        if impl == "sliced":
            fn = sliced_proxy(module, adapter.norm, adapter.head, seg.key_mask, seg.position_embeddings)
        else:
            mask = backend_mask(adapter.attn_implementation, seg.key_mask, self.hidden.shape[1], self.hidden.dtype,
                                explicit=True)
            kwargs = adapter.layer_kwargs(seg)
            kwargs.pop("cache_position", None)
            fn = full_proxy(module, adapter.norm, adapter.head, {**kwargs, "attention_mask": mask})
        events, layer = self._step.state.events, self.layer

        def recorded(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            events.append(SelectionEvent("proxy", layer, x.shape[1], int(rows.shape[1]), impl))
            return fn(x, rows)

        return recorded

    def timed(self, name: str) -> AbstractContextManager:
        return self._step.state.timed(name, self.hidden.device)


class PruneStep:
    """One call's reduction: where the method acts, and the step run after each of those layers."""

    def __init__(self, adapter: DecoderAdapter, method: ReductionMethod | None, state: PruneState, prefill: bool,
                 attention_mask: torch.Tensor | None, total_len: int, embeds: torch.Tensor, key_mask: torch.Tensor):
        self.adapter, self.method, self.state, self.prefill = adapter, method, state, prefill
        self._attention_mask, self._total_len = attention_mask, total_len
        self.embeds, self.embeds_mask = embeds, key_mask  # the prefill's decoder input (SparseVLM's raters)
        self.renumber = state.positions == "renumber"
        self.base: Segment | None = None  # the call's first segment (original positions)
        self.layers: frozenset[int] = frozenset(method.layers) if method is not None else frozenset()
        if not prefill:  # decoding: only the stages the prefill really pruned change the key mask
            self.layers = frozenset(state.stage_masks)

    @classmethod
    def begin(cls, adapter: DecoderAdapter, method: ReductionMethod | None, state: PruneState,
              key_mask: torch.Tensor, attention_mask: torch.Tensor | None, h: torch.Tensor) -> PruneStep:
        """The step for a call of ``h`` (B, q, D) over ``key_mask`` (B, past + q); a prefill resets ``state``."""
        q = h.shape[1]
        prefill = key_mask.shape[1] == q
        if prefill:
            L = len(adapter.layers)
            counts = (lambda n0: method.counts(n0, L)) if method is not None else None
            state.begin_prefill(key_mask, L, method.layers if method is not None else (), counts,
                                method.positions if method is not None else "renumber")
            if method is not None and q == 1:
                method = None  # nothing to select from a single token
        return cls(adapter, method, state, prefill, attention_mask, key_mask.shape[1], h, key_mask)

    def segment(self, h: torch.Tensor, key_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> Segment:
        """Attention inputs for ``h`` (B, q, D) at the end of ``key_mask`` (B, past + q). Positions: as given,
        renumbered over ``key_mask``, or (``positions="original"``) the first segment's, gathered with the
        kept tokens."""
        q = h.shape[1]
        past = key_mask.shape[1] - q
        embeddings = None
        if position_ids is None and self.base is not None and not self.renumber:
            if self.prefill:
                position_ids = self.adapter.gather_positions(self.base.position_ids, self.state.origin)
            else:  # a new token keeps its unpruned position in every layer
                position_ids, embeddings = self.base.position_ids, self.base.position_embeddings
        if position_ids is None:
            position_ids = self.adapter.positions(key_mask, q)
        seg = Segment(
            key_mask=key_mask,
            position_ids=position_ids,
            attention_mask=backend_mask(self.adapter.attn_implementation, key_mask, q, h.dtype),
            position_embeddings=embeddings or self.adapter.rotary(h, position_ids),
            cache_position=torch.arange(past, past + q, device=h.device),
        )
        if self.base is None:
            self.base = seg
        return seg

    def __call__(self, layer: int, h_in: torch.Tensor, h: torch.Tensor, seg: Segment) -> tuple[torch.Tensor, Segment]:
        """After 1-based ``layer``: prune in prefill, or switch to the stage's key mask when decoding."""
        state = self.state
        if not self.prefill:
            return h, self.segment(h, state.decode_mask(layer, self._attention_mask, self._total_len))
        if self.method is None:
            return h, seg
        stage = self.method.layers.index(layer)
        targets = [t[stage] if t else 0 for t in state.targets]
        if layer in state.forced:
            selection = state.forced[layer]
        else:
            selection = self.method.select(_Stage(self, layer, stage, h_in, h, seg, targets))
        if all(k is None for k in selection.keep):
            state.record(layer, selection, None)
            return h, seg
        with state.timed("gather", h.device):
            merged = selection.merged or [None] * len(selection.keep)
            counts = [0 if m is None else int(m.shape[0]) for m in merged]
            keep = build_keep_index(seg.key_mask, state.spans, selection.keep, state.padding_side, counts)
            extra = _stack(merged, h) if keep.n_merged else None
            h = gather_rows(h, keep, merged=extra)
            state.record(layer, selection, keep)
        return h, self.segment(h, keep.mask)


def run_decoder(adapter: DecoderAdapter, h: torch.Tensor, key_mask: torch.Tensor, *, reducer: ReductionMethod | None,
                state: PruneState, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                cache: Any, use_cache: bool, output_hidden_states: bool = False, **kwargs: Any
                ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The decoder loop every family shares: each layer, then the prune step after the layers it acts at.

    ``h`` (B, q, D) is the call's input over ``key_mask`` (B, past + q); ``position_ids`` the first segment's
    positions (None: the adapter's). Returns the last layer's output (before the final norm) and, with
    ``output_hidden_states``, the input and every layer's output.
    """
    step = PruneStep.begin(adapter, reducer, state, key_mask, attention_mask, h)
    seg = step.segment(h, key_mask, position_ids)
    hidden = [h] if output_hidden_states else None
    for i, layer in enumerate(adapter.layers):
        out = layer(h, past_key_values=cache, use_cache=use_cache, **adapter.layer_kwargs(seg), **kwargs)
        h_in, h = h, out[0] if isinstance(out, tuple) else out
        if i + 1 in step.layers:
            h, seg = step(i + 1, h_in, h, seg)
        if hidden is not None:
            hidden.append(h)
    return h, hidden


def run_language_model(adapter: DecoderAdapter, h: torch.Tensor, *, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, past_key_values: Any, use_cache: bool, cache_config: Any,
                       reducer: ReductionMethod | None, state: PruneState, rope_deltas: torch.Tensor | None = None,
                       output_hidden_states: bool = False, **kwargs: Any
                       ) -> tuple[torch.Tensor, Any, tuple[torch.Tensor, ...] | None]:
    """A family's language model on ``h`` (B, q, D): the cache (a new ``DynamicCache`` of ``cache_config`` when
    ``use_cache`` and none is given), the valid-key mask from the 2-D ``attention_mask``, the first positions
    (:meth:`DecoderAdapter.call_positions`), :func:`run_decoder` and the final norm. Returns the normed output,
    the cache (None without ``use_cache``) and, with ``output_hidden_states``, the decoder's input and every
    layer's output, the last one normed (transformers' convention)."""
    B, q = h.shape[:2]
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=cache_config)
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("the language model takes a 2D attention_mask (batch, keys); it builds the 4D one itself")
    key_mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones(B, past + q, dtype=torch.bool, device=h.device))
    positions = adapter.call_positions(position_ids, key_mask, q, rope_deltas)
    h, hidden = run_decoder(adapter, h, key_mask, reducer=reducer, state=state, attention_mask=attention_mask,
                            position_ids=positions, cache=past_key_values if use_cache else None, use_cache=use_cache,
                            output_hidden_states=output_hidden_states, **kwargs)
    h = adapter.norm(h)
    return h, past_key_values if use_cache else None, tuple(hidden[:-1] + [h]) if hidden is not None else None


def _stack(rows: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Per-sample (m_b, D) tensors as one zero-padded (B, max m_b, D) tensor."""
    width = max(0 if r is None else r.shape[0] for r in rows)
    out = like.new_zeros(len(rows), width, like.shape[-1])
    for b, r in enumerate(rows):
        if r is not None:
            out[b, : r.shape[0]] = r.to(like.dtype)
    return out


_WARNED: weakref.WeakSet = weakref.WeakSet()


def warn_if_parameters_need_grad(model: nn.Module, method: ReductionMethod | None) -> None:
    """The proxy differentiates only the probe; parameters with ``requires_grad`` also get a graph (same result,
    more memory). The loader sets ``requires_grad=False``; say so once per model if a caller's has not."""
    if method is None or "proxy" not in method.needs or model in _WARNED:
        return
    if any(p.requires_grad for p in model.parameters()):
        logger.warning("model parameters require grad: PIO's proxy then also builds their graph (same result, more "
                       "memory); call model.requires_grad_(False) as load_pretrained_model does")
        _WARNED.add(model)
