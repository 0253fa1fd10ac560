"""Many questions per forward pass (``--batch-size N``): left-padded batches, per-sample pruning, batched cached
decoding with per-sample stopping, per-question sampling seeds, and out-of-memory splitting.

The model side already answers a batch exactly as it answers each sample alone (:mod:`llava.model.reducible`:
each sample's own visual spans and pruning targets, left padding masked out of every score); this module
builds the batches and takes the answers apart again.

* :func:`collate` pads prompts on the left and concatenates the samples' images in order (one tensor when every
  image has the same shape, else one tensor per image, which every family reads).
* :func:`generate_batch` answers one batch: transformers' cached decoding, where every row stops on its own (EOS,
  a stop string) and finished rows are padded until the batch ends or reaches ``max_new_tokens``. Sampling draws
  each row's tokens from its own ``torch.Generator`` seeded by the question (:class:`PerQuestionSampler`), so an
  answer does not depend on which questions share its batch, and a resumed run samples as an uninterrupted one.
* :class:`Batcher` groups prepared questions by prompt length, answers them, splits a batch that runs out of
  memory in halves (down to one question, then the error is raised naming the batch size that fits), and hands
  the answers back in question order.
* :func:`answer_in_batches` is the question runners' loop for ``--batch-size`` > 1 (the files, logs and loyalty
  records are those of :func:`llava.eval.runner.run_questions`, line for line).
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from pio import PruneState, ReductionMethod

logger = logging.getLogger(__name__)

__all__ = ["Batcher", "PerQuestionSampler", "Sample", "SampleAnswer", "answer_in_batches", "check_batch_args",
           "collate", "generate_batch", "is_out_of_memory"]

WINDOW = 4
"""Prepared questions are grouped by prompt length within windows of ``WINDOW * batch size`` questions."""


@dataclass
class Sample:
    """One prepared question: ``ids`` (1, T) as the family's prompt encoding makes them, its pixels (a tensor or a
    list of per-image tensors; None for a text-only prompt), its image sizes, and its sampling seed."""

    ids: torch.Tensor
    pixels: Any
    sizes: Any
    seed: int = 0


@dataclass
class SampleAnswer:
    """One sample's answer: the text (cut at the first stop string, stripped), the batch's
    :class:`~pio.PruneState` and the sample's row in it (``state.report()[row]``), and with ``first_logits``
    the first answer token's logits (1, V)."""

    text: str
    state: PruneState
    row: int
    first_logits: torch.Tensor | None = None


def check_batch_args(args: argparse.Namespace) -> None:
    """``--batch-size`` against the other runner flags; raises ValueError naming what is wrong."""
    n = getattr(args, "batch_size", 1)
    if n < 1:
        raise ValueError(f"--batch-size must be >= 1, got {n}")
    if n > 1 and getattr(args, "profile", None):
        raise ValueError("--profile times one question per forward pass: give --batch-size 1 with it (the bench, "
                         "python -m llava.eval.bench --batch-size, measures batched throughput)")
    if n > 1 and args.num_beams > 1 and args.temperature > 0:
        raise ValueError("--num_beams > 1 with --temperature > 0 (beam sampling) draws for the whole batch at once: "
                         "give --batch-size 1, or --temperature 0")


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, or a failed CPU allocation."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------- one batch
def _cat_pixels(pixels: list[Any]) -> Any:
    """The samples' pixels in order: one tensor when all are tensors of the same per-image shape (LLaVA's
    (N, 3, H, W) and (N, 1 + crops, 3, H, W), Qwen2.5-VL's (patches, C)), a family's bundle joined by its own
    ``join`` (Qwen2.5-VL's ``QwenVisual``, LLaVA-OneVision's ``OnevisionVideos``: videos), else one tensor per
    image."""
    if len({type(p) for p in pixels}) == 1 and hasattr(type(pixels[0]), "join"):
        return type(pixels[0]).join(pixels)
    if all(torch.is_tensor(p) for p in pixels) and len({tuple(p.shape[1:]) for p in pixels}) == 1:
        return torch.cat(pixels)
    out: list[torch.Tensor] = []
    for p in pixels:
        out.extend(list(p))  # per image: (3, H, W) or (crops, 3, H, W)
    return out


def _cat_sizes(sizes: list[Any]) -> Any:
    """The samples' image sizes in order: LLaVA's (width, height) lists joined, Qwen2.5-VL's grids (n, 3)
    concatenated."""
    if all(torch.is_tensor(s) for s in sizes):
        return torch.cat(sizes)
    return [s for group in sizes for s in group]


