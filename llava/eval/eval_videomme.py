"""Video-MME: multiple-choice accuracy overall, per duration (short / medium / long), task type and video domain.

Usage::

    python -m llava.eval.eval_videomme --annotation-file videomme/videomme.json \
        --result-file videomme/answers/CKPT.jsonl [--durations short,medium,long] \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

Annotation, in either of Video-MME's published layouts (read as facts from the official repository,
BradyFU/Video-MME, and lmms-eval's ``videomme`` task):

* the official JSON: a list of videos, each ``{video_id, duration_category, video_category, video_sub_category,
  url, questions: [{question_id, task_type, question, choices, answer}]}`` (the official results template spells
  the sub-category ``video_subcategory``; both are read);
* lmms-eval's flat rows (``lmms-lab/Video-MME``): one question per row with ``video_id, duration, domain,
  sub_category, url, videoID, question_id, task_type, question, options, answer``, as a JSON list or jsonl (convert
  the hub's parquet with ``pandas.read_parquet(P).to_json(OUT, orient="records", lines=True)``).

Answers: the runner's jsonl, matched by ``question_id`` (Video-MME's, e.g. ``"001-1"``); ``text`` is the output.

Letter rule (the official ``eval_your_results.py``): strip the text; delete the answer prefixes it lists (its list
lacks two commas, so two pairs of them are joined into one string each and "Best answer:" alone is not deleted:
"Best answer: C" reads as B, as in the official scorer); the answer is the first capital A, B, C or D left, else
none. Score: accuracy over every question of the selected durations, unanswered and unparsed ones counting
wrong (lmms-eval's denominator). The official script leaves unparsed answers out of its denominator; that figure is
``accuracy_parsed_only``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

from llava.eval.results import (
    add_result_args,
    configure_logging,
    load_answers,
    maybe_write_result,
    pct,
    qid_key,
    read_jsonl,
    read_run_info,
)

logger = logging.getLogger(__name__)

DURATIONS: tuple[str, ...] = ("short", "medium", "long")  # < 2 min, 4-15 min, 30-60 min
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
# The official prefix list as it behaves (two missing commas join two pairs); deleted in this order.
ANSWER_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)
_LETTER = re.compile(r"[ABCD]")
# The official no-subtitle prompt (README "Evaluation Pipeline"): instruction, question, options, cue.
PROMPT_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
                      "Respond with only the letter (A, B, C, or D) of the correct option.")
PROMPT_CUE = "The best answer is:"


@dataclass(frozen=True)
class VideoMMEQuestion:
    """One Video-MME question, whichever layout it was read from."""

    question_id: str
    video_id: str  # "001" .. "900"
    youtube_id: str  # the video file's name in lmms-lab/Video-MME: data/<youtube_id>.mp4
    duration: str  # short, medium or long
    domain: str  # video_category: Knowledge, Film & Television, ...
    sub_category: str
    task_type: str
    question: str
    options: tuple[str, ...]  # "A. ...", "B. ...", ...
    answer: str  # A-D

    def prompt(self) -> str:
        """The official subtitle-free prompt for this question."""
        return "\n".join([PROMPT_INSTRUCTION, self.question, *self.options, PROMPT_CUE])


def extract_letter(text: str) -> str | None:
    """The option letter of a model answer by the official rule (module docstring), or None."""
    s = text.strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    match = _LETTER.search(s)
    return match.group(0) if match else None


def _youtube_id(url: str) -> str:
    query = parse_qs(urlparse(url).query).get("v")
    return query[0] if query else ""


def _question(fields: dict[str, Any], where: str) -> VideoMMEQuestion:
    missing = [k for k in ("question_id", "video_id", "duration", "task_type", "question", "options", "answer")
               if fields.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}: lacks {', '.join(missing)}")
    duration = str(fields["duration"]).strip().lower()
    if duration not in DURATIONS:
        raise ValueError(f"{where}: duration {fields['duration']!r} is not one of {', '.join(DURATIONS)}")
    answer = str(fields["answer"]).strip().upper()
    if answer not in LETTERS:
        raise ValueError(f"{where}: answer {fields['answer']!r} is not one of {', '.join(LETTERS)}")
    options = fields["options"]
    if isinstance(options, str) or not isinstance(options, Iterable) or not list(options):
        raise ValueError(f"{where}: options must be a list of 'X. text' strings, got {options!r}")
    return VideoMMEQuestion(
        question_id=qid_key(fields["question_id"]), video_id=str(fields["video_id"]),
        youtube_id=str(fields.get("youtube_id") or _youtube_id(str(fields.get("url") or ""))),
        duration=duration, domain=str(fields.get("domain") or ""), sub_category=str(fields.get("sub_category") or ""),
        task_type=str(fields["task_type"]), question=str(fields["question"]),
        options=tuple(str(o) for o in options), answer=answer)


def read_annotation(path: str) -> list[VideoMMEQuestion]:
    """Every question of a Video-MME annotation file in either layout (module docstring), in file order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Video-MME annotation file not found: {path}")
    if path.endswith(".parquet"):
        raise ValueError(f"{path}: parquet is not read here; convert it once with "
                         "pandas.read_parquet(P).to_json(OUT, orient='records', lines=True) and pass the jsonl")
    if path.endswith(".jsonl"):
        items = read_jsonl(path)
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                items = json.load(handle)
        except json.JSONDecodeError:
            items = read_jsonl(path)  # JSON lines under a .json name, as datasets' to_json writes them
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{path}: expected a list of Video-MME videos (official JSON) or question rows")
    questions: list[VideoMMEQuestion] = []
    for i, item in enumerate(items):
        if "questions" in item:  # official layout: one video, its questions nested
            for j, q in enumerate(item["questions"] or []):
                fields = {
                    "question_id": q.get("question_id"), "video_id": item.get("video_id"), "url": item.get("url"),
                    "duration": item.get("duration_category"), "domain": item.get("video_category"),
                    "sub_category": item.get("video_sub_category", item.get("video_subcategory")),
                    "task_type": q.get("task_type"), "question": q.get("question"), "options": q.get("choices"),
                    "answer": q.get("answer"),
                }
                questions.append(_question(fields, f"{path}: video {i} question {j}"))
        else:  # lmms-eval's flat rows
            questions.append(_question(dict(item, youtube_id=item.get("videoID")), f"{path}: row {i}"))
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(q for q in ids if ids.count(q) > 1)
        raise ValueError(f"{path}: question_id {dup!r} appears more than once")
    if not questions:
        raise ValueError(f"{path} has no questions")
    return questions


