"""lmms-eval's model ``pio_fvlm``: this project's checkpoints, families and reduction methods inside lmms-eval.

After ``pip install -e ".[lmms]"`` (the ``lmms_eval.models`` entry point in ``pyproject.toml`` registers it)::

    python -m lmms_eval --model pio_fvlm --model_args pretrained=liuhaotian/llava-v1.5-7b,method=pio,budget=64 \\
        --tasks mme,pope,mmstar --batch_size 1 --output_path out/

``--model_args`` are the runners' flags (:func:`llava.eval.runner.add_common_args`), spelt without dashes and
with ``_`` for ``-`` (``--pio-tau 0.5`` -> ``pio_tau=0.5``, ``--dart-pivot-text`` -> ``dart_pivot_text=true``),
plus ``pretrained`` (= ``model_path``), ``pio_dir`` (where the run's records go) and ``run_name`` (its row in
``python -m llava.eval.summarize``). Lists keep their commas inside brackets: ``layers=[1,10,15]``. The runner
flags lmms-eval decides (the answers file, chunks, decoding) are refused with the reason (:data:`OWNED`): the
decoding comes from each task's ``generation_kwargs`` (``until``, ``max_new_tokens``, ``temperature``,
``do_sample``, ``top_p``, ``num_beams``; ``max_new_tokens=N`` is the default for a task that sets none).

One code path with the runners: the flags are parsed by the runners' parser and checked by
:func:`~llava.eval.runner.check_args`, the model is loaded by :func:`~llava.eval.runner.load_model`, prompts are
built by :func:`~llava.eval.runner.chat_prompt` / :func:`~llava.eval.runner.encode` (the family's own template:
lmms-eval's context comes without one) and answered by :func:`~llava.eval.runner.generate` /
:func:`~llava.eval.runner.timed_generate` with the reduction method, one request at a time; with lmms-eval's
``--batch_size N`` (N > 1), ``generate_until`` answers N requests per forward pass as the runners'
``--batch-size`` does (:mod:`llava.eval.batching`: consecutive requests of the same ``generation_kwargs``, the
answers those of one at a time), while multi-round dialogues (each round waits for the previous answer) and
``loglikelihood`` stay one request at a time.

Videos (families with ``Family.video_rule``: Qwen2.5-VL, LLaVA-OneVision): lmms-eval's video tasks hand a simple
model the document's video as ``[path]`` (``tasks/videomme/utils.py`` ``videomme_doc_to_visual``); such a document
is read with the video runner's code (:func:`llava.eval.model_video_qa.video_sampling`,
:func:`llava.video.load_video`, :func:`~llava.eval.model_video_qa.video_prompt`,
:func:`~llava.eval.model_video_qa.encode`), so its answer is :mod:`llava.eval.model_video_qa`'s on the same clip and
question. The frame options are the video runner's flags as model_args (``num_frames``, ``fps``,
``video_min_pixels``, ``video_max_pixels``, ``video_total_pixels``), recorded in ``run.json`` (``video_sampling``).
One video per document, no images beside it; under ``--batch_size N`` consecutive video requests are batched as the
video runner batches them (never with images). A family without video, or a document mixing a video with images,
is refused in one line naming the families with video.

``loglikelihood`` (lmms-eval's multiple-choice tasks): the context is prefilled with the reduction method, exactly
as before generating, and the continuation is fed through the same cached decoding, one forced token per step.
So a pruned model is scored as it answers: what it kept at prefill is all the continuation sees (scoring the
continuation inside the prefill would let the reduction see the answer, and what it keeps would depend on the
choice being scored). Each request returns ``(loss, is_greedy)``: the mean negative log-probability of the
continuation's tokens under the model's raw logits, and whether each token was the argmax. A loss, not a
log-likelihood, because that is what lmms-eval 0.7.3 scores: its multiple-choice answer is the choice with the
smallest value (``api/task.py``), and its own LLaVA models return the continuation's mean cross-entropy. The
pair goes back wrapped in lmms-eval's ``GenerationResult``: 0.7.3's evaluator turns a bare ``(float, bool)``
into its string (``unwrap_generation_output``), which breaks every multiple-choice task, and passes a
``GenerationResult``'s ``text`` through unchanged.

What lmms-eval cannot record is written beside its output (:mod:`llava.eval.lmms_results`): the run (method,
configuration, ranks) and one line per request (visual tokens per stage, realised average), per task and rank;
``pio_log=FILE`` adds the runners' full reduction log (kept positions) and ``profile=FILE`` their per-request
profile (per-rank files ``FILE.rank<R>`` under several processes).

Several processes: ``python -m accelerate.commands.launch --multi_gpu --num_processes N -m lmms_eval ...`` or
``torchrun --nproc_per_node N -m lmms_eval ...``; each rank loads the model on ``cuda:<local rank>`` (CPU without
CUDA, gloo) and answers the documents lmms-eval gives it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from llava.eval import batching, lmms_results, model_video_qa, runner
from llava.model.families import families, family_options
from llava.video import Video, add_video_args, load_video

try:
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms
except ImportError as err:  # tests/test_lmms.py hides lmms_eval to check this message
    raise ImportError(
        f"lmms-eval is not installed ({err}); the pio_fvlm model needs it: pip install -e \".[lmms]\" (on a "
        "CPU-only torch, then: pip uninstall -y torchvision), or make install"
    ) from None

logger = logging.getLogger(__name__)

MODEL_CLASS = f"{__name__}.PioFvlm"

# Runner flags that lmms-eval decides, with what to use instead.
OWNED: dict[str, str] = {
    "answers_file": "lmms-eval writes the answers (--output_path, --log_samples)",
    "num_chunks": "launch several processes instead (accelerate launch / torchrun)",
    "chunk_idx": "launch several processes instead (accelerate launch / torchrun)",
    "resume": "lmms-eval has its own cache (--use_cache)",
    "overwrite": "lmms-eval has its own cache (--use_cache)",
    "keep_first_duplicate": "lmms-eval answers every document",
    "loyalty_to": "compare runs with python -m llava.eval.summarize",
    "num_workers": "lmms-eval prepares the documents",
    "temperature": "each task's generation_kwargs decide it (lmms-eval --gen_kwargs overrides them)",
    "top_p": "each task's generation_kwargs decide it (lmms-eval --gen_kwargs overrides them)",
    "num_beams": "each task's generation_kwargs decide it (lmms-eval --gen_kwargs overrides them)",
}
OWN_ARGS = ("pretrained", "pio_dir", "run_name", "batch_size", "max_batch_size", "device")
GEN_KWARGS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".gif")
Media = tuple[list, str | None]
"""A document's visuals: its PIL images, or (no images) the path of its one video."""


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval's ``--model pio_fvlm`` is :class:`PioFvlm`. (Imported here:
    importing lmms-eval's model registry loads the entry points, this module's among them.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=lmms_results.MODEL_ID, simple_class_path=MODEL_CLASS)


