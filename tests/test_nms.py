"""Tests for pio.nms: greedy NMS with fill-up against a naive two-pass Python reference; the per-sample top-k loop
of the scorer base class (pio.base.ScorerMethod)."""

from __future__ import annotations

import pytest
import torch

from pio.nms import greedy_nms, neighbour_matrix, stable_rank, topk_indices


def naive_nms(scores: list[float], feats: list[list[float]], k: int, tau: float) -> list[int]:
    """Two explicit passes over a Python list (§2.8), cosine in plain Python float64."""
    n = len(scores)
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    norms = [sum(x * x for x in f) ** 0.5 for f in feats]
    unit = [[x / max(nrm, 1e-12) for x in f] for f, nrm in zip(feats, norms)]

    def cos(i, j):
        return sum(a * b for a, b in zip(unit[i], unit[j]))

    order = sorted(range(n), key=lambda i: (-scores[i], i))
    chosen: list[int] = []
    suppressed = [False] * n
    for i in order:  # pass 1
        if len(chosen) == k:
            break
        if suppressed[i]:
            continue
        chosen.append(i)
        for j in range(n):
            if cos(i, j) >= tau:
                suppressed[j] = True
    for i in order:  # pass 2: fill-up, suppressed allowed
        if len(chosen) == k:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _clustered(n: int, d: int, clusters: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    centres = torch.randn(clusters, d, generator=gen, dtype=torch.float64)
    assign = torch.randint(0, clusters, (n,), generator=gen)
    return centres[assign] + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8, 0.95])
def test_matches_naive_reference(seed, tau):
    gen = torch.Generator().manual_seed(seed)
    n, d = 40, 8
    feats = _clustered(n, d, clusters=6, noise=0.4, gen=gen)
    # integer-valued scores in a small range: many ties, broken by lower index
    scores = torch.randint(0, 6, (n,), generator=gen).to(torch.float64)
    for k in (1, 3, 7, 15, 39):
        want = naive_nms(scores.tolist(), feats.tolist(), k, tau)
        got = greedy_nms(scores, feats, k, tau)
        assert got.dtype == torch.long
        assert got.tolist() == want, (seed, tau, k)
        for block in (1, 3, 16, n):  # blocks of the host loop, from one candidate each to the whole span
            assert greedy_nms(scores, feats, k, tau, block=block).tolist() == want, block
        got_nbr = greedy_nms(scores, feats, k, tau, neighbours=neighbour_matrix(feats, tau))
        assert got_nbr.tolist() == want
        assert greedy_nms(scores, feats, k, tau, on_device=True).tolist() == want


@pytest.mark.parametrize("seed", range(4))
def test_continuous_scores_and_fill_up(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n = 30
    feats = _clustered(n, 6, clusters=3, noise=0.05, gen=gen)  # three tight clusters
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    # with tau = 0.8 only ~3 survive pass 1, so k = 10 exercises the fill-up
    got = greedy_nms(scores, feats, 10, 0.8)
    assert got.tolist() == naive_nms(scores.tolist(), feats.tolist(), 10, 0.8)
    assert len(set(got.tolist())) == 10


def test_hand_example():
    # tokens 0,1 identical direction, 2 orthogonal, 3 close to 2
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.1, 1.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 1.0, 0.5, 0.7], dtype=torch.float64)
    # order: 1, 0, 3, 2. Pass 1: keep 1 (suppresses 0), keep 3 (suppresses 2). Pass 2: 0 then 2.
    assert greedy_nms(scores, feats, 2, 0.8).tolist() == [1, 3]
    assert greedy_nms(scores, feats, 3, 0.8).tolist() == [0, 1, 3]
    # tau = 0.999: only the exact duplicate 0 of token 1 is suppressed (cos(2, 3) = 0.995 stays below)
    assert greedy_nms(scores, feats, 3, 0.999).tolist() == [1, 2, 3]
    # tau above 1 suppresses nothing, not even self: plain top-k
    assert greedy_nms(scores, feats, 3, 1.5).tolist() == topk_indices(scores, 3).tolist() == [0, 1, 3]


def test_edge_cases():
    feats = torch.randn(5, 3, dtype=torch.float64)
    scores = torch.rand(5, dtype=torch.float64)
    assert greedy_nms(scores, feats, 5).tolist() == [0, 1, 2, 3, 4]
    assert greedy_nms(scores, feats, 9).tolist() == [0, 1, 2, 3, 4]
    for k in (0, -2):
        out = greedy_nms(scores, feats, k)
        assert out.shape == (0,) and out.dtype == torch.long
        assert topk_indices(scores, k).shape == (0,)
    assert topk_indices(scores, 7).tolist() == [0, 1, 2, 3, 4]
    empty = greedy_nms(torch.zeros(0), torch.zeros(0, 3), 4)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match=r"feats must have shape \(n=5, D\)"):
        greedy_nms(scores, feats[:4], 2)
    with pytest.raises(ValueError, match=r"scores must have shape \(n,\)"):
        greedy_nms(scores[None], feats, 2)
    with pytest.raises(ValueError, match="neighbours must be a bool tensor"):
        greedy_nms(scores, feats, 2, neighbours=torch.ones(5, 5))
    with pytest.raises(ValueError, match="block must be a positive number"):
        greedy_nms(scores, feats, 2, block=0)


