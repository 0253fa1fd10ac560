"""Greedy feature-space NMS with fill-up, on the tensor's device (PIO rule, ``docs/method.md`` §2.8).

Given per-token saliency scores and features of one sample's visual span (n tokens), keep ``k`` tokens:

* visit tokens by descending score, with a stable order (ties broken by the lower index);
* pass 1: keep a token unless it is suppressed; keeping token ``i`` suppresses every ``j`` with
  ``cos(feats_i, feats_j) >= tau`` (self-similarity included); stop once ``k`` are kept;
* pass 2, only if fewer than ``k`` survived: fill up with the highest-scoring tokens not yet kept
  (suppressed ones allowed);
* return the kept local indices in ascending (original) order.

Hyper-parameters: ``tau = 0.8`` (authors' value, hard-coded in their code).

Implementation: both passes are one loop of exactly ``k`` steps. Let ``rank_i`` in ``0..n-1`` be token i's
position in the stable descending order, and at every step pick::

    argmin_i  key_i,   key_i = rank_i + n * suppressed_i + 2n * picked_i

Proof of equivalence with the two explicit passes. Ranks are distinct, so keys are distinct and the argmin is
unique: unpicked unsuppressed tokens have keys in ``[0, n)``, unpicked suppressed ones in ``[n, 2n)``, picked
ones in ``[2n, 3n)``. (a) While some unpicked token is unsuppressed, the loop picks the one of lowest rank.
Pass 1 picks the same token: every token of lower rank was visited before and was either kept or suppressed at
that time, and suppression is never undone, so the first unsuppressed token pass 1 meets next is exactly the
lowest-ranked unpicked unsuppressed token. (b) Once every unpicked token is suppressed, pass 1 has nothing left
to keep and pass 2 takes the unpicked tokens in rank order, which is what the argmin returns (all candidates
have keys ``rank + n``). Updating ``suppressed`` during the fill-up changes nothing, since every candidate is
already suppressed. Both stop after ``k`` picks.

By default the greedy loop runs on the host over Python-int bitsets after a single copy of the bit-packed
neighbour matrix (``on_device=False``): on a GPU that replaces about three kernel launches per kept token by
one transfer. With ``on_device=True`` the loop keeps ``key`` itself as a running maximum over precomputed rows
(``P[i, j] = rank_j + n * nbr[i, j] + 2n * [i == j]``), so each step is three kernels, which matters on a GPU
where the loop is bound by kernel launches.

The device loop never reads a tensor value on the host (no ``.item()``, ``.tolist()`` or Python branching on
tensor values): the picked index stays on the device. With ``on_device=True`` the whole call has no
device->host synchronisation; the default host loop synchronises exactly once per call.

Memory: by default the boolean neighbour matrix ``cos >= tau`` is built once with one ``(n, D) @ (D, n)``
matmul; for n = 2880 (LLaVA-NeXT) the temporary float32 similarity is 33 MB and the boolean matrix 8.3 MB.
With ``row_wise=True`` only the similarity row of each kept token is computed (k matrix-vector products,
``O(n)`` memory), which is cheaper in FLOPs when ``k << n`` but launches one extra kernel per step. A
precomputed neighbour matrix (e.g. from :func:`neighbour_matrix`) can also be passed in.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TAU", "greedy_nms", "neighbour_matrix", "stable_rank", "topk_indices"]

DEFAULT_TAU = 0.8


def _work_dtype(feats: Tensor) -> torch.dtype:
    return torch.float64 if feats.dtype == torch.float64 else torch.float32


def _normalised(feats: Tensor) -> Tensor:
    """L2-normalised features in float32 (float64 if the input is float64), shape (n, D)."""
    return F.normalize(feats.to(_work_dtype(feats)), p=2.0, dim=-1)


def neighbour_matrix(feats: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """Boolean ``(n, n)`` matrix ``cos(feats_i, feats_j) >= tau`` (diagonal included for nonzero rows).

    Args:
        feats: (n, D) features; cosine computed in float32 (float64 if ``feats`` is float64).
        tau: similarity threshold.
    """
    if feats.dim() != 2:
        raise ValueError(f"feats must have shape (n, D), got {tuple(feats.shape)}")
    f = _normalised(feats)
    return (f @ f.T) >= tau  # (n, n)


def stable_rank(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Stable descending order of ``scores`` (ties by lower index) and each token's rank in it.

    Returns:
        order: (n,) long, token indices from best to worst.
        rank: (n,) long, ``rank[order[p]] = p``.
    """
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return order, rank


