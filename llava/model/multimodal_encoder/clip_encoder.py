"""CLIP vision tower with LLaVA's layer / feature selection."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from pio.encoder import TowerTraits
from pio.nms import work_dtype

logger = logging.getLogger(__name__)


class CLIPVisionTower(nn.Module):
    """Wraps ``CLIPVisionModel`` and returns the features LLaVA feeds its projector.

    ``mm_vision_select_layer`` picks a hidden state (``-2``: the penultimate layer) and
    ``mm_vision_select_feature`` either drops the CLS token (``patch``) or keeps it (``cls_patch``).
    With ``delay_load`` only the config is read; :meth:`load_model` loads the weights later, which is what
    the builder does for official checkpoints (they do not contain the tower's weights).
    """

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer: int = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature: str = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r} is not supported; use 'patch' or 'cls_patch'"
            )
        self.is_loaded = False
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            # the checkpoint carries the tower's weights: build the module so they load with the rest
            self.cfg_only = None
            self.vision_tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(vision_tower))
            self.vision_tower.requires_grad_(False)
            self.image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
            self.is_loaded = True
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(vision_tower)

    def load_model(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Load the CLIP weights and image processor from ``vision_tower_name`` (hub id or directory)."""
        if self.is_loaded:
            logger.debug("vision tower %s already loaded", self.vision_tower_name)
            return
        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        self.vision_tower, info = CLIPVisionModel.from_pretrained(self.vision_tower_name, dtype=dtype,
                                                                  output_loading_info=True, ignore_mismatched_sizes=True)
        from llava.model.builder import check_loading_info

        # strict: a tensor missing or of the wrong shape is named (a full CLIP checkpoint's text tower is not used)
        check_loading_info(self.vision_tower_name, {**info, "unexpected_keys": []}, vision_optional=False)
        self.vision_tower.requires_grad_(False)
        if device is not None:
            self.vision_tower.to(device)
        self.is_loaded = True

    def feature_select(self, outputs: Any) -> torch.Tensor:
        feats = outputs.hidden_states[self.select_layer]  # (N, 1 + P, C)
        return feats[:, 1:] if self.select_feature == "patch" else feats

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 3, H, W) -> features (N, P, C) in the images' dtype."""
        return self.encode(images)[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``images`` (N, 3, H, W) -> ``(features (N, P, C) in the images' dtype, hidden states)``; hidden state
        ``l`` (N, 1 + P, C) enters encoder layer ``l`` (CLS first), the last one is the last layer's output."""
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(out).to(images.dtype), out.hidden_states

    @torch.no_grad()
    def cls_attention(self, hidden_states: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
        """(N, H, P) float32: the CLS query's softmax attention (over CLS and patches) at the patches, in encoder
        layer ``layer``, recomputed from its input for that one row (the tower keeps its attention backend)."""
        layer = self._layer_index(layer)
        block = self.vision_tower.vision_model.encoder.layers[layer]
        attn = block.self_attn
        x = block.layer_norm1(hidden_states[layer])  # (N, 1 + P, C): the layer's input
        N, T, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(N, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (N, H, 1, hd)
        k = attn.k_proj(x).view(N, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (N, H, T, hd)
        scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale  # (N, H, 1, T)
        return scores.softmax(dim=-1)[:, :, 0, 1:]

    @torch.no_grad()
    def full_attention(self, hidden_states: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
        """(N, 1 + P, 1 + P): encoder layer ``layer``'s softmax attention of every query over every key (CLS
        first), averaged over heads, recomputed from its input; float32 (float64 for a float64 tower)."""
        layer = self._layer_index(layer)
        block = self.vision_tower.vision_model.encoder.layers[layer]
        attn = block.self_attn
        x = block.layer_norm1(hidden_states[layer])
        N, T, _ = x.shape
        work = work_dtype(x)
        q = attn.q_proj(x).view(N, T, attn.num_heads, attn.head_dim).to(work)
        k = attn.k_proj(x).view(N, T, attn.num_heads, attn.head_dim).to(work)
        out = torch.zeros(N, T, T, dtype=work, device=x.device)
        for h in range(attn.num_heads):  # one head at a time: (N, T, T) in memory, not (N, H, T, T)
            out += ((q[:, :, h] @ k[:, :, h].transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        return out / attn.num_heads

    @torch.no_grad()
    def layer_keys(self, hidden_states: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
        """(N, P, H, head_dim): encoder layer ``layer``'s keys of the patches, per head."""
        layer = self._layer_index(layer)
        block = self.vision_tower.vision_model.encoder.layers[layer]
        k = block.self_attn.k_proj(block.layer_norm1(hidden_states[layer]))[:, 1:]
        return k.view(*k.shape[:2], block.self_attn.num_heads, block.self_attn.head_dim)

    def _layer_index(self, layer: int) -> int:
        """A 0-based encoder layer (negative: from the end, as transformers' ``attentions[layer]``)."""
        n = len(self.vision_tower.vision_model.encoder.layers)
        if not -n <= layer < n:
            raise ValueError(f"encoder layer {layer} out of range for a {n}-layer vision tower")
        return layer % n

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


class ClipCrops:
    """A CLIP tower over one call's crops, as the encoder-side step reads it
    (:class:`llava.model.encoder_stage.EncoderTower`): a CLS token first in every hidden state, one patch per
    language-model token, fixed-size crops; the CLS attention, hidden states (with the projector), keys, full
    attention of any layer and, when given, the crops' pixels."""

    traits = TowerTraits(cls_token=True, patches_per_token=1, per_crop=True)

    def __init__(self, tower: CLIPVisionTower, projector: nn.Module, hidden_states: tuple[torch.Tensor, ...],
                 pixels: torch.Tensor | None = None):
        self._tower, self._projector, self._hidden, self._pixels = tower, projector, hidden_states, pixels
        side = tower.num_patches_per_side
        self.grid = (side, side)
        self.full_attention_layers = tuple(range(len(hidden_states) - 1))
        self.sequence_length = int(hidden_states[0].shape[1])  # CLS + patches
        self.provides = frozenset({"features", "cls_attention", "hidden", "keys", "attention"}
                                  | ({"pixels"} if pixels is not None else set()))

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self._tower.cls_attention(self._hidden, layer)

    def hidden(self, index: int) -> torch.Tensor:
        return self._hidden[index]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self._projector.parameters(), x).dtype
        return self._projector(x.to(dtype))

    def keys(self, layer: int) -> torch.Tensor:
        return self._tower.layer_keys(self._hidden, layer)

    def attention(self, layer: int) -> torch.Tensor:
        return self._tower.full_attention(self._hidden, layer)

    def received_attention(self, layer: int) -> torch.Tensor:
        raise NotImplementedError("a CLIP tower offers the CLS attention")

    def pixels(self) -> torch.Tensor:
        """(N, 3, H, W) float32: the crops' 8-bit pixel values (the processor's normalisation undone, rounded)."""
        proc = getattr(self._tower, "image_processor", None)
        mean = getattr(proc, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as LLaVA's
        std = getattr(proc, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        x = self._pixels.to(torch.float64)
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.float32)


def build_vision_tower(cfg: Any, delay_load: bool = False) -> CLIPVisionTower:
    """Vision tower named by ``cfg.mm_vision_tower`` (or ``cfg.vision_tower``)."""
    name = getattr(cfg, "mm_vision_tower", None) or getattr(cfg, "vision_tower", None)
    if not name:
        raise ValueError("the model config has no 'mm_vision_tower': this is not a LLaVA checkpoint config")
    if "clip" not in os.path.basename(str(name)).lower() and not os.path.isdir(str(name)):
        logger.warning("vision tower %r does not look like a CLIP model; loading it as CLIP anyway", name)
    return CLIPVisionTower(str(name), args=cfg, delay_load=delay_load)
