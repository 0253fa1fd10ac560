"""DART (Wen et al., EMNLP'25, arXiv 2502.11494): keep the visual tokens least duplicated by a few pivots.

Facts (the code published with the paper, ``get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py``, read in a fork of ZichenWen1/DART whose official copy
holds only the README, and matching ModelTC/llmc's ``dart.py``; docs/methods.md §DART):

* One stage, before 0-based layer K = 2 runs (after 1-based layer 2).
* Pivots: the 4 visual tokens and the 4 text tokens after the image with the largest L1 norm of the keys of
  layer K-1 (the layer that just ran; rotated keys, heads concatenated). Visual pivots are kept.
* Duplication: cosine similarity of the model's *final* RMSNorm applied to the hidden states at the pruning
  point. Visiting the pivots in turn, each takes the ``k`` remaining visual tokens least similar to it, so no
  token is taken twice; ``4 + 8k`` tokens are kept, in their original order, with their original positions.
* Budgets: the code keeps ``4 + 8 * (B // 8)`` visual tokens after layer 2 for the paper's budget ``B``
  (``max_num_trunction = B``; README ``0.778 128``): 196 / 132 / 68 for 192 / 128 / 64, i.e. DART counts the
  tokens kept after its layer, not the layer average (99.75 tokens on average at "64"); the realised average is
  logged. ``--budget`` reproduces these counts; ``--tokens`` or ``--budget-tokens`` give others.

Differences: the pivots are visited in ascending position order (the code iterates a Python set); a target
that is not ``4 + 8k`` gives the first ``(target - 4) mod 8`` pivots one token more; similarities in float32
(the code: fp16) with ties to the lower index; any batch and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import Flag, SampleScores, ScorerMethod, StageInputs
from ..budget import Anchors, same_share_of_depth
from ..nms import stable_rank, topk_indices, work_dtype
from ..schedule import Schedule

ANCHORS = Anchors(
    layers=(2,), num_layers=32, n0=576, schedules=((64, (68,)), (128, (132,)), (192, (196,))),
    source="DART code: 4 image pivots + 8 * (max_num_trunction // 8) with max_num_trunction = the budget "
           "(README: scripts/v1_5/eval/<bench>.sh 0.778 128)",
    mode="counts",
)


@dataclass(frozen=True)
class DART(ScorerMethod):
    """DART: pivots by key norm (the score); the visual tokens least similar to each pivot are kept."""

    name = "dart"
    needs = frozenset({"hidden", "keys", "norm"})
    default_layers = ANCHORS.layers
    family_defaults = {"llava_onevision": {"layers": same_share_of_depth(ANCHORS.layers, 28)}}  # 2
    anchors = ANCHORS
    source = "DART, EMNLP'25, arXiv 2502.11494; github.com/ZichenWen1/DART (docs/methods.md)"
    flags = (
        Flag("pivot_image", "dart-pivot-image", int, "visual pivots (4)"),
        Flag("pivot_text", "dart-pivot-text", int, "text pivots from the tokens after the image (4)"),
    )

    schedule: Schedule
    positions: str = "original"
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if len(self.layers) != 1:
            raise ValueError(f"dart prunes once, after one layer; got layers {list(self.layers)}")
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise ValueError(f"dart needs at least one visual pivot and no negative text pivots, got "
                             f"{self.pivot_image} and {self.pivot_text}")

    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """(B, S) the L1 norm of every position's keys in the layer that just ran (heads concatenated); per
        sample, as a sample alone computes it."""
        keys = inputs.keys(which="current")  # (B, S, Hkv * hd)
        work = work_dtype(inputs.hidden)
        norm1 = torch.zeros(keys.shape[:2], dtype=work, device=keys.device)
        with inputs.timed("score"):
            for b in (b for b, a in enumerate(active) if a):
                norm1[b] = keys[b].to(work).abs().sum(dim=-1)
        return norm1

    def prepare(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """(B, S, D) the similarity features: the model's final norm of the hidden states."""
        return inputs.final_norm(inputs.hidden)

    def choose(self, inputs: StageInputs, sample: SampleScores, feats: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The ``pivot_image`` best visual tokens by key norm and the ``pivot_text`` best text tokens after the
        image are the pivots; each pivot then takes its share of the least similar remaining visual tokens."""
        mask = inputs.mask[sample.index].bool()
        after = sample.start + sample.length
        text = torch.arange(after, mask.shape[0], device=mask.device)[mask[after:]]
        img_piv = topk_indices(sample.scores, min(self.pivot_image, sample.target))
        txt_piv = text[stable_rank(sample.row[text])[0][: self.pivot_text]]
        f = F.normalize(feats[sample.index].to(work_dtype(feats)), dim=-1)
        return self._least_duplicated(f, (sample.start, sample.length), img_piv, txt_piv, sample.target), None

    @staticmethod
    def _least_duplicated(f: torch.Tensor, span: tuple[int, int], img_piv: torch.Tensor, txt_piv: torch.Tensor,
                          target: int) -> torch.Tensor:
        """Image pivots plus, pivot by pivot (ascending position), the remaining visual tokens least similar to
        it; ``target`` in all."""
        start, length = span
        pivots = torch.sort(torch.cat([img_piv + start, txt_piv])).values.tolist()
        free = torch.ones(length, dtype=torch.bool, device=f.device)
        free[img_piv] = False
        picks = [img_piv]
        n_pick = target - img_piv.numel()
        base, extra = divmod(n_pick, len(pivots))
        visual = f[start : start + length]
        for i, p in enumerate(pivots):
            count = base + (1 if i < extra else 0)
            cand = free.nonzero().flatten()
            if count == 0 or cand.numel() == 0:
                continue
            sim = visual[cand] @ f[p]  # (n_free,) cosine similarity to the pivot
            chosen = cand[stable_rank(-sim)[0][:count]]  # the least similar, ties by lower index
            free[chosen] = False
            picks.append(chosen)
        return torch.sort(torch.cat(picks)).values
