"""Prefill/decode benchmark of the unpruned model against reduction methods, run alternately (ABC...ABC...).

    python -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --methods pio,fastv,pdrop,sparsevlm,dart,random \
        --budget 64
    python -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --pio-layers 1,10,15 --pio-tokens 92,54,22
    python -m llava.eval.bench --model-path liuhaotian/llava-v1.5-7b --method fastv --budget 128 --json out.json
    python -m llava.eval.bench --shape qwen2.5-vl-7b --dtype bfloat16 --video-frames 32 --methods pio,fastv --budget 64
    python -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --methods pio,fastv --budget 64 \
        --batch-size 1,8 --questions 16          # questions per second end to end (below)

A model comes from ``--model-path`` or from a named shape with random weights (same compute, no download).
One synthetic input (an image, or with ``--video-frames`` a video, and ~60 text tokens, like a benchmark prompt;
budgets are the same share of a video's tokens as of an image's) is answered by every run for
``--repeats`` rounds; the table gives medians: the measured prefill speedup, two ideals, decode time per token,
FLOPs (exact and FastV's convention), KV cache and the selection overhead (everything the method computes to
choose, plus the gather).

The ideals: from FLOPs (exact model FLOPs ratio), and *calibrated*: the unpruned model's own decoder layer
timed on this machine at every sequence length a run realises, summed over that run's layers. The FLOPs ideal
assumes every length runs at the same rate; the calibrated one does not, so measured / calibrated isolates the
method's own overheads (selection, gather, masks) from the hardware's lower rate on short sequences.

``--batch-size N[,M...]`` measures throughput instead: questions per second end to end (prompt building, image
preprocessing, prefill with the method, cached decoding, decoding the text) on a question file
(``--question-file``/``--image-folder``, a ``model_vqa_loader`` jsonl; default: ``--questions`` synthetic VQA
questions of mixed lengths about images of mixed sizes) at every batch size, unpruned and per method, the runs
alternating round by round (:func:`throughput`). A shape's prompts are tokenised by its family's tiny tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llava.eval import runner
from llava.eval.profiling import profile_record
from llava.model.pruning import Segment, backend_mask
from pio import ReductionMethod, get_method, method_names
from pio.build import build_reducer
from pio.cli import add_method_args, flag_spelling, method_from_args

logger = logging.getLogger(__name__)


def shapes() -> dict[str, tuple[Any, Any]]:
    """Every family's named shapes: ``{name: (family, shape)}`` (:attr:`llava.model.families.Family.shapes`)."""
    from llava.model.families import families

    return {shape.name: (family, shape) for family in families() for shape in family.shapes}


def shape_of(name: str) -> tuple[Any, Any]:
    """``(family, shape)`` of a named shape; an unknown name raises listing the known ones."""
    every = shapes()
    if name not in every:
        raise ValueError(f"unknown --shape {name!r}; allowed: {', '.join(every)}")
    return every[name]


def build_shape(name: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """A random-weight model of a named shape (vision tower included) and its image processor, built by its
    family on the meta device and filled from one random block (:func:`llava.model.tiny.fill_random`), so a 7B
    shape takes seconds, not the minutes of a per-tensor random initialisation."""
    family, shape = shape_of(name)
    return family.build_shape(shape, device, dtype, workdir)


def synthetic_input(model, proc, size: tuple[int, int], n_text: int = 60, seed: int = 0):
    """``(ids, pixels, sizes)``: a structured image and random text ids with the image after a system-prompt-long
    prefix, as the model's family encodes them (LLaVA's placeholder; Qwen2.5-VL's vision tokens, one per merged
    patch)."""
    from llava.model.families import family_of

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([xx % 256, yy % 256, rng.integers(0, 256, size=(h, w))], -1).astype(np.uint8))
    return family_of(model.config).synthetic_input(model, proc, img, n_text, rng)


def synthetic_video(model, proc, size: tuple[int, int], n_frames: int, n_text: int = 60, seed: int = 0):
    """``(ids, visual inputs, None)``: a synthetic ``size`` (width, height) video of ``n_frames`` frames, read and
    encoded as the model's family reads videos, after a system-prompt-long prefix of random text ids."""
    from llava.model.families import family_of

    return family_of(model.config).synthetic_video(model, proc, size, n_frames, n_text, np.random.default_rng(seed))


