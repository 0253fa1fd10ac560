"""Qwen2.5-VL on video: our forward equals transformers' own on ``pixel_values_videos`` / ``video_grid_thw`` /
``second_per_grid_ts``, and every in-LLM method keeps the registry suite's invariants on the video's span
(naive reference, keep-all = unpruned, batch = single, cached decoding = recomputation); encoder-side methods
refuse videos in one line.

Clips are written by the tests (``llava.video.encode_video``) and read back through the project's own decoder and
the smart frame rule (Qwen2.5-VL's) at a small per-frame pixel budget, so spans stay a few hundred tokens on the tiny model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.eval import runner
from llava.model.families import get_family
from llava.model.language_model.qwen2_5_vl import QwenVisual
from llava.video import VideoSampling, encode_video, load_video
from pio import PruneState, Schedule, get_method, make_method
from tests.helpers import load
from tests.test_methods import CASES, NAMES, make, naive_run

# name -> (frames, (width, height), per-frame pixel budget): 8 and 16 frames, two sizes
VIDEOS = {"v8": (8, (96, 64), 112 * 168), "v16": (16, (64, 48), 112 * 112)}


def moving_frames(n: int, size: tuple[int, int], seed: int):
    """uint8 RGB (n, H, W, 3): a noisy background with a bright square moving right, so frames differ."""
    import numpy as np

    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3))
    frames = np.repeat(np.kron(base, np.ones((8, 8, 1)))[None, :h, :w], n, axis=0).astype(np.uint8)
    for k in range(n):
        x = (k * (w - 16)) // max(n - 1, 1)
        frames[k, h // 4:h // 4 + 16, x:x + 16] = (250, 240, 30)
    return frames


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    tok, model, proc, _ = load(tiny_qwen)
    return tok, model, proc


@pytest.fixture(scope="module")
def clips(tmp_path_factory, qwen):
    """name -> (frames, sample_fps) as the project reads the written clip (the smart rule, all frames). At 2 frames per
    second a temporal patch is 1 s: transformers 4.57.6 truncates seconds per patch to integers (docs/video-notes.md)."""
    root = tmp_path_factory.mktemp("vclips")
    out = {}
    for i, (name, (n, size, pixels)) in enumerate(VIDEOS.items()):
        path = encode_video(root / f"{name}.mp4", moving_frames(n, size, seed=i), fps=2)
        video = load_video(path, VideoSampling(num_frames=n, min_pixels=pixels, max_pixels=pixels))
        out[name] = (video.frames, video.sample_fps)
    return out


def video_input(qwen, clips, name, question="What moves in the video?"):
    """``(input_ids (1, T), {"images": QwenVisual})`` of one video question in Qwen's chat template."""
    tok, model, proc = qwen
    frames, fps = clips[name]
    prompt = runner.chat_prompt("<video>\n" + question, get_family("qwen2_5_vl").conv_mode)
    ids, visual, _ = get_family("qwen2_5_vl").encode_video(prompt, frames, fps, tok, proc, model.config)
    return ids, {"images": visual}


# ------------------------------------------------------------------------------------------ unpruned equivalence
def test_video_prompt_equals_the_chat_template(qwen, clips):
    tok, model, proc = qwen
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    template = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids, kw = video_input(qwen, clips, "v8", "What moves?")
    n = int(kw["images"].video_grid_thw.prod()) // 4
    assert int((ids == model.config.video_token_id).sum()) == n == 4 * 6 * 4  # 4 frame pairs of 12 x 8 patches
    text = tok.decode(ids[0]).replace("<|video_pad|>" * n, "<|video_pad|>")
    assert text == template


@pytest.mark.parametrize("name", list(VIDEOS))
def test_unpruned_video_equals_transformers(tiny_qwen, qwen, clips, name):
    """Prefill logits within 1e-5 (float32) of transformers' model fed the same video tensors, at the clip's
    own seconds per temporal patch and at fractional ones (4.57.6 truncates them: both sides must agree)."""
    _, ours, _ = qwen
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen, attn_implementation="sdpa").eval()
    ids, kw = video_input(qwen, clips, name)
    v = kw["images"]
    for seconds in (None, 0.5, 1.5, 2.0) if name == "v8" else (None,):
        times = v.second_per_grid_ts if seconds is None else torch.tensor([seconds])
        hf = dict(pixel_values_videos=v.pixel_values_videos, video_grid_thw=v.video_grid_thw,
                  second_per_grid_ts=times)
        with torch.no_grad():
            a = ref(input_ids=ids, **hf).logits
            b = ours(ids, **hf).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    # no repetition penalty: generating from embeddings (every family here) leaves the prompt's ids out of it
    gen = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, repetition_penalty=1.0)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, **hf, **gen)[:, ids.shape[1]:]
        got = ours.generate(ids, **hf, **gen)
    assert got.tolist() == want.tolist()


