"""Profiles, the efficiency table and the benchmark on tiny models (timings are printed, never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from llava.eval import bench, summarize
from pio.flops import LMDims, exact_prefill_flops, fastv_prefill_flops, kv_cache_bytes, proxy_flops
from tests.test_runners import questions, run_loader  # noqa: F401 (fixture)


def test_profiled_runs_and_efficiency_table(tiny_v15, questions, capsys):  # noqa: F811
    qdir, qfile, lines = questions
    base, pio = qdir / "base.jsonl", qdir / "pio.jsonl"
    run_loader(tiny_v15, qdir, qfile, qdir / "a0.jsonl", "--profile", str(base))
    run_loader(tiny_v15, qdir, qfile, qdir / "a1.jsonl", "--profile", str(pio), "--pio-layers", "1,2",
               "--pio-tokens", "92,22")
    recs_b = [json.loads(x) for x in base.read_text().splitlines()]
    recs_p = [json.loads(x) for x in pio.read_text().splitlines()]
    assert len(recs_b) == len(recs_p) == len(lines)
    from transformers import AutoConfig

    import llava.model  # noqa: F401 (registers llava_llama)

    dims = LMDims.from_config(AutoConfig.from_pretrained(tiny_v15))
    for r in recs_b:
        n = r["seq_len_per_layer"]
        assert len(set(n)) == 1 and n[0] > 576
        assert r["kv_bytes"]["measured"] == r["kv_bytes"]["analytic"] == kv_cache_bytes(n, dims, 4)
        assert r["flops"]["selection"] == 0 and r["flops"]["fastv"] == fastv_prefill_flops(n, dims)
    for r in recs_p:
        n = r["seq_len_per_layer"]
        text = n[0] - 576
        assert n == [576 + text, 92 + text, 22 + text, 22 + text]
        assert r["kv_bytes"]["measured"] == r["kv_bytes"]["analytic"] == kv_cache_bytes(n, dims, 4)
        assert r["flops"]["exact"] == exact_prefill_flops(n, dims)["total"]
        assert r["flops"]["selection"] == 2 * proxy_flops(n[0], 4, dims, sliced=True)["total"] or \
            r["flops"]["selection"] == proxy_flops(n[0], 4, dims, True)["total"] + proxy_flops(n[1], 4, dims, True)["total"]
        assert set(r["selection_s"]) == {"proxy_forward", "proxy_backward", "nms", "gather"}
        assert r["prefill_s"] > 0 and r["decode_s"] >= 0 and r["new_tokens"] >= 1
    summarize.main(["--profile", f"base={base}", "--profile", f"pio={pio}"])
    table = capsys.readouterr().out
    n = len(lines)
    assert f"| base (baseline) | {n} |" in table and f"| pio | {n} |" in table
    kv_ratio = recs_b[0]["kv_bytes"]["measured"] / recs_p[0]["kv_bytes"]["measured"]
    assert f"({kv_ratio:.2f}x)" in table


def test_bench_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--shape", "tiny", "--pio-layers", "1,2", "--pio-tokens", "92,22", "--repeats", "1",
                         "--warmup", "0", "--max-new-tokens", "3", "--json", str(out), "--device", "cpu"])
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["run"] == "unpruned" and len(saved["rows"]) == 2
    pruned = saved["rows"][1]
    assert pruned["seq_len_per_layer"][1] == pruned["seq_len_per_layer"][0] - 576 + 92
    assert pruned["ideal_speedup"] == pytest.approx(saved["rows"][0]["flops_exact"] / pruned["flops_exact"])
    assert pruned["selection_s"] == pytest.approx(sum(pruned["selection_split_s"].values()), rel=1e-6)
    assert pruned["selection_split_s"]["proxy_backward"] > 0 == saved["rows"][0]["selection_s"]
    # the calibrated ideal: the unpruned layer's time at each realised length, summed over the run's layers
    layer_s = {int(n): t for n, t in saved["layer_time_s"].items()}
    assert set(layer_s) == set(pruned["seq_len_per_layer"]) | set(saved["rows"][0]["seq_len_per_layer"])
    assert pruned["calibrated_prefill_s"] == pytest.approx(sum(layer_s[n] for n in pruned["seq_len_per_layer"]))
    assert pruned["ideal_speedup_calibrated"] == pytest.approx(
        saved["rows"][0]["calibrated_prefill_s"] / pruned["calibrated_prefill_s"])
    assert "machine" in saved and "measured/calibrated" in capsys.readouterr().out
    assert result["rows"][1]["kv_mb"] < result["rows"][0]["kv_mb"]


def test_bench_throughput_at_batch_sizes(tmp_path, capsys):
    """--batch-size: questions per second per (run, batch size), the answers compared with batch size 1, and one
    decoder layer's tokens per second at the question's full and average lengths and at one token per batch size
    (what the hardware gains from batching at all)."""
    out = tmp_path / "throughput.json"
    bench.main(["--shape", "tiny", "--pio-layers", "1,2", "--pio-tokens", "24,12", "--batch-size", "1,3",
                "--questions", "3", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--device", "cpu",
                "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["run"], r["batch_size"]) for r in saved["rows"]] == [("pio", 1), ("pio", 3), ("unpruned", 1),
                                                                    ("unpruned", 3)]
    assert all(r["same_answers"] == r["questions"] == 3 and r["questions_per_s"] > 0 for r in saved["rows"])
    lengths = sorted({r["tokens"] for r in saved["layer_rates"]}, reverse=True)
    assert len(lengths) == 3 and lengths[0] > lengths[1] > lengths[2] == 1  # all, the average over layers, one
    assert {(r["tokens"], r["batch_size"]) for r in saved["layer_rates"]} == {(n, b) for n in lengths for b in (1, 3)}
    assert all(r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["tokens"] / r["seconds"])
               for r in saved["layer_rates"])
    assert isinstance(saved["machine"]["cpu_bf16"], list)
    assert "| decoder layer: tokens per sequence |" in capsys.readouterr().out


def test_bench_every_method_side_by_side(capsys):
    """--methods runs each method at one budget in one alternating run (the 4-layer shape: every method after
    layer 2, at a budget that depth can reach)."""
    result = bench.main(["--shape", "tiny", "--methods", "fastv,dart,random", "--budget", "384", "--layers", "2",
                         "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--device", "cpu",
                         "--no-calibrate"])
    runs = [r["run"] for r in result["rows"]]
    assert runs[0] == "unpruned" and [r.split(":")[0] for r in runs[1:]] == ["fastv", "dart", "random"]
    for r in result["rows"][1:]:
        assert r["seq_len_per_layer"][2] < r["seq_len_per_layer"][0]
    fastv, dart = result["rows"][1], result["rows"][2]
    assert fastv["flops_selection"] > 0 and dart["flops_selection"] > 0  # attention rows, keys
    assert "ideal (calibrated)" not in capsys.readouterr().out


def test_bench_qwen_shape():
    """The Qwen2.5-VL shapes: its image tokens, its methods' family defaults, vision FLOPs counted, GQA KV cache."""
    result = bench.main(["--shape", "qwen-tiny", "--methods", "pio,fastv", "--budget", "300", "--layers", "1",
                         "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--device", "cpu"])
    base, pio, fastv = result["rows"]
    n = base["visual_per_stage"][0]
    assert n == (336 // 28) ** 2 and pio["visual_per_stage"][0] == n > pio["visual_per_stage"][1]
    assert fastv["visual_per_stage"] == pio["visual_per_stage"]  # one stage after layer 1, the same counts
    assert base["flops_vision"] > 0 and pio["flops_selection"] > fastv["flops_selection"] > 0
    assert pio["kv_mb"] < base["kv_mb"] and "ideal_speedup_calibrated" in pio


@pytest.mark.slow
def test_bench_onevision_shape():
    """The LLaVA-OneVision shapes (the 7B depth): 2929 visual tokens for the 640 x 480 image, FastV at its OneVision
    layer, VFlowOpt's published preset (encoder stage, then after layers 9 and 18), SigLIP's FLOPs counted."""
    result = bench.main(["--shape", "onevision-tiny", "--methods", "fastv,vflowopt_vit+vflowopt", "--budget", "64",
                         "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--device", "cpu",
                         "--no-calibrate"])
    base, fastv, vflowopt = result["rows"]
    assert base["visual_per_stage"] == [2929] and fastv["visual_per_stage"][0] == 2929
    assert fastv["seq_len_per_layer"][1] > fastv["seq_len_per_layer"][2]  # pruned after layer 2
    assert vflowopt["visual_per_stage"][0] == 2929 > vflowopt["visual_per_stage"][1]  # the encoder stage
    assert base["flops_vision"] > 0 and vflowopt["kv_mb"] < base["kv_mb"] and fastv["kv_mb"] < base["kv_mb"]


def test_fast_random_weights_are_generic(tmp_path):
    model, _ = bench.build_shape("tiny", torch.device("cpu"), torch.float32, tmp_path)
    w = model.get_model().layers[0].self_attn.q_proj.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.1) and len(set(w[:, 0].tolist())) > w.shape[0] // 2
    assert torch.equal(model.get_model().norm.weight, torch.ones_like(model.get_model().norm.weight))
    rope = model.get_model().rotary_emb
    assert torch.allclose(rope.inv_freq, rope.rope_init_fn(rope.config, "cpu")[0])
    emb = model.get_vision_tower().vision_tower.vision_model.embeddings
    assert emb.position_ids.tolist() == [list(range(emb.num_positions))]
