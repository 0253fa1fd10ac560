"""The curves of ``summarize --plot DIR``: score against budget per method, and retention against prefill speed-up.

Drawn from the result JSONs on disk (and, for the speed-up, the ``--profile`` files the benchmark scripts write
beside the answers: ``answers/CKPT.profile.jsonl``). matplotlib is an optional extra (``pip install -e
".[viz]"``).

* ``score_vs_budget.png``: one panel per benchmark and one for the paper's "Avg" (mean of 100 x score /
  baseline score), x = the paper budget (average visual tokens per layer), one line per method (encoder-side
  methods and compositions, the "w/ VE" rows, dashed), the unpruned baseline as a horizontal line.
* ``retention_vs_speedup.png``: x = measured prefill speed-up over the baseline (vision encoding included; per
  benchmark the ratio of mean prefill times over the questions both runs profiled, then the geometric mean over
  benchmarks), y = Avg (%); one line per method through its budgets.

Results over part of their run (``*`` in the table) are left out of the curves, as they are of the Avg.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from llava.eval.results import column_label, read_jsonl

logger = logging.getLogger(__name__)

SCORE_PLOT = "score_vs_budget.png"
SPEED_PLOT = "retention_vs_speedup.png"


def require_matplotlib():
    """``matplotlib.pyplot`` on the non-interactive backend, or an error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib, an optional extra: pip install -e \".[viz]\" (make test and make "
                          "demo install it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _profile_of(result: dict[str, Any]) -> str | None:
    """The ``--profile`` file the benchmark scripts write beside a result's answers, when it exists."""
    answers = (result.get("extra") or {}).get("result_file")
    if not answers or not answers.endswith(".jsonl"):
        return None
    name = os.path.basename(answers)[: -len(".jsonl")] + ".profile.jsonl"
    candidates = [answers[: -len(".jsonl")] + ".profile.jsonl"]  # as the scorer saw it (relative to its cwd)
    if result.get("_path"):  # DATA_ROOT/<benchmark>/results/X.json -> DATA_ROOT/<benchmark>/answers/
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(result["_path"])), "answers", name))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _prefill_times(path: str) -> dict[str, float]:
    """Per question (id and round), the prefill time with vision encoding of a profile file."""
    out = {}
    for rec in read_jsonl(path, strict=False):
        if "prefill_s" in rec:
            key = f"{rec.get('question_id')}:{rec.get('round_id', '')}"
            out[key] = float(rec["prefill_s"]) + float(rec.get("vision_s", 0.0))
    return out


def prefill_speedups(latest: dict[str, dict[str, dict[str, Any]]], baseline: str) -> dict[str, float]:
    """Per run, its prefill speed-up over ``baseline`` (module docstring); runs without profiles are absent.

    Args:
        latest: ``{run: {benchmark: result}}`` (the newest result of each).
    """
    base = {b: _profile_of(r) for b, r in latest.get(baseline, {}).items()}
    base_times = {b: _prefill_times(p) for b, p in base.items() if p}
    out = {}
    for run, by_bench in latest.items():
        ratios = []
        for bench, result in by_bench.items():
            path = _profile_of(result)
            if not path or bench not in base_times:
                continue
            mine, ref = _prefill_times(path), base_times[bench]
            common = sorted(set(mine) & set(ref))
            if not common:
                continue
            t_run, t_ref = sum(mine[k] for k in common), sum(ref[k] for k in common)
            if t_run > 0 and t_ref > 0:
                ratios.append(t_ref / t_run)
        if ratios:
            out[run] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return out


def _styles(rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """One colour and marker per method label, the same in every panel; w/ VE methods dashed."""
    pruned = [r for r in rows if r.budget is not None and not r.is_baseline]
    labels = sorted({r.method_label() for r in pruned})
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
               "#7f7f7f"]
    markers = "osD^vP*Xph"
    out = {}
    for i, label in enumerate(labels):
        ve = any(r.encoder for r in pruned if r.method_label() == label)
        out[label] = {"color": colours[i % len(colours)], "marker": markers[i % len(markers)],
                      "linestyle": "--" if ve else "-", "label": label + (" (w/ VE)" if ve else "")}
    return out


