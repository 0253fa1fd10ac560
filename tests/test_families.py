"""The family registry: every registered family resolves from its configs, loads its tiny checkpoint, agrees with its
model about its vision tower, depth and image layout, and refuses what belongs to another family in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from llava.model.families import families, family_for_path, family_of, get_family, guess_family, variants
from pio import get_method, method_names
from pio.encoder import EncoderMethod
from pio.family import model_family
from tests.helpers import image, load

REPO = Path(__file__).resolve().parents[1]
VARIANTS = list(variants())


def test_registry_names_and_variants():
    names = [f.name for f in families()]
    assert names == ["llava", "qwen2_5_vl", "llava_onevision"] and len(set(names)) == len(names)
    assert all(get_family(f.name) is f and model_family(f.name) is f for f in families())
    assert {v: f.name for v, f in variants().items()} == {"llava-v1.5": "llava", "llava-v1.6": "llava",
                                                        "qwen2_5_vl": "qwen2_5_vl",
                                                        "llava-onevision": "llava_onevision"}
    for f in families():
        assert f.architectures and f.conv_mode and {s.variant for s in f.shapes} <= set(f.variants)
    with pytest.raises(ValueError, match="unknown model family 'x'; known: llava, qwen2_5_vl, llava_onevision"):
        get_family("x")


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_resolution_from_a_config(family):
    """``architectures`` decides, then ``model_type``; an architecture no family claims is refused by name, even
    with a known ``model_type`` (LLaVA-OneVision's original layout says model_type "llava")."""
    for arch in family.architectures:
        assert family_of({"architectures": [arch], "model_type": "anything"}) is family
    for model_type in family.model_types:
        assert family_of({"model_type": model_type}) is family
    with pytest.raises(ValueError, match=r"^architectures LlavaMistralForCausalLM \(model_type 'llava'\): not a "
                                         r"supported model family; supported: llava \(LlavaLlamaForCausalLM"):
        family_of({"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava"})
    # LLaVA-OneVision's original layout says model_type "llava": its architecture decides
    assert family_of({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava"}).name == "llava_onevision"
    with pytest.raises(ValueError, match="model_type 'bert': not a supported model family"):
        family_of({"model_type": "bert"})


def test_hub_ids_are_guessed_by_name_without_a_network():
    assert guess_family("Qwen/Qwen2.5-VL-7B-Instruct").name == "qwen2_5_vl"
    assert guess_family("liuhaotian/llava-v1.6-vicuna-7b").name == "llava"
    assert guess_family("lmms-lab/llava-onevision-qwen2-7b-ov").name == "llava_onevision"
    assert guess_family("llava-hf/llava-onevision-qwen2-7b-ov-hf").name == "llava_onevision"


@pytest.mark.parametrize("arch", VARIANTS)
def test_a_tiny_checkpoint_agrees_with_its_family(tiny_checkpoints, arch):
    """The checkpoint resolves to its family; the model's vision tower has the family's flags; the family's depth
    of the raw config.json and of the loaded config is the decoder's; every method takes the family's options."""
    family = variants()[arch]
    path = tiny_checkpoints[arch]
    assert family_for_path(path) is family and guess_family(path) is family
    tok, model, proc, _ = load(path)
    assert family_of(model.config) is family
    assert model.vision_traits() == family.tower
    raw = json.loads((Path(path) / "config.json").read_text())
    assert family.decoder_depth(raw) == family.decoder_depth(model.config) == len(model.decoder_adapter().layers) == 4
    for name in method_names():
        cls = get_method(name)
        if not issubclass(cls, EncoderMethod):
            assert family.method_options.items() <= cls.defaults(family)["options"].items()
            assert cls.defaults(family) == cls.defaults(family.name)


@pytest.mark.parametrize("arch", VARIANTS)
def test_the_image_layout_is_the_models(models, arch):
    """The family's layout of an image (which the pictures draw) has exactly the tokens the model splices in, and
    the unreduced tokens the model builds are the crops' features at the layout's patches."""
    tok, model, proc = models[arch]
    family = variants()[arch]
    for size in ((640, 427), (300, 700)):
        img = image(*size, seed=size[1])
        ids, px, sizes = family.encode("<image>\nWhat is it?", [img], tok, proc, model.config)
        mm = model.prepare_multimodal_inputs(ids, None, px, sizes)
        (_, n), = mm.spans[0]
        layout = family.image_layout(model.config, proc, img.size)
        assert layout.n == n and 0 < layout.crops
        views = family.image_views(model.config, proc, img)
        shown = sorted(p for v in views.views for p in layout.tokens_of(v.crops))
        assert shown == sorted(set(shown)) and len(shown) == int((layout.source >= 0).sum())


def test_options_of_another_family_are_refused_in_one_line(tiny_checkpoints):
    llava, qwen = get_family("llava"), get_family("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"^--min-pixels applies to Qwen2.5-VL \(its image resolution bounds\); "
                                         r"\S+ is a LLaVA checkpoint$"):
        llava.check_options(tiny_checkpoints["llava-v1.5"], {"min_pixels": 3136, "model_base": None})
    with pytest.raises(ValueError, match=r"^--model-base applies to LLaVA \(projector-only checkpoints"):
        qwen.check_options(tiny_checkpoints["qwen2_5_vl"], {"model_base": "x"})
    llava.check_options("x", {"model_base": "y", "min_pixels": None})  # its own, and options not given


def test_a_broken_checkpoint_config_is_named(tiny_v15, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_v15, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["LlavaMistralForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"^{re.escape(str(broken))}: architectures LlavaMistralForCausalLM"):
        family_for_path(str(broken))


def test_the_tiny_cli_writes_every_variant(tmp_path):
    """``python -m llava.model.tiny --arch <variant>``: one entry point for every family's tiny checkpoint."""
    from llava.model import tiny

    for arch in VARIANTS:
        tiny.main(["--arch", arch, "--out", str(tmp_path / arch), "--layers", "2"])
        assert family_for_path(str(tmp_path / arch)) is variants()[arch]
        assert variants()[arch].decoder_depth(json.loads((tmp_path / arch / "config.json").read_text())) == 2


FAMILY_NAMES = "|".join(re.escape(f.name) for f in families())
CONDITIONAL = re.compile(rf"""(==|!=|\bin\b)\s*\(?["'](?:{FAMILY_NAMES})["']|["'](?:{FAMILY_NAMES})["']\s*(==|!=)"""
                         r"|is_qwen|model_type\s*==")


def test_no_family_conditional_outside_the_families():
    """No module branches on a family's name but the families' own (family_<name>.py, their model modules)."""
    own = {"families.py", "tiny_qwen.py", "qwen2_5_vl.py"} | {f"family_{f.name}.py" for f in families()}
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for root in ("llava", "pio") for p in (REPO / root).rglob("*.py")
             if p.name not in own for i, line in enumerate(p.read_text().splitlines(), 1) if CONDITIONAL.search(line)]
    assert not found, "\n".join(found)


def test_families_refuse_a_tower_requirement_by_name():
    """check_method refuses by name for every family that lacks a requirement; a method that requires nothing runs
    everywhere."""
    for f in families():
        for name in method_names():
            cls = get_method(name)
            if issubclass(cls, EncoderMethod):
                method = cls(tokens=64)
                if cls.runs_on(f.tower):
                    f.check_method(method)
                else:
                    with pytest.raises(ValueError, match=f"^{name} needs "):
                        f.check_method(method)
    assert get_method("divprune").requires == frozenset() == get_method("scan").requires
