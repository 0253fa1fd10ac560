"""Image preprocessing, prompt tokenisation and small helpers shared by the LLaVA runners.

Size conventions follow upstream LLaVA and PIL: an image size is ``(width, height)`` (``PIL.Image.size``) and
every entry of ``image_grid_pinpoints`` is a ``(width, height)`` canvas. transformers' LLaVA-NeXT code uses
``(height, width)`` for both, yet reads a checkpoint's pinpoint list unchanged. The llava-v1.6 list is closed
under transposition, so the two agree except where transposed canvases tie (square images, and small images
that fit either canvas whole): there the first listed pair wins, a tall canvas here and a wide one in
transformers. Giving transformers ``[[h, w] for w, h in pinpoints]`` reproduces this module exactly.

Two preprocessing modes exist, selected by ``model_cfg.image_aspect_ratio``:

- ``"pad"`` (LLaVA-1.5): pad the image to a square with the processor's mean colour, then the CLIP processor
  (336x336, 576 visual tokens).
- ``"anyres"`` (LLaVA-NeXT): a base view squashed to 336x336 plus the crops of the image resized and
  zero-padded onto the best canvas from ``image_grid_pinpoints``; the model later removes the padding from the
  feature map (``unpad_image``) and appends one newline embedding per row.
"""

from __future__ import annotations

import ast
import base64
import logging
import math
from collections.abc import Mapping, Sequence
from io import BytesIO
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)

__all__ = [
    "load_image_from_base64",
    "expand2square",
    "parse_grid_pinpoints",
    "select_best_resolution",
    "resize_and_pad_image",
    "divide_to_patches",
    "get_anyres_image_grid_shape",
    "process_anyres_image",
    "unpad_image_shape",
    "unpad_image",
    "anyres_visual_token_count",
    "process_images",
    "tokenizer_image_token",
    "get_model_name_from_path",
    "KeywordsStoppingCriteria",
]

_RESAMPLE = Image.Resampling.BICUBIC  # PIL's default for RGB resize, and what CLIPImageProcessor uses
_PLAIN_ASPECT_MODES = (None, "", "square")


# ---------------------------------------------------------------------------------------------- images
def load_image_from_base64(image: str) -> Image.Image:
    """Decode a base64-encoded image (the MMBench TSV format)."""
    return Image.open(BytesIO(base64.b64decode(image)))


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...] | int) -> Image.Image:
    """Pad ``pil_img`` to a square of side ``max(width, height)`` filled with ``background_color``.

    The image is centred; when the margin is odd the extra pixel goes to the bottom/right. Square images are
    returned unchanged (the same object).
    """
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    canvas = Image.new(pil_img.mode, (side, side), background_color)
    canvas.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return canvas


def parse_grid_pinpoints(grid_pinpoints: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Normalise ``image_grid_pinpoints`` to a list of ``(width, height)`` int pairs.

    Accepts the list from a config (``[[336, 672], ...]``) or its string form (``"[(336, 672), ...]"``),
    which is parsed with ``ast.literal_eval`` (never ``eval``).
    """
    value: Any = grid_pinpoints
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"image_grid_pinpoints string {grid_pinpoints!r} is not a literal list of (width, height) pairs, "
                "e.g. '[(336, 672), (672, 336)]'"
            ) from err
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ValueError(
            f"image_grid_pinpoints must be a non-empty list of (width, height) pairs, got {grid_pinpoints!r}"
        )
    pairs: list[tuple[int, int]] = []
    for entry in value:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry)
        ):
            raise ValueError(
                f"every image_grid_pinpoints entry must be a pair of positive ints (width, height), got {entry!r}"
            )
        pairs.append((int(entry[0]), int(entry[1])))
    return pairs


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the canvas that keeps the most image detail, then wastes the least area.

    Args:
        original_size: ``(width, height)`` of the image.
        possible_resolutions: candidate ``(width, height)`` canvases.

    For each canvas the image is scaled to fit (aspect kept); the effective resolution is the scaled pixel
    count, capped at the original pixel count (no credit for upscaling), and the waste is the canvas area
    minus it. The first canvas with maximal effective resolution and, among those, minimal waste wins.
    """
    original_width, original_height = original_size
    best: tuple[int, int] | None = None
    best_key: tuple[int, int] | None = None
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled, original_width * original_height)
        key = (effective, -(width * height - effective))
        if best_key is None or key > best_key:
            best_key, best = key, (width, height)
    if best is None:
        raise ValueError("possible_resolutions is empty; give at least one (width, height) canvas")
    return best