def test_video_positions_keep_time_through_a_prune(qwen, clips):
    """A pruned video keeps its kept tokens' (t, h, w) ids; the text after it keeps the unpruned ids."""
    tok, model, proc = qwen
    ids, kw = video_input(qwen, clips, "v16")
    full = model.prepare_multimodal_inputs(ids, None, kw["images"])
    (start, n), = full.spans[0]
    t = full.position_ids[0, 0, start:start + n]
    assert n == 8 * 4 * 5 and len(set(t.tolist())) == 8  # eight frame pairs of 8 x 10 patches: eight temporal ids
    method = make_method("pio", schedule=Schedule((1,), ratios=(0.25,)), family="qwen2_5_vl")
    st = PruneState()
    model(ids, **kw, reducer=method, prune_state=st)
    (stage,) = st.samples[0].stages
    assert stage.after == n // 4 and len({int(t[j]) for j in stage.kept}) > 1
    kept = model.prepare_multimodal_inputs(ids, None, kw["images"])
    assert torch.equal(kept.position_ids, full.position_ids)  # ids come from the full grid; the prune gathers them


# ------------------------------------------------------------------------------------------ the registry suite
@pytest.mark.parametrize("name", NAMES)
def test_video_kept_positions_equal_naive_reference(qwen, clips, name):
    tok, model, proc = qwen
    model.to(torch.float64)
    try:
        method = make(name, 0, "qwen2_5_vl")
        ids, kw = video_input(qwen, clips, "v16")  # 160 tokens: every method's first test schedule prunes
        v = kw["images"].to(dtype=torch.float64)
        mm = model.prepare_multimodal_inputs(ids, None, v)
        state = PruneState()
        state.set_inputs(mm.spans, mm.padding_side)
        model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
              reducer=method, prune_state=state)
        ours = [st.kept for st in state.samples[0].stages]
        ref, ref_merged = naive_run(model, mm.inputs_embeds, mm.spans[0][0], method, mm.position_ids)
        assert ours == ref and any(len(k) < mm.spans[0][0][1] for k in ours)
        merged = {layer: sel.merged[0] for layer, sel in state.selections.items() if sel.merged is not None}
        assert set(merged) == set(ref_merged)
        for layer, feats in merged.items():
            torch.testing.assert_close(feats, ref_merged[layer], atol=1e-9, rtol=1e-9)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_video_keep_all_batch_and_cached_decoding(qwen, clips, name):
    """Keep-all equals unpruned; a left-padded batch of the two videos equals each alone (kept tokens and
    generated text); pruned prefill plus cached decoding equals recomputation."""
    tok, model, proc = qwen
    schedule, options = CASES[name][0]
    keep_all = get_method(name)(Schedule(schedule.layers, tokens=(5000,) * len(schedule.layers)), **options)
    singles = [video_input(qwen, clips, v, q) for v, q in (("v8", "What moves?"), ("v16", "Which way does it go?"))]
    ids, kw = singles[1]
    assert torch.equal(model(ids, **kw, reducer=keep_all).logits, model(ids, **kw).logits)

    method = make(name, 0, "qwen2_5_vl")
    st = PruneState()
    out = model.generate(ids, **kw, do_sample=False, max_new_tokens=3, min_new_tokens=3, reducer=method,
                         prune_state=st, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0].tolist()
    assert st.stage_masks, "the method pruned nothing"
    for t in range(3):
        full = torch.cat([ids, torch.tensor([tokens[:t]], dtype=ids.dtype)], dim=1)
        logits = model(full, **kw, use_cache=False, reducer=method, prune_state=PruneState(forced=st.selections))
        torch.testing.assert_close(logits.logits[0, -1], out.logits[t][0], atol=2e-5, rtol=1e-4)

    alone = []
    for s, k in singles:
        st = PruneState()
        gen = model.generate(s, **k, do_sample=False, max_new_tokens=3, min_new_tokens=3, reducer=method,
                             prune_state=st)
        alone.append(([x.kept for x in st.samples[0].stages], gen[0].tolist()))
    width = max(s.shape[1] for s, _ in singles)
    batch_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, (s, _) in enumerate(singles):
        batch_ids[b, width - s.shape[1]:], mask[b, width - s.shape[1]:] = s[0], 1
    vs = [k["images"] for _, k in singles]
    both = QwenVisual(pixel_values_videos=torch.cat([v.pixel_values_videos for v in vs]),
                      video_grid_thw=torch.cat([v.video_grid_thw for v in vs]),
                      second_per_grid_ts=torch.cat([v.second_per_grid_ts for v in vs]))
    st = PruneState()
    gen = model.generate(batch_ids, attention_mask=mask, images=both, do_sample=False, max_new_tokens=3,
                         min_new_tokens=3, reducer=method, prune_state=st)
    assert [[x.kept for x in st.samples[b].stages] for b in range(2)] == [a[0] for a in alone]
    assert [g.tolist() for g in gen] == [a[1] for a in alone]


