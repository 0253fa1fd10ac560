"""The schedule optimiser on a tiny 32-layer checkpoint: budget met, held-out divergence no worse than the
default's, resumable to the same result, and its schedule file through the runners and the scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import tune
from pio.schedule import Schedule, average_visual_tokens
from tests.helpers import image

REPO = Path(__file__).resolve().parents[1]
DEPTH = 32  # the 7B models' depth: every method's default schedule meets 64 there


@pytest.fixture(scope="module")
def deep_v15(tmp_path_factory) -> str:
    from llava.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny32", "llava-v1.5", seed=4,
                                     layers=DEPTH))


@pytest.fixture(scope="module")
def loaded(deep_v15):
    from tests.helpers import load

    tok, model, proc, _ = load(deep_v15)
    return tok, model, proc, "llava-v1.5-tiny32"


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("calib")
    (root / "images").mkdir()
    lines = []
    for i in range(8):
        image(*[(400, 300), (336, 336), (300, 420)][i % 3], seed=10 + i).save(root / "images" / f"c{i}.png")
        lines.append({"question_id": i, "image": f"c{i}.png", "text": f"What is at place {i}?"})
    qfile = root / "calib.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return qfile, root / "images"


def _args(ckpt, calib, out, *extra):
    qfile, images = calib
    return tune.build_parser().parse_args(["--model-path", ckpt, "--question-file", str(qfile), "--image-folder",
                                           str(images), "--out", str(out), "--device", "cpu", "--conv-mode",
                                           "vicuna_v1", "--answer-tokens", "3", *extra])


@pytest.mark.parametrize("method,trials", [("pio", 24), ("fastv", 12)])
def test_tuned_schedule_meets_the_budget_and_holds_out(deep_v15, loaded, calib, tmp_path, method, trials):
    out = tune.run(_args(deep_v15, calib, tmp_path / "s.json", "--method", method, "--budget", "64", "--trials",
                         str(trials)), loaded)
    layers, counts = out["report"]["found"]["layers"], out["report"]["found"]["tokens_at_576"]
    avg = average_visual_tokens(576, layers, counts, DEPTH)
    if method == "pio":  # several stages: integer counts meet 64 exactly
        assert avg == pytest.approx(64.0, abs=1e-12)
    else:  # one stage after layer K: as close as whole tokens allow
        assert abs(avg - 64.0) * DEPTH <= (DEPTH - layers[-1]) / 2
    rep = out["report"]
    chosen = rep[out["chosen"]]
    assert chosen["holdout_kl"] <= rep["default"]["holdout_kl"] + 1e-12
    assert rep["found"]["search_kl"] <= rep["default"]["search_kl"] + 1e-12  # the search never ends worse
    assert out["search"]["trials"] <= trials and out["calibration"] == {
        "question_file": str(calib[0]), "questions": 8, "search": 6, "holdout": 2}
    # the file's schedule gives the chosen counts to a 576-token image, through the runners' flag
    assert Schedule.from_dict(out["schedule"]).counts(576, DEPTH) == out["tokens_at_576"] == chosen["tokens_at_576"]
    from pio.cli import method_from_args

    ns = tune.build_parser().parse_args(["--question-file", "x", "--out", "y", "--schedule-file",
                                         str(tmp_path / "s.json")])
    m = method_from_args(ns)
    assert m.name == method and list(m.schedule.counts(576, DEPTH)) == out["tokens_at_576"]


def test_killed_search_resumes_to_the_same_schedule(deep_v15, loaded, calib, tmp_path, monkeypatch):
    whole = tune.run(_args(deep_v15, calib, tmp_path / "a.json", "--method", "pio", "--budget", "64", "--trials",
                           "14"), loaded)
    calls = {"n": 0}
    real = tune.Evaluator.divergence

    def dies(self, method, which):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # the search stops here, as a kill would
        return real(self, method, which)

    monkeypatch.setattr(tune.Evaluator, "divergence", dies)
    with pytest.raises(KeyboardInterrupt):
        tune.run(_args(deep_v15, calib, tmp_path / "b.json", "--method", "pio", "--budget", "64", "--trials", "14"),
                 loaded)
    state = json.loads((tmp_path / "b.json.state").read_text())
    assert len(state["evaluated"]) == 5 and not (tmp_path / "b.json").exists()
    monkeypatch.setattr(tune.Evaluator, "divergence", real)
    resumed = tune.run(_args(deep_v15, calib, tmp_path / "b.json", "--method", "pio", "--budget", "64", "--trials",
                             "14"), loaded)
    assert resumed["report"] == whole["report"] and resumed["schedule"] == whole["schedule"]
    with pytest.raises(ValueError, match="holds a search with other settings.*budget"):
        tune.run(_args(deep_v15, calib, tmp_path / "b.json", "--method", "pio", "--budget", "128"), loaded)


def test_bad_requests_are_named(deep_v15, calib, tmp_path):
    with pytest.raises(ValueError, match="in-LLM method"):
        tune.run(_args(deep_v15, calib, tmp_path / "x.json", "--method", "visionzip", "--budget", "64"))
    with pytest.raises(ValueError, match="--budget B"):
        tune.run(_args(deep_v15, calib, tmp_path / "x.json", "--method", "pio", "--tokens", "92,54,22"))
    from pio.cli import method_from_args

    (tmp_path / "bad.json").write_text("{}")
    for extra, msg in ((["--schedule-file", str(tmp_path / "bad.json")], "not a schedule file"),
                       (["--schedule-file", str(tmp_path / "none.json")], "no such file")):
        ns = tune.build_parser().parse_args(["--question-file", "x", "--out", "y", *extra])
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            method_from_args(ns)


def test_a_broken_or_stale_state_is_refused(deep_v15, loaded, calib, tmp_path, capsys):
    """A state file cut short is named before the model loads; a state saved for weights since overwritten in place
    (same sizes) is a search of another model (the run identity's fingerprint, llava.eval.fingerprint)."""
    import shutil

    from llava.utils import cli

    out = tmp_path / "s.json"
    (tmp_path / "s.json.state").write_text('{"config": {"model": ')
    argv = ["--model-path", deep_v15, "--question-file", str(calib[0]), "--image-folder", str(calib[1]), "--out",
            str(out), "--device", "cpu", "--conv-mode", "vicuna_v1", "--method", "pio", "--budget", "64"]
    with pytest.raises(SystemExit) as exit_info:
        cli(tune.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "--state " + str(tmp_path / "s.json.state") + ": not a search state of python -m llava.eval.tune" in err[0]
    (tmp_path / "s.json.state").unlink()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(deep_v15, ckpt)
    two = tmp_path / "two.jsonl"  # the smallest calibration: one question searched, one held out
    two.write_text("".join(calib[0].read_text().splitlines(keepends=True)[:2]))
    calib = (two, calib[1])
    args = ("--method", "pio", "--budget", "64", "--trials", "1")
    tune.run(_args(str(ckpt), calib, out, *args), loaded)
    weights = ckpt / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size - 16)
        f.write(bytes(16))
    assert weights.stat().st_size == size
    with pytest.raises(ValueError, match=r"holds a search with other settings \(model\.files\.model\.safetensors: "):
        tune.run(_args(str(ckpt), calib, out, *args), loaded)


def test_schedule_file_through_the_pope_script_with_loyalty(deep_v15, loaded, calib, tmp_path):
    """SCHEDULE=file runs pope.sh, the result JSON records the file and the tuned schedule, and summarize prints
    the run's loyalty to the unpruned run (EXTRA_ARGS --loyalty-to)."""
    from llava.eval import summarize
    from llava.eval.fixtures import write_fixtures
    from tests.test_scripts import clean_env

    sched = tmp_path / "pio64.schedule.json"
    out = tune.run(_args(deep_v15, calib, sched, "--method", "pio", "--budget", "64", "--trials", "6"), loaded)
    data = write_fixtures(tmp_path / "eval", seed=0, n_per_bench=2)
    env = clean_env(PYTHON=sys.executable, MODEL_PATH=deep_v15, DATA_ROOT=str(data), DEVICE="cpu",
                    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                    EXTRA_ARGS="--max_new_tokens 4")
    script = ["bash", str(REPO / "scripts" / "v1_5" / "eval" / "pope.sh")]
    done = subprocess.run(script, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    base_answers = data / "pope" / "answers" / "llava-v1.5-tiny32.jsonl"
    env.update(SCHEDULE=str(sched), EXTRA_ARGS=f"--max_new_tokens 4 --loyalty-to {base_answers}")
    done = subprocess.run(script, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((data / "pope" / "results" / "llava-v1.5-tiny32-tuned-pio64.json").read_text())
    assert res["extra"]["schedule_file"] == str(sched) and res["budget"] == 64.0 and res["method"] == "pio"
    assert res["method_config"]["schedule"] == out["schedule"]
    assert res["loyalty"]["n"] == res["coverage"]["answered"] > 0
    rows = summarize.main(["--data-root", str(data)])
    tuned = next(r for r in rows if r.model == "llava-v1.5-tiny32-tuned-pio64")
    assert tuned.loyal == pytest.approx(res["loyalty"]["same_answer"]) and tuned.kl is not None
    env.update(BUDGET="64")
    done = subprocess.run(script, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "drop BUDGET" in done.stderr


def test_vflowopt_search_keeps_the_layers_and_maximises_the_cosine(deep_v15, loaded, calib, tmp_path):
    """VFlowOpt's strategy: layers fixed, per-stage ratios by Bayesian optimisation of the hidden-state cosine;
    seeded, so a second search from an empty state gives the same schedule."""
    outs = [tune.run(_args(deep_v15, calib, tmp_path / f"v{i}.json", "--method", "pio", "--budget", "64", "--trials",
                           "10", "--strategy", "vflowopt", "--objective", "cosine"), loaded) for i in range(2)]
    found, default = outs[0]["report"]["found"], outs[0]["report"]["default"]
    assert found["layers"] == default["layers"] == [1, 10, 15]
    assert average_visual_tokens(576, found["layers"], found["tokens_at_576"], DEPTH) == pytest.approx(64.0)
    assert found["search_cosine"] >= default["search_cosine"] and 0 < found["search_cosine"] <= 1 + 1e-9
    assert outs[1]["report"] == outs[0]["report"] and outs[0]["search"]["trials"] == 10