def parse_size(text: str) -> tuple[int, int]:
    """``"640x360"`` -> (640, 360); anything else raises naming the format."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--video-size {text!r}: give WIDTHxHEIGHT, e.g. 640x360") from None
    if w < 1 or h < 1:
        raise ValueError(f"--video-size {text!r}: width and height must be positive")
    return w, h


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"platform": platform.platform(), "processor": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if os.path.exists("/proc/cpuinfo"):  # whether bf16 matrix products run natively or are emulated in float32
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        info["cpu_bf16"] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def methods_from_args(args: argparse.Namespace) -> list[ReductionMethod]:
    """``--methods a,b --budget B`` (each method at the paper budget B, with its defaults for the model family),
    or one method from the method flags."""
    family = args.family = run_family(args)
    single = method_from_args(args) if not args.methods else None
    if args.methods:
        if args.budget is None:
            raise ValueError("--methods needs --budget (the paper's 64, 128 or 192)")
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        if names == ["all"]:
            names = method_names()
        out = []
        for budget in [b.strip() for b in str(args.budget).split(",") if b.strip()]:  # 64,144: each at both
            for n in names:  # a composition gives the paper's w/ VE row; --layers moves the in-LLM stages
                in_llm = "+" in n or get_method(n).where == "llm"
                options = {"budget": budget, "layers": args.layers if in_llm else None}
                out.append(build_reducer(n, options, family=family, spelling=flag_spelling()))
        return out
    if single is None:
        raise ValueError("give the methods to compare: --methods pio,fastv,... --budget 64, or one method's flags "
                         "(--method fastv --budget 64, --pio-layers 1,10,15 --pio-tokens 92,54,22, ...)")
    return [single]


def run_family(args: argparse.Namespace):
    """The model family of the run: the shape's, or the checkpoint's (a hub id by its name)."""
    from llava.model.families import guess_family

    return shape_of(args.shape)[0] if args.shape else guess_family(args.model_path)


def time_layer(model, n: int, repeats: int, batch: int = 1) -> float:
    """Median seconds of the model's first decoder layer on ``batch`` sequences of ``n`` tokens (prefill, causal,
    no cache)."""
    adapter = model.decoder_adapter()
    layer = adapter.layers[0]
    dev, dtype = model.device, model.dtype
    width = adapter.norm.weight.shape[0]
    h = torch.randn(batch, n, width, generator=torch.Generator().manual_seed(n)).to(dev, dtype)
    key_mask = torch.ones(batch, n, dtype=torch.bool, device=dev)
    pos = adapter.positions(key_mask, n)
    seg = Segment(key_mask, pos, backend_mask(adapter.attn_implementation, key_mask, n, dtype),
                  adapter.rotary(h, pos), torch.arange(n, device=dev))
    kwargs = adapter.layer_kwargs(seg)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            layer(h, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llava.model.builder import default_device, load_pretrained_model, resolve_dtype

    methods = methods_from_args(args)  # fail on bad flags before building the model
    family = run_family(args)
    if args.video_frames is not None:
        family.check_video()
        if args.video_frames < 2:
            raise ValueError(f"--video-frames must be at least 2, got {args.video_frames}")
    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            _, model, proc, _ = load_pretrained_model(args.model_path, args.model_base, device=device,
                                                      torch_dtype=dtype, attn_implementation=args.attn_implementation)
            size = family.bench_image_size(model.config)
        else:
            model, proc = build_shape(args.shape, device, dtype, Path(tmp))
            model.config._attn_implementation = args.attn_implementation
            size = shape_of(args.shape)[1].image
    build_s = time.perf_counter() - t0
    logger.info("model ready in %.1f s", build_s)
    for m in methods:
        family.check_method(m)
        m.validate(family.decoder_depth(model.config))
    if args.video_frames is not None:
        ids, pixels, sizes = synthetic_video(model, proc, parse_size(args.video_size), args.video_frames)
    else:
        ids, pixels, sizes = synthetic_input(model, proc, size)
    pixels = runner.to_model(pixels, model)  # a tensor, a video bundle, or per-image views (LLaVA-OneVision)
    runs: list[tuple[str, ReductionMethod | None]] = [("unpruned", None)]
    runs += [(m.name if sum(x.name == m.name for x in methods) == 1 else m.describe(), m) for m in methods]
    gen = dict(do_sample=False, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
               use_cache=True, pad_token_id=0)
    samples: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for rnd in range(args.warmup + args.repeats):
        for name, method in runs:  # alternate, so drift affects every run alike
            _, state, timing = runner.timed_generate(model, ids, pixels, sizes, gen, method, profile=True)
            if rnd >= args.warmup:
                samples[name].append(profile_record(model, state, timing))
        logger.info("round %d/%d done", rnd + 1, args.warmup + args.repeats)
    layer_s: dict[int, float] = {}
    if args.calibrate:
        lengths = sorted({n for recs in samples.values() for n in recs[0]["seq_len_per_layer"]})
        for n in lengths:
            layer_s[n] = time_layer(model, n, args.repeats)
        logger.info("decoder layer timed at %d lengths", len(lengths))
    return summarise(samples, machine(), args, str(dtype).replace("torch.", ""), layer_s, build_s)


def summarise(samples: dict[str, list[dict]], info: dict, args: argparse.Namespace, dtype: str,
              layer_s: dict[int, float] | None = None, build_s: float | None = None) -> dict[str, Any]:
    rows = []
    base = None
    for name, recs in samples.items():

        def med(key: str, recs: list[dict] = recs) -> float:
            return statistics.median(r[key] for r in recs)

        # the in-LLM selection (part of the prefill) and the encoder-side one (part of the vision time)
        sel = statistics.median(sum(v for k, v in r["selection_s"].items() if not k.startswith("encoder_"))
                                for r in recs)
        enc_sel = statistics.median(r["selection_s"].get("encoder_selection", 0.0) for r in recs)
        phases = sorted({k for r in recs for k in r["selection_s"]})
        lengths = recs[0]["seq_len_per_layer"]
        row = {
            "run": name,
            "prefill_s": med("prefill_s"),
            "vision_s": med("vision_s"),
            "decode_s_per_token": statistics.median(r["decode_s"] / max(r["new_tokens"] - 1, 1) for r in recs),
            "flops_exact": recs[0]["flops"]["exact"],
            "flops_selection": recs[0]["flops"]["selection"] + recs[0]["flops"]["encoder_selection"],
            "flops_vision": recs[0]["flops"]["vision"],
            "prefill_with_vision_s": statistics.median(r["prefill_s"] + r["vision_s"] for r in recs),
            "flops_fastv_visual": recs[0]["flops"]["fastv_visual"],
            "kv_mb": (recs[0]["kv_bytes"]["measured"] or 0) / 2**20,
            "selection_s": sel,
            "encoder_selection_s": enc_sel,
            "selection_split_s": {k: statistics.median(r["selection_s"].get(k, 0.0) for r in recs) for k in phases},
            "selection_pct_of_prefill": 100 * sel / med("prefill_s"),
            "seq_len_per_layer": lengths,
            "visual_per_stage": ([recs[0]["n_encoder"]] if recs[0].get("n_encoder") is not None else [])
            + [v for i, v in enumerate(recs[0]["visual_per_layer"]) if i == 0 or v != recs[0]["visual_per_layer"][i - 1]],
            "prefill_all_s": [r["prefill_s"] for r in recs],
        }
        if layer_s:
            row["calibrated_prefill_s"] = sum(layer_s[n] for n in lengths)
        if base is None:
            base = row
        row["speedup"] = base["prefill_s"] / row["prefill_s"]
        row["speedup_with_vision"] = base["prefill_with_vision_s"] / row["prefill_with_vision_s"]
        row["ideal_speedup"] = base["flops_exact"] / row["flops_exact"]
        row["speedup_vs_ideal"] = row["speedup"] / row["ideal_speedup"]
        # the same ratio counting the selection's own FLOPs (proxy passes, attention rows) as pruned-run work
        row["ideal_speedup_with_selection"] = base["flops_exact"] / (row["flops_exact"] + row["flops_selection"])
        row["speedup_vs_ideal_with_selection"] = row["speedup"] / row["ideal_speedup_with_selection"]
        if layer_s:
            row["ideal_speedup_calibrated"] = base["calibrated_prefill_s"] / row["calibrated_prefill_s"]
            row["speedup_vs_calibrated"] = row["speedup"] / row["ideal_speedup_calibrated"]
        rows.append(row)
    video = getattr(args, "video_frames", None)
    return {"machine": info, "shape": args.shape, "model_path": args.model_path, "dtype": dtype,
            "input": {"video_frames": video, "video_size": args.video_size} if video else {"image": True},
            "repeats": args.repeats, "max_new_tokens": args.max_new_tokens, "build_s": build_s,
            "layer_time_s": {str(n): t for n, t in sorted((layer_s or {}).items())}, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    calibrated = any("ideal_speedup_calibrated" in r for r in result["rows"])
    head = ["run", "visual tokens", "prefill (s)", "speedup", "ideal (FLOPs)", "measured/ideal",
            "ideal incl. selection", "measured/ideal incl. selection"]
    if calibrated:
        head += ["ideal (calibrated)", "measured/calibrated"]
    head += ["vision (s)", "prefill + vision (s)", "speedup incl. vision", "decode (ms/tok)", "FLOPs exact (T)",
             "FLOPs selection (T)", "FLOPs vision (T)", "FLOPs FastV (T)", "KV (MB)", "selection (s)",
             "selection % of prefill"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in result["rows"]:
        cells = [r["run"], ">".join(map(str, r["visual_per_stage"])), f"{r['prefill_s']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['ideal_speedup']:.2f}x",
                 f"{r['speedup_vs_ideal']:.2f}", f"{r['ideal_speedup_with_selection']:.2f}x",
                 f"{r['speedup_vs_ideal_with_selection']:.2f}"]
        if calibrated:
            cells += [f"{r['ideal_speedup_calibrated']:.2f}x", f"{r['speedup_vs_calibrated']:.2f}"]
        cells += [f"{r['vision_s']:.3f}", f"{r['prefill_with_vision_s']:.3f}", f"{r['speedup_with_vision']:.2f}x",
                  f"{1000 * r['decode_s_per_token']:.1f}", f"{r['flops_exact'] / 1e12:.3f}",
                  f"{r['flops_selection'] / 1e12:.3f}", f"{r['flops_vision'] / 1e12:.3f}",
                  f"{r['flops_fastv_visual'] / 1e12:.3f}", f"{r['kv_mb']:.1f}", f"{r['selection_s']:.3f}",
                  f"{r['selection_pct_of_prefill']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    where = m.get("gpu") or f"CPU {m['processor']} ({m['cpu_count']} cores, {m['threads']} threads)"
    lines.append("")
    what = result.get("input", {})
    seen = (f"a {what['video_size']} video, {what['video_frames']} frames" if what.get("video_frames") else "one image")
    lines.append(f"{result['shape'] or result['model_path']}, {seen}, {result['dtype']}, {where}, torch {m['torch']}, "
                 f"median of {result['repeats']} alternating rounds, {result['max_new_tokens']} new tokens")
    for r in result["rows"][1:]:
        split = ", ".join(f"{k} {v:.3f}" for k, v in r["selection_split_s"].items())
        lines.append(f"- {r['run']}: selection split (s): {split or 'none'}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- throughput (--batch-size)
BENCH_QUESTIONS = ("What is the colour of the car?", "Is there a dog in the image?", "How many people are there?",
                   "What is written on the sign above the door of the shop?", "Which room is this?",
                   "What is the man on the left holding in his right hand?", "Is it raining?",
                   "What sport is being played on the field in the picture?")
BENCH_SIZES = ((640, 480), (500, 375), (640, 427), (480, 640), (612, 612), (800, 533), (427, 640), (640, 360))
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # the VQA benchmarks' suffix


def write_bench_questions(folder: Path, n: int) -> tuple[Path, Path]:
    """``n`` short-answer questions (a ``model_vqa_loader`` jsonl) of mixed lengths about structured images of
    typical benchmark sizes: ``(question file, image folder)``."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        w, h = BENCH_SIZES[i % len(BENCH_SIZES)]
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, rng.integers(0, 256, size=(h, w))], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"{i}.png")
        lines.append({"question_id": i, "image": f"{i}.png",
                      "text": BENCH_QUESTIONS[i % len(BENCH_QUESTIONS)] + SHORT_ANSWER})
    qfile = folder / "questions.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return qfile, images


