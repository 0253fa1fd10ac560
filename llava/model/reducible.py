"""The forward and ``generate`` every family shares: a causal LM whose visual tokens a method may reduce.

:class:`ReducibleLM` is a mixin placed before a family's transformers class (``class LlavaLlamaForCausalLM(
ReducibleLM, LlamaForCausalLM)``); the family supplies only

* ``prepare_multimodal_inputs(input_ids, attention_mask, images, image_sizes, labels, padding_side, pre, state)``
  -> :class:`MultimodalInputs`: the images encoded (an encoder-side method ``pre`` applied) and spliced into the
  text, each image's visual span, and the prefill's positions (families with 1-D positions splice with
  :func:`splice_visual`);
* ``decoder_adapter()`` -> :class:`~llava.model.pruning.DecoderAdapter`: its language model as the prune step
  sees it (layers, norm, head, rotary embedding, how positions follow from a mask).

Everything else is here, once: splitting the reducer into its encoder-side and in-LLM parts, validating it
against the decoder, the warning about parameters that need gradients, the multimodal preparation and the
call's :class:`pio.PruneState`, the decoder loop (:func:`~llava.model.pruning.run_language_model`), the KV-cache
bytes, the LM head on the rows asked for, the labels' loss over the kept tokens, and ``generate``'s shape
(prefill from the prepared embeddings, cached decoding at the positions the prefill left).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from pio.encoder import split_reducer
from pio.flops import measured_kv_bytes
from pio.gather import Span, contiguous_positions
from pio.state import EncoderRecord, PruneState

from .pruning import run_language_model, warn_if_parameters_need_grad

__all__ = ["MultimodalInputs", "ReducibleLM", "ReducibleLMOutput", "head_rows", "splice_visual"]


@dataclass
class MultimodalInputs:
    """A padded batch with images spliced in.

    Attributes:
        inputs_embeds: (B, S, D).
        attention_mask: (B, S) long, 1 for real tokens.
        position_ids: the prefill's positions: (B, S) long, 0.. over the real tokens (padding gets 1), or what
            the family's rotary embedding takes (Qwen2.5-VL: its M-RoPE ids (3, B, S)); the batch axis is always
            the one before the sequence axis.
        labels: (B, S) or None; image and padding positions are IGNORE_INDEX.
        spans: per sample, the (start, length) of each image's features in the padded sequence.
        padding_side: side the batch was padded on.
        encoder: per sample, what an encoder-side reduction did to each image (None: none ran).
        rope_deltas: (B, 1) where decoding continues minus the sequence length, for families whose positions
            do not simply count the tokens (Qwen2.5-VL), else None.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    spans: list[list[Span]]
    padding_side: str
    encoder: list[list[EncoderRecord]] | None = None
    rope_deltas: torch.Tensor | None = None


