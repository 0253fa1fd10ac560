"""PIO-specific checks (the generic ones, against its naive reference among them, are in test_methods.py)."""

from __future__ import annotations

import pytest
import torch

from pio import PIO, PruneState, Schedule
from tests.helpers import image, pixels, prompt_ids


def test_sliced_and_full_proxy_agree(models):
    tok, model, proc = models["llava-v1.5"]
    model = model.to(torch.float64)
    try:
        img = image(400, 300, seed=7)
        x = pixels([img], proc, model).to(torch.float64)
        ids = prompt_ids(tok, "What colour is the square?")[None]
        kept = {}
        for impl in ("sliced", "full"):
            st = PruneState()
            model(ids, images=x, reducer=PIO(Schedule(layers=(1, 2), tokens=(150, 40)), proxy_impl=impl), prune_state=st)
            kept[impl] = [s.kept for s in st.samples[0].stages]
        assert kept["sliced"] == kept["full"] and len(kept["full"][0]) == 150
    finally:
        model.to(torch.float32)


def test_forced_keep_all_runs_the_gather_on_the_identity(models):
    tok, model, proc = models["llava-v1.5"]
    img = image(320, 240, seed=1)
    x = pixels([img], proc, model)
    ids = prompt_ids(tok, "Describe the image.")[None]
    base = model(ids, images=x).logits
    from pio import Selection

    every = Selection([torch.arange(576)])
    st = PruneState(forced={1: every, 2: every})
    forced = model(ids, images=x, reducer=PIO(Schedule(layers=(1, 2), tokens=(100, 50))), prune_state=st).logits
    torch.testing.assert_close(forced, base, atol=1e-6, rtol=1e-6)
    assert [s.after for s in st.samples[0].stages] == [576, 576] and set(st.stage_masks) == {1, 2}


def test_invalid_configs_raise(models):
    _, model, _ = models["llava-v1.5"]
    L = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"allowed 1\.\.{L - 1}.*--pio-proxy current"):
        PIO(Schedule(layers=(1, L), tokens=(100, 50))).validate(L)
    PIO(Schedule(layers=(1, L), tokens=(100, 50)), proxy="current").validate(L)  # the current proxy may
    with pytest.raises(ValueError, match="tau"):
        PIO(Schedule(layers=(1,), tokens=(100,)), tau=1.5).validate(L)
    with pytest.raises(ValueError, match="proxy"):
        PIO(Schedule(layers=(1,), tokens=(100,)), proxy="previous").validate(L)
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="tau"):
        model(ids, reducer=PIO(Schedule(layers=(1,), tokens=(100,)), tau=1.5))


def test_beam_search_with_pruning(models):
    """generate() expands the batch for beams; every beam row of a sample gets that sample's span."""
    tok, model, proc = models["llava-v1.6"]
    img = image(420, 300, seed=9)
    ids = prompt_ids(tok, "Where is the ball?")[None]
    x = pixels([img], proc, model)
    st = PruneState()
    out = model.generate(ids, images=x, image_sizes=[img.size], num_beams=3, num_return_sequences=2,
                         do_sample=False, max_new_tokens=4, min_new_tokens=4, reducer=PIO(Schedule((1,), tokens=(300,))),
                         prune_state=st)
    assert out.shape == (2, 4)
    assert len(st.samples) == 3 and all(s.stages[0].after == 300 for s in st.samples)
    assert st.samples[0].stages[0].kept == st.samples[2].stages[0].kept