def test_encoder_side_methods_refuse_videos_in_one_line(qwen, clips):
    ids, kw = video_input(qwen, clips, "v8")
    with pytest.raises(ValueError, match=r"^divprune is an encoder-side method, which runs on Qwen2.5-VL's images "
                                         r"only; for videos use a method inside the language model") as err:
        qwen[1](ids, **kw, reducer=make_method("divprune", budget=32))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="LLaVA takes no video input in this codebase"):
        get_family("llava").encode_video("<video>\nx", clips["v8"][0], 4.0, None, None, None)


# ------------------------------------------------------------------------------------------ bench on video
def test_bench_on_a_video_shape():
    """``bench --video-frames``: the video's tokens (frames by the smart rule), budgets as the same share of them,
    the vision FLOPs of the video's grid, a smaller KV cache; a family without video refuses in one line."""
    from llava.eval import bench
    from pio.flops import qwen_vision_flops

    result = bench.main(["--shape", "qwen-tiny", "--video-frames", "4", "--video-size", "64x48", "--methods",
                         "pio,fastv", "--budget", "288,216", "--layers", "1", "--repeats", "1", "--warmup", "0",
                         "--max-new-tokens", "2", "--device", "cpu", "--no-calibrate"])
    base, pio, fastv, pio_half, fastv_half = result["rows"]  # each method at 288, then at 216 (of 576)
    grid = [2, 280 // 14, 392 // 14]  # 64x48 raised to Qwen's 128*28*28 minimum: 280x392, two frame pairs
    n = grid[0] * grid[1] * grid[2] // 4
    # half of 576 averaged over 4 layers, pruning after layer 1: (1 + 3 x) / 4 = 1 / 2, a third of the video kept
    assert base["visual_per_stage"] == [n] and pio["visual_per_stage"] == fastv["visual_per_stage"] == [n, n // 3]
    assert base["flops_vision"] == qwen_vision_flops([grid], 32, 64, 4, 64, [1, 3], 14, 2, 2, 56)["total"]
    assert pio_half["visual_per_stage"] == fastv_half["visual_per_stage"]  # (1 + 3 x) / 4 = 3 / 8: a sixth kept
    assert pio_half["visual_per_stage"][1] in (n // 6, n // 6 + 1)
    assert pio_half["kv_mb"] < pio["kv_mb"] < base["kv_mb"] and result["input"] == {"video_frames": 4, "video_size": "64x48"}
    with pytest.raises(ValueError, match="LLaVA takes no video input"):
        bench.main(["--shape", "tiny", "--video-frames", "4", "--method", "fastv", "--budget", "64", "--device",
                    "cpu"])


# ------------------------------------------------------------------------------------------ visualize on video
def test_visualize_draws_kept_tokens_on_a_strip_of_frames(tiny_qwen, qwen, tmp_path):
    """Every token's cell centre (worked out here from the strip's arrangement: one tile per frame pair, left to
    right) is lit in a panel exactly when that panel's stage kept the token."""
    import numpy as np

    from llava.eval import visualize

    path = encode_video(tmp_path / "clip.mp4", moving_frames(6, (64, 48), seed=5), fps=2)
    flags = ["--model-path", tiny_qwen, "--device", "cpu", "--video-file", str(path), "--num-frames", "6",
             "--video-min-pixels", "12544", "--video-max-pixels", "12544", "--methods", "pio@1/2,fastv@1",
             "--budget", "288", "--out", str(tmp_path / "fig.png")]
    args = visualize.build_parser().parse_args(flags)
    fig = visualize.make_figure(args, loaded=(*qwen, "qwen"))
    steps, rows, cols = 3, 112 // 28, 140 // 28  # 6 frames -> 3 pairs of 112x140 frames (12544 pixels, raised)
    fw, fh, gap = 140, 112, visualize.STRIP_GAP
    W = steps * fw + (steps - 1) * gap
    dw, dh = fig.size
    pixels = np.asarray(fig.image).astype(int)
    assert len(fig.panels) == 3 and {p.method for p in fig.panels} == {"pio", "fastv"}
    for panel in fig.panels:
        kept = set(panel.stage.kept.tolist())
        assert 0 < len(kept) < steps * rows * cols
        for k in range(steps):
            for r in range(rows):
                for c in range(cols):
                    x = (k * (fw + gap) + (c + 0.5) * fw / cols) * dw / W
                    y = (r + 0.5) * fh / rows * dh / fh
                    ox, oy = panel.origin
                    lit = pixels[oy + int(y), ox + int(x)]
                    ref = pixels[fig.input_origin[1] + int(y), fig.input_origin[0] + int(x)]
                    pos = k * rows * cols + r * cols + c
                    if pos in kept:
                        assert (lit == ref).all(), (panel.method, pos)
                    elif ref.sum() > 40:
                        assert lit.sum() < ref.sum(), (panel.method, pos)
