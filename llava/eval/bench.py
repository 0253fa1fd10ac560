"""Prefill/decode benchmark of the unpruned model against PIO schedules, run alternately (ABAB...).

    python -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --pio-layers 1,10,15 --pio-tokens 92,54,22
    python -m llava.eval.bench --model-path liuhaotian/llava-v1.5-7b --pio-preset 64 --repeats 5 --json out.json

A model comes from ``--model-path`` or from a named shape with random weights (same compute, no download).
One synthetic input (an image and ~60 text tokens, like a benchmark prompt) is answered by every run for
``--repeats`` rounds; the table gives medians, the measured prefill speedup next to the ideal one from the
exact FLOPs ratio, decode time per token, FLOPs (exact and FastV's convention), KV cache and the selection
overhead (proxy forward + backward + NMS + gather).
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

from llava.constants import IMAGE_TOKEN_INDEX
from llava.eval import runner
from llava.eval.profiling import profile_record
from llava.mm_utils import process_images
from pio import PIOConfig

logger = logging.getLogger(__name__)

SHAPES: dict[str, dict[str, Any]] = {
    "llava-v1.5-7b": dict(arch="llava-v1.5", hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000,
                          vision="vit-l", image=(336, 336)),
    "llava-v1.6-7b": dict(arch="llava-v1.6", hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000,
                          vision="vit-l", image=(640, 480)),
    "tiny": dict(arch="llava-v1.5", hidden=64, intermediate=176, layers=4, heads=4, vocab=1000, vision="tiny",
                 image=(336, 336)),
}


def build_shape(name: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """A random-weight LLaVA of a named shape (vision tower included) and its image processor."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.tiny import tiny_config, vision_config, write_vision_configs

    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}; allowed: {', '.join(SHAPES)}")
    s = SHAPES[name]
    vcfg = vision_config(s["vision"])
    write_vision_configs(workdir / "vision_tower", vcfg)
    cfg = LlavaConfig(**tiny_config(
        s["arch"], s["vocab"], layers=s["layers"], hidden=s["hidden"], intermediate_size=s["intermediate"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], mm_hidden_size=vcfg.hidden_size,
        initializer_range=0.02, unfreeze_mm_vision_tower=True,  # build the tower inside the model, randomly
    ))
    cfg.mm_vision_tower = str(workdir / "vision_tower")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaLlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.requires_grad_(False).eval()
    return model, model.get_vision_tower().image_processor


