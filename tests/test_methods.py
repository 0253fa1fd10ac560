"""Every registered reduction method, on tiny LLaVA-1.5 and LLaVA-NeXT models, through one parametrised suite.

Per method: kept positions equal a deliberately naive reference of that method (float64; eager attention from
transformers' own attention module, Python loops, full-vocabulary logits, explicit slicing); a keep-all
budget equals no pruning; pruned prefill plus cached decoding equals recomputation; a padded batch of three
different samples (one text-only) equals each sample alone; SDPA, eager and the FlashAttention-2 stand-in keep
the same positions and generate the same tokens.

Adding a method: give it an entry in ``REFERENCES`` (its naive selection) and ``CASES`` (schedules for a
4-layer model); ``test_every_method_has_a_test_entry`` fails until it has both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_multimodal_rotary_pos_emb

from llava.model.families import variants
from pio import PruneState, Schedule, get_method, method_names
from tests.helpers import encode, image, left_padded_pair, load, pixels, prompt_ids

VARIANTS = list(variants())  # every registered family's variants: llava-v1.5, llava-v1.6, qwen2_5_vl


def parts(model):
    """``(layers, final norm, rotary embedding, LM head)`` of a model's language model (LLaVA or Qwen2.5-VL)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.get_model()
    return lm.layers, lm.norm, lm.rotary_emb, model.lm_head


def run_layer(layer, h, **kw) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def rotate(model, k, pe):
    """Keys (1, H, S, hd) rotated by the model's own rotary rule (Qwen: transformers' M-RoPE sections)."""
    cos, sin = pe
    if cos.dim() == 4:
        return apply_multimodal_rotary_pos_emb(k, k, cos, sin, model.config.text_config.rope_scaling["mrope_section"])[1]
    return apply_rotary_pos_emb(k, k, cos, sin)[1]


# ------------------------------------------------------------------------------------------ naive references
@dataclass
class Ctx:
    """What a naive selection sees at one stage of one unpadded sample."""

    model: object
    layer: int  # 1-based, just ran
    h_in: torch.Tensor  # (1, S, D) its input
    h: torch.Tensor  # (1, S, D) its output
    pe: tuple
    mask: torch.Tensor  # (1, 1, S, S) additive causal
    positions: torch.Tensor  # (1, S); Qwen2.5-VL: (3, 1, S)
    start: int
    length: int
    k: int
    embeds: torch.Tensor  # the prefill input (1, S0, D)
    span0: tuple[int, int]
    method: object


def causal(S: int, dtype) -> torch.Tensor:
    return torch.full((S, S), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def eager_attention(layer, x, pe, mask) -> torch.Tensor:
    """transformers' own eager attention weights (1, H, S, S) of ``layer`` on input ``x``."""
    cfg = layer.self_attn.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        _, weights = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=pe, attention_mask=mask)
    finally:
        cfg._attn_implementation = old
    return weights


def order_desc(values) -> list[int]:
    return sorted(range(len(values)), key=lambda j: (-float(values[j]), j))


def top_k(values, k: int) -> list[int]:
    return sorted(order_desc(values)[:k])


def naive_pio(c: Ctx):
    m = c.method
    layers, norm, _, head = parts(c.model)
    proxy = layers[c.layer] if m.proxy == "next" else layers[c.layer - 1]
    S = c.h.shape[1]
    with torch.enable_grad():
        x = c.h.detach().clone().requires_grad_(True)
        y = run_layer(proxy, x, attention_mask=c.mask, position_ids=c.positions, position_embeddings=c.pe)
        logits = head(norm(y))[0]  # (S, V): every position, full vocabulary
        if m.include_last:
            sel = logits[sorted({max(S - 1 - t, 0) for t in range(m.k_pos)})]
        else:  # the authors' rule on shifted logits
            sel = logits[:-1][sorted({min(max(S - 2 - t, 0), S - 2) for t in range(m.k_pos)})]
        loss = F.cross_entropy(sel, sel.argmax(-1).detach())
        (g,) = torch.autograd.grad(loss, x)
    score = g[0, c.start : c.start + c.length].norm(dim=-1)
    order = order_desc(score)
    if not m.nms:
        return sorted(order[: c.k]), None
    f = F.normalize(c.h[0, c.start : c.start + c.length].detach(), dim=-1)
    chosen, suppressed = [], [False] * c.length
    for j in order:
        if len(chosen) == c.k:
            break
        if suppressed[j]:
            continue
        chosen.append(j)
        for t in range(c.length):
            if (f[j] @ f[t]).item() >= m.tau:
                suppressed[t] = True
    for j in order:
        if len(chosen) == c.k:
            break
        if j not in chosen:
            chosen.append(j)
    return sorted(chosen), None


def naive_fastv(c: Ctx):
    w = eager_attention(parts(c.model)[0][c.layer - 1], c.h_in, c.pe, c.mask)
    return top_k(w[0].mean(0)[-1, c.start : c.start + c.length], c.k), None


def naive_pdrop(c: Ctx):
    w = eager_attention(parts(c.model)[0][c.layer], c.h, c.pe, c.mask)
    return top_k(w[0].mean(0)[-1, c.start : c.start + c.length], c.k), None


def naive_sparsevlm(c: Ctx):
    s0, n0 = c.span0
    e = c.embeds[0]
    V, T = e[s0 : s0 + n0], e[s0 + n0 :]
    share = torch.stack([torch.softmax(V[i] @ T.T, dim=0) for i in range(n0)]).mean(0)
    raters = [j for j in range(T.shape[0]) if share[j] > share.mean()] or list(range(T.shape[0]))
    w = eager_attention(parts(c.model)[0][c.layer - 1], c.h_in, c.pe, c.mask)[0].mean(0)
    text_start = c.start + c.length
    score = torch.stack([w[text_start + r, c.start : c.start + c.length] for r in raters]).mean(0)
    k = min(c.k, c.length - 1)
    keep = top_k(score, k)
    if not c.method.recycle:
        return keep, None
    deleted = [j for j in range(c.length) if j not in keep]
    ranked = sorted(deleted, key=lambda j: (-float(score[j]), j))
    m = int(c.method.recycle_ratio * len(deleted)) + 1
    X = c.h[0, [c.start + j for j in ranked[:m]]]
    n_clusters = min(int(c.method.cluster_ratio * m) + 1, m)
    D = torch.tensor([[float((X[a] - X[b]).norm()) for b in range(m)] for a in range(m)], dtype=X.dtype)
    D = D / math.sqrt(X.shape[1])
    rho = [math.exp(-sum(v**2 for v in sorted(D[a].tolist())[:n_clusters]) / n_clusters) for a in range(m)]
    dmax = float(D.max())
    delta = [min([float(D[a, b]) for b in range(m) if rho[b] > rho[a]] or [dmax]) for a in range(m)]
    centres = sorted(range(m), key=lambda a: (-(delta[a] * rho[a]), a))[:n_clusters]
    groups = [[] for _ in centres]
    for a in range(m):
        nearest = centres.index(a) if a in centres else min(range(n_clusters), key=lambda i: (float(D[centres[i], a]), i))
        groups[nearest].append(a)
    merged = torch.stack([X[g].sum(0) / (len(g) + 1e-6) for g in groups])
    return keep, merged


