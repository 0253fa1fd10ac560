"""Answer MMBench / MMBench-CN (a TSV with base64 images): upstream's ``model_vqa_mmbench`` plus the
reduction flags.

    python -m llava.eval.model_vqa_mmbench --model-path liuhaotian/llava-v1.5-7b \\
        --question-file mmbench/mmbench_dev_20230712.tsv --answers-file mmbench/answers/SPLIT/CKPT.jsonl \\
        --single-pred-prompt --lang en --temperature 0 --conv-mode vicuna_v1 [--method pio --budget 64] [--resume]

The TSV (tab-separated, header row; read with the csv module) needs the columns ``index, question, hint,
A, B, image``; ``C, D`` (and further letters) are used when present, everything else (answer, category,
source, l2-category, comment, split) is ignored. Behaviour (``docs/benchmarks.md`` §10):

- the options are the values of columns A, B, C, ... up to the first missing one (empty, ``nan``, ``None``
  and the other strings pandas reads as missing);
- the question is ``hint + "\\n" + question`` when the hint is present, then ``"\\n" + letter + ". " + option``
  for each option; the model sees ``<image>\\n`` (``<im_start><image><im_end>\\n``) in front and, with
  ``--single-pred-prompt``, ``\\nAnswer with the option's letter from the given choices directly.``
  (``--lang cn``: ``\\n请直接回答选项字母。``) after it;
- ``--all-rounds`` asks each row once per option, rotating the options left by one each round (round_id
  0..n-1); the letters shown stay A, B, ...; ``option_char`` records which original letter each shown option
  had. The eval scripts do not use it: the TSV's circular-variant rows already hold the rotations;
- one answer line per row and round: ``{question_id: index, round_id, prompt, text, options, option_char,
  answer_id, model_id, metadata: {}}``; ``prompt`` is the question with hint and options, without the image
  token and the suffix (as upstream); ``options`` and ``option_char`` are the round's rotated lists.

Defaults follow upstream: ``--conv-mode llava_v1`` (the eval scripts pass ``vicuna_v1``) and
``--max_new_tokens 1024`` (hard-coded upstream, a flag here).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import functools
import io
import logging
import os
import sys
from dataclasses import dataclass

from llava.eval import runner
from llava.eval.eval_mmbench import MISSING_VALUES  # pandas' default NaN strings, as the scorer reads them

logger = logging.getLogger(__name__)

SUFFIX = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
REQUIRED_COLUMNS = ("index", "question", "hint", "A", "B", "image")
OPTION_LETTERS = tuple("ABCDEFGHI")


@dataclass
class MMBQuestion:
    index: int
    line: int  # physical line of the TSV where the record ends (for messages)
    question: str
    hint: str | None
    options: list[str]
    image: str  # base64


def is_missing(value: str | None) -> bool:
    """Upstream reads the TSV with pandas and skips NaN (and 'nan'/'none' in any case) options and hints."""
    if value is None:
        return True
    v = value.strip()
    return v in MISSING_VALUES or v.lower() in ("nan", "none")


def _raise_csv_field_limit() -> None:
    limit = sys.maxsize
    while True:  # a 32-bit C long refuses sys.maxsize
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def decode_image(b64: str):
    """A PIL image from the TSV's base64 field (ValueError when it is not one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(base64.b64decode(b64)))
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"not a base64-encoded image ({type(e).__name__}: {e})") from None


def read_questions(path: str | os.PathLike, check_images: bool = True, keep_first_duplicate: bool = False
                   ) -> list[MMBQuestion]:
    """Every TSV row as a question; anything malformed raises naming the file, the line and what is expected."""
    text = runner.read_text(path)  # names the file when it is missing or not UTF-8
    _raise_csv_field_limit()
    out: list[MMBQuestion] = []
    seen: dict[int, int] = {}
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty; expected an MMBench TSV with a header row "
                             f"({', '.join(REQUIRED_COLUMNS)}, ...)") from None
        except csv.Error as e:
            raise ValueError(f"{path}:1: cannot parse the header ({e})") from None
        col = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in REQUIRED_COLUMNS if c.lower() not in col]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; an MMBench TSV needs "
                             f"{', '.join(REQUIRED_COLUMNS)} (C, D, ... optional); the header has {header}")
        letters = []
        for letter in OPTION_LETTERS:  # A, B, C, ... as far as the header goes without a gap
            if letter.lower() not in col:
                break
            letters.append(letter)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ValueError(f"{path}:{reader.line_num}: cannot parse the record ({e})") from None
            line = reader.line_num
            if not any(x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}:{line}: the record has {len(fields)} tab-separated fields, the header "
                                 f"has {len(header)} (a tab or quote inside a field?)")

            def get(name: str, fields: list[str] = fields) -> str:
                return fields[col[name.lower()]]

            raw_index = get("index").strip()
            try:
                index = int(raw_index)
            except ValueError:
                try:
                    as_float = float(raw_index)
                except ValueError:
                    as_float = None
                if as_float is None or not as_float.is_integer():
                    raise ValueError(f"{path}:{line}: column index must be an integer, got {raw_index!r}") from None
                index = int(as_float)
            where = f"{path}:{line} (index {index})"
            if index in seen:
                if not keep_first_duplicate:
                    raise ValueError(f"{where}: duplicate index, already on line {seen[index]}; indices must be unique "
                                     "(--keep-first-duplicate keeps the first)")
                logger.warning("%s: duplicate index, already on line %d; kept the first", where, seen[index])
                continue
            seen[index] = line
            question = get("question")
            if is_missing(question):
                raise ValueError(f"{where}: column question is empty")
            options: list[str] = []
            for letter in letters:
                value = get(letter)
                if is_missing(value):
                    break
                options.append(value)
            if not options:
                raise ValueError(f"{where}: no options (column A is empty); a question needs options A, B, ...")
            hint = get("hint")
            image = get("image")
            if is_missing(image):
                raise ValueError(f"{where}: column image is empty; expected a base64-encoded image")
            if check_images:
                try:
                    decode_image(image)
                except ValueError as e:
                    raise ValueError(f"{where}: column image is {e}") from None
            out.append(MMBQuestion(index, line, question, None if is_missing(hint) else hint, options, image))
    return out


