"""Every attention backend takes the same path through pruning and cached decoding.

FlashAttention-2 cannot run on a CPU; its code path is exercised by standing in a reference implementation
with flash-attn's contract (2D padding mask, causal, queries aligned to the end of the keys) for transformers'
``flash_attention_2`` entry (the ``fa2_emulated`` fixture, ``tests/conftest.py``), so our mask plumbing for that
backend is what gets tested. Every method's kept tokens across backends: ``tests/test_methods.py``.
"""

from __future__ import annotations

import torch

from llava.model.pruning import backend_mask
from pio import PIO, PruneState, Schedule
from tests.helpers import left_padded_pair, load


def test_pruned_generation_same_on_every_backend(tiny_v15, fa2_emulated):
    tok, model, proc, _ = load(tiny_v15)
    model = model.to(torch.float64)
    ids, mask, x = left_padded_pair(tok, proc, model)
    results = {}
    for impl in ("sdpa", "eager", "flash_attention_2"):
        model.config._attn_implementation = impl
        for proxy_impl in ("sliced", "full"):
            pio = PIO(Schedule(layers=(1, 3), tokens=(150, 40)), proxy_impl=proxy_impl)
            st = PruneState()
            out = model.generate(ids, images=x, attention_mask=mask, do_sample=False, max_new_tokens=5,
                                 min_new_tokens=5, reducer=pio, prune_state=st, output_logits=True,
                                 return_dict_in_generate=True)
            results[impl, proxy_impl] = (
                out.sequences.tolist(), [[s.kept for s in smp.stages] for smp in st.samples],
                torch.stack(out.logits),
            )
    model.config._attn_implementation = "sdpa"
    model.to(torch.float32)
    ref = results["sdpa", "sliced"]
    assert len(ref[1][0]) == 2 and len(ref[1][0][1]) == 40
    for key, (seq, kept, logits) in results.items():
        assert seq == ref[0], key
        assert kept == ref[1], key
        torch.testing.assert_close(logits, ref[2], atol=1e-5, rtol=1e-5)  # eager softmaxes in fp32


def test_backend_masks():
    key = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    ones = torch.ones(2, 4, dtype=torch.bool)
    assert torch.equal(backend_mask("flash_attention_2", key, 4, torch.float32), key.long())
    assert backend_mask("flash_attention_2", ones, 4, torch.float32) is None
    assert backend_mask("sdpa", ones, 4, torch.float32) is None  # is_causal
    m = backend_mask("sdpa", key, 2, torch.float32)  # two queries at the end of four keys
    assert m.shape == (2, 1, 2, 4)
    allowed = (m == 0)[:, 0]
    assert allowed[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert allowed[1].tolist() == [[True, True, True, False], [True, True, True, True]]
    pad_query = backend_mask("sdpa", key, 4, torch.float32)[0, 0, 0]  # a padding query sees everything (no NaN)
    assert bool((pad_query == 0).all())
    assert backend_mask("eager", torch.ones(1, 3, dtype=torch.bool), 3, torch.float32) is not None  # eager needs it
