"""--batch-size: batched answers and logs equal one-by-one ones on every family and method (mixed prompt lengths
and image sizes in one batch), padding never reaches a score, sampling stays per question, an out-of-memory batch
is split without losing an answer, and a run killed mid-batch resumes to the uninterrupted file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llava.eval import batching, model_vqa_loader
from llava.model.families import variants
from tests.helpers import family_flags, image, load
from tests.test_reliability import REPO, loader_args, read, stable

VARIANTS = sorted(variants())
METHODS = {  # unpruned, PIO, FastV, and a merging method (SparseVLM recycles what it drops)
    "none": [],
    "pio": ["--pio-layers", "1,2", "--pio-tokens", "12,6"],
    "fastv": ["--method", "fastv", "--layers", "1", "--tokens", "8"],
    "sparsevlm": ["--method", "sparsevlm", "--layers", "1,2", "--tokens", "12,6"],
}
SIZES = [(400, 300), (120, 120), (200, 500), (640, 427), (900, 280)]
TEXTS = ["What is it?", "Describe the colour of the largest object in the picture, and say where it stands.",
         "Count them.", "Is there a cat sitting on the mat in front of the door of the house?", "Why?",
         "Which of the shapes is closest to the upper left corner of the image?"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Five questions of different lengths about images of five sizes (different crop counts and grids)."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    lines = []
    for i, (size, text) in enumerate(zip(SIZES, TEXTS)):
        image(*size, seed=20 + i).save(root / "images" / f"im{i}.png")
        lines.append({"question_id": f"q{i}", "image": f"im{i}.png", "text": text})
    qfile = root / "q.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return qfile


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    return {v: load(path) for v, path in tiny_checkpoints.all().items()}


def answer(ckpt, loaded_model, qfile: Path, out: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    argv = loader_args(ckpt, qfile, out, "--temperature", "0", "--max_new_tokens", "2", "--pio-log",
                       str(out.with_suffix(".pio.jsonl")), *extra)
    model_vqa_loader.eval_model(model_vqa_loader.build_parser().parse_args(argv), loaded=loaded_model)
    return read(out), read(out.with_suffix(".pio.jsonl"))


HEAVY = {("llava-v1.6", "fastv"), ("llava-v1.6", "sparsevlm"), ("qwen2_5_vl", "fastv"), ("qwen2_5_vl", "sparsevlm")}
"""Cases under -m slow: every family keeps unpruned and PIO in the fast suite, every method LLaVA-1.5."""


@pytest.mark.parametrize(("variant", "method"), [
    pytest.param(v, m, marks=[pytest.mark.slow] if (v, m) in HEAVY else []) for v in VARIANTS for m in sorted(METHODS)])
def test_batch_of_4_equals_one_by_one(tiny_checkpoints, loaded, mixed, tmp_path, variant, method):
    flags = [*family_flags(variant), *METHODS[method]]
    one, log1 = answer(tiny_checkpoints[variant], loaded[variant], mixed, tmp_path / "b1.jsonl", *flags)
    four, log4 = answer(tiny_checkpoints[variant], loaded[variant], mixed, tmp_path / "b4.jsonl", *flags,
                        "--batch-size", "4")
    assert [a["text"] for a in four] == [a["text"] for a in one]
    assert [a["metadata"]["q"] for a in four] == [str(i) for i in range(len(SIZES))]  # question order
    assert stable(four) == stable(one)  # the same lines, run hash included: the batch size is not in the identity
    assert log4 == log1  # kept positions, counts and realised averages of every question
    if method != "none":
        assert all(r["stages"] and r["stages"][0]["after"] < r["n_visual"] for r in log4), "nothing was pruned"
    if variant == "llava-v1.6":  # anyres: the batch's images have different crop counts
        counts = {r["n_visual"] for r in log4}
        assert len(counts) > 1, counts


@pytest.mark.parametrize("method", ["pio", "fastv", "sparsevlm"])
def test_padding_never_reaches_a_score(loaded, method, monkeypatch):
    """Each sample's visual-token scores in a left-padded batch (a short prompt padded by many columns beside a
    long one) equal its scores alone: a padding column leaking into an attention row, a softmax or a proxy
    target would change them even where the kept tokens stay the same."""
    from llava.eval.runner import chat_prompt, encode
    from pio.registry import make_method
    from pio.schedule import Schedule

    tok, model, proc, _ = loaded["llava-v1.5"]
    layers, tokens = {"pio": ((1, 2), (24, 12)), "fastv": ((1,), (16,)), "sparsevlm": ((1, 2), (24, 12))}[method]
    reducer = make_method(method, schedule=Schedule(layers, tokens=tokens))
    seen: list[list[torch.Tensor]] = []
    real = type(reducer).score

    def spy(self, inputs, active):
        scores = real(self, inputs, active)  # (B, S)
        seen.append([scores[b, s[0]: s[0] + s[1]].detach().clone() for b, s in enumerate(inputs.spans)])
        return scores

    monkeypatch.setattr(type(reducer), "score", spy)
    texts = ["Why?", " ".join(["Describe every object in the picture, its colour and where it stands."] * 6)]
    samples = []
    for k, text in enumerate(texts):
        ids, px, sizes = encode(chat_prompt("<image>\n" + text, "vicuna_v1"), [image(400 + 100 * k, 300, seed=k)],
                                tok, proc, model.config)
        samples.append(batching.Sample(ids, px, sizes))
    assert samples[1].ids.shape[1] - samples[0].ids.shape[1] > 60  # the short prompt gets many padding columns
    args = _decoding()
    single = []
    for s in samples:
        seen.clear()
        single.append((batching.generate_batch(model, tok, [s], args, reducer)[0].text, [x[0] for x in seen]))
    seen.clear()
    both = batching.generate_batch(model, tok, samples, args, reducer)
    assert [a.text for a in both] == [t for t, _ in single]
    assert len(seen) == len(single[0][1]) >= 1
    for b in range(2):
        for stage, alone in zip(seen, single[b][1]):
            torch.testing.assert_close(stage[b], alone, atol=1e-5, rtol=1e-4)


def _decoding(**kw) -> object:
    import argparse

    base = dict(temperature=0.0, top_p=None, num_beams=1, max_new_tokens=3, batch_size=1, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_sampling_is_per_question(tiny_v15, loaded, mixed, tmp_path):
    """At temperature 1 each question's draws come from its own seed: a batch of 4 samples what one-by-one
    sampling does (which a resume relies on)."""
    flags = ["--temperature", "1.0", "--max_new_tokens", "6", "--pio-layers", "1,2", "--pio-tokens", "24,12"]
    one, _ = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "s1.jsonl", *flags)
    four, _ = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "s4.jsonl", *flags, "--batch-size", "4")
    assert [a["text"] for a in four] == [a["text"] for a in one]
    assert len({a["text"] for a in one}) > 1


def test_stop_strings_and_eos_per_row(loaded):
    """A row that meets a stop string ends there while the others go on, as each does alone."""
    from llava.eval.runner import chat_prompt, encode

    tok, model, proc, _ = loaded["llava-v1.5"]
    samples = [batching.Sample(*encode(chat_prompt("<image>\n" + t, "vicuna_v1"), [image(*sz, seed=k)], tok, proc,
                                       model.config)) for k, (t, sz) in enumerate(zip(TEXTS[:4], SIZES))]
    args = _decoding(max_new_tokens=8)
    free = [batching.generate_batch(model, tok, [s], args)[0].text for s in samples]
    words = [t.split() for t in free]
    stop = [w[1] for w in words if len(w) > 2][:1]  # a word that ends some answers early
    assert stop, free
    alone = [batching.generate_batch(model, tok, [s], args, stop=stop)[0].text for s in samples]
    together = [a.text for a in batching.generate_batch(model, tok, samples, args, stop=stop)]
    assert together == alone and alone != free


def test_out_of_memory_splits_the_batch(tiny_v15, loaded, mixed, tmp_path, monkeypatch, caplog):
    """An injected out-of-memory error for batches larger than 2: the batch is retried in halves, the answers equal
    the one-by-one run's, and later batches stay at the size that fitted."""
    real = batching.generate_batch
    sizes: list[int] = []

    def tight(model, tok, samples, *args, **kw):
        sizes.append(len(samples))
        if len(samples) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, tok, samples, *args, **kw)

    one, log1 = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "a1.jsonl", "--pio-layers", "1,2",
                       "--pio-tokens", "24,12")
    monkeypatch.setattr(batching, "generate_batch", tight)
    three, log3 = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "a3.jsonl", "--pio-layers", "1,2",
                         "--pio-tokens", "24,12", "--batch-size", "3")
    assert stable(three) == stable(one) and log3 == log1
    assert sizes == [3, 2, 1, 2], sizes  # the failed 3 in halves, then the last two questions at the size that fitted
    assert "out of memory at batch size 3" in caplog.text and "--batch-size 2 fits" in caplog.text


