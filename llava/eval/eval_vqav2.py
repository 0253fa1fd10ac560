"""VQAv2: the EvalAI submission file, and a local VQA accuracy when val annotations are given.

Usage::

    # test-dev: submission for the EvalAI server (no local score)
    python -m llava.eval.eval_vqav2 --question-file vqav2/llava_vqav2_mscoco_test2015.jsonl \
        --result-file vqav2/answers/llava_vqav2_mscoco_test-dev2015/CKPT/merge.jsonl \
        --submission-out vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015/CKPT.json \
        [--evalai-score 78.5] [--result-json OUT.json --model CKPT ...]
    # val subset: local accuracy (a proxy, not the paper's test-dev number)
    python -m llava.eval.eval_vqav2 --result-file ANSWERS --annotation-file v2_mscoco_val2014_annotations.json \
        [--question-json v2_OpenEnded_mscoco_val2014_questions.json]

Submission: ``[{"question_id": int, "answer": str}]`` with one entry per question of ``--question-file``
(the full test2015 list, as upstream pads the upload), answers normalised with the standard VQA
normalisation, unanswered questions filled with "" (counted and warned). Answer lines that are not valid
JSON are skipped with a warning, as upstream's converter does.
Local accuracy: mean ``vqa_accuracy`` (percent) over the answered questions that have annotations
(restricted to ``--question-json``'s ids when given), with a per answer-type breakdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from tqdm import tqdm

from llava.eval.results import (
    add_result_args,
    configure_logging,
    load_answers,
    maybe_write_result,
    qid_key,
    read_jsonl,
)
from llava.eval.vqa_eval import normalize_answer, vqa_accuracy

logger = logging.getLogger(__name__)


def build_submission(questions: list[dict], answers: dict[str, dict]) -> tuple[list[dict], int]:
    """Submission entries in question-file order and the number of questions without an answer."""
    entries: list[dict] = []
    missing = 0
    for q in tqdm(questions, desc="submission", disable=None, mininterval=2.0):
        rec = answers.get(qid_key(q["question_id"]))
        if rec is None:
            missing += 1
            answer = ""
        else:
            answer = normalize_answer(rec["text"])
        qid = q["question_id"]
        entries.append({"question_id": int(qid) if str(qid).isdigit() else qid, "answer": answer})
    return entries, missing


def load_vqa_annotations(annotation_file: str, question_json: str | None) -> dict[str, dict]:
    """question id -> annotation (official VQA format), optionally restricted to a questions json."""
    with open(annotation_file, encoding="utf-8") as handle:
        data = json.load(handle)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{annotation_file}: expected the official VQA format with an 'annotations' list")
    table: dict[str, dict] = {}
    for i, ann in enumerate(anns):
        if "question_id" not in ann or not isinstance(ann.get("answers"), list):
            raise ValueError(f"{annotation_file}: annotations[{i}] lacks question_id or an answers list")
        table[qid_key(ann["question_id"])] = ann
    if question_json:
        with open(question_json, encoding="utf-8") as handle:
            qdata = json.load(handle)
        qs = qdata.get("questions") if isinstance(qdata, dict) else None
        if not isinstance(qs, list):
            raise ValueError(f"{question_json}: expected the official VQA format with a 'questions' list")
        wanted = {qid_key(q["question_id"]) for q in qs}
        table = {k: v for k, v in table.items() if k in wanted}
    return table


def score_vqav2(annotations: dict[str, dict], answers: dict[str, dict]) -> dict[str, Any]:
    """Local VQA accuracy (percent) over answered, annotated questions, with per answer-type accuracy."""
    total = 0.0
    n = 0
    by_type: dict[str, list[float]] = {}
    for qid, rec in answers.items():
        ann = annotations.get(qid)
        if ann is None:
            continue
        gts = [normalize_answer(str(a.get("answer", ""))) for a in ann["answers"]]
        acc = vqa_accuracy(normalize_answer(rec["text"]), gts, normalized=True)
        total += acc
        n += 1
        pair = by_type.setdefault(str(ann.get("answer_type", "unknown")), [0.0, 0])
        pair[0] += acc
        pair[1] += 1
    not_annotated = len(answers) - n
    if not_annotated:
        logger.warning("%d answers have no annotation; left out", not_annotated)
    return {
        "accuracy": 100.0 * total / n if n else None,
        "answer_types": {k: 100.0 * v[0] / v[1] for k, v in sorted(by_type.items())},
        "num_scored": n,
        "num_not_annotated": not_annotated,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result-file", required=True, help="merged answers jsonl")
    parser.add_argument("--question-file", default=None,
                        help="llava question jsonl listing every question of the upload (test2015)")
    parser.add_argument("--submission-out", default=None, metavar="PATH", help="write the EvalAI JSON here")
    parser.add_argument("--annotation-file", default=None,
                        help="official VQA annotations json (val) for a local accuracy")
    parser.add_argument("--question-json", default=None,
                        help="official VQA questions json; restricts the local accuracy to its ids")
    parser.add_argument("--evalai-score", type=float, default=None, metavar="ACC",
                        help="overall accuracy EvalAI reported for this submission; stored as the score")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()
    if args.submission_out and not args.question_file:
        parser.error("--submission-out needs --question-file (the list of questions to upload)")
    if args.question_json and not args.annotation_file:
        parser.error("--question-json is only used with --annotation-file")
    if not (args.submission_out or args.annotation_file or args.evalai_score is not None):
        parser.error("nothing to do: give --submission-out, --annotation-file or --evalai-score")

    bad_lines: list[int] = []
    answers = load_answers(args.result_file, strict=False, bad_lines=bad_lines)
    if bad_lines:
        logger.warning("%s: %d unparsable lines skipped (first at line %d)", args.result_file,
                       len(bad_lines), bad_lines[0])
    out: dict[str, Any] = {"num_answers": len(answers), "num_bad_lines": len(bad_lines)}

    if args.submission_out:
        questions = read_jsonl(args.question_file)
        entries, missing = build_submission(questions, answers)
        known = {qid_key(q["question_id"]) for q in questions}
        out |= {"num_submission": len(entries), "num_unanswered": missing,
                "num_answers_not_in_questions": sum(1 for k in answers if k not in known)}
        if missing:
            logger.warning("%d of %d questions have no answer; submitted as \"\"", missing, len(entries))
        os.makedirs(os.path.dirname(os.path.abspath(args.submission_out)), exist_ok=True)
        with open(args.submission_out, "w", encoding="utf-8") as handle:
            json.dump(entries, handle)
        print(f"Wrote {len(entries)} answers ({missing} empty) to {args.submission_out}")

    score, metric, sub_scores, n = None, "submission only (score on EvalAI)", {}, len(answers)
    if args.annotation_file:
        res = score_vqav2(load_vqa_annotations(args.annotation_file, args.question_json), answers)
        out |= {"local_accuracy": res["accuracy"], "answer_types": res["answer_types"],
                "num_not_annotated": res["num_not_annotated"]}
        sub_scores = {"local_accuracy": res["accuracy"]} | res["answer_types"]
        score, metric, n = res["accuracy"], "VQA accuracy on local annotations (%, not test-dev)", res["num_scored"]
        acc = res["accuracy"]
        print(f"Local VQA accuracy over {n} questions: " + ("n/a" if acc is None else f"{acc:.2f}%"))
        for k, v in res["answer_types"].items():
            print(f"  {k}: {v:.2f}")
    if args.evalai_score is not None:
        sub_scores = dict(sub_scores, evalai=args.evalai_score)
        score, metric = args.evalai_score, "VQA accuracy (test-dev, EvalAI, %)"
        n = out.get("num_submission", len(answers))
        print(f"EvalAI accuracy (as given): {args.evalai_score:.2f}")
    maybe_write_result(args, benchmark="vqav2", score=score, metric=metric, sub_scores=sub_scores,
                       num_questions=n, extra=out, expected=out.get("num_submission"),
                       missing=out.get("num_unanswered", 0))
    return out


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
