"""Answer a question jsonl (GQA, MME, POPE, TextVQA, VQAv2): upstream's ``model_vqa_loader`` plus the
reduction flags (``--method NAME --budget 64``, :mod:`pio.cli`).

    python -m llava.eval.model_vqa_loader --model-path liuhaotian/llava-v1.5-7b \\
        --question-file Q.jsonl --image-folder IMAGES --answers-file A.jsonl --temperature 0 \\
        --conv-mode vicuna_v1 --method pio --budget 64 --pio-log pio.jsonl
"""

from __future__ import annotations

import argparse
import functools
import logging
import os

from llava.eval import runner

logger = logging.getLogger(__name__)


def build_prompt(question: str, conv_mode: str, im_start_end: bool) -> str:
    """``<image>\\n`` + question in the conversation template; the benchmark suffix is already in the text."""
    return runner.chat_prompt(runner.image_token(im_start_end) + "\n" + question, conv_mode)


def read_questions(args: argparse.Namespace, media: str = "image") -> tuple[list[runner.Question], int]:
    """This chunk's questions and the number of questions of the whole file; a missing image (``media``:
    ``"image"``, or ``"video"`` for the video runner, read from ``--video-folder``) raises naming the question,
    before the model is loaded.

    Ids may repeat by design (MME: two questions per image; TextVQA: the image id), so a question is its id and
    its text: the same pair twice is refused (or, with ``--keep-first-duplicate``, answered once)."""
    questions = runner.read_jsonl_questions(args.question_file, ("question_id", media, "text"))
    items = [runner.Question(str(i), q["question_id"], q) for i, q in enumerate(questions)]
    items = runner.first_of_each(items, lambda it: (str(it.question_id), it.data["text"]),
                                 lambda i: f"{args.question_file}:{i + 1} (question {items[i].question_id!r})",
                                 args.keep_first_duplicate, "question")
    total = len(items)
    items = runner.get_chunk(items, args.num_chunks, args.chunk_idx)
    for it in items:
        path = os.path.join(getattr(args, f"{media}_folder"), it.data[media])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"question {it.question_id}: {media} file not found: {path}")
    return items, total


def prepare(args: argparse.Namespace, item: runner.Question, tokenizer, processor, config) -> runner.Prepared:
    """Image, prompt and pixels of one question (in a DataLoader worker)."""
    q = item.data
    image = runner.load_image(os.path.join(args.image_folder, q["image"]))
    prompt = build_prompt(q["text"], args.conv_mode, getattr(config, "mm_use_im_start_end", False))
    return runner.encode(prompt, [image], tokenizer, processor, config)


def record(item: runner.Question, text: str, model_name: str) -> dict:
    return runner.answer_record(item.question_id, item.data["text"], text, model_name)


def eval_model(args: argparse.Namespace, loaded: tuple | None = None) -> None:
    items, total = read_questions(args)
    runner.run_questions(args, items, functools.partial(prepare, args), record, loaded=loaded, expected=total,
                         runner_options={"runner": "model_vqa_loader", "image_folder": os.path.abspath(args.image_folder)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer a question jsonl with a LLaVA model (optionally with visual-token "
                                            "reduction).")
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    runner.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runner.setup_logging()
    runner.join_launcher(args)  # under torchrun: this rank's shard, files and GPU
    eval_model(args)


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
