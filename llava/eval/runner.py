"""What every inference runner shares: flags, model loading, the reduction method, chunking, resumable answer
files, the question loop, the generation call, per-sample reduction logs and profiles.

A question runner (``model_vqa_loader``, ``model_vqa_science``, ``model_vqa_mmbench``) keeps only its reader
(question file -> :class:`Question` items) and its prompt builder (``prepare``: one item -> token ids, pixels,
image size; run in DataLoader workers) and calls :func:`run_questions`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.eval.runfiles import RunFiles, run_identity
from llava.mm_utils import get_model_name_from_path
from pio import PruneState, ReductionMethod
from pio.cli import add_method_args, method_from_args
from pio.schedule import PAPER_N0

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- flags
def add_common_args(p: argparse.ArgumentParser, conv_mode: str = "llava_v1", max_new_tokens: int = 128) -> None:
    """Upstream LLaVA's runner flags plus device/dtype/attention, resume, profiling and the reduction flags."""
    p.add_argument("--model-path", type=str, default="liuhaotian/llava-v1.5-7b")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default=None,
                   help=f"conversation template (default: {conv_mode or 'vicuna_v1'} for LLaVA, the model family's "
                        "own chat template for the others)")
    p.set_defaults(llava_conv_mode=conv_mode)
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu (default: CUDA if available)")
    p.add_argument("--dtype", type=str, default=None, help="float16, bfloat16, float32 (default: fp16 on CUDA)")
    p.add_argument("--attn-implementation", type=str, default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--resume", action="store_true",
                   help="continue --answers-file (only a file written by the same run: model, method, decoding, "
                        "question file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --answers-file (the old files stay until the new run finishes); with "
                        "--resume (the scripts' EXTRA_ARGS=--overwrite): continue the same run, replace a different one")
    p.add_argument("--keep-first-duplicate", action="store_true",
                   help="answer a question id that appears twice once, the first time (default: an error)")
    p.add_argument("--profile", type=str, default=None, help="write one JSON line of timings/FLOPs/KV per sample")
    p.add_argument("--loyalty-to", type=str, default=None, metavar="ANSWERS",
                   help="an unpruned run's answers file on the same questions: the reduction log records per question "
                        "whether the answer equals that run's (same_answer) and how far the first answer token's "
                        "distribution moved from the unpruned model's (first_token_kl, first_token_same; one extra "
                        "unpruned prefill per question); needs --method and --pio-log")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers preparing images and prompts (default: 4 on CUDA, 0 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1,
                   help="questions per forward pass (left-padded, each pruned on its own; the answers are those of "
                        "--batch-size 1). More memory: activations and KV cache grow with the batch; a batch that "
                        "does not fit is split in halves and retried")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="Qwen2.5-VL: smallest image area in pixels (default 1008*1008, the PIO authors' setting)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="Qwen2.5-VL: largest image area in pixels (default 1008*1008)")
    add_method_args(p)


def check_args(args: argparse.Namespace) -> ReductionMethod | None:
    """Validate the flags that need no model (model family, conversation template, decoding, reduction method)
    and return the method they describe; raises ValueError naming what is wrong. A checkpoint's broken or missing
    files (and a hub id that cannot be fetched) are named here too, before any file is opened and the model
    loaded."""
    from llava.model.checkpoint_checks import check_checkpoint

    check_checkpoint(args.model_path)
    resolve_family_args(args)
    check_conv_mode(args.conv_mode)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    from llava.eval.batching import check_batch_args

    check_batch_args(args)
    method = method_from_args(args)
    if method is not None:
        args.family.check_method(method)  # an encoder-side method the family's vision tower cannot serve
    depth = _checkpoint_depth(args.model_path, args.family)
    if method is not None and depth is not None:
        method.validate(depth)  # layers and budgets against the checkpoint before the slow load
    return method


def decoder_depth(config: Any) -> int:
    """The language model's number of layers (from the config's family)."""
    from llava.model.families import family_of

    return family_of(config).decoder_depth(config)


def resolve_family_args(args: argparse.Namespace) -> None:
    """The checkpoint's model family (:mod:`llava.model.families`; a hub id by its name, before any network) sets
    ``args.family``, the default ``--conv-mode``, and refuses another family's template or options in one line."""
    from llava.model.families import guess_family

    guess_family(args.model_path).resolve_args(args)


