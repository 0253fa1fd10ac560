"""Collect result JSONs into the paper's accuracy table.

Usage::

    python -m llava.eval.summarize --data-root playground/data/eval [--lmms-output OUT] [--baseline CKPT] \
        [--runs 'llava-v1.5-7b*'] [--out-md table.md] [--out-csv table.csv] [--plot DIR]

Reads ``DATA_ROOT/*/results/*.json`` (written by the scorers' ``--result-json``) and, with ``--lmms-output OUT``,
the lmms-eval runs of the ``pio_fvlm`` model under lmms-eval's ``--output_path OUT`` (their scores and the
model's records, :mod:`llava.eval.lmms_results`): each lmms-eval task is a column ``lmms:<task>`` holding
lmms-eval's number, and a run joins the row of the same name (by default the scripts' CKPT naming). Rows are runs (the
result's ``model``, i.e. CKPT), laid out as in the paper: the unpruned baseline first, then grouped by the
paper budget the run was asked for (192, 128, 64; runs with other schedules last), each budget's in-LLM methods
("w/o VE") before those that reduce at the vision encoder ("w/ VE": VisionZip, HoloV, SCOPE, DivPrune, the
authors' scan, and compositions such as scan+pio), within a block the comparison methods and PIO last. Columns: the benchmarks present, in the paper's order (GQA, MMB, MMB-CN,
MME, POPE, SQA, VQAv2, TextVQA), "Avg tokens" (the run's realised average visual tokens per layer, from its
reduction logs, averaged over its benchmarks) and "Avg (%)": the mean over the benchmarks both runs have of
100 x score / baseline score, as the paper computes it. A result over part of its run (fewer answers than
questions, or a log missing answered ones; the result file's ``coverage``) is marked ``*`` and left out of the
Avg, with a note. The baseline is ``--baseline`` or else the one run
whose method is none. Several results for one (run, benchmark): the newest ``date`` wins. ``--plot DIR`` also
draws the table as curves (:mod:`llava.eval.plots`) and links them under it.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llava.eval.plots import write_plots
from llava.eval.results import BENCHMARK_COLUMNS, column_label, configure_logging, read_results

logger = logging.getLogger(__name__)


@dataclass
class AccuracyRow:
    """One run of the accuracy table."""

    model: str
    method: str | None = None  # "none" for the unpruned model; None when the results do not say
    budget: float | None = None  # the paper budget the run was asked for
    scores: dict[str, float | None] = field(default_factory=dict)  # benchmark key -> score
    metrics: dict[str, str] = field(default_factory=dict)  # benchmark key -> metric name
    avg_tokens: float | None = None
    is_baseline: bool = False
    ratio: float | None = None  # mean of 100 * score / baseline score over `ratio_benchmarks`
    ratio_benchmarks: list[str] = field(default_factory=list)
    loyal: float | None = None  # % of answers equal to the unpruned run's (runner --loyalty-to), over benchmarks
    kl: float | None = None  # mean KL(unpruned || pruned) at the first answer token, nats
    encoder: bool = False  # the run reduces before the language model too: the paper's "w/ VE" rows
    partial: set[str] = field(default_factory=set)  # benchmarks whose result rests on part of the run
    notes: list[str] = field(default_factory=list)

    def budget_label(self) -> str:
        """The Budget cell: "all" for the unpruned model, the paper budget (with " w/ VE"), or "-"."""
        if self.method == "none" or (self.is_baseline and self.method is None):
            return "all"
        return ("-" if self.budget is None else f"{self.budget:g}") + (" w/ VE" if self.encoder else "")

    def method_label(self) -> str:
        """The Method cell: "vanilla" for the unpruned model, else the method's name."""
        if self.method == "none":
            return "vanilla"
        return self.method or "?"


