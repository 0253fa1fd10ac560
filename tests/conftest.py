"""Shared fixtures: tiny checkpoints in the official layout, written once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# file digests of the run identities (llava.eval.fingerprint) cached per test session, not in the user's cache
if "PIO_FVLM_CACHE" not in os.environ:
    os.environ["PIO_FVLM_CACHE"] = tempfile.mkdtemp(prefix="pio-fvlm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PIO_FVLM_CACHE"], True)


@pytest.fixture(scope="session")
def tiny_v15(tmp_path_factory) -> str:
    from llava.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny", "llava-v1.5", seed=0))


@pytest.fixture(scope="session")
def tiny_v16(tmp_path_factory) -> str:
    from llava.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-v1.6-tiny", "llava-v1.6", seed=1))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    from llava.model.tiny_qwen import write_tiny_qwen_checkpoint

    return str(write_tiny_qwen_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2.5-vl-tiny", seed=2))


@pytest.fixture(scope="module")
def models(tiny_v15, tiny_v16, tiny_qwen):
    """``{"v15": (tokenizer, model, processor), "v16": ..., "qwen": ...}`` loaded once per test module."""
    from tests.helpers import load

    out = {}
    for name, path in (("v15", tiny_v15), ("v16", tiny_v16), ("qwen", tiny_qwen)):
        tok, model, proc, _ = load(path)
        out[name] = (tok, model, proc)
    return out


def fa2_stand_in(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attn semantics on CPU: ``attention_mask`` is None or (B, K) 0/1; causal, bottom-right aligned."""
    from pio.proxy import causal_padding_bias

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
    """transformers' ``flash_attention_2`` entry served by :func:`fa2_stand_in` for this test."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fa2_stand_in)