def synthetic_input(vocab: int, size: tuple[int, int], n_text: int = 60, seed: int = 0):
    """Token ids with one image placeholder after a system-prompt-long prefix, and a structured image."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=n_text - 1).tolist()
    ids = [1, *ids[:34], IMAGE_TOKEN_INDEX, *ids[34:]]
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx % 256, yy % 256, rng.integers(0, 256, size=(h, w))], -1).astype(np.uint8)
    return torch.tensor([ids]), Image.fromarray(arr)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"platform": platform.platform(), "processor": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llava.model.builder import default_device, load_pretrained_model, resolve_dtype

    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            _, model, proc, _ = load_pretrained_model(args.model_path, args.model_base, device=device,
                                                      torch_dtype=dtype, attn_implementation=args.attn_implementation)
            size = (640, 480) if getattr(model.config, "image_aspect_ratio", "pad") == "anyres" else (336, 336)
        else:
            model, proc = build_shape(args.shape, device, dtype, Path(tmp))
            model.config._attn_implementation = args.attn_implementation
            size = SHAPES[args.shape]["image"]
    logger.info("model ready in %.1f s", time.perf_counter() - t0)
    ids, img = synthetic_input(model.config.vocab_size, size)
    pixels = process_images([img], proc, model.config).to(device, dtype)
    runs: list[tuple[str, PIOConfig | None]] = [("unpruned", None)]
    pio = runner.pio_config_from_args(args)
    if pio is None:
        raise SystemExit("give a schedule to compare with: --pio-layers/--pio-tokens, --pio-budget or --pio-preset")
    runs.append((pio.schedule.describe(), pio))
    gen = dict(do_sample=False, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
               use_cache=True, pad_token_id=0)
    samples: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for rnd in range(args.warmup + args.repeats):
        for name, cfg in runs:  # alternate, so drift affects every run alike
            if cfg is None:
                model.disable_pio()
            else:
                model.enable_pio(cfg)
            _, state, timing = runner.timed_generate(model, ids, pixels, [img.size], gen, profile=True)
            if rnd >= args.warmup:
                samples[name].append(profile_record(model, state, timing))
        logger.info("round %d/%d done", rnd + 1, args.warmup + args.repeats)
    model.disable_pio()
    return summarise(samples, machine(), args, str(dtype).replace("torch.", ""))


def summarise(samples: dict[str, list[dict]], info: dict, args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    rows = []
    base = None
    for name, recs in samples.items():

        def med(key: str, recs: list[dict] = recs) -> float:
            return statistics.median(r[key] for r in recs)

        sel = statistics.median(sum(r["selection_s"].values()) for r in recs)
        row = {
            "run": name,
            "prefill_s": med("prefill_s"),
            "vision_s": med("vision_s"),
            "decode_s_per_token": statistics.median(r["decode_s"] / max(r["new_tokens"] - 1, 1) for r in recs),
            "flops_exact": recs[0]["flops"]["exact"],
            "flops_proxy": recs[0]["flops"]["proxy"],
            "flops_fastv_visual": recs[0]["flops"]["fastv_visual"],
            "kv_mb": (recs[0]["kv_bytes"]["measured"] or 0) / 2**20,
            "selection_s": sel,
            "selection_split_s": {k: statistics.median(r["selection_s"][k] for r in recs) for k in recs[0]["selection_s"]},
            "selection_pct_of_prefill": 100 * sel / med("prefill_s"),
            "seq_len_per_layer": recs[0]["seq_len_per_layer"],
            "prefill_all_s": [r["prefill_s"] for r in recs],
        }
        if base is None:
            base = row
        row["speedup"] = base["prefill_s"] / row["prefill_s"]
        row["ideal_speedup"] = base["flops_exact"] / row["flops_exact"]
        row["speedup_vs_ideal"] = row["speedup"] / row["ideal_speedup"]
        # the same ratio counting the selection's own FLOPs (proxy forward + backward) as pruned-run work
        row["ideal_speedup_with_proxy"] = base["flops_exact"] / (row["flops_exact"] + row["flops_proxy"])
        row["speedup_vs_ideal_with_proxy"] = row["speedup"] / row["ideal_speedup_with_proxy"]
        rows.append(row)
    return {"machine": info, "shape": args.shape, "model_path": args.model_path, "dtype": dtype,
            "repeats": args.repeats, "max_new_tokens": args.max_new_tokens, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    head = ["run", "prefill (s)", "speedup", "ideal (FLOPs)", "measured/ideal", "ideal incl. proxy",
            "measured/ideal incl. proxy", "decode (ms/tok)",
            "FLOPs exact (T)", "FLOPs FastV (T)", "KV (MB)", "selection (s)", "selection % of prefill"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["run"], f"{r['prefill_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
            f"{r['speedup_vs_ideal']:.2f}", f"{r['ideal_speedup_with_proxy']:.2f}x",
            f"{r['speedup_vs_ideal_with_proxy']:.2f}", f"{1000 * r['decode_s_per_token']:.1f}", f"{r['flops_exact'] / 1e12:.3f}",
            f"{r['flops_fastv_visual'] / 1e12:.3f}", f"{r['kv_mb']:.1f}", f"{r['selection_s']:.3f}",
            f"{r['selection_pct_of_prefill']:.1f}",
        ]) + " |")
    m = result["machine"]
    where = m.get("gpu") or f"CPU {m['processor']} ({m['cpu_count']} cores, {m['threads']} threads)"
    lines.append("")
    lines.append(f"{result['shape'] or result['model_path']}, {result['dtype']}, {where}, torch {m['torch']}, "
                 f"median of {result['repeats']} alternating rounds, {result['max_new_tokens']} new tokens")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random weights of this shape")
    p.add_argument("--model-path", default=None)
    p.add_argument("--model-base", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json", default=None, help="write all figures and the machine description here")
    runner.add_pio_args(p)
    args = p.parse_args(argv)
    runner.setup_logging()
    if bool(args.shape) == bool(args.model_path):
        p.error("give exactly one of --shape or --model-path")
    result = run(args)
    print(format_table(result), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
