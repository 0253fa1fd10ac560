"""PIO token selection: proxy-loss gradient saliency, then feature-space NMS (docs/method.md §2).

At a pruning layer, for every sample whose visual span is longer than its target:

1. Supervised rows: the last ``k_pos`` valid positions before the final one (the authors' choice, rows
   S-5..S-2 for an unpadded sample) or including it (``include_last``).
2. Loss: cross-entropy of the proxy logits at those rows against their own detached argmax, averaged over
   each sample's rows and summed over samples (so every sample's gradient is independent of the batch).
3. Saliency: the L2 norm, in float32, of d loss / d x at every visual position, where ``x`` is a detached
   probe of the hidden states at the pruning point.
4. Greedy NMS on cosine similarity of the raw hidden states (``tau``), with fill-up by score; kept indices
   in ascending order.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .gather import Span
from .nms import greedy_nms, topk_indices
from .proxy import ProxyFn

if TYPE_CHECKING:
    from .schedule import Schedule
    from .state import PruneState

PROXY_LAYERS = ("next", "current")
PROXY_IMPLS = ("sliced", "full")


@dataclass(frozen=True)
class PIOConfig:
    """Settings of the PIO selector.

    Attributes:
        schedule: pruning layers (1-based) and per-layer visual-token targets.
        tau: NMS cosine threshold (0.8 in the paper's code).
        k_pos: number of supervised rows of the proxy loss (4).
        proxy: ``next`` runs decoder layer l (0-based) after pruning point l (the authors' LLaVA code);
            ``current`` re-applies layer l-1 (their Qwen code).
        include_last: also supervise the last position (the authors do not).
        proxy_impl: ``sliced`` (queries and MLP only for supervised rows) or ``full``; identical results.
        nms: False gives plain top-k by saliency (ablation).
    """

    schedule: Schedule
    tau: float = 0.8
    k_pos: int = 4
    proxy: str = "next"
    include_last: bool = False
    proxy_impl: str = "sliced"
    nms: bool = True

    def validate(self, num_layers: int) -> None:
        if self.proxy not in PROXY_LAYERS:
            raise ValueError(f"--pio-proxy must be one of {PROXY_LAYERS}, got {self.proxy!r}")
        if self.proxy_impl not in PROXY_IMPLS:
            raise ValueError(f"proxy_impl must be one of {PROXY_IMPLS}, got {self.proxy_impl!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"--pio-tau must be in (0, 1], got {self.tau}")
        if self.k_pos < 1:
            raise ValueError(f"--pio-kpos must be >= 1, got {self.k_pos}")
        self.schedule.validate(num_layers, proxy=self.proxy)

    def to_dict(self) -> dict:
        return {
            "schedule": self.schedule.to_dict(),
            "tau": self.tau,
            "k_pos": self.k_pos,
            "proxy": self.proxy,
            "include_last": self.include_last,
            "proxy_impl": self.proxy_impl,
            "nms": self.nms,
        }


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
    state: PruneState | None = None,
) -> torch.Tensor:
    """Gradient saliency (B, S) float32 of every position for the samples in ``active`` (B,) bool.

    ``hidden`` (B, S, D) is the residual stream at the pruning point. Only the probe gets a gradient; the
    model's parameters must have ``requires_grad=False`` (the model guarantees it).
    """
    timed = state.timed if state is not None else _untimed
    with torch.inference_mode(False), torch.enable_grad():  # tensors made here are usable by autograd
        rows, weights = supervised_rows(mask.clone(), k_pos, include_last)
        weights = weights * active[:, None].to(weights)
        x = hidden.detach().clone().requires_grad_(True)
        with timed("proxy_forward", hidden.device):
            logits = proxy(x, rows).float()  # (B, K, V)
            target = logits.detach().argmax(dim=-1)
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(weights)
            loss = ((ce * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)).sum()
            if x.dtype == torch.float16:
                loss = loss * 1024.0  # keeps small fp16 gradients from underflowing; ranking is scale-free
        with timed("proxy_backward", hidden.device):
            (grad,) = torch.autograd.grad(loss, x)
    return grad.float().norm(dim=-1)


def select_visual_tokens(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    spans: Sequence[Span | None],
    targets: Sequence[int],
    proxy: ProxyFn,
    cfg: PIOConfig,
    state: PruneState | None = None,
) -> list[torch.Tensor | None]:
    """Kept visual indices, local to each span and ascending, for one pruning layer.

    Args:
        hidden: (B, S, D) hidden states at the pruning point.
        mask: (B, S) bool, valid tokens.
        spans: per sample (start, length) of its current visual span, or None (text-only).
        targets: per sample the number of visual tokens to keep at this layer.
        proxy: the layer-local proxy, see :mod:`pio.proxy`.
    Returns:
        per sample a LongTensor of kept local indices, or None where nothing is pruned (no image, or the
        span is already within its target).
    """
    active = [s is not None and 0 <= t < s[1] for s, t in zip(spans, targets)]
    if not any(active):
        return [None] * len(spans)
    act = torch.tensor(active, device=hidden.device)
    scores = saliency(hidden, mask, act, proxy, cfg.k_pos, cfg.include_last, state)
    timed = state.timed if state is not None else _untimed
    out: list[torch.Tensor | None] = []
    with timed("nms", hidden.device):
        for b, (span, k) in enumerate(zip(spans, targets)):
            if not active[b]:
                out.append(None)
                continue
            start, length = span
            s = scores[b, start : start + length]
            if cfg.nms:
                out.append(greedy_nms(s, hidden[b, start : start + length].detach(), k, cfg.tau))
            else:
                out.append(topk_indices(s, k))
    return out


def _untimed(name: str, device: torch.device) -> nullcontext:
    return nullcontext()
