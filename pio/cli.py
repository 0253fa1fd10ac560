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
from typing import Any

from .base import POSITIONS
from .build import SCHEDULE_FORMAT, Reducer, Spelling, build_reducer, read_schedule_file
from .parse import parse_counts, parse_layers, parse_ratios
from .registry import get_method, method_names
from .schedule import PAPER_N0, RATIO_MODES

__all__ = [
    "SCHEDULE_FORMAT",
    "add_method_args",
    "flag_spelling",
    "method_from_args",
    "parse_counts",
    "parse_layers",
    "parse_ratios",
    "read_schedule_file",
]


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


def flag_spelling() -> Spelling:
    """How :func:`pio.build.build_reducer`'s messages name the options given as these flags."""
    names = {dest: flags[0] for dest, flags, _ in _SCHEDULE_FLAGS}
    names.update({"method": "--method", "budget": "--budget", "ratio_mode": "--ratio-mode", "positions": "--positions",
                  "pre_tokens": "--pre-tokens", "visual_token_num": "--visual_token_num",
                  "schedule_file": "--schedule-file"})
    names.update({f"{n}.{f.field}": f"--{f.name}" for n in method_names() for f in get_method(n).flags})
    return Spelling(names, " ", "flag")


_OPTION_DESTS = ("budget", *(dest for dest, _, _ in _SCHEDULE_FLAGS), "ratio_mode", "positions", "pre_tokens",
                 "visual_token_num", "schedule_file")


def method_from_args(args: argparse.Namespace) -> Reducer | None:
    """The reducer the flags describe (module docstring), built by :func:`pio.build.build_reducer`: an in-LLM
    method, an encoder-side one, a :class:`~pio.encoder.Pipeline` of both (``--method scan+pio``;
    ``--visual_token_num T`` puts the authors' scan before the in-LLM method), or None for the unpruned model.
    ``args.family`` (set by the runners from the checkpoint, e.g. ``"qwen2_5_vl"``) selects the methods' defaults
    for that model family.

    Raises:
        ValueError: an unknown method, a flag of another method, conflicting or missing targets, a malformed
            list, a budget outside (0, 576]. Depth-dependent checks (layers beyond the model, a budget the
            method cannot reach at its layers) are the methods' ``validate``.
    """
    method = getattr(args, "method", None)
    options: dict[str, Any] = {dest: getattr(args, dest, None) for dest in _OPTION_DESTS}
    pio_given = {field: getattr(args, f"pio_alias__{field}", None) for field, _ in _PIO_ALIASES}
    pio_given = {k: v for k, v in pio_given.items() if v is not None}
    if pio_given:
        flags = ", ".join(flag for field, flag in _PIO_ALIASES if field in pio_given)
        named = None if method is None else str(method).strip().lower()
        if named is not None and "pio" not in named.split("+"):
            raise ValueError(f"{flags} belong(s) to method pio but --method is {named}; use the generic "
                             "--layers/--tokens/--ratios/--budget flags for other methods")
        for field, value in pio_given.items():
            if options.get(field) is not None:
                raise ValueError(f"{flags} and the generic flag for {field} are both given; give one")
            options[field] = value
        method = method or "pio"
    for name in method_names():
        for f in get_method(name).flags:
            options[f"{name}.{f.field}"] = getattr(args, _method_dest(name, f.field), None)
    return build_reducer(method, options, family=getattr(args, "family", None), spelling=flag_spelling())
