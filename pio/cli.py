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

``--schedule-file F``        a schedule found by ``python -m llava.eval.tune`` (method, layers, counts, options)

``--pre-tokens T``            tokens per crop kept before the LLM by a composition ``--method a+b`` (an
                             encoder-side method, then an in-LLM one; ``--budget B`` alone gives the paper's
                             "w/ VE" row, :meth:`pio.encoder.Pipeline.from_budget`)

plus each method's own flags (``--pio-tau``, ``--dart-pivot-text``, ...; the methods' ``flags``). Encoder-side
methods alone take ``--budget B`` or ``--tokens N`` (per crop). The authors' spellings are aliases:
``--layer_list``, ``--image_token_list``, ``--image_token_ratio_list``, ``--visual_token_num T`` (their scan keeps
T tokens per crop before the in-LLM method; 576: none), and PIO's ``--pio-layers``, ``--pio-tokens``, ``--pio-ratios``,
``--pio-ratio-mode``, ``--pio-budget`` (absolute), ``--pio-budget-ratio`` and ``--pio-preset B`` (= ``--method
pio --budget B``). Schedule flags without ``--method`` select PIO, as they did before other methods existed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from .base import POSITIONS, ReductionMethod
from .encoder import EncoderMethod, Pipeline
from .registry import get_method, method_names
from .schedule import PAPER_N0, RATIO_MODES

__all__ = [
    "add_method_args",
    "method_from_args",
    "read_schedule_file",
    "parse_counts",
    "parse_layers",
    "parse_ratios",
]


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
    g.add_argument("--schedule-file", default=None, metavar="FILE",
                   help="a schedule written by python -m llava.eval.tune: its method, layers, counts and options "
                        "(instead of --budget/--layers/--tokens)")
    g.add_argument("--ratio-mode", default=None, choices=RATIO_MODES,
                   help="--ratios of the initial count (default) or of the previous stage's")
    g.add_argument("--positions", default=None, choices=POSITIONS,
                   help="positions after a prune: renumbered over the kept tokens, or the original ones (default: "
                        "the method's authors' choice)")
    g.add_argument("--pre-tokens", type=int, default=None, metavar="T",
                   help="tokens per crop kept before the language model by a composition's first method "
                        "(--method visionzip+pio)")
    g.add_argument("--visual_token_num", default=None,
                   help="the authors' flag: their encoder-side scan keeps T tokens per crop before the in-LLM "
                        "method (576: none)")
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


def method_from_args(args: argparse.Namespace) -> Any:
    """The reducer the flags describe (module docstring): an in-LLM method, an encoder-side one, a
    :class:`~pio.encoder.Pipeline` of both (``--method scan+pio``; ``--visual_token_num T`` puts the authors' scan
    before the in-LLM method), or None for the unpruned model. ``args.family`` (set by the runners from the
    checkpoint, e.g. ``"qwen2_5_vl"``) selects the methods' defaults for that model family.

    Raises:
        ValueError: an unknown method, a flag of another method, conflicting or missing targets, a malformed
            list, a budget outside (0, 576]. Depth-dependent checks (layers beyond the model, a budget the
            method cannot reach at its layers) are the methods' ``validate``.
    """
    sched: dict[str, Any] = {dest: getattr(args, dest, None) for dest, _, _ in _SCHEDULE_FLAGS}
    sched["budget"] = getattr(args, "budget", None)
    sched["ratio_mode"] = getattr(args, "ratio_mode", None)
    method = getattr(args, "method", None)
    method = None if method is None else str(method).strip().lower()
    pre_tokens = getattr(args, "pre_tokens", None)
    vtn = getattr(args, "visual_token_num", None)
    if vtn is not None:
        vtn = _to_int(vtn, "--visual_token_num", vtn)
        if not 1 <= vtn <= PAPER_N0:
            raise ValueError(f"--visual_token_num {vtn}: the authors' scan keeps 1..{PAPER_N0} tokens per crop "
                             f"({PAPER_N0}: every token, no encoder stage)")
        if pre_tokens is not None:
            raise ValueError("--visual_token_num and --pre-tokens both given; give one")
        if vtn != PAPER_N0:  # the authors' flag: their scan before the in-LLM method
            pre_tokens = vtn
            if method is None or "+" not in method:
                method = "scan+" + (method or "pio") if method not in ("scan",) else method
    pio_given = {field: getattr(args, f"pio_alias__{field}", None) for field, _ in _PIO_ALIASES}
    pio_given = {k: v for k, v in pio_given.items() if v is not None}
    if pio_given:
        flags = ", ".join(flag for field, flag in _PIO_ALIASES if field in pio_given)
        if method is not None and "pio" not in method.split("+"):
            raise ValueError(f"{flags} belong(s) to method pio but --method is {method}; use the generic "
                             "--layers/--tokens/--ratios/--budget flags for other methods")
        for field, value in pio_given.items():
            if sched.get(field) is not None:
                raise ValueError(f"{flags} and the generic flag for {field} are both given; give one")
            sched[field] = value
        method = method or "pio"
    method_flags = _given_method_flags(args)
    schedule_given = [k for k, v in sched.items() if v is not None and k != "ratio_mode"]
    if getattr(args, "schedule_file", None):
        return _from_schedule_file(args, method, schedule_given, pre_tokens, method_flags)
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
        if schedule_given or method_flags or pre_tokens is not None:
            raise ValueError("--method none runs the unpruned model; drop the reduction flags "
                             f"({', '.join(schedule_given + list(method_flags))})")
        return None
    names = method.split("+")
    if len(names) > 2 or not all(names):
        raise ValueError(f"--method {method}: give one method, or an encoder-side and an in-LLM one joined by + "
                         "(e.g. visionzip+pio)")
    classes = [get_method(n) for n in names]
    for owner, given in method_flags.items():
        if owner not in names:
            flag = _flag_of(owner, next(iter(given)))
            own = [f"--{f.name}" for c in classes for f in c.flags]
            raise ValueError(f"{flag} is a flag of method {owner}, but --method is {method}; "
                             f"{method}'s own flags: {', '.join(own) or 'none'}")
    if len(classes) == 2:
        return _pipeline(classes[0], classes[1], sched, pre_tokens, method_flags, args)
    cls = classes[0]
    if cls.where == "pre_llm":
        return _encoder_method(cls, sched, pre_tokens, method_flags.get(cls.name, {}))
    if pre_tokens is not None:
        raise ValueError(f"--pre-tokens needs an encoder-side method: --method visionzip+{cls.name}, scan+{cls.name}, "
                         "...")
    return _llm_method(cls, sched, method_flags.get(cls.name, {}), args)


