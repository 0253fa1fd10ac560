"""Training-free visual-token reduction inside (and before) the language model of a VLM.

The package depends on torch only. Every method (:mod:`pio.methods`: PIO-FVLM and the comparison methods) is a
small class behind one interface (:mod:`pio.base`), registered by name (:mod:`pio.registry`). A model hands a
method what it declared it needs at each of its stages and applies the kept positions with :mod:`pio.gather`;
:mod:`pio.schedule` and :mod:`pio.budget` say where and how much, :mod:`pio.build` turns a method name and
its options into a reducer (:mod:`pio.cli`: from runner flags), :mod:`pio.flops` accounts for the cost.
"""

from .base import ReductionMethod, SampleScores, ScorerMethod, Selection, StageInputs
from .budget import Anchors
from .build import build_reducer
from .methods import PIO
from .registry import get_method, make_method, method_names, register
from .schedule import PAPER_N0, Schedule
from .state import PruneState

__all__ = [
    "PAPER_N0",
    "PIO",
    "Anchors",
    "PruneState",
    "ReductionMethod",
    "SampleScores",
    "Schedule",
    "ScorerMethod",
    "Selection",
    "StageInputs",
    "build_reducer",
    "get_method",
    "make_method",
    "method_names",
    "register",
]
