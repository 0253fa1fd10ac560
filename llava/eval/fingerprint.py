"""What identifies a checkpoint's content, cheaply but honestly: the part of a run's identity (and of ``tune``'s
saved state) that says which weights answered.

A checkpoint is fingerprinted by the sha256 of every file loading reads (config, tokenizer, preprocessor and
weight files at the top of its folder) and of its LLaVA vision tower's folder (``mm_vision_tower``, inside the
checkpoint or elsewhere). A file rewritten in place with the same size therefore changes the fingerprint, and a
checkpoint copied or touched without changing a byte keeps it.

Cost: a file's digest is computed once per version of the file (read in full, with a progress bar for large ones)
and cached by (device, inode, size, mtime_ns, ctime_ns) in ``$PIO_FVLM_CACHE/file-digests.json`` (default
``~/.cache/pio-fvlm``); any write to a file changes its ctime, so a cached digest is never stale. Files of the
Hugging Face cache cost nothing: their blobs are named by their sha256 (weights) and a hub id is fingerprinted by
its cached snapshot (revision and files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Any

from llava.model.checkpoint_checks import HUB_ID, hub_snapshot

logger = logging.getLogger(__name__)

__all__ = ["file_digest", "file_sha256", "weights_fingerprint"]

FINGERPRINTED_SUFFIXES = (".json", ".model", ".safetensors", ".bin", ".pt", ".pth", ".tiktoken")
FINGERPRINTED_NAMES = ("merges.txt", "vocab.txt")
DIGEST_CHARS = 16  # of the sha256 written into identities: 64 bits
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_cache: dict[str, list] | None = None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's content (read in ``chunk``-byte blocks; a progress bar for files over 1 GiB)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    bar = None
    if size > 1 << 30:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"fingerprinting {os.path.basename(path)}")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def cache_path() -> str:
    root = os.environ.get("PIO_FVLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pio-fvlm")
    return os.path.join(root, "file-digests.json")


def _load_cache() -> dict[str, list]:
    global _cache
    if _cache is None:
        try:
            with open(cache_path(), encoding="utf-8") as f:
                data = json.load(f)
            _cache = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _cache = {}  # absent or unreadable: digests are computed again
    return _cache


def _save_cache(cache: dict[str, list]) -> None:
    """Write the cache atomically; a cache that cannot be written (read-only home) only costs time later."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".file-digests.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as err:
        logger.debug("cannot write the digest cache %s (%s)", path, err)


def file_digest(path: str) -> str:
    """The sha256 of a file's content (module docstring: cached, free for Hugging Face cache blobs)."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if _SHA256.match(name) and os.path.basename(os.path.dirname(real)) == "blobs":
        return name  # the Hugging Face cache names a weight blob by its sha256
    st = os.stat(real)
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache = _load_cache()
    hit = cache.get(real)
    if isinstance(hit, list) and hit[:-1] == key:
        return str(hit[-1])
    if st.st_size > 1 << 28:
        logger.info("fingerprinting %s (%.1f GB; once per version of the file, cached in %s)", real, st.st_size / 1e9,
                    cache_path())
    digest = file_sha256(real)
    cache[real] = [*key, digest]
    _save_cache(cache)
    return digest


def _folder_files(folder: str) -> dict[str, str]:
    """``{file name: digest}`` of the files loading reads at the top of ``folder``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if name.endswith(FINGERPRINTED_SUFFIXES) or name in FINGERPRINTED_NAMES:
            out[name] = file_digest(path)[:DIGEST_CHARS]
    return out


def _folder_fingerprint(model_path: str) -> tuple[dict[str, Any], str | None]:
    """The fingerprint of a checkpoint folder or hub id, and the folder read (None: a hub id not in the cache)."""
    path = os.path.expanduser(model_path)
    if os.path.isdir(path):
        return {"files": _folder_files(path)}, path
    if HUB_ID.match(model_path):
        snapshot = hub_snapshot(model_path)
        if snapshot is None:
            return {"hub_id": model_path}, None  # loading downloads it (or says it cannot)
        return {"hub_id": model_path, "revision": os.path.basename(snapshot), "files": _folder_files(snapshot)}, snapshot
    return {"path": model_path}, None


def weights_fingerprint(model_path: str) -> dict[str, Any]:
    """What identifies a checkpoint's content (module docstring): ``{"files": {name: sha256[:16]}, "vision_tower":
    {...}}`` for a folder; a hub id adds ``hub_id`` and the cached ``revision`` (only ``hub_id`` when not cached)."""
    out, folder = _folder_fingerprint(model_path)
    if folder is None:
        return out
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            tower = json.load(f).get("mm_vision_tower")
    except (OSError, ValueError, AttributeError):
        tower = None  # a broken config is named by the checkpoint checks
    if isinstance(tower, str) and tower:
        local = tower if os.path.isabs(tower) else os.path.join(folder, tower)
        out["vision_tower"] = _folder_fingerprint(local if os.path.isdir(local) else tower)[0]
    return out
