"""The one path from a method name, a target and options to a reducer.

The runners' flags (:func:`pio.cli.method_from_args`), the bench's ``--methods``, the schedule optimiser,
:func:`pio.make_method` and the lmms-eval model all build their reducer with :func:`build_reducer`::

    build_reducer("pio", {"budget": 64})                       # the paper's 64-token row
    build_reducer("pio", {"layers": "1,10,15", "tokens": "92,54,22", "tau": "0.8"})
    build_reducer("scan+pio", {"budget": 64})                  # the paper's w/ VE row, a Pipeline
    build_reducer("visionzip", {"tokens": 64})                 # tokens per crop before the language model

Options are plain ``key: value`` pairs; values may be text as a command line or an lmms-eval ``--model_args``
string gives them (``"1,10,15"``, ``"[1, 10, 15]"``, ``"0.8"``, ``"true"``). The keys:

* the target and schedule (:data:`REDUCER_KEYS`): ``budget`` (the paper's label: the average of 576 visual
  tokens per decoder layer, solved with the method's published shape), ``budget_ratio``, ``budget_tokens``,
  ``layers``, ``tokens``, ``ratios``, ``ratio_mode``, ``positions``; ``pre_tokens`` (tokens per crop kept by a
  composition's encoder-side method), ``visual_token_num`` (the PIO authors' flag: their scan keeps T tokens per
  crop before the in-LLM method; 576: none), ``schedule_file`` (a file of ``python -m llava.eval.tune``), and in
  Python ``schedule`` (a :class:`~pio.schedule.Schedule`);
* the method's own options by field name (``tau``, ``k_pos``, ``nms``, ``recycle``, ...; :func:`method_options`),
  or ``<method>.<field>`` where a composition's two methods share a name.

An unknown key stops with one line listing the allowed ones. A method reads its own spelling of ``tokens``
(:meth:`~pio.base.ReductionMethod.read_tokens`: VisionDrop's ``[dominant, contextual]`` pairs). Messages name the
options as the caller spelled them (:class:`Spelling`: ``key=value`` here, ``--flag value`` from the command
line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

from .base import Flag, ReductionMethod
from .encoder import EncoderMethod, Pipeline
from .parse import (
    parse_bool,
    parse_counts,
    parse_float,
    parse_int,
    parse_layers,
    parse_ratios,
    split_items,
)
from .registry import get_method, method_names
from .schedule import PAPER_N0, Schedule

__all__ = ["REDUCER_KEYS", "SCHEDULE_FORMAT", "Reducer", "Spelling", "build_reducer", "method_options",
           "read_schedule_file"]

Reducer = Union[ReductionMethod, EncoderMethod, Pipeline]
"""What a model takes as ``reducer``: an in-LLM method, an encoder-side one, or a composition of both."""

TARGETS = ("budget", "budget_ratio", "budget_tokens", "tokens", "ratios")
REDUCER_KEYS = (*TARGETS, "layers", "ratio_mode", "positions", "pre_tokens", "visual_token_num", "schedule_file",
                "schedule")
"""The option keys every method takes (module docstring); the rest are the methods' own."""

SCHEDULE_FORMAT = "pio-fvlm schedule"
RESERVED = ("schedule", "positions", "tokens")  # fields set through the generic keys


@dataclass(frozen=True)
class Spelling:
    """How messages name the options: ``key=value`` (the default) or, from the command line, ``--flag value``.

    Attributes:
        names: option key (``budget_tokens``, ``method``, a method's option as ``<method>.<field>``) -> the name to
            print (``--budget-tokens``); keys not in it are printed as they are.
        separator: between a name and a value (``=`` or a space).
        kind: what a method's own option is called (``option``, ``flag``).
    """

    names: Mapping[str, str] = field(default_factory=dict)
    separator: str = "="
    kind: str = "option"

    def name(self, key: str) -> str:
        return self.names.get(key, key)

    def given(self, key: str, value: Any) -> str:
        return f"{self.name(key)}{self.separator}{value}"


def method_options(cls: type) -> dict[str, Flag | None]:
    """A method's own option keys (its hyper-parameter fields) and the command-line flag of each, if it has one."""
    flags = {f.field: f for f in cls.flags}
    return {f.name: flags.get(f.name) for f in fields(cls) if f.init and f.name not in RESERVED}