def batch_sizes(text: str) -> list[int]:
    """``--batch-size 1,8`` -> [1, 8]; anything but positive integers raises naming it."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"--batch-size {text!r}: give positive integers, e.g. --batch-size 1,8")
    return out


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Questions per second at every ``--batch-size``, unpruned and per method (:mod:`llava.eval.batching`, the
    runners' batched path), every (run, batch size) pair once per round, rounds alternating; the median of the
    ``--repeats`` rounds after ``--warmup`` ones. Also how many answers equal the batch-size-1 run's."""
    from llava.eval import batching
    from llava.eval.runner import chat_prompt, encode, image_token, load_image, read_jsonl_questions
    from llava.model.builder import default_device, load_pretrained_model, resolve_dtype

    sizes = batch_sizes(args.batch_size)
    methods = methods_from_args(args) if (args.methods or method_from_args(args) is not None) else []
    if args.skip_unpruned and not methods:
        raise ValueError("--skip-unpruned leaves nothing to measure: give the methods (--methods pio,fastv "
                         "--budget 64, or one method's flags)")
    family = run_family(args)
    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.model_path:
            tok, model, proc, _ = load_pretrained_model(args.model_path, args.model_base, device=device,
                                                        torch_dtype=dtype, attn_implementation=args.attn_implementation)
        else:
            from transformers import AutoTokenizer

            model, proc = build_shape(args.shape, device, dtype, Path(tmp))
            model.config._attn_implementation = args.attn_implementation
            tok = AutoTokenizer.from_pretrained(family.write_tiny(Path(tmp) / "tokenizer", shape_of(args.shape)[1].variant))
        build_s = time.perf_counter() - t0
        for m in methods:
            family.check_method(m)
            m.validate(family.decoder_depth(model.config))
        if args.question_file:
            qfile, folder = Path(args.question_file), Path(args.image_folder)
        else:
            qfile, folder = write_bench_questions(Path(tmp) / "questions", args.questions)
        questions = read_jsonl_questions(qfile, ("question_id", "image", "text"))[: args.questions]
        conv = args.conv_mode or family.conv_mode
        mark = image_token(bool(getattr(model.config, "mm_use_im_start_end", False)))

        def prepared():  # end to end: the image read and preprocessed, the prompt built and tokenised
            for i, q in enumerate(questions):
                ids, pixels, image_sizes = encode(chat_prompt(mark + "\n" + q["text"], conv),
                                                  [load_image(folder / q["image"])], tok, proc, model.config)
                yield i, batching.Sample(ids, pixels, image_sizes)

        dec = argparse.Namespace(temperature=0.0, top_p=None, num_beams=1, max_new_tokens=args.max_new_tokens,
                                 batch_size=1)
        runs: list[tuple[str, ReductionMethod | None]] = [
            (m.name if sum(x.name == m.name for x in methods) == 1 else m.describe(), m) for m in methods]
        runs += [] if args.skip_unpruned else [("unpruned", None)]  # the slowest last: an early stop keeps the methods
        rates: dict[tuple[str, int], list[float]] = {(name, n): [] for name, _ in runs for n in sizes}
        answers: dict[tuple[str, int], list[str]] = {}
        lengths: list[int] = []
        for rnd in range(args.warmup + args.repeats):
            for name, method in runs:
                for n in sizes:  # alternate, so drift affects every run alike
                    dec.batch_size = n
                    batcher = batching.Batcher(model, tok, dec, method)
                    t = time.perf_counter()
                    done = list(batcher.run(prepared()))
                    rate = len(done) / (time.perf_counter() - t)
                    texts = [ans.text for _, _, ans in done]
                    if not lengths:  # the first question's sequence: all of it, and its average over the layers
                        _, sample, ans = done[0]
                        report = ans.state.report()[ans.row] if ans.state.samples else None
                        text_tokens = sample.ids.shape[1] - 1  # the image mark becomes the visual tokens
                        if report is not None:
                            lengths = sorted({report["n_visual"] + text_tokens,
                                              round(report["avg_visual_tokens"]) + text_tokens, 1}, reverse=True)
                    if rnd >= args.warmup:
                        rates[(name, n)].append(rate)
                    answers[(name, n)] = texts
                    logger.info("round %d, %s, batch size %d: %.3f questions/s", rnd + 1, name, n, rate)
        layer_rates = []  # what the hardware gains from batching at all: one decoder layer, tokens per second
        if args.calibrate:
            for n in lengths:
                for b in sizes:
                    sec = time_layer(model, n, max(1, args.repeats), batch=b)
                    layer_rates.append({"tokens": n, "batch_size": b, "seconds": sec, "tokens_per_s": b * n / sec})
                    logger.info("decoder layer, %d x %d tokens: %.3f s", b, n, sec)
    rows = []
    for name, _ in runs:
        base = statistics.median(rates[(name, sizes[0])])
        for n in sizes:
            q_s = statistics.median(rates[(name, n)])
            same = sum(a == b for a, b in zip(answers[(name, n)], answers[(name, sizes[0])]))
            rows.append({"run": name, "batch_size": n, "questions_per_s": q_s, "speedup": q_s / base,
                         "all_rates": rates[(name, n)], "same_answers": same, "questions": len(questions)})
    return {"machine": machine(), "shape": args.shape, "model_path": args.model_path,
            "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats, "warmup": args.warmup,
            "max_new_tokens": args.max_new_tokens, "question_file": args.question_file, "build_s": build_s,
            "rows": rows, "layer_rates": layer_rates}


