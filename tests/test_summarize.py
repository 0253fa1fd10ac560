"""llava.eval.summarize on hand-written result files, ratios computed by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llava.eval import summarize
from llava.eval.results import read_results

MME_TOTAL = "perception+cognition total"


def put(root, bench, model, score, *, tokens=None, metric="accuracy", date="2025-01-01T00:00:00+00:00",
        method=None, budget=None, coverage=None):
    path = os.path.join(root, bench, "results", f"{model}-{date[:10]}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": bench, "model": model, "schedule": None, "method": method, "budget": budget,
                   "method_config": None, "avg_visual_tokens": tokens, "coverage": coverage,
                   "score": score, "metric": metric, "sub_scores": {}, "num_questions": 1, "wall_time_s": None,
                   "date": date, "extra": {}}, f)


@pytest.fixture
def data_root(tmp_path):
    root = str(tmp_path)
    put(root, "gqa", "base", 60.0)
    put(root, "pope", "base", 80.0)
    put(root, "mme", "base", 1800.0, metric=MME_TOTAL)
    put(root, "gqa", "pio64", 54.0, tokens=64.0)
    put(root, "pope", "pio64", 84.0, tokens=66.0)
    put(root, "mme", "pio64", 1620.0, metric=MME_TOTAL)
    put(root, "gqa", "pio128", 10.0, date="2024-01-01T00:00:00+00:00")  # older duplicate: ignored
    put(root, "gqa", "pio128", 58.5)
    put(root, "mme", "pio128", 1500.0, metric="perception total")  # other convention: not in the ratio
    os.makedirs(os.path.join(root, "pope", "results", "junk"), exist_ok=True)
    with open(os.path.join(root, "pope", "results", "notes.json"), "w") as f:
        f.write("[1, 2]")  # not a result file: skipped
    return root


def test_accuracy_table_ratios(data_root):
    results = read_results(data_root)
    assert len(results) == 9
    rows = summarize.build_accuracy_table(results, "base")
    assert [r.model for r in rows] == ["base", "pio128", "pio64"]
    base, pio128, pio64 = rows
    assert base.is_baseline and base.ratio == pytest.approx(100.0) and base.avg_tokens is None
    # pio64: (54/60 + 84/80 + 1620/1800) / 3 = (0.90 + 1.05 + 0.90) / 3
    assert pio64.ratio == pytest.approx(95.0) and pio64.avg_tokens == pytest.approx(65.0)
    assert pio64.ratio_benchmarks == ["gqa", "mme", "pope"]
    # pio128: GQA only (POPE missing, MME on another metric)
    assert pio128.scores["gqa"] == 58.5 and pio128.ratio == pytest.approx(97.5)
    assert any("MME left out" in n for n in pio128.notes)
    assert any("missing" in n and "POPE" in n for n in pio128.notes)
    assert summarize.benchmark_columns(results) == ["gqa", "mme", "pope"]


def test_main_writes_markdown_and_csv(data_root, tmp_path, capsys):
    md, csv_path = tmp_path / "out" / "t.md", tmp_path / "out" / "t.csv"
    summarize.main(["--data-root", data_root, "--baseline", "base", "--out-md", str(md), "--out-csv", str(csv_path)])
    printed = capsys.readouterr().out
    assert printed == md.read_text()
    lines = printed.splitlines()
    assert lines[0] == "| Budget | Method | Run | GQA | MME | POPE | Avg tokens | Avg (%) |"
    assert lines[2] == "| all | ? | base (baseline) | 60.0 | 1800.0 | 80.0 | - | 100.0 |"
    assert lines[4] == "| - | ? | pio64 | 54.0 | 1620.0 | 84.0 | 65.0 | 95.0 |"
    assert csv_path.read_text().splitlines() == [
        "budget,method,run,GQA,MME,POPE,avg_tokens,avg_pct",
        "all,?,base,60.0000,1800.0000,80.0000,,100.0000",
        "-,?,pio128,58.5000,1500.0000,,,97.5000",
        "-,?,pio64,54.0000,1620.0000,84.0000,65.0000,95.0000",
    ]


def test_missing_baseline(data_root, capsys):
    rows = summarize.main(["--data-root", data_root, "--baseline", "nope"])
    out = capsys.readouterr().out
    assert "Avg (%) |" not in out and "baseline 'nope' not found" in out
    assert all(r.ratio is None for r in rows)
    summarize.main(["--data-root", data_root])
    assert "no baseline" in capsys.readouterr().out


def test_paper_layout_budgets_then_methods(tmp_path, capsys):
    """Rows: the unpruned run (found by its method), then budgets from the largest, PIO last within each."""
    root = str(tmp_path)
    for bench, base in (("gqa", 60.0), ("pope", 80.0)):
        put(root, bench, "m", base, tokens=576.0, method="none")
        for budget in (64, 192):
            for method, drop in (("pio", 1.0), ("fastv", 10.0), ("dart", 5.0), ("scan+pio", 0.5), ("visionzip", 3.0)):
                put(root, bench, f"m-{method}{budget}", base - drop * 64 / budget, tokens=float(budget),
                    method=method, budget=float(budget))
    put(root, "gqa", "other", 50.0, method="none")  # another family: left out by --runs
    summarize.main(["--data-root", root, "--runs", "m*"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" | ")[:3] for ln in lines[2:13]] == [
        ["| all", "vanilla", "m (baseline)"],
        ["| 192", "fastv", "m-fastv192"], ["| 192", "dart", "m-dart192"], ["| 192", "pio", "m-pio192"],
        ["| 192 w/ VE", "visionzip", "m-visionzip192"], ["| 192 w/ VE", "scan+pio", "m-scan+pio192"],
        ["| 64", "fastv", "m-fastv64"], ["| 64", "dart", "m-dart64"], ["| 64", "pio", "m-pio64"],
        ["| 64 w/ VE", "visionzip", "m-visionzip64"], ["| 64 w/ VE", "scan+pio", "m-scan+pio64"]]
    # Avg (%): (59/60 + 79/80) / 2 for pio at 64
    assert lines[10].endswith(f"| 64.0 | {100 * (59 / 60 + 79 / 80) / 2:.1f} |")
    summarize.main(["--data-root", root])
    assert "several unpruned runs (m, other)" in capsys.readouterr().out


def test_partial_results_are_marked_and_left_out_of_the_avg(tmp_path, capsys):
    root = str(tmp_path)
    for bench, base in (("gqa", 60.0), ("pope", 80.0)):
        put(root, bench, "m", base, method="none", coverage={"answered": 12, "expected": 12, "partial": False})
    put(root, "gqa", "m-pio64", 57.0, method="pio", budget=64.0)
    put(root, "pope", "m-pio64", 100.0, method="pio", budget=64.0,  # over 5 of 12 answers: would read 125 %
        coverage={"answered": 5, "expected": 12, "logged": 5, "partial": True})
    rows = summarize.main(["--data-root", root])
    out = capsys.readouterr().out
    assert "| 64 | pio | m-pio64 | 57.0 | 100.0* |" in out
    assert "POPE is partial (5 of 12 questions answered, 5 logged): marked *, left out of the Avg" in out
    assert rows[1].ratio == pytest.approx(95.0) and rows[1].ratio_benchmarks == ["gqa"]


def _with_profile(root, bench, model, prefill_times, **kw):
    """A result whose answers have a --profile file beside them (as the scripts write), one line per question."""
    answers = os.path.join(root, bench, "answers", f"{model}.jsonl")
    os.makedirs(os.path.dirname(answers), exist_ok=True)
    with open(answers[: -len(".jsonl")] + ".profile.jsonl", "w") as f:
        for qid, t in enumerate(prefill_times):
            f.write(json.dumps({"question_id": qid, "prefill_s": t, "vision_s": 0.5}) + "\n")
    put(root, bench, model, kw.pop("score"), **kw)
    path = os.path.join(root, bench, "results", f"{model}-2025-01-01.json")
    with open(path) as f:
        data = json.load(f)
    data["extra"] = {"result_file": "elsewhere/" + os.path.basename(answers)}  # scored from another folder
    with open(path, "w") as f:
        json.dump(data, f)


def test_plots_from_result_files(tmp_path, capsys):
    from PIL import Image

    from llava.eval import plots

    root = str(tmp_path / "eval")
    for bench, base in (("gqa", 60.0), ("pope", 80.0)):
        _with_profile(root, bench, "m", [3.5, 5.5], score=base, method="none")  # 4 s and 6 s with vision
        for budget in (64, 128, 192):
            for method, drop in (("pio", 1.0), ("fastv", 6.0), ("scan+pio", 0.5)):
                # at 64, prefill with vision 1 s + 2 s on GQA (baseline 10 s), 2 s + 3 s on POPE (baseline 10 s)
                t = [0.5, 1.5] if bench == "gqa" else [1.5, 2.5]
                _with_profile(root, bench, f"m-{method}{budget}", t if budget == 64 else [3.5, 5.5],
                              score=base - drop * 64 / budget, method=method, budget=float(budget))
    put(root, "gqa", "m-odd", 50.0, method="random")  # no budget: not drawn, and said so
    latest = summarize._latest_per_run(read_results(root))
    speed = plots.prefill_speedups(latest, "m")
    assert speed["m-pio64"] == pytest.approx((10 / 3 * 10 / 5) ** 0.5)  # the geometric mean over benchmarks
    assert speed["m-pio192"] == pytest.approx(1.0) and speed["m"] == pytest.approx(1.0)
    assert "m-odd" not in speed  # no profile beside its answers
    out_md = tmp_path / "report" / "table.md"
    summarize.main(["--data-root", root, "--plot", str(tmp_path / "report" / "plots"), "--out-md", str(out_md)])
    text = out_md.read_text()
    assert "![score vs budget](plots/score_vs_budget.png)" in text
    assert "![retention vs speedup](plots/retention_vs_speedup.png)" in text
    assert "runs without a paper budget are not drawn (m-odd)" in text
    for name in ("score_vs_budget.png", "retention_vs_speedup.png"):
        with Image.open(tmp_path / "report" / "plots" / name) as im:
            arr = np.asarray(im.convert("RGB"))
            assert im.size[0] >= 700 and (arr < 128).any() and (arr > 200).any()  # drawn on, not blank
    series = plots._series(summarize.build_accuracy_table(read_results(root), "m"), lambda r: r.ratio)
    assert [b for b, _ in series["pio"]] == [64.0, 128.0, 192.0]
    assert series["fastv"][0][1] == pytest.approx(100 * (54 / 60 + 74 / 80) / 2)


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, data_root):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[viz\]\""):
        summarize.main(["--data-root", data_root, "--baseline", "base", "--plot", str(tmp_path / "p")])


@pytest.mark.parametrize("case,message", [
    ("score", r"gqa/results/broken-2025-01-01\.json: score is 'sixty', allowed: a number or null"),
    ("plot_file", r"--plot .*table\.md is a file; give a folder for the pictures"),
    ("no_matplotlib", r"--plot needs matplotlib, an optional extra: pip install -e \"\.\[viz\]\""),
    ("profile_answers", r"--profile .*a\.jsonl: record 1 has no flops, kv_bytes, so it is not a profile line"),
])
def test_broken_inputs_exit_2_with_one_line(data_root, tmp_path, monkeypatch, capsys, case, message):
    import re
    import sys

    from llava.utils import cli

    argv = ["--data-root", data_root, "--baseline", "base"]
    if case == "score":
        put(data_root, "gqa", "broken", "sixty")  # a hand-edited result file
    elif case == "plot_file":
        (tmp_path / "table.md").write_text("a table\n")
        argv += ["--plot", str(tmp_path / "table.md")]
    elif case == "no_matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        argv += ["--plot", str(tmp_path / "plots")]
    else:
        (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 1, "text": "yes", "metadata": {}}) + "\n")
        argv = ["--profile", str(tmp_path / "a.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        cli(summarize.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "plots").exists()


def test_loyalty_columns(tmp_path, capsys):
    root = str(tmp_path)
    put(root, "gqa", "m", 60.0, method="none")
    put(root, "pope", "m", 80.0, method="none")
    for bench, same, kl in (("gqa", 90.0, 0.2), ("pope", 70.0, 0.4)):
        put(root, bench, "m-pio64", 55.0, method="pio", budget=64.0)
        path = os.path.join(root, bench, "results", "m-pio64-2025-01-01.json")
        with open(path) as f:
            data = json.load(f)
        data["loyalty"] = {"same_answer": same, "first_token_same": 95.0, "first_token_kl": kl, "n": 12}
        with open(path, "w") as f:
            json.dump(data, f)
    csv_path = tmp_path / "t.csv"
    rows = summarize.main(["--data-root", root, "--out-csv", str(csv_path)])
    out = capsys.readouterr().out
    assert rows[1].loyal == pytest.approx(80.0) and rows[1].kl == pytest.approx(0.3)
    assert out.splitlines()[0].endswith("| Avg (%) | Loyal (%) | KL@1 |")
    assert "| 64 | pio | m-pio64 | 55.0 | 55.0 | - |" in out and out.splitlines()[3].endswith("| 80.0 | 0.300 |")
    assert out.splitlines()[2].endswith("| 100.0 | - | - |")  # the unpruned run measures no loyalty
    assert csv_path.read_text().splitlines()[2].endswith(",80.0000,0.3000")


def test_a_method_with_its_own_encoder_stage_is_a_w_ve_row(tmp_path, capsys):
    root = str(tmp_path)
    put(root, "gqa", "m", 60.0, method="none")
    put(root, "gqa", "m-visiondrop64", 58.0, method="visiondrop", budget=64.0)
    put(root, "gqa", "m-visiondrop-llm", 57.0, method="visiondrop", budget=64.0)  # explicit counts: no encoder
    path = os.path.join(root, "gqa", "results", "m-visiondrop64-2025-01-01.json")
    with open(path) as f:
        data = json.load(f)
    data["method_config"] = {"method": "visiondrop", "encoder": {"method": "visiondrop", "tokens": 96}}
    with open(path, "w") as f:
        json.dump(data, f)
    summarize.main(["--data-root", root])
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("| 64 | visiondrop | m-visiondrop-llm |")
    assert lines[4].startswith("| 64 w/ VE | visiondrop | m-visiondrop64 |")


def test_plots_do_not_import_summarize():
    """summarize imports plots for --plot; plots draws the rows it is handed and imports nothing of summarize, so
    the two modules do not import each other."""
    import ast

    from llava.eval import plots

    tree = ast.parse(open(plots.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "llava.eval.summarize" not in imported and "llava.eval.results" in imported
