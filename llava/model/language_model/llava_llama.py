"""LLaVA on LLaMA/Vicuna: transformers' decoder layers, the shared decoder loop with the reduction seam.

Only the forward is ours (:class:`~llava.model.reducible.ReducibleLM`, shared with every family); layers, rotary
embedding, norm and head are transformers' modules, so the official weights load unchanged. After each layer a
reduction method acts at, the loop calls the one prune step (:mod:`llava.model.pruning`), which selects visual
tokens during prefill and shortens the sequence (and every later layer's KV cache) accordingly. This family
supplies its multimodal input preparation (:class:`~llava.model.llava_arch.LlavaMetaForCausalLM`) and its decoder
adapter (:class:`~llava.model.pruning.LlamaAdapter`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from pio.base import ReductionMethod
from pio.state import PruneState

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from ..pruning import LlamaAdapter, run_language_model
from ..reducible import ReducibleLM


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
        h, cache, hidden = run_language_model(
            LlamaAdapter(self, lm_head), h, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=self.config.use_cache if use_cache is None else use_cache,
            cache_config=self.config, reducer=reducer,
            state=prune_state if prune_state is not None else PruneState(),
            output_hidden_states=bool(output_hidden_states),
            **{k: v for k, v in kwargs.items() if k not in ("output_attentions", "return_dict")})
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache, hidden_states=hidden)


class LlavaLlamaForCausalLM(ReducibleLM, LlamaForCausalLM, LlavaMetaForCausalLM):
    """LLaVA-1.5 / LLaVA-NeXT (Vicuna) with optional visual-token reduction inside the language model.

    The method is chosen per call: ``generate(input_ids, images=..., image_sizes=..., reducer=make_method("pio",
    budget=64))``; nothing about it is stored on the model.
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


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
