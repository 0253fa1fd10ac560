"""Qwen2.5-VL: our forward equals transformers' own model, prompts equal the checkpoint's chat template, and
each family refuses the other's options with one message."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.eval import runner
from llava.model.family_qwen2_5_vl import QWEN_CONV_MODE, QWEN_IMAGE
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
    models = {"qwen2_5_vl": (tok, ours, proc)}
    for size in ((640, 427), (300, 500)):
        ids, kw = encode(models, "qwen2_5_vl", "What is in the image?", [image(*size, seed=size[0])])
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
    assert runner.chat_prompt("<image>\nIs there a dog?", QWEN_CONV_MODE).replace(
        "<image>\n", QWEN_IMAGE) == template
    img = image(500, 400, seed=3)
    ids, px, grid = runner.encode(runner.chat_prompt("<image>\nIs there a dog?", QWEN_CONV_MODE), [img], tok,
                                  proc, model.config)
    n_pad = int((ids == model.config.image_token_id).sum())
    assert n_pad == int(grid.prod()) // 4 and n_pad > 4
    assert px.shape[0] == int(grid.prod())


def test_reduced_generation_keeps_qwen_positions(qwen):
    tok, model, proc = qwen
    models = {"qwen2_5_vl": qwen}
    ids, kw = encode(models, "qwen2_5_vl", "Describe the picture.", [image(640, 480, seed=4)])
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
    assert args.conv_mode == QWEN_CONV_MODE
    assert (method.layers, method.proxy, method.positions) == ((1, 8, 14), "current", "original")
    assert runner.check_args(_args(model_path=tiny_qwen, method="pdrop", tokens=30, layers=2)).positions == "original"


def test_encoder_side_on_qwen(qwen):
    """DivPrune (projected features only) runs on Qwen's merged tokens, equals the naive reference, and the
    language model then sees the kept tokens with their own M-RoPE ids; a composition prunes further."""
    from llava.model.encoder_stage import reduce_crops
    from llava.model.language_model.qwen2_5_vl import QwenImageTower
    from pio.encoder import Pipeline
    from tests.test_methods import naive_divprune

    tok, model, proc = qwen
    ids, kw = encode({"qwen2_5_vl": qwen}, "qwen2_5_vl", "What is it?", [image(500, 400, seed=9)])
    feats = model.model.get_image_features(kw["images"], kw["image_sizes"])[0]
    method = make_method("divprune", budget=64)
    target = method.target(feats.shape[0])
    (red,) = reduce_crops(method, QwenImageTower(model.model.visual, (1, 1), 0, None), feats[None], [(0, 0)])
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
    """The authors' Qwen scan the plain way (the encoder-side suite's reference for a tower without a CLS token:
    every vision block's input caught, full softmax attention per image, Python loops for windows and merging)."""
    from tests.test_methods import naive_received_scan, naive_received_views

    keep, merged, _, _ = naive_received_scan(naive_received_views(model, pixels, grid), 0, method, target)
    return keep, merged.float()


@pytest.mark.parametrize("size", [(500, 400), (300, 640)])
def test_authors_qwen_scan_equals_naive_reference(qwen, size):
    from pio.methods.scan import Scan

    tok, model, proc = qwen
    ids, kw = encode({"qwen2_5_vl": qwen}, "qwen2_5_vl", "What is it?", [image(*size, seed=size[1])])
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