def naive_dart(c: Ctx):
    layers, norm, _, _ = parts(c.model)
    layer = layers[c.layer - 1]
    attn = layer.self_attn
    S = c.h.shape[1]
    k = attn.k_proj(layer.input_layernorm(c.h_in)).view(1, S, -1, attn.head_dim).transpose(1, 2)
    k = rotate(c.model, k, c.pe)  # (1, Hkv, S, hd)
    l1 = k[0].abs().sum(dim=(0, 2))  # (S,)
    text = list(range(c.start + c.length, S))
    img_piv = sorted(order_desc(l1[c.start : c.start + c.length])[: c.method.pivot_image])
    txt_piv = [text[j] for j in order_desc(l1[text])[: c.method.pivot_text]]
    f = F.normalize(norm(c.h)[0], dim=-1)
    pivots = sorted([c.start + j for j in img_piv] + txt_piv)
    kept, free = list(img_piv), [j for j in range(c.length) if j not in img_piv]
    base, extra = divmod(c.k - len(img_piv), len(pivots))
    for i, p in enumerate(pivots):
        count = base + (1 if i < extra else 0)
        sims = [float(f[p] @ f[c.start + j]) for j in free]
        chosen = [free[j] for j in sorted(range(len(free)), key=lambda j: (sims[j], free[j]))[:count]]
        kept += chosen
        free = [j for j in free if j not in chosen]
    return sorted(kept), None


def naive_random(c: Ctx):
    g = torch.Generator().manual_seed((c.method.seed * 1_000_003 + c.layer) * 1_000_033 + c.length)
    return sorted(torch.randperm(c.length, generator=g)[: c.k].tolist()), None


