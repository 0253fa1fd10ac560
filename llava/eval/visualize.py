"""Pictures of which visual tokens each method keeps: the input image, then one panel per method and stage.

Run the methods on one image and query::

    python -m llava.eval.visualize --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg \\
        --query "What is in the picture?" --methods pio,fastv,dart,visionzip --budget 64 --out fig.png

or on a video (``--video-file clip.mp4`` and the frame flags of ``llava.video``: the kept tokens on a strip of
the frames, one tile per step of the video's tokens, e.g. per pair of frames for Qwen2.5-VL), or draw what a run
already logged (``--pio-log`` of a runner; the model's config and image processor are read
for the geometry, no weights)::

    python -m llava.eval.visualize --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg \\
        --pio-log answers/pio.log.jsonl --question-id 17 --out fig.png

In a panel the image patches of the kept tokens are shown as they are and those of dropped tokens dimmed; its
title names the method, the stage (before the language model, or after decoder layer L) and the kept count.
Positions are mapped back to pixels the way the model's preprocessing laid them out: LLaVA-1.5's 24x24 grid on
the padded (``pad``) or resized and centre-cropped square; LLaVA-NeXT's base view and its high-resolution grid
of anyres crops (two rows per method; newline tokens have no pixels; unpadded rows and columns removed as the
model removes them); Qwen2.5-VL's merged 2x2 patches on its resized grid. Tokens a method merged or added
(SparseVLM's recycled tokens, VisionZip's contextual tokens) have no place in the image and are counted in the
title. Only Pillow and numpy are needed.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DIM = 0.25  # brightness of the patches of dropped tokens
DISPLAY = 336  # longest side of a panel, in pixels


# --------------------------------------------------------------------------- geometry
@dataclass
class View:
    """One view of the image as the model tokenised it: for every display pixel, the position of the visual
    token covering it in the image's unreduced token sequence (-1: no token covers it)."""

    name: str
    positions: np.ndarray  # (h, w) int64
    tokens: np.ndarray  # the positions of this view's tokens, sorted


@dataclass
class Layout:
    """The views of one image, the length of its unreduced token sequence (newline tokens included) and the
    picture the views' pixels index (the image, or the padded square LLaVA-1.5 encodes)."""

    views: list[View]
    n_tokens: int
    canvas: Any = None  # PIL image
    note: str = ""  # how the canvas differs from the image


