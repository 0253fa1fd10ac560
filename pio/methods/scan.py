"""The authors' encoder-side reduction for PIO "w/ VE": a local and a global CLS-attention scan, then every
dropped token merged into its nearest kept one (``docs/pio-algorithm.md`` §5.1; VScan's scheme, not VisionZip).

Per 24 x 24 crop, keeping ``T`` tokens (``--visual_token_num T``, the authors' flag):

* local: the 24 x 24 map in 4 x 4 windows of 6 x 6; in each window the ``k_w = (T // 2) // 16`` patches with the
  most CLS attention at a shallow layer (0-based 5), heads averaged;
* global: the ``T - T // 2`` other patches with the most CLS attention at the feature layer (-2);
* merging: every dropped patch joins the kept one its projected feature is most similar to (cosine); a kept token
  becomes the mean of itself and the patches that joined it.

So ``16 k_w + T - T // 2`` tokens are kept: exactly T when T is a multiple of 32 (64, 96, 128, 192, 288), fewer
otherwise (218 keeps 205), which the log says. ``T = 576`` keeps every token (the authors' bypass).

On a tower without a CLS token (Qwen2.5-VL; §5.2 of the same notes), per image (crop) of N tokens, keeping ``K``
(the same share of N, e.g. 16.7 % = 216 of 1296 merged tokens for 96):

* maps: the attention each token receives (heads summed, query rows averaged, a merged token's four patches
  averaged), from the first full-attention vision block (local) and the last block (global);
* local: the merged grid in windows of 4 x 4 tokens (the rows and columns that do not fill a window join the
  last one); tokens are visited by local attention and taken while their window holds fewer than
  ``ceil((K // 2) / windows)``, until ``K // 2`` are taken;
* global: the ``K - K // 2`` other tokens with the most global attention; merging as above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import Flag
from ..encoder import EncoderInputs, EncoderMethod, EncoderSelection
from ..nms import stable_rank, work_dtype

logger = logging.getLogger(__name__)
_SAID: set[tuple[int, int]] = set()


def windows(rows: int, cols: int, per_side: int, device: torch.device) -> torch.Tensor:
    """(rows * cols,) window id of every patch of a ``rows`` x ``cols`` grid cut into ``per_side`` x ``per_side``
    windows (even cuts; the last window of a side takes what does not divide)."""
    r = torch.clamp(torch.arange(rows, device=device) // max(1, rows // per_side), max=per_side - 1)
    c = torch.clamp(torch.arange(cols, device=device) // max(1, cols // per_side), max=per_side - 1)
    return (r[:, None] * per_side + c[None, :]).flatten()


def merge_into_nearest(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(len(keep), D): each kept feature averaged with the dropped ones whose nearest kept token (cosine, first on
    ties) it is: ``(kept + sum of joined) / (1 + joined)``."""
    work = work_dtype(features)
    f = features.to(work)
    dropped = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
    dropped[keep] = False
    kept_f, drop_f = f[keep], f[dropped]
    if drop_f.shape[0] == 0:
        return kept_f
    nearest = (F.normalize(drop_f, dim=-1) @ F.normalize(kept_f, dim=-1).T).argmax(dim=1)  # (n_dropped,)
    sums = kept_f.clone().index_add_(0, nearest, drop_f)
    counts = torch.ones(kept_f.shape[0], dtype=work, device=f.device).index_add_(
        0, nearest, torch.ones_like(nearest, dtype=work))
    return sums / counts[:, None]


