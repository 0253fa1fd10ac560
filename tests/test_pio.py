"""PIO inside the model: against a naive reference, keep-all identity, cached decoding, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pio import PIOConfig, PruneState, Schedule
from tests.helpers import image, load, pixels, prompt_ids


@pytest.fixture(scope="module")
def models(tiny_v15, tiny_v16):
    out = {}
    for name, path in (("v15", tiny_v15), ("v16", tiny_v16)):
        tok, model, proc, _ = load(path)
        out[name] = (tok, model, proc)
    return out


def naive_reference(model, embeds, span, cfg: PIOConfig):
    """Straightforward PIO on one unpadded sample: full-vocabulary head over all positions, a Python NMS loop,
    the authors' row rule on shifted logits, and explicit slicing of every tensor."""
    lm = model.get_model()
    L = model.config.num_hidden_layers
    start, length = span
    orig = list(range(length))
    counts = cfg.schedule.counts(length, L)
    h = embeds
    kept_log = []
    for i, layer in enumerate(lm.layers):
        S = h.shape[1]
        pos = torch.arange(S)[None]
        pe = lm.rotary_emb(h, pos)
        mask = torch.full((S, S), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        rank = i + 1
        if rank not in cfg.schedule.layers:
            continue
        k = counts[cfg.schedule.layers.index(rank)]
        if k >= length:
            continue
        proxy = lm.layers[rank] if cfg.proxy == "next" else lm.layers[rank - 1]
        with torch.enable_grad():
            x = h.detach().clone().requires_grad_(True)
            y = proxy(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            logits = model.lm_head(lm.norm(y))[0]  # (S, V): every position, full vocabulary
            if cfg.include_last:
                rows = sorted({max(S - 1 - t, 0) for t in range(cfg.k_pos)})
                sel = logits[rows]
            else:
                shift = logits[:-1]
                valid_len = S - 1
                rows = sorted({min(max(valid_len - 1 - t, 0), S - 2) for t in range(cfg.k_pos)})
                sel = shift[rows]
            loss = F.cross_entropy(sel, sel.argmax(-1).detach())
            (g,) = torch.autograd.grad(loss, x)
        score = g[0, start : start + length].norm(dim=-1)
        order = sorted(range(length), key=lambda j: (-score[j].item(), j))
        f = F.normalize(h[0, start : start + length].detach(), dim=-1)
        chosen, suppressed = [], [False] * length
        for j in order:
            if len(chosen) == k:
                break
            if suppressed[j]:
                continue
            chosen.append(j)
            for m in range(length):
                if (f[j] @ f[m]).item() >= cfg.tau:
                    suppressed[m] = True
        for j in order:
            if len(chosen) == k:
                break
            if j not in chosen:
                chosen.append(j)
        keep = sorted(chosen)
        orig = [orig[j] for j in keep]
        kept_log.append(orig)
        h = torch.cat([h[:, :start], h[:, [start + j for j in keep]], h[:, start + length :]], dim=1)
        length = k
    return kept_log


CASES = [
    # arch, seed, schedule, proxy, impl, include_last, tau
    ("v15", 0, Schedule(layers=(1, 2), tokens=(128, 32)), "next", "sliced", False, 0.8),
    ("v15", 1, Schedule(layers=(1, 3), tokens=(200, 64)), "current", "full", False, 0.8),
    ("v15", 2, Schedule(layers=(2,), tokens=(100,)), "next", "full", True, 0.5),
    ("v15", 3, Schedule(layers=(1, 2, 4), tokens=(300, 150, 20)), "current", "sliced", True, 0.95),
    ("v16", 0, Schedule(layers=(1, 2), budget_ratio=0.35), "next", "sliced", False, 0.8),
    ("v16", 4, Schedule(layers=(2, 3), tokens=(900, 300)), "current", "full", False, 0.8),
]


@pytest.mark.parametrize("arch,seed,schedule,proxy,impl,last,tau", CASES)
def test_kept_indices_equal_naive_reference(models, arch, seed, schedule, proxy, impl, last, tau):
    tok, model, proc = models[arch]
    model = model.to(torch.float64)
    try:
        size = [(640, 427), (500, 500), (333, 700), (800, 300), (640, 480)][seed % 5]
        img = image(*size, seed=seed)
        x = pixels([img], proc, model).to(torch.float64)
        ids = prompt_ids(tok, "Is there a red circle in the image? Answer yes or no.")[None]
        mm = model.prepare_multimodal_inputs(ids, None, x, [img.size])
        cfg = PIOConfig(schedule, tau=tau, proxy=proxy, proxy_impl=impl, include_last=last)
        model.enable_pio(cfg)
        state = PruneState()
        state.set_inputs(mm.spans, mm.padding_side)
        model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, prune_state=state)
        ours = [st.kept for st in state.samples[0].stages]
        ref = naive_reference(model, mm.inputs_embeds, mm.spans[0][0], cfg)
        assert len(ref) >= 1
        assert ours == ref
    finally:
        model.disable_pio()
        model.to(torch.float32)


def test_sliced_and_full_proxy_agree(models):
    tok, model, proc = models["v15"]
    model = model.to(torch.float64)
    try:
        img = image(400, 300, seed=7)
        x = pixels([img], proc, model).to(torch.float64)
        ids = prompt_ids(tok, "What colour is the square?")[None]
        kept = {}
        for impl in ("sliced", "full"):
            model.enable_pio(PIOConfig(Schedule(layers=(1, 2), tokens=(150, 40)), proxy_impl=impl))
            st = PruneState()
            model(ids, images=x, prune_state=st)
            kept[impl] = [s.kept for s in st.samples[0].stages]
        assert kept["sliced"] == kept["full"] and len(kept["full"][0]) == 150
    finally:
        model.disable_pio()
        model.to(torch.float32)


def test_keep_all_is_identity(models):
    tok, model, proc = models["v15"]
    img = image(320, 240, seed=1)
    x = pixels([img], proc, model)
    ids = prompt_ids(tok, "Describe the image.")[None]
    base = model(ids, images=x).logits
    model.enable_pio(PIOConfig(Schedule(layers=(1, 2), tokens=(576, 576))))
    try:
        st = PruneState()
        same = model(ids, images=x, prune_state=st).logits
        assert torch.equal(base, same)
        assert [s.kept for s in st.samples[0].stages] == [list(range(576))] * 2 and not st.stage_masks
        # forcing a keep-all selection runs the gather and position bookkeeping on the identity
        st = PruneState(forced_keep={1: [torch.arange(576)], 2: [torch.arange(576)]})
        forced = model(ids, images=x, prune_state=st).logits
        torch.testing.assert_close(forced, base, atol=1e-6, rtol=1e-6)
        assert [s.after for s in st.samples[0].stages] == [576, 576]
    finally:
        model.disable_pio()


@pytest.mark.parametrize("arch", ["v15", "v16"])
def test_cached_decoding_equals_recomputation(models, arch):
    tok, model, proc = models[arch]
    img = image(500, 350, seed=5)
    x = pixels([img], proc, model)
    ids = prompt_ids(tok, "How many objects are there?")[None]
    model.enable_pio(PIOConfig(Schedule(layers=(1, 3), tokens=(200, 50))))
    try:
        st = PruneState()
        out = model.generate(ids, images=x, image_sizes=[img.size], do_sample=False, max_new_tokens=6,
                             min_new_tokens=6, prune_state=st, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0].tolist()
        assert len(tokens) == 6 and [s.after for s in st.samples[0].stages] == [200, 50]
        for t in range(6):
            full = torch.cat([ids, torch.tensor([tokens[:t]], dtype=ids.dtype)], dim=1)
            replay = PruneState(forced_keep=st.keep_indices)
            logits = model(full, images=x, image_sizes=[img.size], use_cache=False, prune_state=replay).logits[0, -1]
            torch.testing.assert_close(logits, out.logits[t][0], atol=2e-5, rtol=1e-4)
            assert int(logits.argmax()) == tokens[t]
    finally:
        model.disable_pio()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single(models, side):
    tok, model, proc = models["v15"]
    imgs = [image(640, 427, seed=11), image(300, 500, seed=12)]
    qs = [("Is there a cat?", 0), ("What is written on the sign in the picture?", None), ("Name the colour.", 1)]
    model.enable_pio(PIOConfig(Schedule(layers=(1, 2), tokens=(160, 48))))
    try:
        single = []
        for q, im in qs:
            ids = prompt_ids(tok, q, with_image=im is not None)[None]
            kw = {"images": pixels([imgs[im]], proc, model)} if im is not None else {}
            st = PruneState()
            logits = model(ids, prune_state=st, **kw).logits[0, -1]
            gen = model.generate(ids, do_sample=False, max_new_tokens=5, min_new_tokens=5, **kw)[0].tolist()
            single.append((logits, [s.kept for s in st.samples[0].stages], gen))
        seqs = [prompt_ids(tok, q, with_image=im is not None) for q, im in qs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[b, sl], mask[b, sl] = s, 1
        x = pixels(imgs, proc, model)
        mm = model.prepare_multimodal_inputs(ids, mask, x, padding_side=side)
        st = PruneState()
        st.set_inputs(mm.spans, side)
        logits = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, prune_state=st).logits
        final_mask = st.stage_masks[2]
        for b in range(3):
            last = int(final_mask[b].nonzero().max())
            torch.testing.assert_close(logits[b, last], single[b][0], atol=1e-4, rtol=1e-4)
            assert [s.kept for s in st.samples[b].stages] == single[b][1]
        gen = model.generate(ids if side == "left" else None, images=x, attention_mask=mask, do_sample=False,
                             max_new_tokens=5, min_new_tokens=5) if side == "left" else None
        if gen is not None:
            assert [g.tolist() for g in gen] == [s[2] for s in single]
    finally:
        model.disable_pio()


def test_invalid_configs_raise(models):
    _, model, _ = models["v15"]
    L = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=str(L)):
        model.enable_pio(PIOConfig(Schedule(layers=(1, L), tokens=(100, 50))))
    with pytest.raises(ValueError, match="tau"):
        model.enable_pio(PIOConfig(Schedule(layers=(1,), tokens=(100,)), tau=1.5))
    with pytest.raises(ValueError, match="proxy"):
        model.enable_pio(PIOConfig(Schedule(layers=(1,), tokens=(100,)), proxy="previous"))
    assert model.pio_config is None


def test_beam_search_with_pruning(models):
    """generate() expands the batch for beams; every beam row of a sample gets that sample's span."""
    tok, model, proc = models["v16"]
    img = image(420, 300, seed=9)
    ids = prompt_ids(tok, "Where is the ball?")[None]
    x = pixels([img], proc, model)
    model.enable_pio(PIOConfig(Schedule(layers=(1,), tokens=(300,))))
    try:
        st = PruneState()
        out = model.generate(ids, images=x, image_sizes=[img.size], num_beams=3, num_return_sequences=2,
                             do_sample=False, max_new_tokens=4, min_new_tokens=4, prune_state=st)
        assert out.shape == (2, 4)
        assert len(st.samples) == 3 and all(s.stages[0].after == 300 for s in st.samples)
        assert st.samples[0].stages[0].kept == st.samples[2].stages[0].kept
    finally:
        model.disable_pio()
