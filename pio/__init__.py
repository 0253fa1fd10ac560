"""PIO-FVLM: training-free visual-token selection inside the language model (arXiv 2602.04657).

The package depends on torch only. A model calls :func:`pio.select.select_visual_tokens` after configured
decoder layers during prefill, and :mod:`pio.gather` to shorten the sequence; :mod:`pio.schedule` says where
and how much, :mod:`pio.flops` accounts for the cost.
"""

from .schedule import Schedule, preset, schedule_from_args
from .select import PIOConfig, select_visual_tokens
from .state import PruneState

__all__ = ["PIOConfig", "PruneState", "Schedule", "preset", "schedule_from_args", "select_visual_tokens"]