@dataclass(frozen=True)
class Scan(EncoderMethod):
    """The authors' global + local scan with merging (module docstring)."""

    name = "scan"
    needs = frozenset({"features", "cls_attention", "received_attention"})
    requires = frozenset()  # the CLS attention where the tower has a CLS token, the received attention otherwise
    source = "PIO-FVLM / TRIO release, llava/model/llava_arch.py (window_cls_selection, token_merging); VScan"
    flags = (
        Flag("local_layer", "scan-local-layer", int,
             "encoder layer of the local (windowed) scan (CLIP: 5; Qwen: its first full-attention block)"),
        Flag("global_layer", "scan-global-layer", int, "encoder layer of the global scan (CLIP: -2; Qwen: -1)"),
        Flag("merge", "scan-no-merge", None, "drop the other tokens instead of merging them", const=False),
    )

    tokens: int
    local_layer: int | None = None
    global_layer: int | None = None
    windows: int = 4
    merge: bool = True

    def layers(self, inputs: EncoderInputs) -> tuple[int, int]:
        """``(local, global)`` encoder layers: as given, else the authors' for this encoder (CLS: 5 and -2;
        without a CLS token: the first full-attention block and the last)."""
        if inputs.tower.cls_token:
            default = (5, -2)
        else:
            default = (inputs.full_attention_layers[0], -1)
        return (default[0] if self.local_layer is None else self.local_layer,
                default[1] if self.global_layer is None else self.global_layer)

    def kept(self, target: int) -> tuple[int, int]:
        """``(local per window, global)`` counts for a target of ``target`` tokens."""
        return (target // 2) // (self.windows**2), target - target // 2

    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        P = inputs.features.shape[1]
        target = inputs.targets[0]
        if not inputs.tower.cls_token:
            return self._select_received(inputs, target)
        local_layer, global_layer = self.layers(inputs)
        k_w, n_global = self.kept(target)
        if (target, P) not in _SAID and self.windows**2 * k_w + n_global != target:
            _SAID.add((target, P))
            logger.warning("scan keeps %d of the requested %d tokens per crop (%d windows x %d local + %d global): "
                           "the authors' rule is exact only for multiples of %d", self.windows**2 * k_w + n_global,
                           target, self.windows**2, k_w, n_global, 2 * self.windows**2)
        local_a = inputs.cls_attention(local_layer).mean(dim=1)  # (N, P)
        global_a = inputs.cls_attention(global_layer).mean(dim=1)
        win = windows(*inputs.grid, self.windows, inputs.features.device)
        keep, feats = [], []
        with inputs.timed("scan"):
            for c in range(inputs.features.shape[0]):
                picks = []
                for w in range(self.windows**2):
                    members = (win == w).nonzero().flatten()
                    order, _ = stable_rank(local_a[c, members])
                    picks.append(members[order[:k_w]])
                local = torch.cat(picks)
                rest = torch.ones(P, dtype=torch.bool, device=local.device)
                rest[local] = False
                candidates = rest.nonzero().flatten()
                order, _ = stable_rank(global_a[c, candidates])
                kept = torch.sort(torch.cat([local, candidates[order[:n_global]]])).values
                keep.append(kept)
                feats.append(merge_into_nearest(inputs.features[c], kept) if self.merge else None)
        return EncoderSelection(keep, feats if self.merge else None)

    def _select_received(self, inputs: EncoderInputs, target: int) -> EncoderSelection:
        """The authors' Qwen2.5-VL scan (module docstring) on each crop's tokens, by the attention they receive."""
        local_layer, global_layer = self.layers(inputs)
        local_maps = inputs.received_attention(local_layer)  # (N, P)
        global_maps = inputs.received_attention(global_layer)
        keep, feats = [], []
        for c in range(inputs.features.shape[0]):
            kept = self._scan_received(inputs, local_maps[c], global_maps[c], target)
            keep.append(kept)
            feats.append(merge_into_nearest(inputs.features[c], kept) if self.merge else None)
        return EncoderSelection(keep, feats if self.merge else None)

    def _scan_received(self, inputs: EncoderInputs, local_a: torch.Tensor, global_a: torch.Tensor,
                       target: int) -> torch.Tensor:
        """The kept tokens of one crop, from its local and global received-attention maps (P,)."""
        device = inputs.features.device
        rows, cols = inputs.grid
        per_side = (max(1, rows // self.windows), max(1, cols // self.windows))
        r = torch.clamp(torch.arange(rows, device=device) // self.windows, max=per_side[0] - 1)
        c = torch.clamp(torch.arange(cols, device=device) // self.windows, max=per_side[1] - 1)
        win = (r[:, None] * per_side[1] + c[None, :]).flatten()  # (P,) window of each token
        n_local = target // 2
        cap = -(-n_local // (per_side[0] * per_side[1]))
        with inputs.timed("scan"):
            order, _ = stable_rank(local_a)
            taken = torch.zeros(per_side[0] * per_side[1], dtype=torch.long, device=device)
            local = []
            for t in order.tolist():
                if len(local) == n_local:
                    break
                if taken[win[t]] < cap:
                    taken[win[t]] += 1
                    local.append(t)
            rest = torch.ones(global_a.numel(), dtype=torch.bool, device=device)
            rest[local] = False
            candidates = rest.nonzero().flatten()
            order, _ = stable_rank(global_a[candidates])
            return torch.sort(torch.cat([torch.tensor(local, dtype=torch.long, device=device),
                                         candidates[order[:target - n_local]]])).values
