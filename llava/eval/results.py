"""Shared plumbing for the scorers: answer-file reading, common CLI flags and the result JSON.

Every scorer (``python -m llava.eval.eval_<bench>``) reads the runner's answer jsonl with
:func:`load_answers` / :func:`read_answer_records`, adds the common flags with :func:`add_result_args`
and, when ``--result-json`` is given, writes one result file with :func:`write_result`. What produced the
answers (model, method and its configuration) comes from the runner's run description next to them
(``X.run.json`` beside ``X.jsonl``, :func:`llava.eval.runner.write_run_info`).
``llava.eval.summarize`` collects those files with :func:`read_results`.

Result JSON schema (one object per file)::

    benchmark          str    one of BENCHMARK_COLUMNS' keys (gqa, mmbench, mmbench_cn, mme, pope, sqa, vqav2, textvqa,
                              videomme)
    model              str    checkpoint / experiment name (CKPT)
    schedule           str | null   free text, e.g. "none" or "pio budget=64"
    method             str | null   the reduction method ("none" unpruned), from the runner's run description
    budget             float | null the paper budget it was asked for (--budget), else null
    method_config      dict | null  the method's full configuration (schedule, hyper-parameters)
    avg_visual_tokens  float | null mean of "avg_visual_tokens" over the reduction log lines; null without a log
    loyalty            dict | null  against the unpruned run (runner --loyalty-to), from the log: same_answer (% of
                              questions answered as the unpruned run did), first_token_same (% whose first answer
                              token is the unpruned model's), first_token_kl (mean KL(unpruned || pruned) in nats
                              at that token), n (questions); null when the log has none
    coverage           dict   answered (questions answered: answer lines, each question key counted once),
                              expected (questions the run was asked, from its run description; without one, the
                              questions of the benchmark's own files), logged (reduction log lines; null without a
                              log), reasons (what the scorer found incomplete: answers missing for questions of the
                              benchmark's files, a subtask without ground truth, ...), repeated (answer lines of a
                              question already counted), partial (answered < expected, logged < answered, or any
                              reason)
    score              float | null the paper's number on the paper's scale (null: not scorable locally)
    metric             str    what `score` is
    sub_scores         dict[str, float | null]  flat; percentages on a 0-100 scale unless the name says otherwise
    num_questions      int    questions (rows) behind `score`
    wall_time_s        float | null seconds of every invocation of the run (its run file's total, resumed and
                              failed invocations included); else --wall-time
    date               str    ISO 8601, UTC
    extra              dict   scorer-specific details (counts, missing items, input paths, pio_log_samples)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

# Benchmark keys in the paper's column order (then the video benchmarks), with their table labels.
BENCHMARK_COLUMNS: dict[str, str] = {
    "gqa": "GQA",
    "mmbench": "MMB",
    "mmbench_cn": "MMB-CN",
    "mme": "MME",
    "pope": "POPE",
    "sqa": "SQA",
    "vqav2": "VQAv2",
    "textvqa": "TextVQA",
    "videomme": "Video-MME",
}


def column_label(benchmark: str) -> str:
    """A benchmark's column header in the paper's tables (``mmbench_cn`` -> ``MMB-CN``; unknown ones as they are)."""
    return BENCHMARK_COLUMNS.get(benchmark, benchmark)

RESULT_FIELDS: tuple[str, ...] = (
    "benchmark",
    "model",
    "schedule",
    "method",
    "budget",
    "method_config",
    "avg_visual_tokens",
    "loyalty",
    "coverage",
    "score",
    "metric",
    "sub_scores",
    "num_questions",
    "wall_time_s",
    "date",
    "extra",
)


def configure_logging(level: int = logging.INFO) -> None:
    """Logging setup for the scorer CLIs (library code only creates loggers)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------- answer files


