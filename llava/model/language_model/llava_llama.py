"""LLaVA on LLaMA/Vicuna: transformers' decoder layers, our decoder loop with the PIO seam.

Only ``LlavaLlamaModel.forward`` is ours; layers, rotary embedding, norm and head are transformers' modules,
so the official weights load unchanged. After each configured layer, during prefill, the loop asks ``pio``
which visual tokens to keep and shortens the sequence (and every later layer's KV cache) accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pio.flops import measured_kv_bytes
from pio.gather import build_keep_index, contiguous_positions, gather_rows
from pio.proxy import causal_padding_bias, full_proxy, sliced_proxy
from pio.select import PIOConfig, select_visual_tokens
from pio.state import PruneState

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"


@dataclass
class _Segment:
    """Attention inputs shared by consecutive layers that see the same sequence."""

    key_mask: torch.Tensor  # (B, past + q) bool
    position_ids: torch.Tensor  # (B, q)
    attention_mask: torch.Tensor | None  # what the backend gets
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    cache_position: torch.Tensor  # (q,)


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)

    # -- attention inputs --------------------------------------------------------------------------------
    def _backend_mask(self, key_mask: torch.Tensor, q: int, dtype: torch.dtype, explicit: bool = False):
        """Causal + padding mask for ``q`` queries at the end of ``key_mask`` (B, K), in the backend's form.

        FlashAttention-2 takes the 2D padding mask (causality is its own); eager and SDPA take an additive
        (B, 1, q, K) mask. ``None`` is returned only where it means the same thing (no padding and SDPA's
        is_causal for a fresh sequence, or a single query) unless ``explicit`` is set.
        """
        impl = self.config._attn_implementation
        all_valid = bool(key_mask.all())
        if impl == "flash_attention_2":
            return None if all_valid else key_mask.long()
        K = key_mask.shape[1]
        if all_valid and not explicit and (q == 1 or (q == K and impl == "sdpa")):
            return None
        query_pos = torch.arange(K - q, K, device=key_mask.device).expand(key_mask.shape[0], q)
        return causal_padding_bias(key_mask, query_pos, dtype)

    def _segment(self, h: torch.Tensor, key_mask: torch.Tensor, position_ids: torch.Tensor | None) -> _Segment:
        q = h.shape[1]
        past = key_mask.shape[1] - q
        if position_ids is None:
            position_ids = contiguous_positions(key_mask)[:, past:]
        return _Segment(
            key_mask=key_mask,
            position_ids=position_ids,
            attention_mask=self._backend_mask(key_mask, q, h.dtype),
            position_embeddings=self.rotary_emb(h, position_ids),
            cache_position=torch.arange(past, past + q, device=h.device),
        )

    # -- the decoder loop --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        pio: PIOConfig | None = None,
        prune_state: PruneState | None = None,
        lm_head: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """The decoder loop. ``pio`` + ``lm_head`` switch pruning on; ``prune_state`` is this call's state."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, q, D)
        B, q = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache else None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("LlavaLlamaModel takes a 2D attention_mask (batch, keys); it builds the 4D one itself")
        key_mask = (
            attention_mask.bool() if attention_mask is not None else torch.ones(B, past + q, dtype=torch.bool, device=h.device)
        )
        prefill = past == 0
        layers_to_prune = set(pio.schedule.layers) if pio is not None else set()
        if prefill and pio is not None and lm_head is None:
            raise ValueError("PIO needs the LM head for its proxy loss: pass lm_head=")
        if prefill and prune_state is not None:
            counts = (lambda n0: pio.schedule.counts(n0, self.config.num_hidden_layers)) if pio is not None else None
            prune_state.begin_prefill(key_mask, counts)
        seg = self._segment(h, key_mask, position_ids)
        hidden_states = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if prefill and prune_state is not None:
                prune_state.layer_lengths.append(h.shape[1])
            h = layer(
                h,
                attention_mask=seg.attention_mask,
                position_ids=seg.position_ids,
                past_key_values=cache,
                use_cache=use_cache,
                cache_position=seg.cache_position,
                position_embeddings=seg.position_embeddings,
                **kwargs,
            )
            rank = i + 1
            if rank in layers_to_prune and prune_state is not None:
                if prefill and q > 1:
                    h, key_mask = self._prune(rank, h, seg, pio, prune_state, lm_head)
                    seg = self._segment(h, key_mask, None)
                elif rank in prune_state.stage_masks:
                    key_mask = prune_state.decode_mask(rank, attention_mask, past + q)
                    seg = self._segment(h, key_mask, None)
            if hidden_states is not None:
                hidden_states.append(h)
        if prefill and prune_state is not None and prune_state.profile and cache is not None:
            prune_state.kv_bytes = measured_kv_bytes(cache)
        h = self.norm(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )

    def _prune(
        self, rank: int, h: torch.Tensor, seg: _Segment, pio: PIOConfig, state: PruneState, head: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select and drop visual tokens after 1-based layer ``rank`` (prefill only)."""
        stage = pio.schedule.layers.index(rank)
        targets = [t[stage] if t else 0 for t in state.targets]
        key_mask = seg.key_mask
        if rank in state.forced_keep:
            keep_local = list(state.forced_keep[rank])
        else:
            proxy_layer = self.layers[rank if pio.proxy == "next" else rank - 1]
            if pio.proxy_impl == "sliced":
                proxy = sliced_proxy(proxy_layer, self.norm, head, key_mask, seg.position_embeddings)
            else:
                mask = self._backend_mask(key_mask, h.shape[1], h.dtype, explicit=True)
                proxy = full_proxy(proxy_layer, self.norm, head, mask, seg.position_embeddings, seg.position_ids)
            keep_local = select_visual_tokens(h, key_mask, state.spans, targets, proxy, pio, state)
            if any(k is not None for k in keep_local):
                state.proxy_events.append((rank, h.shape[1]))
        if all(k is None for k in keep_local):
            state.record_prune(rank, None, keep_local)
            return h, key_mask
        with state.timed("gather", h.device):
            keep = build_keep_index(key_mask, state.spans, keep_local, state.padding_side)
            h = gather_rows(h, keep)
            state.record_prune(rank, keep, keep_local)
        return h, keep.mask


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    """LLaVA-1.5 / LLaVA-NeXT (Vicuna) with optional PIO pruning inside the language model."""

    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.pio_config: PIOConfig | None = None
        self.post_init()

    # -- PIO switch ---------------------------------------------------------------------------------------
    def enable_pio(self, config: PIOConfig) -> None:
        """Prune visual tokens with ``config`` in every later prefill (see :class:`pio.select.PIOConfig`)."""
        config.validate(self.config.num_hidden_layers)
        self.requires_grad_(False)  # only the probe gets a gradient
        self.pio_config = config

    def disable_pio(self) -> None:
        """Run the unpruned model again."""
        self.pio_config = None

    # -- forward / generate -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        images: Any | None = None,
        image_sizes: Any | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prune_state: PruneState | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None and images is not None:
            mm = self.prepare_multimodal_inputs(input_ids, attention_mask, images, image_sizes, labels)
            input_ids, inputs_embeds, attention_mask, labels = None, mm.inputs_embeds, mm.attention_mask, mm.labels
            position_ids = mm.position_ids
            prune_state = prune_state or PruneState()
            prune_state.set_inputs(mm.spans, mm.padding_side)
        if prune_state is None and self.pio_config is not None:
            prune_state = PruneState()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            output_hidden_states=output_hidden_states,
            pio=self.pio_config,
            prune_state=prune_state,
            lm_head=self.lm_head,
            **{k: v for k, v in kwargs.items() if k not in ("output_attentions", "return_dict")},
        )
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:
            if prune_state is not None and prune_state.stage_masks:
                labels = prune_state.gather_labels(labels)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Any | None = None,
        image_sizes: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        prune_state: PruneState | None = None,
        **kwargs: Any,
    ):
        """Upstream LLaVA's ``generate(input_ids, images=..., image_sizes=..., ...)``; returns new tokens only.

        Pass ``prune_state=PruneState()`` to read what the prefill kept afterwards (``prune_state.report``).
        """
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids (with <image> placeholders) and images, not inputs_embeds")
        prune_state = prune_state if prune_state is not None else PruneState()
        if images is not None:
            with prune_state.timed("vision", self.device):
                mm = self.prepare_multimodal_inputs(inputs, attention_mask, images, image_sizes, padding_side="left")
            embeds, attention_mask = mm.inputs_embeds, mm.attention_mask
            prune_state.set_inputs(mm.spans, "left")
        else:
            if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
                raise ValueError("generation needs left padding: the last column of attention_mask has padding")
            inputs = inputs.to(self.device)
            attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
            embeds = self.get_model().embed_tokens(inputs)
            prune_state.set_inputs([[] for _ in range(inputs.shape[0])], "left")
        return super().generate(
            inputs_embeds=embeds, attention_mask=attention_mask, prune_state=prune_state, **kwargs
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        images = kwargs.pop("images", None)
        image_sizes = kwargs.pop("image_sizes", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if images is not None:
            inputs["images"] = images
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
