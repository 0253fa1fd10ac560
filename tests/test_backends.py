"""Every attention backend takes the same path through pruning and cached decoding.

FlashAttention-2 cannot run on a CPU; its code path is exercised by standing in a reference implementation
with flash-attn's contract (2D padding mask, causal, queries aligned to the end of the keys) for transformers'
``flash_attention_2`` entry, so our mask plumbing for that backend is what gets tested.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pio import PIOConfig, PruneState, Schedule
from pio.proxy import causal_padding_bias
from tests.helpers import image, load, pixels, prompt_ids


def fa2_stand_in(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attn semantics on CPU: ``attention_mask`` is None or (B, K) 0/1; causal, bottom-right aligned."""
    assert attention_mask is None or attention_mask.dim() == 2, "FA2 gets the 2D padding mask"
    B, _, q, _ = query.shape
    K = key.shape[2]
    mask = attention_mask.bool() if attention_mask is not None else torch.ones(B, K, dtype=torch.bool)
    bias = causal_padding_bias(mask, torch.arange(K - q, K).expand(B, q), query.dtype)
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=bias, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture()
def fa2_emulated(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fa2_stand_in)


def test_pruned_generation_same_on_every_backend(tiny_v15, fa2_emulated):
    tok, model, proc, _ = load(tiny_v15)
    model = model.to(torch.float64)
    imgs = [image(500, 400, seed=21), image(280, 420, seed=22)]
    seqs = [prompt_ids(tok, "What is in the picture?"), prompt_ids(tok, "Count the red things, please.")]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, s in enumerate(seqs):  # left padding, as generation needs
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    x = pixels(imgs, proc, model).to(torch.float64)
    results = {}
    for impl in ("sdpa", "eager", "flash_attention_2"):
        model.config._attn_implementation = impl
        for proxy_impl in ("sliced", "full"):
            model.enable_pio(PIOConfig(Schedule(layers=(1, 3), tokens=(150, 40)), proxy_impl=proxy_impl))
            st = PruneState()
            out = model.generate(ids, images=x, attention_mask=mask, do_sample=False, max_new_tokens=5,
                                 min_new_tokens=5, prune_state=st, output_logits=True, return_dict_in_generate=True)
            results[impl, proxy_impl] = (
                out.sequences.tolist(), [[s.kept for s in smp.stages] for smp in st.samples],
                torch.stack(out.logits),
            )
    model.disable_pio()
    model.config._attn_implementation = "sdpa"
    model.to(torch.float32)
    ref = results["sdpa", "sliced"]
    assert len(ref[1][0]) == 2 and len(ref[1][0][1]) == 40
    for key, (seq, kept, logits) in results.items():
        assert seq == ref[0], key
        assert kept == ref[1], key
        torch.testing.assert_close(logits, ref[2], atol=1e-5, rtol=1e-5)  # eager softmaxes in fp32


def test_backend_masks(tiny_v15):
    _, model, _, _ = load(tiny_v15)
    lm = model.get_model()
    key = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    model.config._attn_implementation = "flash_attention_2"
    assert torch.equal(lm._backend_mask(key, 4, torch.float32), key.long())
    assert lm._backend_mask(torch.ones(2, 4, dtype=torch.bool), 4, torch.float32) is None
    model.config._attn_implementation = "sdpa"
    assert lm._backend_mask(torch.ones(2, 4, dtype=torch.bool), 4, torch.float32) is None  # is_causal
    m = lm._backend_mask(key, 2, torch.float32)  # two queries at the end of four keys
    assert m.shape == (2, 1, 2, 4)
    allowed = (m == 0)[:, 0]
    assert allowed[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert allowed[1].tolist() == [[True, True, True, False], [True, True, True, True]]
    pad_query = lm._backend_mask(key, 4, torch.float32)[0, 0, 0]  # a padding query sees everything (no NaN)
    assert bool((pad_query == 0).all())
    model.config._attn_implementation = "eager"
    assert lm._backend_mask(torch.ones(1, 3, dtype=torch.bool), 3, torch.float32) is not None  # eager needs it