def qid_key(value: Any) -> str:
    """Canonical string key for a question id, so int ids in one file match str ids in another."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"question id must be a string or an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"question id must be a string or an integer, got {value!r}")
        value = int(value)
    return str(value).strip()


def iter_jsonl(path: str, *, strict: bool = True, bad_lines: list[int] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for every non-blank line of a jsonl file.

    A line that is not a JSON object raises ``ValueError`` naming the file and line (``strict=True``);
    with ``strict=False`` it is skipped, logged, and its number appended to ``bad_lines``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"jsonl file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})"
                obj = None
            else:
                problem = None if isinstance(obj, dict) else (
                    f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
                )
            if problem is not None:
                if strict:
                    raise ValueError(problem + "; every non-blank line must be one JSON object")
                logger.warning("skipping %s", problem)
                if bad_lines is not None:
                    bad_lines.append(lineno)
                continue
            yield lineno, obj


def read_jsonl(path: str, *, strict: bool = True, bad_lines: list[int] | None = None) -> list[dict]:
    """All objects of a jsonl file (blank lines ignored); see :func:`iter_jsonl` for errors."""
    return [obj for _, obj in iter_jsonl(path, strict=strict, bad_lines=bad_lines)]


class MixedRunsError(ValueError):
    """A file holds lines of two runs (different run hashes), or a run file describes another run."""


def line_run(rec: dict) -> str | None:
    """The run hash a runner wrote into a line: in an answer's ``metadata``, at the top of a log or profile line."""
    meta = rec.get("metadata")
    value = meta.get("run") if isinstance(meta, dict) and "run" in meta else rec.get("run")
    return None if value is None else str(value)


class _OneRun:
    """Checks, line by line, that a file's lines come from one run (runs are named by the hash in each line)."""

    def __init__(self, path: str):
        self.path, self.run, self.first = path, None, 0

    def check(self, lineno: int, rec: dict) -> None:
        run = line_run(rec)
        if run is None:
            return
        if self.run is None:
            self.run, self.first = run, lineno
        elif run != self.run:
            raise MixedRunsError(f"{self.path} mixes lines of two runs (run {self.run} at line {self.first}, run {run} "
                                 f"at line {lineno}); score one run's file (the runners refuse to mix them: was it "
                                 "concatenated or copied by hand?)")


def _checked_answers(path: str, strict: bool, bad_lines: list[int] | None) -> Iterator[tuple[int, dict]]:
    one_run = _OneRun(path)
    for lineno, rec in iter_jsonl(path, strict=strict, bad_lines=bad_lines):
        one_run.check(lineno, rec)
        missing = [k for k in ("question_id", "text") if k not in rec]
        if missing:
            problem = f"{path}:{lineno}: answer record lacks {', '.join(missing)} (needs question_id and text)"
            if strict:
                raise ValueError(problem)
            logger.warning("skipping %s", problem)
            if bad_lines is not None:
                bad_lines.append(lineno)
            continue
        if rec["text"] is None:
            rec["text"] = ""
        elif not isinstance(rec["text"], str):
            rec["text"] = str(rec["text"])
        yield lineno, rec


def read_answer_records(path: str, *, strict: bool = True, bad_lines: list[int] | None = None) -> list[dict]:
    """Every answer record in file order, duplicates kept.

    For benchmarks whose ``question_id`` is not unique (MME: image path; TextVQA: image id).
    Each record must have ``question_id`` and ``text``.
    """
    return [rec for _, rec in _checked_answers(path, strict, bad_lines)]


def load_answers(
    path: str,
    *,
    key: Callable[[dict], Hashable] | None = None,
    strict: bool = True,
    bad_lines: list[int] | None = None,
) -> dict[Hashable, dict]:
    """Answer records keyed by question id (``qid_key(record["question_id"])`` unless ``key`` is given).

    Blank lines are ignored; a malformed line raises ``ValueError`` with file and line number
    (``strict=False``: skipped and logged). Duplicate keys: the last record wins and a warning says how
    many were replaced (a resumed or re-merged run can repeat lines).
    """
    key_fn = key if key is not None else (lambda rec: qid_key(rec["question_id"]))
    answers: dict[Hashable, dict] = {}
    duplicates: list[tuple[Hashable, int]] = []
    for lineno, rec in _checked_answers(path, strict, bad_lines):
        try:
            k = key_fn(rec)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        if k in answers:
            duplicates.append((k, lineno))
        answers[k] = rec
    if duplicates:
        first, line = duplicates[0]
        logger.warning(
            "%s: %d duplicate question id(s); the last line wins (first duplicate: %r at line %d)",
            path, len(duplicates), first, line,
        )
    return answers


