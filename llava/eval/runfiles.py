"""The files of one run: answers, reduction log and profile, written in step and resumable only by the same run.

Guarantees (README "Reliability"):

* **Nothing destroyed.** A run that is not resuming refuses to replace a non-empty answers file unless
  ``--overwrite`` is given, and then writes every file under a temporary name (``X.partial``) that replaces the
  old one only when the run finishes: a failed run leaves earlier results as they were.
* **A run knows what produced it.** Its identity (model and a fingerprint of its weights, method and full
  configuration, decoding settings, question file and its hash, which files it writes) is written beside the
  answers (``X.run.json``), and every answer, log and profile line carries the identity's short hash (answers in
  their ``metadata``). ``--resume`` continues only a file of the same identity and otherwise stops, naming every
  difference.
* **In step.** Every line carries its question's key ``q`` (its place in the question file, and its round for
  MMBench's rotations; in the answers' ``metadata``), unique even where question ids repeat by design (MME,
  TextVQA). For every question the log and profile lines are written before the answer line, and on resume a
  question counts as done only when every file of the run has its line; the lines of unfinished questions are
  dropped from every file (so is a line torn by a kill), and those questions run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RunFiles", "RunMismatchError", "file_sha256", "identity_hash", "run_identity", "weights_fingerprint"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class RunMismatchError(ValueError):
    """``--resume`` met files written by a different run."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model_path: str) -> dict[str, Any]:
    """What identifies a checkpoint's weights without reading them: the config's and weight index's hashes and
    every weight file's name and size (a local directory), or the hub id."""
    path = os.path.expanduser(model_path)
    if not os.path.isdir(path):
        return {"hub_id": model_path}
    out: dict[str, Any] = {}
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, name)):
            out[name] = file_sha256(os.path.join(path, name))[:16]
    out["weights"] = {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))
                      if f.endswith(WEIGHT_SUFFIXES)}
    return out


