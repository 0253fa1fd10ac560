"""Nothing lost, nothing stale: answers are never destroyed, --resume continues only the same run, answers and
logs stay in step, repeated questions are named, sampling resumes exactly, and SIGKILL at random points loses
nothing."""

from __future__ import annotations

import json
import os
import random
import re
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


@pytest.mark.parametrize("n_kills, n_questions", [(3, 8), pytest.param(24, 48, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_loses_nothing(tiny_v15, tmp_path, n_kills, n_questions):
    """SIGKILLs at random points of a sampled, logged and profiled run (3 in the fast suite, 24 in the slow one;
    each costs a process start); each resume continues it; the final files equal an uninterrupted run's."""
    qfile = write_questions(tmp_path, n_questions)
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
        while proc.poll() is None and kills < n_kills:
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
    assert kills >= n_kills * 5 // 6
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
    elif kind == "bad_config":
        (ckpt / "config.json").write_text('{"model_type": "llava_llama",\n')  # an editor's half-saved file
    elif kind.startswith("tower_no_"):
        name = {"weights": "model.safetensors", "config": "config.json", "preprocessor": "preprocessor_config.json"}
        (ckpt / "vision_tower" / name[kind[len("tower_no_"):]]).unlink()
    elif kind == "truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])  # a download that did not finish
    elif kind in ("wrong_shape", "tower_wrong_shape"):
        import torch
        from safetensors.torch import load_file, save_file

        path = ckpt / ("model.safetensors" if kind == "wrong_shape" else "vision_tower/model.safetensors")
        weights = load_file(path)
        name = "model.norm.weight" if kind == "wrong_shape" else "vision_model.post_layernorm.bias"
        weights[name] = torch.zeros(3)
        save_file(weights, path, metadata={"format": "pt"})
    elif kind == "hub_offline":
        return ["--model-path", "liuhaotian/llava-v1.5-7b"]  # the README's own example, with no network or cache
    elif kind == "budget_ve":
        return ["--method", "scan+pio", "--budget", "-5"]
    elif kind == "empty_questions":
        qfile.write_text("")
    elif kind == "schedule_option":
        from pio.cli import SCHEDULE_FORMAT
        from pio.schedule import Schedule

        path = qfile.parent / "s.schedule.json"
        path.write_text(json.dumps({"format": SCHEDULE_FORMAT, "method": "pio", "budget": 64,
                                    "schedule": Schedule((1, 2), tokens=(40, 20)).to_dict(),
                                    "options": {"tau": 0.8, "nms_radius": 3}}))
        return ["--schedule-file", str(path)]
    elif kind == "same_outputs":
        return ["--pio-log", str(qfile.parent / "a.jsonl")]  # the answers file's own path
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
    ("bad_config", r"ckpt/config\.json:2:1: not valid JSON \(.*\); the checkpoint's config is a JSON object"),
    ("tower_no_weights", r"vision tower folder .*ckpt/vision_tower .* has no model\.safetensors or pytorch_model\.bin "
                         r"\(its weights\)"),
    ("tower_no_config", r"vision tower folder .*ckpt/vision_tower .* has no config\.json \(its configuration\)"),
    ("tower_no_preprocessor", r"vision tower folder .*vision_tower .* has no preprocessor_config\.json"),
    ("truncated", r"ckpt/model\.safetensors is cut short: it has \d+ bytes, its header describes \d+"),
    ("wrong_shape", r"checkpoint .*ckpt does not match the model: tensors 1 of the wrong shape \(model\.norm\.weight\)"),
    ("tower_wrong_shape", r"checkpoint .*vision_tower does not match the model: tensors 1 of the wrong shape "
                          r"\(vision_model\.post_layernorm\.bias\)"),
    ("hub_offline", r"--model-path liuhaotian/llava-v1\.5-7b: not a local folder, and the Hugging Face hub is offline .*"
                    r"huggingface-cli download liuhaotian/llava-v1\.5-7b\) or pass a local checkpoint folder"),
    ("budget_ve", r"budget -5 w/ VE must be in \(0, 384\]"),
    ("empty_questions", r"--question-file .*q\.jsonl: it holds no questions"),
    ("schedule_option", r"--schedule-file .*s\.schedule\.json: option\(s\) nms_radius are not pio's; allowed: .*tau"),
    ("same_outputs", r"--pio-log .*a\.jsonl would also be --answers-file .*a\.jsonl; every output of a run needs its own"),
])
def test_bad_inputs_exit_2_with_one_line(tiny_v15, tmp_path, capsys, monkeypatch, kind, message):
    import re

    import torch

    from llava.utils import cli

    if kind == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
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
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("a."))
    assert left == [], left  # nothing written, nothing temporary or locked left behind


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
    model_vqa_loader.main(loader_args(tiny_v15, qfile, tmp_path / "b.jsonl", "--method", "scan+pio", "--pre-tokens",
                                      "9999", "--tokens", "20", "--layers", "2"))  # the same before the LLM
    assert ("scan keeps 9999 tokens per crop of 576: a crop of 576 patches keeps all of them and nothing is reduced "
            "before the language model") in caplog.text


