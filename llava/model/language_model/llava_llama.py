"""LLaVA on LLaMA/Vicuna: transformers' decoder layers, our decoder loop with the reduction seam.

Only ``LlavaLlamaModel.forward`` is ours; layers, rotary embedding, norm and head are transformers' modules,
so the official weights load unchanged. After each layer a reduction method acts at, the loop calls the one
prune step (:mod:`llava.model.pruning`), which selects visual tokens during prefill and shortens the sequence
(and every later layer's KV cache) accordingly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pio.base import ReductionMethod
from pio.encoder import split_reducer
from pio.flops import measured_kv_bytes
from pio.state import PruneState

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel, head_rows
from ..pruning import LlamaAdapter, run_decoder, warn_if_parameters_need_grad


class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)

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
        reducer: ReductionMethod | None = None,
        prune_state: PruneState | None = None,
        lm_head: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """The decoder loop. ``reducer`` prunes visual tokens (``lm_head`` for PIO's proxy); ``prune_state``
        is this call's state (a fresh one when not given)."""
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
        state = prune_state if prune_state is not None else PruneState()
        h, hidden_states = run_decoder(
            LlamaAdapter(self, lm_head), h, key_mask, reducer=reducer, state=state, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states,
            **kwargs)
        h = self.norm(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    """LLaVA-1.5 / LLaVA-NeXT (Vicuna) with optional visual-token reduction inside the language model.

    The method is chosen per call: ``generate(..., reducer=make_method("pio", budget=64))``; nothing about it
    is stored on the model.
    """

    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def decoder_adapter(self) -> LlamaAdapter:
        """The language model as the prune step sees it (layers, norm, head, rotary, positions)."""
        return LlamaAdapter(self.model, self.lm_head)

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
        reducer: ReductionMethod | None = None,
        prune_state: PruneState | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Upstream's forward plus ``reducer`` (a :class:`pio.base.ReductionMethod`, prefill only) and
        ``prune_state`` (this call's :class:`pio.PruneState`, to read what was kept)."""
        prune_state = prune_state if prune_state is not None else PruneState()
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        pre, reducer = split_reducer(reducer)
        if prefill and reducer is not None:
            reducer.validate(self.config.num_hidden_layers)
            warn_if_parameters_need_grad(self, reducer)
        if inputs_embeds is None and images is not None:
            mm = self.prepare_multimodal_inputs(input_ids, attention_mask, images, image_sizes, labels, pre=pre,
                                                state=prune_state)
            input_ids, inputs_embeds, attention_mask, labels = None, mm.inputs_embeds, mm.attention_mask, mm.labels
            position_ids = mm.position_ids
            prune_state.set_inputs(mm.spans, mm.padding_side, mm.encoder)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            output_hidden_states=output_hidden_states,
            reducer=reducer,
            prune_state=prune_state,
            lm_head=self.lm_head,
            **{k: v for k, v in kwargs.items() if k not in ("output_attentions", "return_dict")},
        )
        if prefill and prune_state.profile and out.past_key_values is not None:
            prune_state.kv_bytes = measured_kv_bytes(out.past_key_values)
        h = out.last_hidden_state
        logits = self.lm_head(head_rows(h, logits_to_keep))
        loss = None
        if labels is not None:
            if prune_state.stage_masks:
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
        reducer: ReductionMethod | None = None,
        prune_state: PruneState | None = None,
        **kwargs: Any,
    ):
        """Upstream LLaVA's ``generate(input_ids, images=..., image_sizes=..., ...)``; returns new tokens only.

        ``reducer`` prunes visual tokens during prefill (e.g. ``make_method("pio", budget=64)``); pass
        ``prune_state=PruneState()`` to read what the prefill kept afterwards (``prune_state.report()``).
        """
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids (with <image> placeholders) and images, not inputs_embeds")
        prune_state = prune_state if prune_state is not None else PruneState()
        pre, llm = split_reducer(reducer)
        if pre is not None:
            pre.validate(self.config.num_hidden_layers)
        if images is not None:
            with prune_state.timed("vision", self.device):
                mm = self.prepare_multimodal_inputs(inputs, attention_mask, images, image_sizes, padding_side="left",
                                                    pre=pre, state=prune_state)
            embeds, attention_mask = mm.inputs_embeds, mm.attention_mask
            prune_state.set_inputs(mm.spans, "left", mm.encoder)
        else:
            if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
                raise ValueError("generation needs left padding: the last column of attention_mask has padding")
            inputs = inputs.to(self.device)
            attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
            embeds = self.get_model().embed_tokens(inputs)
            prune_state.set_inputs([[] for _ in range(inputs.shape[0])], "left")
        return super().generate(
            inputs_embeds=embeds, attention_mask=attention_mask, reducer=llm, prune_state=prune_state, **kwargs
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
