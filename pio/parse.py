"""Reading option values written as text: layer lists, token counts, ratios, numbers and switches.

The command line, schedule files and ``key=value`` option strings (an lmms-eval ``--model_args``) all give the
same spellings: ``"1,10,15"``, ``"1 10 15"`` or the authors' Python literal ``"[1, 10, 15]"`` (read with
``ast.literal_eval``, never ``eval``); sequences and numbers pass through.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_bool", "parse_counts", "parse_float", "parse_int", "parse_layers", "parse_ratios", "split_items"]

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def split_items(text: Any, what: str) -> list[Any]:
    """Items of a list option: "1,10,15", "1 10 15", the Python literal "[1, 10, 15]", or a sequence."""
    if isinstance(text, (list, tuple)):
        return list(text)
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [text]
    if not isinstance(text, str):
        raise ValueError(f"cannot parse {what} from {text!r}; use a comma-separated list such as '1,10,15'")
    s = text.strip()
    if not s:
        raise ValueError(f"empty {what}; use a comma-separated list such as '1,10,15'")
    if s[0] in "[(":
        try:
            value = ast.literal_eval(s)  # literals only, never eval()
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"cannot parse {what} from {text!r}: {err}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what} must be a list, got {text!r}")
        return list(value)
    return [p for p in re.split(r"[,\s]+", s) if p]


def parse_int(x: Any, what: str, text: Any = None) -> int:
    """``x`` as an int (a whole float or its text too); ``what`` and ``text`` name it in the error."""
    text = x if text is None else text
    if isinstance(x, bool):
        raise ValueError(f"{what} must be integers, got {text!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        if x.is_integer():
            return int(x)
        raise ValueError(f"{what} must be integers, got {text!r}")
    try:
        return int(str(x))
    except ValueError:
        raise ValueError(f"{what} must be integers, got {text!r}") from None


def parse_float(x: Any, what: str, text: Any = None) -> float:
    """``x`` as a float (its text too); ``what`` and ``text`` name it in the error."""
    text = x if text is None else text
    if isinstance(x, bool):
        raise ValueError(f"{what} must be numbers, got {text!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {text!r}") from None


def parse_bool(x: Any, what: str) -> bool:
    """A switch: a bool, or one of true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(x, bool):
        return x
    s = str(x).strip().lower()
    if s in TRUE or s in FALSE:
        return s in TRUE
    raise ValueError(f"{what} is a switch: give true or false, got {x!r}")


def parse_layers(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse 1-based pruning layers: "1,10,15", "1 10 15" or the authors' "[1,10,15]" (``ast.literal_eval``)."""
    items = split_items(text, "layers")
    if not items:
        raise ValueError(f"empty layers {text!r}; use e.g. '1,10,15'")
    return tuple(parse_int(x, "layers", text) for x in items)


def parse_counts(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse absolute visual-token counts: "218,128,54" or the authors' "[218, 128, 54]"."""
    items = split_items(text, "token counts")
    if not items:
        raise ValueError(f"empty token counts {text!r}; use e.g. '218,128,54'")
    return tuple(parse_int(x, "token counts", text) for x in items)


def parse_ratios(text: str | Sequence[float]) -> tuple[float, ...]:
    """Parse ratios: "0.6,0.35,0.14" or "[0.6003, 0.3519, 0.1436]"."""
    items = split_items(text, "ratios")
    if not items:
        raise ValueError(f"empty ratios {text!r}; use e.g. '0.6,0.35,0.14'")
    return tuple(parse_float(x, "ratios", text) for x in items)
