"""One writer per output: a lock file beside each output file, held while a run writes it.

``OutputLock({"--answers-file": "a.jsonl", "--pio-log": "a.pio.jsonl"})`` takes ``a.jsonl.lock`` and
``a.pio.jsonl.lock`` or none: a second run on any of those files is refused with one line naming the holder (its
pid, host, start time and command, written into the lock file). The lock is the kernel's ``flock`` on the lock
file, so it is released the moment its holder dies, ``kill -9`` included: the lock file a dead run leaves behind
is taken over by the next run atomically (the kernel grants the lock to one process), after checking that the path
still names the file it locked (a releasing holder removes the file while it still holds the lock). Where the
filesystem has no locks (some network filesystems), a warning says that a second writer will not be refused.

Future writers of the same outputs (batched runners, rank-sharded runs, a merge step) take the same lock on the
files they write: ``with OutputLock({...}):``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["OutputBusyError", "OutputLock", "lock_path", "read_holder"]

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputBusyError(ValueError):
    """Another live run holds the lock of an output file."""


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of an output: ``X`` -> ``X.lock``."""
    return f"{path}.lock"


def read_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """What the lock file of output ``path`` says of its holder (None: no lock file, or nothing readable in it)."""
    try:
        with open(lock_path(path), encoding="utf-8") as f:
            data = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run that is starting"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Locks of output files, taken all or none (module docstring).

    Args:
        outputs: ``{flag: path}``, e.g. ``{"--answers-file": "a.jsonl"}``; the flag names the file in messages.
        command: what the holder runs, for the message others see (default: this process's command line).
    """

    def __init__(self, outputs: Mapping[str, str | os.PathLike], command: str | None = None):
        self.outputs = {flag: str(p) for flag, p in outputs.items()}
        self.command = command or shlex.join([os.path.basename(sys.executable), *sys.argv])
        self._held: dict[str, int] = {}  # lock file -> descriptor

    def acquire(self) -> OutputLock:
        """Take every lock, or raise :class:`OutputBusyError` naming the holder (and take none)."""
        try:
            for flag, path in sorted(self.outputs.items(), key=lambda kv: kv[1]):
                self._take(flag, path)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, flag: str, path: str) -> None:
        lock = lock_path(path)
        if lock in self._held:
            return
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"{flag} {path} is being written by another run: {describe_holder(read_holder(path))}; one writer "
                    f"per output: wait for it to finish, stop it, or write elsewhere") from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _NO_LOCKS:
                    raise
                logger.warning("cannot lock %s on this filesystem (%s): a second run writing %s is not refused", lock,
                               err.strerror, path)
                return
            try:  # the path must still name the file locked: a holder that released removed it
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = read_holder(path)
        if stale and stale.get("host") == socket.gethostname() and isinstance(stale.get("pid"), int) \
                and not _alive(stale["pid"]):
            logger.warning("taking over the lock of %s from pid %s, which is gone (killed?)", path, stale["pid"])
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "output": path,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._held[lock] = fd

    def release(self) -> None:
        """Remove the lock files (while still holding them), then let go."""
        for lock, fd in self._held.items():
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)
        self._held = {}

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