def read_schedule_file(path: str, name: str = "--schedule-file") -> dict[str, Any]:
    """A schedule file of ``python -m llava.eval.tune``, checked; raises naming what is wrong (``name``: how the
    option that gave the path is spelled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} {path}: no such file (write one with python -m llava.eval.tune)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} {path}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT or not {"schedule", "method"} <= set(data):
        raise ValueError(f"{name} {path}: not a schedule file of python -m llava.eval.tune (a JSON object with "
                         f"format {SCHEDULE_FORMAT!r}, method and schedule)")
    return data


def build_reducer(method: str | None, options: Mapping[str, Any] | None = None, *, family: str | None = None,
                  spelling: Spelling | None = None) -> Reducer | None:
    """The reducer that ``method`` and ``options`` describe (module docstring), or None for the unpruned model
    (``method`` None or ``"none"`` without options). ``method`` is a registered name or two joined by ``+`` (an
    encoder-side method, then an in-LLM one); without it, schedule options select PIO. ``family`` (a checkpoint's
    model family, e.g. ``"qwen2_5_vl"``) selects the methods' defaults for that family.

    Raises:
        ValueError: an unknown method or option, an option of another method, conflicting or missing targets, a
            malformed value, a budget outside (0, 576], each in one line naming what is allowed. Depth-dependent
            checks (layers beyond the model, a budget the method cannot reach at its layers) are the reducer's
            ``validate``.
    """
    return _Request.read(method, options or {}, spelling or Spelling()).build(family)


@dataclass
class _Request:
    """A build request, options sorted: the generic keys, the methods' own options by method (``own``), and own
    options not yet tied to a method (``loose``)."""

    method: str | None
    given: dict[str, Any]
    own: dict[str, dict[str, Any]]
    loose: dict[str, Any]
    spelling: Spelling

    @classmethod
    def read(cls, method: str | None, options: Mapping[str, Any], spelling: Spelling) -> _Request:
        given: dict[str, Any] = {}
        own: dict[str, dict[str, Any]] = {}
        loose: dict[str, Any] = {}
        for key, value in options.items():
            if value is None:  # not given
                continue
            if key in REDUCER_KEYS:
                given[key] = value
            elif "." in key:
                owner, _, name = key.partition(".")
                owner_cls = get_method(owner)
                if name not in method_options(owner_cls):
                    raise ValueError(f"unknown option {spelling.name(key)!r}: {owner_cls.name}'s own options are "
                                     f"{', '.join(method_options(owner_cls)) or 'none'}")
                own.setdefault(owner_cls.name, {})[name] = value
            else:
                loose[key] = value
        method = None if method is None else str(method).strip().lower()
        return cls(method, given, own, loose, spelling)

    # -- naming ---------------------------------------------------------------------------------------------
    def name(self, key: str) -> str:
        return self.spelling.name(key)

    def said(self, key: str, value: Any) -> str:
        return self.spelling.given(key, value)

    @property
    def a_kind(self) -> str:
        """"a flag" or "an option"."""
        word = self.spelling.kind
        return ("an " if word[0] in "aeiou" else "a ") + word

    def first_own(self, owner: str) -> str:
        """How the first option given for method ``owner`` was spelled."""
        return self.name(f"{owner}.{next(iter(self.own[owner]))}")

    # -- dispatch -------------------------------------------------------------------------------------------
    def build(self, family: str | None) -> Reducer | None:
        g = self.given
        method, pre_tokens = self.method, g.get("pre_tokens")
        vtn = g.get("visual_token_num")
        if vtn is not None:
            vtn = parse_int(vtn, self.name("visual_token_num"))
            if not 1 <= vtn <= PAPER_N0:
                raise ValueError(f"{self.said('visual_token_num', vtn)}: the authors' scan keeps 1..{PAPER_N0} tokens "
                                 f"per crop ({PAPER_N0}: every token, no encoder stage)")
            if pre_tokens is not None:
                raise ValueError(f"{self.name('visual_token_num')} and {self.name('pre_tokens')} both given; give one")
            if vtn != PAPER_N0:  # the authors' flag: their scan before the in-LLM method
                pre_tokens = vtn
                if method is None or "+" not in method:
                    method = "scan+" + (method or "pio") if method not in ("scan",) else method
        schedule_given = [k for k in ("layers", "tokens", "ratios", "budget_tokens", "budget_ratio", "budget",
                                      "schedule") if k in g]
        if g.get("schedule_file"):
            return self.from_schedule_file(method, schedule_given, pre_tokens, family)
        if method in (None, "none") and not schedule_given and "positions" in g:
            raise ValueError(f"{self.name('positions')} applies to a reduction method; add {self.name('method')} NAME "
                             "and a budget")
        if method is None:
            if schedule_given or "pio" in self.own:
                method = "pio"  # the schedule options alone select PIO, as before other methods existed
            elif self.own:
                owner = next(iter(self.own))
                raise ValueError(f"{self.first_own(owner)} is {self.a_kind} of method {owner}; add "
                                 f"{self.said('method', owner)}")
            elif self.loose:
                raise ValueError(f"{self.name(next(iter(self.loose)))} is a method's own option; add "
                                 f"{self.said('method', 'NAME')}")
            else:
                return None
        if method == "none":
            extra = [self.name(k) for k in schedule_given] + [self.name(f"{m}.{f}") for m, o in self.own.items()
                                                              for f in o] + [self.name(k) for k in self.loose]
            if extra or pre_tokens is not None:
                raise ValueError(f"{self.said('method', 'none')} runs the unpruned model; drop the reduction options "
                                 f"({', '.join(extra + ([self.name('pre_tokens')] if pre_tokens is not None else []))})")
            return None
        names = method.split("+")
        if len(names) > 2 or not all(names):
            raise ValueError(f"{self.said('method', method)}: give one method, or an encoder-side and an in-LLM one "
                             "joined by + (e.g. visionzip+pio)")
        classes = [get_method(n) for n in names]
        names = [c.name for c in classes]
        self.tie_loose(classes)
        for owner in self.own:
            if owner not in names:
                ours = [self.name(f"{c.name}.{f.field}") for c in classes for f in c.flags]
                raise ValueError(f"{self.first_own(owner)} is {self.a_kind} of method {owner}, but "
                                 f"{self.name('method')} is {method}; {method}'s own {self.spelling.kind}s: "
                                 f"{', '.join(ours) or 'none'}")
        if len(classes) == 2:
            return self.pipeline(classes[0], classes[1], pre_tokens, family)
        cls = classes[0]
        if cls.where == "pre_llm":
            return self.encoder_method(cls, pre_tokens)
        if pre_tokens is not None:
            raise ValueError(f"{self.name('pre_tokens')} needs an encoder-side method: {self.name('method')} "
                             f"visionzip+{cls.name}, scan+{cls.name}, ...")
        return self.llm_method(cls, self.options(cls), family)

    def tie_loose(self, classes: list[type]) -> None:
        """Give each option without a method to the one of ``classes`` that has it."""
        for key, value in self.loose.items():
            owners = [c for c in classes if key in method_options(c)]
            if not owners:
                allowed = [*(k for k in REDUCER_KEYS if k != "schedule"),
                           *(f for c in classes for f in method_options(c))]
                raise ValueError(f"unknown option {self.name(key)!r} for {'+'.join(c.name for c in classes)}; "
                                 f"allowed: {', '.join(allowed)}")
            if len(owners) > 1:
                raise ValueError(f"option {self.name(key)!r} belongs to {owners[0].name} and {owners[1].name}; give "
                                 f"{owners[0].name}.{key} or {owners[1].name}.{key}")
            self.own.setdefault(owners[0].name, {})[key] = value
            self.spelling = replace(self.spelling, names={f"{owners[0].name}.{key}": self.name(key),
                                                          **self.spelling.names})
        self.loose = {}

    def options(self, cls: type) -> dict[str, Any]:
        """Method ``cls``'s own options as given, text read with its flag's type (or its default's)."""
        out = {}
        known = method_options(cls)
        for key, value in self.own.get(cls.name, {}).items():
            out[key] = value if not isinstance(value, str) else self.convert(cls, key, known[key], value)
        return out

    def convert(self, cls: type, key: str, flag: Flag | None, text: str) -> Any:
        spelled = self.name(f"{cls.name}.{key}")
        default = next(f.default for f in fields(cls) if f.name == key)
        try:
            if flag is not None and flag.type is not None:
                value = flag.type(text)
            elif flag is not None or isinstance(default, bool):
                value = parse_bool(text, spelled)
            elif isinstance(default, int):
                value = parse_int(text, spelled)
            elif isinstance(default, float):
                value = parse_float(text, spelled)
            else:
                value = text
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.said(f'{cls.name}.{key}', text)}: {e}") from None
        if flag is not None and flag.choices and value not in flag.choices:
            raise ValueError(f"{self.said(f'{cls.name}.{key}', text)}: allowed {', '.join(map(str, flag.choices))}")
        return value

    def targets(self, given: Mapping[str, Any]) -> list[str]:
        return [k for k in (*TARGETS, "schedule") if given.get(k) is not None]

    # -- the three kinds of reducer -------------------------------------------------------------------------
    def llm_method(self, cls: type[ReductionMethod], options: dict[str, Any], family: str | None
                   ) -> ReductionMethod:
        g = self.given
        text = g.get("tokens")
        nested = text is not None and _pairs(text)
        if nested and not _reads_own_tokens(cls):
            forms = [get_method(n).__name__ for n in method_names() if _reads_own_tokens(get_method(n))]
            raise ValueError(f"{self.said('tokens', text)}: per-stage pairs are {' or '.join(forms)}'s form; "
                             f"{cls.name} keeps one count per stage, e.g. 92,54,22")
        targets = self.targets(g)
        if not targets:
            raise ValueError(f"{self.said('method', cls.name)} needs a target: {self.said('budget', '64|128|192')} (the "
                             f"paper's budgets), or {self.name('tokens')}, {self.name('ratios')}, "
                             f"{self.name('budget_tokens')} or {self.name('budget_ratio')} (with {self.name('layers')} "
                             "to move the stages)")
        if len(targets) > 1:
            raise ValueError(f"give one target, got {' and '.join(self.name(t) for t in targets)}")
        tokens, extra = None, {}
        if text is not None:
            try:
                tokens, extra = cls.read_tokens(text)
            except ValueError as e:
                raise ValueError(f"{self.said('tokens', text)}: {e}") from None
        for key in extra:
            if key in options:
                raise ValueError(f"{self.said('tokens', text)} gives {key} too; drop "
                                 f"{self.name(f'{cls.name}.{key}')}")
        if "schedule" in g:
            if "layers" in g or "ratio_mode" in g:
                raise ValueError(f"a schedule is given; drop {self.name('layers')} and {self.name('ratio_mode')}")
            schedule = g["schedule"]
        else:
            schedule = cls.schedule_for(
                None if "layers" not in g else parse_layers(g["layers"]),
                budget=self.number(g, "budget"),
                budget_ratio=self.number(g, "budget_ratio"),
                budget_tokens=self.number(g, "budget_tokens"),
                tokens=tokens,
                ratios=None if "ratios" not in g else parse_ratios(g["ratios"]),
                ratio_mode=g.get("ratio_mode") or cls.default_ratio_mode,
                family=family,
            )
        options = {**cls.defaults(family)["options"], **extra, **options}
        if "positions" in g:
            options["positions"] = g["positions"]
        return cls(schedule, **options)

    def number(self, given: Mapping[str, Any], key: str) -> float | None:
        return None if given.get(key) is None else parse_float(given[key], self.name(key))

    def encoder_method(self, cls: type[EncoderMethod], pre_tokens: Any) -> EncoderMethod:
        """An encoder-side method alone: a budget or tokens per crop."""
        g = self.given
        extra = [k for k in ("layers", "ratios", "budget_ratio", "budget_tokens", "schedule") if k in g]
        if extra:
            raise ValueError(f"{self.name(extra[0])} does not apply to {cls.name}, which acts before the language "
                             f"model: give {self.said('budget', 'B')} or {self.said('tokens', 'N')} (tokens per crop)")
        given = [v for v in (g.get("budget"), g.get("tokens"), pre_tokens) if v is not None]
        if len(given) != 1:
            raise ValueError(f"{self.said('method', cls.name)} needs one of {self.said('budget', '64|128|192')} or "
                             f"{self.said('tokens', 'N')} (tokens per crop)")
        options = self.options(cls)
        if "budget" in g:
            return cls.from_budget(self.number(g, "budget"), **options)
        tokens = parse_counts(given[0])
        if len(tokens) != 1:
            raise ValueError(f"{cls.name} keeps one number of tokens per crop, got {list(tokens)}")
        return cls(tokens=tokens[0], **options)

    def pipeline(self, pre: type, llm: type, pre_tokens: Any, family: str | None) -> Pipeline | EncoderMethod:
        """An encoder-side method, then an in-LLM one: the paper's w/ VE budget row, or ``pre_tokens`` with the
        in-LLM method's own target."""
        if pre.where != "pre_llm" or llm.where != "llm":
            raise ValueError(f"{self.said('method', f'{pre.name}+{llm.name}')}: the first method must act before the "
                             f"language model ({', '.join(_names('pre_llm'))}) and the second inside it "
                             f"({', '.join(_names('llm'))})")
        g = self.given
        pre_options, llm_options = self.options(pre), self.options(llm)
        if "positions" in g:
            llm_options["positions"] = g["positions"]
        if pre_tokens is None and "budget" in g and len(self.targets(g)) == 1:
            layers = None if "layers" not in g else parse_layers(g["layers"])
            pipe = Pipeline.from_budget(pre, llm, self.number(g, "budget"), layers, family, **llm_options)
            return Pipeline(replace(pipe.pre, **pre_options), pipe.llm)  # a preset's encoder options kept
        if pre_tokens is None:
            raise ValueError(f"{self.said('method', f'{pre.name}+{llm.name}')} needs {self.said('budget', 'B')} (the "
                             f"paper's w/ VE row) or {self.said('pre_tokens', 'T')} (tokens per crop before the "
                             f"language model) with {llm.name}'s target")
        encoder = pre(tokens=parse_int(pre_tokens, self.name("pre_tokens")), **pre_options)
        if not self.targets(g) and "layers" not in g:
            return encoder  # the encoder stage alone
        return Pipeline(encoder, self.llm_method(llm, llm_options, family))

    def from_schedule_file(self, method: str | None, schedule_given: list[str], pre_tokens: Any,
                           family: str | None) -> ReductionMethod:
        """The tuned method of a schedule file, its options overridden by the method's own given ones."""
        path = self.given["schedule_file"]
        data = read_schedule_file(path, self.name("schedule_file"))
        name = data["method"]
        if schedule_given or pre_tokens is not None:
            drop = [self.name(k) for k in schedule_given] + ([self.name("pre_tokens")] if pre_tokens is not None else [])
            raise ValueError(f"{self.said('schedule_file', path)} gives the layers and counts; drop {', '.join(drop)}")
        if method not in (None, name):
            raise ValueError(f"{self.said('schedule_file', path)} was tuned for method {name}, but "
                             f"{self.name('method')} is {method}")
        cls = get_method(name)
        others = [m for m in self.own if m != name]
        if others:
            raise ValueError(f"{self.first_own(others[0])} is {self.a_kind} of method {others[0]}; the schedule file is "
                             f"{name}'s")
        self.tie_loose([cls])
        saved = data.get("options") or {}
        allowed = sorted(f.name for f in fields(cls) if f.name != "schedule")
        unknown = sorted(set(saved) - set(allowed)) if isinstance(saved, dict) else ["(not a JSON object)"]
        if unknown:
            raise ValueError(f"{self.said('schedule_file', path)}: option(s) {', '.join(unknown)} are not {name}'s; "
                             f"allowed: {', '.join(allowed)} (write the file again with python -m llava.eval.tune)")
        options = {**cls.defaults(family)["options"], **saved, **self.options(cls)}
        if "positions" in self.given:
            options["positions"] = self.given["positions"]
        return cls(Schedule.from_dict(data["schedule"]), **options)


def _pairs(text: Any) -> bool:
    """``text`` is a list of per-stage lists (``[[30,5],[22,4]]``)."""
    try:
        items = split_items(text, "token counts")
    except ValueError:
        return False
    return bool(items) and all(isinstance(x, (list, tuple)) for x in items)


def _reads_own_tokens(cls: type) -> bool:
    """The in-LLM method ``cls`` has its own spelling of ``tokens`` (:meth:`ReductionMethod.read_tokens`)."""
    return issubclass(cls, ReductionMethod) and cls.read_tokens.__func__ is not ReductionMethod.read_tokens.__func__


def _names(where: str) -> list[str]:
    return [n for n in method_names() if get_method(n).where == where]
