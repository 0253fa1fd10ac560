"""MME: acc and acc+ per subtask, perception and cognition totals, computed directly.

Usage::

    python -m llava.eval.eval_mme --gt-dir MME/MME_Benchmark_release_version \
        --result-file MME/answers/CKPT.jsonl [--mme-score total|perception] [--convert-out DIR] \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

Ground truth lives in the official release folder: one folder per subtask, either flat (``<stem>.txt``
beside the images) or nested (``questions_answers_YN/<stem>.txt``); each txt line is
``question<TAB>Yes|No``. An answer is matched by (subtask = first path component of ``question_id``,
image stem, question text without the LLaVA suffix / "Please answer yes or no.").

Scoring (the MME eval tool's rule): the answer is lower-cased; "yes"/"no" exactly, else "yes" then "no"
searched in its first 4 characters, else "other" (wrong). acc = correct questions / questions x 100;
acc+ = images with every question correct / images x 100; subtask score = acc + acc+.
Perception = sum of the 10 perception subtasks, cognition = sum of the 4 cognition subtasks.
A subtask with no answers (or no ground truth) is reported missing and left out of the totals; a
question of a present subtask without an answer counts as wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from llava.eval.results import (
    add_result_args,
    configure_logging,
    maybe_write_result,
    pct,
    read_answer_records,
)

logger = logging.getLogger(__name__)

PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)
SUBTASKS: tuple[str, ...] = PERCEPTION + COGNITION

LLAVA_SUFFIX = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."
NESTED_GT_DIR = "questions_answers_YN"


def question_key(text: str) -> str:
    """Question text without the LLaVA suffix, the MME suffix, an ``<image>`` prefix and extra spaces."""
    text = text.replace("<image>", " ")
    for suffix in (LLAVA_SUFFIX, MME_SUFFIX):
        text = text.replace(suffix, " ")
    return re.sub(r"\s+", " ", text).strip()


def parse_yes_no(text: str) -> str:
    """'yes', 'no' or 'other', by the MME eval tool's rule (see the module docstring)."""
    ans = text.strip().lower()
    if ans in ("yes", "no"):
        return ans
    head = ans[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass
class GTQuestion:
    question: str  # as written in the GT file
    answer: str  # "yes" / "no"


@dataclass
class SubtaskGT:
    images: dict[str, list[GTQuestion]] = field(default_factory=dict)  # image stem -> questions, file order


def _resolve_gt_root(gt_dir: str) -> str:
    """Accept the release folder itself or a parent with one extra level (e.g. ``MME_Benchmark/``)."""
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"MME ground-truth folder not found: {gt_dir}")
    if any(os.path.isdir(os.path.join(gt_dir, t)) for t in SUBTASKS):
        return gt_dir
    subdirs = [d for d in sorted(os.listdir(gt_dir)) if os.path.isdir(os.path.join(gt_dir, d))]
    for sub in subdirs:
        if any(os.path.isdir(os.path.join(gt_dir, sub, t)) for t in SUBTASKS):
            logger.info("using %s (subtask folders are one level down)", os.path.join(gt_dir, sub))
            return os.path.join(gt_dir, sub)
    raise FileNotFoundError(
        f"{gt_dir} has none of the MME subtask folders ({', '.join(SUBTASKS)}); pass "
        "MME_Benchmark_release_version as --gt-dir")


