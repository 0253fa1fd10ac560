"""MMBench / MMBench-CN dev: CircularEval accuracy (the paper's number) and single-pass accuracy.

Usage::

    python -m llava.eval.eval_mmbench --annotation-file mmbench/mmbench_dev_20230712.tsv \
        --result-file mmbench/answers/mmbench_dev_20230712/CKPT.jsonl [--lang en|cn] \
        [--convert-out answers_upload/mmbench_dev_20230712/CKPT.xlsx] \
        [--result-json OUT.json --model CKPT --schedule ... --pio-log LOG --wall-time S]

The TSV (read with the csv module; fields may hold base64 images and quoted newlines) has one row per
circular variant: rows with ``index % 1,000,000`` equal belong to one question. A question counts as
correct only if every variant row is answered correctly (CircularEval). Single-pass accuracy uses only
the main rows (``index < 1,000,000``). Answers are matched by ``question_id`` = TSV ``index``.

Letter extraction (no GPT fallback): a leading option letter, optionally bracketed, followed by the end
of the text, a space or punctuation ("A", "A.", "(B) ...", "C: ..."); else "answer is X" / "option X" /
"答案是X" / "选项X"; only letters of the row's options count; else the text equals one option's content;
else no letter (wrong).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from llava.eval.results import (
    add_result_args,
    configure_logging,
    load_answers,
    maybe_write_result,
    pct,
    read_answer_records,
)

logger = logging.getLogger(__name__)

CIRCULAR_BASE = 1_000_000
OPTION_LETTERS: tuple[str, ...] = tuple("ABCDEFGHI")
# Strings pandas reads as missing (the runner stops collecting options at the first missing one).
MISSING_VALUES = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
# Columns the upstream converter drops from the submission table; "prediction" goes in at position 6.
DROPPED_COLUMNS = frozenset({"hint", "category", "source", "image", "comment", "l2-category"})
PREDICTION_POSITION = 6

_LEADING = re.compile(r"^[\(\[（【]?\s*([A-Z])\s*[\)\]）】]?(?=$|[\s.:：,，、;；)）\]】])")
_KEYWORD_EN = re.compile(r"(?:answer is|answer:|option|choice)\s*[:：]?\s*[\(\[]?([A-Z])\b", re.IGNORECASE)
_KEYWORD_CN = re.compile(r"(?:答案|选项|选择)\s*(?:是|为|应该是|:|：)?\s*[\(（]?([A-Z])")


@dataclass
class MMBRow:
    index: int
    answer: str | None
    options: dict[str, str]  # letter -> text, up to the first missing option
    category: str | None
    raw: dict[str, str]  # the TSV row as read, column -> value


def _set_csv_limit() -> None:
    limit = sys.maxsize
    while True:  # platforms whose C long is 32-bit refuse sys.maxsize
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def read_mmbench_tsv(path: str) -> tuple[list[str], list[MMBRow]]:
    """Header and rows of an MMBench TSV (``index`` required; ``answer`` optional, absent in test)."""
    _set_csv_limit()
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty; expected an MMBench TSV with a header row") from None
        lower = {name.strip().lower(): i for i, name in enumerate(header)}
        if "index" not in lower:
            raise ValueError(f"{path}: no 'index' column; columns are {header}")
        letters = [c for c in OPTION_LETTERS if c.lower() in lower]
        rows: list[MMBRow] = []
        for lineno, fields in enumerate(reader, start=2):
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}: record {lineno} has {len(fields)} fields, the header has {len(header)}")
            raw = dict(zip(header, fields))

            def get(col: str, fields: list[str] = fields) -> str | None:
                i = lower.get(col)
                return None if i is None or fields[i].strip() in MISSING_VALUES else fields[i].strip()

            try:
                index = int(float(get("index") or ""))
            except ValueError:
                raise ValueError(f"{path}: record {lineno} has a non-integer index {get('index')!r}") from None
            options: dict[str, str] = {}
            for letter in letters:
                value = get(letter.lower())
                if value is None:
                    break
                options[letter] = value
            answer = get("answer")
            rows.append(MMBRow(index, answer.upper() if answer else None, options, get("category"), raw))
    return header, rows


def index_key(record: dict) -> str:
    """Answer key: the TSV ``index`` as a canonical integer string ("12", 12 and 12.0 agree)."""
    value = record["question_id"]
    try:
        return str(int(float(value)))
    except (TypeError, ValueError):
        raise ValueError(f"MMBench question_id must be the TSV's integer index, got {value!r}") from None


def extract_letter(text: str, options: dict[str, str]) -> str | None:
    """The option letter a model answer names, or None (rule in the module docstring)."""
    s = text.strip()
    if not s:
        return None
    valid = set(options) or set(OPTION_LETTERS[:4])
    for pattern in (_LEADING, _KEYWORD_EN, _KEYWORD_CN):
        for match in pattern.finditer(s):
            letter = match.group(1).upper()
            if letter in valid:
                return letter
    plain = s.rstrip("。.").strip().casefold()
    hits = [letter for letter, opt in options.items() if opt.rstrip("。.").strip().casefold() == plain]
    return hits[0] if len(hits) == 1 else None


def score_mmbench(rows: list[MMBRow], answers: dict[str, dict]) -> dict[str, Any]:
    """Circular, single-pass and per-row accuracy (percent), per-category circular accuracy."""
    if any(r.answer is None for r in rows):
        raise ValueError("the TSV has rows without an 'answer'; only dev splits can be scored locally "
                         "(use --convert-out to write a submission table)")
    groups: dict[int, list[bool]] = {}
    group_category: dict[int, str | None] = {}
    main_hits = main_total = row_hits = missing = no_letter = 0
    for r in rows:
        rec = answers.get(str(r.index))
        if rec is None:
            missing += 1
            letter = None
        else:
            letter = extract_letter(rec["text"], r.options)
            no_letter += letter is None
        hit = letter is not None and letter == r.answer
        base = r.index % CIRCULAR_BASE
        groups.setdefault(base, []).append(hit)
        if r.index < CIRCULAR_BASE:
            main_total += 1
            main_hits += hit
            group_category[base] = r.category
        else:
            group_category.setdefault(base, r.category)
        row_hits += hit
    passed = {base: all(hits) for base, hits in groups.items()}
    per_cat: dict[str, list[int]] = {}
    for base, ok in passed.items():
        pair = per_cat.setdefault(group_category.get(base) or "unknown", [0, 0])
        pair[0] += ok
        pair[1] += 1
    known = {str(r.index) for r in rows}
    extra_answers = sum(1 for qid in answers if qid not in known)
    if missing:
        logger.warning("%d of %d rows have no answer and count as wrong", missing, len(rows))
    if extra_answers:
        logger.warning("%d answers have an index not in the TSV; ignored", extra_answers)
    return {
        "circular_accuracy": pct(sum(passed.values()), len(passed)),
        "single_pass_accuracy": pct(main_hits, main_total) if main_total else None,
        "row_accuracy": pct(row_hits, len(rows)),
        "categories": {k: pct(*v) for k, v in sorted(per_cat.items())},
        "num_questions": len(passed), "num_rows": len(rows), "num_missing": missing,
        "num_no_letter": no_letter, "num_answers_not_in_tsv": extra_answers,
    }


def write_submission(path: str, header: list[str], rows: list[MMBRow], answers: dict[str, dict]) -> str:
    """Write the submission table (upstream converter's columns) as xlsx when possible, else TSV.

    Returns the path written: a ``.xlsx`` request without openpyxl installed becomes ``.tsv`` (logged).
    """
    keep = [c for c in header if c.strip().lower() not in DROPPED_COLUMNS]
    columns = keep[:PREDICTION_POSITION] + ["prediction"] + keep[PREDICTION_POSITION:]
    table = []
    for r in rows:
        rec = answers.get(str(r.index))
        values = dict(r.raw, prediction=rec["text"] if rec else "")
        table.append([values[c] for c in columns])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".xlsx"):
        try:
            from openpyxl import Workbook
        except ImportError:
            path = os.path.splitext(path)[0] + ".tsv"
            logger.warning("openpyxl is not installed: writing TSV %s instead of xlsx "
                           "(pip install openpyxl for the xlsx the MMBench server takes)", path)
        else:
            from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

            book = Workbook()
            sheet = book.active
            sheet.append(columns)
            dropped = 0
            for values in table:  # xlsx cannot hold control characters: a model may generate them
                clean = [ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in values]
                dropped += clean != values
                sheet.append(clean)
            if dropped:
                logger.warning("%s: control characters removed from %d row(s); xlsx cannot hold them", path, dropped)
            book.save(path)
            logger.info("wrote %s", path)
            return path
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        writer.writerows(table)
    logger.info("wrote %s", path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-file", required=True, help="MMBench TSV (dev: with the answer column)")
    parser.add_argument("--result-file", required=True, help="answers jsonl from model_vqa_mmbench")
    parser.add_argument("--lang", choices=("en", "cn"), default="en",
                        help="en -> benchmark 'mmbench', cn -> 'mmbench_cn' (default en)")
    parser.add_argument("--convert-out", default=None, metavar="FILE",
                        help="also write the submission table (.xlsx needs openpyxl, otherwise TSV)")
    add_result_args(parser)
    args = parser.parse_args(argv)
    configure_logging()

    header, rows = read_mmbench_tsv(args.annotation_file)
    rounds = sorted({int(r.get("round_id") or 0) for r in read_answer_records(args.result_file)})
    if rounds != [0] and rounds:
        raise ValueError(
            f"{args.result_file} holds --all-rounds output (round_id {rounds}); their letters refer to rotated "
            "options. Score answers made without --all-rounds (CircularEval uses the TSV's own variants)."
        )
    answers = load_answers(args.result_file, key=index_key)
    if args.convert_out:
        write_submission(args.convert_out, header, rows, answers)
    benchmark = "mmbench" if args.lang == "en" else "mmbench_cn"
    if any(r.answer is None for r in rows):
        print(f"{args.annotation_file} has no answers (test split): nothing to score locally")
        return {}
    res = score_mmbench(rows, answers)
    single = res["single_pass_accuracy"]
    print(f"{benchmark}: {res['num_questions']} questions, {res['num_rows']} rows")
    print(f"CircularEval accuracy: {res['circular_accuracy']:.2f}%")
    print("Single-pass accuracy: " + ("n/a" if single is None else f"{single:.2f}%"))
    print(f"Row accuracy: {res['row_accuracy']:.2f}%  (no letter found: {res['num_no_letter']}, "
          f"unanswered: {res['num_missing']})")
    maybe_write_result(
        args, benchmark=benchmark, score=res["circular_accuracy"], metric="CircularEval accuracy (dev, %)",
        sub_scores={k: res[k] for k in ("circular_accuracy", "single_pass_accuracy", "row_accuracy")},
        num_questions=res["num_questions"],
        extra={k: res[k] for k in ("categories", "num_rows", "num_missing", "num_no_letter",
                                   "num_answers_not_in_tsv")} | {"annotation_file": args.annotation_file},
        expected=res["num_rows"], missing=res["num_missing"],
    )
    return res


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