def question_rows(questions: Iterable[VideoMMEQuestion], video_folder: str = "data") -> list[dict[str, Any]]:
    """The runner's question file for Video-MME: ``question_id``, ``video`` (``<video_folder>/<youtube id>.mp4``,
    as lmms-eval's cache lays the videos out), ``text`` (the official prompt) and ``category`` (the duration)."""
    return [{"question_id": q.question_id, "video": f"{video_folder}/{q.youtube_id}.mp4", "text": q.prompt(),
             "category": q.duration} for q in questions]


def _accuracy(pairs: list[tuple[bool, bool]]) -> dict[str, Any]:
    """(correct, parsed) per question -> accuracy over all, accuracy over the parsed, counts."""
    correct = sum(c for c, _ in pairs)
    parsed = sum(p for _, p in pairs)
    return {"accuracy": pct(correct, len(pairs)), "accuracy_parsed_only": pct(correct, parsed) if parsed else None,
            "correct": correct, "parsed": parsed, "n": len(pairs)}


def score_videomme(questions: list[VideoMMEQuestion], answers: dict[str, dict],
                   durations: Iterable[str] = DURATIONS) -> dict[str, Any]:
    """Accuracy (percent) overall and per duration, task type, domain and sub-category, over the questions of
    ``durations``; each group also has the official parsed-only accuracy and its counts."""
    wanted = set(durations)
    unknown = wanted - set(DURATIONS)
    if unknown:
        raise ValueError(f"unknown duration(s) {', '.join(sorted(unknown))}; choose from {', '.join(DURATIONS)}")
    selected = [q for q in questions if q.duration in wanted]
    if not selected:
        raise ValueError(f"the annotation has no questions of duration {', '.join(sorted(wanted))}")
    groups: dict[str, dict[str, list[tuple[bool, bool]]]] = {"duration": {}, "task_type": {}, "domain": {},
                                                              "sub_category": {}}
    overall: list[tuple[bool, bool]] = []
    missing = 0
    for q in selected:
        rec = answers.get(q.question_id)
        missing += rec is None
        letter = None if rec is None else extract_letter(rec["text"])
        outcome = (letter == q.answer, letter is not None)
        overall.append(outcome)
        for group, key in (("duration", q.duration), ("task_type", q.task_type), ("domain", q.domain),
                           ("sub_category", q.sub_category)):
            groups[group].setdefault(key, []).append(outcome)
    known = {q.question_id for q in questions}
    foreign = sum(1 for qid in answers if qid not in known)
    if missing:
        logger.warning("%d of %d questions have no answer and count as wrong", missing, len(selected))
    if foreign:
        logger.warning("%d answers have a question_id not in the annotation; ignored", foreign)
    order = {"duration": list(DURATIONS)}
    return {
        "overall": _accuracy(overall),
        "groups": {g: {k: _accuracy(groups[g][k]) for k in order.get(g, sorted(groups[g])) if k in groups[g]}
                   for g in groups},
        "num_questions": len(selected),
        "num_missing": missing,
        "num_unparsed": sum(1 for _, p in overall if not p) - missing,
        "num_answers_not_in_annotation": foreign,
    }