def load_mme_gt(gt_dir: str) -> dict[str, SubtaskGT]:
    """Ground truth per subtask found under ``gt_dir`` (absent subtasks are simply not in the dict)."""
    root = _resolve_gt_root(gt_dir)
    gt: dict[str, SubtaskGT] = {}
    for task in SUBTASKS:
        task_dir = os.path.join(root, task)
        if not os.path.isdir(task_dir):
            continue
        txt_dir = os.path.join(task_dir, NESTED_GT_DIR)
        if not os.path.isdir(txt_dir):
            txt_dir = task_dir
        sub = SubtaskGT()
        for name in sorted(os.listdir(txt_dir)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(txt_dir, name)
            questions: list[GTQuestion] = []
            with open(path, encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, start=1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    parts = line.split("\t")
                    if len(parts) < 2:
                        raise ValueError(f"{path}:{lineno}: expected 'question<TAB>Yes|No', got {line!r}")
                    answer = parts[-1].strip().lower()
                    if answer not in ("yes", "no"):
                        raise ValueError(f"{path}:{lineno}: ground truth must be Yes or No, got {parts[-1]!r}")
                    questions.append(GTQuestion("\t".join(parts[:-1]).strip(), answer))
            if questions:
                sub.images[os.path.splitext(name)[0]] = questions
        if sub.images:
            gt[task] = sub
        else:
            logger.warning("%s has no ground-truth txt files", task_dir)
    return gt


def answer_key(record: dict) -> tuple[str, str, str]:
    """(subtask, image stem, question key) of one answer record."""
    qid = str(record["question_id"]).replace("\\", "/")
    task = qid.split("/", 1)[0]
    stem = os.path.splitext(os.path.basename(qid))[0]
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"MME answer {qid!r} has no 'prompt'; it is needed to tell the image's questions apart")
    return task, stem, question_key(prompt)


def score_mme(gt: dict[str, SubtaskGT], records: list[dict]) -> dict[str, Any]:
    """Per-subtask acc / acc+ / score, totals and what is missing."""
    answers: dict[tuple[str, str, str], dict] = {}
    duplicates = 0
    for rec in records:
        key = answer_key(rec)
        duplicates += key in answers
        answers[key] = rec
    if duplicates:
        logger.warning("%d duplicate MME answers (same image and question); the last one wins", duplicates)
    answered_tasks = {k[0] for k in answers}

    tasks: dict[str, dict[str, Any]] = {}
    matched: set[tuple[str, str, str]] = set()
    for task in SUBTASKS:
        if task not in gt or task not in answered_tasks:
            continue
        n_q = n_correct = n_img = n_img_correct = n_missing = n_other = 0
        for stem, questions in gt[task].images.items():
            all_right = True
            for q in questions:
                key = (task, stem, question_key(q.question))
                rec = answers.get(key)
                n_q += 1
                if rec is None:
                    n_missing += 1
                    all_right = False
                    continue
                matched.add(key)
                pred = parse_yes_no(rec["text"])
                n_other += pred == "other"
                if pred == q.answer:
                    n_correct += 1
                else:
                    all_right = False
            n_img += 1
            n_img_correct += all_right
        acc, acc_plus = pct(n_correct, n_q), pct(n_img_correct, n_img)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": n_q,
                       "images": n_img, "correct": n_correct, "missing_answers": n_missing, "other": n_other}
        if n_missing:
            logger.warning("%s: %d of %d questions have no answer and count as wrong", task, n_missing, n_q)

    missing = [t for t in SUBTASKS if t not in tasks]
    if missing:
        reasons = []
        no_gt = [t for t in missing if t not in gt]
        no_answers = [t for t in missing if t in gt]
        if no_gt:
            reasons.append("no ground truth: " + ", ".join(no_gt))
        if no_answers:
            reasons.append("no answers: " + ", ".join(no_answers))
        logger.warning("MME subtasks missing (totals are over the %d present ones); %s", len(tasks),
                       "; ".join(reasons))
    unmatched = [k for k in answers if k not in matched and k[0] in tasks]
    ignored = [k for k in answers if k[0] not in tasks]
    if unmatched:
        logger.warning("%d answers match no ground-truth question (first: %r)", len(unmatched), unmatched[0])
    if ignored:
        logger.warning("%d answers belong to no scorable subtask (first: %r)", len(ignored), ignored[0])
    perception = sum(tasks[t]["score"] for t in PERCEPTION if t in tasks)
    cognition = sum(tasks[t]["score"] for t in COGNITION if t in tasks)
    gt_questions = sum(len(qs) for sub in gt.values() for qs in sub.images.values())
    return {
        "gt_questions": gt_questions,
        "unanswered": gt_questions - sum(v["questions"] - v["missing_answers"] for v in tasks.values()),
        "incomplete": incomplete_ground_truth(gt),
        "tasks": tasks,
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "missing_subtasks": missing,
        "num_questions": sum(v["questions"] for v in tasks.values()),
        "num_unmatched_answers": len(unmatched) + len(ignored),
        "answers": answers,
    }


