"""One writer per output, with real processes: runners launched together on one answers file (and a script
launched twice) never lose or repeat an answer, exactly one does the work and the others stop with one line naming
it; the lock of a writer killed with SIGKILL is taken over; a full disk and a read-only output folder stop a run with
one line, leaving earlier answers as they were and nothing temporary behind (the read-only folder before the model
loads).

Where the test process may mount a small tmpfs in its own user namespace (``unshare -r -m``), the disk is really full
or read-only; elsewhere the fault is injected into the runner process by a ``sitecustomize`` module (the same error
numbers at the same calls). A ``sitecustomize`` also holds a runner at its n-th image until the test opens a gate, so
that the others meet it while it works, however fast the machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import image
from tests.test_reliability import REPO, loader_args, read, write_questions

SITECUSTOMIZE = '''
import errno, os, time

_gate = os.environ.get("PIO_TEST_GATE")
if _gate:  # hold the process at its n-th image until the gate file exists
    from PIL import Image

    _open, _seen = Image.open, [0]

    def _gated(*args, **kwargs):
        _seen[0] += 1
        if _seen[0] > int(os.environ.get("PIO_TEST_GATE_AFTER", "1")):
            while not os.path.exists(_gate):
                time.sleep(0.05)
        return _open(*args, **kwargs)

    Image.open = _gated

_full = os.environ.get("PIO_TEST_FULL_DIR")  # the folder's disk holds PIO_TEST_FULL_BYTES more bytes
_readonly = os.environ.get("PIO_TEST_READONLY_DIR")  # the folder is on a read-only filesystem
if _full or _readonly:
    import builtins

    _real_open, _real_os_open, _real_mkdir = builtins.open, os.open, os.mkdir
    _left = [int(os.environ.get("PIO_TEST_FULL_BYTES", "0"))]

    def _under(path, root):
        return root and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(root + os.sep)

    def _writing(mode):
        return any(c in mode for c in "wax+")

    class _Full:
        def __init__(self, f, path):
            self._f, self._path = f, path

        def write(self, text):
            _left[0] -= len(text.encode() if isinstance(text, str) else text)
            if _left[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
            return self._f.write(text)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def _open(file, mode="r", *args, **kwargs):
        if _writing(mode) and _under(file, _readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        f = _real_open(file, mode, *args, **kwargs)
        return _Full(f, str(file)) if _writing(mode) and _under(file, _full) else f

    def _os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, _readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _real_os_open(path, flags, *args, **kwargs)

    def _mkdir(path, *args, **kwargs):
        if _under(path, _readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _real_mkdir(path, *args, **kwargs)

    builtins.open, os.open, os.mkdir = _open, _os_open, _mkdir
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def env_with(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path, **extra}


def runner(ckpt, qfile: Path, answers: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llava.eval.model_vqa_loader", *loader_args(ckpt, qfile, answers, *extra)]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def wait_for(predicate, procs, what: str, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"a process ended while waiting for {what}: {dead[0].communicate()[1][-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def holder_pid(answers: Path) -> int | None:
    try:
        return json.loads(Path(f"{answers}.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def check_refused(proc: subprocess.Popen, holder: int) -> None:
    """A runner that met the holder: status 2 and one line naming it."""
    _, err = proc.communicate(timeout=240)
    msgs = errors(err)
    assert proc.returncode == 2 and len(msgs) == 1, err[-3000:]
    assert re.search(rf"is being written by another run: pid {holder} on \S+ since .*one writer per output", msgs[0])


@contextlib.contextmanager
def cleanup(procs: list[subprocess.Popen], *gates: Path):
    """Yields ``procs`` (append more); on the way out, however the test ends, opens the gates and kills what is left
    of them."""
    try:
        yield procs
    finally:
        for gate in gates:
            gate.touch()
        for proc in procs:
            if proc.poll() is None:
                if os.getpgid(proc.pid) == proc.pid:  # a script: its runner too
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.communicate()


def check_complete(answers: Path, n: int) -> None:
    keys = [r["metadata"]["q"] for r in read(answers)]
    assert sorted(keys, key=int) == [str(i) for i in range(n)], keys  # every question once: none lost, none repeated


def test_one_writer_per_output_and_a_killed_writers_lock_is_taken_over(tiny_v15, tmp_path, site):
    qfile = write_questions(tmp_path, 6)
    answers = tmp_path / "a.jsonl"
    gate = tmp_path / "gate"
    writer = subprocess.Popen(runner(tiny_v15, qfile, answers, "--resume"), cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env_with(site, PIO_TEST_GATE=str(gate), PIO_TEST_GATE_AFTER="2"))
    with cleanup([writer], gate) as procs:
        _meet_and_take_over(tiny_v15, qfile, answers, writer, procs, site)


def _meet_and_take_over(tiny_v15, qfile: Path, answers: Path, writer: subprocess.Popen, procs: list, site: Path):
    tmp_path = answers.parent
    others = []
    wait_for(lambda: lines(answers) == 2, [writer], "the writer's first answers")  # it now waits at its 3rd image
    assert holder_pid(answers) == writer.pid
    rng = random.Random(0)
    for extra in (["--resume"], [], ["--overwrite"]):  # a script launched twice, a fresh run, a replacement
        time.sleep(rng.uniform(0, 0.5))
        others.append(subprocess.Popen(runner(tiny_v15, qfile, answers, *extra), cwd=REPO, text=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env_with(site)))
        procs.append(others[-1])
    for proc in others:
        check_refused(proc, writer.pid)
    assert writer.poll() is None and lines(answers) == 2  # the others changed nothing
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=60)
    assert holder_pid(answers) == writer.pid  # its lock file stays behind: the kernel released the lock itself
    done = subprocess.run(runner(tiny_v15, qfile, answers, "--resume"), cwd=REPO, text=True, capture_output=True,
                          env=env_with(site), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"taking over the lock of {answers} from pid {writer.pid}, which is gone" in done.stderr
    check_complete(answers, 6)
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.partial"))
    info = json.loads(answers.with_suffix(".run.json").read_text())
    killed, resumed = info["invocations"]
    assert killed["pid"] == writer.pid and killed["finished"] is None  # it never said it ended
    assert resumed["answered"] == 4 and resumed["finished"] is True


@pytest.mark.slow
def test_many_writers_and_a_script_launched_twice(tiny_v15, tmp_path, site):
    """Eight runners (resuming, fresh, replacing) launched at random moments on one answers file, and the POPE
    script launched twice: one does the work, every other stops with one line, nothing is lost or repeated."""
    qfile = write_questions(tmp_path, 8)
    answers = tmp_path / "a.jsonl"
    gate = tmp_path / "gate"
    rng = random.Random(1)
    kinds = [["--resume"]] * 4 + [[]] * 2 + [["--overwrite"], ["--resume", "--overwrite"]]
    with cleanup([], gate, tmp_path / "gate2") as procs:
        _stress(tiny_v15, tmp_path, site, qfile, answers, gate, rng, kinds, procs)


def _stress(tiny_v15, tmp_path: Path, site: Path, qfile: Path, answers: Path, gate: Path, rng, kinds, procs: list):
    for extra in kinds:
        time.sleep(rng.uniform(0, 1.5))
        procs.append(subprocess.Popen(runner(tiny_v15, qfile, answers, *extra), cwd=REPO, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=env_with(site, PIO_TEST_GATE=str(gate), PIO_TEST_GATE_AFTER="1")))
    wait_for(lambda: holder_pid(answers) is not None and lines(answers) + lines(Path(f"{answers}.partial")) >= 1,
             [], "the first answer")
    holder = holder_pid(answers)
    winner = next(p for p in procs if p.pid == holder)
    for proc in procs:
        if proc is not winner:
            check_refused(proc, holder)
    gate.touch()
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err[-3000:]
    check_complete(answers, 8)

    from llava.eval.fixtures import write_fixtures

    data = write_fixtures(tmp_path / "eval", seed=0, n_per_bench=2, benchmarks=["pope"])
    script = REPO / "scripts" / "v1_5" / "eval" / "pope.sh"
    gate2 = tmp_path / "gate2"
    env = env_with(site, PIO_TEST_GATE=str(gate2), PIO_TEST_GATE_AFTER="1", PYTHON=sys.executable,
                   MODEL_PATH=str(tiny_v15), DATA_ROOT=str(data), DEVICE="cpu", EXTRA_ARGS="--max_new_tokens 2",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env = {k: v for k, v in env.items() if k not in ("METHOD", "BUDGET", "PIO", "CKPT", "SCHEDULE", "CUDA_VISIBLE_DEVICES")}
    first = subprocess.Popen(["bash", str(script)], cwd=REPO, text=True, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    procs.append(first)
    pope_answers = data / "pope" / "answers" / f"{tiny_v15.rsplit('/', 1)[-1]}.jsonl"
    wait_for(lambda: lines(pope_answers) >= 1, [first], "the first script's first answer")
    second = subprocess.run(["bash", str(script)], cwd=REPO, text=True, env=env, capture_output=True, timeout=300)
    msgs = errors(second.stderr)
    assert second.returncode == 2 and len(msgs) == 1, second.stderr[-3000:]
    assert f"being written by another run: pid {holder_pid(pope_answers)}" in msgs[0]
    gate2.touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    check_complete(pope_answers, 6)
    result = json.loads((data / "pope" / "results" / f"{tiny_v15.rsplit('/', 1)[-1]}.json").read_text())
    assert result["coverage"]["answered"] == 6 and not result["coverage"]["partial"]


# --------------------------------------------------------------------------- a full disk, a read-only folder
@functools.lru_cache(maxsize=None)
def can_mount() -> bool:
    """This process may mount a tmpfs in a user namespace of its own (``unshare -r -m``; ``PIO_TEST_NO_MOUNT=1``
    tries the injected faults instead)."""
    if shutil.which("unshare") is None or os.environ.get("PIO_TEST_NO_MOUNT"):
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"pio-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {probe}"],
                              capture_output=True, timeout=30)
        return done.returncode == 0
    finally:
        probe.rmdir()


def on_disk(cmd: list[str], folder: Path, mount: str | None, env: dict[str, str], setup: str = "",
            after: str = "") -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``folder`` on a tmpfs mounted with ``mount`` options, between the shell commands ``setup``
    and ``after`` (which see the mount; the command's status is kept), or, when no mount is possible, with the
    fault injected (``env`` then says which)."""
    script = f"{setup}\n{shlex.join(cmd)}\nrc=$?\n{after}\nexit $rc"
    if mount is not None:
        script = f"mount -t tmpfs -o {mount} tmpfs {shlex.quote(str(folder))} || exit 99\n{script}"
        return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], cwd=REPO, text=True, capture_output=True,
                              env=env, timeout=300)
    return subprocess.run(["sh", "-c", script], cwd=REPO, text=True, capture_output=True, env=env, timeout=300)


