"""Every reduction method, registered by name. A new method adds its class here (its registry entry)."""

from ..registry import register
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .holov import HoloV
from .pdrop import PDrop
from .pio import PIO
from .random import Random
from .scan import Scan
from .scope import SCOPE
from .sparsevlm import SparseVLM
from .vflowopt import VFlowOpt, VFlowOptViT
from .visiondrop import VisionDrop
from .visionzip import VisionZip

METHODS = (PIO, FastV, PDrop, SparseVLM, DART, Random, VisionZip, HoloV, SCOPE, DivPrune, Scan, VisionDrop,
           VFlowOpt, VFlowOptViT)

for _cls in METHODS:
    register(_cls)

__all__ = ["DART", "METHODS", "PIO", "SCOPE", "DivPrune", "FastV", "HoloV", "PDrop", "Random", "Scan", "SparseVLM",
           "VFlowOpt", "VFlowOptViT", "VisionDrop", "VisionZip"]
