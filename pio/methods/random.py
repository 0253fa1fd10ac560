"""Random: the sanity floor. Each stage keeps a seeded random subset of the visual tokens.

By default on PIO's stages and budget schedules (layers 1, 10, 15; :mod:`pio.methods.pio`), so it is the floor
of exactly PIO's schedule; ``--layers`` moves it (``--layers 2`` for FastV's or DART's). The subset of a sample
depends only on ``--random-seed``, the stage's layer and the span length: the same in a batch as alone, and the
same for two images with equally many visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Flag, ReductionMethod, Selection, StageInputs, active_samples
from ..budget import same_share_of_depth
from ..schedule import Schedule
from .pio import ANCHORS as PIO_ANCHORS


def random_subset(n: int, k: int, seed: int, layer: int, device: torch.device) -> torch.Tensor:
    """``k`` of ``range(n)``, ascending, drawn with a generator seeded by (seed, layer, n)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer) * 1_000_033 + n)
    return torch.sort(torch.randperm(n, generator=g)[:k]).values.to(device)


@dataclass(frozen=True)
class Random(ReductionMethod):
    """A seeded random subset at every stage."""

    name = "random"
    default_layers = PIO_ANCHORS.layers
    family_defaults = {"llava_onevision": {"layers": same_share_of_depth(PIO_ANCHORS.layers, 28)}}  # PIO's: 1, 9, 13
    anchors = PIO_ANCHORS
    source = "sanity floor (UniPruneBench, DART's and others' random baselines); PIO's schedules"
    flags = (Flag("seed", "random-seed", int, "seed of the random subsets (0)"),)

    schedule: Schedule
    positions: str = "renumber"
    seed: int = 0

    def select(self, inputs: StageInputs) -> Selection:
        active = active_samples(inputs)
        keep = [random_subset(s[1], k, self.seed, inputs.layer, inputs.hidden.device) if a else None
                for s, k, a in zip(inputs.spans, inputs.targets, active)]
        return Selection(keep)
