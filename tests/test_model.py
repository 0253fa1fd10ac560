"""Our LLaVA stack against transformers' own LLaVA / LLaVA-NeXT with the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlavaConfig as HFLlavaConfig,
)
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from llava.constants import IMAGE_TOKEN_INDEX
from tests.helpers import image, load, pixels, prompt_ids


def to_hf(model, next_: bool):
    """Build transformers' LLaVA(-NeXT) with our model's weights."""
    cfg = model.config
    tower = model.get_vision_tower().vision_tower
    text_cfg = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")}
    text_cfg["model_type"] = "llama"
    common = dict(
        vision_config=tower.config.to_dict(), text_config=text_cfg, image_token_index=cfg.vocab_size - 1,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    if next_:
        # transformers reads each pinpoint as (height, width); upstream LLaVA as (width, height)
        pins = [[h, w] for w, h in cfg.image_grid_pinpoints]
        hf = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pins, **common))
        hf.model.image_newline.data.copy_(model.get_model().image_newline.data)
    else:
        hf = LlavaForConditionalGeneration(HFLlavaConfig(**common))
    hf.config._attn_implementation = cfg._attn_implementation
    for sub in (hf.config.text_config, hf.config.vision_config):
        sub._attn_implementation = cfg._attn_implementation
    hf.model.vision_tower.load_state_dict(tower.state_dict())
    proj = model.get_model().mm_projector
    hf.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    lm = {k: v for k, v in model.get_model().state_dict().items()
          if k.split(".")[0] in ("embed_tokens", "layers", "norm")}
    hf.model.language_model.load_state_dict(lm)
    hf.lm_head.load_state_dict(model.lm_head.state_dict())
    return hf.eval()


def hf_inputs(model, ids, n_visual):
    """Expand our single <image> placeholder into transformers' run of image tokens."""
    token = model.config.vocab_size - 1
    assert not bool((ids == token).any())
    pos = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    run = torch.full((n_visual,), token, dtype=ids.dtype)
    return torch.cat([ids[0, :pos], run, ids[0, pos + 1 :]])[None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llava-v1.5", "llava-v1.6"])
def test_matches_transformers(arch, attn, tiny_checkpoints):
    path = tiny_checkpoints[arch]
    tok, model, proc, _ = load(path, attn)
    next_ = arch == "llava-v1.6"
    img = image(640, 427, seed=3)
    x = pixels([img], proc, model)
    ids = prompt_ids(tok, "What is shown in the picture?")[None]
    ours = model(ids, images=x, image_sizes=[img.size]).logits
    n_visual = ours.shape[1] - (ids.shape[1] - 1)
    assert n_visual == (576 if not next_ else n_visual) and n_visual >= 576
    hf = to_hf(model, next_)
    hf_ids = hf_inputs(model, ids, n_visual)
    kw = dict(image_sizes=torch.tensor([[img.size[1], img.size[0]]])) if next_ else {}
    theirs = hf(input_ids=hf_ids, pixel_values=x, attention_mask=torch.ones_like(hf_ids), **kw).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    g_ours = model.generate(ids, images=x, image_sizes=[img.size], do_sample=False, max_new_tokens=10, min_new_tokens=10)
    g_hf = hf.generate(input_ids=hf_ids, pixel_values=x, attention_mask=torch.ones_like(hf_ids),
                       do_sample=False, max_new_tokens=10, min_new_tokens=10, **kw)
    assert g_ours[0].tolist() == g_hf[0, hf_ids.shape[1]:].tolist()


def test_next_visual_token_count(tiny_v16):
    from llava.mm_utils import anyres_visual_token_count

    tok, model, proc, _ = load(tiny_v16)
    ids = prompt_ids(tok, "Describe.")[None]
    for size in [(640, 427), (640, 480), (336, 336), (1000, 300), (300, 900)]:
        img = image(*size)
        mm = model.prepare_multimodal_inputs(ids, None, pixels([img], proc, model), [img.size])
        (span,) = mm.spans[0]
        assert span[1] == anyres_visual_token_count(size, model.config.image_grid_pinpoints), size
    assert anyres_visual_token_count((640, 480), model.config.image_grid_pinpoints) == 2340


def test_sampling_and_beams_run(tiny_v15):
    tok, model, proc, _ = load(tiny_v15)
    img = image(300, 200)
    ids = prompt_ids(tok, "Hi?")[None]
    x = pixels([img], proc, model)
    torch.manual_seed(0)
    a = model.generate(ids, images=x, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=5, min_new_tokens=5)
    torch.manual_seed(0)
    b = model.generate(ids, images=x, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=5, min_new_tokens=5)
    assert a.tolist() == b.tolist() and a.shape == (1, 5)
    beams = model.generate(ids, images=x, num_beams=2, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert beams.shape == (1, 4)
