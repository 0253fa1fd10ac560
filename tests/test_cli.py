"""pio.cli: the reduction flags every runner shares, and the errors for bad ones."""

from __future__ import annotations

import argparse
import shlex

import pytest

from pio import PIO, Schedule, get_method, make_method, method_names
from pio.cli import add_method_args, method_from_args
from pio.registry import register


def parse(line: str):
    p = argparse.ArgumentParser()
    add_method_args(p)
    return method_from_args(p.parse_args(shlex.split(line)))


def test_nothing_given_is_unpruned():
    assert parse("") is None
    assert parse("--method none") is None
    assert parse("--visual_token_num 576") is None


@pytest.mark.parametrize("name", method_names())
def test_method_and_budget(name):
    m = parse(f"--method {name} --budget 64")
    assert m == get_method(name).from_budget(64) and m.name == name and m.config()["method"] == name
    if m.where == "llm":
        assert m.config()["schedule"]["budget_ratio"] == pytest.approx(64 / 576)
    else:  # before the language model: 64 tokens per crop in every layer
        assert m.tokens == 64 and parse(f"--method {name} --tokens 64") == m


def test_compositions_and_the_authors_scan():
    from pio.encoder import Pipeline
    from pio.methods import Scan, VisionZip

    pipe = parse("--method scan+pio --budget 64")  # the authors' w/ VE row: 96 at the encoder, 32 after layer 16
    assert isinstance(pipe, Pipeline) and pipe.pre == Scan(tokens=96)
    assert pipe.llm.layers == (16,) and pipe.llm.counts(96, 32) == [32]
    authors = parse("--visual_token_num 96 --layer_list '[16]' --image_token_list '[32]'")
    assert authors.pre == Scan(tokens=96) and authors.llm.counts(96, 32) == [32]
    assert parse("--visual_token_num 96") == Scan(tokens=96)
    assert parse("--visual_token_num 576 --pio-preset 64") == PIO.from_budget(64)  # 576: no encoder stage
    vz = parse("--method visionzip+fastv --pre-tokens 128 --tokens 64 --visionzip-contextual 16")
    assert vz.pre == VisionZip(tokens=128, contextual=16) and vz.llm.counts(128, 32) == [64]
    assert parse("--method scan+pio --budget 128").pre.tokens == 192


def test_pio_spellings_and_authors_aliases():
    explicit = PIO(PIO.schedule_for((1, 10, 15), tokens=(92, 54, 22)))
    assert parse("--pio-layers 1,10,15 --pio-tokens 92,54,22") == explicit
    assert parse("--layer_list '[1,10,15]' --image_token_list '[92, 54, 22]' --visual_token_num 576") == explicit
    assert parse("--pio-preset 128") == PIO.from_budget(128)
    assert parse("--pio-layers 1,10,15 --pio-budget 64").counts(576, 32) == [92, 54, 22]
    assert parse("--method pio --budget 64 --pio-tau 0.5 --pio-no-nms --pio-include-last") == PIO(
        PIO.schedule_for(budget=64), tau=0.5, nms=False, include_last=True)
    pdrop = parse("--method pdrop --layer_list '[8,16,24]' --image_token_ratio_list '[0.5,0.25,0.125]'")
    assert pdrop.counts(576, 32) == [288, 144, 72]
    official = parse("--method pdrop --layer_list '[8,16,24]' --image_token_ratio_list '[1.0,0.5,0.25,0.125]'")
    assert official == pdrop  # the official eval scripts' leading 1.0
    assert parse("--method dart --budget 64 --dart-pivot-text 2").pivot_text == 2
    assert parse("--method fastv --budget 64 --layers 3").layers == (3,)
    assert parse("--method sparsevlm --budget 64 --sparsevlm-no-recycle").recycle is False
    assert parse("--method fastv --tokens 64 --positions renumber").positions == "renumber"


