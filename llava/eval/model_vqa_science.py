"""Answer ScienceQA (``llava_test_CQM-A.json``): upstream's ``model_vqa_science`` plus the
reduction flags.

    python -m llava.eval.model_vqa_science --model-path liuhaotian/llava-v1.5-7b \\
        --question-file scienceqa/llava_test_CQM-A.json --image-folder scienceqa/images/test \\
        --answers-file scienceqa/answers/CKPT.jsonl --single-pred-prompt --temperature 0 --conv-mode vicuna_v1 \\
        [--method pio --budget 64 --pio-log CKPT.pio.jsonl] [--resume]

The question file is a JSON array of ``{"id", "image" (optional), "conversations": [{"from": "human",
"value": ...}, ...]}``. Behaviour (``docs/benchmarks.md`` §9):

- the question is the first conversation turn's ``value`` with every ``<image>`` removed, then stripped;
- an entry with ``image`` (a path under ``--image-folder``) gets ``<image>\\n`` in front (``<im_start><image>
  <im_end>\\n`` for ``mm_use_im_start_end`` checkpoints) and its image; an entry without one runs text-only
  (``images=None``), so all questions are answered;
- ``--single-pred-prompt`` appends ``\\nAnswer with the option's letter from the given choices directly.``;
- the answer line is ``{question_id: id, prompt, text, answer_id, model_id, metadata: {}}`` where ``prompt`` is
  the cleaned question, with ``<image>\\n`` in front for image entries and the suffix appended; the scorer
  (``llava.eval.eval_science_qa``) counts a question as IMG when its ``prompt`` contains ``<image>``.

Defaults follow upstream: ``--conv-mode llava_v0`` (the eval scripts pass ``vicuna_v1``) and
``--max_new_tokens 1024`` (hard-coded upstream, a flag here).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval import runner

logger = logging.getLogger(__name__)

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
HUMAN_ROLES = ("human", "user")


# --------------------------------------------------------------------------- questions
def read_questions(path: str | os.PathLike, keep_first_duplicate: bool = False) -> list[dict]:
    """The question entries; anything malformed raises naming the file, the entry and what is expected. A repeated
    id is an error (``keep_first_duplicate``: the first entry with it is kept)."""
    try:
        data = json.loads(runner.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); expected a JSON array of "
                         "ScienceQA entries (llava_test_CQM-A.json)") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of entries {{id, image?, conversations}}, "
                         f"got a JSON {type(data).__name__}")
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object {{id, image?, conversations}}, "
                             f"got {type(entry).__name__}")
        if "id" not in entry:
            raise ValueError(f"{where}: missing field 'id' (needs id, conversations; image is optional)")
        where = f"{path}: entry {i} (id {entry['id']!r})"
        key = str(entry["id"])
        if key in seen:
            if not keep_first_duplicate:
                raise ValueError(f"{where}: duplicate id, already used by entry {seen[key]}; ids must be unique "
                                 "(--keep-first-duplicate keeps the first)")
            logger.warning("%s: duplicate id, already used by entry %d; kept the first", where, seen[key])
            entry["_duplicate"] = True
            continue
        seen[key] = i
        convs = entry.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns, "
                             f"got {convs!r}")
        first = convs[0]
        if not isinstance(first, dict) or not isinstance(first.get("value"), str):
            raise ValueError(f"{where}: the first conversation turn must be an object with a string 'value', "
                             f"got {first!r}")
        if "from" in first and first["from"] not in HUMAN_ROLES:
            raise ValueError(f"{where}: the first conversation turn must be the human's question, "
                             f"got from={first['from']!r}")
        image = entry.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise ValueError(f"{where}: 'image' must be a path relative to --image-folder, got {image!r}")
    return [e for e in data if not e.pop("_duplicate", False)]


def image_file(entry: dict) -> str | None:
    """The entry's image path relative to ``--image-folder`` (None: a text-only question)."""
    return entry.get("image") or None