def default_model_name(result_file: str | None) -> str | None:
    """CKPT guessed from an answers path: ``answers/<CKPT>.jsonl`` or ``answers/<split>/<CKPT>/merge.jsonl``."""
    if not result_file:
        return None
    stem = os.path.splitext(os.path.basename(result_file))[0]
    if stem == "merge":
        parent = os.path.basename(os.path.dirname(os.path.abspath(result_file)))
        return parent or stem
    return stem


# ----------------------------------------------------------------------------- CLI flags


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def add_result_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags every scorer shares: --result-json, --model, --schedule, --pio-log, --wall-time."""
    group = parser.add_argument_group("result file")
    group.add_argument("--result-json", default=None, metavar="PATH",
                       help="write the scores to this result JSON (read by llava.eval.summarize)")
    group.add_argument("--model", default=None, metavar="CKPT",
                       help="checkpoint / experiment name; default: guessed from --result-file")
    group.add_argument("--schedule", default=None, metavar="TEXT",
                       help='pruning schedule as free text, e.g. "none" or "layers=1,10,15 tokens=92,54,22"')
    group.add_argument("--pio-log", default=None, metavar="PATH",
                       help="PIO log jsonl; its mean avg_visual_tokens goes into the result file")
    group.add_argument("--wall-time", default=None, type=_non_negative_float, metavar="SECONDS",
                       help="inference wall time in seconds")
    group.add_argument("--run-info", default=None, metavar="PATH",
                       help="the runner's run description (method, configuration); default: the answers file's "
                            "X.run.json beside X.jsonl")
    return parser


def read_run_info(args: argparse.Namespace | None) -> dict[str, Any]:
    """The run description for ``--run-info`` or the one beside ``--result-file`` ({} when there is none)."""
    path = getattr(args, "run_info", None)
    if path is None and getattr(args, "result_file", None):
        root, ext = os.path.splitext(args.result_file)
        path = (root if ext == ".jsonl" else args.result_file) + ".run.json"
        if not os.path.isfile(path):
            return {}
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the run description {path}: {err}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object (the runner's run description)")
    info["_path"] = path
    return info


def read_pio_log(path: str | None) -> tuple[float | None, int]:
    """Mean of ``avg_visual_tokens`` over the samples with an image in a reduction log, and their number.

    ``(None, 0)`` when no path is given, the file is absent, or no line has the field.
    """
    values, _ = _pio_log_values(path)
    if not values:
        return None, 0
    return sum(values) / len(values), len(values)


def _pio_log_values(path: str | None) -> tuple[list[float], int | None]:
    """The image samples' ``avg_visual_tokens`` of a reduction log, and its number of lines (None: no log)."""
    if not path:
        return [], None
    if not os.path.isfile(path):
        logger.warning("PIO log %s not found; avg_visual_tokens will be null", path)
        return [], None
    values: list[float] = []
    lines = 0
    one_run = _OneRun(path)
    for lineno, rec in iter_jsonl(path):
        one_run.check(lineno, rec)
        lines += 1
        value = rec.get("avg_visual_tokens")
        if value is None or rec.get("n_visual") == 0:  # text-only samples have no visual tokens to average
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{path}:{lineno}: avg_visual_tokens must be a number, got {value!r}")
        values.append(float(value))
    if not values:
        logger.warning("PIO log %s has no avg_visual_tokens values; avg_visual_tokens will be null", path)
    return values, lines


def read_loyalty(path: str | None) -> dict[str, Any] | None:
    """The loyalty summary (module docstring) of a reduction log's ``same_answer``, ``first_token_same`` and
    ``first_token_kl`` fields; None when no line has them."""
    if not path or not os.path.isfile(path):
        return None
    same, first, kl = [], [], []
    for _, rec in iter_jsonl(path, strict=False):
        if "first_token_kl" not in rec:
            continue
        if rec.get("same_answer") is not None:
            same.append(bool(rec["same_answer"]))
        first.append(bool(rec.get("first_token_same")))
        kl.append(float(rec["first_token_kl"]))
    if not kl:
        return None
    return {"same_answer": pct(sum(same), len(same)) if same else None,
            "first_token_same": pct(sum(first), len(first)), "first_token_kl": sum(kl) / len(kl), "n": len(kl)}