def _size_pair(size: Sequence[Any]) -> tuple[int, int]:
    """``(width, height)`` as plain ints (accepts tuples, lists, tensors or arrays of two numbers)."""
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    if len(values) != 2:
        raise ValueError(f"an image size must be (width, height), got {size!r}")
    return int(values[0]), int(values[1])


def _fit_size(original_size: tuple[int, int], target_resolution: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of the image scaled to fit inside the target (aspect kept, rounded up, clamped)."""
    original_width, original_height = original_size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        return target_width, min(math.ceil(original_height * scale_w), target_height)
    return min(math.ceil(original_width * scale_h), target_width), target_height


def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to fit ``target_resolution`` (``(width, height)``) and centre it on a black canvas."""
    target_width, target_height = target_resolution
    new_width, new_height = _fit_size(image.size, (target_width, target_height))
    resized = image.resize((new_width, new_height), resample=_RESAMPLE)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Cut ``image`` into ``patch_size`` squares in row-major order (edge patches may be smaller)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(
    image_size: tuple[int, int], grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """``(num_patch_width, num_patch_height)``: the crop grid anyres uses for an image of ``(width, height)``."""
    width, height = select_best_resolution(_size_pair(image_size), parse_grid_pinpoints(grid_pinpoints))
    return width // patch_size, height // patch_size


def _processor_sizes(processor: Any) -> tuple[int, int]:
    """(base view side, crop side) from a CLIP-style image processor's ``size`` and ``crop_size``."""
    size = processor.size
    base = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
    return int(base), int(processor.crop_size["height"])


def process_anyres_image(
    image: Image.Image, processor: Any, grid_pinpoints: str | Sequence[Sequence[int]]
) -> torch.Tensor:
    """LLaVA-NeXT anyres preprocessing of one image.

    Returns a float tensor ``(1 + num_crops, 3, H, W)``: first the whole image resized (not padded) to the
    processor's base size, then the crops of the image fitted and zero-padded onto the best canvas, in
    row-major order, each passed through ``processor``.
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    best_resolution = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints))
    base_side, crop_side = _processor_sizes(processor)
    crops = divide_to_patches(resize_and_pad_image(image, best_resolution), crop_side)
    base = image.resize((base_side, base_side), resample=_RESAMPLE)
    pixel_values = processor.preprocess([base, *crops], return_tensors="pt", input_data_format="channels_last")[
        "pixel_values"]
    return pixel_values  # (1 + num_crops, 3, H, W)


def unpad_image_shape(
    current_height: int, current_width: int, original_size: tuple[int, int]
) -> tuple[int, int]:
    """``(height, width)`` of a ``current_height x current_width`` feature map after removing anyres padding.

    ``original_size`` is the image's ``(width, height)``. The image was fitted into the canvas keeping its
    aspect, so along the padded axis its extent is ``floor(original * current / original_other)``; the same
    number of rows (columns) ``(current - extent) // 2`` is cut from both ends, so an odd margin leaves one
    padded row (column) in place, as in LLaVA-NeXT. Integer arithmetic is used, which equals transformers'
    ``unpad_image`` and, except for rare float-rounding cases, upstream LLaVA's float version.
    """
    original_width, original_height = _size_pair(original_size)
    if original_width * current_height > original_height * current_width:  # image wider than the map
        extent = original_height * current_width // original_width
        padding = (current_height - extent) // 2
        return current_height - 2 * padding, current_width
    extent = original_width * current_height // original_height
    padding = (current_width - extent) // 2
    return current_height, current_width - 2 * padding


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Crop the anyres padding off a ``(C, H, W)`` feature map of an image of ``(width, height)``."""
    current_height, current_width = tensor.shape[-2:]
    height, width = unpad_image_shape(int(current_height), int(current_width), original_size)
    top = (current_height - height) // 2
    left = (current_width - width) // 2
    return tensor[..., top : top + height, left : left + width]  # (C, height, width)


def anyres_visual_token_count(
    image_size: tuple[int, int],
    grid_pinpoints: str | Sequence[Sequence[int]],
    patch_size: int = 336,
    grid: int = 24,
    base_tokens: int = 576,
    newline: bool = True,
) -> int:
    """Length of the LLaVA-NeXT visual span (``spatial_unpad`` merge) for an image of ``(width, height)``.

    ``base_tokens`` for the base view, plus the unpadded high-resolution map (``grid`` features per crop side),
    plus one newline embedding per map row when ``newline``. Example: llava-v1.6 pinpoints and a 640x480
    image pick the 672x672 canvas, a 48x48 map unpadded to 36x48, so 576 + 1728 + 36 = 2340.
    """
    num_w, num_h = get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size)
    height, width = unpad_image_shape(num_h * grid, num_w * grid, _size_pair(image_size))
    return base_tokens + height * width + (height if newline else 0)


def _cfg_get(model_cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(model_cfg, Mapping):
        return model_cfg.get(key, default)
    return getattr(model_cfg, key, default)


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Preprocess ``images`` the way the checkpoint's ``image_aspect_ratio`` asks.

    PIL images are height x width x channels, which is said to the processor: it would otherwise guess, and
    takes a 1x1 or 3x3 image for channels-first.

    Args:
        images: PIL images (converted to RGB here).
        image_processor: a transformers ``CLIPImageProcessor``.
        model_cfg: model config (or dict) with ``image_aspect_ratio`` and, for anyres, ``image_grid_pinpoints``.

    Returns:
        ``(N, 3, H, W)`` for pad/plain, ``(N, 1 + crops, 3, H, W)`` for anyres when every image has the same
        number of crops; otherwise a list of per-image tensors.
    """
    aspect = _cfg_get(model_cfg, "image_aspect_ratio")
    images = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
    if aspect in _PLAIN_ASPECT_MODES:
        return image_processor(images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    if aspect == "pad":
        fill = tuple(int(x * 255) for x in image_processor.image_mean)
        processed = [
            image_processor.preprocess(expand2square(im, fill), return_tensors="pt",
                                       input_data_format="channels_last")["pixel_values"][0]
            for im in images
        ]
    elif aspect == "anyres":
        pinpoints = _cfg_get(model_cfg, "image_grid_pinpoints")
        if pinpoints is None:
            raise ValueError("image_aspect_ratio='anyres' needs image_grid_pinpoints in the model config")
        processed = [process_anyres_image(im, image_processor, pinpoints) for im in images]
    else:
        raise ValueError(
            f"unsupported image_aspect_ratio {aspect!r}; allowed: 'pad', 'anyres', 'square' or unset (plain resize)"
        )
    if processed and all(t.shape == processed[0].shape for t in processed):
        return torch.stack(processed, dim=0)
    return processed


# ---------------------------------------------------------------------------------------------- text
def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenise ``prompt`` with every ``<image>`` replaced by the id ``image_token_index``.

    The text between image markers is tokenised chunk by chunk. When the tokenizer adds a BOS, the result has
    exactly one, at the start; BOS ids that tokenising the later chunks produced are dropped.

    Args:
        return_tensors: ``None`` for a list of ints, ``"pt"`` for a 1-D ``torch.long`` tensor.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"unsupported return_tensors {return_tensors!r}; allowed: None, 'pt'")
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = getattr(tokenizer, "bos_token_id", None)
    has_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    input_ids: list[int] = [bos] if has_bos else []
    for i, ids in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        if has_bos and ids and ids[0] == bos:
            ids = ids[1:]
        input_ids.extend(ids)
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


def get_model_name_from_path(model_path: str) -> str:
    """Model name for answer files: the last path component, or ``parent_checkpoint-N`` for checkpoints."""
    parts = [p for p in model_path.strip("/").split("/") if p]
    if not parts:
        raise ValueError(f"cannot derive a model name from path {model_path!r}")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop generation once any keyword string appears in the newly generated text.

    Args:
        keywords: stop strings, e.g. ``[conv.sep2]``.
        tokenizer: used to decode the generated ids (special tokens kept, so "</s>" can match).
        input_ids: the prompt ids when ``generate`` returns prompt + new tokens; ``None`` when it returns only
            new tokens (generation from ``inputs_embeds``, as LLaVA does).

    Returns, per call, a ``(batch,)`` bool tensor: True for the rows whose recent output contains a keyword.
    Only the last few tokens are decoded each step (enough to cover the longest keyword), so the cost per
    step does not grow with the output length.
    """

    def __init__(
        self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor | None = None
    ) -> None:
        keywords = [k for k in keywords if k]
        if not keywords:
            raise ValueError("KeywordsStoppingCriteria needs at least one non-empty keyword")
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.start_len = 0 if input_ids is None else int(input_ids.shape[-1])
        # A keyword spans at most one token per UTF-8 byte (byte fallback), plus one straddling token.
        self.window = max(len(k.encode("utf-8")) for k in self.keywords) + 2

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.BoolTensor:
        new_ids = input_ids[:, self.start_len :] if input_ids.shape[-1] >= self.start_len else input_ids
        tail = new_ids[:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        done = [any(k in text for k in self.keywords) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
