"""Answer a video question jsonl (Video-MME's ``llava_videomme.jsonl``; any file whose lines hold ``question_id``,
``video`` and ``text``): ``model_vqa_loader`` for videos, with the same flags, resume, run identity and logs, plus
the frame sampling flags of :mod:`llava.video` (recorded in the run description and its identity).

    python -m llava.eval.model_video_qa --model-path Qwen/Qwen2.5-VL-7B-Instruct \\
        --question-file videomme/llava_videomme.jsonl --video-folder videomme --answers-file A.jsonl \\
        --temperature 0 --max_new_tokens 16 --num-frames 32 --method pio --budget 0.111

Frames are read with the model family's rule (Qwen2.5-VL: qwen-vl-utils' ``fps`` 2 / ``--num-frames``, per-frame
pixel budget; LLaVA-OneVision: lmms-eval's 32 frames at linspace over the video, every frame one view); a family
without video (LLaVA) is refused in one line before any video is decoded.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any

from llava.constants import DEFAULT_VIDEO_TOKEN
from llava.eval import model_vqa_loader, runner
from llava.video import Video, VideoSampling, add_video_args, load_video
from pio.cli import method_from_args

logger = logging.getLogger(__name__)


def read_questions(args: argparse.Namespace) -> tuple[list[runner.Question], int]:
    """This chunk's questions and the whole file's count (:func:`model_vqa_loader.read_questions` on ``"video"``
    lines); a missing video raises naming the question, before the model is loaded."""
    return model_vqa_loader.read_questions(args, media="video")


def video_sampling(args: argparse.Namespace) -> VideoSampling:
    """The frame sampling of the flags under the checkpoint's family's rule; a family without video refuses."""
    runner.resolve_family_args(args)
    args.family.check_video()
    return VideoSampling.from_args(args, args.family.video_rule)


def check_video_method(method: Any) -> None:
    """Refuse an encoder-side method (alone or in a composition; ``method`` a reduction method or None) before any
    video is read: they act on images."""
    from pio.encoder import split_reducer

    pre, _ = split_reducer(method)
    if pre is not None:
        raise ValueError(f"{pre.name} is an encoder-side method, which runs on images only; for videos use a method "
                         "inside the language model (e.g. pio, fastv)")


def video_prompt(text: str, conv_mode: str) -> str:
    """The chat prompt of one question on one video: the ``<video>`` mark and a newline before ``text`` (a text
    that already holds the mark keeps it where it stands), in the ``conv_mode`` template."""
    return runner.chat_prompt(text if DEFAULT_VIDEO_TOKEN in text else DEFAULT_VIDEO_TOKEN + "\n" + text, conv_mode)


def encode(prompt: str, video: Video, tokenizer, processor, config) -> runner.Prepared:
    """``(input_ids (1, T), visual inputs, None)`` of a templated ``prompt`` whose ``<video>`` mark stands for
    ``video`` (its sampled frames), as the family of ``config`` encodes them
    (:meth:`~llava.model.families.Family.encode_video`)."""
    from llava.model.families import family_of

    return family_of(config).encode_video(prompt, video.frames, video.sample_fps, tokenizer, processor, config)


def prepare(args: argparse.Namespace, sampling: VideoSampling, item: runner.Question, tokenizer, processor,
            config) -> runner.Prepared:
    """Frames, prompt and visual inputs of one question (in a DataLoader worker)."""
    video = load_video(os.path.join(args.video_folder, item.data["video"]), sampling)
    return encode(video_prompt(item.data["text"], args.conv_mode), video, tokenizer, processor, config)


def record(item: runner.Question, text: str, model_name: str) -> dict:
    return runner.answer_record(item.question_id, item.data["text"], text, model_name)


def eval_model(args: argparse.Namespace, loaded: tuple | None = None) -> None:
    sampling = video_sampling(args)
    check_video_method(method_from_args(args))
    items, total = read_questions(args)
    options = {"runner": "model_video_qa", "video_folder": os.path.abspath(args.video_folder),
               "video_sampling": sampling.record()}
    runner.run_questions(args, items, functools.partial(prepare, args, sampling), record, loaded=loaded,
                         expected=total, runner_options=options)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Answer a video question jsonl with a video-language model (optionally "
                                            "with visual-token reduction).")
    p.add_argument("--video-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    runner.add_common_args(p)
    add_video_args(p)
    args = p.parse_args(argv)
    runner.setup_logging()
    eval_model(args)


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