# --------------------------------------------------------------------------- model_args -> runner flags
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a ValueError naming the problem, never an exit
        raise ValueError(message)


def _runner_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The runners' parser, and its actions by model_arg name (a flag's spellings without dashes, ``-`` -> ``_``)."""
    p = _Parser(add_help=False)
    runner.add_common_args(p)
    add_video_args(p)
    by_key = {}
    for action in p._actions:
        for flag in action.option_strings:
            by_key[flag.lstrip("-").replace("-", "_")] = action
    by_key["pretrained"] = by_key["model_path"]
    for key in OWNED:
        by_key.pop(key, None)
    return p, by_key


def video_model_args() -> tuple[str, ...]:
    """The frame sampling keys (the video runner's flags, :func:`llava.video.add_video_args`): ``num_frames``,
    ``fps``, ``video_min_pixels``, ..."""
    p = argparse.ArgumentParser(add_help=False)
    add_video_args(p)
    return tuple(a.dest for a in p._actions)


def video_families() -> str:
    """The titles of the families that take video (``Family.video_rule`` set), for refusals."""
    return ", ".join(f.title for f in families() if f.video_rule) or "none"


def allowed_model_args() -> list[str]:
    """Every ``--model_args`` key the model takes."""
    return sorted(set(_runner_parser()[1]) | set(OWN_ARGS))


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text


def _flagless(message: str) -> str:
    """A runner's error in model_args spelling (``--pio-tau`` -> ``pio_tau``)."""
    return re.sub(r"(?<![\w-])--([A-Za-z][\w-]*)", lambda m: m.group(1).replace("-", "_"), message)


def runner_args(model_args: Mapping[str, Any]) -> argparse.Namespace:
    """The runner flags ``model_args`` give (lmms-eval's own settings and the model's, :data:`OWN_ARGS`, left out).

    Raises:
        ValueError: an unknown key (naming the allowed ones), a key lmms-eval decides (:data:`OWNED`), a value the
            flag refuses.
    """
    parser, by_key = _runner_parser()
    argv: list[str] = []
    for key, value in model_args.items():
        if key in OWN_ARGS and key != "pretrained":
            continue
        if key in OWNED:
            raise ValueError(f"pio_fvlm model_args: {key} is not a model_arg: {OWNED[key]}")
        action = by_key.get(key)
        if action is None:
            raise ValueError(f"pio_fvlm model_args: unknown key {key!r}; allowed: {', '.join(allowed_model_args())}")
        flag = action.option_strings[0]
        if action.nargs == 0:  # an on/off flag: key=true gives it
            if value not in (True, False):
                raise ValueError(f"pio_fvlm model_args: {key} is on or off: {key}=true (or leave it out), got "
                                 f"{value!r}")
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, _unquote(str(value))]
    try:
        return parser.parse_args(argv)
    except ValueError as err:
        raise ValueError(f"pio_fvlm model_args: {_flagless(str(err))}") from None


