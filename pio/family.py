"""What a reduction method reads of the model family it runs on, without importing the model code.

The model side (``llava.model.families``) registers one object per family; ``pio`` knows them only through
the :class:`ModelFamily` protocol: a name (the key of a method's :attr:`~pio.base.ReductionMethod.family_defaults`,
the authors' per-family settings) and the options every method takes on that family (Qwen2.5-VL: kept tokens
keep their original M-RoPE ids, ``positions="original"``). A method's defaults for a family are both
(:meth:`pio.base.ReductionMethod.defaults`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["ModelFamily", "family_names", "model_family", "register_model_family"]


@runtime_checkable
class ModelFamily(Protocol):
    """A model family as the methods see it.

    Attributes:
        name: the family's name (``"llava"``, ``"qwen2_5_vl"``).
        method_options: options every method takes on this family unless told otherwise, e.g.
            ``{"positions": "original"}`` where positions are the model's own (M-RoPE) ids.
    """

    name: str
    method_options: Mapping[str, Any]


_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> None:
    """Make ``family`` known by its name (``llava.model.families.register_family`` does this for every family)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"a model family needs a name and method_options, got {type(family).__name__}")
    _FAMILIES[family.name] = family


def family_names() -> list[str]:
    """The names of the registered families."""
    return list(_FAMILIES)


def model_family(family: str | ModelFamily | None) -> ModelFamily | None:
    """``family`` as a :class:`ModelFamily`: a registered name is looked up; None stays None (no family: the
    methods' published setting). An unknown name raises, listing the known ones."""
    if family is None or isinstance(family, ModelFamily):
        return family
    if family not in _FAMILIES:
        known = ", ".join(_FAMILIES) or "none registered (import llava.model.families)"
        raise ValueError(f"unknown model family {family!r}; known families: {known}")
    return _FAMILIES[family]
