"""The lmms-eval model ``pio_fvlm`` (llava.eval.lmms_model): in process against the runners, then lmms-eval itself
on a local task written here, under one process, ``accelerate launch`` and ``torchrun`` (gloo on CPU)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lmms_eval  # noqa: F401  (make test installs the lmms extra: without it this module fails, never skips)
import pytest
import torch

from llava.eval import batching, fixtures, lmms_results, model_video_qa, model_vqa_loader, runner, summarize
from llava.eval.lmms_model import PioFvlm, allowed_model_args
from llava.eval.results import write_result
from llava.video import load_video
from tests.helpers import QWEN_TEST_PIXELS, image

SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS = ("What is object 0?", "Which colour is the big square?", "How many circles are there?",
             "Is there a tree near the house?", "Where is the cat sitting?")
SIZES = ((320, 240), (336, 336), (240, 360), (500, 300), (640, 427))
QWEN_ARGS = dict(zip(("min_pixels", "max_pixels"), QWEN_TEST_PIXELS, strict=True))
PIO_SMALL = {"method": "pio", "layers": "[1,2]", "ratios": "[0.5,0.25]"}  # the tiny checkpoints' 4 layers
VIDEO = {"num_frames": 8, "video_min_pixels": 12544, "video_max_pixels": 12544}  # 4 frame pairs of 16 tokens


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[dict]:
    """Five documents: an image file, a question, a yes/no answer."""
    root = tmp_path_factory.mktemp("lmms_docs")
    out = []
    for i, (q, size) in enumerate(zip(QUESTIONS, SIZES)):
        path = root / f"im{i}.png"
        image(*size, seed=i).save(path)
        out.append({"question_id": f"q{i}", "image": str(path), "question": q, "answer": "yes" if i % 2 else "no"})
    return out


def _visual(doc: dict) -> list:
    return [runner.load_image(doc["image"])]


def _requests(docs: list[dict], gen: dict, ids=None, visual=_visual) -> list:
    """lmms-eval's generate_until requests of ``docs[i]`` for ``i`` in ``ids`` (all by default; task ``t``, split
    ``test``)."""
    return [SimpleNamespace(args=(docs[i]["question"] + SUFFIX, dict(gen), visual, i, "t", "test"), idx=0)
            for i in (range(len(docs)) if ids is None else ids)]


def _adapter(ckpt: str, docs: list[dict], **model_args) -> PioFvlm:
    model = PioFvlm(pretrained=ckpt, device="cpu", **model_args)
    model.task_dict = {"t": {"test": docs}}
    return model


GREEDY = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}


# --------------------------------------------------------------------------- in process
def _flags(model_args: dict) -> list[str]:
    """The runner flags of ``model_args`` (``video_min_pixels=1`` -> ``--video-min-pixels 1``)."""
    return [x for k, v in model_args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _kept(log: Path) -> list[tuple[int, list]]:
    """Per reduction log line: the visual count and each stage's kept positions."""
    return [(r["n_visual"], [st["kept"] for st in r["stages"]]) for r in map(json.loads, log.read_text().splitlines())]


@pytest.mark.parametrize("family, method", [("v15", {}), ("v16", {}), ("qwen", {}), ("onevision", {}),
                                            ("onevision", PIO_SMALL)],
                         ids=["v15", "v16", "qwen", "onevision", "onevision-pio"])