SCHEDULE_FORMAT = "pio-fvlm schedule"


def read_schedule_file(path: str) -> dict[str, Any]:
    """A schedule file of ``python -m llava.eval.tune``, checked; raises naming what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--schedule-file {path}: no such file (write one with python -m llava.eval.tune)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--schedule-file {path}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT or not {"schedule", "method"} <= set(data):
        raise ValueError(f"--schedule-file {path}: not a schedule file of python -m llava.eval.tune (a JSON object "
                         f"with format {SCHEDULE_FORMAT!r}, method and schedule)")
    return data


def _from_schedule_file(args: argparse.Namespace, method: str | None, schedule_given: list[str],
                        pre_tokens: int | None, method_flags: dict[str, dict[str, Any]]) -> ReductionMethod:
    """``--schedule-file``: the tuned method, its options overridden by the method's own flags."""
    from .schedule import Schedule

    path = args.schedule_file
    data = read_schedule_file(path)
    name = data["method"]
    if schedule_given or pre_tokens is not None:
        given = [k for k in schedule_given] + (["pre_tokens"] if pre_tokens is not None else [])
        raise ValueError(f"--schedule-file {path} gives the layers and counts; drop "
                         f"{', '.join('--' + g.replace('_', '-') for g in given)}")
    if method not in (None, name):
        raise ValueError(f"--schedule-file {path} was tuned for method {name}, but --method is {method}")
    cls = get_method(name)
    others = [m for m in method_flags if m != name]
    if others:
        raise ValueError(f"{_flag_of(others[0], next(iter(method_flags[others[0]])))} is a flag of method "
                         f"{others[0]}; the schedule file is {name}'s")
    saved = data.get("options") or {}
    allowed = sorted(f.name for f in fields(cls) if f.name != "schedule")
    unknown = sorted(set(saved) - set(allowed)) if isinstance(saved, dict) else ["(not a JSON object)"]
    if unknown:
        raise ValueError(f"--schedule-file {path}: option(s) {', '.join(unknown)} are not {name}'s; allowed: "
                         f"{', '.join(allowed)} (write the file again with python -m llava.eval.tune)")
    options = {**cls.defaults(getattr(args, "family", None))["options"], **saved, **method_flags.get(name, {})}
    if getattr(args, "positions", None) is not None:
        options["positions"] = args.positions
    return cls(Schedule.from_dict(data["schedule"]), **options)


def _targets(sched: dict[str, Any]) -> list[str]:
    return [k for k in ("budget", "budget_ratio", "budget_tokens", "tokens", "ratios") if sched[k] is not None]


