"""Command-line flags for every reduction method, and building the method they describe.

Every runner, the bench and the scripts share these flags (``add_method_args``):

``--method NAME``            a registered method (``pio``, ``fastv``, ...) or ``none``
``--budget B``               the paper's budget label: average visual tokens per decoder layer as a share of
                             576 (exactly B on LLaVA-1.5; the same share of each image's tokens on LLaVA-NeXT),
                             solved into per-stage counts with the method's published shape
``--budget-ratio R``         that average as a fraction of each sample's visual tokens
``--budget-tokens N``        that average as an absolute number of tokens
``--layers L1,L2,...``       1-based layers after which the method acts (default: its published layers)
``--tokens C1,C2,...``       explicit visual tokens kept after each layer
``--ratios R1,R2,...``       or fractions (``--ratio-mode initial|current``)

plus each method's own flags (``--pio-tau``, ``--dart-pivots``, ...; :attr:`pio.base.ReductionMethod.flags`).
The authors' spellings are aliases: ``--layer_list``, ``--image_token_list``, ``--image_token_ratio_list``,
``--visual_token_num`` (576 only), and PIO's ``--pio-layers``, ``--pio-tokens``, ``--pio-ratios``,
``--pio-ratio-mode``, ``--pio-budget`` (absolute), ``--pio-budget-ratio`` and ``--pio-preset B`` (= ``--method
pio --budget B``). Schedule flags without ``--method`` select PIO, as they did before other methods existed.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Sequence
from typing import Any

from .base import POSITIONS, ReductionMethod
from .registry import get_method, method_names
from .schedule import PAPER_N0, RATIO_MODES

__all__ = [
    "EncoderReductionNotImplementedError",
    "add_method_args",
    "method_from_args",
    "parse_counts",
    "parse_layers",
    "parse_ratios",
]


class EncoderReductionNotImplementedError(NotImplementedError, ValueError):
    """Raised for ``--visual_token_num`` other than 576 (encoder-side reduction is not implemented yet)."""


def _split(text: Any, what: str) -> list[Any]:
    """Items of a CLI list: "1,10,15", "1 10 15", the Python-literal "[1, 10, 15]", or a sequence."""
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


def _to_int(x: Any, what: str, text: Any) -> int:
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


def _to_float(x: Any, what: str, text: Any) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{what} must be numbers, got {text!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {text!r}") from None


def parse_layers(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse 1-based pruning layers: "1,10,15", "1 10 15" or the authors' "[1,10,15]" (``ast.literal_eval``)."""
    items = _split(text, "layers")
    if not items:
        raise ValueError(f"empty layers {text!r}; use e.g. '1,10,15'")
    return tuple(_to_int(x, "layers", text) for x in items)


