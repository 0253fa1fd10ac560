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


TINY_SEEDS = {"llava-v1.5": 0, "llava-v1.6": 1, "qwen2_5_vl": 2, "llava-onevision": 3}
"""The test entry of every family variant: the seed of its tiny checkpoint (a new family adds its variants)."""


class _Checkpoints(dict):
    """``{variant: path}`` of tiny checkpoints, each written the first time it is asked for."""

    def __init__(self, root):
        from llava.model.families import variants

        super().__init__()
        self.root, self.families = root, variants()

    def __missing__(self, variant: str) -> str:
        family = self.families[variant]
        self[variant] = str(family.write_tiny(self.root / f"{variant}-tiny", variant, seed=TINY_SEEDS[variant]))
        return self[variant]

    def all(self) -> dict[str, str]:
        return {v: self[v] for v in self.families}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> _Checkpoints:
    """``{variant: path}``: a tiny checkpoint of every variant of every registered family (``.all()``), each
    written once, when first asked for."""
    return _Checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def tiny_v15_deep(tmp_path_factory) -> str:
    """A tiny LLaVA-1.5 with the 7B model's 32 decoder layers, so the paper's budgets solve as they do there."""
    from llava.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny-32", "llava-v1.5", seed=0,
                                     layers=32))


@pytest.fixture(scope="session")
def tiny_v15(tiny_checkpoints) -> str:
    return tiny_checkpoints["llava-v1.5"]


@pytest.fixture(scope="session")
def tiny_v16(tiny_checkpoints) -> str:
    return tiny_checkpoints["llava-v1.6"]


@pytest.fixture(scope="session")
def tiny_qwen(tiny_checkpoints) -> str:
    return tiny_checkpoints["qwen2_5_vl"]


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """``{variant: (tokenizer, model, processor)}`` (``"llava-v1.5"``, ``"llava-v1.6"``, ``"qwen2_5_vl"``)
    loaded once per test module."""
    from tests.helpers import load

    out = {}
    for name, path in tiny_checkpoints.all().items():
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
