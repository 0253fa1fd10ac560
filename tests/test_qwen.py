"""Qwen2.5-VL: our forward equals transformers' own model, prompts equal the checkpoint's chat template, and
each family refuses the other's options with one message."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.eval import runner
from pio import PruneState, Schedule, make_method
from pio.cli import method_from_args
from tests.helpers import encode, image, load


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return load(tiny_qwen)[:3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpruned_equals_transformers(tiny_qwen, attn):
    tok, ours, proc, _ = load(tiny_qwen, attn=attn)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen, attn_implementation=attn).eval()
    models = {"qwen": (tok, ours, proc)}
    for size in ((640, 427), (300, 500)):
        ids, kw = encode(models, "qwen", "What is in the image?", [image(*size, seed=size[0])])
        hf = {"pixel_values": kw["images"], "image_grid_thw": kw["image_sizes"]}
        with torch.no_grad():
            a = ref(input_ids=ids, **hf).logits
            b = ours(ids, **kw).logits
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        want = ref.generate(input_ids=ids, **hf, do_sample=False, max_new_tokens=6, min_new_tokens=6)[:, ids.shape[1]:]
        got = ours.generate(ids, **kw, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        assert got.tolist() == want.tolist()


def test_prompt_equals_the_chat_template(qwen):
    tok, model, proc = qwen
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]}]
    template = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert runner.chat_prompt("<image>\nIs there a dog?", runner.QWEN_CONV_MODE).replace(
        "<image>\n", runner.QWEN_IMAGE) == template
    img = image(500, 400, seed=3)
    ids, px, grid = runner.encode(runner.chat_prompt("<image>\nIs there a dog?", runner.QWEN_CONV_MODE), [img], tok,
                                  proc, model.config)
    n_pad = int((ids == model.config.image_token_id).sum())
    assert n_pad == int(grid.prod()) // 4 and n_pad > 4
    assert px.shape[0] == int(grid.prod())


def test_reduced_generation_keeps_qwen_positions(qwen):
    tok, model, proc = qwen
    models = {"qwen": qwen}
    ids, kw = encode(models, "qwen", "Describe the picture.", [image(640, 480, seed=4)])
    st = PruneState()
    method = make_method("pio", budget=192, layers=(1, 2), family="qwen2_5_vl")
    assert method.proxy == "current" and method.positions == "original"
    out = model.generate(ids, **kw, reducer=method, prune_state=st, do_sample=False, max_new_tokens=3)
    assert out.shape[1] == 3
    n0 = st.samples[0].n_visual
    assert [s.after for s in st.samples[0].stages] == method.counts(n0, 4)


def _args(**kw):
    p = argparse.ArgumentParser()
    runner.add_common_args(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k.replace('_', '-')}"
                         for k, v in kw.items()])


def test_each_family_refuses_the_other_ones_options(tiny_qwen, tiny_v15):
    with pytest.raises(ValueError, match="Qwen2.5-VL checkpoint: it builds prompts with its own chat template"):
        runner.check_args(_args(model_path=tiny_qwen, conv_mode="vicuna_v1"))
    with pytest.raises(ValueError, match="--model-base applies to LLaVA"):
        runner.check_args(_args(model_path=tiny_qwen, model_base="x"))
    with pytest.raises(ValueError, match="--min-pixels applies to Qwen2.5-VL"):
        runner.check_args(_args(model_path=tiny_v15, min_pixels=1000))
    with pytest.raises(ValueError, match="is Qwen2.5-VL's chat template"):
        runner.check_args(_args(model_path=tiny_v15, conv_mode="qwen2_5_vl"))
    args = _args(model_path=tiny_qwen, method="pio", budget=64)
    runner.resolve_family_args(args)
    method = method_from_args(args)  # the authors' Qwen defaults (the 4-layer tiny model cannot run them)
    assert args.conv_mode == runner.QWEN_CONV_MODE
    assert (method.layers, method.proxy, method.positions) == ((1, 8, 14), "current", "original")
    assert runner.check_args(_args(model_path=tiny_qwen, method="pdrop", tokens=30, layers=2)).positions == "original"


def test_encoder_side_on_qwen(qwen):
    """DivPrune (projected features only) runs on Qwen's merged tokens, equals the naive reference, and the
    language model then sees the kept tokens with their own M-RoPE ids; a composition prunes further."""
    from llava.model.encoder_stage import reduce_image_features
    from pio.encoder import Pipeline
    from tests.test_methods import naive_divprune

    tok, model, proc = qwen
    ids, kw = encode({"qwen": qwen}, "qwen", "What is it?", [image(500, 400, seed=9)])
    feats = model.model.get_image_features(kw["images"], kw["image_sizes"])[0]
    method = make_method("divprune", budget=64)
    target = method.target(feats.shape[0])
    red = reduce_image_features(method, [feats], [(1, 1)])[0]
    keep, *_ = naive_divprune({"features": feats[None]}, 0, method, target)
    assert red.mask.nonzero().flatten().tolist() == keep
    mm = model.prepare_multimodal_inputs(ids, None, kw["images"], kw["image_sizes"], pre=method)
    full = model.prepare_multimodal_inputs(ids, None, kw["images"], kw["image_sizes"])
    (start, length), = mm.spans[0]
    assert length == target and [[e.n for e in r] for r in mm.encoder] == [[feats.shape[0]]]
    kept_ids = full.position_ids[:, 0, start + torch.tensor(keep)]
    assert torch.equal(mm.position_ids[:, 0, start:start + length], kept_ids)
    assert int(mm.rope_deltas) == int(full.position_ids.max()) + 1 - mm.inputs_embeds.shape[1]
    st = PruneState()
    pipe = Pipeline(method, make_method("pio", schedule=Schedule((2,), tokens=(5,)),
                                        family="qwen2_5_vl"))
    model.generate(ids, **kw, reducer=pipe, prune_state=st, do_sample=False, max_new_tokens=2)
    rec = st.samples[0]
    assert (rec.n_encoder, rec.n_visual, [s.after for s in rec.stages]) == (feats.shape[0], target, [5])
    with pytest.raises(ValueError, match="visionzip needs the CLS attention"):
        model(ids, **kw, reducer=make_method("visionzip", budget=64))


def naive_qwen_scan(model, pixels, grid, method, target):
    """The authors' Qwen scan the plain way: every vision block's input caught, full softmax attention matrices
    per image with transformers' own vision rotary, Python loops for windows and merging."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual
    caught = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, kw, i=i: caught.__setitem__(i, (a[0], kw)), with_kwargs=True)
             for i, b in enumerate(visual.blocks)]
    try:
        feats = model.model.get_image_features(pixels, grid)[0]
    finally:
        for h in hooks:
            h.remove()
    window_index, _ = visual.get_window_index(grid)

    def received(layer):
        h, kw = caught[layer % len(visual.blocks)]
        block = visual.blocks[layer % len(visual.blocks)]
        S = h.shape[0]
        q, k, _ = block.attn.qkv(block.norm1(h)).reshape(S, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *kw["position_embeddings"])
        p = torch.softmax(torch.einsum("shd,thd->hst", q.float(), k.float()) / q.shape[-1] ** 0.5, dim=-1)
        per_patch = p.sum(0).mean(0)  # one image: one attention group
        in_window_order = [float(per_patch[4 * i:4 * i + 4].mean()) for i in range(S // 4)]
        raster = [0.0] * (S // 4)
        for i, w in enumerate(window_index.tolist()):
            raster[w] = in_window_order[i]
        return raster

    local_a = received(visual.fullatt_block_indexes[0])
    global_a = received(-1)
    rows, cols = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    nh, nw = max(1, rows // 4), max(1, cols // 4)
    window = [min(r // 4, nh - 1) * nw + min(c // 4, nw - 1) for r in range(rows) for c in range(cols)]
    n_local = target // 2
    cap = -(-n_local // (nh * nw))
    local, count = [], {}
    for t in sorted(range(rows * cols), key=lambda t: (-local_a[t], t)):
        if len(local) < n_local and count.get(window[t], 0) < cap:
            local.append(t)
            count[window[t]] = count.get(window[t], 0) + 1
    others = sorted((t for t in range(rows * cols) if t not in local), key=lambda t: (-global_a[t], t))
    keep = sorted(local + others[: target - n_local])
    fn = torch.nn.functional.normalize(feats.float(), dim=-1)
    groups = {k: [k] for k in keep}
    for t in range(rows * cols):
        if t not in groups:
            groups[max(keep, key=lambda k: (float(fn[t] @ fn[k]), -k))].append(t)
    return keep, torch.stack([feats[groups[k]].float().mean(0) for k in keep])


@pytest.mark.parametrize("size", [(500, 400), (300, 640)])
def test_authors_qwen_scan_equals_naive_reference(qwen, size):
    from pio.methods.scan import Scan

    tok, model, proc = qwen
    ids, kw = encode({"qwen": qwen}, "qwen", "What is it?", [image(*size, seed=size[1])])
    method = Scan(tokens=96)
    n = int(kw["image_sizes"].prod()) // 4
    target = method.target(n)
    keep, merged = naive_qwen_scan(model, kw["images"], kw["image_sizes"], method, target)
    mm = model.prepare_multimodal_inputs(ids, None, kw["images"], kw["image_sizes"], pre=method, state=PruneState())
    (start, length), = mm.spans[0]
    assert length == target == len(keep) and n > target
    torch.testing.assert_close(mm.inputs_embeds[0, start:start + length].float(), merged, atol=1e-5, rtol=1e-5)
    full = model.prepare_multimodal_inputs(ids, None, kw["images"], kw["image_sizes"])
    assert torch.equal(mm.position_ids[:, 0, start:start + length], full.position_ids[:, 0, start + torch.tensor(keep)])