def _series(rows: Sequence[Any], value) -> dict[str, list[tuple[float, float]]]:
    """``{method label: [(budget, value)]}`` over the pruned rows with a budget and a value."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        v = value(r)
        if r.is_baseline or r.budget is None or v is None:
            continue
        out.setdefault(r.method_label(), []).append((r.budget, v))
    return {k: sorted(v) for k, v in out.items()}


def plot_score_vs_budget(rows: Sequence[Any], columns: Sequence[str], path: str) -> str | None:
    """``score_vs_budget.png`` (module docstring); None when no row has a budget."""
    plt = require_matplotlib()
    styles = _styles(rows)
    if not styles:
        return None
    base = next((r for r in rows if r.is_baseline), None)
    panels: list[tuple[str, Any, float | None]] = [
        (column_label(c), (lambda r, c=c: None if c in r.partial else r.scores.get(c)),
         base.scores.get(c) if base is not None else None) for c in columns]
    if base is not None and base.ratio is not None:
        panels.append(("Avg (% of the unpruned model)", lambda r: r.ratio, 100.0))
    n = len(panels)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.8), squeeze=False)
    budgets = sorted({r.budget for r in rows if r.budget is not None})
    # methods side by side around each budget, so that equal scores do not hide each other
    step = 0.012 * ((budgets[-1] - budgets[0]) or 100.0)
    shift = {label: (i - (len(styles) - 1) / 2) * step for i, label in enumerate(styles)}
    for ax, (title, value, reference) in zip(axes.flat, panels):
        for label, points in _series(rows, value).items():
            xs, ys = zip(*points)
            ax.plot([x + shift[label] for x in xs], ys, **styles[label])
        if reference is not None:
            ax.axhline(reference, color="#444444", linewidth=1, linestyle=":", label="unpruned (all tokens)")
        ax.set_title(title)
        ax.set_xlabel("budget (average visual tokens per layer)")
        ax.set_ylabel("score" if not title.startswith("Avg") else "% of the unpruned score")
        ax.set_xticks(budgets)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:n]:  # every method, whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.1 if nrows == 1 else 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_retention_vs_speedup(rows: Sequence[Any], speedups: dict[str, float], path: str) -> str | None:
    """``retention_vs_speedup.png`` (module docstring); None when no pruned run has both a ratio and profiles."""
    plt = require_matplotlib()
    styles = _styles(rows)
    by_method: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        if r.is_baseline or r.ratio is None or r.model not in speedups or r.budget is None:
            continue
        by_method.setdefault(r.method_label(), []).append((speedups[r.model], r.ratio, r.budget_label()))
    if not by_method:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.plot([1.0], [100.0], marker="*", markersize=12, color="#444444", linestyle="none", label="unpruned")
    for label, points in sorted(by_method.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], **styles[label])
        for x, y, budget in points:
            ax.annotate(budget.split()[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("prefill speed-up over the unpruned model (x, measured)")
    ax.set_ylabel("Avg (% of the unpruned score)")
    ax.set_title("Accuracy retained against prefill speed-up (labels: budget)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(latest: dict[str, dict[str, dict[str, Any]]], rows: Sequence[Any], columns: Sequence[str],
                out_dir: str) -> tuple[list[str], list[str]]:
    """Write the plots of the table ``rows`` (:class:`llava.eval.summarize.AccuracyRow`) into ``out_dir``, reading
    the profiles beside ``latest``'s results (run -> benchmark -> its newest result); ``(paths written, messages
    about what could not be drawn)``."""
    require_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    written, messages = [], []
    skipped = sorted({r.model for r in rows if r.budget is None and not r.is_baseline})
    if skipped:
        messages.append(f"plots: runs without a paper budget are not drawn ({', '.join(skipped)})")
    path = plot_score_vs_budget(rows, columns, os.path.join(out_dir, SCORE_PLOT))
    if path:
        written.append(path)
    else:
        messages.append("plots: no run with a paper budget; nothing to draw against the budget")
    base = next((r for r in rows if r.is_baseline), None)
    speedups = prefill_speedups(latest, base.model) if base is not None else {}
    path = plot_retention_vs_speedup(rows, speedups, os.path.join(out_dir, SPEED_PLOT)) if speedups else None
    if path:
        written.append(path)
    else:
        messages.append("plots: no retention against speed-up (it needs the baseline and pruned runs with --profile "
                        "files beside their answers, as the benchmark scripts write them)")
    return written, messages