def _checkpoint_depth(model_path: str, family: Any) -> int | None:
    """The decoder depth of a local checkpoint's config.json (None when it cannot be read cheaply)."""
    cfg = os.path.join(os.path.expanduser(model_path), "config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            return family.decoder_depth(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def image_token(im_start_end: bool) -> str:
    """The image placeholder of a prompt: ``<image>``, or ``<im_start><image><im_end>`` for such checkpoints."""
    return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if im_start_end else DEFAULT_IMAGE_TOKEN


def chat_prompt(user_text: str, conv_mode: str) -> str:
    """One user turn and an open assistant turn in the ``conv_mode`` template."""
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], user_text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def check_conv_mode(name: str) -> None:
    get_conv_template(name)  # raises with the allowed modes


def encode(prompt: str, images: Sequence[Any], tokenizer, processor, config) -> Prepared:
    """Token ids (1, T), pixels and image sizes of a templated ``prompt`` whose ``<image>`` marks stand for
    ``images`` (PIL, in order; empty for a text-only prompt), as the model family of ``config`` encodes them
    (:meth:`llava.model.families.Family.encode`: LLaVA's placeholder ids and crops, Qwen2.5-VL's expanded
    vision tokens and its ``image_grid_thw`` as the sizes)."""
    from llava.model.families import family_of

    n_marks = prompt.count(DEFAULT_IMAGE_TOKEN)
    if n_marks != len(images):
        raise ValueError(f"the prompt has {n_marks} {DEFAULT_IMAGE_TOKEN} mark(s) for {len(images)} image(s)")
    return family_of(config).encode(prompt, images, tokenizer, processor, config)


# --------------------------------------------------------------------------- torchrun
RANK_MARK = "{rank}"
"""In ``--answers-file``, ``--pio-log`` and ``--profile`` under torchrun: replaced by the process's rank."""


def join_launcher(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Under ``torchrun`` (``python -m torch.distributed.run``: ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in the
    environment), make this process shard ``RANK`` of ``WORLD_SIZE``: ``--num-chunks``/``--chunk-idx`` from the
    launcher, ``{rank}`` in the output paths replaced by the rank (each rank its own files: its own lock, run file
    and resume), and the model on ``cuda:LOCAL_RANK`` when CUDA is there and ``--device`` is unset or ``cuda``.

    No process group is created: ranks share nothing while they run, and their files are concatenated in rank
    order after the launch (``merge_chunks`` in ``scripts/common.sh``), the same merge as for
    ``CUDA_VISIBLE_DEVICES`` chunks. Outside a launcher nothing changes. Raises ValueError in one line on a bad
    launcher variable, ``--num-chunks`` given as well, or several ranks without ``{rank}`` in ``--answers-file``.
    """
    env = os.environ if environ is None else environ
    paths = [f for f in ("answers_file", "pio_log", "profile") if RANK_MARK in str(getattr(args, f, None) or "")]
    if "WORLD_SIZE" not in env:
        if paths:
            raise ValueError(f"--{paths[0].replace('_', '-')} {getattr(args, paths[0])}: {RANK_MARK} is filled in "
                             "with the rank under torchrun only; give a plain path to a single process")
        return
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = env.get(name, "0")
        if not text.isdigit():
            raise ValueError(f"{name}={text!r} in the environment is not a whole number (set by torchrun)")
        values[name] = int(text)
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} in the environment is not in [0, WORLD_SIZE={world})")
    if world > 1 and (args.num_chunks != 1 or args.chunk_idx != 0):
        raise ValueError(f"--num-chunks {args.num_chunks} --chunk-idx {args.chunk_idx} under torchrun "
                         f"(WORLD_SIZE={world}): the ranks are the chunks; give one or the other")
    shared = [f for f in ("answers_file", "pio_log", "profile") if getattr(args, f, None) and f not in paths]
    if world > 1 and shared:
        flag = "--" + shared[0].replace("_", "-")
        raise ValueError(f"{flag} {getattr(args, shared[0])} under torchrun (WORLD_SIZE={world}): every rank writes "
                         f"its own files, so put {RANK_MARK} in --answers-file, --pio-log and --profile (e.g. "
                         f"answers/{world}_{RANK_MARK}.jsonl) and merge them in rank order afterwards")
    if world > 1:
        args.num_chunks, args.chunk_idx = world, rank
    for f in paths:
        setattr(args, f, getattr(args, f).replace(RANK_MARK, str(rank)))
    if torch.cuda.is_available() and args.device in (None, "cuda"):
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this node sees {torch.cuda.device_count()} CUDA device(s): "
                             "start at most one process per GPU (NPROC_PER_NODE, torchrun --nproc_per_node)")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    logger.info("torchrun rank %d of %d (local rank %d): questions chunk %d of %d, device %s", rank, world, local,
                args.chunk_idx, args.num_chunks, args.device or "default")


# --------------------------------------------------------------------------- loading
def load_model(args: argparse.Namespace, method: ReductionMethod | None = None, loaded: tuple | None = None):
    """``(tokenizer, model, image_processor, model_name)`` from the flags; ``method`` is checked against the
    loaded model. ``loaded`` reuses an already loaded tuple (tests load a checkpoint once for many runs)."""
    from llava.model.builder import load_pretrained_model

    torch.manual_seed(args.seed)
    if loaded is not None:
        tok, model, proc, name = loaded
    else:
        model_path = os.path.expanduser(args.model_path)
        name = get_model_name_from_path(model_path)
        tok, model, proc, _ = load_pretrained_model(
            model_path, args.model_base, name, device=args.device, torch_dtype=args.dtype,
            attn_implementation=args.attn_implementation, min_pixels=getattr(args, "min_pixels", None),
            max_pixels=getattr(args, "max_pixels", None),
        )
    from llava.model.families import family_of

    family = family_of(model.config)
    if getattr(args, "family", None) is not None and family is not args.family:
        raise ValueError(f"{args.model_path} loaded as a {family.title} model, but the prompts were set up for "
                         f"{args.family.title} (--conv-mode {args.conv_mode})")
    if method is not None:
        family.check_method(method)
        method.validate(family.decoder_depth(model.config))
        logger.info("reduction on: %s", method.describe())
    return tok, model, proc, name


# --------------------------------------------------------------------------- questions and answers
def get_chunk(items: Sequence[Any], num_chunks: int, chunk_idx: int) -> list[Any]:
    """Contiguous, balanced chunk ``chunk_idx`` of ``num_chunks`` (may be empty; never raises on small inputs)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, --num-chunks), got {chunk_idx} of {num_chunks}")
    n = len(items)
    lo = chunk_idx * n // num_chunks
    hi = (chunk_idx + 1) * n // num_chunks
    return list(items[lo:hi])