# ----------------------------------------------------------------------------- result JSON


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_result(
    *,
    benchmark: str,
    score: float | None,
    metric: str,
    sub_scores: dict[str, float | None],
    num_questions: int,
    args: argparse.Namespace | None = None,
    extra: dict[str, Any] | None = None,
    expected: int | None = None,
    missing: int = 0,
    reasons: list[str] | None = None,
) -> dict[str, Any]:
    """The result dict (see the module docstring), with the run context taken from ``args``.

    ``expected`` (questions the benchmark's own files hold), ``missing`` (those of them the answers do not cover)
    and ``reasons`` (what else the scorer found incomplete: a subtask without ground truth, ...) come from the
    scorer; a result with any of them short is recorded as partial (``coverage``)."""
    model = getattr(args, "model", None) or default_model_name(getattr(args, "result_file", None))
    values, log_lines = _pio_log_values(getattr(args, "pio_log", None))
    avg_tokens, n_logged = (sum(values) / len(values), len(values)) if values else (None, 0)
    run = read_run_info(args)
    coverage = _coverage(getattr(args, "result_file", None), run.get("expected"), log_lines, expected, missing,
                         reasons or [])
    _check_same_run(run, getattr(args, "result_file", None), getattr(args, "pio_log", None))
    wall_time = getattr(args, "wall_time", None)
    if isinstance(run.get("wall_time_s"), (int, float)) and (run.get("identity") or {}).get("shard", {}).get(
            "count", 1) == 1:  # every invocation of the run, resumed ones included (a shard's file: --wall-time)
        if wall_time is not None:
            extra = {**(extra or {}), "wall_time_last_invocation_s": wall_time}
        wall_time = float(run["wall_time_s"])
    extra = dict(extra or {})
    if run:
        extra.setdefault("run_info", run["_path"])
        if run.get("schedule_file"):
            extra.setdefault("schedule_file", run["schedule_file"])
    if getattr(args, "result_file", None):
        extra.setdefault("result_file", args.result_file)
    if getattr(args, "pio_log", None):
        extra.setdefault("pio_log", args.pio_log)
        extra.setdefault("pio_log_samples", n_logged)
    result = {
        "benchmark": benchmark,
        "model": model,
        "schedule": getattr(args, "schedule", None),
        "method": run.get("method"),
        "budget": run.get("budget"),
        "method_config": run.get("method_config"),
        "avg_visual_tokens": avg_tokens,
        "loyalty": read_loyalty(getattr(args, "pio_log", None)),
        "coverage": coverage,
        "score": None if score is None else float(score),
        "metric": metric,
        "sub_scores": dict(sub_scores),
        "num_questions": int(num_questions),
        "wall_time_s": wall_time,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra,
    }
    return _finite(result)


def _coverage(result_file: str | None, expected: int | None, logged: int | None, bench_expected: int | None = None,
              missing: int = 0, reasons: list[str] | None = None) -> dict[str, Any]:
    """How much of the run the result rests on (module docstring): a result over part of the questions (of the
    run's question file, or, without a run file, of the benchmark's own files), with a log that misses answered
    ones, or that the scorer found incomplete, is ``partial``. Answers are counted once per question (key)."""
    answered = repeated = None
    reasons = list(reasons or [])
    if result_file and os.path.isfile(result_file):
        keys, lines = set(), 0
        for _, rec in iter_jsonl(result_file, strict=False):
            lines += 1
            meta = rec.get("metadata")
            key = meta.get("q") if isinstance(meta, dict) else None
            keys.add(("q", str(key)) if key is not None else ("line", lines))
        answered, repeated = len(keys), lines - len(keys)
        if repeated:
            logger.warning("%s: %d repeated answer line(s) of a question; each question is counted once", result_file,
                           repeated)
    if expected is None:
        expected = bench_expected
    if missing:
        reasons.insert(0, f"{missing} of {bench_expected if bench_expected is not None else '?'} questions of the "
                          "benchmark's files without an answer")
    partial = bool((answered is not None and expected is not None and answered < expected)
                   or (answered is not None and logged is not None and logged < answered) or reasons)
    if partial:
        logger.warning("partial result: %s of %s questions answered, %s logged%s", answered, expected, logged,
                       "; " + "; ".join(reasons) if reasons else "")
    return {"answered": answered, "expected": expected, "logged": logged, "partial": partial, "reasons": reasons,
            "repeated": repeated}


