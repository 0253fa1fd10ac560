"""POPE: accuracy, precision, recall, F1 and yes-ratio per split; the paper's number is the mean F1 (x100).

Usage::

    python -m llava.eval.eval_pope --annotation-dir pope/coco --question-file pope/llava_pope_test.jsonl \
        --result-file pope/answers/CKPT.jsonl \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

Labels: the annotation files ``<dataset>_pope_<split>.json`` (jsonl despite the name) are paired line by
line with the question-file lines of category ``<split>`` (the question file keeps the annotation order;
the question texts are checked), which gives each LLaVA question id its label. Answers are then matched
by ``question_id``, so chunk order does not matter.

Answer rule (LLaVA's POPE scorer): keep the text before the first "."; drop commas; split into words
(on any whitespace, so newlines cannot glue words together); "No", "no" or "not" among them -> no,
otherwise yes. With "yes" as the positive class: precision and recall are 0 (with a note) when their
denominator is 0, F1 is 0 when precision + recall is 0. Unanswered questions are left out and counted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from llava.eval.results import (
    add_result_args,
    configure_logging,
    load_answers,
    maybe_write_result,
    qid_key,
    read_jsonl,
)

logger = logging.getLogger(__name__)

ANNOTATION_NAME = re.compile(r"^(?P<dataset>[A-Za-z0-9]+)_pope_(?P<split>[A-Za-z0-9_]+)\.json$")
SPLIT_ORDER: tuple[str, ...] = ("adversarial", "popular", "random")
NEGATIONS = frozenset({"No", "no", "not"})


def parse_yes_no(text: str) -> str:
    """'yes' or 'no' by LLaVA's POPE rule (see the module docstring)."""
    first = text.split(".", 1)[0].replace(",", "")
    return "no" if NEGATIONS.intersection(first.split()) else "yes"


@dataclass
class SplitScores:
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    missing: int
    notes: list[str]


def binary_scores(preds: list[str], labels: list[str], missing: int = 0) -> SplitScores:
    """Confusion counts and rates (fractions in [0, 1]) with "yes" as the positive class."""
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    n = len(preds)
    notes: list[str] = []
    if tp + fp:
        precision = tp / (tp + fp)
    else:
        precision = 0.0
        notes.append("no 'yes' predictions: precision undefined, reported as 0")
    if tp + fn:
        recall = tp / (tp + fn)
    else:
        recall = 0.0
        notes.append("no 'yes' labels: recall undefined, reported as 0")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SplitScores(
        n=n, tp=tp, fp=fp, tn=tn, fn=fn,
        accuracy=(tp + tn) / n if n else 0.0,
        precision=precision, recall=recall, f1=f1,
        yes_ratio=sum(p == "yes" for p in preds) / n if n else 0.0,
        missing=missing, notes=notes,
    )


def find_annotation_files(annotation_dir: str) -> dict[str, str]:
    """split -> path of ``<dataset>_pope_<split>.json`` in ``annotation_dir`` (other files are ignored)."""
    if not os.path.isdir(annotation_dir):
        raise FileNotFoundError(f"POPE annotation folder not found: {annotation_dir}")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(annotation_dir)):
        match = ANNOTATION_NAME.match(name)
        if not match:
            logger.info("ignoring %s (not <dataset>_pope_<split>.json)", name)
            continue
        split = match.group("split")
        if split in found:
            raise ValueError(f"two annotation files for split {split!r} in {annotation_dir}: "
                             f"{os.path.basename(found[split])} and {name}; keep one dataset per folder")
        found[split] = os.path.join(annotation_dir, name)
    if not found:
        raise FileNotFoundError(f"no <dataset>_pope_<split>.json files in {annotation_dir}")
    return found


def label_questions(annotation_files: dict[str, str], question_file: str) -> dict[str, dict[str, str]]:
    """split -> {question id key -> label}, pairing annotation lines with the question-file lines in order."""
    by_split: dict[str, list[dict]] = {}
    for q in read_jsonl(question_file):
        if "category" not in q or "question_id" not in q:
            raise ValueError(f"{question_file}: every line needs question_id and category (the POPE split)")
        by_split.setdefault(str(q["category"]), []).append(q)
    labels: dict[str, dict[str, str]] = {}
    for split, path in annotation_files.items():
        annotations = read_jsonl(path)
        questions = by_split.get(split, [])
        if not questions:
            logger.warning("split %s: the question file has no questions of category %r", split, split)
            labels[split] = {}
            continue
        if len(annotations) != len(questions):
            raise ValueError(
                f"{path} has {len(annotations)} lines but {question_file} has {len(questions)} questions "
                f"of category {split!r}; both must come from the same POPE release (LLaVA pins "
                "AoiDragon/POPE e3e3926, whose random split has 2910 lines)")
        split_labels: dict[str, str] = {}
        for i, (ann, q) in enumerate(zip(annotations, questions), start=1):
            label = str(ann.get("label", "")).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: annotation {i} has label {ann.get('label')!r}; expected yes or no")
            ann_text = str(ann.get("text", "")).strip()
            if ann_text and not str(q.get("text", "")).strip().startswith(ann_text):
                raise ValueError(
                    f"{path}: annotation {i} ({ann_text!r}) does not match question {q['question_id']!r} "
                    f"of {question_file} ({q.get('text')!r}); the files are not in the same order")
            split_labels[qid_key(q["question_id"])] = label
        labels[split] = split_labels
    return labels