def test_out_of_memory_at_one_question_is_an_error(loaded):
    tok, model, proc, _ = loaded["llava-v1.5"]

    def never(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    b = batching.Batcher(model, tok, _decoding(batch_size=2), answer=never)
    s = batching.Sample(torch.ones(1, 3, dtype=torch.long), None, None)
    with pytest.raises(RuntimeError, match="out of memory answering one question alone"):
        list(b.run([(0, s), (1, s)]))


def test_flags_are_checked(tiny_v15, mixed, tmp_path):
    for extra, message in ((["--batch-size", "0"], "--batch-size must be >= 1"),
                           (["--batch-size", "2", "--profile", str(tmp_path / "p.jsonl")], "--profile times one")):
        with pytest.raises(ValueError, match=message):
            model_vqa_loader.main(loader_args(tiny_v15, mixed, tmp_path / "x.jsonl", *extra))


def test_kill_mid_batch_and_resume(tiny_v15, tmp_path):
    """SIGKILL while a batch is answered (after the first batch's lines): the resumed run's files equal an
    uninterrupted run's."""
    from tests.test_reliability import write_questions

    qfile = write_questions(tmp_path, 12)
    extra = ["--pio-layers", "1,2", "--pio-tokens", "24,12", "--batch-size", "4", "--max_new_tokens", "4"]
    ref = tmp_path / "ref.jsonl"
    model_vqa_loader.main(loader_args(tiny_v15, qfile, ref, *extra, "--pio-log", str(tmp_path / "ref.pio.jsonl")))
    answers, log = tmp_path / "a.jsonl", tmp_path / "a.pio.jsonl"
    cmd = [sys.executable, "-m", "llava.eval.model_vqa_loader",
           *loader_args(tiny_v15, qfile, answers, *extra, "--pio-log", str(log), "--resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        n = len(answers.read_text().splitlines()) if answers.exists() else 0
        if n >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert 4 <= len(answers.read_text().splitlines()) < 12
    model_vqa_loader.main(loader_args(tiny_v15, qfile, answers, *extra, "--pio-log", str(log), "--resume"))
    assert stable(read(answers)) == stable(read(ref))
    assert read(log) == read(tmp_path / "ref.pio.jsonl")


@pytest.mark.slow
def test_loyalty_records_per_question(tiny_v15, loaded, mixed, tmp_path):
    """--loyalty-to with --batch-size 4: each question's record is its own (the same answer flag and first-token
    agreement as one by one; the KL from its row of the batch's first logits, equal within float rounding)."""
    base, _ = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "base.jsonl")
    flags = ["--method", "fastv", "--layers", "1", "--tokens", "8", "--loyalty-to", str(tmp_path / "base.jsonl")]
    _, one = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "l1.jsonl", *flags)
    _, four = answer(tiny_v15, loaded["llava-v1.5"], mixed, tmp_path / "l4.jsonl", *flags, "--batch-size", "4")
    drop = lambda r: {k: v for k, v in r.items() if k != "first_token_kl"}  # noqa: E731
    assert [drop(r) for r in four] == [drop(r) for r in one]
    assert [r["first_token_kl"] for r in four] == pytest.approx([r["first_token_kl"] for r in one], rel=1e-4,
                                                                abs=1e-7)
    assert any(r["first_token_kl"] > 1e-6 for r in one)