def test_host_loop_stops_after_kth_kept(monkeypatch):
    """Blocks after the k-th kept token are neither gathered nor compared."""
    import pio.nms as nms

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    scores = torch.rand(40, generator=gen, dtype=torch.float64)
    seen = []
    real = nms._normalised
    monkeypatch.setattr(nms, "_normalised", lambda f: seen.append(f.shape[0]) or real(f))
    out = greedy_nms(scores, feats, 3, tau=1.5, block=4)  # nothing is suppressed: the first block suffices
    assert out.tolist() == topk_indices(scores, 3).tolist()
    assert seen == [0, 4]  # the empty kept set, then one block of four candidates


def test_topk_stable_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_indices(scores, 2).tolist() == [1, 2]
    assert topk_indices(scores, 4).tolist() == [1, 2, 3, 4]
    order, rank = stable_rank(scores)
    assert order.tolist() == [1, 2, 4, 3, 0]
    assert rank.tolist() == [4, 0, 1, 3, 2]


def test_float32_and_half_inputs():
    gen = torch.Generator().manual_seed(7)
    feats = _clustered(50, 16, clusters=5, noise=0.3, gen=gen)
    scores = torch.rand(50, generator=gen, dtype=torch.float64)
    tau = 0.8
    # the float32 result may only be compared when no cosine lies near tau: assert the margin
    f = torch.nn.functional.normalize(feats, dim=-1)
    assert ((f @ f.T) - tau).abs().min().item() > 1e-4
    want = greedy_nms(scores, feats, 12, tau).tolist()
    assert greedy_nms(scores.float(), feats.float(), 12, tau).tolist() == want
    out = greedy_nms(scores.half(), feats.half(), 12, tau)  # computed in float32 internally
    assert out.shape == (12,) and out.dtype == torch.long
    assert out.tolist() == sorted(set(out.tolist()))


def test_no_host_sync_in_loop(monkeypatch):
    """on_device=True never reads a tensor value on the host: forbid every Tensor -> Python conversion."""
    gen = torch.Generator().manual_seed(3)
    feats = _clustered(64, 8, clusters=4, noise=0.2, gen=gen)
    scores = torch.rand(64, generator=gen, dtype=torch.float64)
    want = naive_nms(scores.tolist(), feats.tolist(), 20, 0.8)

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside greedy_nms")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    out = greedy_nms(scores, feats, 20, 0.8, on_device=True)
    monkeypatch.undo()
    assert out.tolist() == want


# ------------------------------------------------------------------------------------------ the scorer base class
class _Inputs:
    """A stage's inputs as a scorer method reads them: spans, targets, hidden states, a profile timer."""

    def __init__(self, spans, targets, hidden):
        self.spans, self.targets, self.hidden, self.layer, self.stage = spans, targets, hidden, 1, 0
        self.mask = torch.ones(hidden.shape[:2], dtype=torch.bool)

    def timed(self, name):
        import contextlib

        return contextlib.nullcontext()


def test_scorer_method_keeps_each_samples_top_k():
    """A method that only writes score(): per active sample the top k of its span, ties to the lower index, kept
    indices ascending; samples without an image or within their target are left whole; choose() can add merged
    tokens."""
    from dataclasses import dataclass

    from pio import Schedule, ScorerMethod

    scores = torch.tensor([[9.0, 1.0, 5.0, 5.0, 2.0, 5.0, 0.0, 7.0],
                           [0.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])

    @dataclass(frozen=True)
    class Fixed(ScorerMethod):
        name = "fixed"
        default_layers = (1,)

        def score(self, inputs, active):
            assert list(active) == [True, True, False, False]
            return scores

    hidden = torch.arange(4 * 8 * 2, dtype=torch.float64).view(4, 8, 2)
    inputs = _Inputs([(1, 6), (1, 4), None, (0, 3)], [3, 2, 2, 3], hidden)
    sel = Fixed(Schedule((1,), tokens=(3,))).select(inputs)
    # sample 0: span scores 1,5,5,2,5,0 -> the three 5s (local 1, 2, 4); sample 1: four ties -> the first two
    assert [k.tolist() if k is not None else None for k in sel.keep] == [[1, 2, 4], [0, 1], None, None]
    assert sel.merged is None

    @dataclass(frozen=True)
    class Merging(Fixed):
        def choose(self, inputs, sample, prepared):
            keep, _ = super().choose(inputs, sample, prepared)
            dropped = [j for j in range(sample.length) if j not in keep.tolist()]
            return keep, sample.span(inputs.hidden)[dropped].mean(dim=0, keepdim=True)

    sel = Merging(Schedule((1,), tokens=(3,))).select(inputs)
    assert sel.merged[2] is None and sel.merged[3] is None
    torch.testing.assert_close(sel.merged[0], hidden[0, [1, 4, 6]].mean(dim=0, keepdim=True))  # local 0, 3, 5
    assert Fixed(Schedule((1,), tokens=(3,))).select(_Inputs([None, (0, 3)], [0, 3], hidden[:2])).keep == [None, None]
