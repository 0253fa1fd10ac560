"""A tiny LLaMA-style sentencepiece tokenizer, trained in code, for tests and tiny checkpoints.

The real LLaVA-1.5 / 1.6-Vicuna checkpoints ship a slow sentencepiece ``LlamaTokenizer`` (BPE with byte
fallback, split digits, identity normalisation, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece). This module
trains a model with the same settings on a small fixed synthetic corpus, so tests get the same tokenisation
behaviour (dummy prefix, byte-fallback newlines, BOS handling) without downloading anything. Training is
deterministic: the same ``vocab_size`` gives a byte-identical ``tokenizer.model``.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import sentencepiece as spm

from llava.conversation import conv_templates

logger = logging.getLogger(__name__)

__all__ = ["write_tiny_tokenizer", "tiny_tokenizer_corpus"]

# Same files and values as the official llava-v1.5 tokenizer folders (slow LlamaTokenizer, pad = <unk>).
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 4096,
    "padding_side": "right",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}

_TEMPLATE_NAMES = tuple("vicuna_v1 llava_v1 v0 v1_mmtag llama_2 llava_llama_2 mpt chatml_direct".split())
_OBJECTS = tuple(
    "dog cat person car bus truck bicycle chair table cup bottle book clock laptop phone pizza banana apple "
    "horse bird boat train umbrella kite bench tree sign window door shirt".split()
)
_COLORS = tuple("red green blue yellow black white brown orange purple gray".split())
_QUESTIONS = (
    "Is there a {obj} in the image?",
    "What color is the {obj}?",
    "How many {obj}s are there in the picture?",
    "Where is the {obj} located?",
    "Is the {obj} {color}?",
    "What is the {color} {obj} doing?",
    "Describe the {obj} next to the {other}.",
    "Which object is larger, the {obj} or the {other}?",
)
_FIXED_LINES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no.",
    "Reference OCR token: STOP, EXIT, OPEN, 24 HOURS",
    "Context: The picture shows a street scene with several vehicles.",
    "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "Yes No yes no A B C D A. B. C. D.",
    "The answer is A.",
    "The answer is B.",
    "The answer is C.",
    "The answer is D.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14 1,000 50%",
    ". , ; : ! ? ' \" ( ) [ ] { } < > / \\ - _ + = * & % $ # @ ~ ` ^ |",
    "<image> <im_patch> <im_start> <im_end> USER: ASSISTANT: Human: Assistant: ### </s> [INST] [/INST]",
)


def tiny_tokenizer_corpus() -> list[str]:
    """The fixed, ordered list of training sentences (system lines, benchmark-style questions, options)."""
    lines: list[str] = []
    for name in _TEMPLATE_NAMES:
        template = conv_templates[name]
        lines.extend(line for line in template.system.split("\n") if line)
        lines.extend(role.strip() for role in template.roles if role.strip())
        for _, message in template.messages:  # few-shot examples (vicuna v0)
            lines.extend(line for line in message.split("\n") if line)
    lines.extend(_FIXED_LINES)
    for i, obj in enumerate(_OBJECTS):
        color = _COLORS[i % len(_COLORS)]
        other = _OBJECTS[(i * 7 + 3) % len(_OBJECTS)]
        for question in _QUESTIONS:
            lines.append(question.format(obj=obj, color=color, other=other))
        for letter, option in zip("ABCD", (obj, other, color, "none of these"), strict=True):
            lines.append(f"{letter}. {option}")
    return lines


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1000) -> None:
    """Train the tiny sentencepiece BPE tokenizer and write a loadable slow-tokenizer folder.

    Writes ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``
    (created if missing); ``AutoTokenizer.from_pretrained(out_dir, use_fast=False)`` gives a
    ``LlamaTokenizer`` with ``len(tokenizer) == vocab_size``.

    Args:
        vocab_size: number of pieces, 3 specials and 256 byte pieces included; the fixed corpus supports
            400 to about 2000 (ValueError outside that).
    """
    if vocab_size < 400:
        raise ValueError(
            f"vocab_size must be at least 400 (3 specials, 256 bytes, the corpus characters), got {vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        _train(model, vocab_size)
    except RuntimeError as err:
        raise ValueError(
            f"could not train a {vocab_size}-piece tokenizer on the built-in corpus ({err}); "
            "use a vocab_size between 400 and about 2000"
        ) from err
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    logger.info("wrote a %d-piece tiny tokenizer to %s", vocab_size, out)


def _train(model: io.BytesIO, vocab_size: int) -> None:
    """Run the sentencepiece BPE trainer with LLaMA's settings, single-threaded and unshuffled."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_tokenizer_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