def naive_visiondrop(c: Ctx):
    m = c.method
    stage = m.layers.index(c.layer)
    if m.stage_contextual is not None:
        n_ctx = m.stage_contextual[stage]
    else:  # the published shares: [30, 5], [22, 4], [16, 3]
        n_ctx = math.floor(c.k * (5 / 35, 4 / 26, 3 / 19)[min(stage, 2)] + 0.5)
    n_ctx = min(n_ctx, c.k - 1)
    layer = parts(c.model)[0][c.layer]  # the next layer, on this layer's output
    s, n = c.start, c.length
    w = eager_attention(layer, c.h, c.pe, c.mask)[0].mean(0)  # (S, S), heads averaged
    score = w[s : s + n, s : s + n].mean(0)  # what each visual key receives from the visual queries
    dom = top_k(score, c.k - n_ctx)
    if n_ctx == 0:
        return dom, None
    attn = layer.self_attn
    S = c.h.shape[1]
    k = attn.k_proj(layer.input_layernorm(c.h)).view(1, S, -1, attn.head_dim).transpose(1, 2)
    key = F.normalize(rotate(c.model, k, c.pe)[0].mean(0)[s : s + n], dim=-1)  # (n, hd), heads averaged
    rest = [j for j in range(n) if j not in dom]
    targets = rest[:: max(1, len(rest) // n_ctx)][:n_ctx]
    groups = {t: [] for t in targets}
    for j in rest:
        if j not in groups:
            groups[max(targets, key=lambda t: (float(key[j] @ key[t]), -t))].append(j)
    H = c.h[0, s : s + n]
    merged = torch.stack([H[t] + (sum(H[j] for j in g) / len(g) if g else 0) for t, g in groups.items()])
    return dom, merged


def naive_vflowopt(c: Ctx):
    w = eager_attention(parts(c.model)[0][c.layer - 1], c.h_in, c.pe, c.mask)
    score = w[0].mean(0)[-1, c.start : c.start + c.length]  # the last position's row, heads averaged
    if not c.method.recycle or c.k < 2:
        return top_k(score, c.k), None
    order = order_desc(score)
    rest = order[c.k - 1 :]  # the lowest kept token and the removed ones, weights 1 .. r + 1
    H = c.h[0, c.start : c.start + c.length]
    merged = sum((i + 1) * H[j] for i, j in enumerate(rest)) / (len(rest) * (len(rest) + 1) / 2)
    return sorted(order[: c.k - 1]), merged[None]


REFERENCES = {"pio": naive_pio, "fastv": naive_fastv, "pdrop": naive_pdrop, "sparsevlm": naive_sparsevlm,
              "dart": naive_dart, "random": naive_random, "visiondrop": naive_visiondrop,
              "vflowopt": naive_vflowopt}

S = Schedule
CASES = {  # (schedule, options) for a 4-layer decoder, several budgets each
    "pio": [(S((1, 2), tokens=(128, 32)), {}),
            (S((1, 3), tokens=(200, 64)), {"proxy": "current", "proxy_impl": "full"}),
            (S((2,), tokens=(100,)), {"include_last": True, "tau": 0.5})],
    "fastv": [(S((2,), tokens=(100,)), {}), (S((1,), tokens=(40,)), {}), (S((3,), tokens=(200,)), {})],
    "pdrop": [(S((1, 2, 3), ratios=(0.5, 0.25, 0.125)), {}), (S((2, 3), tokens=(150, 30)), {})],
    "sparsevlm": [(S((1, 2, 3), tokens=(200, 100, 30)), {}), (S((2, 3), tokens=(66, 17)), {}),
                  (S((1,), tokens=(90,)), {"recycle": False})],
    "dart": [(S((2,), tokens=(68,)), {}), (S((1,), tokens=(37,)), {}), (S((3,), tokens=(132,)), {"pivot_text": 2})],
    "random": [(S((1, 3), tokens=(100, 20)), {}), (S((2,), tokens=(50,)), {"seed": 3})],
    "visiondrop": [(S((1, 2, 3), ratios=(0.5, 0.25, 0.125)), {}),
                   (S((1, 3), tokens=(150, 40)), {"stage_contextual": (20, 0)}),
                   (S((2,), tokens=(60,)), {"stage_contextual": (59,)})],
    "vflowopt": [(S((1, 2), tokens=(120, 50)), {}),
                 (S((1, 3), ratios=(1.0, 0.3), ratio_mode="current"), {}),
                 (S((2,), tokens=(40,)), {"recycle": False})],
}
NAMES = [n for n in method_names() if get_method(n).where == "llm"]


def make(name: str, case: int = 0, arch: str = "llava-v1.5"):
    """The method of ``CASES[name][case]`` with its defaults for ``arch``'s model family."""
    schedule, options = CASES[name][case]
    cls = get_method(name)
    return cls(schedule, **{**cls.defaults(variants()[arch])["options"], **options})


def naive_run(model, embeds, span, method, positions=None) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """The method on one unpadded sample, layer by layer, with ``REFERENCES[method.name]`` choosing: the kept
    original positions per stage (-1: a merged token) and the merged tokens per layer. ``positions``: the
    prefill's (Qwen2.5-VL: its M-RoPE ids (3, 1, S)); default 0..S-1."""
    select = REFERENCES[method.name]
    layers, _, rotary, _ = parts(model)
    L = len(layers)
    start, length = span
    counts = method.counts(length, L)
    h = embeds
    positions = torch.arange(embeds.shape[1])[None] if positions is None else positions
    local, log, merged_at = list(range(length)), [], {}
    for i, layer in enumerate(layers):
        S_ = h.shape[1]
        pe = rotary(h, positions)
        mask = causal(S_, h.dtype)
        h_in = h
        h = run_layer(layer, h, attention_mask=mask, position_ids=positions, position_embeddings=pe)
        rank = i + 1
        if rank not in method.layers:
            continue
        k = counts[method.layers.index(rank)]
        if k >= length:  # the stage keeps the whole span
            log.append(list(local))
            continue
        ctx = Ctx(model, rank, h_in, h, pe, mask, positions, start, length, k, embeds, span, method)
        keep, merged = select(ctx)
        m = 0 if merged is None else merged.shape[0]
        rows = [start + j for j in keep]
        pieces = [h[:, :start], h[:, rows]] + ([merged[None].to(h.dtype)] if m else []) + [h[:, start + length:]]
        h = torch.cat(pieces, dim=1)
        if method.positions == "renumber":
            positions = torch.arange(h.shape[1]).expand(*positions.shape[:-1], -1)
        else:
            p = positions
            positions = torch.cat([p[..., :start], p[..., rows], p[..., start:start + 1].repeat_interleave(m, -1),
                                   p[..., start + length:]], dim=-1)
        local = [local[j] for j in keep] + [-1] * m
        log.append(list(local))
        if m:
            merged_at[rank] = merged
        length = len(keep) + m
    return log, merged_at


def single_input(models, arch, seed, question="Is there a red circle in the image? Answer yes or no."):
    """``(input_ids, kwargs with images and image_sizes)`` of one image question."""
    size = [(640, 427), (500, 500), (333, 700), (800, 300), (640, 480)][seed % 5]
    return encode(models, arch, question, [image(*size, seed=seed)])


def as_float64(images):
    """Pixels in float64: one tensor, or a list of per-image views (LLaVA-OneVision)."""
    return [v.to(torch.float64) for v in images] if isinstance(images, list) else images.to(torch.float64)


# ------------------------------------------------------------------------------------------ the suite
def test_every_method_has_a_test_entry():
    assert set(NAMES) == set(REFERENCES) == set(CASES)
    assert set(method_names()) == set(NAMES) | set(ENCODER_REFERENCES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", VARIANTS)
def test_kept_positions_equal_naive_reference(models, name, arch):
    tok, model, proc = models[arch]
    model.to(torch.float64)
    try:
        cases = range(len(CASES[name])) if arch == "llava-v1.5" else range(1)
        for case in cases:
            method = make(name, case, arch)
            ids, kw = single_input(models, arch, seed=case + {"llava-v1.5": 0, "llava-v1.6": 5, "qwen2_5_vl": 3,
                                                                 "llava-onevision": 2}[arch])
            mm = model.prepare_multimodal_inputs(ids, None, as_float64(kw["images"]), kw["image_sizes"])
            state = PruneState()
            state.set_inputs(mm.spans, mm.padding_side)
            model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
                  reducer=method, prune_state=state)
            ours = [st.kept for st in state.samples[0].stages]
            ref, ref_merged = naive_run(model, mm.inputs_embeds, mm.spans[0][0], method, mm.position_ids)
            assert len(ref) >= 1, (name, case)
            assert ours == ref, (name, case)
            merged = {layer: sel.merged[0] for layer, sel in state.selections.items() if sel.merged is not None}
            assert set(merged) == set(ref_merged), (name, case)
            for layer, feats in merged.items():  # recycled tokens: the same features
                torch.testing.assert_close(feats, ref_merged[layer], atol=1e-9, rtol=1e-9)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["llava-v1.5", "qwen2_5_vl"])
def test_keep_all_is_identity(models, name, arch):
    tok, model, proc = models[arch]
    schedule, options = CASES[name][0]
    method = get_method(name)(Schedule(schedule.layers, tokens=(5000,) * len(schedule.layers)), **options)
    ids, kw = single_input(models, arch, seed=1)
    base = model(ids, **kw).logits
    st = PruneState()
    same = model(ids, reducer=method, prune_state=st, **kw).logits
    assert torch.equal(base, same)
    n = st.samples[0].n_visual
    assert not st.stage_masks and [s.after for s in st.samples[0].stages] == [n] * len(schedule.layers)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", VARIANTS)
def test_cached_decoding_equals_recomputation(models, name, arch):
    tok, model, proc = models[arch]
    method = make(name, 0, arch)
    ids, kw = single_input(models, arch, seed=5, question="How many objects are there?")
    st = PruneState()
    out = model.generate(ids, **kw, do_sample=False, max_new_tokens=5, min_new_tokens=5, repetition_penalty=1.0,
                         reducer=method, prune_state=st, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0].tolist()
    assert len(tokens) == 5 and st.stage_masks, "the method pruned nothing"
    for t in range(5):
        full = torch.cat([ids, torch.tensor([tokens[:t]], dtype=ids.dtype)], dim=1)
        replay = PruneState(forced=st.selections)
        logits = model(full, **kw, use_cache=False, reducer=method, prune_state=replay).logits[0, -1]
        torch.testing.assert_close(logits, out.logits[t][0], atol=2e-5, rtol=1e-4)
        assert int(logits.argmax()) == tokens[t]


def batch(models, side, arch="llava-v1.5"):
    """Three questions (two images of different sizes, one text-only) padded on ``side``: ``(questions, per-sample
    (ids, kwargs), ids, mask, kwargs of the batch's images)``."""
    qs = [("Is there a cat?", 0), ("What is written on the sign in the picture?", None), ("Name the colour.", 1)]
    imgs = [image(640, 427, seed=11), image(300, 500, seed=12)]
    singles = [encode(models, arch, q, [imgs[im]] if im is not None else []) for q, im in qs]
    width = max(ids.shape[1] for ids, _ in singles)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, (s, _) in enumerate(singles):
        sl = slice(width - s.shape[1], width) if side == "left" else slice(0, s.shape[1])
        ids[b, sl], mask[b, sl] = s[0], 1
    with_images = [kw for _, kw in singles if kw]
    sizes = [k["image_sizes"] for k in with_images]  # LLaVA: lists of (width, height); Qwen2.5-VL: grid tensors
    kw = {"images": torch.cat([k["images"] for k in with_images]),
          "image_sizes": torch.cat(sizes) if torch.is_tensor(sizes[0]) else [s for k in sizes for s in k]}
    return qs, singles, ids, mask, kw


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["llava-v1.5", "qwen2_5_vl"])
def test_batch_equals_single(models, name, arch):
    tok, model, proc = models[arch]
    method = make(name, 0, arch)
    qs, singles, ids_l, mask_l, kw_l = batch(models, "left", arch)
    single = []
    for s, kw in singles:
        st = PruneState()
        logits = model(s, reducer=method, prune_state=st, **kw).logits[0, -1]
        gen = model.generate(s, do_sample=False, max_new_tokens=4, min_new_tokens=4, reducer=method, **kw)
        single.append((logits, [t.kept for t in st.samples[0].stages], gen[0].tolist()))
    for side in ("left", "right"):
        _, _, ids, mask, kw = batch(models, side, arch)
        mm = model.prepare_multimodal_inputs(ids, mask, kw["images"], kw["image_sizes"], padding_side=side)
        st = PruneState()
        st.set_inputs(mm.spans, side)
        logits = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
                       reducer=method, prune_state=st).logits
        final = st.stage_masks[max(st.stage_masks)]
        for b in range(3):
            last = int(final[b].nonzero().max())
            torch.testing.assert_close(logits[b, last], single[b][0], atol=1e-4, rtol=1e-4)
            assert [t.kept for t in st.samples[b].stages] == single[b][1], (side, b)
    gen = model.generate(ids_l, attention_mask=mask_l, do_sample=False, max_new_tokens=4, min_new_tokens=4,
                         reducer=method, **kw_l)
    assert [g.tolist() for g in gen] == [s[2] for s in single]


