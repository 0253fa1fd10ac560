"""Small shared utilities: the one guard for optional dependencies."""

from __future__ import annotations

import importlib.util


def require_flash_attn() -> None:
    """Raise a clear error when FlashAttention-2 is requested but not installed (CPU machines cannot build it)."""
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only): "
            "pip install -e '.[gpu]', or use --attn-implementation sdpa/eager"
        )
