"""ScienceQA: IMG accuracy (the LLaVA paper's SQA number), overall accuracy and category breakdown.

Usage::

    python -m llava.eval.eval_science_qa --base-dir scienceqa --result-file scienceqa/answers/CKPT.jsonl \
        [--split test] [--output-file CKPT_output.jsonl] [--output-result CKPT_result.json] \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

``--base-dir`` holds ``problems.json`` (pid -> choices, answer index, ...) and ``pid_splits.json``.
Letter rule (LLaVA's scorer): the text is exactly one of A-E; or starts with "X. "; or contains exactly
one match of ``The answer is X.``; anything else (and a pid without an answer) is FAILED and wrong.
Correct when the letter's index equals ``answer`` and is within the problem's choices. IMG questions are
those whose answer prompt contains ``<image>`` (for a pid without an answer: problems.json's ``image``).
Breakdown: subject NAT/SOC/LAN, context TXT (has a hint) / NO (no hint, no image), grade G1-6 / G7-12.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from typing import Any

from llava.eval.results import (
    add_result_args,
    configure_logging,
    load_answers,
    maybe_write_result,
    pct,
    qid_key,
)

logger = logging.getLogger(__name__)

OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def extract_letter(text: str) -> str:
    """The option letter of a model answer, or ``FAILED`` (rule in the module docstring)."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def categories(problem: dict) -> list[str]:
    """Breakdown buckets of one problem (subject, context, grade), those that apply."""
    out = []
    subject = SUBJECTS.get(str(problem.get("subject", "")).lower())
    if subject:
        out.append(subject)
    has_hint = bool(str(problem.get("hint") or "").strip())
    if has_hint:
        out.append("TXT")
    elif not problem.get("image"):
        out.append("NO")
    grade = re.fullmatch(r"grade(\d+)", str(problem.get("grade", "")))
    if grade:
        out.append("G1-6" if int(grade.group(1)) <= 6 else "G7-12")
    return out


def load_problems(base_dir: str, split: str) -> dict[str, dict]:
    """Problems of one split, keyed by pid, in pid_splits order."""
    problems_path = os.path.join(base_dir, "problems.json")
    splits_path = os.path.join(base_dir, "pid_splits.json")
    for path in (problems_path, splits_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; --base-dir must hold problems.json and pid_splits.json")
    with open(problems_path, encoding="utf-8") as handle:
        problems = json.load(handle)
    with open(splits_path, encoding="utf-8") as handle:
        splits = json.load(handle)
    if split not in splits:
        raise ValueError(f"split {split!r} not in {splits_path}; available: {', '.join(sorted(splits))}")
    selected: dict[str, dict] = {}
    for pid in splits[split]:
        key = qid_key(pid)
        if key not in problems:
            raise ValueError(f"pid {key!r} of split {split!r} is not in {problems_path}")
        problem = problems[key]
        if "choices" not in problem or "answer" not in problem:
            raise ValueError(f"{problems_path}: problem {key!r} lacks choices or answer")
        selected[key] = problem
    return selected


def score_sqa(problems: dict[str, dict], answers: dict[str, dict]) -> dict[str, Any]:
    """Overall / IMG accuracy and breakdown (percent), plus per-pid details."""
    correct = total = img_correct = img_total = failed = missing = 0
    buckets: dict[str, list[int]] = {}
    details: dict[str, dict] = {}
    for pid, problem in problems.items():
        rec = answers.get(pid)
        if rec is None:
            missing += 1
            text, is_img = FAILED, bool(problem.get("image"))
        else:
            text, is_img = rec["text"], "<image>" in str(rec.get("prompt", ""))
        letter = extract_letter(text)
        failed += letter == FAILED
        n_choices = len(problem["choices"])
        pred_idx = OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1
        hit = pred_idx == int(problem["answer"])
        total += 1
        correct += hit
        if is_img:
            img_total += 1
            img_correct += hit
        for bucket in categories(problem):
            pair = buckets.setdefault(bucket, [0, 0])
            pair[0] += hit
            pair[1] += 1
        details[pid] = {"pred": text, "parsed": letter, "pred_idx": pred_idx, "answer": int(problem["answer"]),
                        "correct": hit, "is_multimodal": is_img}
    if missing:
        logger.warning("%d of %d problems have no answer and count as wrong", missing, total)
    if img_total == 0:
        logger.warning("no IMG questions (no answer prompt contains <image>); IMG accuracy is undefined")
    order = ("NAT", "SOC", "LAN", "TXT", "NO", "G1-6", "G7-12")
    return {
        "accuracy": pct(correct, total),
        "img_accuracy": pct(img_correct, img_total) if img_total else None,
        "categories": {k: pct(*buckets[k]) for k in order if k in buckets},
        "num_total": total, "num_correct": correct, "num_img": img_total, "num_img_correct": img_correct,
        "num_failed": failed, "num_missing": missing,
        "details": details,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="answers jsonl from model_vqa_science")
    parser.add_argument("--split", default="test", help="pid_splits.json key (default: test)")
    parser.add_argument("--output-file", default=None,
                        help="write the per-question analysis ({correct: [...], incorrect: [...]}) as JSON")
    parser.add_argument("--output-result", default=None,
                        help="write {acc, correct, count, results: pid->pred index, outputs: pid->text}")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    res = score_sqa(load_problems(args.base_dir, args.split), load_answers(args.result_file))
    img = res["img_accuracy"]
    print(f"Total: {res['num_total']}, Correct: {res['num_correct']}, Accuracy: {res['accuracy']:.2f}%, "
          f"IMG-Accuracy: " + ("n/a" if img is None else f"{img:.2f}%") + f" ({res['num_img']} IMG questions)")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in res["categories"].items()))
    if res["num_failed"]:
        print(f"  {res['num_failed']} answers had no parseable letter (counted wrong)")

    if args.output_file:
        analysis = {"correct": [], "incorrect": []}
        for pid, d in res["details"].items():
            analysis["correct" if d["correct"] else "incorrect"].append({"question_id": pid} | d)
        with open(args.output_file, "w", encoding="utf-8") as handle:
            json.dump(analysis, handle, indent=2, ensure_ascii=False)
    if args.output_result:
        summary = {"acc": res["accuracy"], "correct": res["num_correct"], "count": res["num_total"],
                   "img_acc": img,
                   "results": {pid: d["pred_idx"] for pid, d in res["details"].items()},
                   "outputs": {pid: d["pred"] for pid, d in res["details"].items()}}
        with open(args.output_result, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, ensure_ascii=False)

    maybe_write_result(
        args, benchmark="sqa", score=img, metric="IMG accuracy (%)",
        sub_scores={"img_accuracy": img, "accuracy": res["accuracy"]} | res["categories"],
        num_questions=res["num_img"],
        extra={k: res[k] for k in ("num_total", "num_correct", "num_img", "num_img_correct", "num_failed",
                                   "num_missing")} | {"split": args.split, "base_dir": args.base_dir},
        expected=res["num_total"], missing=res["num_missing"],
    )
    return res


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