def benchmark_columns(results: Sequence[dict[str, Any]]) -> list[str]:
    """Benchmark keys present in ``results``: known ones in paper order, unknown ones after, sorted."""
    present = {str(r["benchmark"]) for r in results}
    known = [b for b in BENCHMARK_COLUMNS if b in present]
    return known + sorted(present - set(BENCHMARK_COLUMNS))


def _latest_per_run(results: Sequence[dict[str, Any]], warn: bool = True) -> dict[str, dict[str, dict[str, Any]]]:
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        model, bench = str(r["model"]), str(r["benchmark"])
        current = runs.setdefault(model, {}).get(bench)
        if current is not None:
            newer = r if str(r.get("date") or "") >= str(current.get("date") or "") else current
            if warn:
                    logger.warning("%s / %s: several result files (%s, %s); using the newest, %s", model, bench,
                               current.get("_path", "?"), r.get("_path", "?"), newer.get("_path", "?"))
            r = newer
        runs[model][bench] = r
    return runs


def build_accuracy_table(results: Sequence[dict[str, Any]], baseline: str | None) -> list[AccuracyRow]:
    """Rows of the accuracy table (baseline first, then runs by name); ratios only when the baseline exists."""
    runs = _latest_per_run(results)
    columns = benchmark_columns(results)
    rows: list[AccuracyRow] = []
    for model, by_bench in runs.items():
        row = AccuracyRow(model=model, is_baseline=model == baseline)
        tokens, loyal, kl = [], [], []
        methods = {(r.get("method"), r.get("budget")) for r in by_bench.values()}
        row.method, row.budget = sorted(methods, key=str)[0]
        row.encoder = with_encoder(row.method) or any((r.get("method_config") or {}).get("encoder")
                                                      for r in by_bench.values())
        if len(methods) > 1:
            row.notes.append("results disagree on the method: " + ", ".join(f"{m} {b}" for m, b in sorted(methods, key=str)))
        for bench, r in by_bench.items():
            cov = r.get("coverage") or {}
            if cov.get("partial"):
                row.partial.add(bench)
                reasons = "; ".join(str(x) for x in cov.get("reasons") or [])
                row.notes.append(f"{column_label(bench)} is partial ({cov.get('answered')} of {cov.get('expected')} "
                                 f"questions answered, {cov.get('logged')} logged{'; ' + reasons if reasons else ''}): "
                                 "marked *, left out of the Avg")
            score = r.get("score")
            row.scores[bench] = None if score is None else float(score)
            row.metrics[bench] = str(r.get("metric") or "")
            if r.get("avg_visual_tokens") is not None:
                tokens.append(float(r["avg_visual_tokens"]))
            loyalty = r.get("loyalty") or {}
            if loyalty.get("same_answer") is not None:
                loyal.append(float(loyalty["same_answer"]))
            if loyalty.get("first_token_kl") is not None:
                kl.append(float(loyalty["first_token_kl"]))
        row.avg_tokens = sum(tokens) / len(tokens) if tokens else None
        row.loyal = sum(loyal) / len(loyal) if loyal else None
        row.kl = sum(kl) / len(kl) if kl else None
        rows.append(row)
    rows.sort(key=_paper_order)
    base = rows[0] if rows and rows[0].is_baseline else None
    if base is None:
        return rows
    for row in rows:
        ratios = []
        missing = []
        for bench in columns:
            mine, ref = row.scores.get(bench), base.scores.get(bench)
            label = column_label(bench)
            if mine is None or ref is None:
                missing.append(label)
                continue
            if bench in row.partial or bench in base.partial:
                continue
            if row.metrics.get(bench) != base.metrics.get(bench):
                row.notes.append(f"{label} left out of the ratio: metric {row.metrics.get(bench)!r} "
                                 f"vs baseline {base.metrics.get(bench)!r}")
                continue
            if ref == 0:
                row.notes.append(f"{label} left out of the ratio: baseline score is 0")
                continue
            ratios.append(100.0 * mine / ref)
            row.ratio_benchmarks.append(bench)
        row.ratio = sum(ratios) / len(ratios) if ratios else None
        if missing:
            row.notes.append(f"ratio over {len(ratios)} benchmark(s); missing in this run or the baseline: "
                             + ", ".join(missing))
    return rows