def _video_sampling(args: argparse.Namespace) -> dict[str, Any] | None:
    """How the runner sampled frames (``llava.eval.model_video_qa``'s run description), None without one."""
    run = read_run_info(args)
    return ((run.get("identity") or {}).get("runner") or {}).get("video_sampling")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-file", required=True,
                        help="Video-MME annotation: the official JSON, or lmms-eval's rows as JSON / jsonl")
    parser.add_argument("--result-file", required=True, help="answers jsonl (question_id, text)")
    parser.add_argument("--durations", default=",".join(DURATIONS),
                        help="comma-separated durations to score (default: short,medium,long)")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    durations = [d.strip() for d in args.durations.split(",") if d.strip()]
    res = score_videomme(read_annotation(args.annotation_file), load_answers(args.result_file), durations)
    o = res["overall"]
    print(f"Video-MME ({', '.join(durations)}): {o['correct']} of {res['num_questions']} correct, "
          f"accuracy {o['accuracy']:.2f}% (no letter: {res['num_unparsed']}, unanswered: {res['num_missing']})")
    for group in ("duration", "task_type", "domain"):
        print(f"  by {group}: " + ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in res["groups"][group].items()))
    sub_scores: dict[str, float | None] = {"accuracy": o["accuracy"],
                                           "accuracy_parsed_only": o["accuracy_parsed_only"]}
    for group in ("duration", "task_type", "domain"):
        for key, v in res["groups"][group].items():
            sub_scores[f"{group}:{key}"] = v["accuracy"]
    maybe_write_result(
        args, benchmark="videomme", score=o["accuracy"], metric="accuracy (%)", sub_scores=sub_scores,
        num_questions=res["num_questions"], expected=res["num_questions"],
        extra={"groups": res["groups"], "durations": durations, "num_missing": res["num_missing"],
               "num_unparsed": res["num_unparsed"],
               "num_answers_not_in_annotation": res["num_answers_not_in_annotation"],
               "annotation_file": args.annotation_file, "video_sampling": _video_sampling(args)},
    )
    return res


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
