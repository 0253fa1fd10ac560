"""Model families: one registered object per family, resolved once from a checkpoint's config.

A family is everything the codebase knows about one kind of checkpoint, in one place::

    family = family_for_path("Qwen/Qwen2.5-VL-7B-Instruct")      # or family_of(model.config)
    tokenizer, model, processor, context = family.load(path, device=..., load_kwargs=..., min_pixels=...)
    ids, pixels, sizes = family.encode(prompt, [image], tokenizer, processor, model.config)
    family.decoder_depth(model.config), family.tower, family.method_options

Families are resolved from the config's ``architectures`` (any one a family claims decides; one no family claims
is refused by name), and only without them from its ``model_type``. ``families()`` lists them in registration
order. The names are the one vocabulary for the model-family axis: ``llava`` (LLaVA-1.5 and LLaVA-NeXT: one
model class, the ``pad`` / ``anyres`` layout read from the config) and ``qwen2_5_vl``. Tiny checkpoints and
benchmark shapes of a family are named *variants* (``llava-v1.5``, ``llava-v1.6``; a family with one layout has
one variant, named as the family).

Adding a family: its module (a :class:`Family` subclass, ``llava/model/family_<name>.py``, decorated with
:func:`register_family`), its registry entry (the module's name in :data:`FAMILY_MODULES`) and its test entry
(the tiny checkpoint of each variant in ``tests/conftest.py``); see ``docs/families.md``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pio.encoder import TowerTraits, split_reducer
from pio.family import register_model_family

if TYPE_CHECKING:
    import argparse

    import numpy as np

    from pio.state import PruneState

    from .layout import ImageLayout, ImageViews

__all__ = ["FAMILY_MODULES", "Family", "Option", "Shape", "families", "family_for_path", "family_of", "get_family",
           "guess_family", "register_family", "variants"]

FAMILY_MODULES = ("family_llava", "family_qwen2_5_vl", "family_llava_onevision")
"""The modules (in ``llava.model``) that register the families, in dispatch order; imported at the end of this
module. A new family adds its module here."""

DEFAULT_FAMILY = "llava"
"""The family a hub id is taken for when its name says nothing (upstream LLaVA's runners assume LLaVA)."""


@dataclass(frozen=True)
class Option:
    """A loader option only some families take: a keyword of ``load_pretrained_model`` and its runner flag."""

    name: str  # load_pretrained_model's keyword and the runner's args attribute, e.g. "min_pixels"
    flag: str  # e.g. "--min-pixels"
    what: str  # what it is, for the refusal on another family, e.g. "its image resolution bounds"


@dataclass(frozen=True)
class Shape:
    """A named benchmark shape of a family: a real model's dimensions, built with random weights.

    ``spec`` holds the family's own keys (hidden size, layers, vision tower, ...); ``image`` is the synthetic
    image's (width, height).
    """

    name: str
    variant: str
    spec: Mapping[str, Any]
    image: tuple[int, int]


class Family:
    """One model family; subclasses override what differs (every method says what it owns).

    Class attributes:
        name: the family's name (``"llava"``), the key of per-family method settings.
        title: how messages name it (``"LLaVA"``, ``"Qwen2.5-VL"``).
        architectures: the config ``architectures`` entries it loads (the first is the one it writes).
        model_types: the config ``model_type`` values it loads when a config lists no architectures.
        hub_names: lower-case fragments of hub ids that name it, for the offline guess (:func:`guess_family`).
        variants: its tiny-checkpoint / layout variants (``llava-v1.5``, ``llava-v1.6``).
        conv_mode: its default conversation template; conv_modes: the templates that are its own (another
            family's checkpoint refuses them); exclusive: it accepts only its own templates.
        options: the loader options only it takes (:class:`Option`); a family refuses the others'.
        method_options: what every reduction method takes on it (:class:`pio.family.ModelFamily`).
        tower: its vision tower's capability flags (:class:`pio.encoder.TowerTraits`).
        shapes: its named benchmark shapes (:class:`Shape`).
        video_rule: the frame sampling rule of :mod:`llava.video` its videos are read with (``"smart"``,
            ``"uniform"``), or None when the family takes no video (:meth:`encode_video` refuses).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    hub_names: ClassVar[tuple[str, ...]] = ()
    variants: ClassVar[tuple[str, ...]] = ()
    conv_mode: ClassVar[str]
    conv_modes: ClassVar[tuple[str, ...]] = ()
    exclusive: ClassVar[bool] = False
    options: ClassVar[tuple[Option, ...]] = ()
    method_options: ClassVar[Mapping[str, Any]] = {}
    tower: ClassVar[TowerTraits]
    shapes: ClassVar[tuple[Shape, ...]] = ()
    video_rule: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- loading ----------------------------------------------------------------------------------------
    def check_options(self, model_path: str, given: Mapping[str, Any]) -> None:
        """Refuse, in one line, a loader option (``given``: name -> value, None meaning not given) that belongs
        to other families."""
        own = {o.name for o in self.options}
        for name, value in given.items():
            if value is None or name in own:
                continue
            owners = [f for f in families() if any(o.name == name for o in f.options)]
            opt = next(o for f in owners for o in f.options if o.name == name)
            raise ValueError(f"{opt.flag} applies to {' and '.join(f.title for f in owners)} ({opt.what}); "
                             f"{model_path} is a {self.title} checkpoint")

    def load(self, model_path: str, *, device: torch.device, device_map: Any, load_kwargs: dict[str, Any],
             **options: Any) -> tuple[Any, Any, Any, int]:
        """``(tokenizer, model, image processor, context length)`` of a checkpoint of this family, loaded with
        ``load_kwargs`` (dtype, attention, quantisation, device map) and the family's own ``options``; the model
        on ``device`` unless a ``device_map`` places it, frozen (``requires_grad=False``) and in eval mode."""
        raise NotImplementedError

    def load_geometry(self, model_path: str, **options: Any) -> tuple[Any, Any]:
        """``(config, image processor)`` of a checkpoint, without its weights (for pictures of logged runs)."""
        raise NotImplementedError

    # -- prompts ----------------------------------------------------------------------------------------
    def resolve_args(self, args: argparse.Namespace) -> None:
        """The family's defaults for the runner flags and its refusals: a template or an option of another
        family stops with one line; ``args.conv_mode`` gets the family's default; ``args.family`` is this."""
        owner = {m: f for f in families() for m in f.conv_modes}
        mode = args.conv_mode
        if mode is not None and owner.get(mode, self) is not self:
            raise ValueError(f"--conv-mode {mode} is {owner[mode].title}'s chat template; {args.model_path} is a "
                             f"{self.title} checkpoint (e.g. {self.conv_mode})")
        if self.exclusive and mode not in (None, *self.conv_modes):
            raise ValueError(f"{args.model_path} is a {self.title} checkpoint: it builds prompts with its own chat "
                             f"template; drop --conv-mode {mode} (allowed: {', '.join(self.conv_modes)})")
        self.check_options(args.model_path, {k: getattr(args, k, None) for k in family_options()})
        args.conv_mode = mode or self.default_conv_mode(args)
        args.family = self

    def default_conv_mode(self, args: argparse.Namespace) -> str:
        """The template a runner uses when ``--conv-mode`` is not given."""
        return self.conv_mode

    def encode(self, prompt: str, images: Sequence[Any], tokenizer: Any, processor: Any, config: Any
               ) -> tuple[torch.Tensor, Any, Any]:
        """``(input_ids (1, T), pixels or None, image sizes or None)`` of a templated ``prompt`` whose ``<image>``
        marks (already counted against ``images``) stand for ``images`` (PIL, in order), what ``generate`` and
        ``forward`` take as ``images`` / ``image_sizes``."""
        raise NotImplementedError

    def encode_video(self, prompt: str, frames: np.ndarray, sample_fps: float, tokenizer: Any, processor: Any,
                     config: Any) -> tuple[torch.Tensor, Any, Any]:
        """``(input_ids (1, T), visual inputs, None)`` of a templated ``prompt`` whose one ``<video>`` mark stands
        for ``frames`` (uint8 RGB (F, H, W, 3), sampled by :attr:`video_rule` at ``sample_fps`` frames per second),
        what ``generate`` takes as ``images``. A family without video refuses in one line."""
        self.check_video()
        raise NotImplementedError

    def video_grid(self, config: Any, processor: Any, frames: np.ndarray) -> tuple[int, int, int, int]:
        """``(steps, rows, cols, trailing)`` of a video's tokens (``frames``: the sampled frames (F, H, W, 3) as the
        family reads them): its tokens are ``steps`` row-major ``rows x cols`` maps in time order, step ``k``
        showing frames ``k * F / steps`` onwards, then ``trailing`` tokens that show no frame (LLaVA-OneVision's
        newline), for pictures of kept tokens."""
        self.check_video()
        raise NotImplementedError

    def check_video(self) -> None:
        """Refuse, in one line, video input to a family that takes none (:attr:`video_rule` None)."""
        if self.video_rule is None:
            able = ", ".join(f.title for f in families() if f.video_rule) or "none"
            raise ValueError(f"{self.title} takes no video input in this codebase (families with video: {able})")

    # -- the language model -----------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The language model's part of a config (or of a raw ``config.json`` dict): its ``text_config`` where it
        nests one, else the config itself."""
        if isinstance(config, Mapping):
            return config.get("text_config") or config
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def decoder_depth(self, config: Any) -> int:
        """The language model's number of decoder layers (a config or a raw ``config.json`` dict)."""
        if isinstance(config, Mapping):
            value = config.get("num_hidden_layers", self.text_config(config).get("num_hidden_layers"))
        else:
            value = self.text_config(config).num_hidden_layers
        return int(value)

    def check_method(self, reducer: Any) -> None:
        """Refuse, by name and in one line, an encoder-side method (or a composition's) whose requirements this
        family's vision tower lacks."""
        pre, _ = split_reducer(reducer)
        if pre is not None:
            from .encoder_stage import check_tower

            check_tower(pre, self.tower)

    # -- the image's tokens -----------------------------------------------------------------------------
    def image_layout(self, config: Any, processor: Any, image_size: tuple[int, int]) -> ImageLayout:
        """The unreduced token sequence of an image of ``image_size`` (width, height): which crop patch each of
        its tokens shows (:class:`llava.model.layout.ImageLayout`), as the model lays it out."""
        raise NotImplementedError

    def image_views(self, config: Any, processor: Any, image: Any) -> ImageViews:
        """Where the crops' patches lie on the picture the model encodes (:class:`llava.model.layout.ImageViews`),
        for drawing which tokens a method kept."""
        raise NotImplementedError

    def vision_flops(self, model: Any, state: PruneState) -> dict[str, int]:
        """``vision``: FLOPs of the vision tower (and projector or merger) on what the call encoded, which an
        encoder-side method does not save; ``encoder_selection``: what such a method computed on top."""
        raise NotImplementedError

    # -- benchmarks and tests ---------------------------------------------------------------------------
    def build_shape(self, shape: Shape, device: torch.device, dtype: torch.dtype, workdir: Path) -> tuple[Any, Any]:
        """A random-weight model of ``shape`` and its image processor (``llava.eval.bench --shape``)."""
        raise NotImplementedError

    def synthetic_input(self, model: Any, processor: Any, image: Any, n_text: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, Any, Any]:
        """``(ids, pixels, sizes)``: ``n_text`` random text ids (drawn from ``rng``) with ``image`` after a
        system-prompt-long prefix, as ``generate`` takes them."""
        raise NotImplementedError

    def synthetic_video(self, model: Any, processor: Any, size: tuple[int, int], n_frames: int, n_text: int,
                        rng: np.random.Generator) -> tuple[torch.Tensor, Any, Any]:
        """``(ids, visual inputs, None)``: ``n_text`` random text ids with a synthetic video of ``n_frames`` frames of
        ``size`` (width, height) read by the family's rule (``llava.eval.bench --video-frames``); a family without
        video refuses in one line."""
        self.check_video()
        raise NotImplementedError

    def bench_image_size(self, config: Any) -> tuple[int, int]:
        """The synthetic image's (width, height) for a real checkpoint (a typical benchmark photo)."""
        return (640, 480)

    def write_tiny(self, out_dir: str | os.PathLike, variant: str | None = None, seed: int = 0, layers: int = 4,
                   hidden: int | None = None, **overrides: Any) -> Path:
        """Write a tiny random checkpoint of ``variant`` (default: the first) in the official layout: ``layers``
        decoder layers of width ``hidden`` (default: the writer's), ``overrides`` replacing config keys."""
        raise NotImplementedError

    def _variant(self, variant: str | None) -> str:
        variant = variant or self.variants[0]
        if variant not in self.variants:
            raise ValueError(f"unknown {self.title} variant {variant!r}; allowed: {', '.join(self.variants)}")
        return variant


# ---------------------------------------------------------------------------------------------- registry
_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Register one instance of ``cls`` under ``cls.name`` (a class decorator); a second family of that name, or
    one claiming another's architecture, raises."""
    family = cls()
    if family.name in _FAMILIES and type(_FAMILIES[family.name]) is not cls:
        raise ValueError(f"a family named {family.name!r} is already registered ({type(_FAMILIES[family.name])})")
    for other in _FAMILIES.values():
        clash = set(other.architectures) & set(family.architectures)
        if other.name != family.name and clash:
            raise ValueError(f"family {family.name} claims {sorted(clash)}, already {other.name}'s")
    _FAMILIES[family.name] = family
    register_model_family(family)
    return cls


def families() -> list[Family]:
    """The registered families, in dispatch order."""
    return list(_FAMILIES.values())


def get_family(name: str | Family) -> Family:
    """The family registered as ``name`` (a family is returned as it is); an unknown name raises."""
    if isinstance(name, Family):
        return name
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_options() -> list[str]:
    """The loader options of every registered family (e.g. ``min_pixels``), sorted: the runner flags that only
    some families take."""
    return sorted({o.name for f in families() for o in f.options})


def variants() -> dict[str, Family]:
    """Every family's variants: ``{"llava-v1.5": <family llava>, ...}``."""
    return {v: f for f in families() for v in f.variants}


def family_of(config: Any) -> Family:
    """The family of a config (a transformers config or a raw ``config.json`` dict): by its ``architectures``
    when it lists any, else by its ``model_type``; an unsupported one raises, naming what is supported."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    archs = list(get("architectures", None) or [])
    model_type = get("model_type", None)
    for family in families():
        if set(archs) & set(family.architectures):
            return family
    if not archs:
        for family in families():
            if model_type in family.model_types:
                return family
    supported = "; ".join(f"{f.name} ({', '.join(f.architectures[:1] + f.model_types)})" for f in families())
    what = f"architectures {', '.join(archs)} (model_type {model_type!r})" if archs else f"model_type {model_type!r}"
    raise ValueError(f"{what}: not a supported model family; supported: {supported}")


def family_for_path(model_path: str) -> Family:
    """The family of a checkpoint: a local directory's ``config.json``, or a hub id's config (through
    transformers' cache or the hub)."""
    from .builder import check_checkpoint_dir
    from .checkpoint_checks import read_config_json

    if os.path.isdir(model_path):
        check_checkpoint_dir(model_path, tokenizer=False, weights=False)
    raw = read_config_json(model_path)  # a broken file or an unreachable hub id: one line
    try:
        return family_of(raw)
    except ValueError as e:
        raise ValueError(f"{model_path}: {e}") from None


def guess_family(model_path: str) -> Family:
    """The family of a checkpoint without a network: a local directory's config, else the hub id's name
    (:attr:`Family.hub_names`; default LLaVA). The loaded model's config is checked against it later."""
    path = os.path.expanduser(model_path)
    if os.path.isdir(path):
        return family_for_path(path)
    name = path.lower()
    for family in families():
        if any(h in name for h in family.hub_names):
            return family
    return get_family(DEFAULT_FAMILY)


for _module in FAMILY_MODULES:  # the registry entries: each module registers its family (after the names above)
    importlib.import_module(f"{__package__}.{_module}")
