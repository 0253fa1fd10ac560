"""PIO-FVLM / TRIO (arXiv 2602.04657): proxy-loss gradient saliency, then feature-space NMS (docs/method.md §2).

At a pruning layer, for every sample whose visual span is longer than its target:

1. Supervised rows: the last ``k_pos`` valid positions before the final one (the authors' choice, rows
   S-5..S-2 for an unpadded sample) or including it (``include_last``).
2. Loss: cross-entropy of the proxy logits at those rows against their own detached argmax, averaged over
   each sample's rows and summed over samples (so every sample's gradient is independent of the batch).
3. Saliency: the L2 norm, in float32, of d loss / d x at every visual position, where ``x`` is a detached
   probe of the hidden states at the pruning point.
4. Greedy NMS on cosine similarity of the raw hidden states (``tau``), with fill-up by score; kept indices
   in ascending order.

Schedules: the authors published 64 -> (92, 54, 22) and 128 -> (218, 128, 54) after layers 1, 10, 15 of
LLaVA-1.5-7B (their scripts); 192 -> (344, 202, 86) is our linear extrapolation (exactly 192.0). These are
the budget solver's anchors (:mod:`pio.budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import Flag, SampleScores, ScorerMethod, StageInputs
from ..budget import Anchors, same_share_of_depth
from ..nms import greedy_nms
from ..proxy import ProxyFn
from ..schedule import Schedule

PROXY_LAYERS = ("next", "current")
PROXY_IMPLS = ("sliced", "full")

ANCHORS = Anchors(
    layers=(1, 10, 15), num_layers=32, n0=576,
    schedules=((64, (92, 54, 22)), (128, (218, 128, 54)), (192, (344, 202, 86))),
    source="authors' scripts (64, 128: scripts/v1_5/eval/*.sh, textvqa_set*.sh); 192: linear extrapolation",
)

QWEN_ANCHORS = Anchors(
    layers=(1, 8, 14), num_layers=28, n0=576,
    schedules=((192, (346, 203, 83)),),
    source="authors' Qwen2.5-VL defaults (qwen/eval/model_vqa_mmbench.py, model_vqa_science.py): ratios 0.6003, "
           "0.3519, 0.1436 after layers 1, 8, 14, which average exactly 1/3 of the visual tokens (the 192 row) as "
           "fractions of the initial count (x 576 here); their code compounds them (24.6 %)",
)


@dataclass(frozen=True)
class PIO(ScorerMethod):
    """PIO-FVLM's selector.

    Attributes:
        schedule: pruning layers (1-based) and per-layer visual-token targets.
        tau: NMS cosine threshold (0.8 in the authors' code).
        k_pos: number of supervised rows of the proxy loss (4).
        proxy: ``next`` runs decoder layer l (0-based) after pruning point l (the authors' LLaVA code);
            ``current`` re-applies layer l-1 (their Qwen code).
        include_last: also supervise the last position (the authors do not).
        proxy_impl: ``sliced`` (queries and MLP only for supervised rows) or ``full``; identical results.
        nms: False gives plain top-k by saliency (ablation).
    """

    name = "pio"
    needs = frozenset({"hidden", "proxy"})
    default_layers = ANCHORS.layers
    ve_layers = (16,)  # the authors' README default w/ VE: 96 tokens at the encoder, then 32 after layer 16
    anchors = ANCHORS
    family_defaults = {
        # the authors' Qwen code: layers 1, 8, 14, the proxy re-applies the layer that just ran; w/ VE: the
        # encoder keeps 16.7 %, then a third of it after layer 14 (their README: 11.1 %)
        "qwen2_5_vl": {"layers": QWEN_ANCHORS.layers, "ve_layers": (14,), "anchors": QWEN_ANCHORS,
                       "options": {"proxy": "current"}},
        # LLaVA-OneVision (28 Qwen2 layers, LLaVA's code path): nothing published; LLaVA's layers and w/ VE layer
        # at the same share of depth (1, 9, 13 and 14), LLaVA's schedules' shape and proxy
        "llava_onevision": {"layers": same_share_of_depth(ANCHORS.layers, 28),
                            "ve_layers": same_share_of_depth((16,), 28)},
    }
    source = "PIO-FVLM / TRIO, arXiv 2602.04657; github.com/ocy1/TRIO (docs/method.md)"
    phase = "nms"
    flags = (
        Flag("tau", "pio-tau", float, "NMS cosine threshold (0.8)"),
        Flag("k_pos", "pio-kpos", int, "supervised rows of the proxy loss (4)"),
        Flag("proxy", "pio-proxy", str, "proxy decoder layer: next (authors' LLaVA) or current (their Qwen)",
             choices=PROXY_LAYERS),
        Flag("proxy_impl", "pio-proxy-impl", str, "sliced (supervised rows only) or full; same result",
             choices=PROXY_IMPLS),
        Flag("include_last", "pio-include-last", None, "also supervise the last position", const=True),
        Flag("nms", "pio-no-nms", None, "plain top-k by saliency (ablation)", const=False),
    )

    schedule: Schedule
    positions: str = "renumber"
    tau: float = 0.8
    k_pos: int = 4
    proxy: str = "next"
    include_last: bool = False
    proxy_impl: str = "sliced"
    nms: bool = True

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.proxy not in PROXY_LAYERS:
            raise ValueError(f"--pio-proxy must be one of {PROXY_LAYERS}, got {self.proxy!r}")
        if self.proxy_impl not in PROXY_IMPLS:
            raise ValueError(f"--pio-proxy-impl must be one of {PROXY_IMPLS}, got {self.proxy_impl!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"--pio-tau must be in (0, 1], got {self.tau}")
        if self.k_pos < 1:
            raise ValueError(f"--pio-kpos must be >= 1, got {self.k_pos}")
        if self.proxy == "next" and self.layers[-1] >= num_layers:
            raise ValueError(
                f"layers {[x for x in self.layers if x >= num_layers]} out of range for a {num_layers}-layer "
                f"decoder with the 'next' proxy: allowed 1..{num_layers - 1} (the proxy runs the layer after "
                "the pruning point; use --pio-proxy current to prune after the last layer)"
            )

    def score(self, inputs: StageInputs, active: Sequence[bool]) -> torch.Tensor:
        """The gradient saliency (:func:`saliency`) of every position."""
        hidden = inputs.hidden
        act = torch.tensor(active, device=hidden.device)
        proxy = inputs.proxy(self.proxy, self.proxy_impl)
        return saliency(hidden, inputs.mask, act, proxy, self.k_pos, self.include_last, inputs.timed)

    def choose(self, inputs: StageInputs, sample: SampleScores, prepared: None) -> tuple[torch.Tensor, None]:
        """Greedy NMS on the hidden states' cosine similarity (``tau``), filled up by saliency; plain top-k
        without ``nms``."""
        if not self.nms:
            return super().choose(inputs, sample, prepared)
        return greedy_nms(sample.scores, sample.span(inputs.hidden).detach(), sample.target, self.tau), None


def supervised_rows(mask: torch.Tensor, k_pos: int, include_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose logits the proxy loss reads.

    Returns ``rows`` (B, K) long and ``weights`` (B, K) float: the last ``k_pos`` valid positions, skipping
    the final one unless ``include_last``, clamped at the first valid position; clamped duplicates get
    weight 0 so each distinct row counts once (as the authors' boolean row mask does).
    """
    B, S = mask.shape
    m = mask.bool()
    pos = torch.arange(S, device=mask.device)
    last = torch.where(m, pos, -1).amax(dim=1)  # (B,)
    first = torch.where(m, pos, S).amin(dim=1)
    offsets = torch.arange(k_pos, device=mask.device) + (0 if include_last else 1)
    raw = last[:, None] - offsets[None, :]  # (B, K)
    rows = torch.maximum(raw, first[:, None]).clamp(0, S - 1)
    weights = torch.ones(B, k_pos, device=mask.device)
    weights[:, 1:] = (raw[:, 1:] >= first[:, None]).float()  # the first clamped row stays once
    return rows, weights


def saliency(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    active: torch.Tensor,
    proxy: ProxyFn,
    k_pos: int = 4,
    include_last: bool = False,
    timed: Callable[[str], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Gradient saliency (B, S) float32 of every position for the samples in ``active`` (B,) bool.

    ``hidden`` (B, S, D) is the residual stream at the pruning point. Only the probe gets a gradient; the
    model's parameters should have ``requires_grad=False`` (the loader sets it), or autograd also builds their
    part of the graph (same result, more memory).
    """
    timed = timed or (lambda name: nullcontext())
    with torch.inference_mode(False), torch.enable_grad():  # tensors made here are usable by autograd
        rows, weights = supervised_rows(mask.clone(), k_pos, include_last)
        weights = weights * active[:, None].to(weights)
        x = hidden.detach().clone().requires_grad_(True)
        with timed("proxy_forward"):
            logits = proxy(x, rows).float()  # (B, K, V)
            target = logits.detach().argmax(dim=-1)
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(weights)
            loss = ((ce * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)).sum()
            if x.dtype == torch.float16:
                loss = loss * 1024.0  # keeps small fp16 gradients from underflowing; ranking is scale-free
        with timed("proxy_backward"):
            (grad,) = torch.autograd.grad(loss, x)
    return grad.float().norm(dim=-1)