def long_id_questions(root: Path, n: int) -> Path:
    """Questions whose ids are 1500 characters long: each answer line is about 1.6 kB."""
    (root / "images").mkdir(exist_ok=True)
    image(336, 336, seed=3).save(root / "images" / "im.png")
    qfile = root / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": f"{i}-" + "x" * 1500, "image": "im.png",
                                         "text": f"What is object {i}?"}) + "\n" for i in range(n)))
    return qfile


def test_a_full_disk_leaves_the_old_answers_and_nothing_temporary(tiny_v15, tmp_path, site):
    qfile = long_id_questions(tmp_path, 8)
    disk = tmp_path / "disk"
    disk.mkdir()
    answers = disk / "a.jsonl"
    old = '{"question_id": "q0", "text": "an earlier run", "metadata": {"q": "0", "run": "0123456789ab"}}'
    setup = f"echo {shlex.quote(old)} > {shlex.quote(str(answers))}"
    after = f"echo ===; cat {shlex.quote(str(answers))}; echo ===; ls -A {shlex.quote(str(disk))}"
    # 6 pages: the old answers, the lock, the new run file (one or two pages), and room for at most six of the
    # eight new answer lines
    mount = "size=24k" if can_mount() else None
    env = env_with(site) if mount else env_with(site, PIO_TEST_FULL_DIR=str(disk), PIO_TEST_FULL_BYTES="9000")
    done = on_disk(runner(tiny_v15, qfile, answers, "--overwrite"), disk, mount, env, setup, after)
    msgs = errors(done.stderr)
    assert done.returncode == 2 and len(msgs) == 1, done.stderr[-3000:]
    assert re.search(r"cannot write .*a\.jsonl\.partial: No space left on device", msgs[0]), msgs
    _, kept, listing = done.stdout.split("===\n")
    assert kept == old + "\n"  # the earlier answers as they were
    assert listing.split() == ["a.jsonl"]  # no .partial file, no lock, no temporary run file


