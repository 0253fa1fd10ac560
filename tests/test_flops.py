"""Tests for pio.flops: every formula by hand, the paper's baselines, KV-cache accounting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pio.flops import (
    VICUNA_7B,
    LMDims,
    clip_vision_flops,
    exact_layer_flops,
    exact_prefill_flops,
    fastv_layer_flops,
    fastv_prefill_flops,
    fastv_proxy_flops,
    kv_cache_bytes,
    measured_kv_bytes,
    projector_flops,
    proxy_flops,
    seq_lens_per_layer,
)

D, M = 4096, 11008
TINY = LMDims(
    hidden_size=8, intermediate_size=20, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=2, vocab_size=50
)


def test_fastv_layer_by_hand():
    # n=2, d=3, m=5: 4*2*9 + 2*4*3 + 2*2*3*5 = 72 + 24 + 60
    assert fastv_layer_flops(2, 3, 5) == 156


def test_fastv_paper_baselines():
    assert 32 * fastv_layer_flops(576, D, M) == pytest.approx(2.986e12, rel=1e-3)
    assert 32 * fastv_layer_flops(2880, D, M) == pytest.approx(16.67e12, rel=1e-3)
    assert fastv_prefill_flops([576] * 32, VICUNA_7B) == 32 * fastv_layer_flops(576, D, M)


def test_fastv_paper_pruned_llava15():
    # §6.1: [1,10,15]/[92,54,22] -> 0.326 T without proxy, 0.442 T with one proxy forward per event
    lens = seq_lens_per_layer(576, [(1, 576 - 92), (10, 92 - 54), (15, 54 - 22)], 32)
    assert lens == [576] + [92] * 9 + [54] * 5 + [22] * 17
    plain = fastv_prefill_flops(lens, VICUNA_7B)
    assert plain == pytest.approx(0.326e12, rel=2e-3)
    extra = sum(fastv_proxy_flops(n, VICUNA_7B)["forward"] for n in (576, 92, 54))
    assert plain + extra == pytest.approx(0.442e12, rel=2e-3)
    p = fastv_proxy_flops(576, VICUNA_7B, gamma=2.0)
    assert p["backward"] == 2 * p["forward"] and p["total"] == 3 * p["forward"]


def test_seq_lens_per_layer():
    assert seq_lens_per_layer(10, [], 4) == [10, 10, 10, 10]
    assert seq_lens_per_layer(10, [(2, 3)], 4) == [10, 10, 7, 7]
    assert seq_lens_per_layer(10, [(3, 1), (1, 4), (1, 1)], 4) == [10, 5, 5, 4]
    assert seq_lens_per_layer(10, [(4, 2)], 4) == [10, 10, 10, 10]  # after the last layer: no effect
    with pytest.raises(ValueError, match=r"allowed 1\.\.4"):
        seq_lens_per_layer(10, [(5, 1)], 4)
    with pytest.raises(ValueError, match="more than the 10 tokens"):
        seq_lens_per_layer(10, [(1, 6), (2, 5)], 4)


def test_exact_layer_by_hand():
    # TINY: d=8, q = 4*2 = 8, kv = 2*2 = 4, m=20; n=3 new after 2 past
    out = exact_layer_flops(3, 2, TINY)
    assert out["q_proj"] == 2 * 3 * 8 * 8 == 384
    assert out["k_proj"] == out["v_proj"] == 2 * 3 * 8 * 4 == 192
    assert out["o_proj"] == 384
    keys = 3 + 4 + 5  # query i attends 2 + i + 1 keys
    assert out["attn_scores"] == out["attn_values"] == 2 * 2 * 4 * keys == 192
    assert out["mlp"] == 3 * 2 * 3 * 8 * 20 == 2880
    assert out["total"] == 384 + 192 + 192 + 384 + 192 + 192 + 2880


def test_exact_prefill_by_hand():
    out = exact_prefill_flops([3, 2, 2], TINY, head_rows=1)
    layer = [exact_layer_flops(n, 0, TINY)["total"] for n in (3, 2, 2)]
    assert out["lm_head"] == 2 * 1 * 8 * 50
    assert out["total"] == sum(layer) + 800
    assert out["mlp"] == 3 * 2 * (3 + 2 + 2) * 8 * 20
    # causal triangle without past: n(n+1)/2 keys
    assert out["attn_scores"] == 2 * 2 * 4 * (6 + 3 + 3)
    assert exact_prefill_flops([3, 2, 2], TINY, head_rows=3)["lm_head"] == 2 * 3 * 8 * 50
    with pytest.raises(ValueError, match="3-layer model"):
        exact_prefill_flops([3, 2], TINY)
    # the exact convention counts SwiGLU's 3 matrices: larger than FastV for LLaVA-1.5
    assert exact_prefill_flops([576] * 32, VICUNA_7B)["total"] > fastv_prefill_flops([576] * 32, VICUNA_7B)


def test_proxy_flops_by_hand():
    s, r = 6, 2
    full = proxy_flops(s, r, TINY, sliced=False)
    layer = exact_layer_flops(s, 0, TINY)
    attn = layer["attn_scores"] + layer["attn_values"]
    head = 2 * r * 8 * 50
    assert full["layer_forward"] == layer["total"]
    assert full["head_forward"] == full["head_backward"] == head
    assert full["layer_backward"] == layer["total"] + attn  # linears once, attention twice
    assert full["forward"] == layer["total"] + head
    assert full["total"] == full["forward"] + full["backward"]

    sl = proxy_flops(s, r, TINY, sliced=True)
    q_proj = 2 * r * 8 * 8
    k_proj = 2 * s * 8 * 4  # keys for all positions; values are never projected over S
    v_heads = 2 * (4 * r) * 2 * 8  # 4 heads x 2 rows weighted inputs (d=8) through each head's 2x8 values
    o_proj = 2 * r * 8 * 8
    mlp = 3 * 2 * r * 8 * 20
    scores = 2 * (4 * r) * s * 2  # 4 heads x 2 rows against all 6 keys, head_dim 2
    weighted = 2 * (4 * r) * s * 8  # attention weights (4 heads x 2 rows, 6 keys) times LN(x) (d=8)
    attention = scores + weighted
    lin = q_proj + k_proj + v_heads + o_proj + mlp
    assert sl["layer_forward"] == lin + attention
    assert sl["layer_backward"] == lin + 2 * attention
    assert sl["total"] < full["total"]
    with pytest.raises(ValueError, match="rows must be in"):
        proxy_flops(4, 5, TINY, sliced=True)


def test_clip_and_projector_by_hand():
    # image 4, patch 2 -> 4 patches, N = 5 tokens; hidden 3, mlp 6, 2 layers, 2 crops
    out = clip_vision_flops(image_size=4, patch_size=2, hidden=3, intermediate=6, layers=2, num_crops=2)
    assert out["patch_embed"] == 2 * (2 * 4 * 3 * 2 * 2 * 3)
    assert out["attn_proj"] == 2 * (2 * 4 * 2 * 5 * 3 * 3)
    assert out["attention"] == 2 * (2 * 2 * 2 * 5 * 5 * 3)
    assert out["mlp"] == 2 * (2 * 2 * 2 * 5 * 3 * 6)
    assert out["total"] == out["patch_embed"] + out["attn_proj"] + out["attention"] + out["mlp"]
    # CLIP ViT-L/14-336 is about 0.35 TFLOPs per crop
    assert 0.3e12 < clip_vision_flops()["total"] < 0.4e12
    assert projector_flops(5, 3, 4, "linear") == 2 * 5 * 3 * 4
    assert projector_flops(5, 3, 4, "mlp2x_gelu") == 2 * 5 * 3 * 4 + 2 * 5 * 4 * 4
    with pytest.raises(ValueError, match="allowed: linear, mlp2x_gelu"):
        projector_flops(5, 3, 4, "identity")


def test_kv_cache_bytes():
    # LLaMA-7B fp16: 32 layers * 2 * 4096 * 2 B = 0.5 MiB per token
    assert kv_cache_bytes([1] * 32, VICUNA_7B, 2) == 32 * 2 * 4096 * 2 == 512 * 1024
    # README: 636 tokens ~ 318 MiB-ish (MB)
    assert kv_cache_bytes([636] * 32, VICUNA_7B) / 2**20 == pytest.approx(318.0)
    assert kv_cache_bytes([3, 2, 1], TINY, 4) == (3 + 2 + 1) * 2 * 2 * 2 * 4


def test_from_config():
    cfg = SimpleNamespace(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    assert LMDims.from_config(cfg) == VICUNA_7B
    qwen = SimpleNamespace(
        text_config=SimpleNamespace(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            head_dim=None,
        )
    )
    dims = LMDims.from_config(qwen)
    assert (dims.num_kv_heads, dims.head_dim, dims.num_layers) == (4, 128, 28)
    # Qwen2.5-VL-7B bf16: 28 layers * 2 * 4 * 128 * 2 B = 56 KiB per token
    assert kv_cache_bytes([1] * 28, dims, 2) == 56 * 1024
    with pytest.raises(ValueError, match="lacks intermediate_size"):
        LMDims.from_config(
            SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5)
        )


def test_from_transformers_config():
    from transformers import LlamaConfig, LlavaConfig

    llama = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
    )
    dims = LMDims.from_config(llama)
    assert dims == LMDims(32, 64, 2, 4, 2, 8, 99)
    assert LMDims.from_config(LlavaConfig(text_config=llama.to_dict())) == dims


def test_measured_kv_bytes_duck_typed():
    k = torch.zeros(1, 2, 5, 4, dtype=torch.float16)
    v = torch.zeros(1, 2, 5, 4, dtype=torch.float16)
    per_layer = 2 * 1 * 2 * 5 * 4 * 2
    layers = SimpleNamespace(
        layers=[SimpleNamespace(keys=k, values=v), SimpleNamespace(keys=None, values=None)]
    )
    assert measured_kv_bytes(layers) == per_layer
    old = SimpleNamespace(key_cache=[k, k], value_cache=[v, v])
    assert measured_kv_bytes(old) == 2 * per_layer
    assert measured_kv_bytes(((k, v), (k[:, :, :2], v[:, :, :2]))) == per_layer + per_layer * 2 // 5
    assert measured_kv_bytes(None) == 0
    with pytest.raises(TypeError, match="cannot measure"):
        measured_kv_bytes(object())


def test_measured_kv_bytes_real_dynamic_cache():
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, n in enumerate((7, 3)):  # per-layer lengths differ after pruning
        kv = torch.zeros(1, 2, n, 8, dtype=torch.float32)
        cache.update(kv, kv.clone(), layer)
    dims = LMDims(16, 32, 2, 2, 2, 8, 10)
    assert measured_kv_bytes(cache) == kv_cache_bytes([7, 3], dims, 4) == (7 + 3) * 2 * 2 * 8 * 4
