"""DivPrune (Alvar et al., CVPR'25, arXiv 2503.02175): max-min diversity of the projected visual features.

Facts (official code, vbdi/divprune ``DivPrune`` in ``LLaVA/llava/model/llava_arch.py``, read in forks and in
ModelTC/llmc's ``divprune.py``; docs/methods.md §DivPrune), per crop:

* features: the projected visual embeddings (what the LLM would see), distance ``1 - cosine``;
* first pick: the token whose nearest other token is farthest (the largest second-smallest distance in its
  column); then, repeatedly, the token farthest from everything picked (largest minimum distance); first on ties;
* ``K = round(SUBSET_RATIO * N)`` (0.098 -> 56 of 576 by default; 64 / 128 / 192 for the paper's budgets); the
  public code puts the kept tokens back in order (issue #8: the paper's table kept selection order).

Differences: per crop on LLaVA-NeXT (the code runs once over the merged sequence, newline tokens included);
picked tokens are excluded explicitly (the code relies on their zero self-distance); float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoder import EncoderInputs, EncoderMethod, EncoderSelection
from ..nms import work_dtype


@dataclass(frozen=True)
class DivPrune(EncoderMethod):
    """DivPrune: greedy max-min diversity."""

    requires = frozenset()  # the projected features only: any vision tower
    name = "divprune"
    source = "DivPrune, CVPR'25, arXiv 2503.02175; github.com/vbdi/divprune (docs/methods.md)"

    tokens: int

    def select(self, inputs: EncoderInputs) -> EncoderSelection:
        feats = inputs.features
        P = feats.shape[1]
        target = inputs.targets[0]
        device = feats.device
        work = work_dtype(feats)
        keep = []
        with inputs.timed("divprune"):
            for c in range(feats.shape[0]):
                f = F.normalize(feats[c].to(work), dim=-1)
                D = 1 - f @ f.T  # (P, P)
                chosen = torch.zeros(P, dtype=torch.bool, device=device)
                first = int(D.topk(2, dim=0, largest=False).values[1].argmax())  # the most isolated token
                picks, nearest = [first], D[first].clone()
                chosen[first] = True
                for _ in range(target - 1):
                    j = int(nearest.masked_fill(chosen, float("-inf")).argmax())
                    picks.append(j)
                    chosen[j] = True
                    nearest = torch.minimum(nearest, D[j])
                keep.append(torch.sort(torch.tensor(picks, device=device)).values)
        return EncoderSelection(keep)