def incomplete_ground_truth(gt: dict[str, SubtaskGT]) -> list[str]:
    """What makes the ground truth found less than the MME release: subtasks without it, and images without
    exactly the release's two questions (one answered yes, one no) -- acc+ would be computed over other pairs."""
    out = []
    absent = [t for t in SUBTASKS if t not in gt]
    if absent:
        out.append(f"no ground truth for {len(absent)} of the {len(SUBTASKS)} subtasks ({', '.join(absent)}): the "
                   "totals are over the others")
    for task, sub in gt.items():
        odd = sorted(stem for stem, qs in sub.images.items() if len(qs) != 2)
        if odd:
            out.append(f"{task}: {len(odd)} image(s) with other than 2 ground-truth questions ({', '.join(odd[:3])}"
                       f"{' ...' if len(odd) > 3 else ''}): a ground-truth file with a line missing or added")
    for reason in out:
        logger.warning("MME ground truth: %s", reason)
    return out


def write_mme_txt(out_dir: str, gt: dict[str, SubtaskGT], answers: dict[tuple[str, str, str], dict],
                  tasks: dict[str, dict]) -> None:
    """Write ``<subtask>.txt`` files (``image<TAB>question<TAB>GT<TAB>prediction``) for the official tool.

    Only present subtasks are written (the official calculation.py fails on the others); questions come
    in ground-truth order, two per image; newlines and tabs in predictions become spaces.
    """
    os.makedirs(out_dir, exist_ok=True)
    for task in tasks:
        lines = []
        for stem, questions in gt[task].images.items():
            for q in questions:
                rec = answers.get((task, stem, question_key(q.question)))
                image = os.path.basename(str(rec["question_id"])) if rec else stem
                pred = re.sub(r"[\t\r\n]+", " ", rec["text"]) if rec else ""
                lines.append(f"{image}\t{q.question}\t{q.answer.capitalize()}\t{pred}\n")
        with open(os.path.join(out_dir, f"{task}.txt"), "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    missing = [t for t in SUBTASKS if t not in tasks]
    if missing:
        logger.warning("not written (missing): %s; the official calculation.py needs all 14 files",
                       ", ".join(missing))
    logger.info("wrote %d subtask files to %s", len(tasks), out_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt-dir", required=True,
                        help="MME_Benchmark_release_version (the 14 subtask folders with the GT txt files)")
    parser.add_argument("--result-file", required=True, help="answers jsonl from model_vqa_loader")
    parser.add_argument("--mme-score", choices=("total", "perception"), default="total",
                        help="which number is the result's score: perception+cognition (token-pruning "
                             "papers, vanilla LLaVA-1.5-7B = 1862) or perception only (LLaVA-1.5 paper)")
    parser.add_argument("--convert-out", default=None, metavar="DIR",
                        help="also write the per-subtask txt files of the official eval tool here")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    gt = load_mme_gt(args.gt_dir)
    res = score_mme(gt, read_answer_records(args.result_file))
    if args.convert_out:
        write_mme_txt(args.convert_out, gt, res["answers"], res["tasks"])

    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        print(f"=========== {group} ===========")
        print(f"total score: {res[group.lower()]:.2f}")
        for t in names:
            if t in res["tasks"]:
                v = res["tasks"][t]
                print(f"\t{t:<22} score: {v['score']:7.2f}  (acc {v['acc']:.2f}, acc+ {v['acc_plus']:.2f})")
            else:
                print(f"\t{t:<22} MISSING")
    if res["missing_subtasks"]:
        print(f"Missing subtasks (left out of the totals): {', '.join(res['missing_subtasks'])}")
    print(f"MME perception {res['perception']:.2f}, cognition {res['cognition']:.2f}, total {res['total']:.2f}")

    sub_scores: dict[str, float | None] = {
        "perception": res["perception"], "cognition": res["cognition"], "total": res["total"],
    }
    for t in SUBTASKS:
        v = res["tasks"].get(t)
        sub_scores[t] = v["score"] if v else None
    metric = ("perception+cognition total" if args.mme_score == "total" else "perception total")
    maybe_write_result(
        args, benchmark="mme", score=res[args.mme_score], metric=metric, sub_scores=sub_scores,
        num_questions=res["num_questions"],
        extra={"tasks": res["tasks"], "missing_subtasks": res["missing_subtasks"],
               "num_unmatched_answers": res["num_unmatched_answers"], "gt_dir": args.gt_dir},
        expected=res["gt_questions"], missing=res["unanswered"], reasons=res["incomplete"],
    )
    return res


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
