"""Shared fixtures: tiny checkpoints in the official layout, written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_v15(tmp_path_factory) -> str:
    from llava.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny", "llava-v1.5", seed=0))


@pytest.fixture(scope="session")
def tiny_v16(tmp_path_factory) -> str:
    from llava.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-v1.6-tiny", "llava-v1.6", seed=1))
