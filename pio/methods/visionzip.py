"""VisionZip (Yang et al., CVPR'25, arXiv 2412.04467): dominant tokens by CLS attention, contextual tokens merged.

Facts (official source, the author's ``visionzip`` package 0.1.3: ``clip_encoder.py``, ``utils.py``,
``main.py``, ``llava_arch.py``, matching the GitHub main branch; docs/methods.md §VisionZip), per 24 x 24 crop:

* dominant: the CLS token, always kept and passed on, plus the ``D - 1`` patches with the most CLS attention in
  encoder layer -2 (summed over heads), in order;
* contextual: the other ``R = 577 - D`` patches, in order; ``C`` targets at positions ``0, s, 2s, ...`` of that
  list (``s = max(1, R // C)``); every other one joins the target its layer -2 key (heads averaged, L2-normalised)
  is most similar to; a contextual token is the target's feature *plus the mean* of the ones that joined it;
* everything in layer -2's features, before the projector; the LLM sees [CLS, dominant patches, contextual].

Budgets: ``dominant + contextual`` per crop; 64 = 54 + 10 (README); 128 = 108 + 20 and 192 = 162 + 30 follow the
same ratio (``contextual = round(10 B / 64)``); LLaVA-NeXT per crop (the author, issue #17).
Differences: LLaVA-NeXT keeps its unpadding and newline tokens (the official NeXT code drops both); float32; a
budget of every token keeps the crop whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import Flag
from ..encoder import EncoderInputs, EncoderMethod, EncoderSelection
from ..nms import stable_rank, work_dtype


def merge_contextual(h: torch.Tensor, metric: torch.Tensor, remaining: torch.Tensor, count: int) -> torch.Tensor:
    """VisionZip's contextual tokens (count, D) from the tokens ``remaining`` (ascending indices into ``h`` (N, D)
    and ``metric`` (N, C), L2-normalised rows): ``count`` targets at positions ``0, s, 2s, ...`` of ``remaining``
    (``s = max(1, R // count)``); every other one joins the target its metric is most similar to (the first on
    ties); a contextual token is the target's row of ``h`` plus the mean of the rows that joined it."""
    R = remaining.numel()
    step = max(1, R // count)
    is_target = torch.zeros(R, dtype=torch.bool, device=remaining.device)
    is_target[torch.arange(0, R, step, device=remaining.device)[:count]] = True
    targets, others = remaining[is_target], remaining[~is_target]
    joined = (metric[others] @ metric[targets].T).argmax(dim=1)  # (R - count,)
    sums = torch.zeros(targets.numel(), h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, joined, h[others])
    counts = torch.bincount(joined, minlength=targets.numel()).clamp_min(1).to(h.dtype)
    return h[targets] + sums / counts[:, None]


@dataclass(frozen=True)
class VisionZip(EncoderMethod):
    """VisionZip: ``tokens = dominant + contextual`` per crop, CLS among the dominant ones."""

    name = "visionzip"
    needs = frozenset({"features", "cls_attention", "keys", "hidden"})
    source = "VisionZip, CVPR'25, arXiv 2412.04467; github.com/dvlab-research/VisionZip (docs/methods.md)"
    flags = (
        Flag("contextual", "visionzip-contextual", int, "merged contextual tokens per crop (default 10 of 64)"),
        Flag("layer", "visionzip-layer", int, "encoder layer of the attention, keys and features (-2)"),
    )

    tokens: int
    contextual: int | None = None
    layer: int = -2

    def split(self, target: int) -> tuple[int, int]:
        """``(dominant with CLS, contextual)`` for ``target`` tokens per crop."""
        contextual = self.contextual if self.contextual is not None else round(target * 10 / 64)
        contextual = min(max(contextual, 1), target - 1)
        return target - contextual, contextual

    def validate(self, num_layers: int | None = None) -> None:
        super().validate(num_layers)
        if self.tokens < 2:
            raise ValueError(f"{self.name} keeps the CLS token plus contextual ones: tokens must be >= 2, got {self.tokens}")

    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        P = inputs.features.shape[1]
        target = inputs.targets[0]
        device = inputs.features.device
        dominant, contextual = self.split(target)
        attn = inputs.cls_attention(self.layer).sum(dim=1)  # (N, P)
        hidden = inputs.hidden(self.layer)  # (N, 1 + P, C): layer -2's output, CLS first
        work = work_dtype(hidden)
        keys = inputs.keys(self.layer)  # (N, P, H, hd)
        N = keys.shape[0]
        metric = F.normalize(keys.to(work).mean(dim=2), dim=-1)  # (N, P, hd): heads averaged
        keep, lead, extra = [], [], []
        with inputs.timed("visionzip"):
            for c in range(N):
                order, _ = stable_rank(attn[c])
                dom = torch.sort(order[: dominant - 1]).values
                rest = torch.ones(P, dtype=torch.bool, device=device)
                rest[dom] = False
                remaining = rest.nonzero().flatten()  # in order
                merged = merge_contextual(hidden[c, 1:].to(work), metric[c], remaining, contextual)
                keep.append(dom)
                lead.append(inputs.project(hidden[c, :1]))
                extra.append(inputs.project(merged.to(hidden.dtype)))
        return EncoderSelection(keep, None, lead, extra)

