"""GQA testdev-balanced accuracy, computed directly from the answers jsonl and the official questions file.

Usage::

    python -m llava.eval.eval_gqa --annotation-file gqa/data/testdev_balanced_questions.json \
        --result-file answers/llava_gqa_testdev_balanced/CKPT/merge.jsonl [--convert-out PRED.json] \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

Rule (the LLaVA-patched GQA evaluation): prediction = model text with trailing "." removed, lower-cased;
correct when it equals the question's ``answer`` exactly; accuracy over questions with ``isBalanced``.
A balanced question without a prediction counts as wrong (the official script refuses to run instead).
Binary / open split: ``types.structural == "query"`` is open, anything else binary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def normalize_prediction(text: str) -> str:
    """GQA prediction as LLaVA's converter writes it: trailing periods removed, lower-cased."""
    return text.rstrip(".").lower()


def load_gqa_questions(path: str) -> dict[str, dict]:
    """The official ``{tier}_questions.json``: a dict questionId -> entry with ``answer`` and ``isBalanced``."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by questionId (GQA questions file), "
                         f"got {type(data).__name__}")
    for qid, entry in data.items():
        if not isinstance(entry, dict) or "answer" not in entry:
            raise ValueError(f"{path}: question {qid!r} has no 'answer' field")
    return {qid_key(k): v for k, v in data.items()}


def score_gqa(predictions: dict[str, str], questions: dict[str, dict]) -> dict[str, Any]:
    """Accuracy (percent) over balanced questions; ``predictions`` maps questionId -> normalised prediction."""
    n = correct = missing = 0
    binary = [0, 0]  # correct, total
    open_ = [0, 0]
    for qid, entry in questions.items():
        if not entry.get("isBalanced", True):
            continue
        n += 1
        pred = predictions.get(qid)
        if pred is None:
            missing += 1
        hit = pred is not None and pred == str(entry["answer"])
        correct += hit
        structural = (entry.get("types") or {}).get("structural")
        if structural is not None:
            bucket = open_ if structural == "query" else binary
            bucket[0] += hit
            bucket[1] += 1
    answered = n - missing
    extra_ids = sum(1 for qid in predictions if qid not in questions)
    return {
        "accuracy": pct(correct, n),
        "binary": pct(binary[0], binary[1]) if binary[1] else None,
        "open": pct(open_[0], open_[1]) if open_[1] else None,
        "accuracy_answered": pct(correct, answered) if answered else None,
        "num_balanced": n,
        "num_correct": correct,
        "num_missing": missing,
        "num_not_in_questions": extra_ids,
    }


def write_predictions(path: str, answers: dict[str, dict]) -> None:
    """Write the upstream ``testdev_balanced_predictions.json`` ([{"questionId", "prediction"}])."""
    rows = [{"questionId": str(rec["question_id"]), "prediction": normalize_prediction(rec["text"])}
            for rec in answers.values()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    logger.info("wrote %d predictions to %s", len(rows), path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-file", required=True,
                        help="official testdev_balanced_questions.json (questionId -> answer, isBalanced)")
    parser.add_argument("--result-file", required=True, help="merged answers jsonl")
    parser.add_argument("--convert-out", default=None, metavar="PATH",
                        help="also write testdev_balanced_predictions.json for the official eval.py")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    answers = load_answers(args.result_file)
    questions = load_gqa_questions(args.annotation_file)
    predictions = {qid: normalize_prediction(rec["text"]) for qid, rec in answers.items()}
    scores = score_gqa(predictions, questions)
    if scores["num_missing"]:
        logger.warning("%d of %d balanced questions have no prediction and count as wrong",
                       scores["num_missing"], scores["num_balanced"])
    if scores["num_not_in_questions"]:
        logger.warning("%d predictions have ids not in %s; ignored",
                       scores["num_not_in_questions"], args.annotation_file)
    if args.convert_out:
        write_predictions(args.convert_out, answers)

    print(f"GQA ({scores['num_balanced']} balanced questions, {scores['num_missing']} missing)")
    for name in ("binary", "open", "accuracy"):
        value = scores[name]
        print(f"{name.capitalize()}: {'n/a' if value is None else f'{value:.2f}%'}")
    maybe_write_result(
        args, benchmark="gqa", score=scores["accuracy"], metric="accuracy (testdev-balanced, %)",
        sub_scores={k: scores[k] for k in ("accuracy", "binary", "open", "accuracy_answered")},
        num_questions=scores["num_balanced"],
        extra={k: scores[k] for k in ("num_correct", "num_missing", "num_not_in_questions")}
        | {"annotation_file": args.annotation_file},
        expected=scores["num_balanced"], missing=scores["num_missing"],
    )
    return scores


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
