"""Greedy feature-space NMS with fill-up, on the tensor's device (PIO rule, ``docs/method.md`` §2.8).

Given per-token saliency scores and features of one sample's visual span (n tokens), keep ``k`` tokens:

* visit tokens by descending score, with a stable order (ties broken by the lower index);
* pass 1: keep a token unless it is suppressed; keeping token ``i`` suppresses every ``j`` with
  ``cos(feats_i, feats_j) >= tau`` (self-similarity included); stop once ``k`` are kept;
* pass 2, only if fewer than ``k`` survived: fill up with the highest-scoring tokens not yet kept
  (suppressed ones allowed);
* return the kept local indices in ascending (original) order.

Hyper-parameters: ``tau = 0.8`` (authors' value, hard-coded in their code).

Default (host) loop: pass 1 runs on the host over Python-int bitsets, one block of ``block`` candidates (in
visiting order) at a time. Only similarities that the greedy rule can read are computed: a candidate is
suppressed exactly when some token kept before it has ``cos >= tau``, so each block is compared with the tokens
kept so far and with itself (earlier candidates of the block), two matmuls, and one bit-packed copy of the
result goes to the host per block. Blocks after the ``k``-th kept token are never computed. This costs at most
``n * (k + block) * D`` multiply-adds, against ``n^2 * D`` for the full similarity matrix (LLaVA-NeXT:
n = 2340, k = 376: at most a quarter, usually far less), with ``O(block * (k + block))`` memory. The dot
products are the same float32 (float64 for float64 input) products as in a full matrix, grouped differently,
so a cosine within rounding error of ``tau`` may compare differently. Blocks of :data:`CPU_BLOCK` pay off where
FLOPs are the cost (a CPU); elsewhere the default is one block, the whole span: a GPU computes the full matrix
in microseconds, and one host copy per call costs less than one per block.

Device loop (``on_device=True``): the full boolean neighbour matrix (one ``(n, D) @ (D, n)`` matmul), and both
passes as one loop of exactly ``k`` steps with no host synchronisation at all (no ``.item()``, ``.tolist()``
or Python branching on tensor values). Let ``rank_i`` in ``0..n-1`` be token i's position in the stable
descending order, and at every step pick::

    argmin_i  key_i,   key_i = rank_i + n * suppressed_i + 2n * picked_i

Proof of equivalence with the two explicit passes. Ranks are distinct, so keys are distinct and the argmin is
unique: unpicked unsuppressed tokens have keys in ``[0, n)``, unpicked suppressed ones in ``[n, 2n)``, picked
ones in ``[2n, 3n)``. (a) While some unpicked token is unsuppressed, the loop picks the one of lowest rank.
Pass 1 picks the same token: every token of lower rank was visited before and was either kept or suppressed at
that time, and suppression is never undone, so the first unsuppressed token pass 1 meets next is exactly the
lowest-ranked unpicked unsuppressed token. (b) Once every unpicked token is suppressed, pass 1 has nothing left
to keep and pass 2 takes the unpicked tokens in rank order, which is what the argmin returns (all candidates
have keys ``rank + n``). Updating ``suppressed`` during the fill-up changes nothing, since every candidate is
already suppressed. Both stop after ``k`` picks. The loop keeps ``key`` as a running maximum over precomputed
rows ``P[i, j] = rank_j + n * nbr[i, j] + 2n * [i == j]``: three kernels per step.

A precomputed neighbour matrix (e.g. from :func:`neighbour_matrix`) can be passed to either loop.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["CPU_BLOCK", "DEFAULT_TAU", "greedy_nms", "neighbour_matrix", "stable_rank", "topk_indices"]

DEFAULT_TAU = 0.8
CPU_BLOCK = 128
"""Candidates per block of the host loop on a CPU (fastest of 64-1024 for LLaVA-NeXT spans on the CI CPU)."""


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype selections compute in: float64 for float64 inputs (the naive references' precision), else
    float32 (half-precision activations are scored in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalised(feats: Tensor) -> Tensor:
    """L2-normalised features in float32 (float64 if the input is float64), shape (n, D)."""
    return F.normalize(feats.to(work_dtype(feats)), p=2.0, dim=-1)


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
    on_device: bool = False,
    block: int | None = None,
) -> Tensor:
    """Greedy NMS with fill-up: the ``k`` kept tokens of one visual span (§2.8; rule in the module docstring).

    Args:
        scores: (n,) saliency scores (any float dtype; only their order matters).
        feats: (n, D) features for the cosine similarity (PIO: the raw hidden states at the pruning point).
        k: number of tokens to keep.
        tau: suppression threshold on cosine similarity (suppress if ``cos >= tau``); paper/code: 0.8.
        neighbours: optional precomputed (n, n) boolean matrix ``cos >= tau``; ``feats``/``tau`` are then
            not used for the similarity.
        on_device: run the greedy loop on the tensor's device over the full neighbour matrix (no host
            synchronisation at all, ~3 kernels per kept token) instead of the default blocked host loop (one
            device->host copy per block of candidates visited).
        block: candidates per block of the host loop; None: :data:`CPU_BLOCK` on a CPU, else the whole span.

    Returns:
        (min(max(k, 0), n),) long tensor of kept local indices in ascending order, on ``scores.device``.
    """
    n = _check_inputs(scores, feats)
    device = scores.device
    if k >= n:
        return torch.arange(n, device=device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if block is None:
        block = CPU_BLOCK if device.type == "cpu" else n
    if block < 1:
        raise ValueError(f"block must be a positive number of candidates or None, got {block}")
    if neighbours is not None and (neighbours.shape != (n, n) or neighbours.dtype != torch.bool):
        raise ValueError(
            f"neighbours must be a bool tensor of shape ({n}, {n}), got {neighbours.dtype} {tuple(neighbours.shape)}"
        )
    order, rank = stable_rank(scores)
    if on_device:
        nbr = neighbours.to(device) if neighbours is not None else neighbour_matrix(feats, tau)
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
    if neighbours is not None:  # one block: the whole matrix, rows and columns in visiting order
        nbr = neighbours.to(device)[order][:, order]
        bits, width = _host_bitsets(nbr)
        visited = _keep_in_order(bits, width, n, 0, k)
    else:
        visited = _blocked_pass(feats, order, k, tau, block)
    if len(visited) < k:  # pass 2: fill up by score
        taken = set(visited)
        visited += [p for p in range(n) if p not in taken][: k - len(visited)]
    kept = order.index_select(0, torch.tensor(visited, dtype=torch.long, device=device))
    return torch.sort(kept).values


def _blocked_pass(feats: Tensor, order: Tensor, k: int, tau: float, block: int) -> list[int]:
    """Pass 1 in visiting ``order``: the visiting positions kept (at most ``k``), ascending.

    Only the blocks visited are gathered and normalised.
    """
    n = feats.shape[0]
    picks: list[int] = []
    kept = _normalised(feats[:0])  # unit features of the tokens kept so far
    for a in range(0, n, block):
        cand = _normalised(feats.index_select(0, order[a : a + block]))
        m = cand.shape[0]
        near_kept = ((cand @ kept.T) >= tau).any(dim=1)  # (m,), suppressed by earlier blocks
        bits, width = _host_bitsets(torch.cat([(cand @ cand.T) >= tau, near_kept[None]]))
        new = _keep_in_order(bits, width, m, int.from_bytes(bits[m * width :], "little"), k - len(picks))
        picks += [a + c for c in new]
        if len(picks) == k:
            break
        kept = torch.cat([kept, cand[new]])
    return picks


def _keep_in_order(bits: bytes, width: int, m: int, suppressed: int, budget: int) -> list[int]:
    """Greedy pass over candidates ``0..m-1``: keep a candidate unless suppressed; keeping ``c`` suppresses
    row ``c`` of ``bits``; stop after ``budget`` kept."""
    picks: list[int] = []
    for c in range(m):
        if (suppressed >> c) & 1:
            continue
        picks.append(c)
        if len(picks) == budget:
            break
        suppressed |= int.from_bytes(bits[c * width : (c + 1) * width], "little")
    return picks


def _host_bitsets(rows: Tensor) -> tuple[bytes, int]:
    """A boolean (r, m) matrix copied to the host once, each row a little-endian bitset of ``width`` bytes.

    Bit ``j`` of row ``i`` is ``rows[i, j]``: columns are packed eight to a byte (bit ``t`` of byte ``b`` is
    column ``8b + t``), so ``int.from_bytes(bits[i * width : (i + 1) * width], "little")`` is row ``i``.
    """
    r, m = rows.shape
    width = (m + 7) // 8
    padded = torch.zeros(r, width * 8, dtype=torch.uint8, device=rows.device)
    padded[:, :m] = rows
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=rows.device)
    packed = (padded.view(r, width, 8) * weights).sum(-1, dtype=torch.uint8)  # (r, width)
    buf = bytearray(r * width)
    torch.frombuffer(buf, dtype=torch.uint8).copy_(packed.flatten())  # the one device -> host copy
    return bytes(buf), width
