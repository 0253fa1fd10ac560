"""LLaVA-OneVision with visual-token reduction: transformers' modules and weights, our inputs and decoder loop.

:class:`LlavaOnevisionForReduction` subclasses transformers' ``LlavaOnevisionForConditionalGeneration`` without
touching its modules: the SigLIP tower, the two-layer projector, ``image_newline``, the Qwen2 decoder layers,
rotary embedding, norm and head are transformers' own, so both checkpoint layouts load into it unchanged
(:mod:`llava.model.onevision` translates the original one). Ours are, as separable steps:

1. :meth:`~LlavaOnevisionForReduction.encode_crops`: every view of every image through the tower (its hidden
   state at ``vision_feature_layer``) and the projector: ``(crops, 27 x 27, D)`` at 384 px / patch 14.
2. :meth:`~LlavaOnevisionForReduction.layout_image`: one image's visual sequence from its views. A single view
   (an image of a multi-image question, which the processor pads to a square) is its 729 tokens and one
   ``image_newline``. Otherwise the base 384 x 384 view (729 tokens, no newline), then the anyres grid: the grid
   crops tiled, unpadded to the image's aspect, shrunk bilinearly when larger than ``anyres_max_N`` allows
   (:func:`anyres_max_shape`), and one ``image_newline`` after each row.
3. :meth:`~LlavaOnevisionForReduction.prepare_multimodal_inputs`: the sequences spliced into the text, at a
   ``-200`` placeholder (one per image: the original checkpoints' prompts) or over the ``<image>`` tokens the
   converted checkpoints' processor expands (one per visual token), with each image's span recorded, so a
   reduction method sees exactly the visual tokens (base view, grid and its newlines).

The decoder is Qwen2 with 1-D rotary positions, contiguous over the valid tokens, as in LLaVA:
:class:`llava.model.pruning.LlamaAdapter` serves it unchanged. Image sizes are ``(height, width)`` and
``image_grid_pinpoints`` ``(height, width)`` canvases, transformers' convention (LLaVA-1.5/NeXT here use
``(width, height)``).

Sources (facts, not code): LLaVA-NeXT ``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``,
the ``anyres_max`` branch and the single-image branch) and transformers 4.57
``models/llava_onevision/modeling_llava_onevision.py`` (``pack_image_features``, ``get_image_features``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, LlavaOnevisionForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionCausalLMOutputWithPast

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import select_best_resolution, unpad_image, unpad_image_shape
from pio.encoder import split_reducer
from pio.flops import measured_kv_bytes
from pio.gather import Span, contiguous_positions
from pio.state import PruneState

from ..llava_arch import MultimodalInputs, head_rows
from ..pruning import LlamaAdapter, run_decoder, warn_if_parameters_need_grad

__all__ = [
    "LlavaOnevisionForReduction",
    "anyres_max_patches",
    "anyres_max_shape",
    "grid_shape",
    "visual_token_count",
]

RESIZE_SLACK = 1.1  # the feature map is shrunk only when it exceeds the anyres_max budget by more than 10 %


def anyres_max_patches(aspect_ratio: str) -> int:
    """The crop budget N of ``vision_aspect_ratio`` / ``image_aspect_ratio`` ``"anyres_max_N"`` (9 for OneVision)."""
    prefix = "anyres_max_"
    value = str(aspect_ratio)
    if not value.startswith(prefix) or not value[len(prefix):].isdigit() or int(value[len(prefix):]) < 1:
        raise ValueError(f"aspect ratio {aspect_ratio!r} is not supported; LLaVA-OneVision needs 'anyres_max_N' "
                         "(N >= 1, e.g. anyres_max_9)")
    return int(value[len(prefix):])


def grid_shape(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], crop: int) -> tuple[int, int]:
    """``(rows, cols)`` of anyres grid crops for an image of ``(height, width)``: the best ``(height, width)``
    canvas of ``pinpoints`` (most detail kept, then least area wasted, first listed on ties) in ``crop``-pixel
    squares."""
    h, w = (int(v) for v in image_size)
    best_h, best_w = select_best_resolution((h, w), pinpoints)  # symmetric in the two axes: (h, w) in, (h, w) out
    return best_h // crop, best_w // crop


def anyres_max_shape(height: int, width: int, side: int, max_patches: int) -> tuple[int, int]:
    """The unpadded grid feature map ``height x width`` after ``anyres_max_N``: unchanged unless it holds more than
    ``1.1^2 N`` crops' worth of ``side x side`` tokens, else bilinearly shrunk by ``ratio = sqrt(h w / (N side^2))``
    to ``(int(h // ratio), int(w // ratio))``."""
    ratio = math.sqrt(height * width / (max_patches * side**2))
    if ratio > RESIZE_SLACK:
        return int(height // ratio), int(width // ratio)
    return height, width


def visual_token_count(image_size: Sequence[int], config: Any, single_view: bool = False) -> int:
    """Visual tokens LLaVA-OneVision makes of an image of ``(height, width)``: ``side^2 + 1`` for a single view
    (an image of a multi-image question), else ``side^2`` (base view) plus the grid map and one newline per row.
    ``config`` is a ``LlavaOnevisionConfig``. 384x384 -> 1485, (480, 640) -> 2929, (1080, 1920) -> 7269."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if single_view:
        return side * side + 1
    rows, cols = grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    h, w = unpad_image_shape(rows * side, cols * side, (int(image_size[1]), int(image_size[0])))
    h, w = anyres_max_shape(h, w, side, anyres_max_patches(config.vision_aspect_ratio))
    return side * side + h * (w + 1)


class LlavaOnevisionForReduction(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision (transformers' modules) with optional visual-token reduction, chosen per call.

    ``generate(input_ids, images=views, image_sizes=sizes, reducer=make_method("pio", budget=64))``: ``views``
    is a list of per-image ``(V_i, 3, 384, 384)`` tensors (base view first; ``V_i = 1`` for a single view) or
    transformers' processor output ``pixel_values`` ``(N, max V, 3, 384, 384)`` with ``batch_num_images``;
    ``sizes`` ``(N, 2)`` the images' ``(height, width)``. It returns the new tokens only.
    """

    # -- the decoder as the prune step sees it ---------------------------------------------------------------
    def decoder_adapter(self) -> LlamaAdapter:
        """Qwen2 layers with 1-D rotary positions, renumbered over the valid tokens, as LLaVA's."""
        text = self.config.text_config
        if getattr(text, "use_sliding_window", False):
            raise ValueError("the language model uses sliding-window attention in some layers; the decoder loop "
                             "gives every layer the same full causal mask (OneVision checkpoints do not use it)")
        return LlamaAdapter(self.model.language_model, self.lm_head)

    # -- images: views -> features -> one sequence per image ------------------------------------------------
    @property
    def grid_side(self) -> int:
        """Tokens per side of one view: ``image_size // patch_size`` (27 for SigLIP at 384 px, patch 14)."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) views -> projected features (N, side^2, D): the tower's hidden state at
        ``vision_feature_layer`` (several layers: concatenated), then the projector."""
        tower = self.model.vision_tower
        weight = next(tower.parameters())
        hidden = tower(crops.to(weight.device, weight.dtype), output_hidden_states=True).hidden_states
        layer = self.config.vision_feature_layer
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # a tower with a CLS token (SigLIP has none: strategy "full")
        return self.model.multi_modal_projector(feats)

    def layout_image(self, views: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """One image's visual sequence (n, D) from its projected views (V, side^2, D) and its ``(height, width)``."""
        newline = self.model.image_newline.to(views.dtype)
        base = views[0]
        if views.shape[0] == 1:  # a single view: its tokens and one newline
            return torch.cat([base, newline[None]])
        side, D = self.grid_side, views.shape[-1]
        rows, cols = grid_shape(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        if views.shape[0] - 1 != rows * cols:
            raise ValueError(f"an image of {tuple(int(v) for v in image_size)} (height, width) takes a {rows} x {cols} "
                             f"grid of crops, but it has {views.shape[0] - 1} besides the base view: preprocess it "
                             "with the checkpoint's image processor (same image_grid_pinpoints)")
        # (rows, cols, side, side, D) -> (D, rows * side, cols * side), crops tiled in row-major order
        grid = views[1:].view(rows, cols, side, side, D).permute(4, 0, 2, 1, 3).reshape(D, rows * side, cols * side)
        grid = unpad_image(grid, (int(image_size[1]), int(image_size[0])))  # (D, h, w)
        h, w = grid.shape[1:]
        shape = anyres_max_shape(h, w, side, anyres_max_patches(self.config.vision_aspect_ratio))
        if shape != (h, w):
            grid = nn.functional.interpolate(grid[None], size=list(shape), mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(D, shape[0], 1)], dim=2)  # (D, h', w' + 1)
        return torch.cat([base, grid.flatten(1).transpose(0, 1)])

    def image_views(self, images: Any, image_sizes: Any, batch_num_images: Any = None) -> list[torch.Tensor]:
        """Per image, its (V, 3, H, W) views: from a list of such tensors as given, or from transformers'
        processor output ((N, max V, 3, H, W) padded, or (sum V, 3, H, W)), whose counts follow from
        ``image_sizes`` and ``batch_num_images`` (a question with several images: one view each)."""
        if isinstance(images, (list, tuple)):
            return [im[None] if im.dim() == 3 else im for im in images]
        if image_sizes is None:
            raise ValueError("images without image_sizes: pass each image's (height, width), as the processor returns")
        n_images = len(image_sizes)
        single = [False] * n_images
        if batch_num_images is not None:
            per_question = [int(n) for n in batch_num_images]
            if sum(per_question) != n_images:
                raise ValueError(f"batch_num_images {per_question} counts {sum(per_question)} images, image_sizes "
                                 f"{n_images}")
            single = [n > 1 for n in per_question for _ in range(n)]
        crop = self.config.vision_config.image_size
        counts = [1 if one else 1 + math.prod(grid_shape(size, self.config.image_grid_pinpoints, crop))
                  for size, one in zip(image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes, single,
                                       strict=True)]
        if images.dim() == 5:
            return [im[:n] for im, n in zip(images, counts, strict=True)]
        if images.dim() == 4 and images.shape[0] == sum(counts):
            return list(images.split(counts))
        raise ValueError(f"pixel values of shape {tuple(images.shape)} do not hold the {sum(counts)} views the "
                         f"{n_images} image sizes call for")

    def image_features(self, images: Any, image_sizes: Any, batch_num_images: Any = None,
                       state: PruneState | None = None) -> list[torch.Tensor]:
        """One (n_i, D) visual sequence per image, in order (see :meth:`image_views` for the inputs)."""
        views = self.image_views(images, image_sizes, batch_num_images)
        counts = [v.shape[0] for v in views]
        feats = self.encode_crops(torch.cat(views)).split(counts)
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        if sizes is None or len(sizes) != len(views):
            raise ValueError(f"{len(views)} images need {len(views)} image sizes (height, width), got "
                             f"{0 if sizes is None else len(sizes)}")
        if state is not None:
            state.vision_crops = sum(counts)
        return [self.layout_image(f, size) for f, size in zip(feats, sizes, strict=True)]

    # -- splicing ------------------------------------------------------------------------------------------
    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: Any | None,
        image_sizes: Any | None = None,
        batch_num_images: Any | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        state: PruneState | None = None,
    ) -> MultimodalInputs:
        """Every image's visual sequence in place of its mark, the batch re-padded on ``padding_side`` (default:
        the side ``attention_mask`` is padded on, else right), each image's span recorded.

        A mark is ``-200`` (one per image, the original checkpoints' prompts) or a run of
        ``config.image_token_id`` (one per visual token, as the converted checkpoints' processor expands
        ``<image>``); images are taken in order over the batch. Returns :class:`~llava.model.llava_arch.MultimodalInputs`
        with 1-D ``position_ids`` (B, S) contiguous over the valid tokens.
        """
        embed = self.get_input_embeddings()
        device = embed.weight.device
        input_ids = input_ids.to(device)
        valid = (attention_mask.to(device).bool() if attention_mask is not None
                 else torch.ones_like(input_ids, dtype=torch.bool))
        side = padding_side or ("left" if bool((~valid[:, 0]).any()) else "right")
        image_id = self.config.image_token_id
        marks = (input_ids == IMAGE_TOKEN_INDEX) | (input_ids == image_id)
        if bool((input_ids == self.config.video_token_id).any()):
            raise ValueError("video inputs are not supported on LLaVA-OneVision yet; pass images")
        feats: list[torch.Tensor] = []
        if bool((marks & valid).any()):
            if images is None:
                raise ValueError("the prompts mark images (<image> or the -200 placeholder) but no images were given")
            feats = self.image_features(images, image_sizes, batch_num_images, state)
        elif images is not None:
            raise ValueError(f"{len(image_sizes) if image_sizes is not None else 'some'} image(s) given but the "
                             "prompts have no <image> mark")
        pending = iter(feats)
        seqs, labs, spans = [], [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][valid[b]]
            lab = labels[b].to(device)[valid[b]] if labels is not None else None
            text = embed(ids.clamp(min=0))  # placeholders embedded as id 0, replaced below
            parts, lparts, sample_spans, length, t = [], [], [], 0, 0
            where = marks[b][valid[b]].nonzero().flatten().tolist()
            k = 0
            while k < len(where):
                start = where[k]
                parts.append(text[t:start])
                lparts.append(None if lab is None else lab[t:start])
                length += start - t
                f = next(pending, None)
                if f is None:
                    raise ValueError(f"the prompts mark more images than the {len(feats)} given")
                if int(ids[start]) == IMAGE_TOKEN_INDEX:
                    t, k = start + 1, k + 1
                else:  # an expanded run: exactly this image's token count
                    run = ids[start:start + f.shape[0]]
                    if run.numel() != f.shape[0] or bool((run != image_id).any()):
                        raise ValueError(f"an image makes {f.shape[0]} visual tokens but its <image> run in the "
                                         "prompt is shorter: expand each <image> with the checkpoint's own counts "
                                         "(llava.model.onevision.encode_prompt)")
                    t, k = start + f.shape[0], k + f.shape[0]
                sample_spans.append((length, f.shape[0]))
                parts.append(f.to(text.dtype))
                lparts.append(None if lab is None else lab.new_full((f.shape[0],), IGNORE_INDEX))
                length += f.shape[0]
            parts.append(text[t:])
            lparts.append(None if lab is None else lab[t:])
            seqs.append(torch.cat(parts))
            labs.append(torch.cat(lparts) if lab is not None else None)
            spans.append(sample_spans)
        if next(pending, None) is not None:
            raise ValueError(f"{len(feats)} images given but the prompts mark fewer")
        return self._pad(seqs, labs, spans, side)

    def _pad(self, seqs: list[torch.Tensor], labs: list[torch.Tensor | None], spans: list[list[Span]],
             side: str) -> MultimodalInputs:
        """Per-sample sequences padded into a batch on ``side``; spans moved with them."""
        S = max(s.shape[0] for s in seqs)
        limit = self.config.text_config.max_position_embeddings
        if S > limit:
            raise ValueError(f"the multimodal sequence has {S} tokens, more than max_position_embeddings={limit}; "
                             "shorten the prompt or use fewer/smaller images (nothing is truncated silently)")
        B, D = len(seqs), seqs[0].shape[1]
        emb = seqs[0].new_zeros(B, S, D)
        mask = torch.zeros(B, S, dtype=torch.long, device=emb.device)
        labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long, device=emb.device) if labs[0] is not None else None
        for b, s in enumerate(seqs):
            lo = S - s.shape[0] if side == "left" else 0
            emb[b, lo:lo + s.shape[0]] = s
            mask[b, lo:lo + s.shape[0]] = 1
            if labels is not None:
                labels[b, lo:lo + s.shape[0]] = labs[b]
            spans[b] = [(start + lo, n) for start, n in spans[b]]
        return MultimodalInputs(emb, mask, contiguous_positions(mask), labels, spans, side)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        reducer: Any = None,
        prune_state: PruneState | None = None,
        images: Any = None,
        **kwargs: Any,
    ) -> LlavaOnevisionCausalLMOutputWithPast:
        """transformers' forward plus ``reducer`` (an in-LLM method, prefill only) and ``prune_state`` (this
        call's state). ``images`` is ``pixel_values`` under the LLaVA runners' name (or a list of per-image views).
        """
        if pixel_values_videos is not None:
            raise ValueError("video inputs are not supported on LLaVA-OneVision yet; pass images")
        pixel_values = images if pixel_values is None else pixel_values
        state = prune_state if prune_state is not None else PruneState()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefill = past == 0
        llm = self._in_llm(reducer)
        if prefill and llm is not None:
            llm.validate(self.config.text_config.num_hidden_layers)
            warn_if_parameters_need_grad(self, llm)
        if inputs_embeds is None:
            if prefill:
                mm = self.prepare_multimodal_inputs(input_ids, attention_mask, pixel_values, image_sizes,
                                                    batch_num_images, labels, state=state)
                inputs_embeds, attention_mask, labels = mm.inputs_embeds, mm.attention_mask, mm.labels
                position_ids = mm.position_ids
                state.set_inputs(mm.spans, mm.padding_side)
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids.to(self.lm_head.weight.device))
        h = inputs_embeds  # (B, q, D)
        B, q = h.shape[:2]
        key_mask = (attention_mask.bool() if attention_mask is not None
                    else torch.ones(B, past + q, dtype=torch.bool, device=h.device))
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        h, hidden = run_decoder(
            self.decoder_adapter(), h, key_mask, reducer=llm, state=state, attention_mask=attention_mask,
            position_ids=position_ids, cache=past_key_values if use_cache else None, use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
            **{k: v for k, v in kwargs.items() if k not in ("output_attentions", "return_dict")})
        h = self.model.language_model.norm(h)
        if prefill and state.profile and use_cache:
            state.kv_bytes = measured_kv_bytes(past_key_values)
        logits = self.lm_head(head_rows(h, logits_to_keep))
        loss = None
        if labels is not None:
            if state.stage_masks:
                labels = state.gather_labels(labels)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return LlavaOnevisionCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden[:-1] + [h]) if hidden is not None else None)

    @staticmethod
    def _in_llm(reducer: Any) -> Any:
        """The in-LLM method of ``reducer``; encoder-side methods are refused (their seam comes later)."""
        pre, llm = split_reducer(reducer)
        if pre is not None:
            raise ValueError(f"{pre.name} acts on the vision tower's output; encoder-side methods are not available "
                             "on LLaVA-OneVision yet (use an in-LLM method such as pio or fastv)")
        return llm

    # -- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Any = None,
        image_sizes: Any = None,
        attention_mask: torch.Tensor | None = None,
        reducer: Any = None,
        prune_state: PruneState | None = None,
        pixel_values: Any = None,
        batch_num_images: Any = None,
        **kwargs: Any,
    ):
        """Generate from prompt ids (left-padded for a batch; images marked by ``-200`` or expanded
        ``<image>`` tokens) and the images' views and ``(height, width)`` sizes (``images`` / ``pixel_values``:
        see the class). ``reducer`` reduces visual tokens; ``prune_state`` tells what was kept. Returns the new
        tokens only."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs input_ids (the prompt, with its image marks)")
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids and images, not inputs_embeds")
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("video inputs are not supported on LLaVA-OneVision yet; pass images")
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generation needs left padding: the last column of attention_mask has padding "
                             "(set tokenizer.padding_side = 'left')")
        pixel_values = images if pixel_values is None else pixel_values
        state = prune_state if prune_state is not None else PruneState()
        llm = self._in_llm(reducer)
        with state.timed("vision", self.device):
            mm = self.prepare_multimodal_inputs(inputs, attention_mask, pixel_values, image_sizes, batch_num_images,
                                                padding_side="left", state=state)
        state.set_inputs(mm.spans, "left")
        return super().generate(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, reducer=llm,
                                prune_state=state, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      cache_position=None, **kwargs):
        # the generic preparation: pixels never reach the forward from here (generate splices them first)
        return GenerationMixin.prepare_inputs_for_generation(
            self, input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, cache_position=cache_position, **kwargs)
