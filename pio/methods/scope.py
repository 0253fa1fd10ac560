"""SCOPE (Deng et al., NeurIPS'25, arXiv 2510.24214): greedy saliency times coverage.

Facts (official code, kinredon/SCOPE: ``scope/clip_encoder.py`` ``SCOPE``, ``CLIPVisionTower_SCOPE.forward``,
``LLaVA/llava/model/builder.py``; docs/methods.md §SCOPE), per crop:

* features: the encoder's layer -2 patch features (before the projector), cosine similarity ``S``;
* saliency: the CLS attention of the same layer, summed over heads, to the power ``alpha`` (``ALPHA``, 1.0);
* greedy, ``K`` times: every unselected patch ``j`` scores ``sum_i max(0, S[i, j] - best[i]) * a_j^alpha``
  (``best[i]``: the largest similarity of patch i to a selected one, 0 at first), the best is selected (first on
  ties); kept patches in order.

Budgets: ``SUBSET_RATIO = B`` tokens (64 / 128 / 192); LLaVA-NeXT: ``B`` per crop (the code divides the total by
the crops). Differences: float32 (the code: fp16); LLaVA-NeXT keeps its unpadding and newline tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import Flag
from ..encoder import EncoderInputs, EncoderMethod, EncoderSelection
from ..nms import work_dtype


@dataclass(frozen=True)
class SCOPE(EncoderMethod):
    """SCOPE: saliency-weighted facility-location coverage, greedily."""

    name = "scope"
    needs = frozenset({"features", "cls_attention", "hidden"})
    source = "SCOPE, NeurIPS'25, arXiv 2510.24214; github.com/kinredon/SCOPE (docs/methods.md)"
    flags = (Flag("alpha", "scope-alpha", float, "exponent of the saliency (ALPHA, 1.0)"),)

    tokens: int
    alpha: float = 1.0
    layer: int = -2

    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        P = inputs.features.shape[1]
        target = inputs.targets[0]
        device = inputs.features.device
        hidden = inputs.hidden(self.layer)[:, 1:]  # (N, P, C)
        work = work_dtype(hidden)
        saliency = inputs.cls_attention(self.layer).sum(dim=1).to(work) ** self.alpha  # (N, P)
        keep = []
        with inputs.timed("scope"):
            for c in range(hidden.shape[0]):
                f = F.normalize(hidden[c].to(work), dim=-1)
                S = f @ f.T  # (P, P)
                best = torch.zeros(P, dtype=work, device=device)
                chosen = torch.zeros(P, dtype=torch.bool, device=device)
                picks = []
                for _ in range(target):
                    gain = (S - best[:, None]).clamp_min(0).sum(dim=0)  # (P,) coverage gain of each candidate
                    score = (gain * saliency[c]).masked_fill(chosen, float("-inf"))
                    j = int(score.argmax())
                    picks.append(j)
                    chosen[j] = True
                    best = torch.maximum(best, S[j])
                keep.append(torch.sort(torch.tensor(picks, device=device)).values)
        return EncoderSelection(keep)
