"""Nothing lost, nothing stale: answers are never destroyed, --resume continues only the same run, answers and
logs stay in step, repeated questions are named, sampling resumes exactly, and SIGKILL at random points loses
nothing."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.eval import model_vqa_loader
from llava.eval.runfiles import RunMismatchError
from tests.helpers import image

REPO = Path(__file__).resolve().parents[1]
SUFFIX = "\nAnswer the question using a single word or phrase."


def write_questions(root: Path, n: int, repeat_first: bool = False) -> Path:
    imgs = root / "images"
    imgs.mkdir(exist_ok=True)
    for i, size in enumerate([(400, 300), (336, 336), (200, 500), (640, 427)]):
        image(*size, seed=i).save(imgs / f"im{i}.png")
    lines = [{"question_id": f"q{i % 7}", "image": f"im{i % 4}.png", "text": f"What is object {i}?" + SUFFIX}
             for i in range(n)]  # ids repeat with different questions, as MME's and TextVQA's do
    if repeat_first:
        lines.append(dict(lines[0]))
    qfile = root / "q.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return qfile


def loader_args(ckpt, qfile: Path, answers: Path, *extra: str) -> list[str]:
    return ["--model-path", str(ckpt), "--question-file", str(qfile), "--image-folder", str(qfile.parent / "images"),
            "--answers-file", str(answers), "--conv-mode", "vicuna_v1", "--max_new_tokens", "3", "--device", "cpu",
            *extra]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def stable(rows: list[dict]) -> list[dict]:
    """Lines without what is random or timed by design (answer ids; times and memory in profiles)."""
    drop = {"answer_id", "prefill_s", "vision_s", "decode_s", "total_s", "selection_s", "peak_rss_bytes",
            "peak_memory_bytes"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_a_failed_run_leaves_earlier_answers_as_they_were(tiny_v15, tmp_path):
    qfile = write_questions(tmp_path, 3)
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers))
    before = answers.read_text()
    with pytest.raises(ValueError, match=r"already holds 3 answer line\(s\); pass --resume .* or --overwrite"):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, answers))
    (qfile.parent / "images" / "im2.png").write_bytes(b"not an image")  # fails after the model loaded
    with pytest.raises(ValueError, match="cannot read image"):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--overwrite"))
    assert answers.read_text() == before and not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="--pio-tau must be in"):  # a bad flag, the same
        model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--overwrite", "--method", "pio",
                                          "--budget", "192", "--layers", "1", "--pio-tau", "2"))
    assert answers.read_text() == before


@pytest.mark.parametrize("change,named", [
    (["--max_new_tokens", "4"], "decoding.max_new_tokens: 3 -> 4"),  # what EXTRA_ARGS changes
    (["--method", "fastv", "--tokens", "64", "--layers", "2"], "method: None -> "),
    (["--pio-layers", "1", "--pio-tokens", "100"], "method: None -> "),
    (["--pio-log", "LOG"], "files.log: False -> True"),
])
def test_resume_continues_only_the_same_run(tiny_v15, tmp_path, change, named):
    qfile = write_questions(tmp_path, 3)
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--resume"))
    change = [str(tmp_path / "log.jsonl") if c == "LOG" else c for c in change]
    with pytest.raises(RunMismatchError, match=r"written by a different run.*" + named.replace(".", r"\.")):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--resume", *change))
    other = tmp_path / "other-model"
    shutil.copytree(tiny_v15, other)
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes() + b"\0")
    with pytest.raises(RunMismatchError, match=r"model_path: .* -> .*other-model.*weights\.files\.model\.safetensors"):
        model_vqa_loader.main(loader_args(other, qfile, answers, "--resume"))


def test_answers_and_logs_stay_in_step(tiny_v15, tmp_path):
    qfile = write_questions(tmp_path, 4)
    answers, log, prof = tmp_path / "a.jsonl", tmp_path / "a.pio.jsonl", tmp_path / "a.profile.jsonl"
    extra = ["--resume", "--pio-log", str(log), "--profile", str(prof), "--method", "random", "--tokens", "50",
             "--layers", "2", "--temperature", "0"]
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, *extra))
    full = {p: read(p) for p in (answers, log, prof)}
    # a crash after question 3's log and profile lines, before its answer line; and question 1's log line lost
    answers.write_text("".join(json.dumps(r) + "\n" for r in full[answers][:2]))
    log.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(full[log]) if i != 1))
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, *extra))
    for p in (answers, log, prof):
        now = read(p)
        assert sorted(r.get("q") or r["metadata"]["q"] for r in now) == ["0", "1", "2", "3"]
        by_q = {(r.get("q") or r["metadata"]["q"]): r for r in now}
        assert stable([by_q[r.get("q") or r["metadata"]["q"]] for r in full[p]]) == stable(full[p])


def test_repeated_questions_are_named(tiny_v15, tmp_path):
    qfile = write_questions(tmp_path, 3, repeat_first=True)
    answers = tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match=r"1 repeated question\(s\): .*q\.jsonl:4 \(question 'q0'\) repeats .*q\.jsonl:1"):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, answers))
    assert not answers.exists()
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--keep-first-duplicate"))
    assert [r["metadata"]["q"] for r in read(answers)] == ["0", "1", "2"]


def test_resume_is_exact_under_sampling(tiny_v15, tmp_path):
    qfile = write_questions(tmp_path, 6)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    model_vqa_loader.main(loader_args(tiny_v15, qfile, full, "--temperature", "1.0", "--max_new_tokens", "6"))
    model_vqa_loader.main(loader_args(tiny_v15, qfile, part, "--temperature", "1.0", "--max_new_tokens", "6"))
    assert stable(read(part)) == stable(read(full))  # sampling is seeded per question
    lines = part.read_text().splitlines()
    part.write_text("".join(x + "\n" for x in lines[:3]))
    model_vqa_loader.main(loader_args(tiny_v15, qfile, part, "--temperature", "1.0", "--max_new_tokens", "6",
                                      "--resume"))
    assert stable(read(part)) == stable(read(full))
    assert len({r["text"] for r in read(full)}) > 1


def test_sigkill_at_random_points_loses_nothing(tiny_v15, tmp_path):
    """At least 20 SIGKILLs at random points of a sampled, logged and profiled run; each resume continues it;
    the final files equal an uninterrupted run's."""
    qfile = write_questions(tmp_path, 48)
    extra = ["--pio-layers", "1,2", "--pio-tokens", "92,22"]  # sampling at the default temperature 0.2
    ref = tmp_path / "ref.jsonl"
    model_vqa_loader.main(loader_args(tiny_v15, qfile, ref, *extra, "--pio-log", str(tmp_path / "ref.pio.jsonl"),
                                      "--profile", str(tmp_path / "ref.profile.jsonl")))
    answers, log, prof = tmp_path / "a.jsonl", tmp_path / "a.pio.jsonl", tmp_path / "a.profile.jsonl"
    cmd = [sys.executable, "-m", "llava.eval.model_vqa_loader",
           *loader_args(tiny_v15, qfile, answers, *extra, "--pio-log", str(log), "--profile", str(prof), "--resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rng = random.Random(0)
    kills = 0
    while True:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done_before = len(answers.read_text().splitlines()) if answers.exists() else 0
        target = done_before + rng.randint(0, 1)
        while proc.poll() is None and kills < 24:
            n = len(answers.read_text().splitlines()) if answers.exists() else 0
            if n >= target:
                time.sleep(rng.uniform(0, 0.06))  # anywhere in the next question: generation, log, profile, answer
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        kills += 1
    assert kills >= 20
    assert stable(read(answers)) == stable(read(ref))
    assert read(log) == read(tmp_path / "ref.pio.jsonl")
    assert stable(read(prof)) == stable(read(tmp_path / "ref.profile.jsonl"))


def test_scorers_report_coverage(tiny_v15, tmp_path):
    from llava.eval import eval_pope
    from llava.eval.fixtures import write_fixtures

    data = write_fixtures(tmp_path / "eval", seed=0, n_per_bench=2, benchmarks=["pope"]) / "pope"
    answers, log = tmp_path / "a.jsonl", tmp_path / "a.pio.jsonl"
    qfile = data / "llava_pope_test.jsonl"
    model_vqa_loader.main(["--model-path", tiny_v15, "--question-file", str(qfile), "--image-folder",
                           str(data / "val2014"), "--answers-file", str(answers), "--pio-log", str(log),
                           "--max_new_tokens", "2", "--device", "cpu", "--resume"])
    n = len(qfile.read_text().splitlines())

    def score():
        eval_pope.main(["--annotation-dir", str(data / "coco"), "--question-file", str(qfile), "--result-file",
                        str(answers), "--pio-log", str(log), "--result-json", str(tmp_path / "r.json")])
        return json.loads((tmp_path / "r.json").read_text())

    assert score()["coverage"] == {"answered": n, "expected": n, "logged": n, "partial": False, "reasons": [],
                                   "repeated": 0}
    lines = answers.read_text().splitlines()
    answers.write_text("".join(x + "\n" for x in lines[:2]))  # an interrupted run scored as it is
    assert score()["coverage"] == {"answered": 2, "expected": n, "logged": n, "partial": True, "repeated": 0,
                                   "reasons": [f"{n - 2} of {n} questions of the benchmark's files without an answer"]}
    answers.write_text("".join(x + "\n" for x in lines))
    log.write_text("".join(x + "\n" for x in log.read_text().splitlines()[:-1]))
    assert score()["coverage"] == {"answered": n, "expected": n, "logged": n - 1, "partial": True, "reasons": [],
                                   "repeated": 0}


def _break(kind: str, ckpt: Path, qfile: Path) -> list[str]:
    """Damage a copy of the checkpoint or the inputs the way a user might; returns extra runner flags."""
    if kind == "no_tokenizer":
        (ckpt / "tokenizer.model").unlink()
    elif kind == "no_config":
        (ckpt / "config.json").unlink()
    elif kind == "no_vision_tower":
        shutil.rmtree(ckpt / "vision_tower")
    elif kind == "missing_tensor":
        from safetensors.torch import load_file, save_file

        weights = load_file(ckpt / "model.safetensors")
        del weights["model.norm.weight"]
        save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    elif kind == "latin1":
        qfile.write_bytes(qfile.read_bytes().replace(b"object 1?", "objet \u00e9t\u00e9 1?".encode("latin-1")))
    elif kind == "cuda":
        return ["--device", "cuda"]
    elif kind == "unknown_method":
        return ["--method", "fastw", "--budget", "64"]
    return []


@pytest.mark.parametrize("kind,message", [
    ("no_tokenizer", r"has no tokenizer\.model or tokenizer\.json \(the tokenizer\)"),
    ("no_config", r"has no config\.json"),
    ("no_vision_tower", r"the vision tower 'vision_tower' \(mm_vision_tower\) is not a folder of"),
    ("missing_tensor", r"tensors 1 missing \(model\.norm\.weight\); a missing tensor or one of the wrong shape would run with random weights"),
    ("latin1", r"q\.jsonl:2: not UTF-8 \(byte 0xe9"),
    ("cuda", r"--device cuda: this machine has no CUDA device"),
    ("unknown_method", r"unknown method 'fastw'; known methods: pio, fastv"),
])
def test_bad_inputs_exit_2_with_one_line(tiny_v15, tmp_path, capsys, kind, message):
    import re

    import torch

    from llava.utils import cli

    if kind == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_v15, ckpt)
    qfile = write_questions(tmp_path, 3)
    argv = loader_args(ckpt, qfile, tmp_path / "a.jsonl", *_break(kind, ckpt, qfile))
    with pytest.raises(SystemExit) as exit_info:
        cli(model_vqa_loader.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    with pytest.raises(Exception, match=message):  # --debug: the exception itself, with its traceback
        cli(model_vqa_loader.main, [*argv, "--debug"])


def test_images_of_any_size(tiny_v15, tmp_path, monkeypatch, capsys):
    import torch
    from PIL import Image

    from llava.mm_utils import process_images
    from llava.utils import cli
    from tests.helpers import load

    qfile = write_questions(tmp_path, 2)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "images" / "im0.png")
    Image.new("RGB", (3, 3), (200, 10, 10)).save(tmp_path / "images" / "im1.png")
    model_vqa_loader.main(loader_args(tiny_v15, qfile, tmp_path / "a.jsonl"))  # 1x1 and 3x3 are answered
    _, model, proc, _ = load(tiny_v15)
    red = process_images([Image.new("RGB", (3, 3), (255, 0, 0))], proc, model.config)[0]
    assert bool((red[0] > red[2]).all())  # read as height x width x channels, not channels first
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 14000 x 14000 image, scaled down
    big = Image.new("RGB", (100, 100))
    big.save(tmp_path / "images" / "im0.png")
    with pytest.raises(SystemExit):
        cli(model_vqa_loader.main, loader_args(tiny_v15, qfile, tmp_path / "b.jsonl"))
    err = capsys.readouterr().err
    assert "im0.png is too large for Pillow's safety limit of 1000 pixels" in err
    assert torch.is_tensor(red)


def test_stage_larger_than_the_image_is_said(tiny_v15, tmp_path, caplog):
    qfile = write_questions(tmp_path, 1)
    model_vqa_loader.main(loader_args(tiny_v15, qfile, tmp_path / "a.jsonl", "--pio-layers", "1,2", "--pio-tokens",
                                      "5000,100"))
    assert "stage(s) after layer 1 (keep 5000) keep all of them and prune nothing" in caplog.text
