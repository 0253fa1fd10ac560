"""model_vqa_loader and run_llava end to end on a tiny checkpoint, their errors, and --resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llava.eval import model_vqa_loader, run_llava
from tests.helpers import image

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture()
def questions(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    lines = []
    for i, size in enumerate([(400, 300), (336, 336), (200, 500), (640, 427)]):
        image(*size, seed=i).save(imgs / f"im{i}.png")
        lines.append({"question_id": f"q{i}", "image": f"im{i}.png", "text": f"What is object {i}?" + SUFFIX,
                      "category": "default"})
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path, qfile, lines


def run_loader(ckpt, qdir, qfile, answers, *extra):
    model_vqa_loader.main([
        "--model-path", ckpt, "--question-file", str(qfile), "--image-folder", str(qdir / "images"),
        "--answers-file", str(answers), "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", "4", "--device", "cpu", *extra,
    ])
    return [json.loads(x) for x in answers.read_text().splitlines()]


def test_loader_writes_upstream_format_and_pio_log(tiny_v15, questions):
    qdir, qfile, lines = questions
    log = qdir / "pio.jsonl"
    out = run_loader(tiny_v15, qdir, qfile, qdir / "a.jsonl", "--pio-layers", "1,2", "--pio-tokens", "92,22",
                     "--pio-log", str(log))
    assert [a["question_id"] for a in out] == [x["question_id"] for x in lines]
    for a, q in zip(out, lines):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert set(a["metadata"]) == {"q", "run"}
        assert a["prompt"] == q["text"] and a["model_id"] == "llava-v1.5-tiny" and isinstance(a["text"], str)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [x["question_id"] for x in lines]
    for r in recs:
        assert r["n_visual"] == 576
        assert [(s["layer"], s["before"], s["after"]) for s in r["stages"]] == [(1, 576, 92), (2, 92, 22)]
        assert len(r["stages"][1]["kept"]) == 22 and set(r["stages"][1]["kept"]) <= set(r["stages"][0]["kept"])
        assert r["avg_visual_tokens"] == pytest.approx((576 * 1 + 92 * 1 + 22 * 2) / 4)


def test_resume_after_interruption_matches_uninterrupted(tiny_v15, questions):
    qdir, qfile, _ = questions
    full = run_loader(tiny_v15, qdir, qfile, qdir / "full.jsonl")
    part = qdir / "part.jsonl"
    text = (qdir / "full.jsonl").read_text().splitlines()
    part.write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])  # killed while writing line 2
    shutil.copy(qdir / "full.run.json", qdir / "part.run.json")
    resumed = run_loader(tiny_v15, qdir, qfile, part, "--resume")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)


def test_chunks_cover_every_question_once(tiny_v15, questions):
    qdir, qfile, lines = questions
    seen = []
    for idx in range(3):  # 4 questions over 3 chunks
        seen += run_loader(tiny_v15, qdir, qfile, qdir / f"3_{idx}.jsonl", "--num-chunks", "3", "--chunk-idx", str(idx))
    assert sorted(a["question_id"] for a in seen) == sorted(x["question_id"] for x in lines)
    many = run_loader(tiny_v15, qdir, qfile, qdir / "8_7.jsonl", "--num-chunks", "8", "--chunk-idx", "7")
    assert len(many) <= 1


@pytest.mark.parametrize("arch", ["llava-v1.5", "qwen2_5_vl"])
def test_run_llava_prints_answer(tiny_checkpoints, tmp_path, capsys, caplog, arch):
    caplog.set_level("INFO")
    image(300, 200).save(tmp_path / "x.png")
    extra = {"qwen2_5_vl": ["--min-pixels", "3136", "--max-pixels", "50176"]}.get(arch, [])  # the family's options
    run_llava.main(["--model-path", tiny_checkpoints[arch], "--image-file",
                    str(tmp_path / "x.png"), "--query", "What is this?", "--max_new_tokens", "5", "--temperature",
                    "0", "--pio-layers", "2", "--pio-tokens", "16", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) >= 1 and "-> [16]" in caplog.text  # the log line of what the reduction kept


@pytest.mark.parametrize("problem", ["missing_image", "unreadable_image", "malformed_line", "missing_field",
                                     "conv_mode", "bad_schedule"])
def test_clear_errors(tiny_v15, questions, problem):
    qdir, qfile, lines = questions
    extra = []
    if problem == "missing_image":
        (qdir / "images" / "im2.png").unlink()
        err, match = FileNotFoundError, r"q2.*im2\.png"
    elif problem == "unreadable_image":
        (qdir / "images" / "im1.png").write_bytes(b"not an image")
        err, match = ValueError, r"cannot read image .*im1\.png"
    elif problem == "malformed_line":
        qfile.write_text(qfile.read_text() + '{"question_id": 9, "image": \n')
        err, match = ValueError, r"q\.jsonl:5: not valid JSON"
    elif problem == "missing_field":
        qfile.write_text(json.dumps({"question_id": 1, "image": "im0.png"}) + "\n")
        err, match = ValueError, r"q\.jsonl:1: missing field\(s\) text"
    elif problem == "conv_mode":
        extra = ["--conv-mode", "vicuna_v9"]
        err, match = ValueError, r"vicuna_v9.*vicuna_v1"
    else:
        extra = ["--pio-layers", "1,2", "--pio-tokens", "50,80"]
        err, match = ValueError, r"non-increasing|grow"
    with pytest.raises(err, match=match):
        run_loader(tiny_v15, qdir, qfile, qdir / "a.jsonl", *extra)


def test_run_llava_refuses_a_batch_size(tiny_v15, tmp_path):
    with pytest.raises(ValueError, match="--batch-size 2: run_llava answers one query"):
        run_llava.main(["--model-path", str(tiny_v15), "--image-file", str(tmp_path / "x.png"), "--query", "Hi?",
                        "--batch-size", "2"])


def test_checkpoint_missing_key_is_named(tiny_v15, tmp_path):
    from llava.model.builder import load_pretrained_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_v15, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["mm_vision_tower"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json lacks required key\(s\) mm_vision_tower"):
        load_pretrained_model(str(broken), device="cpu")


def test_checkpoint_with_model_type_llava_loads(tiny_v15, tmp_path):
    """The official llava-v1.5 configs say model_type "llava" (upstream's class name), not "llava_llama"."""
    from llava.model.builder import load_pretrained_model

    ckpt = tmp_path / "llava-v1.5-typed"
    shutil.copytree(tiny_v15, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _, model, _, _ = load_pretrained_model(str(ckpt), device="cpu")
    _, ref, _, _ = load_pretrained_model(tiny_v15, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_loader_workers_give_the_same_answers(tiny_v15, questions):
    qdir, qfile, _ = questions
    plain = run_loader(tiny_v15, qdir, qfile, qdir / "w0.jsonl", "--num-workers", "0")
    workers = run_loader(tiny_v15, qdir, qfile, qdir / "w2.jsonl", "--num-workers", "2")
    assert [(a["question_id"], a["text"]) for a in workers] == [(a["question_id"], a["text"]) for a in plain]


def test_loyalty_to_the_unpruned_run(tiny_v15, questions):
    """--loyalty-to: keep-all is loyal with zero divergence; a hard prune's divergence equals a direct forward's."""
    from llava.eval.results import read_loyalty
    from pio import PruneState
    from pio.methods import FastV
    from pio.schedule import Schedule
    from tests.helpers import load, pixels, prompt_ids

    qdir, qfile, lines = questions
    base = run_loader(tiny_v15, qdir, qfile, qdir / "base.jsonl")
    loyal = qdir / "all.pio.jsonl"
    run_loader(tiny_v15, qdir, qfile, qdir / "all.jsonl", "--method", "fastv", "--layers", "2", "--tokens", "576",
               "--pio-log", str(loyal), "--loyalty-to", str(qdir / "base.jsonl"))
    for r in map(json.loads, loyal.read_text().splitlines()):
        assert r["same_answer"] is True and r["first_token_same"] is True and abs(r["first_token_kl"]) < 1e-9
    log = qdir / "fastv.pio.jsonl"
    pruned = run_loader(tiny_v15, qdir, qfile, qdir / "fastv.jsonl", "--method", "fastv", "--layers", "1",
                        "--tokens", "4", "--pio-log", str(log), "--loyalty-to", str(qdir / "base.jsonl"))
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["same_answer"] for r in recs] == [p["text"] == b["text"] for p, b in zip(pruned, base)]
    tok, model, proc, _ = load(tiny_v15)
    ids = prompt_ids(tok, lines[0]["text"])[None]
    from PIL import Image

    x = pixels([Image.open(qdir / "images" / "im0.png").convert("RGB")], proc, model)
    with torch.no_grad():
        p = torch.log_softmax(model(ids, images=x).logits[0, -1].double(), -1)
        q = torch.log_softmax(model(ids, images=x, reducer=FastV(Schedule((1,), tokens=(4,))),
                                    prune_state=PruneState()).logits[0, -1].double(), -1)
    assert recs[0]["first_token_kl"] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-5, abs=1e-9)
    assert recs[0]["first_token_kl"] > 0 and recs[0]["first_token_same"] == bool(p.argmax() == q.argmax())
    summary = read_loyalty(str(log))
    assert summary["n"] == 4 and summary["same_answer"] == pytest.approx(25 * sum(r["same_answer"] for r in recs))
    assert summary["first_token_kl"] == pytest.approx(sum(r["first_token_kl"] for r in recs) / 4)
    with pytest.raises(ValueError, match="used a reduction method \\(fastv\\)"):
        run_loader(tiny_v15, qdir, qfile, qdir / "x.jsonl", "--method", "fastv", "--layers", "1", "--tokens", "4",
                   "--pio-log", str(qdir / "x.pio.jsonl"), "--loyalty-to", str(qdir / "fastv.jsonl"))
    with pytest.raises(ValueError, match="needs --method and --pio-log"):
        run_loader(tiny_v15, qdir, qfile, qdir / "y.jsonl", "--loyalty-to", str(qdir / "base.jsonl"))
