"""The benchmark shell scripts: syntax, shared helpers (PIO presets, chunking), the exact runner and scorer
calls (against a fake interpreter), and end-to-end runs on a tiny checkpoint with the miniature fixtures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
COMMON = SCRIPTS / "common.sh"
BENCHES = ("gqa", "mme", "pope", "textvqa", "sqa", "mmbench", "mmbench_cn", "vqav2")
FOLDERS = ("v1_5", "next", "qwen2_5_vl", "onevision")  # scripts/<folder>/eval/*.sh, the user-facing names
FOLDER_VARIANT = {"v1_5": "llava-v1.5", "next": "llava-v1.6", "qwen2_5_vl": "qwen2_5_vl",
                  "onevision": "llava-onevision"}  # the model family variant
DEFAULT_MODELS = {"v1_5": "liuhaotian/llava-v1.5-7b", "next": "liuhaotian/llava-v1.6-vicuna-7b",
                  "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct", "onevision": "lmms-lab/llava-onevision-qwen2-7b-ov"}
CONV_MODES = {"v1_5": "vicuna_v1", "next": "vicuna_v1", "qwen2_5_vl": "qwen2_5_vl", "onevision": "qwen_1_5"}
SLOW_FOLDERS = {"onevision"}  # its end-to-end runs are in the slow suite (the registry suite covers it fast)


def e2e_params(cases, fast=None):
    """``cases`` (a folder first in each) for the end-to-end tests: those of :data:`SLOW_FOLDERS`, and those not in
    ``fast`` when it is given, marked slow (``make test-all`` runs them; each script run costs seconds, and the
    fake-interpreter tests above check every script's calls fast)."""
    return [pytest.param(*c, marks=pytest.mark.slow) if c[0] in SLOW_FOLDERS or (fast is not None and c not in fast)
            else c for c in cases]


# fast end-to-end runs: every benchmark on LLaVA-1.5, one script each of the other folders (summarize's test below
# runs POPE unpruned, with PIO and with FastV on LLaVA-1.5 and Qwen2.5-VL)
FAST_E2E = [("v1_5", b) for b in BENCHES] + [("next", "textvqa"), ("qwen2_5_vl", "mmbench")]
# the families with video (tests/test_video_runner.py runs them)
VIDEO_BENCHES = {"qwen2_5_vl": ("videomme",), "onevision": ("videomme",)}
ALL_SCRIPTS = [COMMON, SCRIPTS / "demo.sh"] + [SCRIPTS / f / "eval" / f"{b}.sh" for f in FOLDERS
                                               for b in BENCHES + VIDEO_BENCHES.get(f, ())]
CUSTOM = "--pio-layers 1,10,15 --pio-tokens 92,54,22"

# bench -> (runner module, data dir under DATA_ROOT, result "benchmark" key, chunked)
BENCH_INFO = {
    "gqa": ("llava.eval.model_vqa_loader", "gqa", "gqa", True),
    "mme": ("llava.eval.model_vqa_loader", "MME", "mme", False),
    "pope": ("llava.eval.model_vqa_loader", "pope", "pope", False),
    "textvqa": ("llava.eval.model_vqa_loader", "textvqa", "textvqa", True),
    "vqav2": ("llava.eval.model_vqa_loader", "vqav2", "vqav2", True),
    "sqa": ("llava.eval.model_vqa_science", "scienceqa", "sqa", False),
    "mmbench": ("llava.eval.model_vqa_mmbench", "mmbench", "mmbench", False),
    "mmbench_cn": ("llava.eval.model_vqa_mmbench", "mmbench_cn", "mmbench_cn", False),
}
SCORERS = {"gqa": "eval_gqa", "mme": "eval_mme", "pope": "eval_pope", "textvqa": "eval_textvqa",
           "vqav2": "eval_vqav2", "sqa": "eval_science_qa", "mmbench": "eval_mmbench", "mmbench_cn": "eval_mmbench"}


def bash(snippet: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a bash snippet with common.sh sourced under strict mode."""
    full = f"set -euo pipefail; source {shlex.quote(str(COMMON))}; {snippet}"
    return subprocess.run(["bash", "-c", full], capture_output=True, text=True, env=env, timeout=60)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "MODEL_PATH", "CKPT", "PIO", "PIO_ARGS", "METHOD", "BUDGET", "METHOD_ARGS", "DATA_ROOT", "DEVICE", "DTYPE", "CONV_MODE", "EXTRA_ARGS",
        "PYTHON", "CUDA_VISIBLE_DEVICES", "MME_SCORE", "EVALAI_SCORE", "MIN_PIXELS", "MAX_PIXELS", "SCHEDULE", "BATCH_SIZE")}
    env.update(extra)
    return env


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_bash_syntax(path):
    assert path.is_file()
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", ALL_SCRIPTS[1:], ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_script_conventions(path):
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert not re.search(r"(?<![\w.$}])/(home|mnt|data\d*|root|Users|scratch|nfs)/", text), "machine path"
    assert os.access(path, os.X_OK)


def test_every_family_has_every_benchmark():
    for folder in FOLDERS:
        names = sorted(p.stem for p in (SCRIPTS / folder / "eval").glob("*.sh"))
        assert names == sorted(BENCHES + VIDEO_BENCHES.get(folder, ()))


# --------------------------------------------------------------------------------------------- common.sh


@pytest.mark.parametrize("env,flags,tag,schedule", [
    ({}, "", "", "none"),
    ({"PIO": "none"}, "", "", "none"),
    ({"PIO": "64"}, "--method pio --budget 64", "-pio64", "pio budget=64"),
    ({"PIO": "192"}, "--method pio --budget 192", "-pio192", "pio budget=192"),
    ({"PIO": "custom", "PIO_ARGS": CUSTOM}, "--method pio " + CUSTOM, "-pio-layers-1_10_15-tokens-92_54_22",
     "pio layers=1,10,15 tokens=92,54,22"),
    ({"PIO": "custom", "PIO_ARGS": "  --pio-layers 1,2   --pio-tokens 128,32 "},
     "--method pio --pio-layers 1,2 --pio-tokens 128,32", "-pio-layers-1_2-tokens-128_32", "pio layers=1,2 tokens=128,32"),
    ({"METHOD": "fastv", "BUDGET": "128"}, "--method fastv --budget 128", "-fastv128", "fastv budget=128"),
    ({"METHOD": "dart", "BUDGET": "64", "METHOD_ARGS": "--layers 3"}, "--method dart --budget 64 --layers 3",
     "-dart64-layers-3", "dart budget=64 layers=3"),
    ({"METHOD": "sparsevlm", "METHOD_ARGS": "--tokens 300,200,110"}, "--method sparsevlm --tokens 300,200,110",
     "-sparsevlm-tokens-300_200_110", "sparsevlm tokens=300,200,110"),
])
def test_method_resolve(env, flags, tag, schedule):
    args = " ".join(shlex.quote(env.get(k, "")) for k in ("METHOD", "BUDGET", "METHOD_ARGS", "PIO", "PIO_ARGS"))
    done = bash(f'method_resolve {args}; '
                'printf "%s|%s|%s" "${METHOD_FLAGS[*]+${METHOD_FLAGS[*]}}" "$METHOD_TAG" "$SCHEDULE_TEXT"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{flags}|{tag}|{schedule}"


@pytest.mark.parametrize("env,message", [
    ({"PIO": "256"}, "not one of: none 64 128 192 custom"),
    ({"PIO": "fast"}, "not one of: none 64 128 192 custom"),
    ({"PIO": "custom"}, "PIO=custom needs PIO_ARGS"),
    ({"PIO": "custom", "PIO_ARGS": "   "}, "PIO=custom needs PIO_ARGS"),
    ({"PIO": "64", "METHOD": "fastv"}, "not both"),
    ({"METHOD": "fastv"}, "METHOD=fastv needs BUDGET=64|128|192"),
    ({"BUDGET": "64"}, "BUDGET/METHOD_ARGS need METHOD="),
    ({"METHOD": "Fast V", "BUDGET": "64"}, "is not a method name"),
    ({"METHOD": "a+b+c", "BUDGET": "64"}, "is not a method name"),
    ({"METHOD": "fastv", "BUDGET": "sixty"}, "BUDGET='sixty' is not a number"),
])
def test_method_resolve_rejects(env, message):
    args = " ".join(shlex.quote(env.get(k, "")) for k in ("METHOD", "BUDGET", "METHOD_ARGS", "PIO", "PIO_ARGS"))
    done = bash(f"method_resolve {args}")
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize("cvd,chunks,gpus", [
    (None, 1, ""), ("", 1, ""), ("0", 1, "0"), ("0,1", 2, "0 1"), ("2,3,5", 3, "2 3 5"),
    ("0, 1", 2, "0 1"), ("1,,", 1, "1"), ("GPU-aa,GPU-bb", 2, "GPU-aa GPU-bb"),
])
def test_gpu_chunks(cvd, chunks, gpus):
    env = clean_env() if cvd is None else clean_env(CUDA_VISIBLE_DEVICES=cvd)
    done = bash('gpu_chunks; printf "%s|%s" "$CHUNKS" "${GPULIST[*]+${GPULIST[*]}}"', env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{chunks}|{gpus}"


def test_eval_init_defaults_and_ckpt_name():
    snippet = 'eval_init liuhaotian/llava-v1.5-7b 2>/dev/null; printf "%s\\n" "$CKPT" "$DATA_ROOT" "$PYTHON" "${RUN_FLAGS[*]}"'
    done = bash(snippet, clean_env())
    venv = REPO / ".venv" / "bin" / "python"
    assert done.stdout.splitlines() == [
        "llava-v1.5-7b", "./playground/data/eval", str(venv) if os.access(venv, os.X_OK) else "python",
        "--model-path liuhaotian/llava-v1.5-7b --temperature 0 --conv-mode vicuna_v1"]
    env = clean_env(MODEL_PATH="ckpts/my-llava/", PIO="128", DEVICE="cuda:1", DTYPE="bfloat16",
                    CONV_MODE="llava_v1", EXTRA_ARGS="--max_new_tokens 4  --num_beams 1", BATCH_SIZE="8")
    done = bash(snippet, env)
    assert done.stdout.splitlines()[0] == "my-llava-pio128"
    assert done.stdout.splitlines()[3] == (
        "--model-path ckpts/my-llava/ --temperature 0 --conv-mode llava_v1 --device cuda:1 --dtype bfloat16 "
        "--batch-size 8 --method pio --budget 128 --max_new_tokens 4 --num_beams 1")
    assert bash(snippet, clean_env(CKPT="mine", PIO="64")).stdout.splitlines()[0] == "mine"


# --------------------------------------------------------------------------------------------- fake interpreter

FAKE_PY = r'''#!{python}
"""Stands in for `python -m <module> ...`: logs the call, writes what the module would write."""
import json, os, sys
assert sys.argv[1] == "-m", sys.argv
module, args = sys.argv[2], sys.argv[3:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"module": module, "args": args, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\n")
def opt(name):
    return args[args.index(name) + 1] if name in args else None
idx = opt("--chunk-idx") or "0"
if module.startswith("llava.eval.model_vqa"):
    if os.environ.get("FAKE_FAIL_CHUNK") == idx:
        sys.exit(3)
    if opt("--answers-file"):
        os.makedirs(os.path.dirname(opt("--answers-file")), exist_ok=True)
        with open(opt("--answers-file")[:-len(".jsonl")] + ".run.json", "w") as f:
            json.dump({{"method": opt("--method") or "none", "chunk": int(idx)}}, f)
    for flag, rec in (("--answers-file", {{"question_id": "q" + idx, "text": "yes"}}),
                      ("--pio-log", {{"chunk": int(idx), "avg_visual_tokens": 576.0}}),
                      ("--profile", {{"chunk": int(idx)}})):
        if opt(flag):
            os.makedirs(os.path.dirname(opt(flag)), exist_ok=True)
            with open(opt(flag), "a") as f:
                f.write(json.dumps(rec) + "\n")
elif module.startswith("llava.eval.eval_") and opt("--result-json"):
    os.makedirs(os.path.dirname(opt("--result-json")), exist_ok=True)
    with open(opt("--result-json"), "w") as f:
        json.dump({{"benchmark": module, "model": opt("--model"), "score": 1.0}}, f)
'''


@pytest.fixture
def fake(tmp_path):
    exe = tmp_path / "fakepy"
    exe.write_text(FAKE_PY.format(python=sys.executable))
    exe.chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(script: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        full = clean_env(PYTHON=str(exe), FAKE_LOG=str(log), DATA_ROOT=str(tmp_path / "data"), **env)
        log.unlink(missing_ok=True)
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return done, calls

    run.data = tmp_path / "data"
    return run


def opt(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("bench", BENCHES)
def test_script_calls(fake, folder, bench):
    """Each script runs its runner once per chunk with the shared flags, then the scorer on the merged files."""
    runner, data_dir, _, chunked = BENCH_INFO[bench]
    done, calls = fake(SCRIPTS / folder / "eval" / f"{bench}.sh", PIO="64", DEVICE="cpu", DTYPE="bfloat16",
                       EXTRA_ARGS="--max_new_tokens 4", CUDA_VISIBLE_DEVICES="3,5")
    assert done.returncode == 0, done.stderr
    model = DEFAULT_MODELS[folder]
    ckpt = model.split("/")[1] + "-pio64"
    runs = [c for c in calls if c["module"] == runner]
    scores = [c for c in calls if c["module"] == f"llava.eval.{SCORERS[bench]}"]
    assert len(runs) == (2 if chunked else 1) and len(scores) == 1 and len(calls) == len(runs) + 1
    bench_root = str(fake.data / data_dir)
    for r in runs:
        a = r["args"]
        assert opt(a, "--model-path") == model and opt(a, "--conv-mode") == CONV_MODES[folder]
        assert opt(a, "--temperature") == "0" and opt(a, "--method") == "pio" and opt(a, "--budget") == "64"
        assert opt(a, "--device") == "cpu" and opt(a, "--dtype") == "bfloat16"
        assert opt(a, "--max_new_tokens") == "4" and "--resume" in a
        assert opt(a, "--question-file").startswith(bench_root + "/")
        for flag in ("--answers-file", "--pio-log", "--profile"):
            assert opt(a, flag).startswith(bench_root + "/answers/") and ckpt in opt(a, flag)
        if runner != "llava.eval.model_vqa_loader":
            assert "--single-pred-prompt" in a
        if runner == "llava.eval.model_vqa_mmbench":
            assert opt(a, "--lang") == ("cn" if bench == "mmbench_cn" else "en")
        else:
            assert opt(a, "--image-folder").startswith(bench_root + "/")
    if chunked:
        assert sorted((opt(r["args"], "--chunk-idx"), r["cvd"]) for r in runs) == [("0", "3"), ("1", "5")]
        assert {opt(r["args"], "--num-chunks") for r in runs} == {"2"}
    else:
        assert runs[0]["cvd"] == "3,5" and "--chunk-idx" not in runs[0]["args"]
    s = scores[0]["args"]
    assert opt(s, "--result-json") == f"{bench_root}/results/{ckpt}.json"
    assert opt(s, "--model") == ckpt and opt(s, "--schedule") == "pio budget=64"
    assert re.fullmatch(r"\d+", opt(s, "--wall-time"))
    answers = opt(s, "--result-file")
    if chunked:
        assert answers.endswith("/merge.jsonl") and opt(s, "--pio-log").endswith("/merge.pio.jsonl")
    else:
        assert answers == opt(runs[0]["args"], "--answers-file")
        assert opt(s, "--pio-log") == opt(runs[0]["args"], "--pio-log")
    assert Path(answers).is_file() and Path(opt(s, "--pio-log")).is_file()
    assert json.loads(Path(opt(s, "--result-json")).read_text())["model"] == ckpt


@pytest.mark.parametrize("bench", ["gqa", "textvqa", "vqav2"])
def test_chunks_merge_in_index_order(fake, bench):
    done, calls = fake(SCRIPTS / "v1_5" / "eval" / f"{bench}.sh", CUDA_VISIBLE_DEVICES="0,1,2", CKPT="run")
    assert done.returncode == 0, done.stderr
    merged = Path(opt(calls[-1]["args"], "--result-file"))
    assert [json.loads(x)["question_id"] for x in merged.read_text().splitlines()] == ["q0", "q1", "q2"]
    for kind in ("pio", "profile"):
        lines = (merged.parent / f"merge.{kind}.jsonl").read_text().splitlines()
        assert [json.loads(x)["chunk"] for x in lines] == [0, 1, 2]
    assert json.loads((merged.parent / "merge.run.json").read_text()) == {"method": "none", "chunk": 0}


def test_merges_at_once_replace_whole_files(tmp_path):
    """Two scripts merging the same chunks at the same moment: every merged file is whole, none left temporary."""
    chunk = "".join(json.dumps({"question_id": f"q{i}", "text": "x" * 200}) + "\n" for i in range(500))
    for idx in range(3):
        (tmp_path / f"3_{idx}.jsonl").write_text(chunk)
        (tmp_path / f"3_{idx}.run.json").write_text('{"finished": true}')
    done = bash(f"CHUNKS=3; for i in 1 2 3 4; do merge_chunks {shlex.quote(str(tmp_path))} & done; wait")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merge.jsonl").read_text() == chunk * 3
    assert (tmp_path / "merge.pio.jsonl").read_text() == ""  # no chunk logs: empty, not missing
    assert sorted(p.name for p in tmp_path.glob(".merge*")) == []


def test_failed_chunk_fails_the_script(fake):
    done, calls = fake(SCRIPTS / "v1_5" / "eval" / "gqa.sh", CUDA_VISIBLE_DEVICES="0,1", FAKE_FAIL_CHUNK="1")
    assert done.returncode != 0 and "chunk 1 of 2 failed" in done.stderr
    assert not any(c["module"].startswith("llava.eval.eval_") for c in calls)


def test_unknown_pio_stops_before_running(fake):
    done, calls = fake(SCRIPTS / "next" / "eval" / "pope.sh", PIO="96")
    assert done.returncode == 2 and "none 64 128 192 custom" in done.stderr and calls == []
    done, calls = fake(SCRIPTS / "v1_5" / "eval" / "mme.sh", METHOD="fastv")
    assert done.returncode == 2 and "needs BUDGET" in done.stderr and calls == []


def test_custom_schedule_and_ckpt(fake):
    done, calls = fake(SCRIPTS / "v1_5" / "eval" / "pope.sh", PIO="custom", PIO_ARGS=CUSTOM,
                       MODEL_PATH="/abs/llava-v1.5-13b")
    assert done.returncode == 0, done.stderr
    run, score = calls[0]["args"], calls[1]["args"]
    assert " ".join(run).count(CUSTOM) == 1 and "--budget" not in run
    assert opt(score, "--schedule") == "pio layers=1,10,15 tokens=92,54,22"
    assert opt(score, "--model") == "llava-v1.5-13b-pio-layers-1_10_15-tokens-92_54_22"


def test_vqav2_passes_evalai_score(fake):
    _, calls = fake(SCRIPTS / "v1_5" / "eval" / "vqav2.sh", EVALAI_SCORE="78.5")
    assert opt(calls[-1]["args"], "--evalai-score") == "78.5"
    _, calls = fake(SCRIPTS / "v1_5" / "eval" / "vqav2.sh")
    assert "--evalai-score" not in calls[-1]["args"]


def _flags(args: list[str]) -> set[str]:
    return {a for a in args if a.startswith("--")}


@pytest.fixture(scope="module")
def used_flags(tmp_path_factory) -> dict[str, set[str]]:
    """Every flag each module receives from the scripts, over PIO=none/64/custom and chunked runs."""
    tmp = tmp_path_factory.mktemp("flags")
    exe = tmp / "fakepy"
    exe.write_text(FAKE_PY.format(python=sys.executable))
    exe.chmod(0o755)
    used: dict[str, set[str]] = {}
    for bench in BENCHES:
        for env in ({"PIO": "64", "DEVICE": "cpu", "DTYPE": "float32"},
                    {"PIO": "custom", "PIO_ARGS": CUSTOM, "CUDA_VISIBLE_DEVICES": "0,1"},
                    {"METHOD": "dart", "BUDGET": "64", "METHOD_ARGS": "--layers 2 --dart-pivot-text 3"}):
            log = tmp / f"{bench}.jsonl"
            log.unlink(missing_ok=True)
            full = clean_env(PYTHON=str(exe), FAKE_LOG=str(log), DATA_ROOT=str(tmp / "data"), **env)
            subprocess.run(["bash", str(SCRIPTS / "v1_5" / "eval" / f"{bench}.sh")], env=full, check=True,
                           capture_output=True, timeout=60)
            for call in map(json.loads, log.read_text().splitlines()):
                used.setdefault(call["module"], set()).update(_flags(call["args"]))
    return used


@pytest.mark.parametrize("module", sorted({f"llava.eval.{m}" for m in SCORERS.values()} | {
    "llava.eval.model_vqa_loader", "llava.eval.model_vqa_science", "llava.eval.model_vqa_mmbench"}))
def test_flags_exist_in_module_cli(used_flags, module, capsys):
    """Every flag the scripts pass is defined by the real module's argparse (its ``main(["--help"])``, in process:
    the end-to-end runs below start the modules as the scripts do)."""
    if not have(module):
        pytest.skip(f"{module} is not written yet")
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    defined = set(re.findall(r"--[A-Za-z0-9][\w-]*", capsys.readouterr().out))
    assert used_flags[module] - {"--max_new_tokens"} <= defined, used_flags[module] - defined


# --------------------------------------------------------------------------------------------- end to end

E2E_MODULES = ("llava.model.tiny", "llava.model.builder", "llava.eval.model_vqa_loader",
               "llava.eval.model_vqa_science", "llava.eval.model_vqa_mmbench")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    if not have("llava.model.tiny"):
        pytest.skip("llava.model.tiny is not written yet (tiny checkpoints for the end-to-end runs)")
    if not any(have(m) for m in E2E_MODULES[2:]):
        pytest.skip("no runner (llava.eval.model_vqa_*) is written yet")
    root = tmp_path_factory.mktemp("ckpt")
    out, procs = {}, []
    for folder, variant in FOLDER_VARIANT.items():  # built side by side, by the one tiny-checkpoint CLI
        out[folder] = root / f"{variant}-tiny"
        procs.append(subprocess.Popen([sys.executable, "-m", "llava.model.tiny", "--arch", variant, "--out",
                                       str(out[folder])], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return out


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    from llava.eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("eval"), seed=0, n_per_bench=2)


FOLDER_ENV = {"qwen2_5_vl": {"MIN_PIXELS": "250880", "MAX_PIXELS": "250880"}}
"""The scripts' environment per folder: Qwen2.5-VL at about 320 visual tokens per image (above the tiny
schedules), not 1296."""


def run_e2e(script: Path, ckpt: Path, data: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**FOLDER_ENV.get(script.parts[-3], {}), **env}
    full = clean_env(PYTHON=sys.executable, MODEL_PATH=str(ckpt), DATA_ROOT=str(data), DEVICE="cpu",
                     EXTRA_ARGS="--max_new_tokens 4", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, cwd=REPO,
                          timeout=300)


def check_result(path: Path, benchmark: str, ckpt: str, schedule: str) -> dict:
    assert path.is_file(), f"no result JSON at {path}"
    res = json.loads(path.read_text())
    assert res["benchmark"] == benchmark and res["model"] == ckpt and res["schedule"] == schedule
    assert isinstance(res["wall_time_s"], (int, float))
    assert isinstance(res["avg_visual_tokens"], (int, float)), "the reduction log gave no avg_visual_tokens"
    if benchmark == "vqav2":  # test-dev answers are hidden: a submission file, no local score
        assert res["score"] is None
    else:
        assert isinstance(res["score"], (int, float)) and math.isfinite(res["score"])
    return res


def _skip_without_runners(bench: str) -> None:
    missing = [m for m in E2E_MODULES[:2] + (BENCH_INFO[bench][0],) if not have(m)]
    if missing:
        pytest.skip(f"waiting for {', '.join(missing)} (the end-to-end run turns on once they exist)")


@pytest.mark.parametrize("folder,bench", e2e_params([(f, b) for f in FOLDERS for b in BENCHES], FAST_E2E))
def test_end_to_end(bench, folder, tiny_ckpts, mini_data):
    _skip_without_runners(bench)
    _, data_dir, key, chunked = BENCH_INFO[bench]
    ckpt = tiny_ckpts[folder]
    # One chunked run uses two CPU chunks (parallel path and merge); the fake-interpreter tests cover the rest.
    two = chunked and (bench, folder) == ("gqa", "v1_5")
    done = run_e2e(SCRIPTS / folder / "eval" / f"{bench}.sh", ckpt, mini_data,
                   CUDA_VISIBLE_DEVICES="0,1" if two else "")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = check_result(mini_data / data_dir / "results" / f"{ckpt.name}.json", key, ckpt.name, "none")
    assert res["num_questions"] > 0
    if bench == "vqav2":
        upload = json.loads((mini_data / "vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015"
                             / f"{ckpt.name}.json").read_text())
        every = [json.loads(x)["question_id"] for x in
                 (mini_data / "vqav2/llava_vqav2_mscoco_test2015.jsonl").read_text().splitlines()]
        run = {json.loads(x)["question_id"] for x in
               (mini_data / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl").read_text().splitlines()}
        assert sorted(u["question_id"] for u in upload) == sorted(every)
        assert all(u["answer"] == "" for u in upload if u["question_id"] not in run)


def tiny_method_args(name: str) -> str:
    """METHOD_ARGS for the tiny checkpoints' 4 decoder layers: the method's first schedule in test_methods.CASES
    (its test entry; the paper's layers do not fit)."""
    from tests.test_methods import CASES

    sch, options = CASES[name][0]
    assert not options, "the first case of every method uses its defaults"
    args = "--layers " + ",".join(map(str, sch.layers))
    if sch.tokens is not None:
        return args + " --tokens " + ",".join(map(str, sch.tokens))
    return args + " --ratios " + ",".join(f"{r:g}" for r in sch.ratios)


def _method_names() -> list[str]:
    from pio import method_names

    return method_names()


def _tiny_run(name: str) -> tuple[str, str]:
    """(BUDGET, METHOD_ARGS) of a method or composition on the tiny checkpoints (4 decoder layers, a 2-layer
    vision tower: the scan's shallow layer is 0 there)."""
    from pio import get_method

    scan = " --scan-local-layer 0" if name.startswith("scan") else ""
    if "+" in name:  # the w/ VE composition, its in-LLM stage after layer 2 of 4
        return "64", "--layers 2" + scan
    if get_method(name).where == "pre_llm":
        return "64", scan.strip()
    return "", tiny_method_args(name)


def family_of(folder: str):
    from llava.model.families import variants

    return variants()[FOLDER_VARIANT[folder]]


def runs_on(method: str, folder: str) -> bool:
    """Whether the folder's model family runs ``method``: an encoder-side method needs what it requires of the
    vision tower (Qwen2.5-VL's has no CLS token: methods that read the CLS attention do not run there, they say
    so; DivPrune and the authors' scan do)."""
    from pio import get_method

    pre = get_method(method.split("+")[0])
    return pre.where != "pre_llm" or pre.runs_on(family_of(folder).tower)


METHOD_NAMES = _method_names() + ["scan+pio"]
TINY_METHODS = {name: _tiny_run(name) for name in METHOD_NAMES}
TINY_METHODS["pio"] = ("192", "--layers 1,2")  # one in-LLM method through BUDGET as well
# every script once with a method, the methods taken in turn (each on several scripts of every folder)
FOLDER_METHODS = {f: [m for m in METHOD_NAMES if runs_on(m, f)] for f in FOLDERS}
ROTATION = [(f, b, FOLDER_METHODS[f][(k * len(BENCHES) + j) % len(FOLDER_METHODS[f])])
            for k, f in enumerate(FOLDERS) for j, b in enumerate(BENCHES)]
# a family whose folders have fewer scripts than it runs methods (Qwen2.5-VL: one folder) takes the ones left round
# once more on its first folder (LLaVA-1.5 and LLaVA-NeXT share their family's methods between them)
for _first in FOLDERS:
    _mine = [f for f in FOLDERS if family_of(f) is family_of(_first)]
    if _first == _mine[0]:
        _left = [m for m in FOLDER_METHODS[_first] if m not in {x for f, _, x in ROTATION if f in _mine}]
        ROTATION += [(_first, b, m) for b, m in zip(BENCHES, _left)]


# fast: the first rotation run of a composition (an encoder stage before the language model) and the first on each
# folder after LLaVA-1.5; the others in the slow suite
FAST_ROTATION = [next(r for r in ROTATION if "+" in r[2])] + [next(r for r in ROTATION if r[0] == f) for f in FOLDERS[1:]
                                                             if f not in SLOW_FOLDERS]


def test_rotation_covers_every_method():
    assert {m for _, _, m in ROTATION} == set(METHOD_NAMES)
    assert {m for f, _, m in ROTATION if f == "qwen2_5_vl"} == set(FOLDER_METHODS["qwen2_5_vl"])
    assert {"divprune", "scan", "scan+pio"} <= set(FOLDER_METHODS["qwen2_5_vl"])


def test_qwen_refuses_cls_attention_methods(tiny_ckpts, mini_data):
    done = run_e2e(SCRIPTS / "qwen2_5_vl" / "eval" / "pope.sh", tiny_ckpts["qwen2_5_vl"], mini_data,
                   METHOD="visionzip", BUDGET="64")
    assert done.returncode == 2 and "visionzip needs the CLS attention" in done.stderr


def run_method_e2e(folder: str, bench: str, method: str, ckpt: Path, data: Path) -> dict:
    _skip_without_runners(bench)
    _, data_dir, key, _ = BENCH_INFO[bench]
    budget, args = TINY_METHODS[method]
    done = run_e2e(SCRIPTS / folder / "eval" / f"{bench}.sh", ckpt, data, METHOD=method, BUDGET=budget,
                   METHOD_ARGS=args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tag = "".join(w.strip("-").replace(",", "_") + "-" for w in args.split())[:-1]
    name = f"{ckpt.name}-{method}{budget}" + (f"-{tag}" if tag else "")
    text = f"{method}{' budget=' + budget if budget else ''}" + "".join(
        f" {a.strip('-')}={b}" for a, b in zip(args.split()[::2], args.split()[1::2]))
    res = check_result(data / data_dir / "results" / f"{name}.json", key, name, text)
    assert res["method"] == method and res["method_config"]["method"] == method
    if method in ("visionzip", "scope", "scan+pio"):
        assert all(r["n_encoder"] > r["n_visual"] for r in map(json.loads, Path(res["extra"]["pio_log"])
                                                           .read_text().splitlines()) if r["n_visual"])
    assert res["budget"] == (float(budget) if budget else None)
    logged = [json.loads(x) for x in Path(res["extra"]["pio_log"]).read_text().splitlines()]
    assert logged and all(r["avg_visual_tokens"] < (r.get("n_encoder") or r["n_visual"]) for r in logged if r["n_visual"])
    return res


@pytest.mark.parametrize("folder,bench,method", e2e_params(ROTATION, FAST_ROTATION))
def test_end_to_end_with_method(folder, bench, method, tiny_ckpts, mini_data):
    run_method_e2e(folder, bench, method, tiny_ckpts[folder], mini_data)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("bench", BENCHES)
def test_end_to_end_every_method(bench, folder, method, tiny_ckpts, tmp_path_factory):
    """The full matrix (every script x every method the folder runs): ``make test-all``."""
    from llava.eval.fixtures import write_fixtures

    if not runs_on(method, folder):
        pytest.skip(f"{method} reads CLS attention, which {folder} does not have")
    data = write_fixtures(tmp_path_factory.mktemp("eval"), seed=0, n_per_bench=2)
    run_method_e2e(folder, bench, method, tiny_ckpts[folder], data)


@pytest.mark.parametrize("folder", ["v1_5", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_summarize_builds_the_table_from_the_scripts(tiny_ckpts, mini_data, capsys, folder):
    """The unpruned and method runs of the scripts above (run here when missing) in the paper's layout."""
    from llava.eval import summarize

    ckpt = tiny_ckpts[folder]
    for method in ("pio", "fastv"):
        if not list((mini_data / "pope" / "results").glob(f"{ckpt.name}-{method}*.json")):
            run_method_e2e(folder, "pope", method, ckpt, mini_data)
    if not (mini_data / "pope" / "results" / f"{ckpt.name}.json").is_file():
        assert run_e2e(SCRIPTS / folder / "eval" / "pope.sh", ckpt, mini_data).returncode == 0
    plots = mini_data.parent / f"plots-{folder}"
    rows = summarize.main(["--data-root", str(mini_data), "--runs", f"{ckpt.name}*", "--plot", str(plots)])
    out = capsys.readouterr().out
    for name in ("score_vs_budget.png", "retention_vs_speedup.png"):  # the scripts write profiles beside answers
        assert (plots / name).stat().st_size > 10_000 and f"]({os.path.relpath(plots / name)})" in out
    assert rows[0].is_baseline and rows[0].method == "none" and rows[0].ratio == pytest.approx(100.0)
    methods = {r.method for r in rows[1:]}
    assert {"pio", "fastv"} <= methods
    for r in rows[1:]:  # random tiny weights score 0 on some benchmarks: those stay out of the ratio
        shared = [b for b, v in r.scores.items() if v is not None and rows[0].scores.get(b)]
        assert (r.ratio is not None) == bool(shared) and r.avg_tokens is not None and r.avg_tokens < 576
    assert "| all | vanilla |" in out and "| 192 | pio |" in out and "| - | fastv |" in out and "Avg (%)" in out


@pytest.mark.slow
def test_demo(tmp_path):
    for module in E2E_MODULES + ("llava.eval.summarize",):
        if not have(module):
            pytest.skip(f"waiting for {module}")
    env = clean_env(PYTHON=sys.executable, DEMO_OUT=str(tmp_path / "demo"), HF_HUB_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(["bash", str(SCRIPTS / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(p.name for p in (tmp_path / "demo/data/eval").glob("*/results/*.json"))
    assert len(results) == 6 and "| 192 | pio |" in done.stdout and "| 192 | fastv |" in done.stdout
