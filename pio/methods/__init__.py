"""Every reduction method, registered by name. A new method adds its class here (its registry entry)."""

from ..registry import register
from .dart import DART
from .fastv import FastV
from .pdrop import PDrop
from .pio import PIO
from .random import Random
from .sparsevlm import SparseVLM

METHODS = (PIO, FastV, PDrop, SparseVLM, DART, Random)

for _cls in METHODS:
    register(_cls)

__all__ = ["DART", "METHODS", "PIO", "FastV", "PDrop", "Random", "SparseVLM"]
