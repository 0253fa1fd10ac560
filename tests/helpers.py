"""Test helpers: synthetic images and prompts."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (gradients plus noise blocks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    blocks = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3))
    noise = np.kron(blocks, np.ones((32, 32, 1)))[:height, :width]
    return Image.fromarray(((base + noise) // 2).astype(np.uint8))


def prompt_ids(tokenizer, question: str, with_image: bool = True, mode: str = "vicuna_v1") -> torch.Tensor:
    conv = conv_templates[mode].copy()
    conv.append_message(conv.roles[0], ("<image>\n" if with_image else "") + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


def pixels(images, processor, model):
    return process_images(images, processor, model.config)


QWEN_TEST_PIXELS = (3136, 100352)  # tiny Qwen tests: 4 to 128 merged visual tokens per image (not 1008^2)


TEST_OPTIONS = {"qwen2_5_vl": dict(zip(("min_pixels", "max_pixels"), QWEN_TEST_PIXELS, strict=True))}
"""Loader options of a family's tiny checkpoints in the tests (by family name)."""


def family_flags(variant: str) -> list[str]:
    """The runner flags of a variant's tiny checkpoint in the tests: its family's template and test options."""
    from llava.model.families import variants

    family = variants()[variant]
    options = TEST_OPTIONS.get(family.name, {})
    return ["--conv-mode", family.conv_mode, *[x for k, v in options.items() for x in (f"--{k.replace('_', '-')}",
                                                                                         str(v))]]


def load(path: str, attn: str = "sdpa", dtype: str = "float32"):
    """Load a tiny checkpoint on CPU through the real builder (with its family's :data:`TEST_OPTIONS`)."""
    from llava.model.builder import load_pretrained_model
    from llava.model.families import family_for_path

    extra = TEST_OPTIONS.get(family_for_path(path).name, {})
    return load_pretrained_model(path, device="cpu", torch_dtype=dtype, attn_implementation=attn, **extra)


def encode(models, arch: str, question: str, images=(), mode: str | None = None):
    """``(input_ids (1, T), kwargs)`` of one question with ``images`` for ``models[arch]`` (a variant) in its
    family's default template; kwargs carry the pixels and sizes (LLaVA: image sizes; Qwen2.5-VL: its grids)
    under the names ``generate`` and ``forward`` take (``images``, ``image_sizes``)."""
    from llava.eval.runner import chat_prompt
    from llava.eval.runner import encode as encode_prompt
    from llava.model.families import variants

    tok, model, proc = models[arch]
    mode = mode or variants()[arch].conv_mode
    prompt = chat_prompt("<image>\n" * len(images) + question, mode)
    ids, px, sizes = encode_prompt(prompt, list(images), tok, proc, model.config)
    return ids, ({"images": px, "image_sizes": sizes} if images else {})


def left_padded_pair(tok, proc, model, dtype=torch.float64):
    """Two different image questions, left-padded as generation needs: ``(ids, mask, pixels)``."""
    imgs = [image(500, 400, seed=21), image(280, 420, seed=22)]
    seqs = [prompt_ids(tok, "What is in the picture?"), prompt_ids(tok, "Count the red things, please.")]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    return ids, mask, pixels(imgs, proc, model).to(dtype)