def splice_visual(
    embed: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    features: Sequence[torch.Tensor],
    *,
    side: str,
    marks: torch.Tensor | None = None,
    marked: Sequence[int] | None = None,
    records: Sequence[EncoderRecord] | None = None,
    labels: torch.Tensor | None = None,
    max_length: int | None = None,
    what: str = "image",
) -> MultimodalInputs:
    """The text's embeddings with each visual item's features in place of its mark, padded into a batch on ``side``
    (LLaVA's and LLaVA-OneVision's splice; upstream LLaVA's ``prepare_inputs_labels_for_multimodal``).

    Marks (``marks`` (B, T) bool over ``input_ids``; default: the ``IMAGE_TOKEN_INDEX`` placeholders) are taken in
    order over the batch's valid tokens (``attention_mask``), each by the next item of ``features`` (per item
    (n_i, D), an image's or a video's visual sequence). An ``IMAGE_TOKEN_INDEX`` placeholder is one token; any other
    marked id starts a run of ``marked[i]`` copies of itself (default: the item's length; with an encoder-side
    method the unreduced count, the run then giving way to the kept tokens), the prompt expanded as a converted
    checkpoint's processor does.

    Returns :class:`MultimodalInputs`: embeddings (B, S, D) in the text's dtype, the mask, 1-D positions contiguous
    over the valid tokens, ``labels`` with ``IGNORE_INDEX`` over the features and the padding (None without
    ``labels``), one ``(start, length)`` span per item, and ``records`` (the items' :class:`EncoderRecord`) per
    sample when given.

    Raises:
        ValueError: more marks than items, items left over, a run of marks shorter than its item, or a sequence
            longer than ``max_length``.
    """
    device = embed.weight.device  # inputs may come from the CPU side of a data pipeline
    input_ids = input_ids.to(device)
    valid = (attention_mask.to(device).bool() if attention_mask is not None
             else torch.ones_like(input_ids, dtype=torch.bool))
    marks = (input_ids == IMAGE_TOKEN_INDEX) if marks is None else marks.to(device)
    pending = iter(range(len(features)))
    seqs, labs, spans, encoder = [], [], [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][valid[b]]
        lab = labels[b].to(device)[valid[b]] if labels is not None else None
        text = embed(ids.clamp(min=0))  # placeholders embedded as id 0, replaced below
        parts, lparts, sample_spans, sample_records, length, t = [], [], [], [], 0, 0
        where = marks[b][valid[b]].nonzero().flatten().tolist()
        k = 0
        while k < len(where):
            start = where[k]
            parts.append(text[t:start])
            lparts.append(None if lab is None else lab[t:start])
            length += start - t
            i = next(pending, None)
            if i is None:
                raise ValueError(f"the prompts mark more {what}s than the {len(features)} given")
            f = features[i]
            if int(ids[start]) == IMAGE_TOKEN_INDEX:
                t, k = start + 1, k + 1
            else:  # an expanded run: exactly this item's (unreduced) token count
                n = marked[i] if marked is not None else f.shape[0]
                run = ids[start:start + n]
                if run.numel() != n or bool((run != ids[start]).any()):
                    raise ValueError(f"{what} {i} makes {n} visual tokens but its run of marks in the prompt is "
                                     "shorter: expand each mark with the checkpoint's own counts (its family's "
                                     "prompt encoding)")
                t, k = start + n, k + n
            sample_spans.append((length, f.shape[0]))
            if records is not None:
                sample_records.append(records[i])
            parts.append(f.to(text.dtype))
            lparts.append(None if lab is None else lab.new_full((f.shape[0],), IGNORE_INDEX))
            length += f.shape[0]
        parts.append(text[t:])
        lparts.append(None if lab is None else lab[t:])
        seqs.append(torch.cat(parts))
        labs.append(torch.cat(lparts) if lab is not None else None)
        spans.append(sample_spans)
        encoder.append(sample_records)
    if next(pending, None) is not None:
        raise ValueError(f"{len(features)} {what}s given but the prompts mark fewer")
    S = max(s.shape[0] for s in seqs)
    if max_length and S > max_length:
        raise ValueError(f"the multimodal sequence has {S} tokens, more than max_position_embeddings={max_length}; "
                         f"shorten the prompt or use fewer/smaller {what}s (nothing is truncated silently)")
    B, D = len(seqs), seqs[0].shape[1]
    emb = seqs[0].new_zeros(B, S, D)
    mask = torch.zeros(B, S, dtype=torch.long, device=emb.device)
    lab_out = torch.full((B, S), IGNORE_INDEX, dtype=torch.long, device=emb.device) if labels is not None else None
    for b, s in enumerate(seqs):
        lo = S - s.shape[0] if side == "left" else 0
        emb[b, lo:lo + s.shape[0]] = s
        mask[b, lo:lo + s.shape[0]] = 1
        if lab_out is not None:
            lab_out[b, lo:lo + s.shape[0]] = labs[b]
        spans[b] = [(start + lo, n) for start, n in spans[b]]
    return MultimodalInputs(emb, mask, contiguous_positions(mask), lab_out, spans, side,
                            encoder if records is not None else None)


