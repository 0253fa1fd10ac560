"""The video question runner (``llava.eval.model_video_qa``) on the Video-MME miniature, on every family with video
(Qwen2.5-VL, LLaVA-OneVision): answers the scorer reads, the frame sampling in the run description and the result
JSON, resume, refusals; and (slow) the scripts ``scripts/{qwen2_5_vl,onevision}/eval/videomme.sh`` end to end,
unpruned and with PIO, then ``summarize``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import eval_videomme, fixtures, model_video_qa
from tests.helpers import load

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--video-min-pixels", "12544", "--video-max-pixels", "12544"]  # about 16 tokens per frame pair
# variant -> (its flags, the least visual tokens of an 8-frame question, its rule's record)
VIDEO = {"qwen2_5_vl": (SMALL, 4 * 16, {"rule": "smart", "min_pixels": 12544}),  # 4 frame pairs, 16 tokens or more
         "llava-onevision": ([], 8 * 16 + 1, {"rule": "uniform"})}  # 8 pooled 4 x 4 frames (48-px patches), newline


@pytest.fixture(scope="module")
def vmme(tmp_path_factory) -> Path:
    return fixtures.write_fixtures(tmp_path_factory.mktemp("vfx"), seed=0, benchmarks=["videomme"]) / "videomme"


def run(ckpt, vmme, out: Path, *extra: str, loaded=None, flags=SMALL) -> Path:
    answers = out / "answers.jsonl"
    p = ["--model-path", ckpt, "--question-file", str(vmme / "llava_videomme.jsonl"), "--video-folder",
         str(vmme), "--answers-file", str(answers), "--pio-log", str(out / "log.jsonl"), "--temperature", "0",
         "--max_new_tokens", "3", "--device", "cpu", "--num-frames", "8", *flags, *extra]
    import argparse

    from llava.eval import runner
    from llava.video import add_video_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--video-folder")
    parser.add_argument("--question-file")
    runner.add_common_args(parser)
    add_video_args(parser)
    model_video_qa.eval_model(parser.parse_args(p), loaded=loaded)
    return answers


@pytest.mark.parametrize("variant", list(VIDEO))
def test_video_runner_answers_resumes_and_scores(tiny_checkpoints, vmme, tmp_path, variant):
    """With PIO on every video's tokens: one answer and one log line per question, the sampling recorded, the
    scorer's result JSON carrying it; a second call resumes with nothing to do; a changed sampling is refused."""
    ckpt = tiny_checkpoints[variant]
    flags, least, rule = VIDEO[variant]
    loaded = load(ckpt)
    method = ["--method", "pio", "--layers", "1,2", "--ratios", "0.5,0.25"]
    answers = run(ckpt, vmme, tmp_path, *method, loaded=loaded, flags=flags)
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    questions = [json.loads(x) for x in (vmme / "llava_videomme.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [q["question_id"] for q in questions]
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all([s["after"] for s in g["stages"]] == [g["n_visual"] // 2, g["n_visual"] // 4] for g in logs)
    assert min(g["n_visual"] for g in logs) >= least
    info = json.loads((tmp_path / "answers.run.json").read_text())
    sampling = info["identity"]["runner"]["video_sampling"]
    assert sampling["num_frames"] == 8 and rule.items() <= sampling.items()
    (tmp_path / "b2").mkdir()  # two questions per forward pass: the same answers
    batched = run(ckpt, vmme, tmp_path / "b2", *method, "--batch-size", "2", loaded=loaded, flags=flags)
    assert [json.loads(x)["text"] for x in batched.read_text().splitlines()] == [x["text"] for x in lines]
    before = answers.read_text()
    run(ckpt, vmme, tmp_path, *method, "--resume", loaded=loaded, flags=flags)
    assert answers.read_text() == before
    with pytest.raises(ValueError, match="num_frames"):
        run(ckpt, vmme, tmp_path, *method, "--resume", "--num-frames", "4", loaded=loaded, flags=flags)
    res = tmp_path / "result.json"
    eval_videomme.main(["--annotation-file", str(vmme / "videomme.json"), "--result-file", str(answers),
                        "--result-json", str(res), "--pio-log", str(tmp_path / "log.jsonl")])
    out = json.loads(res.read_text())
    assert out["benchmark"] == "videomme" and out["num_questions"] == len(questions) and out["method"] == "pio"
    assert out["extra"]["video_sampling"] == sampling and out["avg_visual_tokens"] < min(g["n_visual"] for g in logs)


def test_video_runner_refusals(tiny_v15, tiny_qwen, vmme, tmp_path):
    with pytest.raises(ValueError, match="^LLaVA takes no video input in this codebase"):
        run(tiny_v15, vmme, tmp_path, "--conv-mode", "vicuna_v1")
    with pytest.raises(ValueError, match="^divprune is an encoder-side method, which runs on images only"):
        run(tiny_qwen, vmme, tmp_path, "--method", "divprune", "--budget", "64")
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": "x", "video": "data/none.mp4", "text": "?"}) + "\n")
    with pytest.raises(FileNotFoundError, match="question x: video file not found"):
        run(tiny_qwen, vmme, tmp_path, "--question-file", str(bad))


@pytest.mark.slow
@pytest.mark.parametrize("variant, folder", [("qwen2_5_vl", "qwen2_5_vl"), ("llava-onevision", "onevision")])
def test_videomme_script_end_to_end_and_summarize(tiny_checkpoints, tmp_path, capsys, variant, folder):
    from llava.eval import summarize
    from tests.test_scripts import clean_env

    data = fixtures.write_fixtures(tmp_path / "data", seed=0, benchmarks=["videomme"])
    pixels = {"VIDEO_MIN_PIXELS": "12544", "VIDEO_MAX_PIXELS": "12544"} if variant == "qwen2_5_vl" else {}
    for env in ({}, {"METHOD": "pio", "METHOD_ARGS": "--layers 1,2 --ratios 0.5,0.25"}):
        full = clean_env(PYTHON=sys.executable, MODEL_PATH=tiny_checkpoints[variant], DATA_ROOT=str(data),
                         DEVICE="cpu", EXTRA_ARGS="--max_new_tokens 4", NUM_FRAMES="8", HF_HUB_OFFLINE="1",
                         TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **pixels, **env)
        done = subprocess.run(["bash", str(REPO / f"scripts/{folder}/eval/videomme.sh")], capture_output=True,
                              text=True, env=full, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted((data / "videomme" / "results").glob("*.json"))
    assert len(results) == 2
    for path in results:
        res = json.loads(path.read_text())
        assert res["benchmark"] == "videomme" and isinstance(res["score"], float)
        assert res["extra"]["video_sampling"]["num_frames"] == 8
    rows = summarize.main(["--data-root", str(data), "--runs", "*"])
    out = capsys.readouterr().out
    assert rows[0].method == "none" and {r.method for r in rows} == {"none", "pio"} and "Video-MME" in out