def _output_path_from_command_line() -> str | None:
    """lmms-eval's ``--output_path`` (it does not hand it to models; read from its command line)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--output_path", default=None)
    known, _ = p.parse_known_args(sys.argv[1:])
    return known.output_path


# --------------------------------------------------------------------------- records
class _Records:
    """The run's records beside lmms-eval's output (:mod:`llava.eval.lmms_results`), and the optional full
    reduction log and profile (``pio_log``/``profile``), each rank writing its own files."""

    def __init__(self, folder: str | None, run: dict[str, Any], rank: int, world_size: int,
                 pio_log: str | None, profile: str | None):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self._files: dict[str, Any] = {}
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):  # this rank's lines of an earlier run with this configuration
                if name.endswith(f".rank{rank}.jsonl"):
                    os.remove(os.path.join(folder, name))
            if rank == 0:
                tmp = os.path.join(folder, f"run.json.tmp{os.getpid()}")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(run, f, indent=2, default=str)
                os.replace(tmp, os.path.join(folder, "run.json"))
            logger.info("pio_fvlm: the run's records go to %s", folder)
        else:
            logger.warning("pio_fvlm: no --output_path on lmms-eval's command line and no pio_dir model_arg: the "
                           "method and the realised visual tokens are not recorded (python -m llava.eval.summarize "
                           "cannot show this run; give pio_dir=DIR, e.g. with lmms-eval's --config)")
        self.pio_log = self._per_rank(pio_log)
        self.profile = self._per_rank(profile)
        for path in (self.pio_log, self.profile):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                open(path, "w").close()

    def _per_rank(self, path: str | None) -> str | None:
        return f"{path}.rank{self.rank}" if path and self.world_size > 1 else path

    def _append(self, path: str, rec: dict[str, Any]) -> None:
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = open(path, "a", encoding="utf-8")
        handle.write(json.dumps(rec, default=str) + "\n")
        handle.flush()

    def write(self, task: str, doc_id: Any, idx: int, request: str, state, model, timing: dict | None,
              row: int = 0) -> None:
        """One request's lines; ``row``: its row of a batched ``state``."""
        where = {"task": task, "doc_id": doc_id, "idx": idx, "request": request}
        log = runner.log_record(f"{task}:{doc_id}", state, sample=row, **where)
        if self.folder is not None:
            brief = {k: v for k, v in log.items() if k not in ("question_id", "task", "encoder_kept")}
            brief["stages"] = [{k: v for k, v in st.items() if k != "kept"} for st in log.get("stages", [])]
            self._append(os.path.join(self.folder, f"{task}.rank{self.rank}.jsonl"), brief)
        if self.pio_log:
            self._append(self.pio_log, log)
        if self.profile:
            from llava.eval.profiling import profile_record

            self._append(self.profile, {"question_id": f"{task}:{doc_id}", **where,
                                        **profile_record(model, state, timing)})

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