def parse_counts(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse absolute visual-token counts: "218,128,54" or the authors' "[218, 128, 54]"."""
    items = _split(text, "token counts")
    if not items:
        raise ValueError(f"empty token counts {text!r}; use e.g. '218,128,54'")
    return tuple(_to_int(x, "token counts", text) for x in items)


def parse_ratios(text: str | Sequence[float]) -> tuple[float, ...]:
    """Parse ratios: "0.6,0.35,0.14" or "[0.6003, 0.3519, 0.1436]"."""
    items = _split(text, "ratios")
    if not items:
        raise ValueError(f"empty ratios {text!r}; use e.g. '0.6,0.35,0.14'")
    return tuple(_to_float(x, "ratios", text) for x in items)


# (dest, flags, help) of the generic schedule flags; PIO's spellings keep their own dests so a PIO flag given
# with another --method is caught.
_SCHEDULE_FLAGS = (
    ("layers", ("--layers", "--layer_list"), "1-based layers after which the method acts, e.g. 1,10,15 "
                                              "(default: the method's published layers)"),
    ("tokens", ("--tokens", "--image_token_list"), "visual tokens kept after each layer, e.g. 92,54,22"),
    ("ratios", ("--ratios", "--image_token_ratio_list"), "fractions kept after each layer, e.g. 0.5,0.25,0.125"),
    ("budget_tokens", ("--budget-tokens",), "average visual tokens per decoder layer, absolute"),
    ("budget_ratio", ("--budget-ratio",), "average visual tokens per layer as a fraction of each sample's"),
)
_PIO_ALIASES = (
    ("layers", "--pio-layers"), ("tokens", "--pio-tokens"), ("ratios", "--pio-ratios"),
    ("ratio_mode", "--pio-ratio-mode"), ("budget_tokens", "--pio-budget"), ("budget_ratio", "--pio-budget-ratio"),
    ("budget", "--pio-preset"),
)


def _method_dest(method: str, field: str) -> str:
    return f"m_{method}__{field}"


def add_method_args(p: argparse.ArgumentParser) -> None:
    """Add the reduction flags (module docstring) to a runner's parser; all default to None ("not given")."""
    g = p.add_argument_group("visual-token reduction (omit all to run the unpruned model)")
    g.add_argument("--method", default=None, metavar="NAME",
                   help=f"reduction method: {', '.join(method_names())} or none (default: none, or pio when "
                        "schedule flags are given)")
    g.add_argument("--budget", default=None, metavar="B",
                   help=f"the paper's budget: average visual tokens per layer out of {PAPER_N0} (64, 128, 192), "
                        "solved into per-stage counts the way the method's authors do")
    for dest, names, text in _SCHEDULE_FLAGS:
        g.add_argument(*names, dest=dest, default=None, help=text)
    g.add_argument("--ratio-mode", default=None, choices=RATIO_MODES,
                   help="--ratios of the initial count (default) or of the previous stage's")
    g.add_argument("--positions", default=None, choices=POSITIONS,
                   help="positions after a prune: renumbered over the kept tokens, or the original ones (default: "
                        "the method's authors' choice)")
    g.add_argument("--visual_token_num", default=None,
                   help="authors' alias; only 576 (no encoder-side reduction) is supported yet")
    g.add_argument("--pio-log", "--reduction-log", dest="pio_log", default=None,
                   help="one JSON line per sample: visual counts per stage, kept positions, realised average")
    pio = p.add_argument_group("PIO's spellings of the schedule flags (imply --method pio)")
    for field, flag in _PIO_ALIASES:
        kw: dict[str, Any] = {"choices": RATIO_MODES} if field == "ratio_mode" else {}
        pio.add_argument(flag, dest=f"pio_alias__{field}", default=None, metavar=field.split("_")[-1].upper(),
                         help="= --method pio --budget B (the paper's 64, 128, 192)" if flag == "--pio-preset"
                         else f"= --{field.replace('_', '-')} with --method pio", **kw)
    for name in method_names():
        cls = get_method(name)
        if not cls.flags:
            continue
        mg = p.add_argument_group(f"method {name}")
        for f in cls.flags:
            kw = {"dest": _method_dest(name, f.field), "default": None, "help": f.help}
            if f.type is None:
                mg.add_argument(f"--{f.name}", action="store_const", const=f.const, **kw)
            else:
                mg.add_argument(f"--{f.name}", type=f.type, choices=f.choices, metavar=f.field.upper(), **kw)


def _given_method_flags(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{method: {field: value}}`` of the method-specific flags that were given."""
    out: dict[str, dict[str, Any]] = {}
    for name in method_names():
        for f in get_method(name).flags:
            value = getattr(args, _method_dest(name, f.field), None)
            if value is not None:
                out.setdefault(name, {})[f.field] = value
    return out


def _flag_of(method: str, field: str) -> str:
    return next(f"--{f.name}" for f in get_method(method).flags if f.field == field)


def method_from_args(args: argparse.Namespace) -> ReductionMethod | None:
    """The method the flags describe (module docstring), or None for the unpruned model.

    Raises:
        ValueError: an unknown method, a flag of another method, conflicting or missing targets, a malformed
            list, a budget outside (0, 576]. Depth-dependent checks (layers beyond the model, a budget the
            method cannot reach at its layers) are :meth:`ReductionMethod.validate`'s.
    """
    vtn = getattr(args, "visual_token_num", None)
    if vtn is not None and _to_int(vtn, "--visual_token_num", vtn) != PAPER_N0:
        raise EncoderReductionNotImplementedError(
            f"--visual_token_num {vtn}: encoder-side reduction (the 'w/ VE' mode) is not implemented yet; only "
            f"{PAPER_N0} (keep every encoder token) is accepted"
        )
    sched: dict[str, Any] = {dest: getattr(args, dest, None) for dest, _, _ in _SCHEDULE_FLAGS}
    sched["budget"] = getattr(args, "budget", None)
    sched["ratio_mode"] = getattr(args, "ratio_mode", None)
    method = getattr(args, "method", None)
    method = None if method is None else str(method).strip().lower()
    pio_given = {field: getattr(args, f"pio_alias__{field}", None) for field, _ in _PIO_ALIASES}
    pio_given = {k: v for k, v in pio_given.items() if v is not None}
    if pio_given:
        flags = ", ".join(flag for field, flag in _PIO_ALIASES if field in pio_given)
        if method not in (None, "pio"):
            raise ValueError(f"{flags} belong(s) to method pio but --method is {method}; use the generic "
                             "--layers/--tokens/--ratios/--budget flags for other methods")
        for field, value in pio_given.items():
            if sched.get(field) is not None:
                raise ValueError(f"{flags} and the generic flag for {field} are both given; give one")
            sched[field] = value
        method = "pio"
    method_flags = _given_method_flags(args)
    schedule_given = [k for k, v in sched.items() if v is not None and k != "ratio_mode"]
    if method in (None, "none") and not schedule_given and getattr(args, "positions", None) is not None:
        raise ValueError("--positions applies to a reduction method; add --method NAME and a budget")
    if method is None:
        if schedule_given or "pio" in method_flags:
            method = "pio"  # the schedule flags alone select PIO, as before other methods existed
        elif method_flags:
            owner = next(iter(method_flags))
            raise ValueError(f"{_flag_of(owner, next(iter(method_flags[owner])))} is a flag of method {owner}; "
                             f"add --method {owner}")
        else:
            return None
    if method == "none":
        if schedule_given or method_flags:
            raise ValueError("--method none runs the unpruned model; drop the reduction flags "
                             f"({', '.join(schedule_given + list(method_flags))})")
        return None
    cls = get_method(method)
    for owner, given in method_flags.items():
        if owner != method:
            flag = _flag_of(owner, next(iter(given)))
            raise ValueError(f"{flag} is a flag of method {owner}, but --method is {method}; "
                             f"{method}'s own flags: {', '.join('--' + f.name for f in cls.flags) or 'none'}")
    targets = [k for k in ("budget", "budget_ratio", "budget_tokens", "tokens", "ratios") if sched[k] is not None]
    if not targets:
        raise ValueError(f"--method {method} needs a target: --budget 64|128|192 (the paper's budgets), or "
                         "--tokens, --ratios, --budget-tokens or --budget-ratio (with --layers to move the stages)")
    if len(targets) > 1:
        raise ValueError(f"give one target, got {' and '.join('--' + t.replace('_', '-') for t in targets)}")
    schedule = cls.schedule_for(
        None if sched["layers"] is None else parse_layers(sched["layers"]),
        budget=None if sched["budget"] is None else _to_float(sched["budget"], "--budget", sched["budget"]),
        budget_ratio=None if sched["budget_ratio"] is None else _to_float(sched["budget_ratio"], "--budget-ratio",
                                                                          sched["budget_ratio"]),
        budget_tokens=None if sched["budget_tokens"] is None else _to_float(sched["budget_tokens"],
                                                                            "--budget-tokens", sched["budget_tokens"]),
        tokens=None if sched["tokens"] is None else parse_counts(sched["tokens"]),
        ratios=None if sched["ratios"] is None else parse_ratios(sched["ratios"]),
        ratio_mode=sched["ratio_mode"] or cls.default_ratio_mode,
    )
    options = dict(method_flags.get(method, {}))
    if getattr(args, "positions", None) is not None:
        options["positions"] = args.positions
    return cls(schedule, **options)