def test_answers_equal_the_runner(family, method, tiny_checkpoints, docs, tmp_path):
    """Every family (and PIO on LLaVA-OneVision): the adapter's prompt (the family's template around lmms-eval's
    bare context), greedy answers and kept tokens are the runner's on the same questions."""
    ckpt = tiny_checkpoints[{"v15": "llava-v1.5", "v16": "llava-v1.6", "qwen": "qwen2_5_vl",
                             "onevision": "llava-onevision"}[family]]
    extra = {**(QWEN_ARGS if family == "qwen" else {}), **method}
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": d["question_id"], "image": os.path.basename(d["image"]),
                                         "text": d["question"] + SUFFIX}) + "\n" for d in docs[:3]))
    model_vqa_loader.main(["--model-path", ckpt, "--question-file", str(qfile), "--image-folder",
                           os.path.dirname(docs[0]["image"]), "--answers-file", str(tmp_path / "a.jsonl"),
                           "--temperature", "0", "--max_new_tokens", "5", "--device", "cpu", "--pio-log",
                           str(tmp_path / "runner.jsonl"), *_flags(extra)])
    expected = [json.loads(x)["text"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    model = _adapter(ckpt, docs, **extra, pio_log=str(tmp_path / "log.jsonl"))
    got = model.generate_until(_requests(docs, GREEDY, range(3)))
    model.clean()
    assert got == expected and len(got) == 3
    assert _kept(tmp_path / "log.jsonl") == _kept(tmp_path / "runner.jsonl")
    assert all(len(kept) == (2 if method else 0) for _, kept in _kept(tmp_path / "log.jsonl"))


def test_methods_change_the_run_and_record_it(tiny_v15_deep, docs, tmp_path):
    """method=pio,budget=64 and method=fastv,budget=64 on a 32-layer tiny: other answers than the unpruned model,
    and the records beside lmms-eval's output say what each kept (the paper's budget: 64 tokens on average)."""
    runs = {}
    for args in ({}, {"method": "pio", "budget": 64}, {"method": "fastv", "budget": 64}):
        files = {"pio_dir": str(tmp_path / "rec"), "pio_log": str(tmp_path / "log.jsonl"),
                 "profile": str(tmp_path / "profile.jsonl")}
        model = _adapter(tiny_v15_deep, docs, **files, **args)
        answers = model.generate_until(_requests(docs, GREEDY))
        model.clean()
        folder = lmms_results.records_dir({"pretrained": tiny_v15_deep, **files, **args}, None)
        run = json.loads(Path(folder, "run.json").read_text())
        recs = sorted(lmms_results.task_records(folder, "t", 1), key=lambda r: r["doc_id"])
        full = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
        profile = [json.loads(x) for x in (tmp_path / "profile.jsonl").read_text().splitlines()]
        assert [p["doc_id"] for p in profile] == list(range(5)) and all(p["prefill_s"] > 0 for p in profile)
        runs[args.get("method", "none")] = (answers, run, recs, full)
    answers, run, recs, _ = runs["none"]
    assert run["method"] == "none" and run["model"] == "llava-v1.5-tiny-32" and run["method_config"] is None
    assert [r["doc_id"] for r in recs] == list(range(5))
    assert all(r["avg_visual_tokens"] == 576 and r["stages"] == [] for r in recs)
    for name, layers in (("pio", [1, 10, 15]), ("fastv", [2])):
        pruned, run, recs, full = runs[name]
        assert run["model"] == f"llava-v1.5-tiny-32-{name}64" and run["budget"] == 64
        assert run["method"] == name and run["method_config"]["method"] == name
        assert pruned != answers  # the reduction changes what the model answers
        for r in recs:
            assert [s["layer"] for s in r["stages"]] == layers and "kept" not in r["stages"][0]
            assert r["avg_visual_tokens"] == pytest.approx(64, abs=1)
        assert [f["doc_id"] for f in full] == list(range(5)) and full[0]["task"] == "t"
        assert len(full[0]["stages"][-1]["kept"]) == full[0]["stages"][-1]["after"]  # pio_log: kept positions


def test_a_composition_reduces_before_and_inside_the_language_model(tiny_v15_deep, docs, tmp_path):
    """method=scan+pio,budget=64: the paper's w/ VE row (the authors' scan before the LLM, PIO inside it; the scan
    reads layer 0 of the tiny 2-layer vision tower), a method's own flag given as a model_arg."""
    args = {"method": "scan+pio", "budget": 64, "scan_local_layer": 0, "pio_dir": str(tmp_path)}
    model = _adapter(tiny_v15_deep, docs, **args)
    model.generate_until(_requests(docs, GREEDY, [0]))
    folder = lmms_results.records_dir({"pretrained": tiny_v15_deep, **args}, None)
    (rec,) = lmms_results.task_records(folder, "t", 1)
    assert rec["n_encoder"] == 576 and rec["n_visual"] < 576 and rec["stages"]
    assert json.loads(Path(folder, "run.json").read_text())["method"] == "scan+pio"


def test_until_cuts_the_answer_and_sampling_is_per_document(tiny_v15, docs):
    model = _adapter(tiny_v15, docs)
    long = {"max_new_tokens": 10, "temperature": 0}
    full = model.generate_until(_requests(docs, long))
    firsts = [[a[k] for k in range(1, len(a)) if a.index(a[k]) == k and not a[k].isspace()] for a in full]
    cuts = [(i, a, chars[0]) for i, (a, chars) in enumerate(zip(full, firsts)) if chars]
    assert cuts, f"no answer with a usable stop string: {full}"
    for i, answer, stop in cuts:
        got = model.generate_until(_requests(docs, {**long, "until": [stop, "never-seen"]}, [i]))[0]
        assert got == answer[: answer.index(stop)].strip()
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "do_sample": True}
    first = model.generate_until(_requests(docs, sampled))
    assert model.generate_until(_requests(docs, sampled)[::-1]) == first[::-1]  # seeded per document, not per call
    assert first != full


@pytest.mark.parametrize("family", ["v15", "qwen"])
def test_several_images_per_document(family, tiny_v15, tiny_qwen, docs):
    ckpt, extra = (tiny_v15, {}) if family == "v15" else (tiny_qwen, QWEN_ARGS)
    model = _adapter(ckpt, docs, **extra)
    single = model._encode(model._prompt("Q?", 1, "d"), _visual(docs[0]))[0]
    both = [runner.load_image(docs[0]["image"]), runner.load_image(docs[1]["image"])]
    two = model._encode(model._prompt("Compare them.", 2, "d"), both)[0]
    assert model._prompt("Compare them.", 2, "d").count("<image>") == 2
    answers = model.generate_until(_requests(docs, GREEDY, [0], visual=lambda d: both))
    assert len(answers) == 1 and isinstance(answers[0], str)
    if family == "v15":
        assert int((two == -200).sum()) == 2 and int((single == -200).sum()) == 1
    else:
        assert two.shape[1] > single.shape[1]
    with pytest.raises(ValueError, match=r"the context has 1 <image> mark\(s\) for 2 image\(s\)"):
        model.generate_until([SimpleNamespace(args=("<image>\nQ?", GREEDY, lambda d: both, 0, "t", "test"), idx=0)])


# --------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def vmme(tmp_path_factory) -> Path:
    """The Video-MME miniature (llava.eval.fixtures): three clips in lmms-eval's layout, six questions."""
    return fixtures.write_fixtures(tmp_path_factory.mktemp("lmms_vfx"), seed=0, benchmarks=["videomme"]) / "videomme"


def _video_docs(vmme: Path, n: int = 3) -> list[dict]:
    rows = [json.loads(x) for x in (vmme / "llava_videomme.jsonl").read_text().splitlines()][:n]
    return [{"question_id": r["question_id"], "video": str(vmme / r["video"]), "question": r["text"]} for r in rows]


def _media(doc: dict) -> list:
    """lmms-eval's visuals of a document: ``[video path]`` (as its video tasks give them) or ``[PIL image]``."""
    return [doc["video"]] if "video" in doc else _visual(doc)


@pytest.mark.parametrize("method", [{}, PIO_SMALL], ids=["unpruned", "pio"])
def test_video_answers_equal_the_video_runner(method, tiny_qwen, vmme, docs, tmp_path):
    """A video document is answered as model_video_qa answers the same clip and question with the same flags
    (frame sampling, prompt, method: equal answers and kept tokens), run.json records the sampling as the runner's
    identity does."""
    vdocs = _video_docs(vmme)
    args = {**QWEN_ARGS, **VIDEO, **method}
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": d["question_id"], "video": d["video"],
                                         "text": d["question"] + SUFFIX}) + "\n" for d in vdocs))
    model_video_qa.main(["--model-path", tiny_qwen, "--question-file", str(qfile), "--answers-file",
                         str(tmp_path / "a.jsonl"), "--temperature", "0", "--max_new_tokens", "5", "--device", "cpu",
                         "--pio-log", str(tmp_path / "runner.jsonl"), *_flags(args)])
    expected = [json.loads(x)["text"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    files = {"pio_log": str(tmp_path / "log.jsonl"), "pio_dir": str(tmp_path / "rec")}
    model = _adapter(tiny_qwen, vdocs, **args, **files)
    got = model.generate_until(_requests(vdocs, GREEDY, visual=_media))
    model.clean()
    assert got == expected and len(got) == 3
    assert _kept(tmp_path / "log.jsonl") == _kept(tmp_path / "runner.jsonl")
    assert all(n >= 4 * 16 and len(kept) == (2 if method else 0) for n, kept in _kept(tmp_path / "log.jsonl"))
    folder = lmms_results.records_dir({"pretrained": tiny_qwen, **args, **files}, None)
    identity = json.loads((tmp_path / "a.run.json").read_text())["identity"]["runner"]
    assert json.loads(Path(folder, "run.json").read_text())["video_sampling"] == identity["video_sampling"]


@pytest.mark.parametrize("variant, frames, least", [
    ("qwen2_5_vl", {**QWEN_ARGS, **VIDEO}, 4 * 16),  # 4 frame pairs of 16 tokens or more
    ("llava-onevision", {"num_frames": 8}, 8 * 16 + 1),  # 8 pooled 4 x 4 frames and one newline
], ids=["qwen", "onevision"])
def test_batch_size_batches_video_requests(variant, frames, least, tiny_checkpoints, vmme, docs, tmp_path,
                                           monkeypatch):
    """batch_size=2 with PIO, on both video families: the two consecutive video requests between image requests go
    through one batch (never one mixed with an image), every answer and log line as with batch_size=1, in request
    order."""
    mixed = docs[:2] + _video_docs(vmme, 2)  # images 0, 1; videos 2, 3
    batches: list[int] = []  # the questions of each batched forward pass
    batching_generate = batching.generate_batch

    def counted(model, tokenizer, samples, *args, **kwargs):
        batches.append(len(samples))
        return batching_generate(model, tokenizer, samples, *args, **kwargs)

    monkeypatch.setattr(batching, "generate_batch", counted)
    runs = {}
    for n in (1, 2):
        log = tmp_path / f"log{n}.jsonl"
        model = _adapter(tiny_checkpoints[variant], mixed, **frames, **PIO_SMALL, batch_size=n, pio_log=str(log))
        runs[n] = (model.generate_until(_requests(mixed, GREEDY, [0, 2, 3, 1], visual=_media)), _kept(log))
        model.clean()
    assert runs[2] == runs[1] and len(runs[1][0]) == 4
    assert batches == [1, 2, 1]  # batch_size=1 answers without the batcher; then image 0, videos 2+3, image 1
    assert all(len(kept) == 2 for _, kept in runs[2][1]) and min(n for n, _ in runs[2][1][1:3]) >= least


def test_video_refusals_are_one_line(tiny_v15, tiny_qwen, vmme, docs, tmp_path):
    """A family without video, a video beside images or another video, <image> marks around a video, an
    encoder-side method, a missing file; and frame options a family cannot take."""
    clip = _video_docs(vmme, 1)[0]["video"]
    fam = r"\(families with video: [^)]*Qwen2\.5-VL[^)]*\)$"
    models = {"llava": _adapter(tiny_v15, docs), "qwen": _adapter(tiny_qwen, docs, **QWEN_ARGS, **VIDEO),
              "divprune": _adapter(tiny_qwen, docs, **QWEN_ARGS, method="divprune", budget=64)}
    cases = [
        ("llava", [clip], "Q?", rf"^pio_fvlm: document 0 of t gives video .*\.mp4; LLaVA takes no video input in "
                                rf"this codebase {fam}"),
        ("qwen", [clip, "im.png"], "Q?", rf"^pio_fvlm: document 0 of t gives a video and 1 image\(s\); a document "
                                         rf"takes images or one video {fam}"),
        ("qwen", [clip, clip], "Q?", rf"^pio_fvlm: document 0 of t gives 2 videos; a document takes images or one "
                                     rf"video {fam}"),
        ("qwen", [clip], "<image>\nQ?", r"^pio_fvlm: document 0 of t: the context has 1 <image> mark\(s\) for one "
                                        r"video$"),
        ("divprune", [clip], "Q?", r"^pio_fvlm: document 0 of t gives video .*; divprune is an encoder-side method, "
                                   r"which runs on images only"),
    ]
    for name, visuals, context, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            models[name].generate_until([SimpleNamespace(args=(context, GREEDY, lambda d, v=visuals: v, 0, "t", "test"),
                                                         idx=0)])
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"^pio_fvlm: document 0 of t: video file not found: .*none\.mp4$"):
        models["qwen"].generate_until(_requests(docs, GREEDY, [0], visual=lambda d: [str(tmp_path / "none.mp4")]))
    with pytest.raises(ValueError, match=r"^pio_fvlm model_args: num_frames, fps: give either the number of frames or "
                                         r"fps"):
        PioFvlm(pretrained=tiny_qwen, device="cpu", num_frames=8, fps=2)


def test_video_loglikelihood_is_the_continuation_loss(tiny_qwen, vmme):
    """A video document's multiple-choice continuation: the loss through cached decoding is that of one full
    forward pass over the video prompt and the continuation."""
    (doc,) = _video_docs(vmme, 1)
    model = _adapter(tiny_qwen, [doc], **VIDEO)
    ((loss, greedy),) = [r.text for r in model.loglikelihood([SimpleNamespace(args=(doc["question"], " B", _media, 0,
                                                                                     "t", "test"), idx=0)])]
    video = load_video(doc["video"], model.sampling)
    prompt = model_video_qa.video_prompt(doc["question"], model.args.conv_mode)
    ids, _, _ = model_video_qa.encode(prompt, video, model.tokenizer, model.processor, model.model.config)
    full, visual, _ = model_video_qa.encode(prompt + " B", video, model.tokenizer, model.processor, model.model.config)
    tokens = full[0, ids.shape[1]:]
    assert torch.equal(full[0, : ids.shape[1]], ids[0]) and len(tokens) >= 1
    with torch.inference_mode():
        logits = model.model(input_ids=full, images=visual).logits[0].double()
    rows = torch.log_softmax(logits[-len(tokens) - 1: -1], -1)  # the rows predicting the continuation
    assert loss == pytest.approx(-float(rows[torch.arange(len(tokens)), tokens].mean()), abs=1e-4)
    assert greedy == bool((rows.argmax(-1) == tokens).all())


VIDEOMME_YAML = """task: pio_videomme
# lmms-eval 0.7.3's videomme.yaml, on local rows, with fewer new tokens (16 there)
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.videomme_doc_to_visual
doc_to_text: !function utils.videomme_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.videomme_process_results
metric_list:
  - metric: videomme_perception_score
    aggregation: !function utils.videomme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{post}"
"""
VIDEOMME_POST = "\nAnswer with the option's letter from the given choices directly."  # lmms-eval's videomme.yaml
VIDEOMME_UTILS = """from lmms_eval.tasks.videomme.utils import (  # noqa: F401  (lmms-eval 0.7.3's own Video-MME task)
    videomme_aggregate_results,
    videomme_doc_to_text,
    videomme_doc_to_visual,
    videomme_process_results,
)
"""


def test_lmms_eval_runs_a_video_task(tiny_qwen, vmme, tmp_path, monkeypatch):
    """lmms-eval itself (simple_evaluate, in process) with PIO on a local task over the Video-MME miniature that
    uses lmms-eval's own videomme functions: its doc_to_visual finds ``<HF_HOME>/videomme/data/<videoID>.mp4`` (the
    fixture's layout) and gives ``[path]``, its prompt, its scorer. The answers are model_video_qa's on the same
    prompts and clips; every document's reduction is recorded."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.tasks.videomme import utils as videomme

    from llava.eval.eval_videomme import read_annotation

    monkeypatch.setattr(videomme, "base_cache_dir", str(vmme.parent))  # what HF_HOME sets at its import
    rows = [{"video_id": q.video_id, "duration": q.duration, "domain": q.domain, "sub_category": q.sub_category,
             "videoID": q.youtube_id, "question_id": q.question_id, "task_type": q.task_type, "question": q.question,
             "options": list(q.options), "answer": q.answer}
            for q in read_annotation(str(vmme / "videomme.json"))][::2]  # lmms-lab/Video-MME's rows, one per clip
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "utils.py").write_text(VIDEOMME_UTILS)
    (tmp_path / "pio_videomme.yaml").write_text(VIDEOMME_YAML.format(data=tmp_path / "docs.jsonl",
                                                                     post=VIDEOMME_POST.replace("\n", "\\n")))
    args = {**VIDEO, **PIO_SMALL, "pio_dir": str(tmp_path / "rec")}
    out = simple_evaluate(model=PioFvlm(pretrained=tiny_qwen, device="cpu", **args), tasks=["pio_videomme"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          log_samples=True)
    samples = sorted(out["samples"]["pio_videomme"], key=lambda x: x["doc_id"])
    prompts = [videomme.videomme_doc_to_text(r, {"pre_prompt": "", "post_prompt": VIDEOMME_POST}) for r in rows]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": r["question_id"], "video": f"data/{r['videoID']}.mp4",
                                         "text": p}) + "\n" for r, p in zip(rows, prompts)))
    model_video_qa.main(["--model-path", tiny_qwen, "--question-file", str(qfile), "--video-folder", str(vmme),
                         "--answers-file", str(tmp_path / "a.jsonl"), "--temperature", "0", "--max_new_tokens", "6",
                         "--device", "cpu", *_flags({**VIDEO, **PIO_SMALL})])
    expected = [json.loads(x)["text"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["resps"][0][0] for x in samples] == expected and len(expected) == 3
    assert 0 <= out["results"]["pio_videomme"]["videomme_perception_score,none"] <= 100
    folder = lmms_results.records_dir({"pretrained": tiny_qwen, **args}, None)
    recs = sorted(lmms_results.task_records(folder, "pio_videomme", 1), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in recs] == list(range(3))
    assert all([s["after"] for s in r["stages"]] == [r["n_visual"] // 2, r["n_visual"] // 4] for r in recs)
    sampling = json.loads(Path(folder, "run.json").read_text())["video_sampling"]
    assert sampling["num_frames"] == 8
    # summarize's reading of the run: lmms-eval's results JSON (its keys as lmms-eval 0.7.3 writes them) joined with
    # the run's records carries the frame sampling, as the local Video-MME result does
    raw = ",".join(f"{k}={v}" for k, v in {"pretrained": tiny_qwen, **args}.items())
    results = tmp_path / "out" / "ckpt" / "20261206_results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"config": {"model": "pio_fvlm", "model_args": raw},
                                   "results": {"pio_videomme": out["results"]["pio_videomme"]}}))
    [res] = lmms_results.read_results_file(str(results))
    assert res["extra"]["video_sampling"] == sampling and res["avg_visual_tokens"] < min(r["n_visual"] for r in recs)


def test_loglikelihood_is_the_continuation_loss_through_cached_decoding(tiny_v15, tiny_v15_deep, docs):
    """Unpruned, the forced cached decoding gives the loss of one full forward pass over context + continuation;
    pruned, the continuation sees only what the prefill kept, so the loss moves."""
    model = _adapter(tiny_v15, docs)
    reqs = [SimpleNamespace(args=(d["question"], " yes it is", _visual, i, "t", "test"), idx=0)
            for i, d in enumerate(docs[:2])]
    got = [r.text for r in model.loglikelihood(reqs)]
    for (loss, greedy), d in zip(got, docs):
        prompt = model._prompt(d["question"], 1, "d")
        ids, px, sizes = model._encode(prompt, _visual(d))
        full, _, _ = runner.encode(prompt + " yes it is", _visual(d), model.tokenizer, model.processor,
                                   model.model.config)
        tokens = full[0, ids.shape[1]:]
        assert torch.equal(full[0, : ids.shape[1]], ids[0]) and len(tokens) >= 2
        with torch.inference_mode():
            logits = model.model(input_ids=full, images=px, image_sizes=sizes).logits[0].double()
        rows = torch.log_softmax(logits[-len(tokens) - 1: -1], -1)  # the rows predicting the continuation
        assert loss == pytest.approx(-float(rows[torch.arange(len(tokens)), tokens].mean()), abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == tokens).all())
    unpruned = _adapter(tiny_v15_deep, docs).loglikelihood(reqs[:1])[0].text[0]
    pruned = _adapter(tiny_v15_deep, docs, method="pio", budget=64).loglikelihood(reqs[:1])[0].text[0]
    assert pruned != pytest.approx(unpruned) and 0 < pruned < 20


def test_multi_round_follows_the_tasks_doc_to_text(tiny_v15, docs):
    model = _adapter(tiny_v15, docs)
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return _visual(doc), "And now?", False, previous_output, {"round": round_idx}

    req = SimpleNamespace(args=(docs[0]["question"] + SUFFIX, dict(GREEDY), _visual, doc_to_text, 0, "t", "test"),
                          idx=0)
    rounds = model.generate_until_multi_round([req])[0]
    assert len(rounds) == 2 and [c[0] for c in calls] == [1, 2] and calls[1][1] == rounds
    assert calls[1][2] == {"round": 1}
    assert rounds[0] == model.generate_until(_requests(docs, GREEDY, [0]))[0]


@pytest.mark.parametrize("args, match", [
    ({"budjet": 64}, r"unknown key 'budjet'; allowed: .*\bbudget\b.*\bpio_tau\b"),
    ({"temperature": 0.5}, r"temperature is not a model_arg: each task's generation_kwargs decide it"),
    ({"method": "fastvv", "budget": 64}, r"unknown method 'fastvv'; known methods: pio, fastv"),
    ({"min_pixels": 3136}, r"min_pixels applies to Qwen2.5-VL \(.*\); .* is a LLaVA checkpoint"),
    ({"method": "fastv", "budget": 64, "pio_tau": 0.5}, r"pio_tau is a flag of method pio, but method is fastv"),
    ({"method": "pio", "pio_no_nms": "maybe"}, r"pio_no_nms is on or off: pio_no_nms=true"),
    ({"num_frames": 8}, r"num_frames: LLaVA takes no video input in this codebase \(families with video: "
                        r"[^)]*Qwen2\.5-VL[^)]*\)$"),
])
def test_bad_model_args_are_named(tiny_v15, args, match):
    with pytest.raises(ValueError, match=r"^pio_fvlm model_args: " + match):
        PioFvlm(pretrained=tiny_v15, device="cpu", **args)


def test_model_args_cover_the_runner_flags():
    from pio import get_method, method_names

    allowed = set(allowed_model_args())
    assert {f.name.replace("-", "_") for n in method_names() for f in get_method(n).flags} <= allowed
    assert {"pretrained", "budget", "layers", "tokens", "schedule_file", "dtype", "attn_implementation", "conv_mode",
            "min_pixels", "max_pixels", "device", "pio_log", "profile", "pio_dir", "run_name"} <= allowed
    assert not {"answers_file", "num_chunks", "temperature"} & allowed


def test_missing_lmms_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    for name in ("lmms_eval.api", "lmms_eval.api.model", "llava.eval.lmms_model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r'lmms-eval is not installed .*pip install -e "\.\[lmms\]"'):
        importlib.import_module("llava.eval.lmms_model")


# --------------------------------------------------------------------------- lmms-eval itself
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
{extra}
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""
GENERATE = """generation_kwargs:
  max_new_tokens: 5
  temperature: 1.0
  do_sample: true
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true"""
CHOICE = """doc_to_choice: ["yes", "no"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true"""
UTILS = """from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("pre_prompt", "") + doc["question"] + kw.get("post_prompt", "")
"""
TASKS = "pio_tiny,pio_tiny_mc"


@pytest.fixture(scope="module")
def lmms_task(docs, tmp_path_factory) -> Path:
    """A local lmms-eval task folder: ``pio_tiny`` (generation, sampled: answers differ by document) and
    ``pio_tiny_mc`` (multiple choice: loglikelihood requests) over the five documents."""
    root = tmp_path_factory.mktemp("lmms_task")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "utils.py").write_text(UTILS)
    for name, output_type, extra in (("pio_tiny", "generate_until", GENERATE),
                                     ("pio_tiny_mc", "multiple_choice", CHOICE)):
        (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, output_type=output_type,
                                                            extra=extra))
    return root


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_lmms_eval(ckpt: str, task: Path, out: Path, launcher: str = "none") -> dict:
    """One lmms-eval run of pio_fvlm (fastv at the paper's budget 64); its results JSON, which must exist:
    lmms-eval exits 0 when the evaluation raised."""
    prefix = {
        "none": [sys.executable, "-m", "lmms_eval"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--main_process_port", _free_port(), "-m", "lmms_eval"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     _free_port(), "-m", "lmms_eval"],
    }[launcher]
    cmd = [*prefix, "--model", "pio_fvlm", "--model_args", f"pretrained={ckpt},method=fastv,budget=64",
           "--tasks", TASKS, "--include_path", str(task), "--batch_size", "1", "--output_path", str(out),
           "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    found = list(out.glob("*/*_results.json"))
    assert proc.returncode == 0 and len(found) == 1, f"{' '.join(cmd)}: no results JSON\n{proc.stdout[-3000:]}" \
                                                     f"\n{proc.stderr[-5000:]}"
    return {"results": json.loads(found[0].read_text()), "path": found[0],
            "samples": {t: {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, p.read_text().splitlines())}
                        for t in TASKS.split(",") for p in out.glob(f"*/*_samples_{t}.jsonl")}}


@pytest.fixture(scope="module")
def one_process(tiny_v15_deep, lmms_task, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lmms_one") / "out"
    return out, run_lmms_eval(tiny_v15_deep, lmms_task, out)


def test_lmms_eval_runs_the_model_and_summarize_shows_it(one_process, tmp_path, capsys):
    out, run = one_process
    assert set(run["results"]["results"]) == {"pio_tiny", "pio_tiny_mc"}
    assert all(len(run["samples"][t]) == 5 for t in ("pio_tiny", "pio_tiny_mc"))
    lmms = {r["benchmark"]: r for r in lmms_results.read_lmms_results(str(out))}
    assert set(lmms) == {"lmms:pio_tiny", "lmms:pio_tiny_mc"}
    for rec in lmms.values():
        assert rec["model"] == "llava-v1.5-tiny-32-fastv64" and rec["method"] == "fastv" and rec["budget"] == 64
        assert rec["avg_visual_tokens"] == pytest.approx(64, abs=1) and rec["method_config"]["method"] == "fastv"
        assert rec["coverage"] == {"answered": 5, "expected": 5, "logged": 5, "partial": False}
    assert lmms["lmms:pio_tiny_mc"]["metric"] == "lmms-eval acc,none"
    # the same run's row in the local scorers' layout: one table, lmms-eval's columns beside the local one
    root = tmp_path / "eval"
    write_result(str(root / "pope" / "results" / "llava-v1.5-tiny-32-fastv64.json"), benchmark="pope", score=50.0,
                 metric="F1", sub_scores={}, num_questions=5,
                 args=SimpleNamespace(model="llava-v1.5-tiny-32-fastv64", result_file=None, pio_log=None))
    rows = summarize.main(["--data-root", str(root), "--lmms-output", str(out)])
    table = capsys.readouterr().out
    assert len(rows) == 1 and set(rows[0].scores) == {"pope", "lmms:pio_tiny", "lmms:pio_tiny_mc"}
    assert "| 64 | fastv | llava-v1.5-tiny-32-fastv64 | 50.0 |" in table and "lmms:pio_tiny_mc" in table


@pytest.mark.parametrize("launcher", ["accelerate", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_two_processes_answer_as_one(launcher, one_process, tiny_v15_deep, lmms_task, tmp_path):
    """Two ranks (gloo on CPU): lmms-eval shards the documents, each rank loads the model and writes its own
    records; per-document answers, choice losses and the recorded average equal one process's."""
    out = tmp_path / "out"
    run = run_lmms_eval(tiny_v15_deep, lmms_task, out, launcher)
    assert run["samples"] == one_process[1]["samples"]
    folder = next((out / lmms_results.SIDECAR_DIR).iterdir())
    assert json.loads((folder / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in folder.glob("pio_tiny.rank*.jsonl")) == ["pio_tiny.rank0.jsonl",
                                                                           "pio_tiny.rank1.jsonl"]
    mine = {r["benchmark"]: r["avg_visual_tokens"] for r in lmms_results.read_lmms_results(str(out))}
    assert mine == {r["benchmark"]: r["avg_visual_tokens"] for r in lmms_results.read_lmms_results(str(one_process[0]))}


@pytest.mark.parametrize("style, lmms_f1", [("bare", 2 / 3), ("period", 0.0), ("sentence", 0.0)])
def test_pope_scored_by_lmms_eval_differs_from_the_local_scorer(style, lmms_f1, tmp_path):
    """docs/lmms_eval.md, measured on the fixture's POPE questions (8 per split, every third answer wrong): the
    local scorer averages F1 over the three splits and reads "Yes." or "No, there is not." as LLaVA's scorer does;
    lmms-eval pools the splits and counts only an answer that is exactly yes or no."""
    import random

    from lmms_eval.tasks.pope import utils as lmms_pope

    from llava.eval.eval_pope import find_annotation_files, label_questions, score_pope
    from llava.eval.fixtures import write_pope

    write_pope(tmp_path, random.Random(0), 8)
    labels = label_questions(find_annotation_files(str(tmp_path / "pope" / "coco")),
                             str(tmp_path / "pope" / "llava_pope_test.jsonl"))
    answers, per_doc = {}, []
    for k, (qid, label) in enumerate((q, lab) for split in labels.values() for q, lab in split.items()):
        said = ("no" if label == "yes" else "yes") if k % 3 == 0 else label
        text = {"bare": said.capitalize(), "period": said.capitalize() + ".",
                "sentence": "Yes, there is one." if said == "yes" else "No, there is not."}[style]
        answers[qid] = {"text": text}
        per_doc.append(lmms_pope.pope_process_results({"answer": label, "question_id": qid}, [text])["pope_f1_score"])
    local = score_pope(labels, answers)
    assert local["mean_f1"] == pytest.approx(66.27, abs=0.01) and local["num_scored"] == 24
    assert lmms_pope.pope_aggregate_f1_score(per_doc) == pytest.approx(lmms_f1)


def test_batch_size_answers_as_one_at_a_time(tiny_v15, docs, tmp_path):
    """lmms-eval's batch_size=4: the same answers (greedy and sampled: seeded per document) and the same
    per-request reduction log lines as batch_size=1, in request order; bad values are named."""
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "do_sample": True}
    runs = {}
    for n in (1, 4):
        log = tmp_path / f"log{n}.jsonl"
        model = _adapter(tiny_v15, docs, batch_size=n, method="pio", layers="[1,2]", tokens="[12,6]",
                         pio_log=str(log))
        assert model.batch_size == n
        reqs = _requests(docs, GREEDY) + _requests(docs, sampled, [4, 0, 2])  # two runs of generation_kwargs
        runs[n] = (model.generate_until(reqs), [json.loads(x) for x in log.read_text().splitlines()])
        model.clean()
    assert runs[4] == runs[1] and len(runs[1][0]) == 8
    assert [r["doc_id"] for r in runs[4][1]] == [0, 1, 2, 3, 4, 4, 0, 2]
    with pytest.raises(ValueError, match="batch_size 'auto'"):
        _adapter(tiny_v15, docs, batch_size="auto")