def _check_same_run(run: dict[str, Any], result_file: str | None, pio_log: str | None) -> None:
    """The answers, the log and the run file of a result describe one run (their run hashes agree)."""
    runs = {}
    for what, path in (("answers", result_file), ("log", pio_log)):
        if path and os.path.isfile(path):
            first = next((line_run(rec) for _, rec in iter_jsonl(path, strict=False) if line_run(rec)), None)
            if first is not None:
                runs[what] = (path, first)
    if run.get("run") is not None:
        runs["run file"] = (run.get("_path"), str(run["run"]))
    seen = list(runs.items())
    for (what_a, (path_a, a)), (what_b, (path_b, b)) in zip(seen, seen[1:]):
        if a != b:
            raise MixedRunsError(f"{path_b} ({what_b}) is of run {b} but {path_a} ({what_a}) of run {a}: they come "
                                 "from different runs; score the answers with their own log and run file")


def write_result(path: str, **fields: Any) -> dict[str, Any]:
    """Write one result JSON (atomically: temp file then rename) and return what was written.

    ``fields`` are :func:`build_result`'s keyword arguments.
    """
    result = build_result(**fields)
    if result["benchmark"] not in BENCHMARK_COLUMNS:
        logger.warning("benchmark %r is not one of %s; summarize will put it last", result["benchmark"],
                       ", ".join(BENCHMARK_COLUMNS))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)
    logger.info("wrote %s", path)
    return result


def maybe_write_result(args: argparse.Namespace, **fields: Any) -> dict[str, Any] | None:
    """``write_result(args.result_json, ...)`` when ``--result-json`` was given, else None."""
    if not getattr(args, "result_json", None):
        return None
    return write_result(args.result_json, args=args, **fields)


def read_results(data_root: str) -> list[dict[str, Any]]:
    """Every result JSON under ``DATA_ROOT/*/results/*.json`` (sorted by path).

    Files that are not JSON objects with ``benchmark`` and ``model`` are skipped with a warning;
    each returned dict gets ``_path`` (where it was read from).
    """
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root {data_root} is not a directory")
    results: list[dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(data_root, "*", "results", "*.json"))):
        try:
            with open(path, encoding="utf-8") as handle:
                obj = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("skipping %s: not readable JSON (%s)", path, err)
            continue
        if not isinstance(obj, dict) or not obj.get("benchmark") or not obj.get("model"):
            logger.warning("skipping %s: not a result file (needs benchmark and model)", path)
            continue
        check_result(obj, path)
        obj["_path"] = path
        results.append(obj)
    return results


_NUMBER_FIELDS = ("score", "budget", "avg_visual_tokens", "wall_time_s")
_OBJECT_FIELDS = ("method_config", "loyalty", "coverage", "sub_scores", "extra")
_TEXT_FIELDS = ("benchmark", "model", "schedule", "method", "metric", "date")


def check_result(obj: dict[str, Any], path: str) -> None:
    """A result JSON's fields have the schema's types (module docstring); raises naming the file and the field."""
    def wrong(name: str, allowed: str) -> ValueError:
        return ValueError(f"{path}: {name} is {obj[name]!r}, allowed: {allowed}; a result file as the scorers write "
                          "it (--result-json): fix the field or score the run again")

    for name in _NUMBER_FIELDS:
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise wrong(name, "a number or null")
    for name in _OBJECT_FIELDS:
        if obj.get(name) is not None and not isinstance(obj[name], dict):
            raise wrong(name, "a JSON object or null")
    for name in _TEXT_FIELDS:
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise wrong(name, "a string or null")
    for key, value in (obj.get("sub_scores") or {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: sub_scores.{key} is {value!r}, allowed: a number or null; fix the field or "
                             "score the run again")


def pct(numerator: float, denominator: float) -> float:
    """100 * numerator / denominator, 0.0 for an empty denominator."""
    return 100.0 * numerator / denominator if denominator else 0.0