def build_prompts(entry: dict, conv_mode: str, im_start_end: bool, single_pred_prompt: bool) -> tuple[str, str]:
    """``(model prompt in the conversation template, the answer line's "prompt")`` for one entry."""
    question = entry["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    qs = shown = question
    if image_file(entry) is not None:
        qs = runner.image_token(im_start_end) + "\n" + qs
        shown = DEFAULT_IMAGE_TOKEN + "\n" + shown
    if single_pred_prompt:
        qs = qs + "\n" + SINGLE_PRED_PROMPT
        shown = shown + "\n" + SINGLE_PRED_PROMPT
    return runner.chat_prompt(qs, conv_mode), shown


# --------------------------------------------------------------------------- model
def check_answer_prompter(args: argparse.Namespace) -> None:
    if args.answer_prompter:
        raise NotImplementedError(
            "--answer-prompter (the early LLaVA two-pass prompting that re-asks for 'The answer is X.') is not "
            "implemented; the LLaVA-1.5/1.6 ScienceQA protocol uses --single-pred-prompt instead")


# --------------------------------------------------------------------------- run
def check_images(args: argparse.Namespace, questions: list[dict]) -> None:
    """A missing image raises naming the question, before the model is loaded."""
    for q in questions:
        rel = image_file(q)
        if rel is not None:
            path = os.path.join(args.image_folder, rel)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{args.question_file}: question {q['id']}: image file not found: {path} "
                                        "(--image-folder joined with the entry's 'image')")


def prepare(args: argparse.Namespace, item: runner.Question, tokenizer, processor, config) -> runner.Prepared:
    """Prompt, and image and pixels for image questions (in a DataLoader worker)."""
    prompt, _ = build_prompts(item.data, args.conv_mode, bool(getattr(config, "mm_use_im_start_end", False)),
                              args.single_pred_prompt)
    rel = image_file(item.data)
    images = [runner.load_image(os.path.join(args.image_folder, rel))] if rel is not None else []
    return runner.encode(prompt, images, tokenizer, processor, config)


def record(args: argparse.Namespace, item: runner.Question, text: str, model_name: str) -> dict:
    _, shown = build_prompts(item.data, args.conv_mode, False, args.single_pred_prompt)
    return runner.answer_record(item.question_id, shown, text, model_name)


def eval_model(args: argparse.Namespace, loaded: tuple | None = None) -> None:
    check_answer_prompter(args)
    questions = read_questions(args.question_file, args.keep_first_duplicate)
    items = runner.get_chunk([runner.Question(str(i), q["id"], q) for i, q in enumerate(questions)],
                             args.num_chunks, args.chunk_idx)
    check_images(args, [it.data for it in items])
    runner.run_questions(args, items, functools.partial(prepare, args), functools.partial(record, args),
                         loaded=loaded, expected=len(questions), runner_options={"runner": "model_vqa_science",
                                                        "image_folder": os.path.abspath(args.image_folder),
                                                        "single_pred_prompt": args.single_pred_prompt})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer ScienceQA (llava_test_CQM-A.json) with a LLaVA model "
                                            "(optionally with visual-token reduction).")
    p.add_argument("--question-file", type=str, default="tables/question.json",
                   help="JSON array of {id, image?, conversations}")
    p.add_argument("--image-folder", type=str, default="", help="folder the entries' 'image' paths are under")
    p.add_argument("--single-pred-prompt", action="store_true",
                   help=f"append '\\n{SINGLE_PRED_PROMPT}' to every question (the LLaVA-1.5 protocol)")
    p.add_argument("--answer-prompter", action="store_true",
                   help="upstream's two-pass 'The answer is' prompting; accepted but not implemented (errors)")
    runner.add_common_args(p, conv_mode="llava_v0", max_new_tokens=1024)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runner.setup_logging()
    runner.join_launcher(args)  # under torchrun: this rank's shard, files and GPU
    eval_model(args)


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