def read_text(path: str | os.PathLike) -> str:
    """A question file's text; a file that is not UTF-8 raises naming it and the first bad byte."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"question file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); benchmark "
                         "files are UTF-8: convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_jsonl_questions(path: str | os.PathLike, required: Iterable[str]) -> list[dict]:
    """Question lines; a malformed line or a missing field raises naming the file and line."""
    out = []
    req = list(required)
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(item).__name__}")
        missing = [k for k in req if k not in item]
        if missing:
            raise ValueError(f"{path}:{i}: missing field(s) {', '.join(missing)} (needs {', '.join(req)})")
        out.append(item)
    return out


def load_image(path: str | os.PathLike):
    """Open an image as RGB, with an error that names the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large for Pillow's safety limit of {Image.MAX_IMAGE_PIXELS} pixels "
                         f"({e}); shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def question_seed(seed: int, key: str) -> int:
    """The sampling seed of one question: from the run's ``--seed`` and the question's key, so a resumed run
    samples every question as an uninterrupted one does."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def budget_label(args: argparse.Namespace, method: ReductionMethod | None) -> float | None:
    """The paper budget the run was asked for (``--budget`` / ``--pio-preset``), else None."""
    if method is None:
        return None
    for value in (getattr(args, "budget", None), getattr(args, "pio_alias__budget", None)):
        if value is not None:
            return float(value)
    if getattr(args, "schedule_file", None) and method.schedule.budget_ratio is not None:  # tuned for this budget
        return round(method.schedule.budget_ratio * PAPER_N0, 6)
    return None


# --------------------------------------------------------------------------- generation
class _StepClock(StoppingCriteria):
    """Timestamps every generated token (CUDA synchronised) without stopping anything."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model, input_ids: torch.Tensor, images: Any, image_sizes: Any, gen_kwargs: dict[str, Any],
                   method: ReductionMethod | None = None, profile: bool = False
                   ) -> tuple[torch.Tensor, PruneState, dict | None]:
    """``model.generate`` with ``method`` and a fresh :class:`PruneState`; with ``profile``, per-phase wall times.

    Timing: ``vision_s`` (image encoding and splicing), ``prefill_s`` (language-model prefill up to the first
    token, selection included), ``decode_s`` (the remaining tokens), ``total_s``; CUDA is synchronised.
    """
    state = PruneState(profile=profile)
    kw = dict(gen_kwargs)
    clock = _StepClock(model.device) if profile else None
    if clock is not None:
        kw["stopping_criteria"] = StoppingCriteriaList([clock])
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
            torch.cuda.synchronize(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids.to(model.device), images=images, image_sizes=image_sizes, reducer=method,
                             prune_state=state, **kw)
    t_end = time.perf_counter()
    if not isinstance(out, torch.Tensor):  # return_dict_in_generate: keep the logits of every generated token
        state.first_logits = out.logits[0] if out.logits else None
        state.step_logits = tuple(out.logits or ())
        out = out.sequences
    timing = None
    if clock is not None and clock.times:
        first = clock.times[0]
        vision = state.timings.get("vision", 0.0)
        timing = {"prefill_s": first - t0 - vision, "vision_s": vision, "decode_s": clock.times[-1] - first,
                  "total_s": t_end - t0, "new_tokens": int(out.shape[1])}
    return out, state, timing


