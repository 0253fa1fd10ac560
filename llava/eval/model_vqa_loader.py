"""Answer a question jsonl (GQA, MME, POPE, TextVQA, VQAv2): upstream's ``model_vqa_loader`` with PIO flags.

    python -m llava.eval.model_vqa_loader --model-path liuhaotian/llava-v1.5-7b \\
        --question-file Q.jsonl --image-folder IMAGES --answers-file A.jsonl --temperature 0 \\
        --conv-mode vicuna_v1 --pio-layers 1,10,15 --pio-tokens 92,54,22 --pio-log pio.jsonl
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import closing

import torch
from tqdm import tqdm

from llava.eval import runner
from llava.mm_utils import process_images, tokenizer_image_token

logger = logging.getLogger(__name__)


def build_prompt(question: str, conv_mode: str, im_start_end: bool) -> str:
    """``<image>\\n`` + question in the conversation template; the benchmark suffix is already in the text."""
    return runner.chat_prompt(runner.image_token(im_start_end) + "\n" + question, conv_mode)


class QuestionDataset(torch.utils.data.Dataset):
    """Image loading, prompt building and preprocessing of one question (run in DataLoader workers)."""

    def __init__(self, questions: list[dict], args: argparse.Namespace, tokenizer, processor, model_config):
        self.questions, self.args = questions, args
        self.tokenizer, self.processor, self.config = tokenizer, processor, model_config

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int):
        q = self.questions[i]
        image = runner.load_image(os.path.join(self.args.image_folder, q["image"]))
        prompt = build_prompt(q["text"], self.args.conv_mode, getattr(self.config, "mm_use_im_start_end", False))
        ids = tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt")[None]
        return q, ids, process_images([image], self.processor, self.config), image.size


def eval_model(args: argparse.Namespace) -> None:
    runner.check_conv_mode(args.conv_mode)
    runner.pio_config_from_args(args)
    questions = runner.read_jsonl_questions(args.question_file, ("question_id", "image", "text"))
    questions = runner.get_chunk(questions, args.num_chunks, args.chunk_idx)
    for q in questions:  # fail before loading the model, naming the question
        path = os.path.join(args.image_folder, q["image"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"question {q['question_id']}: image file not found: {path}")
    with closing(runner.JsonlWriter(args.answers_file, args.resume)) as answers:
        todo = [q for q in questions if str(q["question_id"]) not in answers.done]
        if len(todo) < len(questions):
            logger.info("resuming: %d of %d questions already answered", len(questions) - len(todo), len(questions))
        tok, model, proc, name = runner.load_from_args(args)
        workers = args.num_workers if args.num_workers is not None else (4 if model.device.type == "cuda" else 0)
        loader = torch.utils.data.DataLoader(QuestionDataset(todo, args, tok, proc, model.config), batch_size=None,
                                             num_workers=workers)
        with closing(runner.SampleLogs(args, model)) as logs:
            for q, ids, pixels, size in tqdm(loader, desc="questions", unit="q"):
                pixels = runner.to_model(pixels, model)
                text, state, timing = runner.generate(model, tok, ids, pixels, [size], args, logs.profiling)
                answers.write(runner.answer_record(q["question_id"], q["text"], text, name))
                logs.write(q["question_id"], state, timing)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Answer a question jsonl with a LLaVA model (optionally PIO-pruned).")
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers preparing images (default: 4 on CUDA, 0 on CPU)")
    runner.add_common_args(p)
    args = p.parse_args(argv)
    runner.setup_logging()
    eval_model(args)


if __name__ == "__main__":
    main()