@pytest.mark.slow  # huggingface_hub retries the connection for about 30 s; the offline case is in the fast table
def test_a_hub_id_without_network_is_one_line(tmp_path):
    """The README's hub id on a machine without network (and without HF_HUB_OFFLINE): what to download, in one line."""
    qfile = write_questions(tmp_path, 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache"), "HF_HUB_ETAG_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-m", "llava.eval.model_vqa_loader", *loader_args(
        "liuhaotian/llava-v1.5-7b", qfile, tmp_path / "a.jsonl")], cwd=REPO, env=env, text=True, capture_output=True,
        timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"--model-path liuhaotian/llava-v1\.5-7b: cannot fetch it from the Hugging Face hub \(.*\); "
                     r"download it where there is network \(huggingface-cli download liuhaotian/llava-v1\.5-7b\)",
                     errors[0]), errors


@pytest.mark.parametrize("command", ["run_llava_url", "visualize_offline"])
def test_other_commands_exit_2_with_one_line(tiny_v15, tmp_path, capsys, monkeypatch, command):
    """An image URL with no network, and visualize --pio-log reaching for the default hub checkpoint offline."""
    import huggingface_hub.constants

    from llava.eval import run_llava, visualize
    from llava.utils import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    image(64, 64).save(tmp_path / "im.png")
    if command == "run_llava_url":  # nothing listens on port 9 of this machine: as with no network
        main, argv = run_llava.main, ["--model-path", tiny_v15, "--image-file", "http://127.0.0.1:9/view.jpg",
                                      "--query", "What is it?", "--device", "cpu"]
        message = r"--image-file http://127\.0\.0\.1:9/view\.jpg: cannot download it \(.*\); download it where"
    else:
        (tmp_path / "log.jsonl").write_text(json.dumps({"question_id": 1, "n_visual": 576, "stages": []}) + "\n")
        main, argv = visualize.main, ["--image-file", str(tmp_path / "im.png"), "--pio-log", str(tmp_path / "log.jsonl"),
                                      "--out", str(tmp_path / "k.png")]
        message = r"--model-path liuhaotian/llava-v1\.5-7b: not a local folder, and the Hugging Face hub is offline"
    with pytest.raises(SystemExit) as exit_info:
        cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and re.search(message, err[0]), err


# --------------------------------------------------------------------------- changed inputs, mixed and partial files
@pytest.fixture(scope="module")
def pope_run(tiny_v15, tmp_path_factory):
    """A finished POPE run on the miniature fixtures (6 questions, with its reduction log): ``(data, answers)``."""
    from llava.eval.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("pope-run")
    data = write_fixtures(root / "eval", seed=0, n_per_bench=2, benchmarks=["pope"]) / "pope"
    answers = root / "a.jsonl"
    model_vqa_loader.main(pope_args(tiny_v15, data, answers))
    return data, answers


def pope_args(ckpt, data: Path, answers: Path, *extra: str) -> list[str]:
    return ["--model-path", str(ckpt), "--question-file", str(data / "llava_pope_test.jsonl"), "--image-folder",
            str(data / "val2014"), "--answers-file", str(answers), "--pio-log", str(answers.with_suffix(".pio.jsonl")),
            "--max_new_tokens", "2", "--device", "cpu", "--resume", *extra]


def copy_run(answers: Path, to: Path) -> Path:
    """The run's answers, log and run file under another name (the same run: paths are not in its identity)."""
    for suffix in (".jsonl", ".pio.jsonl", ".run.json"):
        shutil.copy(str(answers)[: -len(".jsonl")] + suffix, str(to)[: -len(".jsonl")] + suffix)
    return to


def score_pope(data: Path, answers: Path, *extra: str) -> dict:
    from llava.eval import eval_pope

    out = answers.with_suffix(".result.json")
    eval_pope.main(["--annotation-dir", str(data / "coco"), "--question-file", str(data / "llava_pope_test.jsonl"),
                    "--result-file", str(answers), "--pio-log", str(answers.with_suffix(".pio.jsonl")),
                    "--result-json", str(out), *extra])
    return json.loads(out.read_text())


