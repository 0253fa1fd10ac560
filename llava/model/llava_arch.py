"""Vision tower + projector + multimodal input preparation (LLaVA-1.5 ``pad`` and LLaVA-NeXT ``anyres``).

:func:`llava_image_layout` is where an image's crops become its tokens (the flat concatenation, or the anyres
tiling, unpadding and newlines): the model builds every image's embeddings through it, and the kept-token pictures
read their geometry from it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
from pio.encoder import EncoderMethod
from pio.state import EncoderRecord

from .encoder_stage import ReducedCrop, apply_kept, reduce_crops, whole
from .layout import ImageLayout, Run
from .multimodal_encoder.clip_encoder import ClipCrops, CLIPVisionTower, build_vision_tower
from .multimodal_projector.builder import build_vision_projector
from .reducible import MultimodalInputs, head_rows, splice_visual  # noqa: F401  (head_rows: re-exported for earlier imports)

logger = logging.getLogger(__name__)


def llava_image_layout(config: Any, crops: int, image_size: tuple[int, int] | None, side: int,
                       crop_size: int) -> ImageLayout:
    """The token sequence of one image of ``crops`` crops (``side`` x ``side`` patches of a ``crop_size``-pixel
    crop each) following the checkpoint's ``mm_patch_merge_type``.

    ``flat``: the crops one after another. ``spatial`` / ``spatial_unpad`` (LLaVA-NeXT): the base view, then the
    anyres crops tiled into one feature map (the ``image_size`` (width, height) picks the grid from
    ``image_grid_pinpoints``), with ``unpad`` the rows and columns of the canvas padding removed and one newline
    token after every row (a single view gets one newline after it).
    """
    P = side * side
    merge = getattr(config, "mm_patch_merge_type", "flat")
    if merge == "flat":
        return ImageLayout(torch.arange(P * crops), P, tuple(Run(j * P, (j + 1) * P, (j,)) for j in range(crops)))
    if not merge.startswith("spatial"):
        raise ValueError(f"unknown mm_patch_merge_type {merge!r}; allowed: flat, spatial, spatial_unpad")
    newline = "unpad" in merge
    if crops == 1:  # a single view: nothing to tile
        if not newline:
            return ImageLayout(torch.arange(P), P, (Run(0, P, (0,)),))
        return ImageLayout(torch.cat([torch.arange(P), torch.tensor([-1])]), P, (Run(0, P, (0,)), Run(P, P + 1)))
    if image_size is None:
        raise ValueError("LLaVA-NeXT (anyres) images need image_sizes=[(width, height), ...] per image")
    w, h = image_size
    gw, gh = get_anyres_image_grid_shape((w, h), config.image_grid_pinpoints, crop_size)
    if gw * gh != crops - 1:
        raise ValueError(f"an anyres image of {w}x{h} has a {gw}x{gh} grid of crops, but {crops - 1} grid crops were "
                         "given: preprocess it with the same image_grid_pinpoints")
    grid = (P + torch.arange((crops - 1) * P)).view(gh, gw, side, side).permute(0, 2, 1, 3)  # (gh, side, gw, side)
    grid = grid.reshape(gh * side, gw * side)  # the tiled feature map, row-major
    if newline:
        grid = unpad_image(grid, (w, h))  # the rows/columns of the aspect-preserving padding removed
        grid = torch.cat([grid, grid.new_full((grid.shape[0], 1), -1)], dim=1)  # a newline after every row
    src = torch.cat([torch.arange(P), grid.flatten()])
    return ImageLayout(src, P, (Run(0, P, (0,)), Run(P, src.numel(), tuple(range(1, crops)), tiled=True)))



class LlavaMetaModel:
    """Mixin for the base model: owns ``vision_tower``, ``mm_projector`` and ``image_newline``."""

    def __init__(self, config: Any):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", "flat"):
                # loaded from the checkpoint; initialised only so a fresh model holds no garbage
                self.image_newline = nn.Parameter(torch.randn(config.hidden_size) / config.hidden_size**0.5)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return getattr(self, "vision_tower", None)


def _as_crops(images: Any) -> list[torch.Tensor]:
    """Normalise ``images`` to one (P, 3, H, W) tensor per image."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return [im[None] for im in images]
        if images.dim() == 5:
            return list(images)
        raise ValueError(f"images must be (N, 3, H, W), (N, P, 3, H, W) or a list, got shape {tuple(images.shape)}")
    out = []
    for im in images:
        out.append(im[None] if im.dim() == 3 else im)
    return out


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: encodes images and splices them into the token embeddings."""

    def get_model(self) -> Any:
        return self.model

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return self.get_model().get_vision_tower()

    def vision_traits(self):
        """The vision tower's capability flags (:class:`pio.encoder.TowerTraits`): CLIP's."""
        return ClipCrops.traits

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> projected features (N, P, D)."""
        return self._encode(images)[0]

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(N, 3, H, W) -> (projected features (N, P, D), the tower's hidden states)."""
        feats, hidden = self.get_vision_tower().encode(images)
        proj = self.get_model().mm_projector
        dtype = next(proj.parameters(), feats).dtype
        return proj(feats.to(dtype)), hidden

    def image_features(self, images: Any, image_sizes: Any | None, pre: EncoderMethod | None = None,
                       state: Any | None = None) -> list[torch.Tensor]:
        """One (n_i, D) feature sequence per image, laid out by :func:`llava_image_layout`; ``pre`` (an
        encoder-side method) reduces every crop first (:mod:`llava.model.encoder_stage`). With ``state``, each
        image's token count without the reduction and the positions it kept are recorded
        (``state.encoder_images``)."""
        crops = _as_crops(images)
        counts = [c.shape[0] for c in crops]
        pixels = torch.cat(crops, dim=0)
        feats, hidden = self._encode(pixels)  # (N, P, D)
        if pre is not None:
            ids = [(i, j) for i, n in enumerate(counts) for j in range(n)]
            tower = ClipCrops(self.get_vision_tower(), self.get_model().mm_projector, hidden, pixels)
            reduced = reduce_crops(pre, tower, feats, ids, state)
        else:
            reduced = whole(feats)
        out, records = [], []
        offset = 0
        for i, n in enumerate(counts):
            seq, record = self._merge_image(reduced[offset : offset + n], i, image_sizes)
            out.append(seq)
            records.append(record)
            offset += n
        if state is not None:
            state.encoder_images = records
            state.vision_crops = feats.shape[0]
        return out

    def image_layout(self, crops: int, image_size: tuple[int, int] | None) -> ImageLayout:
        """The token sequence of an image of ``crops`` crops and ``image_size`` (:func:`llava_image_layout`)."""
        tower = self.get_vision_tower()
        return llava_image_layout(self.config, crops, image_size, tower.num_patches_per_side, tower.config.image_size)

    def _merge_image(self, crops: list[ReducedCrop], i: int, image_sizes: Any | None
                     ) -> tuple[torch.Tensor, EncoderRecord]:
        """Image ``i``'s token sequence from its reduced crops, its length without the reduction and where each
        of its tokens sits in the sequence without the reduction (-1: added by the method)."""
        size = None
        if len(crops) > 1 and image_sizes is not None and i < len(image_sizes):
            size = image_sizes[i]
        layout = self.image_layout(len(crops), size)
        n_fill = int((layout.source < 0).sum())
        fill = self.get_model().image_newline[None].expand(n_fill, -1) if n_fill else None
        return apply_kept(layout, crops, fill)

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: Any | None,
        image_sizes: Any | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        pre: EncoderMethod | None = None,
        state: Any | None = None,
    ) -> MultimodalInputs:
        """Replace every ``IMAGE_TOKEN_INDEX`` placeholder by its image's features and pad the batch; ``pre``
        reduces each image's crops first (an encoder-side method, recorded in ``state``)."""
        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        n_placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        feats: list[torch.Tensor] = []
        if n_placeholders:
            if images is None:
                raise ValueError(f"the prompt has {n_placeholders} <image> placeholder(s) but no images were given")
            feats = self.image_features(images, image_sizes, pre, state)
        elif images is not None:
            raise ValueError("images given but the prompts have no <image> placeholder")
        records = getattr(state, "encoder_images", None) if pre is not None else None
        mm = splice_visual(self.get_model().embed_tokens, input_ids, attention_mask, feats, side=side,
                           records=records, labels=labels,
                           max_length=getattr(self.config, "max_position_embeddings", None))
        soft = getattr(self.config, "tokenizer_model_max_length", None)
        if soft and mm.inputs_embeds.shape[1] > soft:
            logger.warning("sequence of %d tokens exceeds tokenizer_model_max_length=%d (not truncated)",
                           mm.inputs_embeds.shape[1], soft)
        return mm

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        """Upstream LLaVA's 6-tuple interface, for code written against it."""
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        mm = self.prepare_multimodal_inputs(input_ids, attention_mask, images, image_sizes, labels)
        return None, mm.position_ids, mm.attention_mask, past_key_values, mm.inputs_embeds, mm.labels