def question_text(q: MMBQuestion, options: list[str]) -> str:
    """``hint\\nquestion`` (hint when present) then ``\\nA. option`` per option: the answer line's prompt."""
    text = q.question if q.hint is None else q.hint + "\n" + q.question
    for letter, option in zip(OPTION_LETTERS, options):
        text = text + "\n" + letter + ". " + option
    return text


def build_prompt(text: str, conv_mode: str, im_start_end: bool, single_pred_prompt: bool, lang: str) -> str:
    qs = runner.image_token(im_start_end) + "\n" + text
    if single_pred_prompt:
        qs = qs + "\n" + SUFFIX[lang]
    return runner.chat_prompt(qs, conv_mode)


def rounds(q: MMBQuestion, all_rounds: bool) -> list[tuple[int, list[str], list[str]]]:
    """``(round_id, options, option_char)`` per round: round r shows the options rotated left by r."""
    chars = list(OPTION_LETTERS[: len(q.options)])
    n = len(q.options) if all_rounds else 1
    return [(r, q.options[r:] + q.options[:r], chars[r:] + chars[:r]) for r in range(n)]


# --------------------------------------------------------------------------- run
def prepare(args: argparse.Namespace, item: runner.Question, tokenizer, processor, config) -> runner.Prepared:
    """Prompt, image and pixels of one round (in a DataLoader worker)."""
    q, (round_id, options, option_char) = item.data
    prompt = build_prompt(question_text(q, options), args.conv_mode, bool(getattr(config, "mm_use_im_start_end", False)),
                          args.single_pred_prompt, args.lang)
    return runner.encode(prompt, [decode_image(q.image)], tokenizer, processor, config)


def record(item: runner.Question, text: str, model_name: str) -> dict:
    q, (round_id, options, option_char) = item.data
    return runner.answer_record(q.index, question_text(q, options), text, model_name, round_id=round_id,
                                options=options, option_char=option_char)


def eval_model(args: argparse.Namespace, loaded: tuple | None = None) -> None:
    questions = read_questions(args.question_file, keep_first_duplicate=args.keep_first_duplicate)
    chunk = runner.get_chunk(list(enumerate(questions)), args.num_chunks, args.chunk_idx)
    items = [runner.Question(f"{i}:{r[0]}", q.index, (q, r), {"round_id": r[0]})
             for i, q in chunk for r in rounds(q, args.all_rounds)]
    total = sum(len(rounds(q, args.all_rounds)) for q in questions)
    runner.run_questions(args, items, functools.partial(prepare, args), record, loaded=loaded, expected=total,
                         runner_options={"runner": "model_vqa_mmbench", "single_pred_prompt": args.single_pred_prompt,
                                         "lang": args.lang, "all_rounds": args.all_rounds})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer an MMBench / MMBench-CN TSV with a LLaVA model "
                                            "(optionally with visual-token reduction).")
    p.add_argument("--question-file", type=str, default="tables/question.tsv",
                   help="MMBench TSV (index, question, hint, A, B, C, D, ..., image as base64)")
    p.add_argument("--image-folder", type=str, default="", help="unused (images are in the TSV); upstream's flag")
    p.add_argument("--single-pred-prompt", action="store_true",
                   help="append the 'answer with the option's letter' instruction (in --lang)")
    p.add_argument("--all-rounds", action="store_true",
                   help="ask every row once per option rotation (round_id 0..n-1) instead of once")
    p.add_argument("--lang", type=str, default="en", choices=sorted(SUFFIX),
                   help="language of the --single-pred-prompt instruction")
    runner.add_common_args(p, conv_mode="llava_v1", max_new_tokens=1024)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runner.setup_logging()
    runner.join_launcher(args)  # under torchrun: this rank's shard, files and GPU
    eval_model(args)


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
