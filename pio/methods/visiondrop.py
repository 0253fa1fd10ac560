"""VisionDrop (Xu et al., AAAI'26, arXiv 2506.22283): visual-only progressive reduction, before and inside the LLM.

Facts (official code, Ruixxxx/VisionDrop: the encoder stage in ``llava/visionzip/clip_encoder.py``, ``utils.py``,
``main.py``; the in-LLM stages in ``visiondrop_forward`` / ``visiondrop_rank_drop`` of
``llava/model/modeling_llama_visiondrop.py``; the flags in ``llava/eval_visiondrop/model_vqa_loader.py``, the README
and ``scripts/v1_5/visiondrop_eval/*.sh``; docs/methods.md §VisionDrop):

* Encoder stage: VisionZip's, unchanged (the repository ships VisionZip's files): the CLS token and the
  ``dominant - 1`` patches with the most CLS attention in tower layer -2 (summed over heads), then ``contextual``
  merged tokens (:func:`~pio.methods.visionzip.merge_contextual` on layer -2's keys and features).
  ``--dominant 42 --contextual 6``: the language model gets 48 tokens per image.
* In-LLM stages after the 1-based layers of ``--layer_list [8,16,24]``, each keeping ``[dominant, contextual]``
  of ``--image_token_list [[30,5],[22,4],[16,3]]``: 48 -> 35 -> 26 -> 19. No stage after the last layer of the list.
* Score, visual only: the attention the visual tokens receive from the visual tokens. The queries and keys of the
  layer about to run (0-based ``l``) on the output of layer ``l`` (``which="next"``, as PDrop), every visual
  position's causal softmax over all keys, averaged over heads, read at the visual keys, averaged over the
  visual query rows. No text token takes part.
* Dominant tokens: the ``d`` best by that score, in order. Contextual tokens: VisionZip's merge of the other visual
  tokens (in order) on that layer's rotated keys averaged over heads (L2-normalised) and its output hidden states:
  ``c`` targets spread evenly, each other token joins its most key-similar target, a contextual token is the
  target plus the mean of the ones that joined it. ``[dominant, contextual]`` replace the visual span; positions
  renumbered (the code rebuilds them contiguously).

Budgets: the authors publish one configuration, 32 tokens on average (README and all nine scripts: 8 layers each
at 48, 35, 26 and 19 of 32). The paper's larger budgets (a 192-token row among them) have no published
configuration, so ``--budget B`` is our extrapolation: every count of the 32-token one times ``B / 32`` (rounded half up), which averages exactly B
for multiples of 32: 64 = encoder 84 + 12, stages [60, 10], [44, 8], [32, 6]; 128 = 168 + 24, [120, 20], [88, 16],
[64, 12]; 192 = 252 + 36, [180, 30], [132, 24], [96, 18]. The encoder then keeps 1.5 B per crop, so B <= 384. The
in-LLM stages keep the configuration's shares of what the encoder passed on (LLaVA-NeXT: of every crop's tokens).

Differences: float32 scores and merging (the code: fp16); ties by the lower index; any batch and padding (the
code: right padding, LLaVA-1.5's fixed counts); a stage with no contextual tokens just drops (the code divides by
zero); LLaVA-NeXT per crop at the encoder with its unpadding and newline tokens (as VisionZip here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..base import Flag, SampleScores, ScorerMethod, StageInputs
from ..budget import Anchors, round_half_up, same_share_of_depth
from ..nms import topk_indices, work_dtype
from ..parse import parse_counts, parse_int, split_items
from ..schedule import PAPER_N0, Schedule
from .fastv import last_valid
from .visionzip import VisionZip, merge_contextual

PUBLISHED_BUDGET = 32
PUBLISHED_ENCODER = (42, 6)  # --dominant (CLS included), --contextual
PUBLISHED_STAGES = ((30, 5), (22, 4), (16, 3))  # --image_token_list
PUBLISHED_LAYERS = (8, 16, 24)  # --layer_list
SOURCE = "Ruixxxx/VisionDrop README and scripts/v1_5/visiondrop_eval/*.sh (--dominant 42 --contextual 6 ...)"

ANCHORS = Anchors(  # the published in-LLM shape for --budget-tokens, on the 48 tokens the encoder passes on
    layers=PUBLISHED_LAYERS, num_layers=32, n0=sum(PUBLISHED_ENCODER),
    schedules=((PUBLISHED_BUDGET, tuple(d + c for d, c in PUBLISHED_STAGES)),), source=SOURCE,
)
ROW_CHUNK = 256  # visual query rows per attention call (bounds the (B, H, rows, S) probabilities)


def preset(budget: float) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """``((dominant, contextual) at the encoder, ((dominant, contextual) per in-LLM stage))`` for the paper's budget
    label ``budget``: every count of the published 32-token configuration times ``budget / 32``."""
    k = budget / PUBLISHED_BUDGET

    def scaled(pair: tuple[int, int]) -> tuple[int, int]:
        return round_half_up(pair[0] * k), round_half_up(pair[1] * k)

    return scaled(PUBLISHED_ENCODER), tuple(scaled(p) for p in PUBLISHED_STAGES)


def parse_stage_counts(text: Any) -> tuple[int, ...]:
    """Per-stage counts from the command line: "5,4,3", "5 4 3" or "[5, 4, 3]" (literals only, never eval)."""
    return parse_counts(text)


@dataclass(frozen=True)
class VisionDropEncoder(VisionZip):
    """VisionDrop's encoder stage: VisionZip's selection, ``tokens = dominant + contextual`` per crop (CLS among
    the dominant ones). Not registered: :meth:`VisionDrop.encoder_stage` builds it."""

    name = "visiondrop"
    flags = ()
    source = "VisionDrop, AAAI'26, arXiv 2506.22283; github.com/Ruixxxx/VisionDrop llava/visionzip (docs/methods.md)"


@dataclass(frozen=True)
class VisionDrop(ScorerMethod):
    """VisionDrop: VisionZip's stage at the encoder, then after each of its layers ``[dominant, contextual]`` by
    the attention the visual tokens receive from the visual tokens, the rest merged into the contextual ones.

    Fields (besides the schedule, whose counts are each stage's ``dominant + contextual``):
        dominant, contextual: the encoder stage's tokens per crop (the authors' ``--dominant``, CLS included, and
            ``--contextual``); None: the budget label's (``preset``), or no encoder stage for explicit counts.
        stage_contextual: the contextual tokens of each in-LLM stage (the second entries of the authors'
            ``--image_token_list``); None: each stage's share in the published configuration (5 of 35, 4 of 26,
            3 of 19; a fourth stage on takes the third's).
    """

    name = "visiondrop"
    needs = frozenset({"hidden", "attention", "keys"})
    default_layers = PUBLISHED_LAYERS
    family_defaults = {"llava_onevision": {"layers": same_share_of_depth(PUBLISHED_LAYERS, 28)}}  # 7, 14, 21
    anchors = ANCHORS
    source = "VisionDrop, AAAI'26, arXiv 2506.22283; github.com/Ruixxxx/VisionDrop (docs/methods.md)"
    flags = (
        Flag("dominant", "dominant", int, "the encoder stage's dominant tokens per crop, CLS included (the authors' "
             "flag; default at --budget B: 42 B / 32)"),
        Flag("contextual", "contextual", int, "the encoder stage's merged contextual tokens per crop (the authors' "
             "flag; default at --budget B: 6 B / 32)"),
        Flag("stage_contextual", "visiondrop-stage-contextual", parse_stage_counts, "contextual tokens of each in-LLM "
             "stage's count, e.g. 5,4,3 with --tokens 35,26,19 (the authors' --image_token_list "
             "[[30,5],[22,4],[16,3]]; default: the published shares)"),
    )

    schedule: Schedule
    positions: str = "renumber"
    dominant: int | None = None
    contextual: int | None = None
    stage_contextual: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.stage_contextual is not None:
            object.__setattr__(self, "stage_contextual", tuple(int(c) for c in self.stage_contextual))

    # -- configuration ---------------------------------------------------------------------------------------
    @classmethod
    def read_tokens(cls, text: Any) -> tuple[tuple[int, ...], dict[str, Any]]:
        """Also the authors' ``--image_token_list [[30,5],[22,4],[16,3]]``: ``[dominant, contextual]`` per stage,
        read as each stage's total and its contextual tokens (``stage_contextual``)."""
        items = split_items(text, "token counts")
        if not items or not all(isinstance(x, (list, tuple)) for x in items):
            return super().read_tokens(text)
        if any(len(x) != 2 for x in items):
            raise ValueError("every stage needs [dominant, contextual], e.g. [[30,5],[22,4],[16,3]]")
        pairs = [(parse_int(d, "token counts", text), parse_int(c, "token counts", text)) for d, c in items]
        return tuple(d + c for d, c in pairs), {"stage_contextual": tuple(c for _, c in pairs)}

    def label(self) -> float | None:
        """The paper's budget label of the schedule (``--budget B``), or None for other targets."""
        r = self.schedule.budget_ratio
        return None if r is None else r * PAPER_N0

    def encoder_stage(self) -> VisionDropEncoder | None:
        """VisionZip's selection with ``dominant + contextual`` tokens per crop; None without an encoder stage
        (explicit counts and neither ``dominant`` nor ``contextual`` given)."""
        dominant, contextual = self.dominant, self.contextual
        label = self.label()
        if label is not None:
            (d, c), _ = preset(label)
            dominant = d if dominant is None else dominant
            contextual = c if contextual is None else contextual
        if dominant is None and contextual is None:
            return None
        if dominant is None or contextual is None:
            raise ValueError("visiondrop's encoder stage needs --dominant and --contextual together (tokens per "
                             "crop, e.g. 42 and 6), or --budget B for the configuration of budget B")
        if dominant < 1 or contextual < 1:
            raise ValueError(f"visiondrop's encoder stage keeps the CLS token among >= 1 dominant tokens and >= 1 "
                             f"contextual one per crop, got --dominant {dominant} --contextual {contextual}")
        return VisionDropEncoder(tokens=dominant + contextual, contextual=contextual)

    def shares(self) -> tuple[float, ...]:
        """Each in-LLM stage's contextual share of its count (the configuration's ``c / (d + c)``)."""
        label = self.label()
        pairs = preset(label)[1] if label is not None else PUBLISHED_STAGES
        share = [c / (d + c) if d + c else 0.0 for d, c in pairs]
        return tuple(share[min(j, len(share) - 1)] for j in range(len(self.layers)))

    def split(self, count: int, stage: int) -> tuple[int, int]:
        """``(dominant, contextual)`` of a stage that keeps ``count`` visual tokens (at least one dominant)."""
        if self.stage_contextual is not None:
            contextual = self.stage_contextual[stage]
        else:
            contextual = round_half_up(count * self.shares()[stage])
        contextual = max(0, min(contextual, count - 1))
        return count - contextual, contextual

    def counts(self, n0: int, num_layers: int) -> list[int]:
        """A budget label: each stage keeps its configuration's share of the ``n0`` tokens the encoder stage passed
        on (exactly the configuration's counts on LLaVA-1.5); other targets as the schedule says."""
        label = self.label()
        if label is None:
            return super().counts(n0, num_layers)
        if n0 <= 0:
            return [0] * len(self.layers)
        (d0, c0), stages = preset(label)
        if len(stages) != len(self.layers):
            raise ValueError(f"visiondrop --budget gives {len(stages)} stages ({list(PUBLISHED_LAYERS)} by default), "
                             f"got layers {list(self.layers)}; give --tokens for other stages")
        out, prev = [], n0
        for d, c in stages:
            prev = min(prev, max(1, round_half_up(n0 * (d + c) / (d0 + c0))))
            out.append(prev)
        return out

    def validate(self, num_layers: int) -> None:
        label = self.label()
        if label is not None:  # the label is reached by the encoder stage: check the equivalent stage counts
            if 1.5 * label > PAPER_N0:
                raise ValueError(f"visiondrop --budget {label:g}: its encoder stage would keep {1.5 * label:g} of "
                                 f"{PAPER_N0} per crop; the largest budget is {PAPER_N0 / 1.5:g}")
            (d0, c0), _ = preset(label)
            replace(self, schedule=Schedule(self.layers, tokens=tuple(self.counts(d0 + c0, num_layers))),
                    dominant=d0 if self.dominant is None else self.dominant,
                    contextual=c0 if self.contextual is None else self.contextual).validate(num_layers)
            return
        super().validate(num_layers)
        if self.layers[-1] >= num_layers:
            raise ValueError(f"visiondrop ranks with the next layer's attention: layers must be in 1..{num_layers - 1} "
                             f"for a {num_layers}-layer decoder, got {list(self.layers)}")
        if self.stage_contextual is not None:
            sc = self.stage_contextual
            if len(sc) != len(self.layers) or any(c < 0 for c in sc):
                raise ValueError(f"visiondrop: --visiondrop-stage-contextual needs one count >= 0 per stage "
                                 f"({len(self.layers)}), got {list(sc)}")
            if self.schedule.tokens is not None and any(c >= t for c, t in zip(sc, self.schedule.tokens)):
                raise ValueError(f"visiondrop: each stage's contextual tokens must be fewer than its count (at least "
                                 f"one dominant), got {list(sc)} of {list(self.schedule.tokens)}")
        stage = self.encoder_stage()
        if stage is not None:
            stage.validate()

    # -- selection --------------------------------------------------------------------------------------------
    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """(B, S) the attention each visual token receives from the visual tokens (every visual position as a query
        row, the next layer's softmax over every key, heads averaged, then averaged over the query rows)."""
        mask = inputs.mask.bool()
        B, S = mask.shape
        device = mask.device
        lengths = torch.tensor([s[1] if a else 0 for s, a in zip(inputs.spans, active)], device=device)
        width = int(lengths.max())
        # every visual position of each sample as a query row; other rows (shorter spans, inactive samples)
        # repeat the last valid position and are left out of the average
        rows = last_valid(mask).expand(B, width).clone()
        for b, (span, a) in enumerate(zip(inputs.spans, active)):
            if a:
                rows[b, : span[1]] = torch.arange(span[0], span[0] + span[1], device=device)
        received = torch.zeros(B, S, dtype=torch.float32, device=device)
        for lo in range(0, width, ROW_CHUNK):
            part = rows[:, lo : lo + ROW_CHUNK]
            probs = inputs.attention(part, which="next").mean(dim=1)  # (B, R, S), heads averaged
            real = torch.arange(lo, lo + part.shape[1], device=device)[None] < lengths[:, None]  # (B, R)
            received += (probs * real[..., None]).sum(dim=1)
        with inputs.timed("score"):
            for b, (start, length) in ((b, s) for b, s in enumerate(inputs.spans) if active[b]):
                received[b, start : start + length] = received[b, start : start + length] / length  # row mean
        return received

    def prepare(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """(B, S, H_kv, head_dim) the next layer's rotated keys (the contextual tokens' similarity)."""
        return inputs.keys(which="next", heads=True)

    def choose(self, inputs: StageInputs, sample: SampleScores, keys: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's dominant tokens by score; the others merged into its contextual tokens."""
        dominant, contextual = self.split(sample.target, inputs.stage)
        dom = topk_indices(sample.scores, dominant)
        if contextual == 0:
            return dom, None
        rest = torch.ones(sample.length, dtype=torch.bool, device=dom.device)
        rest[dom] = False
        work = work_dtype(inputs.hidden)
        metric = F.normalize(sample.span(keys).to(work).mean(dim=1), dim=-1)  # (n, head_dim)
        h = sample.span(inputs.hidden)
        return dom, merge_contextual(h.to(work), metric, rest.nonzero().flatten(), contextual).to(h.dtype)

    # -- reporting ----------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        stage = self.encoder_stage()
        return {**super().config(), **({"encoder": stage.config()} if stage is not None else {})}

    def describe(self, n0: int = PAPER_N0) -> str:
        stage = self.encoder_stage()
        if stage is None:
            return super().describe(n0)
        label = self.label()
        if label is None:
            return f"{stage.describe()}; then {super().describe(stage.tokens)}"
        n = stage.tokens
        pairs = [list(self.split(c, j)) for j, c in enumerate(self.counts(n, self.layers[-1] + 1))]
        return (f"{self.name} at budget {label:g}: the encoder keeps {n - stage.contextual} + {stage.contextual} "
                f"tokens per crop (dominant with CLS + contextual), then after layer(s) "
                f"{','.join(map(str, self.layers))} [dominant, contextual] {pairs} of every {n}")