# --------------------------------------------------------------------------- the model
class PioFvlm(lmms):
    """lmms-eval model over :func:`llava.eval.runner.load_model` (every family the builder knows) with any
    registered reduction method or composition (module docstring).

    Args:
        pretrained: a checkpoint folder or hub id (the runners' ``--model-path``).
        batch_size: lmms-eval's: ``generate_until`` requests per forward pass (the answers do not depend on it).
        device: ``cpu``, ``cuda``, ``cuda:1`` (default: ``cuda:<local rank>`` when CUDA is there, else CPU).
        pio_dir: where the run's records go (default: lmms-eval's ``--output_path``/pio_fvlm).
        run_name: the run's row in summarize's table (default: :func:`lmms_results.default_run_name`).
        **model_args: the runners' flags and the video runner's frame options (:func:`runner_args`).
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, device: str | None = None, pio_dir: str | None = None,
                 run_name: str | None = None, **model_args: Any) -> None:
        super().__init__()
        from accelerate import Accelerator

        given = dict(model_args)
        if pretrained is not None:
            given = {"pretrained": pretrained, **given}
        if "pretrained" not in given and "model_path" not in given:
            raise ValueError("pio_fvlm model_args: give pretrained=CHECKPOINT (a folder or a hub id)")
        self.args = runner_args(given)
        try:  # before anything is loaded
            self.method = runner.check_args(self.args)
        except ValueError as err:
            raise ValueError(f"pio_fvlm model_args: {_flagless(str(err))}") from None
        self.accelerator = Accelerator()
        # lmms-eval shards the documents by the launcher's RANK / WORLD_SIZE (accelerate's own state says one
        # process on a CPU-only machine, where the launchers still start several with a gloo group)
        env = os.environ
        self._rank = int(env.get("RANK", self.accelerator.process_index))
        self._world_size = int(env.get("WORLD_SIZE", self.accelerator.num_processes))
        local_rank = int(env.get("LOCAL_RANK", self.accelerator.local_process_index))
        self.args.device = _device(device or self.args.device, local_rank)
        self._device = torch.device(self.args.device)
        self._batch = _batch_size(batch_size)
        self.args.batch_size = self._batch
        try:
            batching.check_batch_args(self.args)
        except ValueError as err:
            raise ValueError(f"pio_fvlm model_args: {_flagless(str(err))}") from None
        # the frame sampling of video documents, as the video runner reads them (None: the family takes no video)
        self.sampling = None
        video_keys = [k for k in video_model_args() if getattr(self.args, k, None) is not None]
        if self.args.family.video_rule is not None or video_keys:
            try:
                self.sampling = model_video_qa.video_sampling(self.args)
            except ValueError as err:
                raise ValueError(f"pio_fvlm model_args: {', '.join(video_keys)}: {_flagless(str(err))}") from None
        self.tokenizer, self.model, self.processor, self.model_name = runner.load_model(self.args, self.method)
        self.model.eval()
        recorded = {**given, **({"pio_dir": pio_dir} if pio_dir else {}), **({"run_name": run_name} if run_name else {})}
        run = {
            "format": lmms_results.RUN_FORMAT,
            "model": lmms_results.default_run_name(recorded),
            "model_args": lmms_results.canonical_model_args(recorded),
            "pretrained": self.args.model_path,
            "method": self.method.name if self.method is not None else "none",
            "budget": runner.budget_label(self.args, self.method),
            "method_config": self.method.config() if self.method is not None else None,
            "schedule_file": os.path.abspath(self.args.schedule_file) if self.args.schedule_file else None,
            "video_sampling": self.sampling.record() if self.sampling is not None else None,
            "decoding": {k: getattr(self.args, k, None) for k in ("conv_mode", "dtype", "attn_implementation", "seed",
                                                                  *family_options())},
            "world_size": self._world_size,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        folder = lmms_results.records_dir(recorded, _output_path_from_command_line())
        self.records = _Records(folder, run, self._rank, self._world_size, self.args.pio_log, self.args.profile)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lmms-eval's attributes
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch

    # ------------------------------------------------------------------ inputs
    def _media(self, visuals: Any, where: str) -> Media:
        """A document's PIL images (image files opened), or its one video file (a path with a video suffix, as
        lmms-eval's video tasks give it: ``[path]``). Refused in one line, naming the document: a video to a
        family without video, a video beside images or another video, a video with an encoder-side method, a
        missing video file, anything but images and files."""
        from PIL import Image

        if visuals is None:
            return [], None
        items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        images, videos = [], []
        for v in items:
            if isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(VIDEO_SUFFIXES):
                videos.append(os.fspath(v))
            elif isinstance(v, (Image.Image, str, os.PathLike)):
                images.append(v)
            else:
                raise ValueError(f"pio_fvlm: {where} gives a {type(v).__name__}; this model reads images and video "
                                 f"files ({', '.join(VIDEO_SUFFIXES)})")
        if not videos:
            return [v.convert("RGB") if isinstance(v, Image.Image) else runner.load_image(v) for v in images], None
        if images or len(videos) > 1:
            what = f"a video and {len(images)} image(s)" if images else f"{len(videos)} videos"
            raise ValueError(f"pio_fvlm: {where} gives {what}; a document takes images or one video (families with "
                             f"video: {video_families()})")
        try:
            self.args.family.check_video()
            model_video_qa.check_video_method(self.method)
        except ValueError as err:
            raise ValueError(f"pio_fvlm: {where} gives video {videos[0]}; {err}") from None
        if not os.path.isfile(videos[0]):
            raise FileNotFoundError(f"pio_fvlm: {where}: video file not found: {videos[0]}")
        return [], videos[0]

    def _prompt(self, context: str, n_images: int, where: str, video: bool = False) -> str:
        """The family's chat prompt of one user turn: the context, its images as ``<image>`` marks (the context's
        own marks when it has one per image, else one mark per image before the text, as the runners put it); a
        video's ``<video>`` mark before the text as the video runner puts it
        (:func:`~llava.eval.model_video_qa.video_prompt`)."""
        if video:
            for token, most in ((DEFAULT_IMAGE_TOKEN, 0), (DEFAULT_VIDEO_TOKEN, 1)):
                if context.count(token) > most:
                    raise ValueError(f"pio_fvlm: {where}: the context has {context.count(token)} {token} mark(s) "
                                     "for one video")
            return model_video_qa.video_prompt(context, self.args.conv_mode)
        mark = runner.image_token(bool(getattr(self.model.config, "mm_use_im_start_end", False)))
        marks = context.count(DEFAULT_IMAGE_TOKEN)
        if marks and marks != n_images:
            raise ValueError(f"pio_fvlm: {where}: the context has {marks} {DEFAULT_IMAGE_TOKEN} mark(s) for {n_images} "
                             "image(s)")
        if marks:
            text = context.replace(DEFAULT_IMAGE_TOKEN, mark) if mark != DEFAULT_IMAGE_TOKEN else context
        else:
            text = (mark + "\n") * n_images + context
        return runner.chat_prompt(text, self.args.conv_mode)

    def _inputs(self, prompt: str, images: list, video: Video | None = None) -> runner.Prepared:
        """``(ids, pixels or visual inputs, sizes)`` on the CPU: the runners' encoding of ``images``, or the video
        runner's of ``video`` (:func:`~llava.eval.model_video_qa.encode`, the family's ``encode_video``)."""
        if video is not None:
            return model_video_qa.encode(prompt, video, self.tokenizer, self.processor, self.model.config)
        return runner.encode(prompt, images, self.tokenizer, self.processor, self.model.config)

    def _encode(self, prompt: str, images: list, video: Video | None = None) -> runner.Prepared:
        ids, pixels, sizes = self._inputs(prompt, images, video)
        return ids, (runner.to_model(pixels, self.model) if pixels is not None else None), sizes

    def _read(self, context: str, media: Media, where: str) -> tuple[str, list, Video | None]:
        """A document's prompt (:meth:`_prompt`), images and decoded video (frames sampled by the
        ``num_frames``/``fps``/... model_args under the family's rule, as the video runner reads them)."""
        images, path = media
        video = load_video(path, self.sampling) if path is not None else None
        return self._prompt(context, len(images), where, video is not None), images, video

    def _decoding(self, gen_kwargs: Mapping[str, Any]) -> tuple[argparse.Namespace, list[str]]:
        """The runner flags of one request's ``generation_kwargs``, and its stop strings."""
        kw = dict(gen_kwargs or {})
        for key in sorted(set(kw) - set(GEN_KWARGS)):
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("pio_fvlm: generation_kwargs %s=%r is not used by this model", key, kw[key])
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        temperature = float(kw.get("temperature") or 0.0)
        sample = bool(kw.get("do_sample", temperature > 0))
        temperature = (temperature or 1.0) if sample else 0.0
        top_p = kw.get("top_p")
        dec = argparse.Namespace(**vars(self.args))
        dec.temperature = temperature
        dec.top_p = float(top_p) if top_p not in (None, 0) else None
        dec.num_beams = int(kw.get("num_beams") or 1)
        dec.max_new_tokens = int(kw.get("max_new_tokens") or self.args.max_new_tokens)
        return dec, until

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    # ------------------------------------------------------------------ answering
    def _answer(self, context: str, media: Media, gen_kwargs: Mapping[str, Any], key: str, where: str):
        dec, until = self._decoding(gen_kwargs)
        ids, pixels, sizes = self._encode(*self._read(context, media, where))
        torch.manual_seed(runner.question_seed(self.args.seed, key))
        return runner.generate(self.model, self.tokenizer, ids, pixels, sizes, dec, self.method,
                               self.records.profile is not None, stop=until)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        if self._batch > 1:
            return self._generate_until_batched(requests)
        out = []
        for req in tqdm(requests, desc="pio_fvlm", unit="req", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            where = f"document {doc_id} of {task}"
            media = self._media(doc_to_visual(self._doc(task, split, doc_id)), where)
            text, state, timing = self._answer(context, media, gen_kwargs, f"{task}:{split}:{doc_id}", where)
            self.records.write(task, doc_id, req.idx, "generate_until", state, self.model, timing)
            out.append(text)
        return out

    def _generate_until_batched(self, requests: Sequence[Any]) -> list[str]:
        """``generate_until`` ``batch_size`` requests at a time: each run of consecutive image (or text) requests
        with the same ``generation_kwargs`` through one :class:`~llava.eval.batching.Batcher` (grouped by prompt
        length, each request's own sampling seed, answers and records in request order). Runs of consecutive video
        requests are batched the same way (the batcher joins the family's video inputs, as in the video runner); a
        batch never mixes images and a video."""
        out: list[str] = []
        bar = tqdm(total=len(requests), desc="pio_fvlm", unit="req", disable=self.rank != 0)

        def with_media(group: list[Any]):
            for req in group:
                _, _, doc_to_visual, doc_id, task, split = req.args
                yield req, self._media(doc_to_visual(self._doc(task, split, doc_id)), f"document {doc_id} of {task}")

        def prepared(run: Iterable[tuple[Any, Media]]):
            for req, media in run:
                context, _, _, doc_id, task, split = req.args
                ids, pixels, sizes = self._inputs(*self._read(context, media, f"document {doc_id} of {task}"))
                seed = runner.question_seed(self.args.seed, f"{task}:{split}:{doc_id}")
                yield req, batching.Sample(ids, pixels, sizes, seed)

        for _, same in itertools.groupby(requests, key=lambda r: json.dumps(r.args[1], sort_keys=True, default=str)):
            group = list(same)
            dec, until = self._decoding(group[0].args[1])
            batcher = batching.Batcher(self.model, self.tokenizer, dec, self.method, stop=until)
            for _, run in itertools.groupby(with_media(group), key=lambda rm: rm[1][1] is not None):
                for req, _, ans in batcher.run(prepared(run)):
                    _, _, _, doc_id, task, _ = req.args
                    self.records.write(task, doc_id, req.idx, "generate_until", ans.state, self.model, None,
                                       row=ans.row)
                    out.append(ans.text)
                    bar.update()
        bar.close()
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Each document's rounds: round 0 answers the request's context; the task's ``doc_to_text(doc,
        previous_output=..., round_idx=k, previous_round_info=...)`` then gives the next round's visuals and context,
        or ends the dialogue and returns the rounds' answers."""
        out = []
        for req in tqdm(requests, desc="pio_fvlm", unit="req", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals, rounds, info, k = doc_to_visual(doc), [], None, 0
            while True:
                if k > 0:
                    visuals, context, done, rounds, info = doc_to_text(doc, previous_output=list(rounds), round_idx=k,
                                                                       previous_round_info=info)
                    rounds = list(rounds)
                    if done:
                        break
                where = f"document {doc_id} of {task}, round {k}"
                text, state, timing = self._answer(context, self._media(visuals, where), gen_kwargs,
                                                   f"{task}:{split}:{doc_id}:{k}", where)
                self.records.write(task, doc_id, req.idx, f"round {k}", state, self.model, timing)
                rounds.append(text)
                k += 1
            out.append(rounds)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[GenerationResult]:
        """Per request, ``GenerationResult(text=(loss, is_greedy))``: the mean negative log-probability of the
        continuation's tokens and whether each was the argmax, the context prefilled with the reduction method
        (module docstring: lmms-eval takes the smallest loss; why the pair is wrapped)."""
        out = []
        for req in tqdm(requests, desc="pio_fvlm", unit="req", disable=self.rank != 0):
            if len(req.args) == 2:  # an unconditional request: the continuation alone
                (context, continuation), media, task, doc_id = req.args, ([], None), "unconditional", None
                where = "an unconditional request"
            else:
                context, target, doc_to_visual, doc_id, task, split = req.args
                where = f"document {doc_id} of {task}"
                doc = self._doc(task, split, doc_id)
                continuation = target(doc) if callable(target) else target
                media = self._media(doc_to_visual(doc), where)
            if not isinstance(continuation, str):
                raise ValueError(f"pio_fvlm: {where}: the continuation to score is {type(continuation).__name__}, not "
                                 "text")
            loss, greedy, state, timing = self._score(context, continuation, media, where)
            if state is not None:
                self.records.write(task, doc_id, req.idx, "loglikelihood", state, self.model, timing)
            out.append(GenerationResult(text=(loss, greedy)))
        return out

    def _score(self, context: str, continuation: str, media: Media, where: str):
        prompt, images, video = self._read(context, media, where)
        ids, pixels, sizes = self._encode(prompt, images, video)
        full, _, _ = self._inputs(prompt + continuation, images, video)
        n = min(ids.shape[1], full.shape[1])
        same = (ids[0, :n] == full[0, :n]).tolist()
        p = same.index(False) if False in same else n  # the context's tokens: the longest common prefix
        tokens = full[0, p:].tolist()
        if not tokens:
            return 0.0, True, None, None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        kw = dict(do_sample=False, num_beams=1, max_new_tokens=len(tokens), use_cache=True, pad_token_id=pad,
                  logits_processor=LogitsProcessorList([_Forced(tokens)]), output_logits=True,
                  return_dict_in_generate=True)
        _, state, timing = runner.timed_generate(self.model, full[:, :p], pixels, sizes, kw, self.method,
                                                 self.records.profile is not None)
        steps = state.step_logits
        if len(steps) != len(tokens):
            raise ValueError(f"pio_fvlm: {where}: the continuation has an end-of-sequence token before its last "
                             f"token ({len(steps)} of {len(tokens)} scored)")
        logprob, greedy = 0.0, True
        for logits, tok in zip(steps, tokens):
            row = torch.log_softmax(logits[0].double(), -1)  # (V,)
            logprob += float(row[tok])
            greedy = greedy and int(row.argmax()) == tok
        return -logprob / len(tokens), greedy, state, timing

    def clean(self) -> None:
        self.records.close()
        super().clean()


class _Forced(LogitsProcessor):
    """A logits processor that makes generation take ``tokens`` in order (the raw logits stay in the output)."""

    def __init__(self, tokens: Sequence[int]):
        self.tokens, self.step = list(tokens), 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[min(self.step, len(self.tokens) - 1)]] = 0.0
        self.step += 1
        return forced


def _batch_size(value: int | str | None) -> int:
    """lmms-eval's ``--batch_size`` as a positive count (None: 1); ``auto`` and the like are refused."""
    if value is None:
        return 1
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"pio_fvlm: batch_size {value!r}: give a positive number of requests per forward pass "
                         "(auto is not supported)")
    return n


def _device(device: str | None, local_rank: int) -> str:
    """The rank's device: ``cuda:<local rank>`` for ``cuda``/unset when CUDA is there, else what was given, else
    CPU."""
    if device in (None, "", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device or "cpu"
