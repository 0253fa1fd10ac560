"""Video input: decode a file to RGB frames, sample them as each family's authors do, and build the families' inputs.

Two sampling rules (facts from the authors' code, sources in ``docs/video-notes.md``); a family names its own
(:attr:`llava.model.families.Family.video_rule`):

* ``"smart"`` (Qwen2.5-VL's, named after qwen-vl-utils' ``smart_nframes`` / ``smart_resize``): ``qwen-vl-utils``
  0.0.10 (``smart_nframes`` / ``fetch_video``). The frame count is ``--num-frames`` rounded to a multiple of 2, or
  else ``duration x fps`` (default 2 frames per second) clamped to ``[min_frames, max_frames]`` (4, 768; both
  rounded to multiples of 2, the upper one also capped by the video's frame count) and floored to a multiple of 2; frames are taken at ``round(linspace(0, total - 1, n))``. Every frame
  is then resized with ``smart_resize`` (sides multiples of 28) to a pixel budget between ``min_pixels`` (128 x 28 x
  28) and ``min(768 x 28 x 28, total_pixels / n x 2)`` (at least ``1.05 x min_pixels``), optionally lowered by
  ``max_pixels``, with bicubic antialiased interpolation.
* ``"uniform"``: LLaVA-OneVision as lmms-eval runs it (``llava_onevision.load_video``): ``--num-frames`` (default
  32) frames at ``int(linspace(0, total - 1, n))``, never more than the video has; frames keep their size (the
  family's preprocessing resizes them: :func:`onevision_video_inputs`).

:func:`load_video` decodes with PyAV (the ``video`` extra); :func:`qwen_video_inputs` turns sampled frames into
``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` exactly as transformers' slow
``Qwen2VLImageProcessor`` video path and ``Qwen2_5_VLProcessor`` do; :func:`onevision_video_inputs` into
LLaVA-OneVision's ``pixel_values_videos`` (every frame one view, as its image processor preprocesses a single
image). :func:`encode_video` writes small test clips.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llava.utils import import_av

logger = logging.getLogger(__name__)

# qwen-vl-utils 0.0.10, vision_process.py (QwenLM/Qwen2.5-VL)
QWEN_FRAME_FACTOR = 2
QWEN_IMAGE_FACTOR = 28
QWEN_FPS = 2.0
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768
QWEN_MIN_PIXELS = 128 * 28 * 28
QWEN_MAX_PIXELS = 768 * 28 * 28
QWEN_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # its default when the VIDEO_MAX_PIXELS variable is unset
# lmms-eval llava_onevision: max_frames_num=32
UNIFORM_NUM_FRAMES = 32
RULES = ("smart", "uniform")
_RESIZE_CHUNK = 8  # frames per interpolate call: bounds float32 memory on long, large videos


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a video (module docstring); :meth:`record` goes into result JSONs.

    ``None`` fields take the rule's defaults (:meth:`resolved`). ``num_frames`` and ``fps`` exclude each other under
    the ``smart`` rule, as in qwen-vl-utils; the ``uniform`` rule takes ``num_frames`` only. Pixel fields are per
    frame and belong to the ``smart`` rule.
    """

    rule: str = "smart"
    num_frames: int | None = None
    fps: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown video sampling rule {self.rule!r}; choose from {', '.join(RULES)}")
        for name in ("num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"video {name} must be a positive integer, got {value!r}")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"video fps must be a positive number, got {self.fps!r}")
        if self.rule == "smart" and self.num_frames is not None and self.fps is not None:
            raise ValueError("give either the number of frames or fps for the smart rule's (Qwen2.5-VL's) video "
                             "sampling, not both")
        if self.rule == "uniform":
            smart_only = [n for n in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels")
                          if getattr(self, n) is not None]
            if smart_only:
                raise ValueError(f"{', '.join(smart_only)} belong to the smart rule (Qwen2.5-VL's video sampling); "
                                 "the uniform rule (LLaVA-OneVision) takes only the number of frames")

    def resolved(self) -> VideoSampling:
        """The same options with the rule's defaults filled in (``max_pixels`` stays None: a per-video budget)."""
        if self.rule == "uniform":
            return replace(self, num_frames=self.num_frames or UNIFORM_NUM_FRAMES)
        return replace(
            self,
            fps=None if self.num_frames is not None else (self.fps or QWEN_FPS),
            min_frames=self.min_frames or QWEN_MIN_FRAMES,
            max_frames=self.max_frames or QWEN_MAX_FRAMES,
            min_pixels=self.min_pixels or QWEN_MIN_PIXELS,
            total_pixels=self.total_pixels or QWEN_TOTAL_PIXELS,
        )

    def record(self) -> dict[str, Any]:
        """The resolved options as a plain dict, for result JSONs and run descriptions."""
        return asdict(self.resolved())

    @classmethod
    def from_args(cls, args: argparse.Namespace, rule: str) -> VideoSampling:
        """The options of :func:`add_video_args` for a family's ``rule``."""
        return cls(rule=rule, num_frames=args.num_frames, fps=args.fps, min_pixels=args.video_min_pixels,
                   max_pixels=args.video_max_pixels, total_pixels=args.video_total_pixels)


def add_video_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--num-frames``, ``--fps`` and the per-frame pixel options (:class:`VideoSampling`)."""
    group = parser.add_argument_group("video frames")
    group.add_argument("--num-frames", type=int, default=None,
                       help=f"frames per video (Qwen2.5-VL: rounded to even; LLaVA-OneVision: default "
                            f"{UNIFORM_NUM_FRAMES}, uniform)")
    group.add_argument("--fps", type=float, default=None,
                       help=f"Qwen2.5-VL: frames per second of video (default {QWEN_FPS}, "
                            f"{QWEN_MIN_FRAMES}-{QWEN_MAX_FRAMES} frames)")
    group.add_argument("--video-min-pixels", type=int, default=None,
                       help=f"Qwen2.5-VL: least pixels per frame (default {QWEN_MIN_PIXELS})")
    group.add_argument("--video-max-pixels", type=int, default=None,
                       help=f"Qwen2.5-VL: most pixels per frame (default and cap: min({QWEN_MAX_PIXELS}, "
                            "total / frames x 2))")
    group.add_argument("--video-total-pixels", type=int, default=None,
                       help=f"Qwen2.5-VL: pixel budget of the whole video (default {QWEN_TOTAL_PIXELS})")


# --------------------------------------------------------------------------------------------- sampling rules


def _round_to(x: float, factor: int) -> int:
    return round(x / factor) * factor  # Python's round: half to even, as qwen-vl-utils' round_by_factor


def qwen_num_frames(total_frames: int, video_fps: float, sampling: VideoSampling) -> int:
    """Frames Qwen2.5-VL takes from a video (qwen-vl-utils 0.0.10 ``smart_nframes``); a multiple of 2."""
    s = sampling.resolved()
    if s.num_frames is not None:
        n = _round_to(s.num_frames, QWEN_FRAME_FACTOR)
    else:
        lo = math.ceil(s.min_frames / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
        hi = math.floor(min(s.max_frames, total_frames) / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
        n = total_frames / video_fps * s.fps
        n = min(min(max(n, lo), hi), total_frames)
        n = math.floor(n / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    if not QWEN_FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"Qwen2.5-VL takes between {QWEN_FRAME_FACTOR} and the video's {total_frames} frames "
                         f"(an even number); these options ask for {n}")
    return int(n)


def qwen_frame_indices(total_frames: int, n: int) -> list[int]:
    """``round(linspace(0, total - 1, n))`` in float32, half to even, as qwen-vl-utils computes it with torch."""
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def uniform_frame_indices(total_frames: int, n: int) -> list[int]:
    """``linspace(0, total - 1, n)`` truncated to integers (numpy ``dtype=int``), as lmms-eval's llava_onevision."""
    return np.linspace(0, total_frames - 1, n, dtype=int).tolist()


def sample_frame_indices(total_frames: int, video_fps: float, sampling: VideoSampling) -> list[int]:
    """The frame numbers (0-based, in decoding order) a family's rule takes from a video."""
    if total_frames < 1:
        raise ValueError("the video has no frames")
    if sampling.rule == "smart":
        return qwen_frame_indices(total_frames, qwen_num_frames(total_frames, video_fps, sampling))
    return uniform_frame_indices(total_frames, min(sampling.resolved().num_frames, total_frames))


def qwen_frame_size(height: int, width: int, n_frames: int, sampling: VideoSampling) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to (qwen-vl-utils 0.0.10 ``fetch_video``): ``smart_resize``
    with factor 28 between ``min_pixels`` and the per-frame budget ``max(min(768*28*28, total_pixels / n * 2),
    int(1.05 * min_pixels))``, lowered to ``max_pixels`` when that is given and smaller."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    s = sampling.resolved()
    budget = max(min(QWEN_MAX_PIXELS, s.total_pixels / n_frames * QWEN_FRAME_FACTOR), int(s.min_pixels * 1.05))
    if s.max_pixels is not None:
        budget = min(s.max_pixels, budget)
    return smart_resize(height, width, factor=QWEN_IMAGE_FACTOR, min_pixels=s.min_pixels, max_pixels=budget)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic, antialiased resize of uint8 RGB frames ``(T, H, W, 3)`` to ``size = (h, w)``, as torchvision's
    tensor ``resize`` does it (float interpolation, clamped to [0, 255], rounded back to uint8)."""
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    out = np.empty((frames.shape[0], size[0], size[1], 3), dtype=np.uint8)
    for start in range(0, frames.shape[0], _RESIZE_CHUNK):
        x = torch.from_numpy(frames[start:start + _RESIZE_CHUNK]).permute(0, 3, 1, 2).float()  # (t, 3, H, W)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        out[start:start + _RESIZE_CHUNK] = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


# --------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's first video stream holds."""

    path: str
    total_frames: int
    fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


@dataclass
class Video:
    """Frames sampled from one video file by one rule."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB; under the smart rule already resized to Qwen's frame size
    indices: list[int]  # the frame numbers taken, in order
    info: VideoInfo
    sampling: VideoSampling = field(default_factory=VideoSampling)

    @property
    def sample_fps(self) -> float:
        """Frames per second of the sample: ``len(indices) / total_frames x fps`` (qwen-vl-utils' video_sample_fps)."""
        return len(self.indices) / max(self.info.total_frames, 1e-6) * self.info.fps


def _open(path: str):
    av = import_av()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode video {path}: {err}") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return av, container, stream


def _count_frames(av, container, stream, path: str) -> int:
    try:
        return sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode video {path}: {err}") from None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate and size of a video file's first video stream.

    The count is the container's when it records one (mp4, avi), else the frames decoded (mkv, webm).
    Errors are one line: FileNotFoundError (no such file), ValueError (not a decodable video), ImportError (PyAV
    is not installed: ``pip install -e '.[video]'``).
    """
    path = os.fspath(path)
    av, container, stream = _open(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        if not rate or float(rate) <= 0:
            raise ValueError(f"{path}: the video stream has no frame rate")
        total = int(stream.frames or 0) or _count_frames(av, container, stream, path)
        height, width = stream.codec_context.height, stream.codec_context.width
    if total < 1:
        raise ValueError(f"{path}: the video stream has no frames")
    return VideoInfo(path=path, total_frames=total, fps=float(rate), height=int(height), width=int(width))


def _decode(path: str, indices: list[int], size: tuple[int, int] | None) -> tuple[np.ndarray | None, int]:
    """The asked frames (None when the stream ends before the last of them) and how many frames were decoded."""
    wanted: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        wanted.setdefault(int(index), []).append(slot)
    last = max(wanted)
    out: np.ndarray | None = None
    decoded = 0
    av, container, stream = _open(path)
    with container:
        try:
            for number, frame in enumerate(container.decode(stream)):
                decoded = number + 1
                if number in wanted:
                    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    if size is not None:
                        rgb = resize_frames(rgb[None], size)[0]
                    if out is None:
                        out = np.empty((len(indices),) + rgb.shape, dtype=np.uint8)
                    out[wanted[number]] = rgb
                if number >= last:
                    break
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot decode video {path}: {err}") from None
    return (out if decoded > last else None), decoded


def decode_frames(path: str | os.PathLike, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """The frames numbered ``indices`` (0-based, decoding order; repeats allowed) as uint8 RGB ``(T, H, W, 3)``,
    each resized to ``size = (h, w)`` (:func:`resize_frames`) when given. Errors as :func:`probe_video`, and a
    ValueError when a frame number is past the stream's end."""
    path = os.fspath(path)
    if not indices or min(indices) < 0:
        raise ValueError(f"frame numbers must be a non-empty list of numbers >= 0, got {indices!r}")
    frames, decoded = _decode(path, list(indices), size)
    if frames is None:
        raise ValueError(f"{path}: frame {max(indices)} asked, but the stream has {decoded} frames")
    return frames


def load_video(path: str | os.PathLike, sampling: VideoSampling | None = None) -> Video:
    """Decode the frames ``sampling``'s rule takes from a video file (module docstring), resized for Qwen2.5-VL
    under the ``smart`` rule. When the container's frame count is more than the stream decodes, the count is
    corrected and the frames are sampled again (logged)."""
    sampling = (sampling or VideoSampling()).resolved()
    info = probe_video(path)
    for _ in range(2):
        indices = sample_frame_indices(info.total_frames, info.fps, sampling)
        size = qwen_frame_size(info.height, info.width, len(indices), sampling) if sampling.rule == "smart" else None
        frames, decoded = _decode(info.path, indices, size)
        if frames is not None:
            return Video(frames=frames, indices=indices, info=info, sampling=sampling)
        logger.warning("%s: the container says %d frames but %d decode; sampling from %d", info.path,
                       info.total_frames, decoded, decoded)
        if decoded < 1:
            raise ValueError(f"{info.path}: the video stream has no decodable frames")
        info = replace(info, total_frames=decoded)
    raise ValueError(f"{info.path}: the frame count keeps changing while decoding")


# --------------------------------------------------------------------------------------------- Qwen2.5-VL inputs


def qwen_video_inputs(frames: np.ndarray, image_processor: Any, sample_fps: float) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's inputs for one video: the same tensors as transformers 4.57.6's slow ``Qwen2VLImageProcessor``
    called with ``videos=[frames]`` on frames already at a size its ``smart_resize`` keeps, and
    ``second_per_grid_ts`` as ``Qwen2_5_VLProcessor`` sets it (``temporal_patch_size / fps``).

    Args:
        frames: uint8 RGB ``(T, H, W, 3)`` with ``H`` and ``W`` multiples of ``patch_size x merge_size``
            (:func:`load_video` under the ``smart`` rule gives such frames).
        image_processor: the checkpoint's ``Qwen2VLImageProcessor``; its rescale factor, mean, std, patch,
            temporal patch and merge sizes are used.
        sample_fps: frames per second of the sample (:attr:`Video.sample_fps`).

    Returns:
        ``pixel_values_videos`` float32 ``(t * h * w, 3 * temporal_patch * patch * patch)`` with ``t = ceil(T /
        temporal_patch)`` (an odd last frame is repeated), ``h = H / patch``, ``w = W / patch``, patches ordered
        by time, merge-window row, merge-window column, then within the window; ``video_grid_thw`` int64 ``(1, 3)``
        = ``[[t, h, w]]``; ``second_per_grid_ts`` float32 ``(1,)``. The LLM sees ``t * h * w / merge**2`` tokens.
    """
    p, tp, m = image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    T, H, W, C = frames.shape
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {p * m}; resize with qwen_frame_size first")
    if not sample_fps > 0:
        raise ValueError(f"sample_fps must be positive, got {sample_fps}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, C, H, W)
    if image_processor.do_rescale:  # the processor's arithmetic: float64 product, then float32
        x = (x.to(torch.float64) * image_processor.rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if image_processor.do_normalize:
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, C, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, C, 1, 1)
        x = (x - mean) / std
    if T % tp:
        x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)])  # repeat the last frame
    t, h, w = x.shape[0] // tp, H // p, W // p
    x = x.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tp, p, p)
    return {
        "pixel_values_videos": x.reshape(t * h * w, C * tp * p * p).contiguous(),
        "video_grid_thw": torch.tensor([[t, h, w]], dtype=torch.long),
        "second_per_grid_ts": torch.tensor([tp / sample_fps], dtype=torch.float32),
    }


# --------------------------------------------------------------------------------------------- LLaVA-OneVision inputs


def onevision_video_inputs(frames: np.ndarray, image_processor: Any) -> torch.Tensor:
    """LLaVA-OneVision's ``pixel_values_videos`` for one video: every frame preprocessed as one single-view image
    by the checkpoint's image processor (lmms-eval's ``llava_onevision``: ``image_processor.preprocess(frames)``
    with LLaVA-NeXT's ``SigLipImageProcessor``; transformers' ``LlavaOnevisionVideoProcessor``): resized to the
    processor's ``size`` (height x width) with its resampling (bicubic), no padding and no anyres crops, rescaled
    and normalised with its values, the steps of its ``_preprocess`` through its public ``resize`` / ``rescale``
    / ``normalize``.

    Args:
        frames: uint8 RGB ``(F, H, W, 3)`` (:func:`load_video` under the ``uniform`` rule).
        image_processor: the checkpoint's ``LlavaOnevisionImageProcessor``.

    Returns:
        float32 ``(1, F, 3, size, size)``: what ``LlavaOnevisionForConditionalGeneration`` takes as
        ``pixel_values_videos``; the LLM sees ``F x ceil(side / 2)^2 + 1`` tokens of it.
    """
    from transformers.image_transforms import resize
    from transformers.image_utils import ChannelDimension

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 RGB frames (F, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    p = image_processor
    size = (p.size["height"], p.size["width"])
    last = ChannelDimension.LAST
    out = []
    for frame in frames:
        x = resize(frame, size, resample=p.resample, input_data_format=last) if p.do_resize else frame
        if p.do_rescale:
            x = p.rescale(x, p.rescale_factor, input_data_format=last)
        if p.do_normalize:
            x = p.normalize(x, p.image_mean, p.image_std, input_data_format=last)
        out.append(torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(2, 0, 1))))
    return torch.stack(out)[None]  # (1, F, 3, H, W)


# --------------------------------------------------------------------------------------------- writing clips


def encode_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4") -> str:
    """Write uint8 RGB frames ``(T, H, W, 3)`` (even ``H`` and ``W``) as a video file (container from the suffix:
    .mp4, .mkv, .avi). For tests and fixtures: a 16-frame 64x48 clip takes milliseconds."""
    av = import_av()
    path = os.fspath(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 RGB frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {height}x{width}: height and width must be even (yuv420p)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}  # near-lossless: tests read frame numbers back from brightness
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode(None))
    return path
