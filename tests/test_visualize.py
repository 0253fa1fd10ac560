"""Kept-token pictures: every panel lights exactly the patches of the tokens its method kept, in the right place.

The expected patch centres are worked out here by hand for images whose layout is easy to state (a padded
square for LLaVA-1.5, an anyres canvas with two padded bands for LLaVA-NeXT, a grid of 28-pixel cells for
Qwen2.5-VL, a squashed base view and an exact 1 x 2 grid for LLaVA-OneVision), not with the module's own mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llava.eval import visualize
from tests.helpers import family_flags, image

SIZES = {"llava-v1.5": (400, 300), "llava-v1.6": (672, 252), "qwen2_5_vl": (224, 168), "llava-onevision": (768, 384)}
METHODS = {"llava-v1.5": "pio@1/2,fastv@1,dart@1,visionzip,visionzip+pio@1/2",
           "llava-v1.6": "pio@1/2,sparsevlm@1/2,dart@1,holov",
           "qwen2_5_vl": "pio@1/2,fastv@1,dart@1,divprune",
           "llava-onevision": "pio@1/2,fastv@1,divprune,vflowopt_vit"}


def expected_tokens(arch: str) -> list[list[tuple[int, float, float]]]:
    """Per view: (position in the unreduced sequence, centre x, centre y) of every token, in canvas pixels."""
    if arch == "llava-v1.5":  # 400x300 centred on a 400x400 square, 24x24 patches over it
        cell = 400 / 24
        return [[(r * 24 + c, (c + 0.5) * cell, (r + 0.5) * cell) for r in range(24) for c in range(24)]]
    if arch == "llava-v1.6":
        # base view: the image squashed onto 336x336; grid: 672x252 fits the 672x336 canvas at y = 42, a 24x48
        # map whose 3 padded rows at each end are removed (18 rows left), each row followed by a newline token
        base = [(r * 24 + c, (c + 0.5) * 672 / 24, (r + 0.5) * 252 / 24) for r in range(24) for c in range(24)]
        grid = [(576 + r * 49 + c, (c + 0.5) * 14, (r + 0.5) * 14) for r in range(18) for c in range(48)]
        return [base, grid]
    if arch == "llava-onevision":
        # the tiny OneVision's 384-px views of 8 x 8 patches (48 px): the base view squashes 768x384 onto one
        # view; the grid is 1 x 2 views covering the image exactly (nothing unpadded), 8 x 16 tokens, each row
        # followed by a newline token
        base = [(r * 8 + c, (c + 0.5) * 96, (r + 0.5) * 48) for r in range(8) for c in range(8)]
        grid = [(64 + r * 17 + c, (c + 0.5) * 48, (r + 0.5) * 48) for r in range(8) for c in range(16)]
        return [base, grid]
    return [[(r * 8 + c, (c + 0.5) * 28, (r + 0.5) * 28) for r in range(6) for c in range(8)]]  # 224x168: 6x8


def _args(path: str, arch: str, *extra: str):
    return visualize.build_parser().parse_args(["--model-path", path, "--device", "cpu", *family_flags(arch), *extra])


@pytest.fixture(scope="module")
def loaded(models, tiny_checkpoints):
    return {arch: (tiny_checkpoints[arch], (*models[arch], arch)) for arch in models}


def _write_image(tmp_path: Path, arch: str) -> str:
    path = tmp_path / f"{arch}.png"
    image(*SIZES[arch], seed=3).save(path)
    return str(path)


def check_panels(fig: visualize.Figure, arch: str, canvas_size: tuple[int, int]) -> int:
    """Every token's patch centre is lit in a panel exactly when the panel's stage kept it; returns the panels."""
    pixels = np.asarray(fig.image).astype(int)
    dw, dh = fig.size
    sx, sy = dw / canvas_size[0], dh / canvas_size[1]
    ix, iy = fig.input_origin
    views = expected_tokens(arch)
    for panel in fig.panels:
        tokens = views[[v.name for v in _views(fig)].index(panel.view.name)]
        kept = set(panel.stage.kept.tolist())
        lit = 0
        for pos, cx, cy in tokens:
            x, y = int(cx * sx), int(cy * sy)
            here = pixels[panel.origin[1] + y, panel.origin[0] + x]
            original = pixels[iy + y, ix + x]
            if pos in kept:
                lit += 1
                assert (here == original).all(), (panel.method, panel.stage.label, pos)
            else:
                dimmed = np.round(original * visualize.DIM)
                assert (here == dimmed).all(), (panel.method, panel.stage.label, pos)
        assert lit == panel.kept_in_view
        assert 0 < lit < len(tokens), (panel.method, panel.stage.label)  # the check is not vacuous
    return len(fig.panels)


def _views(fig: visualize.Figure) -> list:
    seen: dict[str, object] = {}
    for p in fig.panels:
        seen.setdefault(p.view.name, p.view)
    return list(seen.values())


@pytest.mark.parametrize("arch", ["llava-v1.5", "llava-v1.6", "qwen2_5_vl", "llava-onevision"])
def test_panels_light_the_kept_patches(loaded, tmp_path, arch):
    path, model = loaded[arch]
    img_file = _write_image(tmp_path, arch)
    fig = visualize.make_figure(_args(path, arch, "--image-file", img_file, "--methods", METHODS[arch],
                                      "--budget", "192"), model)
    n_views = 2 if arch in ("llava-v1.6", "llava-onevision") else 1
    canvas = (400, 400) if arch == "llava-v1.5" else SIZES[arch]
    stages = {"pio": 2, "fastv": 1, "dart": 1, "sparsevlm": 2, "visionzip": 1, "holov": 1, "divprune": 1,
              "visionzip+pio": 3, "vflowopt_vit": 1}
    expected = sum(stages[m.split("@")[0]] for m in METHODS[arch].split(",")) * n_views
    assert check_panels(fig, arch, canvas) == expected
    assert [v.name for v in _views(fig)] == (["base view", "high-res grid"] if n_views == 2 else ["image"])


def test_stages_compose_encoder_and_llm_positions():
    rec = {"n_visual": 6, "n_encoder": 10, "encoder_kept": [-1, 2, 3, 5, 7, 9],
           "stages": [{"layer": 2, "before": 6, "after": 4, "kept": [0, 2, 4, -1], "merged": 1}]}
    enc, llm = visualize.stages_of(rec)
    assert enc.kept.tolist() == [2, 3, 5, 7, 9] and enc.placeless == 1
    assert llm.label == "after layer 2" and llm.kept.tolist() == [3, 7] and llm.placeless == 2


@pytest.mark.parametrize("arch,method,flags", [("llava-v1.6", "pio", ["--layers", "1,2"]),
                                               ("llava-v1.5", "visionzip+pio", ["--layers", "1,2"]),
                                               ("qwen2_5_vl", "divprune+fastv", ["--layers", "1"])])
def test_drawing_from_a_log_equals_running_the_model(loaded, tmp_path, arch, method, flags):
    from llava.eval import model_vqa_loader

    path, model = loaded[arch]
    img_file = _write_image(tmp_path, arch)
    query = "What is in the picture?"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 7, "image": Path(img_file).name, "text": query}) + "\n")
    log = tmp_path / "run.log.jsonl"
    pixels = family_flags(arch)  # the family's template (the benchmark scripts', which visualize uses too)
    p = model_vqa_loader.argparse.ArgumentParser()
    p.add_argument("--image-folder")
    p.add_argument("--question-file")
    model_vqa_loader.runner.add_common_args(p)
    run_args = p.parse_args(["--model-path", path, "--device", "cpu", "--image-folder", str(tmp_path),
                             "--question-file", str(qfile), "--answers-file", str(tmp_path / "a.jsonl"),
                             "--max_new_tokens", "2", "--method", method, "--budget", "192", "--pio-log", str(log),
                             *pixels, *flags])
    model_vqa_loader.eval_model(run_args, model)
    from_log = visualize.make_figure(_args(path, arch, "--image-file", img_file, "--pio-log", str(log),
                                           "--question-id", "7"))
    live = visualize.make_figure(_args(path, arch, "--image-file", img_file, "--query", query, "--budget", "192",
                                       "--methods", f"{method}@{flags[1].replace(',', '/')}"), model)
    assert [p.method for p in from_log.panels] == ["run"] * len(live.panels)  # the label: the log's file name
    assert len(from_log.panels) == len(live.panels) > 0
    a, b = np.asarray(from_log.image), np.asarray(live.image)
    (w, h) = live.size
    for p, q in zip(from_log.panels, live.panels):
        assert p.stage.label == q.stage.label and p.view.name == q.view.name
        assert np.array_equal(p.stage.kept, q.stage.kept)
        assert np.array_equal(a[p.origin[1]:p.origin[1] + h, p.origin[0]:p.origin[0] + w],
                              b[q.origin[1]:q.origin[1] + h, q.origin[0]:q.origin[0] + w])


def test_a_log_of_another_image_is_refused(loaded, tmp_path):
    path, model = loaded["llava-v1.5"]
    log = tmp_path / "x.jsonl"
    log.write_text(json.dumps({"question_id": 1, "n_visual": 100, "stages": []}) + "\n")
    img_file = _write_image(tmp_path, "llava-v1.5")
    with pytest.raises(ValueError, match="the log has 100 visual tokens for this image, but the model lays it out in 576"):
        visualize.make_figure(_args(path, "llava-v1.5", "--image-file", img_file, "--pio-log", str(log)))
    with pytest.raises(ValueError, match="no line for question id 3"):
        visualize.make_figure(_args(path, "llava-v1.5", "--image-file", img_file, "--pio-log", str(log), "--question-id", "3"))


def test_main_writes_the_png(loaded, tmp_path):
    from PIL import Image

    path, _ = loaded["llava-v1.5"]
    out = tmp_path / "fig" / "kept.png"
    visualize.main(["--model-path", path, "--device", "cpu", "--image-file", _write_image(tmp_path, "llava-v1.5"),
                    "--methods", "pio@1/2,fastv@1", "--budget", "192", "--out", str(out)])
    with Image.open(out) as im:
        assert im.size[0] > 3 * 336 and im.size[1] > 2 * 336