def with_encoder(method: str | None) -> bool:
    """The method reduces before the language model (an encoder-side method, alone or composed): the paper's w/ VE.
    A method that runs its own encoder stage (VisionDrop) says so in its configuration (``encoder``)."""
    from pio import get_method, method_names

    if not method or method == "none":
        return False
    first = method.split("+")[0]
    return "+" in method or (first in method_names() and get_method(first).where == "pre_llm")


def _paper_order(row: AccuracyRow) -> tuple:
    """Baseline; then budgets from the largest, each with its w/o VE block before its w/ VE block; within a block
    the comparison methods in registry order, PIO (alone or composed) last."""
    from pio import method_names

    names = [n for n in method_names() if n != "pio"] + ["pio"]
    last = (row.method or "").split("+")[-1]
    rank = names.index(last) if last in names else len(names)
    return (not row.is_baseline, row.budget is None, -(row.budget or 0.0), row.encoder, rank,
            row.method or "", row.model)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if 0 < abs(value) < 1 else f"{value:.1f}"  # lmms-eval reports many metrics as fractions


def table_header(columns: Sequence[str], with_ratio: bool, with_loyalty: bool = False) -> list[str]:
    return ["Budget", "Method", "Run", *(column_label(c) for c in columns), "Avg tokens"] + (
        ["Avg (%)"] if with_ratio else []) + (["Loyal (%)", "KL@1"] if with_loyalty else [])


def has_loyalty(rows: Sequence[AccuracyRow]) -> bool:
    """Some run measured its loyalty to the unpruned one (runner ``--loyalty-to``): the table shows it."""
    return any(r.loyal is not None or r.kl is not None for r in rows)


def format_markdown(rows: Sequence[AccuracyRow], columns: Sequence[str], with_ratio: bool,
                    messages: Sequence[str] = ()) -> str:
    """The table as Markdown, followed by per-run notes and general messages."""
    loyalty = has_loyalty(rows)
    header = table_header(columns, with_ratio, loyalty)
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for row in rows:
        name = f"{row.model} (baseline)" if row.is_baseline else row.model
        cells = [row.budget_label(), row.method_label(), name,
                 *(_fmt(row.scores.get(c)) + ("*" if c in row.partial else "") for c in columns), _fmt(row.avg_tokens)]
        if with_ratio:
            cells.append(_fmt(row.ratio))
        if loyalty:
            cells += [_fmt(row.loyal), "-" if row.kl is None else f"{row.kl:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row.model}: {note}" for row in rows for note in row.notes]
    notes += [f"- {m}" for m in messages]
    if loyalty:
        notes.append("- Loyal (%): answers equal to the unpruned run's; KL@1: KL(unpruned || pruned) in nats at the "
                     "first answer token (runner --loyalty-to), both averaged over the run's benchmarks")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[AccuracyRow], columns: Sequence[str], with_ratio: bool) -> None:
    """The table as CSV: budget, method, run, one column per benchmark, avg_tokens[, avg_pct]; empty cell = no
    value."""
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        loyalty = has_loyalty(rows)
        writer.writerow(["budget", "method", "run", *(column_label(c) for c in columns), "avg_tokens"]
                        + (["avg_pct"] if with_ratio else []) + (["loyal_pct", "kl_first_token"] if loyalty else []))
        for row in rows:
            values = [row.budget_label(), row.method_label(), row.model, *(cell(row.scores.get(c)) for c in columns),
                      cell(row.avg_tokens)]
            if with_ratio:
                values.append(cell(row.ratio))
            if loyalty:
                values += [cell(row.loyal), cell(row.kl)]
            writer.writerow(values)


