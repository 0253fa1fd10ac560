"""Small shared utilities: the optional-dependency guards (flash-attn, PyAV) and the command-line entry wrapper."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError,
               NotImplementedError)
"""What bad input raises (flags, files, checkpoints, images, missing packages): reported in one line."""


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
    except USER_ERRORS as err:
        if debug:
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {text} (--debug shows where)", file=sys.stderr)
        raise SystemExit(2) from None
