"""Prefill/decode benchmark of the unpruned model against reduction methods, run alternately (ABC...ABC...).

    python -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --methods pio,fastv,pdrop,sparsevlm,dart,random \
        --budget 64
    python -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --pio-layers 1,10,15 --pio-tokens 92,54,22
    python -m llava.eval.bench --model-path liuhaotian/llava-v1.5-7b --method fastv --budget 128 --json out.json

A model comes from ``--model-path`` or from a named shape with random weights (same compute, no download).
One synthetic input (an image and ~60 text tokens, like a benchmark prompt) is answered by every run for
``--repeats`` rounds; the table gives medians: the measured prefill speedup, two ideals, decode time per token,
FLOPs (exact and FastV's convention), KV cache and the selection overhead (everything the method computes to
choose, plus the gather).

The ideals: from FLOPs (exact model FLOPs ratio), and *calibrated*: the unpruned model's own decoder layer
timed on this machine at every sequence length a run realises, summed over that run's layers. The FLOPs ideal
assumes every length runs at the same rate; the calibrated one does not, so measured / calibrated isolates the
method's own overheads (selection, gather, masks) from the hardware's lower rate on short sequences.
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
from llava.model.pruning import Segment, backend_mask
from pio import ReductionMethod, get_method, method_names
from pio.build import build_reducer
from pio.cli import add_method_args, flag_spelling, method_from_args

logger = logging.getLogger(__name__)

SHAPES: dict[str, dict[str, Any]] = {
    "llava-v1.5-7b": dict(arch="llava-v1.5", hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000,
                          vision="vit-l", image=(336, 336)),
    "llava-v1.6-7b": dict(arch="llava-v1.6", hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000,
                          vision="vit-l", image=(640, 480)),
    "tiny": dict(arch="llava-v1.5", hidden=64, intermediate=176, layers=4, heads=4, vocab=1000, vision="tiny",
                 image=(336, 336)),
    # Qwen2.5-VL-7B-Instruct at the PIO authors' resolution (min = max pixels = 1008^2: 1296 visual tokens)
    "qwen2.5-vl-7b": dict(arch="qwen2.5-vl", hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                          vocab=152064, vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                                    fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
                          image=(1008, 1008), pixels=1008 * 1008),
    "qwen-tiny": dict(arch="qwen2.5-vl", hidden=64, intermediate=176, layers=4, heads=4, kv_heads=2, vocab=1046,
                      vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                                  fullatt_block_indexes=[1, 3], window_size=56),
                      image=(336, 336), pixels=336 * 336),
}
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)  # Qwen2.5-VL's, inside the 7B vocabulary


def build_shape(name: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """A random-weight LLaVA of a named shape (vision tower included) and its image processor.

    Built on the meta device and filled from one random block (:func:`fill_random`), so a 7B shape takes
    seconds, not the minutes of a per-tensor random initialisation; the values only need to be generic.
    """
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.tiny import tiny_config, vision_config, write_vision_configs

    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}; allowed: {', '.join(SHAPES)}")
    s = SHAPES[name]
    if s["arch"] == "qwen2.5-vl":
        return build_qwen_shape(s, device, dtype)
    vcfg = vision_config(s["vision"])
    write_vision_configs(workdir / "vision_tower", vcfg)
    cfg = LlavaConfig(**tiny_config(
        s["arch"], s["vocab"], layers=s["layers"], hidden=s["hidden"], intermediate_size=s["intermediate"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], mm_hidden_size=vcfg.hidden_size,
        initializer_range=0.02, unfreeze_mm_vision_tower=True,  # build the tower inside the model, randomly
    ))
    cfg.mm_vision_tower = str(workdir / "vision_tower")
    with torch.device("meta"):
        model = LlavaLlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    fill_random(model, std=cfg.initializer_range, seed=0)
    model.requires_grad_(False).eval()
    return model, model.get_vision_tower().image_processor


def build_qwen_shape(s: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """A random-weight Qwen2.5-VL of shape ``s`` and its image processor at ``s["pixels"]``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessor

    from llava.model.language_model.qwen2_5_vl import Qwen2_5_VLForReduction
    from llava.model.tiny import CLIP_MEAN, CLIP_STD
    from llava.model.tiny_qwen import mrope_section

    head_dim = s["hidden"] // s["heads"]
    ids = {k: min(v, s["vocab"] - 4 + i) for i, (k, v) in enumerate(QWEN_IDS.items())}
    rope = {"type": "mrope", "mrope_section": mrope_section(head_dim)}
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                rope_scaling=rope, rope_theta=1e6, max_position_embeddings=128000, rms_norm_eps=1e-6,
                tie_word_embeddings=False, use_sliding_window=False)
    vision = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_chans=3,
                  out_hidden_size=s["hidden"], **s["vision"])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **text, **ids)
    with torch.device("meta"):
        model = Qwen2_5_VLForReduction._from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    fill_random(model, std=0.02, seed=0)
    model.requires_grad_(False).eval()
    proc = Qwen2VLImageProcessor(min_pixels=s["pixels"], max_pixels=s["pixels"], patch_size=14, temporal_patch_size=2,
                                 merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return model, proc


BLOCK = 1_000_003  # a prime: rows of any power-of-two width start at different offsets of the block


def fill_random(model: torch.nn.Module, std: float, seed: int) -> None:
    """Fill a model materialised with ``to_empty``: weights tile one N(0, std) block (each at its own offset),
    norm weights are 1, biases 0; the two non-persistent buffers (rotary frequencies, CLIP position ids) are
    recomputed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                block = (torch.randn(BLOCK, generator=gen) * std).to(p.device, p.dtype)
                flat, n = p.view(-1), p.numel()
                reps = -(-n // BLOCK)
                flat.copy_(block.roll(i * 7919).repeat(reps)[:n])
        for module in model.modules():
            if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
                inv_freq, _ = module.rope_init_fn(module.config, module.inv_freq.device)
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq = module.inv_freq.clone()
            if hasattr(module, "position_ids") and hasattr(module, "num_positions"):
                module.position_ids.copy_(torch.arange(module.num_positions, device=module.position_ids.device)[None])


def synthetic_input(model, proc, size: tuple[int, int], n_text: int = 60, seed: int = 0):
    """``(ids, pixels, sizes)``: random text ids with one image after a system-prompt-long prefix (LLaVA's
    placeholder; Qwen2.5-VL's vision tokens, one per merged patch) and a structured image."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([xx % 256, yy % 256, rng.integers(0, 256, size=(h, w))], -1).astype(np.uint8))
    if runner.is_qwen(cfg):
        out = proc(images=[img], return_tensors="pt")
        n = int(out["image_grid_thw"].prod()) // proc.merge_size**2
        special = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id)
        text = rng.integers(3, special, size=n_text - 1).tolist()
        image = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id]
        ids = [*text[:34], *image, *text[34:]]
        return torch.tensor([ids]), out["pixel_values"], out["image_grid_thw"]
    text = rng.integers(3, cfg.vocab_size, size=n_text - 1).tolist()
    ids = [1, *text[:34], IMAGE_TOKEN_INDEX, *text[34:]]
    return torch.tensor([ids]), process_images([img], proc, cfg), [img.size]


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