def run_identity(args: argparse.Namespace, method: Any, runner_options: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides a run's answers (and which files it writes): the identity ``--resume`` checks."""
    question_file = getattr(args, "question_file", None)
    return {
        "model_path": os.path.abspath(os.path.expanduser(args.model_path))
        if os.path.isdir(os.path.expanduser(args.model_path)) else args.model_path,
        "model_base": args.model_base,
        "weights": weights_fingerprint(args.model_path),
        "method": method.config() if method is not None else None,
        "decoding": {k: getattr(args, k) for k in ("conv_mode", "temperature", "top_p", "num_beams",
                                                   "max_new_tokens", "seed", "dtype", "attn_implementation")},
        "questions": {
            "file": os.path.abspath(question_file) if question_file else None,
            "sha256": file_sha256(question_file)[:16] if question_file and os.path.isfile(question_file) else None,
            "chunk": [args.chunk_idx, args.num_chunks],
        },
        "runner": runner_options,
        "files": {"log": bool(args.pio_log), "profile": bool(args.profile),
                  # only when given, so that runs written before the flag existed still resume
                  **({"loyalty_to": os.path.abspath(args.loyalty_to)} if getattr(args, "loyalty_to", None) else {})},
    }


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if d else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def _read_lines(path: str) -> list[tuple[str, dict]]:
    """``(line, record)`` of a JSONL file; a line that does not parse (torn by a kill) is dropped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f.read().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: dropping a line torn by an interrupted run", path, i)
                continue
            out.append((line, rec))
    return out


def _rewrite(path: str, lines: list[str]) -> None:
    """Replace ``path`` with ``lines`` atomically (a temporary file, then a rename)."""
    tmp = f"{path}.rewrite"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in lines))
    os.replace(tmp, path)


class RunFiles:
    """Answers, reduction log and profile of one run (module docstring).

    Args:
        args: the runner flags (``answers_file``, ``pio_log``, ``profile``, ``resume``, ``overwrite``).
        identity: :func:`run_identity`.
        summary: more fields of the run description, for the scorers (method, budget, method_config).
    """

    def __init__(self, args: argparse.Namespace, identity: dict[str, Any], summary: dict[str, Any] | None = None):
        self.identity, self.summary = identity, dict(summary or {})
        self.run = identity_hash(identity)
        self.paths = {name: str(p) for name, p in (("answers", args.answers_file), ("log", args.pio_log),
                                                   ("profile", args.profile)) if p}
        self.info_path = run_info_path(args.answers_file)
        self.done: set[str] = set()
        self._final: dict[str, str] = {}  # temporary path -> final path, for a fresh run
        self._files: dict[str, Any] = {}
        for p in self.paths.values():
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        if args.resume and _nonempty(self.paths["answers"]):
            self._resume()
        else:
            self._fresh(resume=args.resume, overwrite=getattr(args, "overwrite", False))

    # -- opening ---------------------------------------------------------------------------------------------
    def _fresh(self, resume: bool, overwrite: bool) -> None:
        answers = self.paths["answers"]
        if _nonempty(answers) and not overwrite:
            n = sum(1 for line in open(answers, encoding="utf-8") if line.strip())
            raise ValueError(f"{answers} already holds {n} answer line(s); pass --resume to continue that run or "
                             "--overwrite to replace it (the old files stay until the new run finishes)")
        if resume:  # nothing to continue: write in place, so an interrupted run can be resumed
            for p in self.paths.values():
                if os.path.exists(p):
                    os.remove(p)  # a log or profile without answers belongs to nothing
            self._write_info(self.info_path)
            self._files = {name: open(p, "a", encoding="utf-8") for name, p in self.paths.items()}  # noqa: SIM115
            return
        for name, p in self.paths.items():
            tmp = f"{p}.partial"
            self._final[tmp] = p
            self._files[name] = open(tmp, "w", encoding="utf-8")  # noqa: SIM115
        self._final[f"{self.info_path}.partial"] = self.info_path
        self._write_info(f"{self.info_path}.partial")

    def _resume(self) -> None:
        answers = self.paths["answers"]
        try:
            with open(self.info_path, encoding="utf-8") as f:
                old = json.load(f).get("identity")
        except FileNotFoundError:
            old = None
        except (OSError, json.JSONDecodeError) as err:
            raise RunMismatchError(f"cannot read {self.info_path} ({err}); --overwrite starts the run again") from None
        if old is None:
            raise RunMismatchError(f"{answers} has no run description ({self.info_path}), so --resume cannot tell "
                                   "which run wrote it; --overwrite starts the run again")
        diff = identity_differences(old, self.identity)
        if diff:
            raise RunMismatchError(
                f"--resume: {answers} was written by a different run; it continues only the same run. "
                "Differences (file -> now): " + "; ".join(diff)
                + ". Name the new run differently (CKPT, --answers-file), or --overwrite to replace the old one")
        records = {name: _read_lines(p) if os.path.exists(p) else [] for name, p in self.paths.items()}
        for name, recs in records.items():
            foreign = [i for i, (_, r) in enumerate(recs) if self._field(name, r, "run") != self.run]
            if foreign:
                raise RunMismatchError(f"{self.paths[name]}: {len(foreign)} line(s) from another run (run "
                                       f"{self._field(name, recs[foreign[0]][1], 'run')!r}, this run {self.run!r}); "
                                       "--overwrite starts the run again")
        keys = [{self._field(name, r, "q") for _, r in recs} for name, recs in records.items()]
        self.done = set.intersection(*keys)
        for name, recs in records.items():
            kept = [line for line, r in recs if self._field(name, r, "q") in self.done]
            if len(kept) != len(recs) or (recs and _torn(self.paths[name])):
                logger.warning("%s: dropping %d line(s) of questions that did not finish in every file; they run "
                               "again", self.paths[name], len(recs) - len(kept))
                _rewrite(self.paths[name], kept)
        self._files = {name: open(p, "a", encoding="utf-8") for name, p in self.paths.items()}  # noqa: SIM115

    def _write_info(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"run": self.run, **self.summary, "identity": self.identity}, f, indent=2, ensure_ascii=False,
                      default=str)
            f.write("\n")

    @staticmethod
    def _field(name: str, rec: dict, field: str) -> Any:
        """``run`` or ``q`` of a line: in the answers' ``metadata``, at the top of log and profile lines."""
        return (rec.get("metadata") or {}).get(field) if name == "answers" else rec.get(field)

    # -- writing ----------------------------------------------------------------------------------------------
    @property
    def logging(self) -> bool:
        return "log" in self._files

    @property
    def profiling(self) -> bool:
        return "profile" in self._files

    def write(self, key: str, answer: dict, log: dict | None = None, profile: dict | None = None) -> None:
        """Question ``key``: its log and profile lines first, the answer last (the line that marks it done)."""
        for name, rec in (("log", log), ("profile", profile)):
            if name in self._files:
                if rec is None:
                    raise ValueError(f"this run writes a {name} file: give its record")
                self._line(name, {**rec, "q": key, "run": self.run})
        answer = {**answer, "metadata": {**(answer.get("metadata") or {}), "q": key, "run": self.run}}
        self._line("answers", answer)

    def _line(self, name: str, rec: dict) -> None:
        f = self._files[name]
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()

    def close(self, finished: bool) -> None:
        """Close the files; a fresh run that ``finished`` replaces the old files with its own, one that did not
        removes its temporary files and leaves the old ones as they were."""
        for f in self._files.values():
            f.close()
        self._files = {}
        for tmp, final in self._final.items():
            if finished:
                os.replace(tmp, final)
            elif os.path.exists(tmp):
                os.remove(tmp)
        self._final = {}


def run_info_path(answers_file: str | os.PathLike) -> str:
    """The run description written next to an answers file: ``X.jsonl`` -> ``X.run.json``."""
    root, ext = os.path.splitext(str(answers_file))
    return (root if ext == ".jsonl" else str(answers_file)) + ".run.json"


def _torn(path: str) -> bool:
    """The file does not end with a complete line (a kill mid-write)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _nonempty(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) > 0