def generate(model, tokenizer, input_ids: torch.Tensor, images: Any, image_sizes: Any, args: argparse.Namespace,
             method: ReductionMethod | None = None, profile: bool = False, first_logits: bool = False,
             stop: Sequence[str] = ()) -> tuple[str, PruneState, dict | None]:
    """Answer one prompt with the runner flags. Returns ``(text, prune_state, timing)``; with ``first_logits``,
    ``prune_state.first_logits`` holds the first answer token's logits (B, V). ``stop``: strings that end the
    answer (generation stops once one appears; the text is cut before the first of them)."""
    kw: dict[str, Any] = dict(
        do_sample=args.temperature > 0, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        use_cache=True, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    if first_logits:
        kw.update(output_logits=True, return_dict_in_generate=True)
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    if stop:
        kw.update(stop_strings=list(stop), tokenizer=tokenizer)
    out, state, timing = timed_generate(model, input_ids, images, image_sizes, kw, method, profile)
    text = tokenizer.batch_decode(out, skip_special_tokens=True)[0]
    return cut_at_stop(text, stop).strip(), state, timing


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of the ``stop`` strings (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def to_model(pixels: Any, model) -> Any:
    """Preprocessed pixels on the model's device and dtype (a tensor, or a list of per-image tensors)."""
    if isinstance(pixels, (list, tuple)):
        return [p.to(model.device, model.dtype) for p in pixels]
    return pixels.to(model.device, model.dtype)


def answer_record(question_id: Any, prompt: str, text: str, model_name: str, **extra: Any) -> dict:
    """Upstream's answer line: question_id, prompt, text, answer_id, model_id, metadata."""
    import shortuuid

    rec = {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": shortuuid.uuid(),
           "model_id": model_name, "metadata": {}}
    rec.update(extra)
    return rec


def log_record(question_id: Any, state: PruneState, sample: int = 0, **extra: Any) -> dict:
    """The reduction log line of one sample (row ``sample`` of a batch): visual counts per stage, kept positions,
    realised average."""
    report = state.report()
    rec = report[sample] if report else {"n_visual": 0, "stages": [], "avg_visual_tokens": 0.0}
    return {"question_id": question_id, **extra, **rec}


# --------------------------------------------------------------------------- loyalty
def read_reference_answers(path: str, run_identity_of_mine: dict[str, Any],
                           expected: dict[str, dict] | None = None) -> dict[str, str]:
    """``{question key: answer text}`` of an unpruned run's answers file (``--loyalty-to``); a file of a pruned
    run, of other questions or without question keys is refused, naming what differs. ``expected`` (``{key:
    {"question_id": ..., "prompt": ...}}`` of this run's questions) is what the file's lines must say of the keys
    they share with it, with or without a run file beside them (and they must share some)."""
    from llava.eval.results import iter_jsonl

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--loyalty-to {path}: no such answers file (run the unpruned model first)")
    info_path = os.path.splitext(path)[0] + ".run.json"
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            ref = json.load(f).get("identity") or {}
        if ref.get("method") is not None:
            raise ValueError(f"--loyalty-to {path}: that run used a reduction method ({ref['method'].get('method')}); "
                             "loyalty is measured against the unpruned model's answers")
        theirs, mine = (ref.get("questions") or {}).get("sha256"), run_identity_of_mine["questions"]["sha256"]
        if theirs and mine and theirs != mine:
            raise ValueError(f"--loyalty-to {path}: that run answered another question file (sha256 {theirs} vs "
                             f"{mine})")
    out = {}
    for lineno, rec in iter_jsonl(path):
        key = (rec.get("metadata") or {}).get("q")
        if key is None:
            raise ValueError(f"--loyalty-to {path}:{lineno}: an answer line without its question key (metadata.q); "
                             "answers written by this codebase's runners have it")
        out[str(key)] = str(rec.get("text", ""))
        mine = (expected or {}).get(str(key))
        if mine is not None:
            for what in ("question_id", "prompt"):
                if what in rec and str(rec[what]) != str(mine[what]):
                    raise ValueError(f"--loyalty-to {path}:{lineno}: question {key} is {rec[what]!r} there but "
                                     f"{mine[what]!r} in this run's question file ({what} differs): the answers of "
                                     "another question file; give the unpruned run of the same questions")
    if expected is not None and not set(out) & set(expected):
        raise ValueError(f"--loyalty-to {path}: none of its {len(out)} answers is to a question of this run (keys "
                         f"{', '.join(sorted(out)[:3])}...); give the unpruned run of the same question file")
    return out


def loyalty_record(model, input_ids: torch.Tensor, images: Any, image_sizes: Any, pruned_logits: torch.Tensor,
                   text: str, reference: str | None) -> dict[str, Any]:
    """How far a pruned answer is from the unpruned model's: the answers' equality (None: the reference run has
    no answer for the question) and, at the first answer token, the unpruned prefill's argmax agreement and
    ``KL(p_unpruned || p_pruned)`` in nats."""
    with torch.inference_mode():
        ref = model.generate(input_ids.to(model.device), images=images, image_sizes=image_sizes, do_sample=False,
                             max_new_tokens=1, output_logits=True, return_dict_in_generate=True).logits[0]
    log_p = torch.log_softmax(ref[0].double(), -1)
    log_q = torch.log_softmax(pruned_logits[0].double().to(log_p.device), -1)
    return {"same_answer": None if reference is None else text.strip() == reference.strip(),
            "first_token_same": bool(log_p.argmax() == log_q.argmax()),
            "first_token_kl": float((log_p.exp() * (log_p - log_q)).sum())}


# --------------------------------------------------------------------------- the question loop
@dataclass
class Question:
    """One question of a benchmark file, as a runner's reader makes it.

    Attributes:
        key: the question's place in the question file (``"17"``; ``"17:2"`` for round 2 of MMBench row 17),
            unique even where ids repeat by design (MME, TextVQA): the resume key written into every line.
        question_id: the id written to the answer, log and profile lines.
        data: whatever the runner's ``prepare`` and ``record`` need (the raw entry, options, ...).
        log_extra: extra fields of the log and profile lines (e.g. MMBench's ``round_id``).
    """

    key: str
    question_id: Any
    data: Any
    log_extra: dict = field(default_factory=dict)


Prepared = tuple[torch.Tensor, Any, Any]  # (input_ids (1, T), pixels or None, image sizes or None)


class _PreparedQuestions(torch.utils.data.Dataset):
    """Runs the runner's ``prepare`` (image loading, prompt building, preprocessing) in DataLoader workers."""

    def __init__(self, items: list[Question], prepare: Callable[..., Prepared], tokenizer, processor, config):
        self.items, self.prepare = items, prepare
        self.tokenizer, self.processor, self.config = tokenizer, processor, config

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        return (i, *self.prepare(item, self.tokenizer, self.processor, self.config))


def first_of_each(entries: list, key: Callable[[Any], Hashable], where: Callable[[int], str], keep_first: bool,
                  what: str = "question") -> list:
    """``entries`` with repeated ``key`` refused (naming them), or (``keep_first``) answered once, the first time."""
    seen: dict[Hashable, int] = {}
    out, repeated = [], []
    for i, e in enumerate(entries):
        k = key(e)
        if k in seen:
            repeated.append(f"{where(i)} repeats {where(seen[k])}")
            continue
        seen[k] = i
        out.append(e)
    if repeated:
        shown = "; ".join(repeated[:5]) + (f"; and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        if not keep_first:
            raise ValueError(f"{len(repeated)} repeated {what}(s): {shown} (--keep-first-duplicate answers each once, "
                             "the first time)")
        logger.warning("answering %d repeated %s(s) once, the first time: %s", len(repeated), what, shown)
    return out


def run_questions(
    args: argparse.Namespace,
    items: list[Question],
    prepare: Callable[[Question, Any, Any, Any], Prepared],
    record: Callable[[Question, str, str], dict],
    loaded: tuple | None = None,
    runner_options: dict[str, Any] | None = None,
    expected: int | None = None,
) -> None:
    """Answer ``items`` into ``--answers-file`` with the reduction log and profile, resumable (:mod:`runfiles`).

    Args:
        items: the chunk's questions, already checked by the runner's reader.
        prepare: ``prepare(item, tokenizer, image_processor, model_config) -> (input_ids (1, T), pixels or None,
            image sizes or None)``; runs in ``--num-workers`` DataLoader workers.
        record: ``record(item, answer_text, model_name) -> answer line``.
        loaded: an already loaded ``(tokenizer, model, image_processor, model_name)`` to reuse.
        runner_options: the runner's own flags that change its answers (prompt suffixes, language, ...), part
            of the run's identity.
        expected: how many questions the whole question file asks (every chunk), for the scorers' coverage.
    """
    method = check_args(args)  # before any file is opened and the model loaded
    if expected == 0 or (expected is None and not items and args.num_chunks == 1):
        raise ValueError(f"--question-file {getattr(args, 'question_file', None)}: it holds no questions (an empty "
                         "file?); give the benchmark's question file")
    identity = run_identity(args, method, runner_options or {})
    summary = {"method": method.name if method is not None else "none", "budget": budget_label(args, method),
               "method_config": method.config() if method is not None else None, "expected": expected,
               "batch_size": getattr(args, "batch_size", 1)}
    if getattr(args, "schedule_file", None):
        summary["schedule_file"] = os.path.abspath(args.schedule_file)
    reference = None
    if getattr(args, "loyalty_to", None):
        if method is None or not args.pio_log:
            raise ValueError("--loyalty-to compares a pruned run with the unpruned one: it needs --method and "
                             "--pio-log (where the per-question loyalty is written)")
        reference = read_reference_answers(args.loyalty_to, identity,
                                           {q.key: record(q, "", "") for q in items})
    files = RunFiles(args, identity, summary)
    finished = False
    try:
        todo = [q for q in items if q.key not in files.done]
        if len(todo) < len(items):
            logger.info("resuming: %d of %d questions already answered", len(items) - len(todo), len(items))
        if todo:
            tok, model, proc, name = load_model(args, method, loaded)
            workers = args.num_workers if args.num_workers is not None else (4 if model.device.type == "cuda" else 0)
            data = _PreparedQuestions(todo, prepare, tok, proc, model.config)
            loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
            if getattr(args, "batch_size", 1) > 1:
                from llava.eval.batching import answer_in_batches

                answer_in_batches(args, todo, loader, model, tok, name, method, files, record, reference)
            else:
                _answer_one_by_one(args, todo, loader, model, tok, name, method, files, record, reference)
        elif items:
            logger.info("nothing to do: every question of this chunk is answered")
        else:
            logger.info("nothing to do: chunk %d of %d has no questions (the file has %s)", args.chunk_idx,
                        args.num_chunks, expected)
        finished = True
    finally:
        files.close(finished)


def _answer_one_by_one(args: argparse.Namespace, todo: list[Question], loader: Any, model, tok, name: str,
                       method: ReductionMethod | None, files: RunFiles, record: Callable[[Question, str, str], dict],
                       reference: dict[str, str] | None) -> None:
    """:func:`run_questions`' loop with ``--batch-size 1``: one question per forward pass."""
    for i, ids, pixels, sizes in tqdm(loader, desc="questions", unit="q"):
        q = todo[i]
        pixels = to_model(pixels, model) if pixels is not None else None
        torch.manual_seed(question_seed(args.seed, q.key))
        text, state, timing = generate(model, tok, ids, pixels, sizes, args, method, files.profiling,
                                       first_logits=reference is not None)
        profile = None
        if files.profiling:
            from llava.eval.profiling import profile_record

            profile = {"question_id": q.question_id, **q.log_extra, **profile_record(model, state, timing)}
        extra = dict(q.log_extra)
        if reference is not None:
            extra.update(loyalty_record(model, ids, pixels, sizes, state.first_logits, text,
                                        reference.get(q.key)))
        log = log_record(q.question_id, state, **extra) if files.logging else None
        files.write(q.key, record(q, text, name), log, profile)


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