def methods_from_args(args: argparse.Namespace) -> list[ReductionMethod]:
    """``--methods a,b --budget B`` (each method at the paper budget B, with its defaults for the model family),
    or one method from the method flags."""
    family = args.family = "qwen2_5_vl" if _is_qwen_run(args) else None
    single = method_from_args(args) if not args.methods else None
    if args.methods:
        if args.budget is None:
            raise ValueError("--methods needs --budget (the paper's 64, 128 or 192)")
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        if names == ["all"]:
            names = method_names()
        out = []
        for n in names:  # a composition gives the paper's w/ VE row; --layers moves the in-LLM stages
            in_llm = "+" in n or get_method(n).where == "llm"
            options = {"budget": args.budget, "layers": args.layers if in_llm else None}
            out.append(build_reducer(n, options, family=family, spelling=flag_spelling()))
        return out
    if single is None:
        raise ValueError("give the methods to compare: --methods pio,fastv,... --budget 64, or one method's flags "
                         "(--method fastv --budget 64, --pio-layers 1,10,15 --pio-tokens 92,54,22, ...)")
    return [single]


def _is_qwen_run(args: argparse.Namespace) -> bool:
    if args.shape:
        return SHAPES.get(args.shape, {}).get("arch") == "qwen2.5-vl"
    from llava.model.builder import checkpoint_family

    path = os.path.expanduser(args.model_path)
    return checkpoint_family(path) == "qwen2_5_vl" if os.path.isdir(path) else "qwen2.5-vl" in path.lower()


def time_layer(model, n: int, repeats: int) -> float:
    """Median seconds of the model's first decoder layer on ``n`` tokens (prefill, causal, no cache)."""
    adapter = model.decoder_adapter()
    layer = adapter.layers[0]
    dev, dtype = model.device, model.dtype
    h = torch.randn(1, n, adapter.norm.weight.shape[0], generator=torch.Generator().manual_seed(n)).to(dev, dtype)
    key_mask = torch.ones(1, n, dtype=torch.bool, device=dev)
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
    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            _, model, proc, _ = load_pretrained_model(args.model_path, args.model_base, device=device,
                                                      torch_dtype=dtype, attn_implementation=args.attn_implementation)
            anyres = getattr(model.config, "image_aspect_ratio", "pad") == "anyres" or runner.is_qwen(model.config)
            size = (640, 480) if anyres else (336, 336)
        else:
            model, proc = build_shape(args.shape, device, dtype, Path(tmp))
            model.config._attn_implementation = args.attn_implementation
            size = SHAPES[args.shape]["image"]
    build_s = time.perf_counter() - t0
    logger.info("model ready in %.1f s", build_s)
    for m in methods:
        m.validate(runner.decoder_depth(model.config))
    ids, pixels, sizes = synthetic_input(model, proc, size)
    pixels = pixels.to(device, dtype)
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
    return {"machine": info, "shape": args.shape, "model_path": args.model_path, "dtype": dtype,
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
    lines.append(f"{result['shape'] or result['model_path']}, {result['dtype']}, {where}, torch {m['torch']}, "
                 f"median of {result['repeats']} alternating rounds, {result['max_new_tokens']} new tokens")
    for r in result["rows"][1:]:
        split = ", ".join(f"{k} {v:.3f}" for k, v in r["selection_split_s"].items())
        lines.append(f"- {r['run']}: selection split (s): {split or 'none'}")
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
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods to compare at --budget ({', '.join(method_names())}, or all); "
                        "--layers, if given, moves every method's stages")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip timing the decoder layer at each realised length (the calibrated ideal)")
    add_method_args(p)
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
    from llava.utils import cli

    cli(main)