def test_resume_drops_repeated_questions_and_scorers_count_each_once(tiny_v15, pope_run, tmp_path):
    """What two writers of one file used to leave (each question answered twice): the scorer counts each question
    once, and --resume keeps the first line of each."""
    data, ref = pope_run
    answers = copy_run(ref, tmp_path / "a.jsonl")
    lines = answers.read_text().splitlines()
    n = len(lines)
    twice = []
    for line in lines[:3]:
        rec = json.loads(line)
        twice.append(json.dumps({**rec, "text": "the second writer's", "answer_id": "other"}))
    answers.write_text("".join(x + "\n" for x in lines + twice))
    coverage = score_pope(data, answers)["coverage"]
    assert (coverage["answered"], coverage["expected"], coverage["repeated"], coverage["partial"]) == (n, n, 3, False)
    model_vqa_loader.main(pope_args(tiny_v15, data, answers))  # nothing to do but tidy up
    assert answers.read_text().splitlines() == lines


def test_changed_weights_or_vision_tower_are_another_run(tiny_v15, tmp_path):
    """A checkpoint overwritten in place with files of the same sizes, or its vision tower changed, is not the run
    that wrote the answers; touching a file without changing a byte is."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_v15, ckpt)
    qfile = write_questions(tmp_path, 2)
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(loader_args(ckpt, qfile, answers, "--resume"))
    before = answers.read_text()
    os.utime(ckpt / "model.safetensors")  # the same bytes: still the same run
    model_vqa_loader.main(loader_args(ckpt, qfile, answers, "--resume"))
    assert answers.read_text() == before
    for path, named in ((ckpt / "model.safetensors", r"weights\.files\.model\.safetensors: '\w+' -> '\w+'"),
                        (ckpt / "vision_tower" / "model.safetensors",
                         r"weights\.vision_tower\.files\.model\.safetensors: '\w+' -> '\w+'")):
        size = path.stat().st_size
        with open(path, "r+b") as f:  # new weights written in place, the sizes unchanged
            f.seek(size - 64)
            old = f.read(8)
            f.seek(size - 64)
            f.write(bytes(b ^ 0x55 for b in old))
        assert path.stat().st_size == size
        with pytest.raises(RunMismatchError, match=r"written by a different run.*" + named):
            model_vqa_loader.main(loader_args(ckpt, qfile, answers, "--resume"))
        with open(path, "r+b") as f:
            f.seek(size - 64)
            f.write(old)
    assert answers.read_text() == before


def test_scorers_refuse_files_of_two_runs(pope_run, tmp_path, capsys):
    from llava.eval import eval_pope
    from llava.utils import cli

    data, ref = pope_run
    answers = copy_run(ref, tmp_path / "a.jsonl")
    rows = read(answers)
    other = [{**r, "metadata": {**r["metadata"], "run": "0123456789ab"}} for r in rows]
    argv = ["--annotation-dir", str(data / "coco"), "--question-file", str(data / "llava_pope_test.jsonl"),
            "--result-file", str(answers), "--result-json", str(tmp_path / "r.json")]
    for mixed, message in ((rows[:3] + other[3:], r"a\.jsonl mixes lines of two runs \(run \w+ at line 1, run "
                                                   r"0123456789ab at line 4\)"),
                           (other, r"a\.run\.json \(run file\) is of run \w+ but .*a\.jsonl \(answers\) of run "
                                   r"0123456789ab")):
        answers.write_text("".join(json.dumps(r) + "\n" for r in mixed))
        with pytest.raises(SystemExit) as exit_info:
            cli(eval_pope.main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and re.search(message, err[0]), err
        assert not (tmp_path / "r.json").exists()


def test_wall_time_adds_up_over_invocations(tiny_v15, pope_run, tmp_path):
    data, ref = pope_run
    answers = copy_run(ref, tmp_path / "a.jsonl")
    model_vqa_loader.main(pope_args(tiny_v15, data, answers))  # a rerun with nothing to do
    info = json.loads(answers.with_suffix(".run.json").read_text())
    first, second = info["invocations"]
    assert first["answered"] == 6 and second["answered"] == 0 and first["finished"] and second["finished"]
    assert info["wall_time_s"] == pytest.approx(first["wall_s"] + second["wall_s"], abs=2e-3) and first["wall_s"] > 0
    result = score_pope(data, answers, "--wall-time", "0.25")  # the script's clock saw the last invocation only
    assert result["wall_time_s"] == pytest.approx(info["wall_time_s"])
    assert result["extra"]["wall_time_last_invocation_s"] == 0.25


def test_overwrite_wins_over_resume(tiny_v15, tmp_path):
    """The scripts always pass --resume; EXTRA_ARGS=--overwrite replaces a different earlier run and then
    continues the new one like any --resume."""
    qfile = write_questions(tmp_path, 2)
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--resume"))
    with pytest.raises(RunMismatchError, match="different run"):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--resume", "--max_new_tokens", "4"))
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--resume", "--max_new_tokens", "4", "--overwrite"))
    info = json.loads(answers.with_suffix(".run.json").read_text())
    assert info["identity"]["decoding"]["max_new_tokens"] == 4 and len(read(answers)) == 2
    after = answers.read_text()
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, "--resume", "--max_new_tokens", "4", "--overwrite"))
    assert answers.read_text() == after  # the same run: continued (nothing to do), not started again
    assert len(json.loads(answers.with_suffix(".run.json").read_text())["invocations"]) == 2
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.lock"))


def test_loyalty_to_answers_of_other_questions_is_refused(tiny_v15, tmp_path):
    """An answers file without its run file is checked against this run's questions: the same keys must be the
    same questions, and some must be shared."""
    qfile = write_questions(tmp_path, 3)
    base = ["--method", "random", "--tokens", "20", "--layers", "2", "--pio-log", str(tmp_path / "a.pio.jsonl")]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"question_id": f"z{i}", "prompt": f"Another question {i}?", "text": "yes",
                                       "metadata": {"q": str(i)}}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"--loyalty-to .*ref\.jsonl:1: question 0 is 'z0' there but 'q0' in this "
                                         r"run's question file \(question_id differs\)"):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, tmp_path / "a.jsonl", *base, "--loyalty-to", str(ref)))
    ref.write_text("".join(json.dumps({"question_id": "q0", "prompt": "x", "text": "yes", "metadata": {"q": str(i)}})
                           + "\n" for i in range(10, 12)))
    with pytest.raises(ValueError, match=r"none of its 2 answers is to a question of this run"):
        model_vqa_loader.main(loader_args(tiny_v15, qfile, tmp_path / "a.jsonl", *base, "--loyalty-to", str(ref)))
    assert not (tmp_path / "a.jsonl").exists()


def test_partial_benchmark_files_make_partial_results(tmp_path):
    """Without a run file the expected count comes from the benchmark's own files: MME without a subtask's ground
    truth or with an image's ground truth a line short, GQA with questions unanswered, are partial results."""
    from llava.eval import eval_gqa, eval_mme
    from llava.eval.fixtures import write_fixtures

    root = write_fixtures(tmp_path / "eval", seed=0, n_per_bench=1, benchmarks=["mme", "gqa"])
    mme = root / "MME"
    answers = tmp_path / "mme.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": "Yes"}) + "\n"
                               for q in read(mme / "llava_mme.jsonl")))
    gt = mme / "MME_Benchmark_release_version"

    def mme_coverage():
        eval_mme.main(["--gt-dir", str(gt), "--result-file", str(answers), "--result-json", str(tmp_path / "m.json")])
        return json.loads((tmp_path / "m.json").read_text())["coverage"]

    assert mme_coverage() == {"answered": 28, "expected": 28, "logged": None, "partial": False, "reasons": [],
                              "repeated": 0}
    txt = next((gt / "count").glob("*.txt"))
    txt.write_text(txt.read_text().splitlines()[0] + "\n")  # one of the image's two questions lost
    cov = mme_coverage()
    assert cov["partial"] and any(r.startswith("count: 1 image(s) with other than 2 ground-truth questions")
                                  for r in cov["reasons"]), cov
    shutil.rmtree(gt / "OCR")
    cov = mme_coverage()
    assert cov["partial"] and any("no ground truth for 1 of the 14 subtasks (OCR)" in r for r in cov["reasons"]), cov
    gqa = root / "gqa"
    rows = read(gqa / "llava_gqa_testdev_balanced.jsonl")
    answers = tmp_path / "gqa.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "text": "yes"}) + "\n" for q in rows[:1]))
    eval_gqa.main(["--annotation-file", str(gqa / "data" / "testdev_balanced_questions.json"), "--result-file",
                   str(answers), "--result-json", str(tmp_path / "g.json")])
    cov = json.loads((tmp_path / "g.json").read_text())["coverage"]
    assert cov["partial"] and cov["expected"] == len(rows) and cov["answered"] == 1, cov
    assert cov["reasons"] == [f"{len(rows) - 1} of {len(rows)} questions of the benchmark's files without an answer"]