def collate(samples: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """``(ids (B, T), attention_mask (B, T), pixels, sizes)``: prompts left-padded with ``pad_id`` (masked out),
    the images of every sample with images, in order (None when no sample has one)."""
    width = max(s.ids.shape[1] for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=samples[0].ids.dtype)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for b, s in enumerate(samples):
        n = s.ids.shape[1]
        ids[b, width - n:], mask[b, width - n:] = s.ids[0], 1
    with_images = [s for s in samples if s.pixels is not None]
    if not with_images:
        return ids, mask, None, None
    pixels = _cat_pixels([s.pixels for s in with_images])
    sizes = None
    if all(s.sizes is not None for s in with_images):
        sizes = _cat_sizes([s.sizes for s in with_images])
    return ids, mask, pixels, sizes


class PerQuestionSampler(LogitsProcessor):
    """Sampling with one random stream per row: the scores are warped as transformers warps them for sampling
    (``warpers``), then row ``b`` draws its token with ``generators[b]`` and the returned scores allow only that
    token, which greedy decoding then picks. Each question's draws come from its own seed alone, so they do not
    depend on the batch it is in; with the seed of :func:`llava.eval.runner.question_seed` they are the draws
    one-by-one sampling makes after ``torch.manual_seed`` of that seed (same warpers, same ``torch.multinomial``
    on the row's probabilities)."""

    def __init__(self, warpers: LogitsProcessorList, generators: Sequence[torch.Generator]):
        self.warpers, self.generators = warpers, list(generators)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)  # (B, V)
        out = torch.full_like(scores, float("-inf"))
        for b, gen in enumerate(self.generators):
            token = torch.multinomial(probs[b : b + 1], num_samples=1, generator=gen)  # (1, 1)
            out[b, token[0, 0]] = 0.0
        return out


def sampling_warpers(generation_config: Any) -> LogitsProcessorList:
    """The warpers transformers applies when sampling with ``generation_config`` (beam width 1), in its order:
    temperature, top-k, top-p, min-p, typical, epsilon, eta (``GenerationMixin._get_logits_processor``)."""
    c = generation_config
    out = LogitsProcessorList()
    if c.temperature is not None and c.temperature != 1.0:
        out.append(TemperatureLogitsWarper(c.temperature))
    if c.top_k is not None and c.top_k != 0:
        out.append(TopKLogitsWarper(top_k=c.top_k, min_tokens_to_keep=1))
    if c.top_p is not None and c.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=c.top_p, min_tokens_to_keep=1))
    if c.min_p is not None:
        out.append(MinPLogitsWarper(min_p=c.min_p, min_tokens_to_keep=1))
    if c.typical_p is not None and c.typical_p < 1.0:
        out.append(TypicalLogitsWarper(mass=c.typical_p, min_tokens_to_keep=1))
    if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
        out.append(EpsilonLogitsWarper(epsilon=c.epsilon_cutoff, min_tokens_to_keep=1))
    if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
        out.append(EtaLogitsWarper(epsilon=c.eta_cutoff, min_tokens_to_keep=1))
    return out


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])