def _check_inputs(scores: Tensor, feats: Tensor | None) -> int:
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (n,), got {tuple(scores.shape)}")
    n = scores.shape[0]
    if feats is not None:
        if feats.dim() != 2 or feats.shape[0] != n:
            raise ValueError(f"feats must have shape (n={n}, D), got {tuple(feats.shape)}")
        if feats.device != scores.device:
            raise ValueError(f"scores on {scores.device} but feats on {feats.device}; put both on one device")
    return n


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Plain top-``k`` by score (the NMS-off ablation): stable, ties by lower index, sorted ascending.

    Args:
        scores: (n,) scores.
        k: number to keep; ``k >= n`` keeps all, ``k <= 0`` none.

    Returns:
        (min(max(k, 0), n),) long tensor of local indices, ascending, on ``scores.device``.
    """
    n = _check_inputs(scores, None)
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    order, _ = stable_rank(scores)
    return torch.sort(order[:k]).values


def greedy_nms(
    scores: Tensor,
    feats: Tensor,
    k: int,
    tau: float = DEFAULT_TAU,
    neighbours: Tensor | None = None,
    row_wise: bool = False,
    on_device: bool = False,
) -> Tensor:
    """Greedy NMS with fill-up: the ``k`` kept tokens of one visual span (§2.8; rule in the module docstring).

    Args:
        scores: (n,) saliency scores (any float dtype; only their order matters).
        feats: (n, D) features for the cosine similarity (PIO: the raw hidden states at the pruning point).
        k: number of tokens to keep.
        tau: suppression threshold on cosine similarity (suppress if ``cos >= tau``); paper/code: 0.8.
        neighbours: optional precomputed (n, n) boolean matrix ``cos >= tau``; ``feats``/``tau`` are then
            not used for the similarity.
        row_wise: compute one similarity row per kept token instead of the full matrix (O(n) memory); runs
            on the device.
        on_device: run the greedy loop on the tensor's device (no host synchronisation at all, ~3 kernels per
            kept token) instead of the default: one copy of the bit-packed neighbour matrix to the host and a
            loop over Python integers there, which costs far less than k kernel launches on a GPU.

    Returns:
        (min(max(k, 0), n),) long tensor of kept local indices in ascending order, on ``scores.device``.
    """
    n = _check_inputs(scores, feats)
    device = scores.device
    if k >= n:
        return torch.arange(n, device=device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if neighbours is not None:
        if neighbours.shape != (n, n) or neighbours.dtype != torch.bool:
            raise ValueError(
                f"neighbours must be a bool tensor of shape ({n}, {n}), got "
                f"{neighbours.dtype} {tuple(neighbours.shape)}"
            )
        nbr: Tensor | None = neighbours.to(device)
        f = None
    elif row_wise:
        nbr = None
        f = _normalised(feats)  # (n, D)
    else:
        nbr = neighbour_matrix(feats, tau)  # (n, n)
        f = None

    order, rank = stable_rank(scores)
    if nbr is not None and not on_device:
        return _greedy_on_host(nbr, order, k).to(device)
    if nbr is not None:
        # key_j only ever grows to rank_j + n (suppressed) or past 2n (picked), so one precomputed row per
        # token, P[i, j] = rank_j + n * nbr[i, j] + 2n * [i == j], and a running maximum give the same keys:
        # three kernels per step (argmin, row gather, maximum). float32 is exact: 3n < 2**24.
        P = rank.to(torch.float32)[None, :] + n * nbr.to(torch.float32)  # (n, n)
        P.diagonal().add_(2 * n)
        key = rank.to(torch.float32)
        picks = []
        for _ in range(k):
            i = torch.argmin(key).view(1)  # stays on the device
            picks.append(i)
            torch.maximum(key, P.index_select(0, i).squeeze(0), out=key)
        return torch.sort(torch.cat(picks)).values
    # row-wise: the similarity row of each kept token is computed when it is kept
    suppressed = torch.zeros(n, dtype=torch.bool, device=device)
    picked = torch.zeros(n, dtype=torch.bool, device=device)
    out = torch.empty(k, dtype=torch.long, device=device)
    for step in range(k):
        key = rank + n * suppressed.long() + 2 * n * picked.long()  # (n,)
        i = torch.argmin(key).view(1)  # (1,), stays on the device
        out[step : step + 1] = i
        picked.index_fill_(0, i, True)
        suppressed |= (f.index_select(0, i) @ f.T).squeeze(0) >= tau  # (1, D) @ (D, n) -> (n,)
    return torch.sort(out).values


def _greedy_on_host(nbr: Tensor, order: Tensor, k: int) -> Tensor:
    """The same two passes with one device->host copy: rows of ``nbr`` as Python-int bitsets.

    Bit ``j`` of row ``i`` is ``nbr[i, j]``; columns are packed eight to a byte (bit ``t`` of byte ``b`` is
    column ``8b + t``) so ``int.from_bytes(row, "little")`` gives the bitset directly.
    """
    n = nbr.shape[0]
    width = (n + 7) // 8
    padded = torch.zeros(n, width * 8, dtype=torch.uint8, device=nbr.device)
    padded[:, :n] = nbr
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=nbr.device)
    packed = (padded.view(n, width, 8) * weights).sum(-1, dtype=torch.uint8)  # (n, width)
    both = torch.cat([packed.flatten(), order.to(torch.int64).view(torch.uint8)])
    buf = bytearray(both.numel())
    torch.frombuffer(buf, dtype=torch.uint8).copy_(both)  # the one device -> host copy
    rows = bytes(buf[: n * width])
    ranked = torch.frombuffer(buf, dtype=torch.int64, offset=n * width, count=n).tolist()
    suppressed, picks = 0, []
    for i in ranked:  # pass 1: greedy NMS in score order
        if (suppressed >> i) & 1:
            continue
        picks.append(i)
        if len(picks) == k:
            break
        suppressed |= int.from_bytes(rows[i * width : (i + 1) * width], "little")
    if len(picks) < k:  # pass 2: fill up by score
        taken = set(picks)
        picks += [i for i in ranked if i not in taken][: k - len(picks)]
    return torch.tensor(sorted(picks), dtype=torch.long)
