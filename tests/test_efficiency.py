"""Profiles, the efficiency table and the benchmark on tiny models (timings are printed, never asserted)."""

from __future__ import annotations

import json

import pytest

from llava.eval import bench, summarize
from pio.flops import LMDims, exact_prefill_flops, fastv_prefill_flops, kv_cache_bytes
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
        assert r["flops"]["proxy"] == 0 and r["flops"]["fastv"] == fastv_prefill_flops(n, dims)
    for r in recs_p:
        n = r["seq_len_per_layer"]
        text = n[0] - 576
        assert n == [576 + text, 92 + text, 22 + text, 22 + text]
        assert r["kv_bytes"]["measured"] == r["kv_bytes"]["analytic"] == kv_cache_bytes(n, dims, 4)
        assert r["flops"]["exact"] == exact_prefill_flops(n, dims)["total"]
        assert r["flops"]["proxy"] > 0
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
    assert "machine" in saved and "measured/ideal" in capsys.readouterr().out
    assert result["rows"][1]["kv_mb"] < result["rows"][0]["kv_mb"]