def test_a_read_only_output_folder_is_found_before_the_model_loads(tiny_v15, tmp_path, site):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_v15, ckpt)
    (ckpt / "tokenizer.model").write_bytes(b"not a tokenizer")  # loading the model would fail on it first
    qfile = write_questions(tmp_path, 2)
    folder = tmp_path / "ro"
    folder.mkdir()
    mount = "ro,size=4k" if can_mount() else None
    env = env_with(site) if mount else env_with(site, PIO_TEST_READONLY_DIR=str(folder))
    commands = {
        "--answers-file": runner(ckpt, qfile, folder / "sub" / "a.jsonl", "--resume"),
        "--out": [sys.executable, "-m", "llava.eval.tune", "--model-path", str(ckpt), "--question-file", str(qfile),
                  "--image-folder", str(tmp_path / "images"), "--out", str(folder / "s.json"), "--device", "cpu",
                  "--conv-mode", "vicuna_v1", "--method", "random", "--layers", "2", "--budget", "300"],
    }
    for flag, cmd in commands.items():
        done = on_disk(cmd, folder, mount, env)
        msgs = errors(done.stderr)
        assert done.returncode == 2 and len(msgs) == 1, done.stderr[-3000:]
        assert re.search(rf"{flag} .*: cannot write in .*ro.* \(Read-only file system\)", msgs[0]), msgs