def _llm_method(cls: type[ReductionMethod], sched: dict[str, Any], options: dict[str, Any],
                args: argparse.Namespace) -> ReductionMethod:
    family = getattr(args, "family", None)
    tokens, split = _stage_pairs(cls, sched["tokens"], options)
    sched = {**sched, "tokens": tokens}
    targets = _targets(sched)
    if not targets:
        raise ValueError(f"--method {cls.name} needs a target: --budget 64|128|192 (the paper's budgets), or "
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
        tokens=None if sched["tokens"] is None else parse_counts(sched["tokens"]),  # pairs already summed
        ratios=None if sched["ratios"] is None else parse_ratios(sched["ratios"]),
        ratio_mode=sched["ratio_mode"] or cls.default_ratio_mode,
        family=family,
    )
    options = {**cls.defaults(family)["options"], **split, **options}
    if getattr(args, "positions", None) is not None:
        options["positions"] = args.positions
    return cls(schedule, **options)


def _stage_pairs(cls: type[ReductionMethod], text: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The authors' ``--image_token_list [[30,5],[22,4],[16,3]]`` of a method whose stages keep ``[dominant,
    contextual]`` (a ``stage_contextual`` field, VisionDrop): the per-stage totals, and the contextual counts as
    that field. Anything else is returned as it is."""
    items = _split(text, "token counts") if text is not None else []
    if not items or not all(isinstance(x, (list, tuple)) for x in items):
        return text, {}
    if "stage_contextual" not in {f.name for f in fields(cls)}:
        raise ValueError(f"--tokens {text}: [dominant, contextual] pairs are VisionDrop's form; {cls.name} keeps one "
                         "count per stage, e.g. 92,54,22")
    if any(len(x) != 2 for x in items):
        raise ValueError(f"--tokens {text}: every stage needs [dominant, contextual], e.g. [[30,5],[22,4],[16,3]]")
    if "stage_contextual" in options:
        raise ValueError(f"--tokens {text} gives each stage's contextual tokens; drop the method's own flag for them")
    pairs = [(_to_int(d, "token counts", text), _to_int(c, "token counts", text)) for d, c in items]
    return tuple(d + c for d, c in pairs), {"stage_contextual": tuple(c for _, c in pairs)}


def _encoder_method(cls: type[EncoderMethod], sched: dict[str, Any], pre_tokens: int | None,
                    options: dict[str, Any]) -> EncoderMethod:
    """An encoder-side method alone: ``--budget B`` or ``--tokens N`` (tokens per crop)."""
    extra = [k for k in ("layers", "ratios", "budget_ratio", "budget_tokens") if sched[k] is not None]
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to {cls.name}, which acts before the "
                         "language model: give --budget B or --tokens N (tokens per crop)")
    given = [v for v in (sched["budget"], sched["tokens"], pre_tokens) if v is not None]
    if len(given) != 1:
        raise ValueError(f"--method {cls.name} needs one of --budget 64|128|192 or --tokens N (tokens per crop)")
    if sched["budget"] is not None:
        return cls.from_budget(_to_float(sched["budget"], "--budget", sched["budget"]), **options)
    tokens = parse_counts(given[0]) if isinstance(given[0], str) else (given[0],)
    if len(tokens) != 1:
        raise ValueError(f"{cls.name} keeps one number of tokens per crop, got {list(tokens)}")
    return cls(tokens=tokens[0], **options)


def _pipeline(pre: Any, llm: Any, sched: dict[str, Any], pre_tokens: int | None,
              method_flags: dict[str, dict[str, Any]], args: argparse.Namespace) -> Pipeline | EncoderMethod:
    """``--method a+b``: the paper's w/ VE budget row (``--budget B``), or ``--pre-tokens T`` with the in-LLM
    method's own target."""
    if pre.where != "pre_llm" or llm.where != "llm":
        raise ValueError(f"--method {pre.name}+{llm.name}: the first method must act before the language model "
                         f"({', '.join(_names('pre_llm'))}) and the second inside it ({', '.join(_names('llm'))})")
    pre_options, llm_options = method_flags.get(pre.name, {}), dict(method_flags.get(llm.name, {}))
    if getattr(args, "positions", None) is not None:
        llm_options["positions"] = args.positions
    if pre_tokens is None and sched["budget"] is not None and len(_targets(sched)) == 1:
        budget = _to_float(sched["budget"], "--budget", sched["budget"])
        layers = None if sched["layers"] is None else parse_layers(sched["layers"])
        pipe = Pipeline.from_budget(pre, llm, budget, layers, getattr(args, "family", None), **llm_options)
        return Pipeline(pre(tokens=pipe.pre.tokens, **pre_options), pipe.llm)
    if pre_tokens is None:
        raise ValueError(f"--method {pre.name}+{llm.name} needs --budget B (the paper's w/ VE row) or --pre-tokens T "
                         f"(tokens per crop before the language model) with {llm.name}'s target")
    if not _targets(sched) and sched["layers"] is None:
        return pre(tokens=int(pre_tokens), **pre_options)  # the encoder stage alone
    return Pipeline(pre(tokens=int(pre_tokens), **pre_options), _llm_method(llm, sched, llm_options, args))


def _names(where: str) -> list[str]:
    return [n for n in method_names() if get_method(n).where == where]