@dataclass
class ReducibleLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus ``rope_deltas`` (families with M-RoPE positions; else None)."""

    rope_deltas: torch.Tensor | None = None


def head_rows(h: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The rows of ``h`` (B, S, D) the LM head reads: the last ``logits_to_keep`` (0: all) or the given indices.

    A slice of a few rows is copied into a compact tensor: bf16 matrix products on CPU take a slow path, 75x
    slower for LLaVA's head and 100x for Qwen2.5-VL's, on a row whose batch stride is the whole sequence's.
    """
    if isinstance(logits_to_keep, int):
        if logits_to_keep == 0 or logits_to_keep >= h.shape[1]:
            return h
        rows = h[:, -logits_to_keep:, :]
    else:
        rows = h[:, logits_to_keep, :]
    return rows.clone(memory_format=torch.contiguous_format) if rows.shape[1] < h.shape[1] else rows


class ReducibleLM:
    """The shared forward / generate of every family's causal LM (module docstring). The family's class defines
    ``prepare_multimodal_inputs`` and ``decoder_adapter``.

    Class attributes:
        image_aliases: other names a family's callers use for ``images`` / ``image_sizes`` (Qwen2.5-VL's
            processor calls them ``pixel_values`` / ``image_grid_thw``).
        prepare_text_only: prepare a prefill without images too (Qwen2.5-VL: its M-RoPE positions and image-token
            checks come from the whole prompt); otherwise a text-only prompt is embedded as it is.
    """

    image_aliases: ClassVar[dict[str, str]] = {}
    prepare_text_only: ClassVar[bool] = False

    # -- shared ---------------------------------------------------------------------------------------------
    def _image_arguments(self, images: Any, image_sizes: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``images`` and ``image_sizes``, also when given under the family's other names (popped from kwargs)."""
        given = {"images": images, "image_sizes": image_sizes}
        for alias, name in self.image_aliases.items():
            value = kwargs.pop(alias, None)
            if value is not None and given[name] is None:
                given[name] = value
        return given["images"], given["image_sizes"]

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
        reducer: Any = None,
        prune_state: PruneState | None = None,
        rope_deltas: torch.Tensor | None = None,
        mm_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ReducibleLMOutput:
        """transformers' forward plus ``reducer`` (a :class:`pio.base.ReductionMethod`, an encoder-side method or
        a :class:`pio.encoder.Pipeline`; prefill only) and ``prune_state`` (this call's :class:`pio.PruneState`,
        to read what was kept).

        A prefill from ``input_ids`` with ``images`` (and ``image_sizes``) encodes and splices them; one from
        ``inputs_embeds`` takes ``position_ids`` or ``mm_positions`` (the prepared positions, batch axis first, as
        :meth:`generate` passes them). Cached decoding continues at ``rope_deltas`` past the column where the
        family's positions need it.
        """
        images, image_sizes = self._image_arguments(images, image_sizes, kwargs)
        state = prune_state if prune_state is not None else PruneState()
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        pre, llm = split_reducer(reducer)
        adapter = self.decoder_adapter()
        if prefill and llm is not None:
            llm.validate(len(adapter.layers))
            warn_if_parameters_need_grad(self, llm)
        if inputs_embeds is None and prefill and (images is not None or self.prepare_text_only):
            mm = self.prepare_multimodal_inputs(input_ids, attention_mask, images, image_sizes, labels, pre=pre,
                                                state=state)
            input_ids, inputs_embeds, attention_mask, position_ids = None, mm.inputs_embeds, mm.attention_mask, \
                mm.position_ids
            labels = mm.labels if mm.labels is not None else labels
            rope_deltas = mm.rope_deltas
            state.set_inputs(mm.spans, mm.padding_side, mm.encoder)
        elif inputs_embeds is not None and prefill and mm_positions is not None and position_ids is None:
            position_ids = mm_positions.movedim(0, -2)  # (B, ..., S) -> the family's layout, batch before sequence
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids.to(self.get_input_embeddings().weight.device))
        if use_cache is None:  # a composite config may keep it on its text part only (LLaVA-OneVision)
            use_cache = getattr(self.config, "use_cache", None)
            use_cache = getattr(self.config.get_text_config(decoder=True), "use_cache", True) if use_cache is None \
                else use_cache
        h, past_key_values, hidden = run_language_model(
            adapter, inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, cache_config=self.config, reducer=llm, state=state,
            rope_deltas=rope_deltas, output_hidden_states=bool(output_hidden_states),
            **{k: v for k, v in kwargs.items() if k not in ("output_attentions", "return_dict")})
        if prefill and state.profile and past_key_values is not None:
            state.kv_bytes = measured_kv_bytes(past_key_values)
        logits = self.lm_head(head_rows(h, logits_to_keep))
        loss = None
        if labels is not None:
            if state.stage_masks:
                labels = state.gather_labels(labels)
            vocab = self.config.get_text_config(decoder=True).vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        return ReducibleLMOutput(loss=loss, logits=logits, past_key_values=past_key_values, hidden_states=hidden,
                                 rope_deltas=rope_deltas)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Any | None = None,
        image_sizes: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        reducer: Any = None,
        prune_state: PruneState | None = None,
        **kwargs: Any,
    ):
        """Upstream LLaVA's ``generate(input_ids, images=..., image_sizes=..., ...)`` for every family; returns
        the new tokens only. ``input_ids`` come from the family's prompt encoding (a batch left-padded);
        ``reducer`` reduces visual tokens during prefill (e.g. ``make_method("pio", budget=64)``); pass
        ``prune_state=PruneState()`` to read what the prefill kept afterwards (``prune_state.report()``).
        """
        images, image_sizes = self._image_arguments(images, image_sizes, kwargs)
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs input_ids (the prompt's token ids, images marked as the family's "
                             "prompt encoding marks them)")
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids (with the image placeholders) and images, not inputs_embeds")
        state = prune_state if prune_state is not None else PruneState()
        pre, llm = split_reducer(reducer)
        if pre is not None:
            pre.validate(len(self.decoder_adapter().layers))
        extra: dict[str, Any] = {}
        if images is not None or self.prepare_text_only:
            with state.timed("vision", self.device):
                mm = self.prepare_multimodal_inputs(inputs, attention_mask, images, image_sizes, padding_side="left",
                                                    pre=pre, state=state)
            embeds, attention_mask = mm.inputs_embeds, mm.attention_mask
            extra = {"mm_positions": mm.position_ids.movedim(-2, 0), "rope_deltas": mm.rope_deltas}
            state.set_inputs(mm.spans, "left", mm.encoder)
        else:
            inputs = inputs.to(self.device)
            attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
            embeds = self.get_input_embeddings()(inputs)
            state.set_inputs([[] for _ in range(inputs.shape[0])], "left")
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generation needs left padding: the last column of attention_mask has padding (set the "
                             "tokenizer's padding_side = 'left')")
        return GenerationMixin.generate(self, inputs_embeds=embeds, attention_mask=attention_mask, reducer=llm,
                                        prune_state=state, **extra, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      cache_position=None, **kwargs):
        # the generic preparation (transformers' family overrides keep per-call state on the model); positions
        # come from mm_positions in prefill and from the key mask (or rope_deltas) afterwards
        kwargs.pop("position_ids", None)
        inputs = GenerationMixin.prepare_inputs_for_generation(
            self, input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, cache_position=cache_position, **kwargs)
        inputs.pop("position_ids", None)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            inputs.pop("mm_positions", None)
        return inputs