def format_throughput(result: dict[str, Any]) -> str:
    first = result["rows"][0]["batch_size"]
    lines = [f"| run | batch size | questions/s | vs batch size {first} | answers = batch size {first} |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['batch_size']} | {r['questions_per_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['same_answers']}/{r['questions']} |")
    if result.get("layer_rates"):
        lines += ["", "| decoder layer: tokens per sequence | batch size | seconds | tokens/s | vs batch size "
                  f"{first} |", "|---:|---:|---:|---:|---:|"]
        one = {r["tokens"]: r["tokens_per_s"] for r in result["layer_rates"] if r["batch_size"] == first}
        for r in result["layer_rates"]:
            lines.append(f"| {r['tokens']} | {r['batch_size']} | {r['seconds']:.4f} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / one[r['tokens']]:.2f}x |")
    m = result["machine"]
    where = m.get("gpu") or (f"CPU {m['processor']} ({m['cpu_count']} cores, {m['threads']} threads, bf16 "
                             f"instructions: {', '.join(m.get('cpu_bf16') or []) or 'none'})")
    lines.append("")
    lines.append(f"{result['shape'] or result['model_path']}, {result['dtype']}, {where}, torch {m['torch']}, "
                 f"{result['rows'][0]['questions']} questions, {result['max_new_tokens']} new tokens at most, median "
                 f"of {result['repeats']} alternating rounds after {result['warmup']} warm-up")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, choices=sorted(shapes()), help="random weights of this shape")
    p.add_argument("--model-path", default=None)
    p.add_argument("--model-base", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--video-frames", type=int, default=None,
                   help="a synthetic video of this many frames instead of the image (families with video)")
    p.add_argument("--video-size", default="640x360",
                   help="the synthetic video's WIDTHxHEIGHT before the family's frame rule resizes it (default "
                        "640x360)")
    p.add_argument("--json", default=None, help="write all figures and the machine description here")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods to compare at --budget ({', '.join(method_names())}, or all; "
                        "--budget 64,144 runs each at both); --layers, if given, moves every method's stages")
    p.add_argument("--batch-size", default=None, metavar="N[,M...]",
                   help="measure questions per second end to end at these batch sizes instead (--questions, "
                        "--question-file)")
    p.add_argument("--questions", type=int, default=16, help="with --batch-size: how many questions (default 16)")
    p.add_argument("--question-file", default=None,
                   help="with --batch-size: a model_vqa_loader jsonl (default: synthetic short-answer questions)")
    p.add_argument("--image-folder", default="", help="with --question-file: where its images are")
    p.add_argument("--conv-mode", default=None, help="with --batch-size: the template (default: the family's)")
    p.add_argument("--skip-unpruned", action="store_true",
                   help="with --batch-size: measure the methods only (the unpruned runs are the slowest)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip timing the decoder layer at each realised length (the calibrated ideal; with "
                        "--batch-size: its tokens per second at each batch size)")
    add_method_args(p)
    args = p.parse_args(argv)
    runner.setup_logging()
    if bool(args.shape) == bool(args.model_path):
        p.error("give exactly one of --shape or --model-path")
    if args.batch_size is not None:
        result = throughput(args)
        print(format_throughput(result), end="")
    else:
        result = run(args)
        print(format_table(result), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