EFFICIENCY_COLUMNS = (
    # (label, how to get the value from one run's profile lines, unit scale, digits)
    ("Prefill (s)", lambda recs: sum(r.get("prefill_s", 0.0) + r.get("vision_s", 0.0) for r in recs), 1.0, 4),
    ("Total (s)", lambda recs: sum(r.get("total_s", 0.0) for r in recs), 1.0, 4),
    ("FLOPs FastV (T)", lambda recs: _mean([r["flops"]["fastv_visual"] for r in recs]), 1e-12, 4),
    ("FLOPs exact+selection (T)", lambda recs: _mean([r["flops"]["exact"] + r["flops"]["selection"] for r in recs]),
     1e-12, 4),
    ("KV cache (MB)", lambda recs: _mean([r["kv_bytes"]["measured"] or r["kv_bytes"]["analytic"] for r in recs]),
     1 / 2**20, 4),
)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def build_efficiency_table(profiles: dict[str, list[dict[str, Any]]], baseline: str) -> str:
    """The paper's efficiency table (§8.2) from ``--profile`` files: totals over samples for times, means per
    sample for FLOPs and KV cache, each with its ratio to ``baseline`` (baseline / run: "x faster/fewer").

    FLOPs FastV is the paper's convention (visual tokens only, ``4nd^2 + 2n^2d + 2ndm`` per layer); the
    exact column counts the real architecture over all tokens plus the selection's own work (PIO's proxy
    forward and backward, other methods' attention rows).
    """
    if baseline not in profiles:
        raise ValueError(f"baseline {baseline!r} is not among the profiles ({', '.join(profiles)})")
    base = {label: get(profiles[baseline]) for label, get, _, _ in EFFICIENCY_COLUMNS}
    header = ["Run", "Samples", *[label for label, *_ in EFFICIENCY_COLUMNS], "Selection (s)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, recs in profiles.items():
        cells = [name + (" (baseline)" if name == baseline else ""), str(len(recs))]
        for label, get, scale, digits in EFFICIENCY_COLUMNS:
            value = get(recs)
            ratio = base[label] / value if value else float("nan")
            cells.append(f"{value * scale:.{digits}g} ({ratio:.2f}x)")
        cells.append(f"{sum(sum(r.get('selection_s', {}).values()) for r in recs):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _read_profiles(specs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    from llava.eval.results import read_jsonl

    out: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.splitext(os.path.basename(spec))[0], spec
        recs = read_jsonl(path)
        if not recs:
            raise ValueError(f"--profile {path} has no records")
        for i, rec in enumerate(recs, 1):
            lacking = [k for k in PROFILE_FIELDS if k not in rec]
            if lacking:
                raise ValueError(f"--profile {path}: record {i} has no {', '.join(lacking)}, so it is not a profile "
                                 "line: give the runner's --profile file (X.profile.jsonl beside the answers X.jsonl)")
        out[name] = recs
    return out


PROFILE_FIELDS = ("flops", "kv_bytes")
"""What every line of a runner's ``--profile`` file has (:mod:`llava.eval.profiling`)."""


def main(argv: list[str] | None = None) -> list[AccuracyRow]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="folder whose */results/*.json are collected")
    parser.add_argument("--lmms-output", action="append", default=[], metavar="OUT",
                        help="an lmms-eval --output_path whose pio_fvlm runs join the table (repeat for several)")
    parser.add_argument("--profile", action="append", default=[], metavar="[NAME=]FILE",
                        help="--profile jsonl of a run (repeat); prints the efficiency table, the first "
                             "(or --baseline) being the unpruned reference")
    parser.add_argument("--baseline", default=None, metavar="CKPT",
                        help="run (model name) the Avg (%%) column is relative to, e.g. llava-v1.5-7b (default: the one "
                             "run whose method is none)")
    parser.add_argument("--runs", default="*", metavar="PATTERN",
                        help="only runs whose name matches this shell pattern, e.g. 'llava-v1.5-7b*' (one model "
                             "family per table)")
    parser.add_argument("--out-md", default=None, metavar="FILE", help="also write the Markdown table here")
    parser.add_argument("--out-csv", default=None, metavar="FILE", help="also write the table as CSV here")
    parser.add_argument("--plot", default=None, metavar="DIR",
                        help="also draw score against budget per method, and retention against measured prefill "
                             "speed-up where profiles exist, as PNGs in DIR (needs matplotlib: pip install -e "
                             "\".[viz]\"); the table links them")
    args = parser.parse_args(argv)
    configure_logging()
    if args.plot:  # before any work: the package, and a folder for the pictures
        from llava.eval.plots import require_matplotlib
        from llava.utils import ensure_writable

        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise NotADirectoryError(f"--plot {args.plot} is a file; give a folder for the pictures (it is created)")
        require_matplotlib()
        ensure_writable(args.plot, f"--plot {args.plot}")
    if args.profile:
        profiles = _read_profiles(args.profile)
        base = args.baseline if args.baseline in profiles else next(iter(profiles))
        text = build_efficiency_table(profiles, base)
        print(text, end="")
        if args.out_md and not args.data_root:
            with open(args.out_md, "w", encoding="utf-8") as handle:
                handle.write(text)
    if not args.data_root and not args.lmms_output:
        if not args.profile:
            parser.error("give --data-root and/or --lmms-output (accuracy table) and/or --profile files (efficiency "
                         "table)")
        return []

    results = read_results(args.data_root) if args.data_root else []
    for out in args.lmms_output:
        from llava.eval.lmms_results import read_lmms_results

        results += read_lmms_results(out)
    results = [r for r in results if fnmatch.fnmatchcase(str(r["model"]), args.runs)]
    if not results:
        where = [os.path.join(args.data_root, "*", "results", "*.json")] if args.data_root else []
        where += [f"{out} (lmms-eval)" for out in args.lmms_output]
        print(f"No result files under {', '.join(where)} for runs {args.runs!r}")
        return []
    baseline = args.baseline
    if baseline is None:
        unpruned = sorted({str(r["model"]) for r in results if r.get("method") == "none"})
        if len(unpruned) == 1:
            baseline = unpruned[0]
        elif len(unpruned) > 1:
            print(f"several unpruned runs ({', '.join(unpruned)}): choose one with --baseline, and the family's "
                  "runs with --runs")
    rows = build_accuracy_table(results, baseline)
    columns = benchmark_columns(results)
    with_ratio = bool(rows) and rows[0].is_baseline
    messages = []
    if baseline is None:
        messages.append("no baseline (--baseline, or one run with method none): no Avg (%) column")
    elif not with_ratio:
        messages.append(f"baseline {baseline!r} not found among the runs "
                        f"({', '.join(r.model for r in rows)}): no Avg (%) column")
    mme_metrics = {row.metrics["mme"] for row in rows if "mme" in row.metrics}
    if mme_metrics:
        messages.append("MME column: " + " / ".join(sorted(mme_metrics)))
    plots: list[str] = []
    if args.plot:
        plots, plot_messages = write_plots(_latest_per_run(results, warn=False), rows, columns, args.plot)
        messages += plot_messages
    text = format_markdown(rows, columns, with_ratio, messages)
    if plots:
        where = os.path.dirname(os.path.abspath(args.out_md)) if args.out_md else os.getcwd()
        links = [f"![{os.path.splitext(os.path.basename(p))[0].replace('_', ' ')}]"
                 f"({os.path.relpath(os.path.abspath(p), where)})" for p in plots]
        text += "\n" + "\n".join(links) + "\n"
    print(text, end="")
    if args.out_md:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_md)), exist_ok=True)
        with open(args.out_md, "w", encoding="utf-8") as handle:
            handle.write(text)
    if args.out_csv:
        write_csv(args.out_csv, rows, columns, with_ratio)
    return rows


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
