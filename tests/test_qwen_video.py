"""Video on the families that take it. Qwen2.5-VL: our forward equals transformers' own on ``pixel_values_videos`` /
``video_grid_thw`` / ``second_per_grid_ts``. Every video family (Qwen2.5-VL, LLaVA-OneVision): every in-LLM method
keeps the registry suite's invariants on the video's span (naive reference, keep-all = unpruned, batch = single,
cached decoding = recomputation); encoder-side methods refuse videos in one line. (LLaVA-OneVision's equivalence
with transformers: tests/test_onevision.py.)

Clips are written by the tests (``llava.video.encode_video``) and read back through the project's own decoder and
each family's frame rule: Qwen2.5-VL's smart rule at a small per-frame pixel budget, OneVision's uniform rule on its
tiny checkpoint with 48-px patches (16 tokens a frame), so spans stay a few hundred tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.eval import runner
from llava.model.families import get_family, variants
from llava.model.language_model.llava_onevision import OnevisionVideos
from llava.video import VideoSampling, encode_video, load_video
from pio import PruneState, Schedule, get_method, make_method
from tests.helpers import load
from tests.test_methods import CASES, NAMES, make, naive_run

# name -> (frames, (width, height), per-frame pixel budget of the smart rule): 8 and 16 frames, two sizes
VIDEOS = {"v8": (8, (96, 64), 112 * 168), "v16": (16, (64, 48), 112 * 112)}
VIDEO_VARIANTS = [v for v, f in variants().items() if f.video_rule]  # the registry's video families' variants


def sampling(variant: str, n: int, pixels: int) -> VideoSampling:
    """All ``n`` frames by the variant's family's rule (the smart rule at ``pixels`` per frame)."""
    rule = variants()[variant].video_rule
    return VideoSampling(rule, num_frames=n) if rule == "uniform" else VideoSampling(num_frames=n, min_pixels=pixels,
                                                                                      max_pixels=pixels)


def join_videos(visuals: list) -> object:
    """One call's visual inputs holding several questions' videos, in order (the bundle's own ``join``), checked
    against the bundle's fields written out."""
    both = type(visuals[0]).join(visuals)
    if isinstance(visuals[0], OnevisionVideos):
        assert [f.shape[0] for f in both.frames] == [v.frames[0].shape[0] for v in visuals]
    else:
        assert both.pixel_values is None and both.image_grid_thw is None
        for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            assert torch.equal(getattr(both, k), torch.cat([getattr(v, k) for v in visuals])), k
    return both


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


class _Loaded(dict):
    """``{variant: (tokenizer, model, processor)}`` of the tiny checkpoints, each loaded when first asked for."""

    def __init__(self, checkpoints):
        super().__init__()
        self.checkpoints = checkpoints

    def __missing__(self, variant: str):
        self[variant] = load(self.checkpoints[variant])[:3]
        return self[variant]


@pytest.fixture(scope="module")
def vmodels(tiny_checkpoints) -> _Loaded:
    return _Loaded(tiny_checkpoints)


@pytest.fixture(scope="module")
def qwen(vmodels):
    return vmodels["qwen2_5_vl"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vclips")
    return {name: encode_video(root / f"{name}.mp4", moving_frames(n, size, seed=i), fps=2)
            for i, (name, (n, size, _)) in enumerate(VIDEOS.items())}


@pytest.fixture(scope="module")
def vclips(clip_files) -> dict:
    """variant -> name -> (frames, sample_fps) as the project reads the written clip (the family's rule, all
    frames). At 2 frames per second a temporal patch is 1 s: transformers 4.57.6 truncates seconds per patch to
    integers (docs/video-notes.md)."""
    out = {}
    for variant in VIDEO_VARIANTS:
        read = [load_video(clip_files[name], sampling(variant, n, px)) for name, (n, _, px) in VIDEOS.items()]
        out[variant] = {name: (v.frames, v.sample_fps) for name, v in zip(VIDEOS, read, strict=True)}
    return out


@pytest.fixture(scope="module")
def clips(vclips) -> dict:
    return vclips["qwen2_5_vl"]


def video_input(loaded, clips, name, question="What moves in the video?", variant="qwen2_5_vl"):
    """``(input_ids (1, T), {"images": visual inputs})`` of one video question in the family's chat template."""
    tok, model, proc = loaded
    frames, fps = clips[name]
    family = variants()[variant]
    prompt = runner.chat_prompt("<video>\n" + question, family.conv_mode)
    ids, visual, _ = family.encode_video(prompt, frames, fps, tok, proc, model.config)
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
@pytest.mark.parametrize("variant", VIDEO_VARIANTS)
@pytest.mark.parametrize("name", NAMES)
def test_video_kept_positions_equal_naive_reference(vmodels, vclips, name, variant):
    tok, model, proc = loaded = vmodels[variant]
    model.to(torch.float64)
    try:
        method = make(name, 0, variant)
        ids, kw = video_input(loaded, vclips[variant], "v16", variant=variant)  # every first test schedule prunes
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


@pytest.mark.parametrize("variant", VIDEO_VARIANTS)
@pytest.mark.parametrize("name", NAMES)
def test_video_keep_all_batch_and_cached_decoding(vmodels, vclips, name, variant):
    """Keep-all equals unpruned; a left-padded batch of the two videos equals each alone (kept tokens and
    generated text); pruned prefill plus cached decoding equals recomputation."""
    tok, model, proc = loaded = vmodels[variant]
    schedule, options = CASES[name][0]
    keep_all = get_method(name)(Schedule(schedule.layers, tokens=(5000,) * len(schedule.layers)), **options)
    singles = [video_input(loaded, vclips[variant], v, q, variant)
               for v, q in (("v8", "What moves?"), ("v16", "Which way does it go?"))]
    ids, kw = singles[1]
    assert torch.equal(model(ids, **kw, reducer=keep_all).logits, model(ids, **kw).logits)

    method = make(name, 0, variant)
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
    st = PruneState()
    gen = model.generate(batch_ids, attention_mask=mask, images=join_videos([k["images"] for _, k in singles]),
                         do_sample=False, max_new_tokens=3, min_new_tokens=3, reducer=method, prune_state=st)
    assert [[x.kept for x in st.samples[b].stages] for b in range(2)] == [a[0] for a in alone]
    assert [g.tolist() for g in gen] == [a[1] for a in alone]


@pytest.mark.parametrize("variant", VIDEO_VARIANTS)
def test_encoder_side_methods_refuse_videos_in_one_line(vmodels, vclips, variant):
    ids, kw = video_input(vmodels[variant], vclips[variant], "v8", variant=variant)
    title = variants()[variant].title
    with pytest.raises(ValueError, match=rf"^divprune is an encoder-side method, which runs on {title}'s images "
                                         r"only; for videos use a method inside the language model") as err:
        vmodels[variant][1](ids, **kw, reducer=make_method("divprune", budget=32))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="LLaVA takes no video input in this codebase"):
        get_family("llava").encode_video("<video>\nx", vclips[variant]["v8"][0], 4.0, None, None, None)


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


def test_bench_on_a_onevision_video_shape():
    """``bench --shape onevision-tiny --video-frames``: every frame one pooled 14 x 14 view (real geometry) and the
    video's newline, the budget as the same share of them, the tower's FLOPs on every frame, a smaller KV cache."""
    from llava.eval import bench
    from pio.flops import clip_vision_flops, projector_flops

    result = bench.main(["--shape", "onevision-tiny", "--video-frames", "2", "--video-size", "64x48", "--methods",
                         "pio,fastv", "--budget", "288", "--layers", "1", "--repeats", "1", "--warmup", "0",
                         "--max-new-tokens", "2", "--device", "cpu", "--no-calibrate"])
    base, pio, fastv = result["rows"]
    n = 2 * 196 + 1
    # half of 576 averaged over 28 layers, pruning after layer 1: (1 + 27 x) / 28 = 1 / 2, x = 13 / 27 of the video
    assert base["visual_per_stage"] == [n] and pio["visual_per_stage"] == fastv["visual_per_stage"]
    assert pio["visual_per_stage"][0] == n and abs(pio["visual_per_stage"][1] - n * 13 / 27) <= 1
    want = clip_vision_flops(384, 14, 32, 64, 2, 2, cls_token=False)["total"] + projector_flops(2 * 729, 32, 64,
                                                                                                "mlp2x_gelu")
    assert base["flops_vision"] == want
    assert pio["kv_mb"] < base["kv_mb"] and result["input"] == {"video_frames": 2, "video_size": "64x48"}


# ------------------------------------------------------------------------------------------ visualize on video
# variant -> (frame flags, (steps, rows, cols, trailing), tile (width, height)) of a 6-frame 64x48 clip
STRIPS = {"qwen2_5_vl": (["--video-min-pixels", "12544", "--video-max-pixels", "12544"], (3, 112 // 28, 140 // 28, 0),
                         (140, 112)),  # 3 pairs of 112x140 frames (12544 pixels, raised)
          "llava-onevision": ([], (6, 4, 4, 1), (64, 48))}  # 6 frames of 4 x 4 pooled tokens, then the newline


@pytest.mark.parametrize("variant", VIDEO_VARIANTS)
def test_visualize_draws_kept_tokens_on_a_strip_of_frames(tiny_checkpoints, vmodels, tmp_path, variant):
    """Every token's cell centre (worked out here from the strip's arrangement: one tile per step, left to
    right) is lit in a panel exactly when that panel's stage kept the token."""
    import numpy as np

    from llava.eval import visualize

    path = encode_video(tmp_path / "clip.mp4", moving_frames(6, (64, 48), seed=5), fps=2)
    extra, (steps, rows, cols, trailing), (fw, fh) = STRIPS[variant]
    flags = ["--model-path", tiny_checkpoints[variant], "--device", "cpu", "--video-file", str(path),
             "--num-frames", "6", *extra, "--methods", "pio@1/2,fastv@1", "--budget", "288", "--out",
             str(tmp_path / "fig.png")]
    args = visualize.build_parser().parse_args(flags)
    fig = visualize.make_figure(args, loaded=(*vmodels[variant], variant))
    gap = visualize.STRIP_GAP  # make_figure checks the layout's count (steps x rows x cols + trailing) against the log
    W = steps * fw + (steps - 1) * gap
    dw, dh = fig.size
    pixels = np.asarray(fig.image).astype(int)
    assert len(fig.panels) == 3 and {p.method for p in fig.panels} == {"pio", "fastv"}
    for panel in fig.panels:
        kept = set(panel.stage.kept.tolist())
        drawn = kept - set(range(steps * rows * cols, steps * rows * cols + trailing))  # the newline has no tile
        assert 0 < len(drawn) < steps * rows * cols
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
