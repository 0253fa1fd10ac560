"""Small shared utilities: the optional-dependency guards (flash-attn, PyAV) and the command-line entry wrapper."""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError,
               NotImplementedError, FileExistsError)
"""What bad input raises (flags, files, checkpoints, images, missing packages): reported in one line."""

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG, errno.EIO})
"""Errors of the disk a command writes to (full, over quota, read-only, failing): reported in one line too."""


def require_flash_attn() -> None:
    """Raise a clear error when FlashAttention-2 is requested but not installed (CPU machines cannot build it)."""
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only): "
            "pip install -e '.[gpu]', or use --attn-implementation sdpa/eager"
        )


def import_av() -> Any:
    """PyAV (``import av``), the video decoder of the ``video`` extra, or a one-line ImportError saying how to get it."""
    try:
        import av
    except ImportError:
        raise ImportError("reading video needs PyAV: pip install -e '.[video]' (or pip install 'av>=12,<16')") from None
    return av


def cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a command's ``main(argv)``: an error the user caused ends it with one line on stderr and status 2
    (``--debug`` anywhere on the command line shows the traceback instead); ``main`` itself keeps raising, for
    callers in Python."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except (*USER_ERRORS, OSError) as err:
        if debug or not (isinstance(err, USER_ERRORS) or err.errno in DISK_ERRNOS):
            raise
        if isinstance(err, OSError) and err.filename and err.strerror:
            text = f"cannot write {err.filename}: {err.strerror}" if err.errno in DISK_ERRNOS else \
                f"{err.filename}: {err.strerror}"
        else:
            text = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {text} (--debug shows where)", file=sys.stderr)
        raise SystemExit(2) from None


def ensure_writable(folder: str, what: str) -> None:
    """Create ``folder`` if needed and check that a file can be written in it (a read-only mount, a folder without
    permission, a file in the way), before any slow work; raises naming ``what`` (the flag and its value)."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise PermissionError(f"{what}: cannot write in {err.filename or folder} ({reason}); choose a folder this "
                              "process can write") from None
