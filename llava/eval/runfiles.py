"""The files of one run: answers, reduction log and profile, written in step, by one writer, and resumable only by
the same run.

Guarantees (README "Reliability"):

* **One writer per output.** A run holds a lock on each of its output files (:mod:`llava.eval.outputlock`) from
  before it reads them until it has finished with them: a second run on any of them is refused with one line
  naming the holder, and the lock of a run that died (``kill -9``) is taken over. Two outputs of one run given the
  same path (answers, log, profile, the run file, or an input such as the question file) are refused before
  anything is written.
* **Nothing destroyed.** A run that is not resuming refuses to replace a non-empty answers file unless
  ``--overwrite`` is given, and then writes every file under a temporary name (``X.partial``) that replaces the
  old one only when the run finishes: a failed run leaves earlier results as they were and removes its temporary
  files (a full disk included).
* **A run knows what produced it.** Its identity (model and the sha256 of its files and of its vision tower's,
  :mod:`llava.eval.fingerprint`; method and full configuration, decoding settings, question file and its hash,
  which files it writes, its shard) is written beside the answers (``X.run.json``), and every answer, log and
  profile line carries the identity's short hash without the shard (answers in their ``metadata``), so that the
  shards of one run share it. ``--resume`` continues only a file of the same identity and otherwise stops, naming
  every difference; ``--resume --overwrite`` continues the same run and replaces a different one (continuing the
  ``.partial`` files of a replacement that was killed).
* **In step.** Every line carries its question's key ``q`` (its place in the question file, and its round for
  MMBench's rotations; in the answers' ``metadata``), unique even where question ids repeat by design (MME,
  TextVQA). For every question the log and profile lines are written before the answer line, and on resume a
  question counts as done only when every file of the run has its line; the lines of unfinished questions are
  dropped from every file (so is a line torn by a kill, and every repeat of a key but its first), and those
  questions run again.
* **Time adds up.** The run file records every invocation (start, host, pid, wall seconds, questions answered;
  updated while it runs) and their total, ``wall_time_s``, which the scorers report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any

from llava.eval.fingerprint import file_sha256, weights_fingerprint
from llava.eval.outputlock import OutputLock, lock_path
from llava.utils import ensure_writable

logger = logging.getLogger(__name__)

__all__ = ["RunFiles", "RunMismatchError", "check_distinct_outputs", "file_sha256", "identity_hash",
           "run_identity", "run_info_path", "weights_fingerprint"]

SHARD_KEY = "shard"
"""The identity's part that tells the shards (chunks, ranks) of one run apart: not in the run hash."""
INFO_UPDATE_S = 30.0  # a running invocation's wall time is written to the run file at least this often


class RunMismatchError(ValueError):
    """``--resume`` met files written by a different run."""


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
        },
        "runner": runner_options,
        "files": {"log": bool(args.pio_log), "profile": bool(args.profile),
                  # only when given, so that runs written before the flag existed still resume
                  **({"loyalty_to": os.path.abspath(args.loyalty_to)} if getattr(args, "loyalty_to", None) else {})},
        SHARD_KEY: {"index": args.chunk_idx, "count": args.num_chunks},
    }


def identity_hash(identity: dict[str, Any]) -> str:
    """The run's short hash, written into every line: the identity without its shard, so that the shards of one run
    (and their merged file) share it."""
    whole = {k: v for k, v in identity.items() if k != SHARD_KEY}
    return hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()[:12]


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


def check_distinct_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None] | None = None) -> None:
    """Every output of a run (``{flag: path}``; the files written beside each too: ``.partial``, ``.lock``, the
    answers' run file) a file of its own, and none of them an input (question file, reference answers, ...);
    raises naming the two flags before anything is written."""
    def same(a: str, b: str) -> bool:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False

    def files_of(flag: str, path: str) -> list[tuple[str, str]]:
        out = [(flag, path), (f"the temporary file of {flag}", f"{path}.partial"), (f"the lock of {flag}",
                                                                                      lock_path(path))]
        if flag == "--answers-file":
            info = run_info_path(path)
            out += [("the run file of --answers-file", info), ("the run file's temporary file", f"{info}.partial")]
        return out

    given = [(flag, str(p)) for flag, p in outputs.items() if p]
    for i, (flag_a, path_a) in enumerate(given):
        for flag_b, path_b in given[i + 1:]:
            for what_a, a in files_of(flag_a, path_a):
                for what_b, b in files_of(flag_b, path_b):
                    if same(a, b):
                        raise ValueError(f"{what_b} {b} would also be {what_a} {a}; every output of a run "
                                         "needs its own file, or one overwrites the other (e.g. --answers-file X.jsonl "
                                         "--pio-log X.pio.jsonl --profile X.profile.jsonl)")
    for in_flag, in_path in (inputs or {}).items():
        if not in_path or not os.path.exists(in_path):
            continue
        for flag, path in given:
            for what, p in files_of(flag, path):
                if same(p, in_path):
                    raise ValueError(f"{what} {p} would overwrite the input {in_flag} {in_path}; write the run's "
                                     "files elsewhere")


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
            if isinstance(rec, dict):
                out.append((line, rec))
    return out


