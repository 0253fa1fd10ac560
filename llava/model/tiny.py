"""Write a tiny, deterministic, random-weight checkpoint in the official layout; random weights for shapes.

``python -m llava.model.tiny --arch llava-v1.5|llava-v1.6|qwen2_5_vl --out DIR [--seed N] [--layers N]``
(any registered family's variant: :func:`llava.model.families.variants`; ``qwen2_5_vl`` is written by
:mod:`llava.model.tiny_qwen`).

The directory holds ``config.json`` (model_type ``llava_llama`` and the mm_* keys), ``model.safetensors``
(``model.mm_projector.*``, ``model.image_newline`` for NeXT, ``lm_head``), a sentencepiece
``tokenizer.model`` with its config, and ``vision_tower/``: a tiny CLIP (336 px, patch 14, so 576 tokens per
view, like ViT-L/14-336) with its ``preprocessor_config.json``, referenced by a relative path. Tests, the demo
and benchmarks load it through :func:`llava.model.builder.load_pretrained_model`, exactly like a real one.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .tiny_tokenizer import write_tiny_tokenizer

logger = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ARCHES = ("llava-v1.5", "llava-v1.6")


def tiny_config(arch: str, vocab_size: int, layers: int = 4, hidden: int = 64, **overrides: Any) -> dict:
    """Config keys of a tiny checkpoint (vision tower path filled in by the writer)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown --arch {arch!r}; allowed: {', '.join(ARCHES)}")
    cfg = dict(
        architectures=["LlavaLlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=0.05,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        use_cache=True,
        torch_dtype="float32",
        mm_vision_tower="vision_tower",
        mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        freeze_mm_mlp_adapter=False,
        tokenizer_padding_side="right",
    )
    if arch == "llava-v1.5":
        cfg.update(image_aspect_ratio="pad", mm_patch_merge_type="flat", tokenizer_model_max_length=2048)
    else:
        cfg.update(
            image_aspect_ratio="anyres",
            mm_patch_merge_type="spatial_unpad",
            image_grid_pinpoints=NEXT_PINPOINTS,
            tokenizer_model_max_length=4096,
        )
    cfg.update(overrides)
    return cfg


def vision_config(size: str = "tiny") -> CLIPVisionConfig:
    """CLIP vision config at 336 px / patch 14: ``tiny`` (2 layers, width 32) or ``vit-l`` (ViT-L/14-336)."""
    if size == "vit-l":
        return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=336, patch_size=14, projection_dim=32)


def write_vision_configs(out: Path, vcfg: CLIPVisionConfig) -> None:
    """The vision tower's config and its CLIP image processor (336 px, CLIP mean/std), without weights."""
    vcfg.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3,
    ).save_pretrained(out)


def write_vision_tower(out: Path, seed: int) -> None:
    """A tiny random CLIP vision model with its image processor."""
    torch.manual_seed(seed)
    vcfg = vision_config("tiny")
    CLIPVisionModel(vcfg).save_pretrained(out, safe_serialization=True)
    write_vision_configs(out, vcfg)


def write_tiny_checkpoint(
    out_dir: str | os.PathLike, arch: str = "llava-v1.5", seed: int = 0, layers: int = 4, vocab_size: int = 1000,
    **overrides: Any,
) -> Path:
    """Write the checkpoint directory and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out, vocab_size=vocab_size)
    write_vision_tower(out / "vision_tower", seed + 1)
    cfg = LlavaConfig(**tiny_config(arch, vocab_size, layers=layers, **overrides))
    cfg.mm_vision_tower = str(out / "vision_tower")  # absolute while building; stored relative
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(cfg)
    model.config.mm_vision_tower = "vision_tower"
    model.save_pretrained(out, safe_serialization=True)
    logger.info("wrote tiny %s checkpoint to %s", arch, out)
    return out


BLOCK = 1_000_003  # a prime: rows of any power-of-two width start at different offsets of the block


def fill_random(model: torch.nn.Module, std: float, seed: int) -> None:
    """Fill a model materialised with ``to_empty`` (a benchmark shape built on the meta device): weights tile one
    N(0, std) block (each at its own offset), norm weights are 1, biases 0; the two non-persistent buffers (rotary
    frequencies, CLIP position ids) are recomputed. Seconds for a 7B shape, where a per-tensor random
    initialisation takes minutes; the values only need to be generic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                block = (torch.randn(BLOCK, generator=gen) * std).to(p.device, p.dtype)
                flat, n = p.view(-1), p.numel()
                reps = -(-n // BLOCK)
                flat.copy_(block.roll(i * 7919).repeat(reps)[:n])
        for module in model.modules():
            if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
                inv_freq, _ = module.rope_init_fn(module.config, module.inv_freq.device)
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq = module.inv_freq.clone()
            if hasattr(module, "position_ids") and hasattr(module, "num_positions"):
                module.position_ids.copy_(torch.arange(module.num_positions, device=module.position_ids.device)[None])


def main(argv: list[str] | None = None) -> None:
    from .families import variants

    every = variants()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(every), default="llava-v1.5", help="the family variant to write")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the language model")
    args = p.parse_args(argv)
    path = every[args.arch].write_tiny(args.out, args.arch, seed=args.seed, layers=args.layers, hidden=args.hidden)
    print(f"tiny {args.arch} checkpoint written to {path}")


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
