"""Qwen2.5-VL with visual-token reduction: transformers' modules and weights, our forward and decoder loop.

:class:`Qwen2_5_VLForReduction` subclasses transformers' ``Qwen2_5_VLForConditionalGeneration`` without
touching its modules: the vision transformer, the merger, the decoder layers, rotary embedding, norm and head
are transformers' own, so the official checkpoint loads unchanged. Ours are the forward (the shared decoder
loop of :mod:`llava.model.pruning`, with the prune step after the layers a method acts at), the splicing of the
image features into the text (where an encoder-side method may drop some), and ``generate``.

Positions are Qwen's 3-D M-RoPE ids (temporal, height, width; transformers' ``get_rope_index``). A pruned
token keeps its original ids (the PIO authors' choice; ``--positions renumber`` gives the kept tokens
contiguous 1-D ids instead), and decoding continues from the unpruned sequence's next position, so a pruned
run generates at the positions an unpruned one would. The per-call state (positions, rope deltas, what was
kept) lives in the call's :class:`pio.PruneState` and the generation kwargs, never on the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLCausalLMOutputWithPast

from pio.encoder import EncoderMethod, split_reducer
from pio.flops import measured_kv_bytes
from pio.gather import Span, build_keep_index, contiguous_positions, gather_rows
from pio.state import EncoderRecord, PruneState

from ..encoder_stage import check_encoder, reduce_image_features
from ..llava_arch import MultimodalInputs, head_rows
from ..pruning import DecoderAdapter, Segment, run_decoder, warn_if_parameters_need_grad

__all__ = ["Qwen2_5_VLForReduction", "QwenAdapter", "mrope_merge"]


def mrope_merge(x: torch.Tensor, sections: Sequence[int]) -> torch.Tensor:
    """(3, B, q, hd) rotary cos or sin of the three position axes -> (B, q, hd): M-RoPE takes the rotary
    channels in consecutive sections of ``sections`` (temporal, height, width, repeated for the second half of
    the head), each from its own axis. The result rotates queries and keys like a 1-D rotary embedding."""
    axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(list(sections) * 2)])
    if axis.numel() != x.shape[-1]:
        raise ValueError(f"mrope_section {list(sections)} covers {axis.numel()} rotary channels, the head has "
                         f"{x.shape[-1]}")
    index = axis.to(x.device).view(1, 1, 1, -1).expand(1, *x.shape[1:])
    return x.gather(0, index)[0]


class QwenAdapter(DecoderAdapter):
    """Qwen2.5-VL's language model: M-RoPE positions (3, B, q), kept tokens keep theirs."""

    def __init__(self, text_model: Any, head: torch.nn.Module | None):
        self.layers, self.norm, self.head, self._rotary = text_model.layers, text_model.norm, head, text_model.rotary_emb
        self.sections = text_model.config.rope_scaling["mrope_section"]
        self.attn_implementation = text_model.config._attn_implementation

    def positions(self, key_mask: torch.Tensor, q: int) -> torch.Tensor:
        pos = contiguous_positions(key_mask)[:, key_mask.shape[1] - q:]
        return pos[None].expand(3, -1, -1)

    def gather_positions(self, position_ids: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return torch.gather(position_ids, 2, origin[None].expand(3, -1, -1))

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rotary(h, position_ids)
        return mrope_merge(cos, self.sections), mrope_merge(sin, self.sections)

    def layer_kwargs(self, seg: Segment) -> dict[str, Any]:
        # the layers take the three axes' (cos, sin) and pick the sections themselves; the merged ones, seen
        # on every axis, give the same rotation. No position_ids: transformers passes them only for packed
        # FlashAttention inputs.
        cos, sin = seg.position_embeddings
        return {"attention_mask": seg.attention_mask, "cache_position": seg.cache_position,
                "position_embeddings": (cos.expand(3, *cos.shape), sin.expand(3, *sin.shape))}


def visual_spans(is_visual: torch.Tensor) -> list[list[Span]]:
    """Per row of ``is_visual`` (B, S) bool, the (start, length) of each run of visual tokens (one per image)."""
    out = []
    for row in is_visual.bool():
        padded = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int()
        edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
        out.append([(a, b - a) for a, b in zip(edges[::2], edges[1::2], strict=True)])
    return out


def next_positions(position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1): one more than the largest position id of each row's valid tokens (where decoding continues)."""
    valid = mask.bool()[None].expand_as(position_ids)
    return position_ids.masked_fill(~valid, -1).amax(dim=(0, 2)).add(1)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def received_attention(block: Any, h: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], rows: int = 1024) -> torch.Tensor:
    """(S,) float32: the softmax attention each position of ``h`` (S, C), a vision block's input, receives in
    that block, summed over heads and averaged over the query rows of its attention group (``cu_seqlens``: the
    groups' boundaries, e.g. one per image in a full-attention block). Recomputed from the block's own queries
    and keys, ``rows`` query rows at a time, so the model's attention backend is untouched."""
    attn = block.attn
    S = h.shape[0]
    q, k, _ = attn.qkv(block.norm1(h)).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = (t.float()[:, None] for t in position_embeddings)
    q = q.float() * cos + _rotate_half(q.float()) * sin  # (S, H, hd)
    k = k.float() * cos + _rotate_half(k.float()) * sin
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(S, dtype=torch.float32, device=h.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        keys = k[a:b].transpose(0, 1)  # (H, n, hd)
        total = torch.zeros(b - a, dtype=torch.float32, device=h.device)
        for r in range(a, b, rows):
            queries = q[r:min(r + rows, b)].transpose(0, 1)  # (H, c, hd)
            total += ((queries @ keys.transpose(1, 2)) * scale).softmax(dim=-1).sum(dim=(0, 1))
        out[a:b] = total / (b - a)
    return out


class _VisionMaps:
    """The attention each image's merged tokens receive at the vision blocks an encoder-side method asks for,
    from the block inputs caught while the vision transformer ran (per call; nothing stays on the model)."""

    def __init__(self, visual: Any, grid_thw: torch.Tensor):
        self.visual, self.grid_thw = visual, grid_thw
        self.inputs: dict[int, tuple] = {}
        self._maps: dict[int, list[torch.Tensor]] = {}

    def catch(self):
        def hook(index):
            def pre(module, args, kwargs):
                self.inputs[index] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                                      kwargs["position_embeddings"])
            return pre
        return [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(self.visual.blocks)]

    def __call__(self, image: int, layer: int) -> torch.Tensor:
        layer = layer % len(self.visual.blocks)
        if layer not in self._maps:
            h, cu, pe = self.inputs[layer]
            per_patch = received_attention(self.visual.blocks[layer], h, cu, pe)  # the ViT's window order
            unit = self.visual.spatial_merge_unit
            window_index, _ = self.visual.get_window_index(self.grid_thw)
            merged = per_patch.view(-1, unit).mean(dim=1)[torch.argsort(window_index.to(h.device))]  # raster
            sizes = (self.grid_thw.prod(-1) // unit).tolist()
            self._maps[layer] = list(merged.split(sizes))
        return self._maps[layer][image]


class Qwen2_5_VLForReduction(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL (transformers' modules) with optional visual-token reduction, chosen per call.

    ``generate(input_ids, images=pixel_values, image_sizes=image_grid_thw, reducer=make_method("pio",
    budget=64))`` takes the processor's outputs under the names every runner of this codebase passes (and
    ``pixel_values`` / ``image_grid_thw`` as well); it returns the new tokens only.
    """

    def decoder_adapter(self) -> QwenAdapter:
        """The language model as the prune step sees it (layers, norm, head, M-RoPE, positions)."""
        return QwenAdapter(self.model.language_model, self.lm_head)

    # -- inputs --------------------------------------------------------------------------------------------
    def prepare_multimodal_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None, pre: EncoderMethod | None = None, state: PruneState | None = None,
        padding_side: str | None = None,
    ) -> MultimodalInputs:
        """Embeddings with the images' features in place of their ``<|image_pad|>`` tokens, the M-RoPE position
        ids (3, B, S) and each image's span; an encoder-side method ``pre`` first drops (and may merge) each
        image's tokens, which then leave the sequence with their position ids.

        Returns :class:`~llava.model.llava_arch.MultimodalInputs` with ``position_ids`` (3, B, S) and
        ``rope_deltas`` (B, 1) (the next position minus the sequence length).
        """
        device = self.lm_head.weight.device
        input_ids = input_ids.to(device)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device)
        side = padding_side or _padding_side(mask)
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        if (input_ids == self.config.video_token_id).any():
            raise ValueError("video inputs are not supported; pass images")
        n_tokens = is_image.sum(dim=1).tolist()
        features: list[torch.Tensor] = []
        maps = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values without image_grid_thw: pass both, as the processor returns them")
            image_grid_thw = image_grid_thw.to(device)
            if pre is not None:
                check_encoder(pre, "merged")
                if "received_attention" in pre.needs:
                    maps = _VisionMaps(self.model.visual, image_grid_thw)
            hooks = maps.catch() if maps is not None else []
            try:
                features = list(self.model.get_image_features(pixel_values.to(device), image_grid_thw))
            finally:
                for hook in hooks:
                    hook.remove()
            if state is not None:
                state.vision_grids = [list(map(int, g)) for g in image_grid_thw.tolist()]
        if sum(n_tokens) != sum(int(f.shape[0]) for f in features):
            raise ValueError(f"the prompts hold {sum(n_tokens)} image tokens but the images give "
                             f"{sum(int(f.shape[0]) for f in features)} features: build prompts and pixels with "
                             "the same processor call")
        if features:
            flat = torch.cat(features).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), flat)
        positions, _ = self.model.get_rope_index(input_ids, image_grid_thw, None, attention_mask=mask)
        spans = visual_spans(is_image & mask.bool())
        encoder = None
        if pre is not None and features:
            embeds, mask, positions, spans, encoder = self._reduce_images(
                pre, features, image_grid_thw, maps, embeds, mask, positions, spans, side, state)
        return MultimodalInputs(embeds, mask.long(), positions, None, spans, side, encoder,
                                next_positions(positions, mask) - mask.shape[1])

    def _reduce_images(self, pre: EncoderMethod, features: list[torch.Tensor], image_grid_thw: torch.Tensor,
                       maps: _VisionMaps | None, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                       spans: list[list[Span]], side: str, state: PruneState | None):
        """Apply the encoder-side method to every image and drop the tokens it did not keep."""
        if any(len(s) > 1 for s in spans):
            raise ValueError("encoder-side reduction on Qwen2.5-VL handles one image per sample")
        visual = self.model.visual
        m = visual.spatial_merge_size
        grids = [(int(h) // m, int(w) // m) for _, h, w in image_grid_thw.tolist()]
        reduced = iter(reduce_image_features(pre, features, grids, visual.fullatt_block_indexes, maps, state,
                                             visual.spatial_merge_unit))
        keep_local, records = [], []
        for b, s in enumerate(spans):
            if not s:
                keep_local.append(None)
                records.append([])
                continue
            crop = next(reduced)
            start, length = s[0]
            embeds[b, start:start + length] = crop.features.to(embeds.dtype)
            keep_local.append(crop.mask.nonzero().flatten())
            records.append([EncoderRecord(length, keep_local[-1].tolist())])
        keep = build_keep_index(mask.bool(), [s[0] if s else None for s in spans], keep_local, side)
        embeds = gather_rows(embeds, keep)
        positions = torch.stack([gather_rows(p, keep, fill=1) for p in positions])
        new_spans = [[sp] if sp is not None else [] for sp in keep.spans]
        return embeds, keep.mask.long(), positions, new_spans, records

    # -- forward -------------------------------------------------------------------------------------------
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
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        reducer: Any = None,
        prune_state: PruneState | None = None,
        mrope_positions: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Qwen2_5_VLCausalLMOutputWithPast:
        """transformers' forward plus ``reducer`` (prefill only) and ``prune_state`` (this call's state).

        Prefill from ``input_ids`` (+ ``pixel_values``, ``image_grid_thw``), or from ``inputs_embeds`` with
        ``mrope_positions`` (B, 3, S) (what :meth:`generate` passes); cached decoding continues at
        ``rope_deltas`` (returned by the prefill) past the unpruned length, like transformers. ``images`` /
        ``image_sizes`` are ``pixel_values`` / ``image_grid_thw`` under the LLaVA runners' names.
        """
        pixel_values = images if pixel_values is None else pixel_values
        image_grid_thw = image_sizes if image_grid_thw is None else image_grid_thw
        state = prune_state if prune_state is not None else PruneState()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefill = past == 0
        pre, llm = split_reducer(reducer)
        if prefill and llm is not None:
            llm.validate(self.config.text_config.num_hidden_layers)
            warn_if_parameters_need_grad(self, llm)
        if inputs_embeds is None:
            if prefill:
                mm = self.prepare_multimodal_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pre,
                                                    state)
                inputs_embeds, attention_mask = mm.inputs_embeds, mm.attention_mask
                position_ids, rope_deltas = mm.position_ids, mm.rope_deltas
                state.set_inputs(mm.spans, mm.padding_side, mm.encoder)
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids.to(self.lm_head.weight.device))
        elif mrope_positions is not None and prefill:
            position_ids = mrope_positions.transpose(0, 1)
        h = inputs_embeds
        B, q = h.shape[:2]
        key_mask = (attention_mask.bool() if attention_mask is not None
                    else torch.ones(B, past + q, dtype=torch.bool, device=h.device))
        if position_ids is None:
            position_ids = self._default_positions(key_mask, q, rope_deltas)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        text = self.model.language_model
        h, hidden = run_decoder(
            self.decoder_adapter(), h, key_mask, reducer=llm, state=state, attention_mask=attention_mask,
            position_ids=position_ids, cache=past_key_values if use_cache else None, use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
            **{k: v for k, v in kwargs.items() if k not in ("output_attentions", "return_dict")})
        h = text.norm(h)
        if prefill and state.profile and use_cache:
            state.kv_bytes = measured_kv_bytes(past_key_values)
        logits = self.lm_head(head_rows(h, logits_to_keep))
        loss = None
        if labels is not None:
            if state.stage_masks:
                labels = state.gather_labels(labels)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return Qwen2_5_VLCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden[:-1] + [h]) if hidden is not None else None, rope_deltas=rope_deltas)

    @staticmethod
    def _default_positions(key_mask: torch.Tensor, q: int, rope_deltas: torch.Tensor | None) -> torch.Tensor:
        """Positions of the last ``q`` of ``key_mask``'s columns: text positions over the valid tokens, moved by
        the prefill's ``rope_deltas`` (decoding after an image continues after the image's largest id)."""
        K = key_mask.shape[1]
        if rope_deltas is None:
            pos = contiguous_positions(key_mask)[:, K - q:]
        else:  # transformers' rule: column index + delta
            pos = torch.arange(K - q, K, device=key_mask.device)[None] + rope_deltas.to(key_mask.device)
        return pos[None].expand(3, -1, -1)

    # -- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        reducer: Any = None,
        prune_state: PruneState | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Generate from the processor's ``input_ids`` (left-padded for a batch) and, optionally, its
        ``pixel_values`` and ``image_grid_thw`` (``images`` / ``image_sizes`` are the same, under the names the
        LLaVA runners use). ``reducer`` reduces visual tokens; ``prune_state`` tells what was kept. Returns the
        new tokens only."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs input_ids (the processor's, with the image tokens expanded)")
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids and pixel_values, not inputs_embeds")
        pixel_values = images if pixel_values is None else pixel_values
        image_grid_thw = image_sizes if image_grid_thw is None else image_grid_thw
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generation needs left padding: the last column of attention_mask has padding "
                             "(set processor.tokenizer.padding_side = 'left')")
        state = prune_state if prune_state is not None else PruneState()
        pre, llm = split_reducer(reducer)
        if pre is not None:
            pre.validate(self.config.text_config.num_hidden_layers)
        with state.timed("vision", self.device):
            mm = self.prepare_multimodal_inputs(inputs, attention_mask, pixel_values, image_grid_thw, pre, state,
                                                padding_side="left")
        state.set_inputs(mm.spans, "left", mm.encoder)
        return super().generate(
            inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask,
            mrope_positions=mm.position_ids.transpose(0, 1), rope_deltas=mm.rope_deltas,
            reducer=llm, prune_state=state, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      cache_position=None, **kwargs):
        # the generic preparation (skipping transformers' Qwen override, which keeps rope deltas on the model);
        # positions come from mrope_positions in prefill and rope_deltas afterwards
        kwargs.pop("position_ids", None)
        inputs = GenerationMixin.prepare_inputs_for_generation(
            self, input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, cache_position=cache_position, **kwargs)
        inputs.pop("position_ids", None)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            inputs.pop("mrope_positions", None)
        return inputs


def _padding_side(mask: torch.Tensor) -> str:
    """``"left"`` when some row is padded at its start, else ``"right"``."""
    return "left" if bool((mask[:, 0] == 0).any()) else "right"