@pytest.mark.parametrize("name", NAMES)
def test_backends_keep_the_same_tokens(tiny_v15, fa2_emulated, name):
    tok, model, proc, _ = load(tiny_v15)
    model = model.to(torch.float64)
    method = make(name)
    ids, mask, x = left_padded_pair(tok, proc, model)
    results = {}
    for impl in ("sdpa", "eager", "flash_attention_2"):
        model.config._attn_implementation = impl
        st = PruneState()
        out = model.generate(ids, images=x, attention_mask=mask, do_sample=False, max_new_tokens=4, min_new_tokens=4,
                             reducer=method, prune_state=st)
        results[impl] = (out.tolist(), [[s.kept for s in smp.stages] for smp in st.samples])
    assert results["sdpa"][1][0], "nothing was pruned"
    assert results["eager"] == results["sdpa"] == results["flash_attention_2"]


# ------------------------------------------------------------------------------------------ encoder-side methods
def naive_encoder_views(model, pixels: torch.Tensor) -> dict:
    """Per crop what an encoder-side method reads, computed the plain way: transformers' own eager CLIP with
    ``output_attentions`` (every layer's full attention), the keys caught by a hook on each layer's k_proj, the
    hidden states, the projector."""
    clip = model.get_vision_tower().vision_tower
    old = clip.config._attn_implementation
    clip.config._attn_implementation = "eager"
    keys = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, j=j: keys.__setitem__(j, o))
             for j, layer in enumerate(clip.vision_model.encoder.layers)]
    try:
        out = clip(pixels.to(clip.dtype), output_attentions=True, output_hidden_states=True)
    finally:
        clip.config._attn_implementation = old
        for h in hooks:
            h.remove()
    proj = model.get_model().mm_projector
    heads = clip.config.num_attention_heads
    proc = model.get_vision_tower().image_processor
    mean = torch.tensor(proc.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    return {
        "pixels": ((pixels.to(torch.float64) * std + mean) * 255).round(),  # the 8-bit values (N, 3, H, W)
        "patch": clip.config.patch_size,
        "attn": out.attentions,  # each (N, H, 1 + P, 1 + P)
        "hidden": out.hidden_states,  # each (N, 1 + P, C)
        "keys": {j: k[:, 1:].view(*k.shape[:1], k.shape[1] - 1, heads, -1) for j, k in keys.items()},
        "features": proj(out.hidden_states[-2][:, 1:]),
        "project": proj,
        "layers": len(clip.vision_model.encoder.layers),
    }


def cls_row(v: dict, layer: int, c: int) -> torch.Tensor:
    return v["attn"][layer][c, :, 0, 1:]  # (H, P)


def naive_received_views(model, pixels, grid) -> dict:
    """What an encoder-side method reads of one image on a tower without a CLS token (Qwen2.5-VL), the plain way:
    every vision block's input caught, each block's full softmax attention recomputed with transformers' own
    vision rotary, the attention each merged token receives (heads summed, query rows averaged, its patches
    averaged) in raster order, and the merged features."""
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
    unit = visual.spatial_merge_unit

    def received(layer):
        h, kw = caught[layer % len(visual.blocks)]
        block = visual.blocks[layer % len(visual.blocks)]
        S = h.shape[0]
        q, k, _ = block.attn.qkv(block.norm1(h)).reshape(S, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *kw["position_embeddings"])
        p = torch.softmax(torch.einsum("shd,thd->hst", q.float(), k.float()) / q.shape[-1] ** 0.5, dim=-1)
        per_patch = p.sum(0).mean(0)  # one image: one attention group
        in_window_order = [float(per_patch[unit * i:unit * i + unit].mean()) for i in range(S // unit)]
        raster = [0.0] * (S // unit)
        for i, w in enumerate(window_index.tolist()):
            raster[w] = in_window_order[i]
        return raster

    merge = visual.spatial_merge_size
    return {"features": feats[None], "received": received, "grid": (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge),
            "full_attention_layers": list(visual.fullatt_block_indexes)}


def naive_received_scan(v, c, method, target):
    """The authors' scan on a tower without a CLS token (their Qwen2.5-VL form): windows of 4 x 4 tokens by the
    attention received at the first full-attention block, then the rest by the last block's, merged as above."""
    local_a = v["received"](v["full_attention_layers"][0] if method.local_layer is None else method.local_layer)
    global_a = v["received"](-1 if method.global_layer is None else method.global_layer)
    rows, cols = v["grid"]
    nh, nw = max(1, rows // 4), max(1, cols // 4)
    window = [min(r // 4, nh - 1) * nw + min(q // 4, nw - 1) for r in range(rows) for q in range(cols)]
    n_local = target // 2
    cap = -(-n_local // (nh * nw))
    local, count = [], {}
    for t in sorted(range(rows * cols), key=lambda t: (-local_a[t], t)):
        if len(local) < n_local and count.get(window[t], 0) < cap:
            local.append(t)
            count[window[t]] = count.get(window[t], 0) + 1
    others = sorted((t for t in range(rows * cols) if t not in local), key=lambda t: (-global_a[t], t))
    keep = sorted(local + others[: target - n_local])
    f = v["features"][c]
    fn = F.normalize(f.float(), dim=-1)
    groups = {k: [k] for k in keep}
    for t in range(rows * cols):
        if t not in groups:
            groups[max(keep, key=lambda k: (float(fn[t] @ fn[k]), -k))].append(t)
    return keep, torch.stack([f[groups[k]].mean(0) for k in keep]), None, None


def naive_scan(v, c, method, target):
    if "received" in v:  # a tower without a CLS token
        return naive_received_scan(v, c, method, target)
    a_loc = cls_row(v, 5 if method.local_layer is None else method.local_layer, c).mean(0)
    a_glob = cls_row(v, -2 if method.global_layer is None else method.global_layer, c).mean(0)
    side = int(a_loc.numel() ** 0.5)
    k_w, n_glob = (target // 2) // 16, target - target // 2
    local = []
    for wr in range(4):
        for wc in range(4):
            cells = [r * side + q for r in range(wr * side // 4, (wr + 1) * side // 4)
                     for q in range(wc * side // 4, (wc + 1) * side // 4)]
            local += sorted(cells, key=lambda t: (-float(a_loc[t]), t))[:k_w]
    rest = [t for t in range(side * side) if t not in local]
    keep = sorted(local + sorted(rest, key=lambda t: (-float(a_glob[t]), t))[:n_glob])
    f = v["features"][c]
    fn = F.normalize(f, dim=-1)
    joined = {k: [] for k in keep}
    for t in range(side * side):
        if t not in joined:
            joined[max(keep, key=lambda k: (float(fn[t] @ fn[k]), -k))].append(t)
    feats = torch.stack([(f[k] + sum((f[t] for t in joined[k]), torch.zeros_like(f[k]))) / (1 + len(joined[k]))
                         for k in keep])
    return keep, feats, None, None


def naive_visionzip(v, c, method, target):
    contextual = round(target * 10 / 64)
    dominant = target - contextual
    a = cls_row(v, method.layer, c).sum(0)
    P = a.numel()
    dom = sorted(sorted(range(P), key=lambda t: (-float(a[t]), t))[: dominant - 1])
    remaining = [t for t in range(P) if t not in dom]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    others = [t for t in remaining if t not in targets]
    m = F.normalize(v["keys"][method.layer % v["layers"]][c].mean(1), dim=-1)
    H = v["hidden"][method.layer][c]  # (1 + P, C)
    merged = []
    for t in targets:
        members = [o for o in others if max(targets, key=lambda x: (float(m[o] @ m[x]), -targets.index(x))) == t]
        merged.append(H[1 + t] + (sum(H[1 + o] for o in members) / len(members) if members else 0))
    return dom, None, v["project"](H[:1]), v["project"](torch.stack(merged))


def naive_scope(v, c, method, target):
    f = F.normalize(v["hidden"][method.layer][c, 1:], dim=-1)
    S = f @ f.T
    sal = cls_row(v, method.layer, c).sum(0) ** method.alpha
    best = torch.zeros(S.shape[0], dtype=S.dtype)
    picks = []
    for _ in range(target):
        scores = [(-1e30 if j in picks else float((S[:, j] - best).clamp_min(0).sum() * sal[j])) for j in range(S.shape[0])]
        j = max(range(len(scores)), key=lambda t: (scores[t], -t))
        picks.append(j)
        best = torch.maximum(best, S[j])
    return sorted(picks), None, None, None


def naive_divprune(v, c, method, target):
    f = F.normalize(v["features"][c], dim=-1)
    D = (1 - f @ f.T).tolist()
    P = len(D)
    isolated = [sorted(D[i][j] for i in range(P))[1] for j in range(P)]
    picks = [max(range(P), key=lambda j: (isolated[j], -j))]
    nearest = list(D[picks[0]])  # each token's distance to the nearest pick
    while len(picks) < target:
        j = max((t for t in range(P) if t not in picks), key=lambda t: (nearest[t], -t))
        picks.append(j)
        nearest = [min(a, b) for a, b in zip(nearest, D[j])]
    return sorted(picks), None, None, None


def naive_holov(v, c, method, target):
    a = cls_row(v, method.layer, c).mean(0)
    f = v["features"][c]
    P = a.numel()
    n_chunks = max(1, int(1024 / 576 * P / target))
    sizes = [P // n_chunks + (1 if p < P % n_chunks else 0) for p in range(n_chunks)]
    bounds = [(sum(sizes[:p]), sum(sizes[: p + 1])) for p in range(n_chunks)]
    scores = []
    for lo, hi in bounds:
        n = hi - lo
        g = f[lo:hi] / (f[lo:hi].norm(dim=-1, keepdim=True) + 1e-6)
        S = g @ g.T
        for i in range(n):
            S[i, i] = 0
        mu = S.sum(1) / (n - 1)
        var = torch.stack([sum((S[i, j] - mu[i]) ** 2 for j in range(n)) / (n - 1) for i in range(n)])
        A = 1000 * a[lo:hi]
        lam = A.abs().mean() / (var.abs().mean() + 1e-6)
        scores.append(float((A + method.alpha * lam * var).mean()))
    total = sum(scores) + 1e-6
    share = [s / total for s in scores]
    alloc = [int(x * target) for x in share]
    for p in sorted(range(n_chunks), key=lambda p: (-share[p], p))[: target - sum(alloc)]:
        alloc[p] += 1
    keep = []
    for (lo, hi), k in zip(bounds, alloc):
        keep += list(range(lo, hi)) if k >= hi - lo else sorted(range(lo, hi), key=lambda t: (-float(a[t]), t))[:k]
    return sorted(keep), None, None, None


def naive_vflowopt_vit(v, c, method, target):
    A = v["attn"][method.layer][c].mean(0)  # (T, T), CLS first, heads averaged
    T = A.shape[0]
    received = [float(A[:, j].mean()) for j in range(T)]
    rows = [q for q in range(T) if received[q] > method.t * sum(received) / T] or list(range(T))
    score = A[rows].mean(0)[v.get("lead", 1):]  # the patches' columns (after CLIP's CLS)
    P = score.numel()
    side, p = int(P**0.5), v["patch"]
    if method.alpha:
        px = v["pixels"][c].tolist()
        ent = []
        for t in range(P):
            r, q = divmod(t, side)
            grey = [round(0.3333 * px[0][y][x] + 0.3333 * px[1][y][x] + 0.3333 * px[2][y][x])
                    for y in range(r * p, (r + 1) * p) for x in range(q * p, (q + 1) * p)]
            probs = [grey.count(g) / len(grey) for g in set(grey)]
            ent.append(-sum(pr * math.log2(pr + 1e-10) for pr in probs))
        score = score + method.alpha * torch.softmax(torch.tensor(ent, dtype=score.dtype), dim=0)
    order = sorted(range(P), key=lambda j: (-float(score[j]), j))
    removal = order[::-1]

    def cell(j):
        return math.floor((j // side) / method.m), math.floor((j % side) / method.m)

    for n in range(1, P + 1):
        if P - n + len({cell(j) for j in removal[:n]}) == target:
            break
    else:
        return sorted(order[:target]), None, None, None
    removed = removal[:n]
    f = v["features"][c]
    new = {}
    for cl in {cell(j) for j in removed}:
        members = [j for j in removed if cell(j) == cl]
        rep = min(members, key=order.index)
        total = sum(float(score[j]) for j in members)
        new[rep] = sum(float(score[j]) / total * f[j] for j in members)
    keep = sorted(order[: P - n] + list(new))
    return keep, torch.stack([new.get(j, f[j]) for j in keep]), None, None


ENCODER_OPTIONS = {"scan": {"local_layer": 0},  # the scan's shallow layer 5 does not exist in the tiny CLIP tower
                   "vflowopt_vit": {"t": 1.0, "alpha": 0.5, "m": 5.0}}  # a subset of global rows; entropy on
"""Options for the tiny 2-layer CLIP tower; on the others (Qwen2.5-VL's 4 blocks) the methods' defaults run."""


def make_encoder(name: str, tokens: int, arch: str = "llava-v1.5"):
    """The method for the tiny vision tower of ``arch``."""
    options = ENCODER_OPTIONS.get(name, {}) if variants()[arch].tower.cls_token else {}
    return get_method(name)(tokens=tokens, **options)


ENCODER_REFERENCES = {"scan": naive_scan, "visionzip": naive_visionzip, "scope": naive_scope,
                      "divprune": naive_divprune, "holov": naive_holov, "vflowopt_vit": naive_vflowopt_vit}
ENCODER_NAMES = sorted(ENCODER_REFERENCES)


def encoder_input(models, arch, seed):
    tok, model, proc = models[arch]
    img = image(*[(500, 400), (333, 700), (640, 427)][seed % 3], seed=seed)
    return img, pixels([img], proc, model)


def runs_on(name: str, arch: str) -> bool:
    """Whether the encoder-side method ``name`` runs on the vision tower of ``arch``'s family."""
    return get_method(name).runs_on(variants()[arch].tower)


ENCODER_SEEDS = {"llava-v1.5": ((0, 64), (1, 96)), "llava-v1.6": ((2, 64),), "qwen2_5_vl": ((3, 96), (4, 64)),
                 "llava-onevision": ((5, 96),)}
"""Per variant, (image seed, tokens) of the encoder-side suite (a new family adds its variants)."""
ENCODER_CASES = [(n, a) for a in VARIANTS for n in ENCODER_NAMES if runs_on(n, a)]


def test_every_variant_has_an_encoder_entry():
    assert set(ENCODER_SEEDS) == set(VARIANTS)
    assert {a for _, a in ENCODER_CASES} == set(VARIANTS)


def cls_tower_selection(models, arch, method, seed, tokens):
    """``(ours, reference)`` per crop on a tower with a CLS token: our step on every crop of the image (each
    attention backend) against the naive reference of each crop."""
    from llava.model.encoder_stage import reduce_crops
    from llava.model.llava_arch import _as_crops
    from llava.model.multimodal_encoder.clip_encoder import ClipCrops

    model = models[arch][1]
    img, x = encoder_input(models, arch, seed)
    crops = torch.cat(_as_crops(x.to(torch.float64)))
    v = naive_encoder_views(model, crops)
    clip_cfg = model.get_vision_tower().vision_tower.config
    out = []
    try:
        for backend in ("sdpa", "eager"):
            clip_cfg._attn_implementation = backend
            feats, hidden = model._encode(crops)
            tower = ClipCrops(model.get_vision_tower(), model.get_model().mm_projector, hidden, crops)
            ours = reduce_crops(method, tower, feats, [(0, j) for j in range(crops.shape[0])])
            out += [(backend, c, red, ENCODER_REFERENCES[method.name](v, c, method, tokens))
                    for c, red in enumerate(ours)]
    finally:
        clip_cfg._attn_implementation = "sdpa"
    return out


def merged_tower_selection(models, arch, method, seed, tokens):
    """The same on a tower without a CLS token that merges patches (Qwen2.5-VL: one crop per image): our prepared
    inputs (each attention backend of the vision transformer) against the naive reference of the image."""
    from llava.model.encoder_stage import ReducedCrop

    model = models[arch][1]
    img = image(*[(500, 400), (333, 700), (640, 427)][seed % 3], seed=seed)
    ids, kw = encode(models, arch, "What is it?", [img])
    px = kw["images"].to(torch.float64)
    v = naive_received_views(model, px, kw["image_sizes"])
    target = method.target(v["features"].shape[1])
    vision_cfg = model.model.visual.config
    out = []
    try:
        for backend in ("sdpa", "eager"):
            vision_cfg._attn_implementation = backend
            mm = model.prepare_multimodal_inputs(ids, None, px, kw["image_sizes"], pre=method, state=PruneState())
            (start, length), = mm.spans[0]
            (record,) = mm.encoder[0]
            mask = torch.zeros(record.n, dtype=torch.bool)
            mask[record.kept] = True
            feats = torch.zeros(record.n, mm.inputs_embeds.shape[-1], dtype=mm.inputs_embeds.dtype)
            feats[record.kept] = mm.inputs_embeds[0, start:start + length]
            out.append((backend, 0, ReducedCrop(mask, feats), ENCODER_REFERENCES[method.name](v, 0, method, target)))
    finally:
        vision_cfg._attn_implementation = "sdpa"
    return out


def siglip_crop_selection(models, arch, method, seed, tokens):
    """The same on a per-view tower without a CLS token (LLaVA-OneVision's SigLIP): our step on every view of the
    image (each attention backend) against the naive reference of each view, from transformers' own eager SigLIP
    with ``output_attentions`` (received attention: heads summed, query rows averaged)."""
    from llava.model.encoder_stage import reduce_crops
    from llava.model.language_model.llava_onevision import SiglipCrops

    model = models[arch][1]
    img = image(*[(500, 400), (333, 700), (640, 427)][seed % 3], seed=seed)
    _, kw = encode(models, arch, "What is it?", [img])
    crops = kw["images"][0].to(torch.float64)
    tower = model.model.vision_tower
    cfg = tower.config
    cfg._attn_implementation = "eager"
    try:
        out = tower(crops, output_attentions=True, output_hidden_states=True)
    finally:
        cfg._attn_implementation = "sdpa"
    side = model.grid_side
    base = {"features": model.model.multi_modal_projector(out.hidden_states[-1]), "attn": out.attentions,
            "lead": 0, "patch": cfg.patch_size, "grid": (side, side),
            "pixels": ((crops * 0.5 + 0.5) * 255).round(), "full_attention_layers": list(range(len(out.attentions)))}
    result = []
    try:
        for backend in ("sdpa", "eager"):
            cfg._attn_implementation = backend
            feats, hidden = model._encode(crops)
            ours = reduce_crops(method, SiglipCrops(tower, hidden, crops, side), feats,
                                [(0, j) for j in range(crops.shape[0])])
            for c, red in enumerate(ours):
                v = dict(base, received=lambda layer, c=c: out.attentions[layer][c].sum(0).mean(0).tolist())
                result.append((backend, c, red, ENCODER_REFERENCES[method.name](v, c, method, method.target(side**2))))
    finally:
        cfg._attn_implementation = "sdpa"
    return result


@pytest.mark.parametrize("name,arch", ENCODER_CASES)
def test_encoder_side_equals_naive_reference(models, name, arch):
    """Every encoder-side method, on every family's tower it runs on, keeps (and merges, and adds) what a naive
    reference of it does: per crop on a CLS tower and on OneVision's SigLIP, per image on Qwen2.5-VL's merged
    tower."""
    tok, model, proc = models[arch]
    traits = model.vision_traits()
    selection = (cls_tower_selection if traits.cls_token else siglip_crop_selection if traits.unmerged
                 else merged_tower_selection)
    model.to(torch.float64)
    try:
        for seed, tokens in ENCODER_SEEDS[arch]:
            method = make_encoder(name, tokens, arch)
            for backend, c, red, (keep, kept_feats, lead, extra) in selection(models, arch, method, seed, tokens):
                assert red.mask.nonzero().flatten().tolist() == keep, (name, seed, backend, c)
                if kept_feats is not None:
                    torch.testing.assert_close(red.features[red.mask], kept_feats.to(red.features.dtype))
                for got, want in ((red.lead, lead), (red.extra, extra)):
                    assert (got is None) == (want is None)
                    if want is not None:
                        torch.testing.assert_close(got, want)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("name,arch", [(n, a) for a in VARIANTS for n in ENCODER_NAMES if not runs_on(n, a)])
def test_encoder_side_refused_where_the_tower_lacks_a_requirement(models, name, arch):
    """A method that requires what a family's vision tower lacks is refused by name, in one line, before it runs
    (by the family, as the runners check it) and by the model."""
    from llava.model.families import variants as every

    tok, model, proc = models[arch]
    method = make_encoder(name, 64, arch)
    ids, kw = single_input(models, arch, seed=1)
    for refuse in (lambda: every()[arch].check_method(method), lambda: model(ids, reducer=method, **kw)):
        with pytest.raises(ValueError, match=f"^{name} needs .*; encoder-side methods that run here: ") as e:
            refuse()
        assert "\n" not in str(e.value)


def test_scan_says_when_it_keeps_fewer(models, caplog):
    from pio.methods.scan import Scan

    tok, model, proc = models["llava-v1.5"]
    img, x = encoder_input(models, "llava-v1.5", 0)
    st = PruneState()
    model(prompt_ids(tok, "What is it?")[None], images=x, reducer=Scan(tokens=218, local_layer=0), prune_state=st)
    assert st.samples[0].n_visual == 205 and st.samples[0].n_encoder == 576
    assert "scan keeps 205 of the requested 218 tokens per crop" in caplog.text


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_side_keep_all_and_composition(models, name):
    from pio.encoder import Pipeline
    from pio.methods import PIO

    tok, model, proc = models["llava-v1.6"]
    img, x = encoder_input(models, "llava-v1.6", 1)
    ids = prompt_ids(tok, "What is it?")[None]
    base = model(ids, images=x, image_sizes=[img.size]).logits
    assert torch.equal(model(ids, images=x, image_sizes=[img.size], reducer=make_encoder(name, 576)).logits, base)
    st = PruneState()
    pipe = Pipeline(make_encoder(name, 64), PIO(Schedule((1, 2), tokens=(100, 40))))
    out = model.generate(ids, images=x, image_sizes=[img.size], do_sample=False, max_new_tokens=3, min_new_tokens=3,
                         reducer=pipe, prune_state=st)
    rec = st.samples[0]
    crops = x.shape[1]  # base view + grid crops, 64 each (plus merged and newline tokens)
    assert rec.n_encoder > rec.n_visual >= 64 * crops - 64 and rec.stages[0].before == rec.n_visual
    assert [s.after for s in rec.stages] == [100, 40] and out.shape == (1, 3)


@pytest.mark.parametrize("name", ["visionzip", "divprune"])
@pytest.mark.parametrize("arch", ["llava-v1.5", "llava-v1.6"])
def test_encoder_kept_points_into_the_unreduced_sequence(models, name, arch):
    """The log's encoder_kept: every token after the encoder stage that the method did not add or re-weight is
    the unreduced sequence's token at the position it names (NeXT: tiling, unpadding and newlines included)."""
    tok, model, proc = models[arch]
    img, x = encoder_input(models, arch, 2)
    sizes = [img.size]
    full = model.image_features(x, sizes)[0]
    st = PruneState()
    reduced = model.image_features(x, sizes, make_encoder(name, 40), st)[0]
    (rec,) = st.encoder_images
    assert rec.n == full.shape[0] and len(rec.kept) == reduced.shape[0]
    kept = torch.tensor(rec.kept)
    real = kept >= 0
    assert int(real.sum()) >= 30 and kept[real].unique().numel() == int(real.sum())
    if name == "divprune":  # keeps features as they are: every token is one of the unreduced sequence
        assert bool(real.all())
    torch.testing.assert_close(reduced[real], full[kept[real]])


def check_batch_and_cached(models, reducer, steps: int, recompute_all: bool = True) -> None:
    """A left-padded batch gives each sample's tokens and kept positions; cached decoding equals recomputation
    with the prefill's decisions replayed (every sample with an image, or the first)."""
    tok, model, proc = models["llava-v1.5"]
    qs, singles, ids_l, mask_l, kw_l = batch(models, "left")
    single = []
    for s, kw in singles:
        st = PruneState()
        out = model.generate(s, do_sample=False, max_new_tokens=steps, min_new_tokens=steps, reducer=reducer,
                             prune_state=st, output_logits=True, return_dict_in_generate=True, **kw)
        single.append((out.sequences[0].tolist(), [t.kept for t in st.samples[0].stages]))
        if kw and (recompute_all or len(single) == 1):
            toks = out.sequences[0].tolist()
            for t in range(steps):
                full = torch.cat([s, torch.tensor([toks[:t]], dtype=s.dtype)], dim=1)
                logits = model(full, use_cache=False, reducer=reducer, prune_state=PruneState(forced=st.selections),
                               **kw).logits[0, -1]
                torch.testing.assert_close(logits, out.logits[t][0], atol=2e-5, rtol=1e-4)
    st = PruneState()
    gen = model.generate(ids_l, attention_mask=mask_l, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                         reducer=reducer, prune_state=st, **kw_l)
    assert [g.tolist() for g in gen] == [s[0] for s in single]
    assert [[t.kept for t in smp.stages] for smp in st.samples] == [s[1] for s in single]


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_side_batch_and_cached_decoding(models, name):
    from pio.encoder import Pipeline
    from pio.methods import FastV

    check_batch_and_cached(models, Pipeline(make_encoder(name, 64), FastV(Schedule((2,), tokens=(20,)))), 4)


# ------------------------------------------------------------------------------------------ VisionDrop's own encoder stage
def test_visiondrop_presets_and_flags():
    """The published 32-token configuration (README, scripts) and its scaling; the authors' flags; refusals."""
    import argparse
    import shlex

    from pio.cli import add_method_args, method_from_args
    from pio.methods import VisionDrop, VisionZip
    from pio.registry import make_method
    from pio.schedule import average_visual_tokens

    def parse(line):
        p = argparse.ArgumentParser()
        add_method_args(p)
        return method_from_args(p.parse_args(shlex.split(line)))

    for budget, enc, stages in ((32, (42, 6), [[30, 5], [22, 4], [16, 3]]),
                                (64, (84, 12), [[60, 10], [44, 8], [32, 6]]),
                                (128, (168, 24), [[120, 20], [88, 16], [64, 12]]),
                                (192, (252, 36), [[180, 30], [132, 24], [96, 18]])):
        m = parse(f"--method visiondrop --budget {budget}")
        assert m == VisionDrop.from_budget(budget) and m.layers == (8, 16, 24)
        stage = m.encoder_stage()
        assert isinstance(stage, VisionZip) and stage.name == "visiondrop"
        assert (stage.tokens, stage.split(stage.tokens)) == (sum(enc), enc)
        counts = m.counts(stage.tokens, 32)
        assert [list(m.split(c, j)) for j, c in enumerate(counts)] == stages
        assert average_visual_tokens(stage.tokens, m.layers, counts, 32) == budget
        m.validate(32)
    # the authors' run, spelled with their flags (--image_token_list's pairs as --tokens plus the stage split)
    authors = parse("--method visiondrop --layer_list [8,16,24] --tokens 35,26,19 --visiondrop-stage-contextual "
                    "'[5, 4, 3]' --dominant 42 --contextual 6")
    assert authors.encoder_stage() == VisionDrop.from_budget(32).encoder_stage()
    assert authors.counts(48, 32) == [35, 26, 19] and [authors.split(c, j) for j, c in enumerate((35, 26, 19))] == [
        (30, 5), (22, 4), (16, 3)]
    solved = parse("--method visiondrop --budget-tokens 32 --dominant 42 --contextual 6")  # the published shape
    assert solved.counts(48, 32) == [35, 26, 19]
    in_llm = parse("--method visiondrop --tokens 35,26,19")
    assert in_llm.encoder_stage() is None and [in_llm.split(c, j)[1] for j, c in enumerate((35, 26, 19))] == [5, 4, 3]
    with pytest.raises(ValueError, match="largest budget is 384"):
        VisionDrop.from_budget(400).validate(32)
    with pytest.raises(ValueError, match="--dominant and --contextual together"):
        VisionDrop(Schedule((8,), tokens=(30,)), dominant=42).validate(32)
    with pytest.raises(ValueError, match="fewer than its count"):
        VisionDrop(Schedule((8, 16), tokens=(30, 10)), stage_contextual=(5, 10)).validate(32)
    with pytest.raises(ValueError, match="runs its own encoder stage"):
        make_method("visionzip+visiondrop", budget=64)


@pytest.mark.parametrize("arch", ["llava-v1.5", "llava-v1.6"])
def test_visiondrop_is_visionzip_then_its_stages(models, arch):
    """--budget B runs the encoder stage (VisionZip's selection at the configuration's counts) and then the in-LLM
    stages at their shares of what it passed on: the same as the composition spelled out."""
    from pio.encoder import Pipeline
    from pio.methods import VisionDrop, VisionZip

    tok, model, proc = models[arch]
    method = VisionDrop.from_budget(32, layers=(1, 2, 3))
    ids, kw = single_input(models, arch, seed=4)
    st = PruneState()
    logits = model(ids, reducer=method, prune_state=st, **kw).logits
    rec = st.samples[0]
    counts = method.counts(rec.n_visual, 4)
    assert rec.n_encoder > rec.n_visual and [s.after for s in rec.stages] == counts
    if arch == "llava-v1.5":  # the authors' configuration: 48 -> 35 -> 26 -> 19, 5, 4, 3 of them merged
        assert (rec.n_encoder, rec.n_visual, counts) == (576, 48, [35, 26, 19])
        assert [s.merged for s in rec.stages] == [5, 4, 3]
    spelled = Pipeline(VisionZip(tokens=48, contextual=6), VisionDrop(
        Schedule((1, 2, 3), tokens=tuple(counts)),
        stage_contextual=tuple(method.split(c, j)[1] for j, c in enumerate(counts))))
    st2 = PruneState()
    assert torch.equal(model(ids, reducer=spelled, prune_state=st2, **kw).logits, logits)
    assert [s.kept for s in st2.samples[0].stages] == [s.kept for s in rec.stages]


def test_visiondrop_with_its_encoder_stage_batch_and_cached_decoding(models):
    from pio.methods import VisionDrop

    check_batch_and_cached(models, VisionDrop.from_budget(32, layers=(1, 2, 3)), 3, recompute_all=False)


def test_visiondrop_refuses_qwen_at_a_budget(models):
    """Its encoder stage reads the CLS attention; its in-LLM stages alone (explicit counts) run on Qwen."""
    from pio.methods import VisionDrop

    tok, model, proc = models["qwen2_5_vl"]
    ids, kw = single_input(models, "qwen2_5_vl", seed=1)
    with pytest.raises(ValueError, match="visiondrop needs the CLS attention of a vision tower with a CLS token"):
        model(ids, reducer=VisionDrop.from_budget(64, layers=(1, 2, 3), family="qwen2_5_vl"), **kw)