def generate_batch(model: Any, tokenizer: Any, samples: Sequence[Sample], args: argparse.Namespace,
                   method: ReductionMethod | None = None, first_logits: bool = False, stop: Sequence[str] = ()
                   ) -> list[SampleAnswer]:
    """Answer ``samples`` in one left-padded batch with the runner flags (``temperature``, ``top_p``,
    ``num_beams``, ``max_new_tokens``): per-sample pruning in the prefill, cached decoding where each row stops
    at its EOS or ``stop`` string (the others go on to ``max_new_tokens``). The answers are those of
    :func:`llava.eval.runner.generate` on each sample alone."""
    from llava.eval.runner import cut_at_stop, to_model

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, pixels, sizes = collate(samples, pad)
    kw: dict[str, Any] = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, use_cache=True,
                              pad_token_id=pad, do_sample=False)
    if args.temperature > 0:  # per-question streams; greedy decoding picks the token each row drew
        config = copy.deepcopy(model.generation_config)
        config.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        generators = [torch.Generator(device=model.device).manual_seed(s.seed) for s in samples]
        kw["logits_processor"] = LogitsProcessorList([PerQuestionSampler(sampling_warpers(config), generators)])
    if first_logits:
        kw.update(output_logits=True, return_dict_in_generate=True)
    if stop:
        kw.update(stop_strings=list(stop), tokenizer=tokenizer)
    state = PruneState()
    with torch.inference_mode():
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                             images=to_model(pixels, model) if pixels is not None else None, image_sizes=sizes,
                             reducer=method, prune_state=state, **kw)
    logits = None
    if not isinstance(out, torch.Tensor):
        logits = out.logits[0] if out.logits else None  # (B, V): the first answer token of every row
        out = out.sequences
    eos = _eos_ids(model, tokenizer)
    answers = []
    for b, row in enumerate(out.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # a finished row is padded after EOS
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        answers.append(SampleAnswer(cut_at_stop(text, stop).strip(), state, b,
                                    logits[b : b + 1] if logits is not None else None))
    return answers


# --------------------------------------------------------------------------- many batches
class Batcher:
    """Answers prepared questions ``batch_size`` at a time (:func:`generate_batch`), grouped by prompt length
    within windows of :data:`WINDOW` batches, and yields them in the order they came.

    ``answer`` replaces :func:`generate_batch` (the tests inject errors with it). A batch that runs out of memory is split in halves and each half retried (down to one question, whose
    error is raised); later batches are then at most the size that fitted, which is logged.
    """

    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace, method: ReductionMethod | None = None,
                 first_logits: bool = False, stop: Sequence[str] = (),
                 answer: Callable[..., list[SampleAnswer]] | None = None):
        self.model, self.tokenizer, self.args, self.method = model, tokenizer, args, method
        self.first_logits, self.stop, self.answer = first_logits, tuple(stop), answer
        self.limit = max(1, int(args.batch_size))

    def _answer(self, samples: list[Sample]) -> list[SampleAnswer]:
        try:
            return (self.answer or generate_batch)(self.model, self.tokenizer, samples, self.args, self.method,
                               first_logits=self.first_logits, stop=self.stop)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if len(samples) == 1:
                raise RuntimeError(f"out of memory answering one question alone ({err}); even --batch-size 1 does "
                                   "not fit: use a smaller --max-pixels, a lower-precision --dtype or a larger device"
                                   ) from err
            del err  # frees the failed batch's tensors before the retry
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            half = (len(samples) + 1) // 2
            if half < self.limit:
                self.limit = half
            logger.warning("out of memory at batch size %d: retrying as %d + %d; later batches use at most %d "
                           "(--batch-size %d fits here)", len(samples), half, len(samples) - half, self.limit,
                           self.limit)
            return self._answer(samples[:half]) + self._answer(samples[half:])

    def run(self, items: Iterable[tuple[Any, Sample]]) -> Iterator[tuple[Any, Sample, SampleAnswer]]:
        """``(tag, sample, answer)`` for every ``(tag, sample)`` of ``items``, in their order."""
        window: list[tuple[Any, Sample]] = []
        for item in items:
            window.append(item)
            if len(window) >= WINDOW * self.limit:
                yield from self._window(window)
                window = []
        if window:
            yield from self._window(window)

    def _window(self, window: list[tuple[Any, Sample]]) -> Iterator[tuple[Any, Sample, SampleAnswer]]:
        order = sorted(range(len(window)), key=lambda i: window[i][1].ids.shape[1])  # similar lengths together
        done: dict[int, SampleAnswer] = {}
        head = 0
        start = 0
        while start < len(order):
            chunk = order[start : start + self.limit]
            start += len(chunk)
            for i, ans in zip(chunk, self._answer([window[i][1] for i in chunk])):
                done[i] = ans
            while head in done:  # the answers are handed back in question order as soon as they can be
                tag, sample = window[head]
                yield tag, sample, done.pop(head)
                head += 1


# --------------------------------------------------------------------------- the runners' loop
def answer_in_batches(args: argparse.Namespace, todo: Sequence[Any], loader: Iterable, model: Any, tokenizer: Any,
                      model_name: str, method: ReductionMethod | None, files: Any,
                      record: Callable[[Any, str, str], dict], reference: dict[str, str] | None) -> None:
    """:func:`llava.eval.runner.run_questions`' loop with ``--batch-size`` > 1: ``loader`` yields ``(i, ids,
    pixels, sizes)`` of ``todo[i]`` in order; the answer, log (kept positions of each question, its loyalty
    record) lines are written per question, in question order, as the one-by-one loop writes them."""
    from llava.eval.runner import log_record, loyalty_record, question_seed, to_model

    batcher = Batcher(model, tokenizer, args, method, first_logits=reference is not None)
    samples = ((i, Sample(ids, pixels, sizes, question_seed(args.seed, todo[i].key))) for i, ids, pixels, sizes in
               loader)
    for i, sample, ans in tqdm(batcher.run(samples), total=len(todo), desc="questions", unit="q"):
        q = todo[i]
        extra = dict(q.log_extra)
        if reference is not None:
            pixels = to_model(sample.pixels, model) if sample.pixels is not None else None
            extra.update(loyalty_record(model, sample.ids, pixels, sample.sizes, ans.first_logits, ans.text,
                                        reference.get(q.key)))
        log = log_record(q.question_id, ans.state, sample=ans.row, **extra) if files.logging else None
        files.write(q.key, record(q, ans.text, model_name), log, None)