def _display_size(size: tuple[int, int], longest: int = DISPLAY) -> tuple[int, int]:
    w, h = size
    scale = longest / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _pixel_centres(size: tuple[int, int], display: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Original-image coordinates (x (1, dw), y (dh, 1)) of the display pixels' centres."""
    (w, h), (dw, dh) = size, display
    return ((np.arange(dw) + 0.5) * w / dw)[None, :], ((np.arange(dh) + 0.5) * h / dh)[:, None]


def _view(name: str, positions: np.ndarray, tokens: np.ndarray) -> View:
    return View(name, positions, np.sort(tokens))


def image_layout(config: Any, processor: Any, image: Any, longest: int = DISPLAY) -> Layout:
    """The layout of ``image`` (PIL) for a model of ``config`` and its image ``processor``, on panels whose
    longest side is ``longest`` pixels, from the model's family: the picture it encodes (LLaVA's ``pad`` layout
    on the padded square, so that tokens of the padding show too), its views, and the positions of their tokens
    in the image's unreduced sequence as the model lays it out (:meth:`llava.model.families.Family.image_layout`)."""
    from llava.model.families import family_of

    image = image.convert("RGB")
    family = family_of(config)
    views = family.image_views(config, processor, image)
    tokens = family.image_layout(config, processor, image.size)
    display = _display_size(views.canvas.size, longest)
    x, y = _pixel_centres(views.canvas.size, display)
    out = [_view(v.name, tokens.positions(v.patch_at(x, y)), tokens.tokens_of(v.crops)) for v in views.views]
    return Layout(out, tokens.n, views.canvas, views.note)


STRIP_COLUMNS = 8  # steps of a video per row of its strip
STRIP_GAP = 4  # canvas pixels between the frames of a strip


def video_layout(frames: np.ndarray, grid: tuple[int, int, int, int], longest: int = DISPLAY) -> Layout:
    """The layout of a video's tokens on a strip of its frames: ``grid = (steps, rows, cols, trailing)``
    (:meth:`llava.model.families.Family.video_grid`), step ``k``'s ``rows x cols`` tokens over the first frame it
    encodes, the steps left to right in rows of :data:`STRIP_COLUMNS`; one view, positions in time order; the
    ``trailing`` tokens after the maps are counted, not drawn."""
    from PIL import Image

    steps, rows, cols, trailing = grid
    n_frames, fh, fw = frames.shape[:3]
    per_step = -(-n_frames // steps)
    n_cols = min(steps, STRIP_COLUMNS)
    n_rows = -(-steps // n_cols)
    W, H = n_cols * fw + (n_cols - 1) * STRIP_GAP, n_rows * fh + (n_rows - 1) * STRIP_GAP
    canvas = np.full((H, W, 3), 255, np.uint8)
    for k in range(steps):
        y, x = (k // n_cols) * (fh + STRIP_GAP), (k % n_cols) * (fw + STRIP_GAP)
        canvas[y:y + fh, x:x + fw] = frames[min(k * per_step, n_frames - 1)]
    display = _display_size((W, H), max(longest, 160 * n_cols))
    x, y = _pixel_centres((W, H), display)
    tx, ty = np.floor(x / (fw + STRIP_GAP)).astype(np.int64), np.floor(y / (fh + STRIP_GAP)).astype(np.int64)
    ix, iy = x - tx * (fw + STRIP_GAP), y - ty * (fh + STRIP_GAP)  # inside the tile (or in the gap past it)
    step = ty * n_cols + tx
    c, r = np.floor(ix * cols / fw).astype(np.int64), np.floor(iy * rows / fh).astype(np.int64)
    c, r, step = np.broadcast_arrays(c, r, step)
    inside = (c < cols) & (r < rows) & (step < steps)
    positions = np.where(inside, step * rows * cols + r * cols + c, -1)
    note = f"{n_frames} frames, {steps} steps of {per_step}"
    if trailing:
        note += f"; {trailing} token(s) after the frames not drawn"
    return Layout([_view("video", positions, np.arange(steps * rows * cols))], steps * rows * cols + trailing,
                  Image.fromarray(canvas), note)


# --------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """What a method kept at one stage: ``kept`` positions in the image's unreduced token sequence, and the
    tokens it kept that have no position there (merged or added by the method)."""

    label: str
    kept: np.ndarray
    placeless: int = 0


def stages_of(record: dict[str, Any]) -> list[Stage]:
    """The stages of one reduction-log line (or :meth:`pio.PruneState.report` entry): the encoder-side stage
    (``encoder_kept``) and each in-LLM stage, kept positions composed back to the unreduced sequence."""
    out = []
    enc = record.get("encoder_kept")
    enc = np.asarray(enc, dtype=np.int64) if enc is not None else None
    if enc is not None:
        out.append(Stage("before the LLM", enc[enc >= 0], int((enc < 0).sum())))
    for st in record.get("stages", []):
        kept = np.asarray(st["kept"], dtype=np.int64)
        real = kept[kept >= 0]
        pos = enc[real] if enc is not None else real
        out.append(Stage(f"after layer {st['layer']}", pos[pos >= 0], int((kept < 0).sum() + (pos < 0).sum())))
    if not out:  # nothing pruned: every token kept
        n = int(record.get("n_visual", 0))
        out.append(Stage("no reduction", np.arange(n)))
    return out


# --------------------------------------------------------------------------- drawing
@dataclass
class Panel:
    """One panel of a figure: ``origin`` (x, y) of its image in the figure, what it shows."""

    method: str
    stage: Stage
    view: View
    origin: tuple[int, int]
    kept_in_view: int


@dataclass
class Figure:
    image: Any  # PIL image
    panels: list[Panel]
    size: tuple[int, int]  # the panels' image size (width, height)
    input_origin: tuple[int, int]  # where the undimmed input panel sits


def overlay(pixels: np.ndarray, view: View, kept: np.ndarray) -> np.ndarray:
    """``pixels`` (h, w, 3) uint8 with the pixels of tokens not in ``kept`` dimmed (and those no token covers)."""
    lit = np.isin(view.positions, kept) & (view.positions >= 0)
    dim = np.round(pixels.astype(np.float32) * DIM).astype(np.uint8)
    return np.where(lit[..., None], pixels, dim)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_figure(image: Any, layout: Layout, runs: Sequence[tuple[str, list[Stage]]], title: str | None = None
                ) -> Figure:
    """The figure: the input image, then per method (and view) one row of panels, one per stage.

    Args:
        image: the input (PIL).
        layout: the image's layout (:func:`image_layout`).
        runs: ``(method label, stages)`` per method.
    """
    from PIL import Image, ImageDraw

    views = layout.views
    dh, dw = views[0].positions.shape
    pixels = np.asarray(layout.canvas.convert("RGB").resize((dw, dh), Image.Resampling.BICUBIC))
    pad, band = 10, 40  # margins, and the title band above each panel
    n_cols = 1 + max((len(st) for _, st in runs), default=0)
    n_rows = max(1, len(runs) * len(views))
    head = 28 if title else 0
    W = pad + n_cols * (dw + pad)
    H = head + pad + n_rows * (band + dh + pad)
    fig = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    font, small = _font(14), _font(12)
    if title:
        draw.text((pad, 8), title, fill=(0, 0, 0), font=font)
    top = head + pad
    fig.paste(Image.fromarray(pixels), (pad, top + band))
    draw.text((pad, top + 4), "input", fill=(0, 0, 0), font=font)
    draw.text((pad, top + 22), f"{image.size[0]}x{image.size[1]} px{', ' + layout.note if layout.note else ''}",
              fill=(90, 90, 90), font=small)
    panels = []
    row = 0
    for label, stages in runs:
        for view in views:
            y = top + row * (band + dh + pad)
            for j, st in enumerate(stages):
                x = pad + (j + 1) * (dw + pad)
                kept_in_view = int(np.isin(view.tokens, st.kept).sum())
                fig.paste(Image.fromarray(overlay(pixels, view, st.kept)), (x, y + band))
                draw.text((x, y + 4), f"{label} · {st.label}", fill=(0, 0, 0), font=font)
                where = f"{view.name}: " if len(views) > 1 else ""
                note = f"{where}{kept_in_view}/{len(view.tokens)} kept"
                if st.placeless and view is views[-1]:
                    note += f" (+{st.placeless} merged or added)"
                draw.text((x, y + 22), note, fill=(90, 90, 90), font=small)
                panels.append(Panel(label, st, view, (x, y + band), kept_in_view))
            row += 1
    return Figure(fig, panels, (dw, dh), (pad, top + band))


# --------------------------------------------------------------------------- sources
def read_log_record(path: str, question_id: str | None) -> dict[str, Any]:
    """One line of a reduction log: the one of ``question_id``, or the only one."""
    from llava.eval.results import read_jsonl

    lines = read_jsonl(path)
    if question_id is None:
        if len(lines) != 1:
            raise ValueError(f"{path} has {len(lines)} lines; choose one with --question-id")
        return lines[0]
    found = [r for r in lines if str(r.get("question_id")) == str(question_id)]
    if not found:
        shown = ", ".join(str(r.get("question_id")) for r in lines[:8])
        raise ValueError(f"{path} has no line for question id {question_id} (it has {shown}{' ...' * (len(lines) > 8)})")
    return found[0]


def load_geometry(model_path: str, **options: Any):
    """``(config, image processor)`` of a checkpoint, without its weights (its family's loader ``options``, e.g.
    Qwen2.5-VL's ``min_pixels``; None values are not given)."""
    from llava.model.families import family_for_path

    path = os.path.expanduser(model_path)
    family = family_for_path(path)
    given = {k: v for k, v in options.items() if v is not None}
    family.check_options(model_path, given)
    return family.load_geometry(path, **given)


def run_methods(args: argparse.Namespace, names: Sequence[str], image: Any, loaded: tuple | None = None,
                video: Any = None) -> tuple[list[tuple[str, dict[str, Any]]], Any, Any]:
    """Prefill ``image`` (or ``video``, a :class:`llava.video.Video`) and ``args.query`` once per method;
    ``([(name, log record)], config, processor)``."""
    import copy

    from llava.constants import DEFAULT_VIDEO_TOKEN
    from llava.eval import runner
    from pio.cli import method_from_args
    from pio.encoder import EncoderMethod
    from pio.registry import get_method

    methods = []
    for spec in names:
        ns = copy.copy(args)
        name, _, layers = spec.partition("@")
        ns.method = name
        if layers:
            ns.layers = layers.replace("/", ",")
        elif "+" not in name and name != "none" and issubclass(get_method(name), EncoderMethod):
            ns.layers = None  # the schedule flags are the in-LLM methods'; an encoder method takes the budget
        runner.resolve_family_args(ns)
        methods.append(method_from_args(ns))
    runner.resolve_family_args(args)
    runner.check_conv_mode(args.conv_mode)
    tok, model, proc, _ = runner.load_model(args, None, loaded)
    depth = runner.decoder_depth(model.config)
    for m in methods:
        if m is not None:
            args.family.check_method(m)
            m.validate(depth)
    if video is not None:
        prompt = runner.chat_prompt(f"{DEFAULT_VIDEO_TOKEN}\n{args.query}", args.conv_mode)
        ids, pixels, sizes = args.family.encode_video(prompt, video.frames, video.sample_fps, tok, proc, model.config)
    else:
        token = runner.image_token(getattr(model.config, "mm_use_im_start_end", False))
        ids, pixels, sizes = runner.encode(runner.chat_prompt(f"{token}\n{args.query}", args.conv_mode), [image],
                                           tok, proc, model.config)
    pixels = runner.to_model(pixels, model)
    args.max_new_tokens = 1  # the prefill decides; one token is enough
    out = []
    for name, m in zip(names, methods):
        _, state, _ = runner.generate(model, tok, ids, pixels, sizes, args, m)
        out.append((name, runner.log_record(None, state)))
    return out, model.config, proc


DEFAULT_METHODS = "pio,fastv,dart,visionzip"  # the paper's figure: PIO, text-to-image attention, diversity, CLS


def build_parser() -> argparse.ArgumentParser:
    from llava.eval import runner
    from llava.video import add_video_args

    p = argparse.ArgumentParser(description="Draw which visual tokens each method keeps on one image or video.")
    p.add_argument("--image-file", default=None)
    p.add_argument("--video-file", default=None,
                   help="a video instead of --image-file: kept tokens on a strip of its frames (families with video; "
                        "frames by the family's rule and the frame flags)")
    p.add_argument("--query", default="Describe the image in detail.",
                   help="the question the methods see (text-aware methods choose by it)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default {DEFAULT_METHODS}): the registry's names, compositions such "
                        "as scan+pio, or none; NAME@L1/L2 moves a method's stages to layers L1, L2 (e.g. on a small "
                        "model); with --pio-log, the labels of the logs (default: their file names)")
    p.add_argument("--question-id", default=None, help="with --pio-log: the logged question to draw")
    p.add_argument("--out", default="kept_tokens.png")
    runner.add_common_args(p, conv_mode=None, max_new_tokens=1)
    add_video_args(p)
    p.set_defaults(temperature=0.0)
    return p


def make_figure(args: argparse.Namespace, loaded: tuple | None = None) -> Figure:
    """The figure the flags describe (``loaded``: an already loaded ``(tokenizer, model, processor, name)``)."""
    from llava.eval import runner

    if args.method is not None:
        raise ValueError("visualize takes --methods (one or more, comma-separated), not --method")
    if args.loyalty_to or args.schedule_file:
        raise ValueError("visualize draws the methods of --methods; --loyalty-to and --schedule-file apply to the "
                         "question runners")
    if (args.image_file is None) == (args.video_file is None):
        raise ValueError("give one of --image-file or --video-file")
    video = _read_video(args) if args.video_file else None
    image = runner.load_image(args.image_file) if video is None else None
    names = [n.strip() for n in (args.methods or DEFAULT_METHODS).split(",") if n.strip()]
    if not names:
        raise ValueError(f"--methods is empty; give at least one method, e.g. {DEFAULT_METHODS}")
    if args.pio_log:
        logs = [s.strip() for s in args.pio_log.split(",") if s.strip()]
        if args.methods is not None and len(names) != len(logs):
            raise ValueError(f"--methods names {len(names)} labels for {len(logs)} --pio-log files; give one each")
        labels = names if args.methods is not None else [os.path.basename(f).split(".")[0] for f in logs]
        records = [(lab, read_log_record(f, args.question_id)) for lab, f in zip(labels, logs)]
        config, processor = load_geometry(args.model_path, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        source = "from the run's log"
    else:
        if args.budget is None and not any(getattr(args, k, None) for k in ("tokens", "ratios", "budget_ratio",
                                                                            "budget_tokens")):
            args.budget = "64"  # the paper's tightest budget, where the methods differ most
        records, config, processor = run_methods(args, names, image, loaded, video)
        source = f"budget {args.budget}" if args.budget is not None else ""
    if video is not None:
        from llava.model.families import family_of

        layout = video_layout(video.frames, family_of(config).video_grid(config, processor, video.frames))
        image = layout.canvas
    else:
        layout = image_layout(config, processor, image)
    for label, rec in records:
        n = rec.get("n_encoder", rec.get("n_visual"))
        if n != layout.n_tokens:
            what, flags = ("video", "the frame flags") if video is not None else ("image", "--min-pixels/--max-pixels")
            raise ValueError(f"{label}: the log has {n} visual tokens for this {what}, but the model lays it out in "
                             f"{layout.n_tokens}: is it the {what} (and {flags}) the run used?")
    model = os.path.basename(os.path.normpath(args.model_path))
    return draw_figure(image, layout, [(lab.partition("@")[0], stages_of(rec)) for lab, rec in records],
                       title=f"{os.path.basename(args.image_file or args.video_file)} · {model}"
                             f"{' · ' + source if source else ''}")


def _read_video(args: argparse.Namespace) -> Any:
    """The video's frames sampled by the checkpoint's family's rule and the frame flags (one-line refusal for a
    family without video)."""
    from llava.eval import runner
    from llava.video import VideoSampling, load_video

    runner.resolve_family_args(args)
    args.family.check_video()
    return load_video(args.video_file, VideoSampling.from_args(args, args.family.video_rule))


def main(argv: list[str] | None = None) -> str:
    from llava.eval import runner

    args = build_parser().parse_args(argv)
    runner.setup_logging()
    from llava.utils import ensure_writable

    ensure_writable(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}")  # before the model loads
    fig = make_figure(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.image.save(args.out)
    logger.info("wrote %s (%d panels)", args.out, len(fig.panels))
    print(args.out)
    return args.out


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
