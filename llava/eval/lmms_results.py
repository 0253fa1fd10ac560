"""lmms-eval runs of the ``pio_fvlm`` model (:mod:`llava.eval.lmms_model`) in the project's result schema.

lmms-eval writes its scores to ``OUT/<checkpoint>/<date>_results.json`` (``--output_path OUT``); it cannot record
what the reduction did. The model writes that beside it, one folder per run configuration::

    OUT/pio_fvlm/<key>/run.json                the run: name, model_args, method, budget, method_config, ranks,
                                               video_sampling (families with video; copied to a result's extra)
    OUT/pio_fvlm/<key>/<task>.rank<R>.jsonl    one line per request answered by rank R: doc_id, idx, request,
                                               n_visual, stages (layer, before, after), avg_visual_tokens

``<key>`` is :func:`run_key` of the run's ``--model_args`` (``pio_dir=DIR`` puts the folders under ``DIR``
instead of ``OUT/pio_fvlm``). :func:`read_lmms_results` joins each results JSON with its folder and returns one
result dict per task in the schema of :mod:`llava.eval.results`, so ``python -m llava.eval.summarize
--lmms-output OUT`` puts lmms-eval scores into the paper-layout table beside the local scorers' results. The
table's column of an lmms-eval task is ``lmms:<task>`` (never a local scorer's column: prompts, splits and
metrics differ, ``docs/lmms_eval.md``); its value is lmms-eval's number as lmms-eval reports it.

This module does not import lmms-eval.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from llava.eval.results import iter_jsonl

logger = logging.getLogger(__name__)

MODEL_ID = "pio_fvlm"  # the --model name lmms-eval knows this project's model by
SIDECAR_DIR = "pio_fvlm"  # the folder under lmms-eval's --output_path holding the runs' records
RUN_FORMAT = "pio-fvlm lmms-eval run"
COLUMN_PREFIX = "lmms:"
NOT_IN_KEY = ("batch_size", "max_batch_size", "device")  # lmms-eval's own settings: they do not change answers
# model_args that are not reduction options: left out of a run's default name (decoding, precision, files)
NOT_IN_NAME = ("pretrained", "model_path", "model_base", "run_name", "pio_dir", "method", "budget", "conv_mode",
               "dtype", "attn_implementation", "seed", "min_pixels", "max_pixels", "max_new_tokens", "pio_log",
               "reduction_log", "profile", *NOT_IN_KEY)

# The score summarize shows for an lmms-eval task: its paper metric where the task is one of the paper's eight
# benchmarks (docs/lmms_eval.md), MMStar's average; any other task shows the first metric of its metric_list.
PREFERRED_METRIC: dict[str, str] = {
    "gqa": "exact_match",
    "mme": "mme_perception_score",
    "pope": "pope_f1_score",
    "textvqa_val": "exact_match",
    "scienceqa_img": "exact_match",
    "mmbench_en_dev": "gpt_eval_score",
    "mmbench_cn_dev": "gpt_eval_score",
    "vqav2_val": "exact_match",
    "mmstar": "average",
}


# --------------------------------------------------------------------------- model_args
def _convert(value: str) -> Any:
    """lmms-eval's conversion of one ``--model_args`` value: true/false, integers, floats, else the text."""
    if value.lower() == "true":
        return True
    if value.lower() == "false":
        return False
    if value.isnumeric():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def parse_model_args(text: str) -> dict[str, Any]:
    """``k1=v1,k2=v2`` as lmms-eval reads ``--model_args``: commas inside quotes, ``[...]`` or ``{...}`` do not
    split (``layers=[1,10,15]``), values converted as lmms-eval converts them."""
    items, current, depth, quote = [], [], 0, None
    for i, ch in enumerate(text.strip()):
        if ch in "\"'" and (i == 0 or text.strip()[i - 1] != "\\"):
            quote = ch if quote is None else (None if ch == quote else quote)
        elif quote is None and ch in "[{":
            depth += 1
        elif quote is None and ch in "]}":
            depth -= 1
        elif quote is None and ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    items.append("".join(current).strip())
    out: dict[str, Any] = {}
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model_args item {item!r} is not key=value")
        out[key.strip()] = _convert(value)
    return out


def canonical_model_args(model_args: Mapping[str, Any]) -> dict[str, str]:
    """The model_args that decide a run's answers, as sorted text (lmms-eval's own settings left out)."""
    return {k: str(v) for k, v in sorted(model_args.items()) if k not in NOT_IN_KEY and v is not None}


def run_key(model_args: Mapping[str, Any]) -> str:
    """The folder name of a run's records: a hash of :func:`canonical_model_args`."""
    text = json.dumps(canonical_model_args(model_args), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "", text.replace("=", "-").replace(",", "_").replace(" ", "_"))


def default_run_name(model_args: Mapping[str, Any]) -> str:
    """The table row of a run: ``run_name`` when given, else the scripts' ``CKPT`` naming: the checkpoint's
    folder name, then ``-<method><budget>`` and the other reduction options (``llava-v1.5-7b-pio64``), so an
    lmms-eval run joins the row of the same configuration run by ``scripts/*/eval/*.sh``."""
    args = canonical_model_args(model_args)
    if args.get("run_name"):
        return args["run_name"]
    path = str(args.get("pretrained", args.get("model_path", "model"))).rstrip("/")
    name = os.path.basename(path) or path
    method = args.get("method")
    rest = "-".join(f"{k}={v}" for k, v in args.items() if k not in NOT_IN_NAME)
    if method and method != "none":
        name += f"-{method}{args.get('budget', '')}"
    elif rest:
        name += "-pio"  # the schedule options alone select PIO, as in the runners
    return name + (f"-{_tag(rest)}" if rest else "")