def score_pope(labels: dict[str, dict[str, str]], answers: dict[str, dict]) -> dict[str, Any]:
    """Per-split scores plus the mean F1 / accuracy (percent) over the splits that have answers."""
    splits: dict[str, SplitScores] = {}
    used: set[str] = set()
    for split, split_labels in labels.items():
        preds, gts, missing = [], [], 0
        for qid, label in split_labels.items():
            rec = answers.get(qid)
            if rec is None:
                missing += 1
                continue
            used.add(qid)
            preds.append(parse_yes_no(rec["text"]))
            gts.append(label)
        if not preds:
            logger.warning("split %s has no answers; left out of the mean", split)
            continue
        scores = binary_scores(preds, gts, missing)
        if missing:
            scores.notes.append(f"{missing} questions without an answer left out")
            logger.warning("split %s: %d of %d questions have no answer; left out", split, missing,
                           len(split_labels))
        for note in scores.notes:
            logger.warning("split %s: %s", split, note)
        splits[split] = scores
    ordered = sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    missing_splits = sorted(s for s in labels if s not in splits)
    n = len(ordered)
    return {
        "splits": {s: splits[s] for s in ordered},
        "mean_f1": 100.0 * sum(splits[s].f1 for s in ordered) / n if n else None,
        "mean_accuracy": 100.0 * sum(splits[s].accuracy for s in ordered) / n if n else None,
        "missing_splits": missing_splits,
        "num_scored": sum(splits[s].n for s in ordered),
        "num_labelled": sum(len(v) for v in labels.values()),
        "num_unlabelled_answers": sum(1 for qid in answers if qid not in used),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-dir", required=True,
                        help="folder with coco_pope_{adversarial,popular,random}.json")
    parser.add_argument("--question-file", required=True, help="llava_pope_test.jsonl (gives each id its split)")
    parser.add_argument("--result-file", required=True, help="answers jsonl")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    labels = label_questions(find_annotation_files(args.annotation_dir), args.question_file)
    answers = load_answers(args.result_file)
    res = score_pope(labels, answers)
    if res["num_unlabelled_answers"]:
        logger.warning("%d answers have ids in no annotated split; ignored", res["num_unlabelled_answers"])

    for split, s in res["splits"].items():
        print(f"Category: {split}, # samples: {s.n}" + (f" ({s.missing} unanswered)" if s.missing else ""))
        print("TP\tFP\tTN\tFN\t")
        print(f"{s.tp}\t{s.fp}\t{s.tn}\t{s.fn}")
        print(f"Accuracy: {s.accuracy:.3f}  Precision: {s.precision:.3f}  Recall: {s.recall:.3f}  "
              f"F1: {s.f1:.3f}  Yes ratio: {s.yes_ratio:.3f}")
        for note in s.notes:
            print(f"  note: {note}")
        print("F1, Acc, Prec, Rec, YesRatio")
        print(f"{s.f1:.3f}, {s.accuracy:.3f}, {s.precision:.3f}, {s.recall:.3f}, {s.yes_ratio:.3f}")
        print("====================================")
    if res["missing_splits"]:
        print(f"Splits without answers (left out of the mean): {', '.join(res['missing_splits'])}")
    mean = res["mean_f1"]
    print(f"POPE mean F1 over {len(res['splits'])} split(s): " + ("n/a" if mean is None else f"{mean:.2f}"))

    sub_scores: dict[str, float | None] = {"mean_f1": res["mean_f1"], "mean_accuracy": res["mean_accuracy"]}
    for split, s in res["splits"].items():
        for name in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
            sub_scores[f"{name}_{split}"] = 100.0 * getattr(s, name)
    maybe_write_result(
        args, benchmark="pope", score=res["mean_f1"], metric="mean F1 over splits (x100)",
        sub_scores=sub_scores, num_questions=res["num_scored"],
        extra={"splits": {k: asdict(v) for k, v in res["splits"].items()},
               "missing_splits": res["missing_splits"],
               "num_unlabelled_answers": res["num_unlabelled_answers"],
               "annotation_dir": args.annotation_dir},
        expected=res["num_labelled"], missing=res["num_labelled"] - res["num_scored"],
    )
    return res


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
