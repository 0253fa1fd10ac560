"""Scorers on hand-made fixtures with hand-computed scores (formats per shared/docs/benchmarks.md)."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
from argparse import Namespace

import pytest

from llava.eval import (
    eval_gqa,
    eval_mmbench,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
    eval_vqav2,
)
from llava.eval.results import RESULT_FIELDS, load_answers, read_pio_log, read_results, write_result
from llava.eval.vqa_eval import normalize_answer, vqa_accuracy

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, rows, extra_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def answer(qid, text, prompt=""):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


def read_result(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- POPE

POPE_SPLITS = {  # split -> (id offset, [(question, label, model answer)])
    "adversarial": (0, [
        ("Is there a dog in the image?", "yes", "Yes, there is a dog."),
        ("Is there a cat in the image?", "yes", "No."),
        ("Is there a car in the image?", "no", "There is\nno car in the image."),  # newline inside
        ("Is there a bus in the image?", "no", "Yes"),
    ]),
    "random": (10000000, [
        ("Is there a tree in the image?", "yes", "Yes"),
        ("Is there a boat in the image?", "no", "no"),
    ]),
    "popular": (20000000, [  # no "yes" predictions at all
        ("Is there a person in the image?", "yes", "No"),
        ("Is there a chair in the image?", "no", "No, there is not."),
    ]),
}


def make_pope(tmp_path, drop_split=None):
    ann_dir = tmp_path / "coco"
    questions, answers = [], []
    for split, (offset, items) in POPE_SPLITS.items():
        ann = [{"question_id": i + 1, "image": f"img{i}.jpg", "text": q, "label": y}
               for i, (q, y, _) in enumerate(items)]
        write_jsonl(str(ann_dir / f"coco_pope_{split}.json"), ann)
        for i, (q, _, a) in enumerate(items):
            qid = offset + i + 1
            questions.append({"question_id": qid, "image": f"img{i}.jpg", "text": q + SUFFIX, "category": split})
            if split != drop_split:
                answers.append(answer(qid, a, q + SUFFIX))
    (ann_dir / "README.txt").write_text("not an annotation file")
    answers.reverse()  # chunks merged in another order: matching must be by id
    return (str(ann_dir), write_jsonl(str(tmp_path / "q.jsonl"), questions),
            write_jsonl(str(tmp_path / "answers" / "ckpt.jsonl"), answers))


def test_pope_parse_rule():
    assert eval_pope.parse_yes_no("No, there is not.") == "no"
    assert eval_pope.parse_yes_no("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert eval_pope.parse_yes_no("There is\nno cat") == "no"
    assert eval_pope.parse_yes_no("NO") == "yes"  # upstream only knows "No", "no", "not"
    assert eval_pope.parse_yes_no("") == "yes"


def test_pope_scores_and_result_json(tmp_path, caplog):
    ann_dir, qfile, afile = make_pope(tmp_path)
    out = tmp_path / "pope" / "results" / "ckpt.json"
    with caplog.at_level(logging.WARNING):
        res = eval_pope.main(["--annotation-dir", ann_dir, "--question-file", qfile, "--result-file", afile,
                              "--result-json", str(out), "--schedule", "none", "--wall-time", "3.5"])
    adv, pop, rnd = res["splits"]["adversarial"], res["splits"]["popular"], res["splits"]["random"]
    assert (adv.tp, adv.fp, adv.tn, adv.fn) == (1, 1, 1, 1)
    assert adv.f1 == pytest.approx(0.5) and adv.accuracy == pytest.approx(0.5)
    assert (pop.tp, pop.fp, pop.tn, pop.fn) == (0, 0, 1, 1)
    assert pop.precision == 0.0 and pop.f1 == 0.0 and pop.yes_ratio == 0.0 and pop.accuracy == 0.5
    assert any("precision undefined" in n for n in pop.notes)
    assert rnd.f1 == 1.0 and rnd.accuracy == 1.0
    assert res["mean_f1"] == pytest.approx(50.0)
    assert res["mean_accuracy"] == pytest.approx(200.0 / 3)
    assert list(res["splits"]) == ["adversarial", "popular", "random"]
    written = read_result(out)
    assert written["benchmark"] == "pope" and written["model"] == "ckpt" and written["schedule"] == "none"
    assert written["score"] == pytest.approx(50.0) and written["num_questions"] == 8
    assert written["sub_scores"]["f1_adversarial"] == pytest.approx(50.0)
    assert written["wall_time_s"] == 3.5 and written["avg_visual_tokens"] is None


def test_pope_split_without_answers(tmp_path):
    ann_dir, qfile, afile = make_pope(tmp_path, drop_split="random")
    res = eval_pope.score_pope(
        eval_pope.label_questions(eval_pope.find_annotation_files(ann_dir), qfile), load_answers(afile))
    assert res["missing_splits"] == ["random"]
    assert res["mean_f1"] == pytest.approx(25.0)  # (0.5 + 0) / 2


def test_pope_misaligned_question_file(tmp_path):
    ann_dir, qfile, _ = make_pope(tmp_path)
    rows = [json.loads(line) for line in open(qfile)]
    rows[0], rows[1] = rows[1], rows[0]
    write_jsonl(qfile, rows)
    with pytest.raises(ValueError, match="not in the same order"):
        eval_pope.label_questions(eval_pope.find_annotation_files(ann_dir), qfile)


# ----------------------------------------------------------------------------- MME

def make_mme(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    gt = {  # task -> nested?, {stem: [(question, gt)]}
        "existence": (False, {"000001": [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")],
                              "000002": [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")]}),
        "artwork": (True, {"10002": [("Is this artwork by Monet?", "Yes"), ("Is this artwork by Dali?", "No")]}),
        "code_reasoning": (False, {"0020": [("Is a python code shown?", "Yes"), ("Is a java code shown?", "No")]}),
    }
    for task, (nested, images) in gt.items():
        txt_dir = root / task / ("questions_answers_YN" if nested else "")
        txt_dir.mkdir(parents=True, exist_ok=True)
        for stem, qs in images.items():
            (txt_dir / f"{stem}.txt").write_text(
                "".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in qs))
    preds = {  # code_reasoning has ground truth but no answers -> missing subtask
        ("existence", "000001"): ["Yes\nit is", "No"],
        ("existence", "000002"): ["Yes", "Yes."],
        ("artwork", "10002"): ["yes", "I don't know"],
    }
    answers = []
    for (task, stem), texts in preds.items():
        for (q, _), text in zip(gt[task][1][stem], texts):
            image = f"{task}/images/{stem}.jpg" if gt[task][0] else f"{task}/{stem}.jpg"
            answers.append(answer(image, text, q + SUFFIX))
    return str(root), write_jsonl(str(tmp_path / "answers" / "ckpt.jsonl"), answers)


def test_mme_missing_subtask(tmp_path, capsys):
    gt_dir, afile = make_mme(tmp_path)
    out = tmp_path / "res.json"
    conv = tmp_path / "txt"
    res = eval_mme.main(["--gt-dir", gt_dir, "--result-file", afile, "--result-json", str(out),
                         "--convert-out", str(conv)])
    ex, art = res["tasks"]["existence"], res["tasks"]["artwork"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert (art["acc"], art["acc_plus"], art["score"]) == (50.0, 0.0, 50.0)
    assert art["other"] == 1
    assert res["perception"] == 175.0 and res["cognition"] == 0.0 and res["total"] == 175.0
    assert "code_reasoning" in res["missing_subtasks"] and len(res["missing_subtasks"]) == 12
    assert "Missing subtasks" in capsys.readouterr().out
    written = read_result(out)
    assert written["score"] == 175.0 and written["metric"] == "perception+cognition total"
    assert written["sub_scores"]["existence"] == 125.0 and written["sub_scores"]["count"] is None
    assert written["num_questions"] == 6
    lines = (conv / "existence.txt").read_text().splitlines()
    assert lines[0] == "000001.jpg\tIs there a dog in this image? Please answer yes or no.\tYes\tYes it is"
    assert len(lines) == 4 and not (conv / "code_reasoning.txt").exists()


def test_mme_parse_and_perception_score(tmp_path):
    assert [eval_mme.parse_yes_no(t) for t in ("Yes", "no.", "Not sure", "unknown", "Yes\n")] == \
        ["yes", "no", "no", "other", "yes"]
    gt_dir, afile = make_mme(tmp_path)
    out = tmp_path / "res.json"
    eval_mme.main(["--gt-dir", gt_dir, "--result-file", afile, "--result-json", str(out),
                   "--mme-score", "perception"])
    assert read_result(out)["metric"] == "perception total"


# ----------------------------------------------------------------------------- TextVQA

def test_vqa_normalisation():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the cat.") == "cat"
    assert normalize_answer("Dont stop") == "don't stop"
    assert normalize_answer("Twenty-two") == "twenty 2"  # per-word number map
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("cat's toy?") == "cat 's toy"
    assert normalize_answer("left - right") == "left right"
    assert normalize_answer("Yes!\n") == "yes"
    # benchmarks.md fixture values
    assert vqa_accuracy("Dakota", ["dakota"] * 7 + ["dakota digital"] * 3) == 1.0
    assert vqa_accuracy("Twenty-two", ["22"] * 9 + ["twenty two"]) == pytest.approx(0.3)
    assert vqa_accuracy("x", []) == 0.0


def test_textvqa_accuracy(tmp_path):
    data = [
        {"image_id": "img1", "question": "How many cats are there?", "question_id": 1,
         "answers": ["2"] * 5 + ["two"] * 2 + ["3"] * 3},  # "Two" -> "2": 7 matches -> 1.0
        {"image_id": "img1", "question": "What animal is this?", "question_id": 2,
         "answers": ["cat"] * 2 + ["dog"] * 8},  # "the cat." -> "cat": 2 matches -> 0.6
        {"image_id": "img2", "question": "What does the sign say?", "question_id": 3,
         "answers": ["don't stop", "dont stop"] + ["stop"] * 8},  # contraction: 2 matches -> 0.6
        {"image_id": "img3", "question": "Unanswered?", "question_id": 4, "answers": ["a"] * 10},
    ]
    ann = write_json(str(tmp_path / "TextVQA_0.5.1_val.json"), {"dataset_name": "textvqa", "data": data})
    answers = [
        answer("img1", "Two", "How many cats are there?" + SUFFIX),
        answer("img1", "the cat.", "What animal is this?\nReference OCR token: CAT, FOOD" + SUFFIX),
        answer("img2", "Dont stop", "What does the sign say?\nReference OCR token: " + SUFFIX),
        answer("img9", "foo", "Not annotated?" + SUFFIX),
    ]
    afile = write_jsonl(str(tmp_path / "a.jsonl"), answers)
    out = tmp_path / "r.json"
    res = eval_textvqa.main(["--annotation-file", ann, "--result-file", afile, "--result-json", str(out)])
    assert res["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.6) / 3)
    assert (res["num_scored"], res["num_unmatched_answers"], res["num_unanswered"]) == (3, 1, 1)
    assert read_result(out)["score"] == pytest.approx(220 / 3)


def test_textvqa_prompt_forms():
    q = eval_textvqa.question_from_prompt
    assert q("What is it?" + SUFFIX) == "What is it?"
    assert q("Reference OCR token: A, B\nWhat is it?" + SUFFIX) == "What is it?"
    assert q("OCR tokens: A B Question: What is it? Short answer:") == "What is it?"
    assert q("") is None


# ----------------------------------------------------------------------------- GQA

def test_gqa_accuracy_and_convert(tmp_path):
    def entry(ans, structural, balanced=True):
        return {"question": "?", "answer": ans, "isBalanced": balanced, "types": {"structural": structural},
                "groups": {"global": None, "local": None}}

    questions = {"q1": entry("no", "verify"), "q2": entry("red", "query"), "q3": entry("table", "query"),
                 "q4": entry("yes", "verify", balanced=False), "q5": entry("left", "query")}
    qfile = write_json(str(tmp_path / "testdev_balanced_questions.json"), questions)
    afile = write_jsonl(str(tmp_path / "merge.jsonl"), [
        answer("q1", "No"), answer("q2", "Blue."), answer("q3", "Table."), answer("q4", "yes")])
    conv = tmp_path / "testdev_balanced_predictions.json"
    res = eval_gqa.main(["--annotation-file", qfile, "--result-file", afile, "--convert-out", str(conv)])
    assert res["accuracy"] == 50.0  # q1, q3 right; q2 wrong; q5 unanswered; q4 not balanced
    assert res["binary"] == 100.0 and res["open"] == pytest.approx(100 / 3)
    assert res["num_missing"] == 1 and res["accuracy_answered"] == pytest.approx(200 / 3)
    assert json.loads(conv.read_text()) == [
        {"questionId": "q1", "prediction": "no"}, {"questionId": "q2", "prediction": "blue"},
        {"questionId": "q3", "prediction": "table"}, {"questionId": "q4", "prediction": "yes"}]


# ----------------------------------------------------------------------------- ScienceQA

def test_sqa_letter_extraction():
    ex = eval_science_qa.extract_letter
    assert ex("A") == "A"
    assert ex("B. a dog") == "B"
    assert ex("The answer is C.") == "C"
    assert ex("A.") == "FAILED"  # upstream needs "X. " (with the space) or the bare letter
    assert ex("The answer is A") == "FAILED"  # its regex needs one character after the letter
    assert ex("The answer is A. The answer is B.") == "FAILED"  # more than one match
    assert ex("a") == "FAILED" and ex("") == "FAILED"


def test_sqa_img_vs_overall(tmp_path):
    def prob(answer_idx, n_choices, image, subject, hint=""):
        return {"question": "?", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer_idx,
                "hint": hint, "image": "image.png" if image else None, "subject": subject, "grade": "grade3"}

    problems = {
        "1": prob(0, 3, True, "natural science"), "2": prob(1, 2, True, "natural science"),
        "3": prob(2, 3, True, "natural science"), "4": prob(0, 2, True, "natural science"),
        "5": prob(1, 2, False, "social science", hint="some context"), "6": prob(0, 2, False, "social science"),
        "7": prob(0, 2, True, "social science"), "8": prob(1, 2, True, "social science"),
        "9": prob(0, 2, True, "social science"),
    }
    base = tmp_path / "scienceqa"
    write_json(str(base / "problems.json"), problems)
    write_json(str(base / "pid_splits.json"), {"test": [str(i) for i in range(1, 9)], "train": ["9"]})
    img, txt = "<image>\nQuestion?\nA. x\nB. y", "Question?\nA. x\nB. y"
    afile = write_jsonl(str(tmp_path / "a.jsonl"), [
        answer("1", "A", img), answer("2", "B. c1", img), answer("3", "The answer is C.", img),
        answer("4", "A.", img),  # FAILED -> wrong
        answer("5", "B", txt), answer("6", "The answer is A. Because.", txt),
        answer("7", "C", img),  # letter beyond the 2 choices -> wrong
        # "8" unanswered -> wrong, IMG by problems.json
        answer("9", "A", img),  # not in the test split
    ])
    out, result = tmp_path / "r.json", tmp_path / "sqa_result.json"
    res = eval_science_qa.main(["--base-dir", str(base), "--result-file", afile, "--result-json", str(out),
                                "--output-result", str(result)])
    assert res["accuracy"] == 62.5 and res["img_accuracy"] == 50.0  # 5/8 overall, 3/6 IMG
    assert (res["num_failed"], res["num_missing"], res["num_img"]) == (2, 1, 6)
    assert res["categories"] == {"NAT": 75.0, "SOC": 50.0, "TXT": 100.0, "NO": 100.0, "G1-6": 62.5}
    written = read_result(out)
    assert written["score"] == 50.0 and written["sub_scores"]["accuracy"] == 62.5
    assert json.loads(result.read_text())["results"]["7"] == -1


# ----------------------------------------------------------------------------- MMBench

MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]


def make_mmbench(tmp_path):
    image = base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg" * 50).decode()
    rows = [  # (index, options, answer, prediction)
        (0, ["cat", "dog", "bird"], "A", "A"),
        (1000000, ["dog", "bird", "cat"], "C", "C."),
        (2000000, ["bird", "cat", "dog"], "B", "(B) cat"),
        (1, ["red", "blue"], "B", "B"),
        (1000001, ["blue", "red"], "A", "B"),  # the only wrong variant
    ]
    path = tmp_path / "mmbench_dev.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(MMB_HEADER)
        for index, opts, ans, _ in rows:
            opts = opts + [""] * (4 - len(opts))
            w.writerow([index, "Which one?", "a hint\nwith a newline\tand a tab", *opts, ans, "attribute",
                        image, "src", "l2", "", "dev"])
    afile = write_jsonl(str(tmp_path / "a.jsonl"), [
        dict(answer(index, pred), round_id=0, options=[], option_char=[]) for index, _, _, pred in rows])
    return str(path), afile


def test_mmbench_letter_extraction():
    opts = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    ex = eval_mmbench.extract_letter
    assert [ex(t, opts) for t in ("A", "B.", "(C) bird", "D: fish", "The answer is C", "答案是B", "dog")] == \
        ["A", "B", "C", "D", "C", "B", "B"]
    assert ex("I think so", opts) is None and ex("", opts) is None and ex("Apple", opts) is None


def test_mmbench_circular(tmp_path):
    tsv, afile = make_mmbench(tmp_path)
    out = tmp_path / "r.json"
    res = eval_mmbench.main(["--annotation-file", tsv, "--result-file", afile, "--lang", "cn",
                             "--result-json", str(out)])
    assert res["circular_accuracy"] == 50.0 and res["single_pass_accuracy"] == 100.0
    assert res["row_accuracy"] == 80.0 and res["num_questions"] == 2 and res["num_rows"] == 5
    written = read_result(out)
    assert written["benchmark"] == "mmbench_cn" and written["score"] == 50.0


def test_mmbench_submission_table(tmp_path):
    tsv, afile = make_mmbench(tmp_path)
    header, rows = eval_mmbench.read_mmbench_tsv(tsv)
    assert rows[0].raw["hint"] == "a hint\nwith a newline\tand a tab" and rows[3].options == {"A": "red", "B": "blue"}
    path = eval_mmbench.write_submission(str(tmp_path / "up" / "ckpt.tsv"), header, rows,
                                         load_answers(afile, key=eval_mmbench.index_key))
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[2] == ["1000000", "Which one?", "dog", "bird", "cat", "", "C.", "C", "dev"]
    assert len(table) == 6
    xlsx = eval_mmbench.write_submission(str(tmp_path / "up" / "ckpt.xlsx"), header, rows,
                                         load_answers(afile, key=eval_mmbench.index_key))
    from openpyxl import load_workbook  # a dependency: the MMBench server takes .xlsx

    sheet = [[("" if c is None else str(c)) for c in r] for r in load_workbook(xlsx).active.iter_rows(values_only=True)]
    assert xlsx.endswith(".xlsx") and sheet[0] == table[0] and sheet[2] == table[2]


# ----------------------------------------------------------------------------- VQAv2

def test_vqav2_submission_and_local_accuracy(tmp_path):
    qfile = write_jsonl(str(tmp_path / "test2015.jsonl"), [
        {"question_id": i, "image": "x.jpg", "text": "?" + SUFFIX, "category": "default"} for i in (1, 2, 3)])
    afile = write_jsonl(str(tmp_path / "merge.jsonl"), [answer(1, "Red."), answer(2, "Two")],
                        extra_lines=['{"question_id": 3, "text": "trunc'])  # a cut-off last line
    ann = write_json(str(tmp_path / "ann.json"), {"annotations": [
        {"question_id": 1, "answer_type": "other", "answers": [{"answer": "red"}] * 10},
        {"question_id": 2, "answer_type": "number", "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8},
    ]})
    sub, out = tmp_path / "upload" / "ckpt.json", tmp_path / "r.json"
    res = eval_vqav2.main(["--question-file", qfile, "--result-file", afile, "--submission-out", str(sub),
                           "--annotation-file", ann, "--result-json", str(out)])
    assert json.loads(sub.read_text()) == [
        {"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "2"}, {"question_id": 3, "answer": ""}]
    assert res["num_unanswered"] == 1 and res["num_bad_lines"] == 1
    assert res["local_accuracy"] == pytest.approx(80.0)  # (1.0 + 0.6) / 2
    assert res["answer_types"] == {"number": pytest.approx(60.0), "other": 100.0}
    assert read_result(out)["score"] == pytest.approx(80.0)


# ----------------------------------------------------------------------------- results.py

def test_results_round_trip(tmp_path):
    log = write_jsonl(str(tmp_path / "pio.jsonl"), [
        {"question_id": 1, "n_visual": 576, "stages": [], "avg_visual_tokens": 64.0},
        {"question_id": 2, "n_visual": 576, "stages": [], "avg_visual_tokens": 128.0}], extra_lines=["", "  "])
    assert read_pio_log(log) == (96.0, 2)
    assert read_pio_log(str(tmp_path / "absent.jsonl")) == (None, 0)
    args = Namespace(model=None, schedule="layers=1,10,15 tokens=92,54,22", pio_log=log, wall_time=12.5,
                     result_file="answers/llava_gqa_testdev_balanced/ckpt-pio/merge.jsonl")
    path = tmp_path / "gqa" / "results" / "ckpt-pio.json"
    written = write_result(str(path), benchmark="gqa", score=61.5, metric="accuracy", sub_scores={"a": 1.0},
                           num_questions=10, args=args, extra={"nan": float("nan")})
    back = read_results(str(tmp_path))
    assert len(back) == 1 and back[0].pop("_path") == str(path)
    assert back[0] == written
    assert tuple(written) == RESULT_FIELDS
    assert written["model"] == "ckpt-pio" and written["avg_visual_tokens"] == 96.0
    assert written["extra"]["pio_log_samples"] == 2 and written["extra"]["nan"] is None
    assert written["method"] is None and "run_info" not in written["extra"]  # no run description beside


def test_result_takes_the_method_from_the_run_description(tmp_path):
    answers = tmp_path / "answers" / "ckpt-fastv64.jsonl"
    answers.parent.mkdir()
    answers.write_text('{"question_id": 1, "text": "yes"}\n')
    config = {"method": "fastv", "schedule": {"layers": [2]}, "positions": "original"}
    (tmp_path / "answers" / "ckpt-fastv64.run.json").write_text(json.dumps(
        {"model_path": "m", "method": "fastv", "budget": 64.0, "method_config": config}))
    args = Namespace(model=None, schedule="fastv budget=64", pio_log=None, wall_time=None, result_file=str(answers),
                     run_info=None)
    written = write_result(str(tmp_path / "r.json"), benchmark="pope", score=1.0, metric="f1", sub_scores={},
                           num_questions=1, args=args)
    assert written["method"] == "fastv" and written["budget"] == 64.0 and written["method_config"] == config
    assert written["extra"]["run_info"].endswith("ckpt-fastv64.run.json")
    (tmp_path / "bad.run.json").write_text("[1]")
    with pytest.raises(ValueError, match="bad.run.json: expected a JSON object"):
        write_result(str(tmp_path / "r2.json"), benchmark="pope", score=1.0, metric="f1", sub_scores={},
                     num_questions=1, args=Namespace(**{**vars(args), "run_info": str(tmp_path / "bad.run.json")}))


def test_load_answers_errors_and_duplicates(tmp_path, caplog):
    bad = write_jsonl(str(tmp_path / "answers.jsonl"), [answer(1, "a")], extra_lines=["", "{not json"])
    with pytest.raises(ValueError, match=r"answers\.jsonl:3: malformed JSON"):
        load_answers(bad)
    nofield = write_jsonl(str(tmp_path / "nofield.jsonl"), [{"text": "a"}])
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: .*question_id"):
        load_answers(nofield)
    dup = write_jsonl(str(tmp_path / "dup.jsonl"), [answer(1, "first"), answer("1", "second"), answer(2, "x")])
    with caplog.at_level(logging.WARNING):
        loaded = load_answers(dup)
    assert loaded["1"]["text"] == "second" and len(loaded) == 2
    assert "duplicate" in caplog.text