def records_dir(model_args: Mapping[str, Any], output_path: str | None) -> str | None:
    """Where a run's records go: ``pio_dir`` (a model_arg) or lmms-eval's ``--output_path``/pio_fvlm, then the run's
    key; None when neither is known."""
    root = model_args.get("pio_dir") or (os.path.join(output_path, SIDECAR_DIR) if output_path else None)
    return os.path.join(str(root), run_key(model_args)) if root else None


# --------------------------------------------------------------------------- reading
def _run_info(folder: str | None) -> dict[str, Any]:
    path = os.path.join(folder, "run.json") if folder else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        logger.warning("%s is not a run record of the pio_fvlm model; ignored", path)
        return {}
    info["_path"] = path
    return info


def task_records(folder: str, task: str, world_size: int) -> list[dict[str, Any]]:
    """The request lines of ``task`` written by every rank of the run, each request once (lmms-eval repeats the
    last request of a rank to even out the ranks)."""
    seen: dict[tuple[Any, Any], dict[str, Any]] = {}
    for rank in range(max(world_size, 1)):
        path = os.path.join(folder, f"{task}.rank{rank}.jsonl")
        if os.path.isfile(path):
            for _, rec in iter_jsonl(path, strict=False):
                seen.setdefault((rec.get("doc_id"), rec.get("idx")), rec)
    return list(seen.values())


def _metric_of(task: str, values: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[str | None, Any]:
    """``(results key, value)`` of the task's score (:data:`PREFERRED_METRIC`, else its first listed metric)."""
    numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and "_stderr" not in k}
    wanted = [PREFERRED_METRIC[task]] if task in PREFERRED_METRIC else []
    wanted += [m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, dict)]
    for metric in wanted:
        for key in numeric:
            if key.split(",")[0] == metric:
                return key, numeric[key]
    first = next(iter(numeric), None)
    return first, numeric.get(first) if first else None


def read_results_file(path: str) -> list[dict[str, Any]]:
    """The result dicts (schema of :mod:`llava.eval.results`) of one lmms-eval results JSON of the pio_fvlm model,
    one per task; [] for another model's results."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    config = data.get("config") or {}
    if config.get("model") != MODEL_ID:
        logger.info("%s: results of lmms-eval model %r, not %s; skipped", path, config.get("model"), MODEL_ID)
        return []
    raw = config.get("model_args") or ""
    args = parse_model_args(raw) if isinstance(raw, str) else dict(raw)
    output_path = (config.get("resolved_cli_args") or {}).get("output_path")
    folder = records_dir(args, output_path or os.path.dirname(os.path.dirname(os.path.abspath(path))))
    run = _run_info(folder)
    if not run:
        logger.warning("%s: no pio_fvlm run record at %s; the method comes from its model_args and the average "
                       "visual tokens are unknown", path, folder)
    date = _dt.datetime.fromtimestamp(os.path.getmtime(path), _dt.timezone.utc).isoformat(timespec="seconds")
    samples = data.get("n-samples") or {}
    out = []
    for task, values in (data.get("results") or {}).items():
        metric, score = _metric_of(task, values, (data.get("configs") or {}).get(task) or {})
        if metric is None:
            continue
        expected = (samples.get(task) or {}).get("effective")
        logged = None
        avg = None
        if run:
            recs = task_records(folder, task, int(run.get("world_size") or 1))
            docs: dict[Any, list[float]] = {}
            for r in recs:
                if r.get("n_visual"):  # text-only requests have no visual tokens to average
                    docs.setdefault(r.get("doc_id"), []).append(float(r["avg_visual_tokens"]))
            logged = len({r.get("doc_id") for r in recs})
            avg = sum(sum(v) / len(v) for v in docs.values()) / len(docs) if docs else None
        partial = bool(expected is not None and logged is not None and logged < expected)
        out.append({
            "benchmark": COLUMN_PREFIX + task,
            "model": run.get("model") or default_run_name(args),
            "schedule": raw,
            "method": run.get("method") or str(args.get("method", "none")),
            "budget": run.get("budget") if run else args.get("budget"),
            "method_config": run.get("method_config"),
            "avg_visual_tokens": avg,
            "loyalty": None,
            "coverage": {"answered": expected, "expected": expected, "logged": logged, "partial": partial},
            "score": None if score is None else float(score),
            "metric": f"lmms-eval {metric}",
            "sub_scores": {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "num_questions": int(expected or 0),
            "wall_time_s": None,
            "date": date,
            "extra": {"lmms_results": path, "lmms_task": task, "run_info": run.get("_path"),
                      **({"video_sampling": run["video_sampling"]} if run.get("video_sampling") else {})},
            "_path": path,
        })
    return out


def read_lmms_results(output_path: str) -> list[dict[str, Any]]:
    """Every pio_fvlm task result under an lmms-eval ``--output_path`` (its ``*/*_results.json``)."""
    if not os.path.isdir(output_path):
        raise FileNotFoundError(f"--lmms-output {output_path} is not a directory (lmms-eval's --output_path)")
    out: list[dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(output_path, "**", "*_results.json"), recursive=True)):
        try:
            out += read_results_file(path)
        except (OSError, ValueError) as err:
            logger.warning("skipping %s: %s", path, err)
    return out
