"""What every inference runner shares: flags, model loading with PIO, chunking, resumable answer files,
the generation call, PIO logs and per-sample profiles."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.mm_utils import get_model_name_from_path
from pio import PIOConfig, PruneState, schedule_from_args

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- flags
def add_common_args(p: argparse.ArgumentParser, conv_mode: str = "llava_v1", max_new_tokens: int = 128) -> None:
    """Upstream LLaVA's runner flags plus device/dtype/attention, resume, profiling and the PIO flags."""
    p.add_argument("--model-path", type=str, default="liuhaotian/llava-v1.5-7b")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default=conv_mode)
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu (default: CUDA if available)")
    p.add_argument("--dtype", type=str, default=None, help="float16, bfloat16, float32 (default: fp16 on CUDA)")
    p.add_argument("--attn-implementation", type=str, default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--resume", action="store_true", help="skip question ids already in --answers-file")
    p.add_argument("--profile", type=str, default=None, help="write one JSON line of timings/FLOPs/KV per sample")
    p.add_argument("--seed", type=int, default=0)
    add_pio_args(p)


def add_pio_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PIO visual-token pruning (omit all to run the unpruned model)")
    g.add_argument("--pio-layers", "--layer_list", dest="pio_layers", default=None,
                   help="1-based layers after which to prune, e.g. 1,10,15 (or the authors' '[1,10,15]')")
    g.add_argument("--pio-tokens", "--image_token_list", dest="pio_tokens", default=None,
                   help="visual tokens kept after each layer, e.g. 92,54,22")
    g.add_argument("--pio-ratios", default=None, help="fractions of each sample's visual tokens, e.g. 0.5,0.25")
    g.add_argument("--pio-ratio-mode", default="initial", choices=["initial", "current"])
    g.add_argument("--pio-budget", default=None, help="average visual tokens per decoder layer, e.g. 64")
    g.add_argument("--pio-budget-ratio", default=None, help="average budget as a fraction of each sample's count")
    g.add_argument("--pio-preset", default=None, help="the paper's schedules: 64, 128 or 192 (layers 1,10,15)")
    g.add_argument("--visual_token_num", dest="pio_visual_token_num", default=None,
                   help="authors' alias; only 576 (no encoder-side reduction) is supported")
    g.add_argument("--pio-tau", type=float, default=0.8, help="NMS cosine threshold")
    g.add_argument("--pio-kpos", type=int, default=4, help="supervised rows of the proxy loss")
    g.add_argument("--pio-proxy", default="next", choices=["next", "current"], help="proxy decoder layer")
    g.add_argument("--pio-proxy-impl", default="sliced", choices=["sliced", "full"])
    g.add_argument("--pio-include-last", action="store_true", help="also supervise the last position")
    g.add_argument("--pio-no-nms", action="store_true", help="plain top-k by saliency (ablation)")
    g.add_argument("--pio-log", default=None, help="one JSON line per sample with the realised visual counts")


def pio_config_from_args(args: argparse.Namespace) -> PIOConfig | None:
    schedule = schedule_from_args(
        layers=args.pio_layers, tokens=args.pio_tokens, ratios=args.pio_ratios, budget=args.pio_budget,
        budget_ratio=args.pio_budget_ratio, preset=args.pio_preset, visual_token_num=args.pio_visual_token_num,
        ratio_mode=args.pio_ratio_mode,
    )
    if schedule is None:
        return None
    return PIOConfig(schedule, tau=args.pio_tau, k_pos=args.pio_kpos, proxy=args.pio_proxy,
                     include_last=args.pio_include_last, proxy_impl=args.pio_proxy_impl, nms=not args.pio_no_nms)


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


# --------------------------------------------------------------------------- loading
def load_from_args(args: argparse.Namespace, loaded: tuple | None = None):
    """``(tokenizer, model, image_processor, model_name)`` with PIO switched on or off as the flags say.

    ``loaded`` reuses an already loaded ``(tokenizer, model, image_processor, model_name)`` (tests load a
    checkpoint once for many runs).
    """
    from llava.model.builder import load_pretrained_model

    check_conv_mode(args.conv_mode)
    pio = pio_config_from_args(args)  # validate flags before the (slow) load
    torch.manual_seed(args.seed)
    if loaded is not None:
        tok, model, proc, name = loaded
    else:
        model_path = os.path.expanduser(args.model_path)
        name = get_model_name_from_path(model_path)
        tok, model, proc, _ = load_pretrained_model(
            model_path, args.model_base, name, device=args.device, torch_dtype=args.dtype,
            attn_implementation=args.attn_implementation,
        )
    if pio is not None:
        model.enable_pio(pio)
        logger.info("PIO on: %s", pio.schedule.describe())
    else:
        model.disable_pio()
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


def read_jsonl_questions(path: str | os.PathLike, required: Iterable[str]) -> list[dict]:
    """Question lines; a malformed line or a missing field raises naming the file and line."""
    out = []
    req = list(required)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
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
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


class JsonlWriter:
    """Line-by-line JSONL output; ``resume`` appends and reports ids already present."""

    def __init__(self, path: str | os.PathLike | None, resume: bool, key: str = "question_id"):
        self.path = path
        self.done: set[str] = set()
        self._f = None
        if path is None:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if resume and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            good = []
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: dropping a truncated last line from an interrupted run", path)
                    continue
                good.append(line)
                self.done.add(str(rec.get(key)))
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(g + "\n" for g in good))
        self._f = open(path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


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
                   profile: bool = False) -> tuple[torch.Tensor, PruneState, dict | None]:
    """``model.generate`` with a fresh :class:`PruneState`; with ``profile``, per-phase wall times.

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
        out = model.generate(input_ids.to(model.device), images=images, image_sizes=image_sizes,
                             prune_state=state, **kw)
    t_end = time.perf_counter()
    timing = None
    if clock is not None and clock.times:
        first = clock.times[0]
        vision = state.timings.get("vision", 0.0)
        timing = {"prefill_s": first - t0 - vision, "vision_s": vision, "decode_s": clock.times[-1] - first,
                  "total_s": t_end - t0, "new_tokens": int(out.shape[1])}
    return out, state, timing


def generate(model, tokenizer, input_ids: torch.Tensor, images: Any, image_sizes: Any, args: argparse.Namespace,
             profile: bool = False) -> tuple[str, PruneState, dict | None]:
    """Answer one prompt with the runner flags. Returns ``(text, prune_state, timing)``."""
    kw: dict[str, Any] = dict(
        do_sample=args.temperature > 0, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        use_cache=True, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    out, state, timing = timed_generate(model, input_ids, images, image_sizes, kw, profile)
    return tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip(), state, timing


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


class SampleLogs:
    """The optional PIO log and profile of a run, written line by line next to the answers."""

    def __init__(self, args: argparse.Namespace, model):
        self.model = model
        self.pio_log = JsonlWriter(args.pio_log, args.resume) if args.pio_log else None
        self.profile = JsonlWriter(args.profile, args.resume) if args.profile else None

    @property
    def profiling(self) -> bool:
        return self.profile is not None

    def write(self, question_id: Any, state: PruneState, timing: dict | None, **extra: Any) -> None:
        """Log one sample; ``extra`` fields (e.g. ``round_id``) go into both records."""
        cfg = self.model.pio_config
        L = self.model.config.num_hidden_layers
        layers = cfg.schedule.layers if cfg is not None else ()
        report = state.report(L, layers)
        if self.pio_log is not None:
            rec = report[0] if report else {"n_visual": 0, "stages": [], "avg_visual_tokens": 0.0}
            self.pio_log.write({"question_id": question_id, **extra, **rec})
        if self.profile is not None:
            from llava.eval.profiling import profile_record

            self.profile.write({"question_id": question_id, **extra, **profile_record(self.model, state, timing)})

    def close(self) -> None:
        for w in (self.pio_log, self.profile):
            if w is not None:
                w.close()


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