@pytest.mark.parametrize("line,message", [
    ("--method fastvv --budget 64", r"unknown method 'fastvv'; known methods: pio, fastv, pdrop, sparsevlm, dart, random"),
    ("--method pio+scan --budget 64", r"the first method must act before the language model"),
    ("--method visionzip --budget 64 --layers 2", r"--layers does not apply to visionzip, which acts before"),
    ("--method scan+pio --budget 500", r"budget 500 w/ VE must be in \(0, 384\]: the encoder keeps 1\.5 x the budget"),
    ("--method scan+pio --budget -5", r"budget -5 w/ VE must be in \(0, 384\]"),  # the budget given, not 1.5 x
    ("--method scan+pio --tokens 32", r"needs --budget B \(the paper's w/ VE row\) or --pre-tokens T"),
    ("--visual_token_num 700 --pio-preset 64", r"--visual_token_num 700: the authors' scan keeps 1\.\.576"),
    ("--method fastv --pre-tokens 96 --tokens 30", r"--pre-tokens needs an encoder-side method"),
    ("--method fastv --budget 64 --pio-tau 0.5", r"--pio-tau is a flag of method pio, but --method is fastv"),
    ("--method fastv --pio-layers 2 --tokens 64", r"--pio-layers belong\(s\) to method pio but --method is fastv"),
    ("--dart-pivot-text 2", r"--dart-pivot-text is a flag of method dart; add --method dart"),
    ("--method fastv", r"--method fastv needs a target: --budget 64\|128\|192"),
    ("--method fastv --budget 64 --tokens 30", r"give one target, got --budget and --tokens"),
    ("--method none --budget 64", r"--method none runs the unpruned model"),
    ("--method pio --budget 700", r"budget 700 must be in \(0, 576\]"),
    ("--method pio --layers 1,x --tokens 3,2", r"layers must be integers"),
    ("--method pio --pio-layers 1 --layers 2 --tokens 3", r"both given"),
])
def test_bad_flags_are_named(line, message):
    with pytest.raises(ValueError, match=message):
        parse(line)


def test_unreachable_budget_and_depth_are_named():
    with pytest.raises(ValueError, match=r"budget 64 of 576 .* first pruning layer 8 of 32"):
        parse("--method pdrop --budget 64 --layers 8,16,24").validate(32)
    with pytest.raises(ValueError, match=r"fastv prunes once"):
        parse("--method fastv --tokens 60,30 --layers 2,4").validate(32)
    with pytest.raises(ValueError, match=r"pdrop ranks with the next layer's attention: layers must be in 1\.\.31"):
        parse("--method pdrop --ratios 0.5 --layers 32").validate(32)
    with pytest.raises(ValueError, match=r"layers \[40\] out of range for a 32-layer decoder"):
        parse("--method dart --tokens 68 --layers 40").validate(32)


def test_registry_refuses_duplicates_and_names_known_methods():
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (PIO,), {"name": "pio"}))
    with pytest.raises(ValueError, match="reserved"):
        register(type("NoneMethod", (PIO,), {"name": "none"}))
    with pytest.raises(ValueError, match="known methods: pio"):
        make_method("nope", budget=64)
    assert make_method("pio", schedule=Schedule((1,), tokens=(5,)), tau=0.5).tau == 0.5


def test_make_method_builds_encoder_methods_and_compositions_like_the_flags():
    for spec, name in [("visionzip", "visionzip"), ("scan+pio", "scan+pio"), ("holov+fastv", "holov+fastv")]:
        assert make_method(name, budget=64) == parse(f"--method {spec} --budget 64")
    pipe = make_method("scan+pio", budget=64, tau=0.5)
    assert pipe.llm.tau == 0.5 and "(64 of 96)" in pipe.describe()  # the share of what the encoder passed on
    with pytest.raises(ValueError, match="give budget=B"):
        make_method("scan+pio")
    with pytest.raises(ValueError, match="first method must act before the language model"):
        make_method("pio+scan", budget=64)


def test_visiondrop_authors_spelling():
    """VisionDrop's --image_token_list of [dominant, contextual] pairs: totals per stage and the contextual split;
    other methods refuse pairs."""
    m = parse("--method visiondrop --layer_list [8,16,24] --image_token_list '[[30,5],[22,4],[16,3]]' --dominant 42 "
              "--contextual 6")
    assert m.schedule.layers == (8, 16, 24) and m.schedule.tokens == (35, 26, 19)
    assert m.stage_contextual == (5, 4, 3) and m.encoder_stage().tokens == 48
    with pytest.raises(ValueError, match="pairs are VisionDrop's form; pio keeps one count"):
        parse("--method pio --image_token_list '[[30,5],[22,4]]'")
    with pytest.raises(ValueError, match="every stage needs"):
        parse("--method visiondrop --layers 8,16 --image_token_list '[[30,5],[22]]'")


