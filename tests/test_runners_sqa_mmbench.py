"""model_vqa_science and model_vqa_mmbench end to end on the miniature fixtures, their scorers on the output,
--resume, PIO logs, and the clear errors for malformed inputs (raised before the model is loaded)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from llava.eval import eval_mmbench, eval_science_qa, model_vqa_mmbench, model_vqa_science
from llava.eval.fixtures import write_fixtures
from llava.mm_utils import get_model_name_from_path
from tests.helpers import load

PIO = ["--pio-layers", "1,2", "--pio-tokens", "92,22"]
SQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


class Loaded(tuple):
    """A loaded ``(tokenizer, model, processor, name)`` that remembers its checkpoint folder (``path``): the runs'
    --model-path, whose files the runners check and fingerprint."""

    path: str


@pytest.fixture(scope="module")
def loaded(tiny_v15):
    tok, model, proc, _ = load(tiny_v15)
    out = Loaded((tok, model, proc, get_model_name_from_path(tiny_v15)))
    out.path = tiny_v15
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("eval"), seed=0, n_per_bench=3,
                          benchmarks=("scienceqa", "mmbench", "mmbench_cn"))


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def strip_ids(rows):
    return [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]


def run_sqa(loaded, data, answers, *extra, model=None):
    sqa = data / "scienceqa"
    args = model_vqa_science.build_parser().parse_args([
        "--model-path", model or loaded.path, "--question-file", str(sqa / "llava_test_CQM-A.json"),
        "--image-folder", str(sqa / "images" / "test"), "--answers-file", str(answers), "--single-pred-prompt",
        "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "3", "--device", "cpu", *extra,
    ])
    model_vqa_science.eval_model(args, loaded)
    return read_jsonl(answers)


def run_mmb(loaded, tsv, answers, *extra, lang="en"):
    args = model_vqa_mmbench.build_parser().parse_args([
        "--model-path", loaded.path if loaded else "ckpt", "--question-file", str(tsv), "--answers-file", str(answers),
        "--single-pred-prompt", "--lang", lang, "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", "3", "--device", "cpu", *extra,
    ])
    model_vqa_mmbench.eval_model(args, loaded)
    return read_jsonl(answers)


def tsv_rows(path):
    model_vqa_mmbench._raise_csv_field_limit()
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_tsv(path, rows, fields):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------------------------- ScienceQA


def test_sqa_answers_every_question_pio_log_scorer_and_resume(loaded, data, tmp_path):
    entries = json.loads((data / "scienceqa" / "llava_test_CQM-A.json").read_text())
    assert any("image" in e for e in entries) and any("image" not in e for e in entries)
    log = tmp_path / "sqa.pio.jsonl"
    out = run_sqa(loaded, data, tmp_path / "sqa.jsonl", *PIO, "--pio-log", str(log))
    assert [a["question_id"] for a in out] == [e["id"] for e in entries]  # text-only ones included
    for a, e in zip(out, entries):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        question = e["conversations"][0]["value"].replace("<image>", "").strip()
        assert a["prompt"] == ("<image>\n" if "image" in e else "") + question + SQA_SUFFIX
        assert isinstance(a["text"], str) and a["model_id"] == loaded[3] and set(a["metadata"]) == {"q", "run"}

    recs = read_jsonl(log)
    assert [r["question_id"] for r in recs] == [e["id"] for e in entries]
    for r, e in zip(recs, entries):
        if "image" in e:
            assert r["n_visual"] == 576
            assert [(s["layer"], s["before"], s["after"]) for s in r["stages"]] == [(1, 576, 92), (2, 92, 22)]
            assert r["avg_visual_tokens"] == pytest.approx((576 + 92 + 22 * 2) / 4)
        else:
            assert r["n_visual"] == 0 and r["stages"] == []

    res = eval_science_qa.main(["--base-dir", str(data / "scienceqa"), "--result-file", str(tmp_path / "sqa.jsonl"),
                                "--output-result", str(tmp_path / "sqa_result.json")])
    assert res["num_total"] == len(entries) and res["num_missing"] == 0
    assert res["num_img"] == sum("image" in e for e in entries)

    # interrupted after the first answer, mid-write of the second (its log line already written): resume drops
    # the log lines of unanswered questions and redoes exactly the rest
    lines = (tmp_path / "sqa.jsonl").read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    shutil.copy(tmp_path / "sqa.run.json", tmp_path / "part.run.json")
    part_log = tmp_path / "part.pio.jsonl"
    part_log.write_text("".join(x + "\n" for x in log.read_text().splitlines()[:2]))
    resumed = run_sqa(loaded, data, part, *PIO, "--resume", "--pio-log", str(part_log))
    assert strip_ids(resumed) == strip_ids(out)
    assert part_log.read_text() == log.read_text()


def test_sqa_prompt_building():
    entry = {"id": "1", "image": "1/image.png",
             "conversations": [{"from": "human", "value": "<image>\nContext: c\nQ?\nA. x\nB. y"}]}
    prompt, shown = model_vqa_science.build_prompts(entry, "vicuna_v1", im_start_end=True, single_pred_prompt=False)
    assert shown == "<image>\nContext: c\nQ?\nA. x\nB. y"
    assert "USER: <im_start><image><im_end>\nContext: c\nQ?\nA. x\nB. y ASSISTANT:" in prompt
    text_only = {"id": "2", "conversations": [{"from": "human", "value": " Q?\nA. x\nB. y "}]}
    prompt, shown = model_vqa_science.build_prompts(text_only, "llava_v0", False, True)
    assert shown == "Q?\nA. x\nB. y" + SQA_SUFFIX and "<image>" not in prompt and prompt.count(SQA_SUFFIX) == 1


@pytest.mark.parametrize("problem", ["missing_image", "not_json", "not_array", "no_conversations",
                                     "duplicate_id", "answer_prompter"])
def test_sqa_clear_errors(data, tmp_path, problem):
    sqa = tmp_path / "scienceqa"
    shutil.copytree(data / "scienceqa", sqa)
    qfile = sqa / "llava_test_CQM-A.json"
    entries = json.loads(qfile.read_text())
    extra = []
    if problem == "missing_image":
        victim = next(e for e in entries if "image" in e)
        (sqa / "images" / "test" / victim["image"]).unlink()
        err, match = FileNotFoundError, rf"question {victim['id']}: image file not found: .*image\.png"
    elif problem == "not_json":
        qfile.write_text('[{"id": "1",\n "conversations": ]')
        err, match = ValueError, r"llava_test_CQM-A\.json:2:.*not valid JSON"
    elif problem == "not_array":
        qfile.write_text(json.dumps({"id": "1"}))
        err, match = ValueError, r"expected a JSON array"
    elif problem == "no_conversations":
        del entries[1]["conversations"]
        qfile.write_text(json.dumps(entries))
        err, match = ValueError, rf"entry 1 \(id '{entries[1]['id']}'\): 'conversations' must be"
    elif problem == "duplicate_id":
        qfile.write_text(json.dumps(entries + [entries[0]]))
        err, match = ValueError, r"duplicate id"
    else:
        extra = ["--answer-prompter"]
        err, match = NotImplementedError, r"--answer-prompter"
    with pytest.raises(err, match=match):  # the model path does not exist: errors come before loading
        run_sqa(None, tmp_path, tmp_path / "a.jsonl", *extra, model=str(tmp_path / "no-such-model"))


# --------------------------------------------------------------------------------------------- MMBench


def test_mmbench_rows_scorer_and_resume(loaded, data, tmp_path):
    tsv = data / "mmbench" / "mmbench_dev_20230712.tsv"
    rows = tsv_rows(tsv)
    answers = tmp_path / "mmb.jsonl"
    out = run_mmb(loaded, tsv, answers)
    assert [a["question_id"] for a in out] == [int(r["index"]) for r in rows]
    for a, r in zip(out, rows):
        assert set(a) == {"question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                          "model_id", "metadata"}
        opts = [r[c] for c in "ABCD" if r[c]]
        assert a["round_id"] == 0 and a["options"] == opts and a["option_char"] == list("ABCD"[: len(opts)])
        head = (r["hint"] + "\n" if r["hint"] else "") + r["question"]
        assert a["prompt"] == head + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", opts))

    res = eval_mmbench.main(["--annotation-file", str(tsv), "--result-file", str(answers)])
    assert res["num_rows"] == len(rows) and res["num_missing"] == 0

    lines = answers.read_text().splitlines()
    answers.write_text("".join(x + "\n" for x in lines[:-2]))
    resumed = run_mmb(loaded, tsv, answers, "--resume")
    assert strip_ids(resumed) == strip_ids(out)


def test_mmbench_all_rounds_cn_with_pio_log(loaded, data, tmp_path):
    src = data / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv"
    rows = [r for r in tsv_rows(src) if int(r["index"]) < 1_000_000][:2]  # main rows only: 4 + 3 rounds
    tsv = tmp_path / "main.tsv"
    write_tsv(tsv, rows, list(rows[0]))
    log = tmp_path / "mmb.pio.jsonl"
    out = run_mmb(loaded, tsv, tmp_path / "mmb.jsonl", "--all-rounds", *PIO, "--pio-log", str(log), lang="cn")
    expect = [(int(r["index"]), k) for r in rows for k in range(sum(bool(r[c]) for c in "ABCD"))]
    assert [(a["question_id"], a["round_id"]) for a in out] == expect
    for a in out:
        r = next(r for r in rows if int(r["index"]) == a["question_id"])
        opts = [r[c] for c in "ABCD" if r[c]]
        k = a["round_id"]
        assert a["options"] == opts[k:] + opts[:k]
        assert a["option_char"] == list("ABCD"[: len(opts)])[k:] + list("ABCD"[: len(opts)])[:k]
        assert [r[c] for c in a["option_char"]] == a["options"]  # option_char names each shown option's letter
        assert a["prompt"].endswith("".join(f"\n{c}. {o}" for c, o in zip("ABCD", a["options"])))
    recs = read_jsonl(log)
    assert [r["question_id"] for r in recs] == [a["question_id"] for a in out]
    assert all([(s["layer"], s["before"], s["after"]) for s in r["stages"]] == [(1, 576, 92), (2, 92, 22)]
               for r in recs)

    # resume keys on (question_id, round_id): a question with some rounds done gets only the rest
    answers = tmp_path / "mmb.jsonl"
    lines = answers.read_text().splitlines()
    answers.write_text("".join(x + "\n" for x in lines[:-2]))
    full_log = log.read_text()
    resumed = run_mmb(loaded, tsv, answers, "--all-rounds", *PIO, "--resume", "--pio-log", str(log), lang="cn")
    assert strip_ids(resumed) == strip_ids(out)
    assert log.read_text() == full_log  # the two log lines without answers were dropped, then written again


def test_mmbench_prompt_building():
    q = model_vqa_mmbench.MMBQuestion(7, 2, "Which?", None, ["x", "y", "z"], "")
    assert model_vqa_mmbench.question_text(q, q.options) == "Which?\nA. x\nB. y\nC. z"
    q.hint = "See."
    assert model_vqa_mmbench.question_text(q, ["y", "z", "x"]) == "See.\nWhich?\nA. y\nB. z\nC. x"
    en = model_vqa_mmbench.build_prompt("T", "vicuna_v1", False, True, "en")
    assert "USER: <image>\nT\nAnswer with the option's letter from the given choices directly. ASSISTANT:" in en
    cn = model_vqa_mmbench.build_prompt("T", "vicuna_v1", True, True, "cn")
    assert "<im_start><image><im_end>\nT\n请直接回答选项字母。 ASSISTANT:" in cn
    assert "请直接" not in model_vqa_mmbench.build_prompt("T", "vicuna_v1", False, False, "cn")
    assert [r[0] for r in model_vqa_mmbench.rounds(q, all_rounds=False)] == [0]
    assert model_vqa_mmbench.rounds(q, all_rounds=True)[2] == (2, ["z", "x", "y"], ["C", "A", "B"])
    for value in ("", "nan", "NaN", "None", "NONE", "  ", "N/A"):
        assert model_vqa_mmbench.is_missing(value)
    assert not model_vqa_mmbench.is_missing("None of the above")


@pytest.mark.parametrize("problem", ["missing_column", "bad_image", "bad_index", "ragged_row", "no_options"])
def test_mmbench_clear_errors(data, tmp_path, problem):
    rows = tsv_rows(data / "mmbench" / "mmbench_dev_20230712.tsv")
    fields = list(rows[0])
    tsv = tmp_path / "q.tsv"
    if problem == "missing_column":
        fields.remove("hint")
        rows = [{k: v for k, v in r.items() if k != "hint"} for r in rows]
        match = r"q\.tsv: missing column\(s\) hint"
    elif problem == "bad_image":
        rows[2]["image"] = "bm90IGFuIGltYWdl"  # base64 of "not an image"
        match = rf"q\.tsv:4 \(index {rows[2]['index']}\): column image is not a base64-encoded image"
    elif problem == "bad_index":
        rows[1]["index"] = "abc"
        match = r"q\.tsv:3: column index must be an integer, got 'abc'"
    elif problem == "no_options":
        rows[0]["A"] = ""
        match = r"q\.tsv:2 \(index 0\): no options"
    write_tsv(tsv, rows, fields)
    if problem == "ragged_row":
        with open(tsv, "a", encoding="utf-8") as f:
            f.write("99\tonly two fields\n")
        match = rf"q\.tsv:{len(rows) + 2}: the record has 2 tab-separated fields"
    with pytest.raises(ValueError, match=match):  # the model path does not exist: errors come before loading
        run_mmb(None, tsv, tmp_path / "a.jsonl")


def test_batches_mix_text_only_and_image_questions(loaded, data, tmp_path):
    """ScienceQA (text-only questions beside image ones) and MMBench's rotated rounds with --batch-size 3: the
    answers and reduction logs of --batch-size 1."""
    runs = {}
    for n in ("1", "3"):
        log = tmp_path / f"sqa{n}.pio.jsonl"
        sqa = run_sqa(loaded, data, tmp_path / f"sqa{n}.jsonl", *PIO, "--pio-log", str(log), "--batch-size", n)
        mlog = tmp_path / f"mmb{n}.pio.jsonl"
        mmb = run_mmb(loaded, data / "mmbench" / "mmbench_dev_20230712.tsv", tmp_path / f"mmb{n}.jsonl", *PIO,
                      "--all-rounds", "--pio-log", str(mlog), "--batch-size", n)
        runs[n] = (strip_ids(sqa), read_jsonl(log), strip_ids(mmb), read_jsonl(mlog))
    assert runs["3"] == runs["1"]
    assert any(r["n_visual"] == 0 for r in runs["3"][1]) and any(r["n_visual"] for r in runs["3"][1])
