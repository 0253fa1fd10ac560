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
    paper's "w/ VE" row: a :class:`~pio.encoder.Pipeline`; options go to the in-LLM method). ``family="qwen2_5_vl"``
    gives the method's defaults for that model family (e.g. PIO's layers 1, 8, 14 and current-layer proxy)."""
    from .encoder import EncoderMethod, Pipeline

    names = str(name).split("+")
    if len(names) == 2:
        if "budget" not in kwargs:
            raise ValueError(f"make_method({name!r}) builds the paper's w/ VE row: give budget=B, or build "
                             "pio.encoder.Pipeline(encoder_method, llm_method) yourself")
        pre, llm = get_method(names[0]), get_method(names[1])
        if not (issubclass(pre, EncoderMethod) and not issubclass(llm, EncoderMethod)):
            raise ValueError(f"{name!r}: the first method must act before the language model, the second inside it")
        return Pipeline.from_budget(pre, llm, kwargs.pop("budget"), kwargs.pop("layers", None), **kwargs)
    cls = get_method(name)
    if "budget" in kwargs:
        budget = kwargs.pop("budget")
        if issubclass(cls, EncoderMethod):
            kwargs.pop("family", None)
            return cls.from_budget(budget, **kwargs)
        return cls.from_budget(budget, kwargs.pop("layers", None), **kwargs)
    family = kwargs.pop("family", None)
    return cls(**{**cls.defaults(family)["options"], **kwargs}) if family else cls(**kwargs)
