"""The project's runners and chunked scripts under torchrun (``NPROC_PER_NODE``, ``NNODES`` ...): each rank answers
its chunk into files of its own, the script merges them after the launch into the answers a single process
writes; a rank killed by SIGKILL is resumed by launching again; another method on the same answers is refused.

Real processes (``python -m torch.distributed.run``; the ranks need no process group, so no gloo), a tiny
checkpoint and the GQA fixture. Launcher variables and runner flags are checked without a model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from llava.eval import model_vqa_loader, runner
from tests import test_scripts
from tests.test_concurrency import SITECUSTOMIZE, cleanup, errors, holder_pid, lines, wait_for
from tests.test_reliability import read, stable
from tests.test_scripts import SCRIPTS, bash, opt, tiny_method_args

fake = test_scripts.fake  # the fake interpreter of the script tests (a fixture)

REPO = Path(__file__).resolve().parents[1]
GQA = SCRIPTS / "v1_5" / "eval" / "gqa.sh"
LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
SCRIPT_VARS = ("MODEL_PATH", "CKPT", "PIO", "PIO_ARGS", "METHOD", "BUDGET", "METHOD_ARGS", "DATA_ROOT", "DEVICE",
               "DTYPE", "CONV_MODE", "EXTRA_ARGS", "PYTHON", "CUDA_VISIBLE_DEVICES", "SCHEDULE", *LAUNCH_VARS,
               "WORLD_SIZE", "RANK", "LOCAL_RANK")


def env_of(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", **extra}


# --------------------------------------------------------------------------------------- launcher variables
@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0' is not a whole number >= 1"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two' is not a whole number >= 1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "-1"}, "NNODES='-1' is not a whole number >= 1"),
    ({"NNODES": "2"}, "NNODES/NODE_RANK need NPROC_PER_NODE"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK='' is not one of 0..1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK='2' is not one of 0..1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "9", "NODE_RANK": "09", "MASTER_ADDR": "h"}, "NODE_RANK='09' is not one of 0..8"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "x"},
     "MASTER_PORT='x' is not a port number"),
    ({"NPROC_PER_NODE": "2", "NODE_RANK": "1"}, "NODE_RANK='1' with NNODES=1"),
    ({"NPROC_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, "NPROC_PER_NODE=4 but CUDA_VISIBLE_DEVICES lists 2"),
])
def test_bad_launcher_variables_are_one_line(env, message):
    done = bash("eval_init m", env_of(**env))
    assert done.returncode == 2
    msgs = errors(done.stderr)
    assert len(msgs) == 1 and message in msgs[0], done.stderr


@pytest.mark.parametrize("env, chunks, launch", [
    ({}, "1", ""),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3", ""),
    ({"NPROC_PER_NODE": "8"}, "8", "--standalone --nproc_per_node 8"),
    ({"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "4,5,6"}, "2", "--standalone --nproc_per_node 2"),
    ({"NPROC_PER_NODE": "8", "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.1.2.3"}, "32",
     "--nnodes 4 --node_rank 3 --master_addr 10.1.2.3 --master_port 29500 --nproc_per_node 8"),
])
def test_launcher_variables(env, chunks, launch):
    done = bash('eval_init m 2>/dev/null; printf "%s|%s" "$CHUNKS" "${LAUNCH_ARGS[*]:-}"', env_of(**env))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{chunks}|{launch}"


def test_other_nodes_stop_after_their_ranks_and_node_0_merges_only_finished_chunks(fake):
    """The script hands torchrun the launcher's arguments and every rank's files as ``2x2_{rank}``; a node other than
    0 ends after torchrun, node 0 merges, refusing chunks whose run file says they did not finish."""
    nodes = {"NPROC_PER_NODE": "2", "NNODES": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "CKPT": "run"}
    done, calls = fake(GQA, NODE_RANK="1", **nodes)
    assert done.returncode == 0, done.stderr
    assert [c["module"] for c in calls] == ["torch.distributed.run"]  # no merge, no scoring on node 1
    args = calls[0]["args"]
    assert args[:12] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "node0", "--master_port", "29400",
                         "--nproc_per_node", "2", "-m", "llava.eval.model_vqa_loader"]
    assert "--num-chunks" not in args and "--chunk-idx" not in args and "--resume" in args
    out = fake.data / "gqa" / "answers" / "llava_gqa_testdev_balanced" / "run"
    assert [opt(args, f) for f in ("--answers-file", "--pio-log", "--profile")] == [
        f"{out}/4_{{rank}}{kind}.jsonl" for kind in ("", ".pio", ".profile")]
    assert "node 1 of 2: its ranks are done" in done.stderr

    out.mkdir(parents=True, exist_ok=True)
    for rank in range(4):  # what the four ranks wrote; rank 2 (node 1) is still running
        (out / f"4_{rank}.jsonl").write_text(json.dumps({"question_id": f"q{rank}"}) + "\n")
        finished = "null" if rank == 2 else "true"
        (out / f"4_{rank}.run.json").write_text(f'{{"invocations": [{{"finished": true}}, {{"finished": {finished}}}'
                                                "]}\n")
    done, calls = fake(GQA, NODE_RANK="0", **nodes)
    assert done.returncode != 0 and not any(c["module"].startswith("llava.eval.eval_") for c in calls)
    assert "chunk 2 of 4 has not finished" in done.stderr and not (out / "merge.jsonl").exists()
    (out / "4_2.run.json").write_text('{"invocations": [{"finished": true}]}\n')
    done, calls = fake(GQA, NODE_RANK="0", **nodes)
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["question_id"] for x in (out / "merge.jsonl").read_text().splitlines()] == [
        "q0", "q1", "q2", "q3"]
    assert calls[-1]["module"] == "llava.eval.eval_gqa"


# --------------------------------------------------------------------------------------- the runner's side
def runner_args(**kw) -> argparse.Namespace:
    base = {"answers_file": "a/2_{rank}.jsonl", "pio_log": "a/2_{rank}.pio.jsonl", "profile": None,
            "num_chunks": 1, "chunk_idx": 0, "device": "cpu"}
    return argparse.Namespace(**{**base, **kw})


def test_a_rank_takes_its_chunk_and_its_files():
    args = runner_args()
    runner.join_launcher(args, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (args.num_chunks, args.chunk_idx) == (2, 1)
    assert (args.answers_file, args.pio_log, args.profile) == ("a/2_1.jsonl", "a/2_1.pio.jsonl", None)
    plain = runner_args(answers_file="a.jsonl", pio_log=None, num_chunks=3, chunk_idx=2)
    runner.join_launcher(plain, {})  # no launcher: nothing changes
    assert (plain.answers_file, plain.num_chunks, plain.chunk_idx) == ("a.jsonl", 3, 2)


def test_a_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(runner.torch.cuda, "set_device", chosen.append)
    for device, expected in ((None, "cuda:1"), ("cuda", "cuda:1"), ("cpu", "cpu"), ("cuda:0", "cuda:0")):
        args = runner_args(device=device)
        runner.join_launcher(args, {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
        assert args.device == expected
    assert chosen == [1, 1]
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but this node sees 2 CUDA device\(s\)"):
        runner.join_launcher(runner_args(device=None), {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"})


@pytest.mark.parametrize("kw, environ, message", [
    ({}, {}, "{rank} is filled in with the rank under torchrun only"),
    ({"pio_log": "a/log.jsonl"}, {"WORLD_SIZE": "2", "RANK": "0"}, "--pio-log a/log.jsonl under torchrun"),
    ({"num_chunks": 4, "chunk_idx": 1}, {"WORLD_SIZE": "2", "RANK": "0"}, "the ranks are the chunks"),
    ({}, {"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 in the environment is not in [0, WORLD_SIZE=2)"),
    ({}, {"WORLD_SIZE": "x", "RANK": "0"}, "WORLD_SIZE='x' in the environment is not a whole number"),
])
def test_bad_launcher_setups_are_named(kw, environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.join_launcher(runner_args(**kw), environ)


# --------------------------------------------------------------------------------------- real launches
@pytest.fixture(scope="module")
def gqa_data(tmp_path_factory) -> Path:
    from llava.eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("eval"), seed=0, n_per_bench=5, benchmarks=["gqa"])


def one_process(ckpt: str, data: Path, out: Path) -> Path:
    """The answers of one process with the script's flags (scripts/common.sh eval_init, run_chunks)."""
    model_vqa_loader.main([
        "--question-file", str(data / "gqa" / "llava_gqa_testdev_balanced.jsonl"),
        "--image-folder", str(data / "gqa" / "data" / "images"), "--model-path", ckpt, "--temperature", "0",
        "--conv-mode", "vicuna_v1", "--device", "cpu", "--max_new_tokens", "3", "--resume",
        "--answers-file", str(out / "one.jsonl"), "--pio-log", str(out / "one.pio.jsonl"),
        "--profile", str(out / "one.profile.jsonl")])
    return out / "one.jsonl"


