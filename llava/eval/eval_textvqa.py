"""TextVQA val: VQA soft accuracy with the standard answer normalisation.

Usage::

    python -m llava.eval.eval_textvqa --annotation-file textvqa/TextVQA_0.5.1_val.json \
        --result-file textvqa/answers/CKPT.jsonl \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

Matching: the answers' ``question_id`` is the TextVQA ``image_id`` (shared by several questions), so each
answer is matched by (image_id, question.lower()), the question being recovered from its ``prompt``:
"OCR tokens: ... Question: <q> Short answer:" -> <q>; otherwise the first line that is neither the
"Reference OCR token: ..." line nor the answer-format instruction. Accuracy is the mean over the answers
(as LLaVA's scorer computes it) of ``llava.eval.vqa_eval.vqa_accuracy``; answers that match no
annotation are left out and counted, annotated questions without an answer are counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from typing import Any

from llava.eval.results import (
    add_result_args,
    configure_logging,
    maybe_write_result,
    read_answer_records,
)
from llava.eval.vqa_eval import normalize_answer, vqa_accuracy

logger = logging.getLogger(__name__)

OCR_PREFIX = "Reference OCR token:"
INSTRUCTIONS = frozenset({"Answer the question using a single word or phrase."})
_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str | None:
    """The question inside a runner prompt (see the module docstring), or None when there is none."""
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        return match.group(1) if match else None
    for line in prompt.replace("<image>", "").split("\n"):
        line = line.strip()
        if line and not line.startswith(OCR_PREFIX) and line not in INSTRUCTIONS:
            return line
    return None


def load_textvqa_annotations(path: str) -> dict[tuple[str, str], list[str]]:
    """(image_id, question.strip().lower()) -> the human answers, from ``TextVQA_0.5.1_val.json``."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a TextVQA annotation file with a top-level 'data' list")
    table: dict[tuple[str, str], list[str]] = {}
    for i, entry in enumerate(entries):
        try:
            key = (str(entry["image_id"]), str(entry["question"]).strip().lower())
            answers = [str(a) for a in entry["answers"]]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: data[{i}] lacks image_id, question or answers") from None
        table[key] = answers
    return table


def score_textvqa(annotations: dict[tuple[str, str], list[str]], records: list[dict]) -> dict[str, Any]:
    """Mean soft accuracy (percent) over the answers that match an annotation."""
    scores: list[float] = []
    unmatched: list[str] = []
    odd_counts = 0
    seen: set[tuple[str, str]] = set()
    for rec in records:
        question = question_from_prompt(str(rec.get("prompt", "")))
        key = (str(rec["question_id"]), (question or "").lower())
        gts = annotations.get(key) if question is not None else None
        if gts is None:
            unmatched.append(str(rec["question_id"]))
            continue
        seen.add(key)
        odd_counts += len(gts) != 10
        scores.append(vqa_accuracy(normalize_answer(rec["text"]), [normalize_answer(a) for a in gts],
                                   normalized=True))
    if unmatched:
        logger.warning("%d answers match no annotation (by image id + question); left out (first: %s)",
                       len(unmatched), unmatched[0])
    if odd_counts:
        logger.warning("%d questions do not have exactly 10 human answers; scored over the ones they have",
                       odd_counts)
    unanswered = sum(1 for k in annotations if k not in seen)
    if unanswered:
        logger.warning("%d of %d annotated questions have no answer", unanswered, len(annotations))
    return {
        "accuracy": 100.0 * sum(scores) / len(scores) if scores else None,
        "num_scored": len(scores),
        "num_unmatched_answers": len(unmatched),
        "num_unanswered": unanswered,
        "num_annotated": len(annotations),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    parser.add_argument("--result-file", required=True, help="answers jsonl")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    res = score_textvqa(load_textvqa_annotations(args.annotation_file), read_answer_records(args.result_file))
    acc = res["accuracy"]
    print(f"Samples: {res['num_scored']}  Accuracy: " + ("n/a" if acc is None else f"{acc:.2f}%"))
    maybe_write_result(
        args, benchmark="textvqa", score=acc, metric="VQA accuracy (val, %)", sub_scores={"accuracy": acc},
        num_questions=res["num_scored"],
        extra={k: res[k] for k in ("num_unmatched_answers", "num_unanswered")}
        | {"annotation_file": args.annotation_file},
        expected=res["num_annotated"], missing=res["num_unanswered"],
    )
    return res


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
