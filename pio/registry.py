"""The registry of reduction methods: one name per method class, duplicates refused."""

from __future__ import annotations

from typing import Any

from .base import ReductionMethod

__all__ = ["get_method", "make_method", "method_names", "register"]

_METHODS: dict[str, type[ReductionMethod]] = {}


def register(cls: type[ReductionMethod]) -> type[ReductionMethod]:
    """Add a method class under ``cls.name``; a second class with the same name raises."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method class {cls.__name__} needs a lower-case alphanumeric name, got {name!r}")
    if name in ("none", "all"):
        raise ValueError(f"method name {name!r} is reserved")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_METHODS[name].__qualname__})")
    _METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> type[ReductionMethod]:
    """The class registered as ``name``; an unknown name raises listing the known ones."""
    key = str(name).strip().lower()
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[key]


def make_method(name: str, **kwargs: Any) -> Any:
    """An instance of the method ``name``: ``make_method("fastv", budget=64)`` (a paper budget label, solved with
    the method's published shape), ``make_method("pio", schedule=Schedule(...), tau=0.8)``,
    ``make_method("visionzip", budget=64)`` (tokens per crop), or ``make_method("scan+pio", budget=64)`` (the
    paper's "w/ VE" row: a :class:`~pio.encoder.Pipeline`; options go to the method that has them).
    ``family="qwen2_5_vl"`` gives the method's defaults for that model family (e.g. PIO's layers 1, 8, 14 and
    current-layer proxy). The keyword arguments are :func:`pio.build.build_reducer`'s options."""
    from .build import build_reducer

    family = kwargs.pop("family", None)
    if "+" in str(name) and "budget" not in kwargs and "pre_tokens" not in kwargs:
        raise ValueError(f"make_method({name!r}) builds the paper's w/ VE row: give budget=B, or pre_tokens=T with the "
                         "in-LLM method's target, or build pio.encoder.Pipeline(encoder_method, llm_method) yourself")
    return build_reducer(name, kwargs, family=family)