class Launched(NamedTuple):
    one: Path  # the answers of one process
    out: Path  # the script's answers folder after two launches under torchrun
    env: dict[str, str]  # the script's environment


@pytest.fixture(scope="module")
def launched(tiny_v15, gqa_data, tmp_path_factory) -> Launched:
    """One process's answers; then the GQA script under a 2-process torchrun launch killed (SIGKILL of rank 1) while
    each rank has answered one question, and launched again."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    one = one_process(tiny_v15, gqa_data, tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    gate = tmp_path / "gate"  # never opened: the first launch is killed while its ranks wait at their 2nd image
    base = env_of(PYTHON=sys.executable, MODEL_PATH=tiny_v15, DATA_ROOT=str(gqa_data), DEVICE="cpu", CKPT="tr",
                  EXTRA_ARGS="--max_new_tokens 3", NPROC_PER_NODE="2",
                  PYTHONPATH=os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = gqa_data / "gqa" / "answers" / "llava_gqa_testdev_balanced" / "tr"
    rank_files = [out / f"2_{r}.jsonl" for r in range(2)]
    first = subprocess.Popen(["bash", str(GQA)], cwd=REPO, text=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True,
                             env={**base, "PIO_TEST_GATE": str(gate), "PIO_TEST_GATE_AFTER": "1"})
    with cleanup([first]):
        wait_for(lambda: all(lines(f) == 1 for f in rank_files), [first], "an answer from each rank")
        killed = holder_pid(rank_files[1])
        os.kill(killed, signal.SIGKILL)
        _, err = first.communicate(timeout=120)
    assert first.returncode != 0 and "error: torchrun --standalone --nproc_per_node 2 failed" in err, err[-3000:]
    assert not (out / "merge.jsonl").exists()

    again = subprocess.run(["bash", str(GQA)], cwd=REPO, text=True, capture_output=True, env=base, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the lock of {rank_files[1]} from pid {killed}" in again.stderr
    return Launched(one, out, base)


def test_torchrun_merges_to_one_process_and_a_killed_rank_resumes(launched, gqa_data):
    one, out = launched.one, launched.out
    for kind in ("", ".pio", ".profile"):  # the merged files are one process's (the same run hash in every line)
        merged, single = read(out / f"merge{kind}.jsonl"), read(one.parent / f"one{kind}.jsonl")
        assert len(merged) == 5 and stable(merged) == stable(single), kind
    assert [r["text"] for r in read(out / "merge.jsonl")] == [r["text"] for r in read(one)]
    rank1 = json.loads((out / "2_1.run.json").read_text())
    assert [x["finished"] for x in rank1["invocations"]] == [None, True]  # killed, then resumed
    assert rank1["identity"]["shard"] == {"index": 1, "count": 2}
    result = json.loads((gqa_data / "gqa" / "results" / "tr.json").read_text())
    assert result["coverage"]["answered"] == 5 and not result["coverage"]["partial"]


@pytest.mark.slow
def test_torchrun_refuses_another_method_on_the_same_answers(launched):
    out = launched.out
    before = {f.name: f.read_text() for f in out.glob("2_*")}
    other = subprocess.run(["bash", str(GQA)], cwd=REPO, text=True, capture_output=True, timeout=300,
                           env={**launched.env, "METHOD": "fastv", "METHOD_ARGS": tiny_method_args("fastv")})
    assert other.returncode != 0
    refusals = [m for m in errors(other.stderr) if not m.startswith("error: torchrun")]
    assert len(refusals) == 2, other.stderr[-3000:]  # one line from each rank
    assert all("was written by a different run" in m and "method" in m for m in refusals)
    assert {f.name: f.read_text() for f in out.glob("2_*")} == before