def _write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file, then a rename; removed if the write fails)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunFiles:
    """Answers, reduction log and profile of one run (module docstring): opening them takes their locks, checks or
    starts the run and finds the questions already done (:attr:`done`); :meth:`write` adds one question's lines;
    :meth:`close` finishes (or abandons) the run and lets the locks go.

    Args:
        args: the runner flags (``answers_file``, ``pio_log``, ``profile``, ``resume``, ``overwrite``; inputs that
            must not be overwritten: ``question_file``, ``loyalty_to``, ``schedule_file``).
        identity: :func:`run_identity`.
        summary: more fields of the run description, for the scorers (method, budget, method_config).
    """

    def __init__(self, args: argparse.Namespace, identity: dict[str, Any], summary: dict[str, Any] | None = None):
        self.identity, self.summary = identity, dict(summary or {})
        self.run = identity_hash(identity)
        flags = {"answers": "--answers-file", "log": "--pio-log", "profile": "--profile"}
        self.paths = {name: str(p) for name, p in (("answers", args.answers_file), ("log", args.pio_log),
                                                   ("profile", args.profile)) if p}
        self.info_path = run_info_path(args.answers_file)
        self.done: set[str] = set()
        self._final: dict[str, str] = {}  # temporary path -> final path, for a replacement
        self._files: dict[str, Any] = {}
        self._work_info = self.info_path  # the run file being written (temporary for a replacement)
        self._history: list[dict[str, Any]] = []  # earlier invocations of a resumed run
        self._t0 = time.monotonic()
        self._last_info = self._t0
        self._invocation = {"started": _now(), "host": socket.gethostname(), "pid": os.getpid(), "wall_s": 0.0,
                            "answered": 0, "finished": None}
        outputs = {flags[name]: p for name, p in self.paths.items()}
        check_distinct_outputs(outputs, {f"--{k.replace('_', '-')}": getattr(args, k, None)
                                         for k in ("question_file", "loyalty_to", "schedule_file")})
        for flag, p in outputs.items():  # a read-only or full folder is found before the model loads
            ensure_writable(os.path.dirname(os.path.abspath(p)), f"{flag} {p}")
        self._lock = OutputLock(outputs).acquire()
        try:
            self._open(bool(args.resume), bool(getattr(args, "overwrite", False)))
        except BaseException:
            self._abandon()
            raise

    # -- opening ---------------------------------------------------------------------------------------------
    def _open(self, resume: bool, overwrite: bool) -> None:
        """Continue the run (``resume``: in the answers' files, or with ``overwrite`` in a killed replacement's
        temporary files), or start it: in place when resuming found nothing, else in temporary files that replace
        the old ones when the run finishes."""
        final, final_info = self.paths, self.info_path
        partial = {name: f"{p}.partial" for name, p in final.items()}
        partial_info = f"{final_info}.partial"
        if resume:
            for paths, info in [(final, final_info)] + ([(partial, partial_info)] if overwrite else []):
                if not _nonempty(paths["answers"]):
                    continue
                try:
                    self._resume(paths, info)
                except RunMismatchError as err:
                    if not overwrite:
                        raise
                    logger.info("--overwrite: replacing it (%s)", " ".join(str(err).split())[:300])
                    continue
                if paths is partial:
                    logger.info("--resume --overwrite: continuing the replacement in %s", partial["answers"])
                    self._final = {**{partial[n]: final[n] for n in final}, partial_info: final_info}
                return
            if not overwrite:  # nothing to continue: write in place, so that an interrupted run can be resumed
                self._start(final, final_info)
                return
        elif _nonempty(final["answers"]) and not overwrite:
            n = sum(1 for line in open(final["answers"], encoding="utf-8") if line.strip())
            raise ValueError(f"{final['answers']} already holds {n} answer line(s); pass --resume to continue that run "
                             "or --overwrite to replace it (the old files stay until the new run finishes)")
        self._final = {**{partial[n]: final[n] for n in final}, partial_info: final_info}
        self._start(partial, partial_info)

    def _start(self, paths: dict[str, str], info: str) -> None:
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)  # a log or profile without answers belongs to nothing; a temporary file to a dead run
        self._work_info = info
        self._write_info()
        self._files = {name: open(p, "w", encoding="utf-8") for name, p in paths.items()}  # noqa: SIM115

    def _resume(self, paths: dict[str, str], info: str) -> None:
        answers = paths["answers"]
        try:
            with open(info, encoding="utf-8") as f:
                old_info = json.load(f)
        except FileNotFoundError:
            old_info = {}
        except (OSError, ValueError) as err:
            raise RunMismatchError(f"cannot read {info} ({err}); --overwrite starts the run again") from None
        old = old_info.get("identity") if isinstance(old_info, dict) else None
        if old is None:
            raise RunMismatchError(f"{answers} has no run description ({info}), so --resume cannot tell which run "
                                   "wrote it; --overwrite starts the run again")
        diff = identity_differences(old, self.identity)
        if diff:
            raise RunMismatchError(
                f"--resume: {answers} was written by a different run; it continues only the same run. "
                "Differences (file -> now): " + "; ".join(diff)
                + ". Name the new run differently (CKPT, --answers-file), or --overwrite to replace the old one")
        records = {name: _read_lines(p) if os.path.exists(p) else [] for name, p in paths.items()}
        for name, recs in records.items():
            foreign = [i for i, (_, r) in enumerate(recs) if self._field(name, r, "run") != self.run]
            if foreign:
                raise RunMismatchError(f"{paths[name]}: {len(foreign)} line(s) from another run (run "
                                       f"{self._field(name, recs[foreign[0]][1], 'run')!r}, this run {self.run!r}); "
                                       "--overwrite starts the run again")
        keys = [{self._field(name, r, "q") for _, r in recs} for name, recs in records.items()]
        self.done = set.intersection(*keys)
        for name, recs in records.items():
            kept, seen = [], set()
            for line, r in recs:  # the first complete line of each finished question
                q = self._field(name, r, "q")
                if q in self.done and q not in seen:
                    seen.add(q)
                    kept.append(line)
            if len(kept) != len(recs) or (recs and _torn(paths[name])):
                repeats = sum(1 for _, r in recs if self._field(name, r, "q") in self.done) - len(kept)
                logger.warning("%s: dropping %d line(s): %d repeated question(s) (the first line of each is kept) and "
                               "%d of questions that did not finish in every file, which run again", paths[name],
                               len(recs) - len(kept), repeats, len(recs) - len(kept) - repeats)
                _write_atomic(paths[name], "".join(x + "\n" for x in kept))
        history = old_info.get("invocations")
        self._history = [x for x in history if isinstance(x, dict)] if isinstance(history, list) else []
        self._work_info = info
        self._write_info()
        self._files = {name: open(p, "a", encoding="utf-8") for name, p in paths.items()}  # noqa: SIM115

    def _write_info(self) -> None:
        """The run file: identity, summary and every invocation with the total wall time (atomically)."""
        self._invocation["wall_s"] = round(time.monotonic() - self._t0, 3)
        invocations = [*self._history, self._invocation]
        info = {"run": self.run, **self.summary, "identity": self.identity, "invocations": invocations,
                "wall_time_s": round(sum(float(x.get("wall_s") or 0.0) for x in invocations), 3)}
        _write_atomic(self._work_info, json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n")
        self._last_info = time.monotonic()

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
        self._invocation["answered"] += 1
        if time.monotonic() - self._last_info > INFO_UPDATE_S:
            self._write_info()

    def _line(self, name: str, rec: dict) -> None:
        f = self._files[name]
        try:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
        except OSError as err:  # a full disk, a lost mount: name the file
            raise OSError(err.errno, err.strerror, f.name) from None

    def close(self, finished: bool) -> None:
        """Close the files and let the locks go. A run that ``finished`` replaces the old files with its temporary
        ones (a replacement); one that did not removes its temporary files, leaving the old ones as they were (a
        run writing in place keeps what it wrote, for ``--resume``)."""
        errors = []
        for f in self._files.values():
            try:
                f.close()
            except OSError as err:
                errors.append(OSError(err.errno, err.strerror, f.name))
        self._files = {}
        finished = finished and not errors
        self._invocation["finished"] = finished
        try:
            if finished:
                self._write_info()
                for tmp, final in self._final.items():
                    os.replace(tmp, final)
                self._final = {}
            elif not self._final:
                try:
                    self._write_info()  # the time of a failed invocation counts too
                except OSError as err:
                    logger.warning("cannot record this invocation in %s: %s", self._work_info, err)
        finally:
            self._abandon()
        if errors:
            raise errors[0]

    def _abandon(self) -> None:
        """Close what is open, remove temporary files, let the locks go."""
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files = {}
        for tmp in self._final:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._final = {}
        self._lock.release()


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