# ------------------------------------------------------------------------------------------ plain options
@pytest.mark.parametrize("name", method_names())
def test_plain_options_build_what_the_flags_build(name):
    """build_reducer takes (name, options) as an lmms-eval --model_args string gives them: text values, the
    method's own options by field name; the result is the flags' reducer."""
    from pio import build_reducer

    assert build_reducer(name, {"budget": "64"}) == parse(f"--method {name} --budget 64")
    cls = get_method(name)
    for flag in cls.flags:  # every own option, spelled as text, as its flag gives it
        if flag.type is None:
            value, text = flag.const, str(flag.const).lower()
        else:
            value = {"pio-proxy": "current", "pio-proxy-impl": "full"}.get(flag.name, "3")
            text = value
        flags = parse(f"--method {name} --budget 64 --{flag.name} {value if flag.type else ''}")
        assert build_reducer(name, {"budget": 64, flag.field: text}) == flags, flag.name


def test_plain_options_schedules_compositions_and_errors():
    from pio import build_reducer

    assert build_reducer("pio", {"layers": "1,10,15", "tokens": "92,54,22", "tau": "0.8"}) == parse(
        "--method pio --layers 1,10,15 --tokens 92,54,22 --pio-tau 0.8")
    assert build_reducer("pio", {"layers": [1, 10, 15], "tokens": "[92, 54, 22]", "nms": "false"}).nms is False
    assert build_reducer("scan+pio", {"budget": 64, "tau": 0.5, "merge": "false"}) == parse(
        "--method scan+pio --budget 64 --pio-tau 0.5 --scan-no-merge")
    assert build_reducer("visionzip+fastv", {"pre_tokens": 128, "tokens": 64, "visionzip.contextual": "16"}) == parse(
        "--method visionzip+fastv --pre-tokens 128 --tokens 64 --visionzip-contextual 16")
    assert build_reducer("pio", {"budget": 64}, family="qwen2_5_vl").layers == (1, 8, 14)
    assert build_reducer(None, {}) is None and build_reducer("none", {"budget": None}) is None
    for method, options, message in [
        ("pio", {"budget": 64, "taux": 1}, r"unknown option 'taux' for pio; allowed: budget, .*, tau, k_pos"),
        ("fastv", {"budget": 64, "tau": 1}, r"unknown option 'tau' for fastv; allowed: budget"),
        ("pio", {"budget": 64, "proxy": "prev"}, r"proxy=prev: allowed next, current"),
        ("pio", {"budget": 64, "nms": "maybe"}, r"nms is a switch: give true or false"),
        ("visionzip+visiondrop", {"pre_tokens": 64, "contextual": 3}, r"'contextual' belongs to visionzip and "
                                                                      r"visiondrop; give visionzip.contextual"),
        ("fastv", {"budget": 64, "pio.tau": 1}, r"pio.tau is an option of method pio, but method is fastv"),
        ("fastv", {}, r"method=fastv needs a target: budget=64\|128\|192"),
        ("fastv", {"budget": 64, "tokens": 30}, r"give one target, got budget and tokens"),
        (None, {"tau": 0.5}, r"tau is a method's own option; add method=NAME"),
        ("pio", {"image_token_list": "[[30,5]]"}, r"unknown option 'image_token_list'"),
        ("pio", {"tokens": "[[30,5],[22,4]]"}, r"tokens=\[\[30,5\],\[22,4\]\]: per-stage pairs are VisionDrop's"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_reducer(method, options)


# ------------------------------------------------------------------------------------------ the README's lists
def test_readme_lists_every_registered_method_and_flag():
    """The README's Methods table and its --method NAME row name every registered method; its flag rows name
    every method's own flags."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    methods = text[text.index("### Methods"):text.index("### Reduction flags")]
    flags = text[text.index("### Reduction flags"):text.index("### Python")]
    table = set(re.findall(r"^\| `([a-z0-9_]+)` \|", methods, re.M))
    row = next(line for line in flags.splitlines() if line.startswith("| `--method NAME` |"))
    missing = {"Methods table": set(method_names()) - table,
               "--method NAME row": set(method_names()) - set(re.findall(r"`([a-z0-9_]+)`", row)),
               "flag rows": {f"--{f.name}" for n in method_names() for f in get_method(n).flags
                             if not re.search(rf"`--{f.name}[` ]", flags)}}
    assert not any(missing.values()), missing
