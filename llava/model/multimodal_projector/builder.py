"""The vision-to-language projector (``model.mm_projector``)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def build_vision_projector(cfg: Any) -> nn.Module:
    """``linear``, ``mlp{N}x_gelu`` (LLaVA-1.5/1.6 use ``mlp2x_gelu``) or ``identity``.

    Module indices match the official checkpoints: ``mm_projector.0`` and ``mm_projector.2`` for mlp2x_gelu.
    """
    kind = getattr(cfg, "mm_projector_type", "linear")
    d_in, d_out = cfg.mm_hidden_size, cfg.hidden_size
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "identity":
        return nn.Identity()
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m:
        layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
        for _ in range(int(m.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown mm_projector_type {kind!r}; allowed: linear, identity, mlp<N>x_gelu (e.g. mlp2x_gelu)")
