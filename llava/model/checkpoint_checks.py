"""Checks of a checkpoint's files before the slow load: each problem is one line naming the file and what to do.

What loading would otherwise report as a parser error, a library traceback or a misleading size mismatch:

* ``config.json`` that is not JSON (the file is named);
* a hub id that is neither a local folder nor in the Hugging Face cache while the hub is offline (what to
  download, or which flag to pass instead);
* a ``.safetensors`` file cut short (a download or copy that did not finish: its header describes more bytes
  than the file has), or a shard named by the weight index that is absent;
* a LLaVA vision tower folder (``mm_vision_tower``) without its ``config.json`` (transformers would fall back to a
  default CLIP and report a size mismatch), its ``preprocessor_config.json`` or its weights.

Tensors of the wrong shape are reported by the strict loading of :func:`llava.model.builder.check_loading_info`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

__all__ = ["check_checkpoint", "check_hub_available", "hub_snapshot", "read_config_json", "safetensors_header"]

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hub_id(model_path: str) -> bool:
    """``owner/name`` that is not a local folder: what transformers fetches from the hub."""
    return not os.path.isdir(os.path.expanduser(model_path)) and bool(HUB_ID.match(model_path))


def hub_snapshot(repo_id: str) -> str | None:
    """The folder of the Hugging Face cache's snapshot of ``repo_id`` (its ``config.json`` cached), else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(found) if isinstance(found, str) else None


def _offline() -> bool:
    from transformers.utils import is_offline_mode

    return bool(is_offline_mode())


def check_hub_available(repo_id: str, what: str = "--model-path") -> None:
    """A hub id must be cached while the hub is offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    if hub_snapshot(repo_id) is not None or not _offline():
        return
    from huggingface_hub import constants

    raise FileNotFoundError(
        f"{what} {repo_id}: not a local folder, and the Hugging Face hub is offline (HF_HUB_OFFLINE/"
        f"TRANSFORMERS_OFFLINE) with no copy in its cache ({constants.HF_HUB_CACHE}); download it where there is "
        f"network (huggingface-cli download {repo_id}) or pass a local checkpoint folder")


def hub_error(repo_id: str, err: BaseException, what: str = "--model-path") -> FileNotFoundError:
    """One line for a hub id transformers could not fetch (no network, no such repository, no access)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return FileNotFoundError(f"{what} {repo_id}: cannot fetch it from the Hugging Face hub ({first}); download it "
                             f"where there is network (huggingface-cli download {repo_id}) or pass a local checkpoint "
                             "folder")


def read_config_json(model_path: str, what: str = "--model-path") -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict: a local folder's (a file that is not a JSON object is named), or a
    hub id's (cached, or fetched; offline without a copy is one line saying what to download)."""
    path = os.path.expanduser(model_path)
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"checkpoint {model_path} has no config.json")
        return _read_json_object(cfg, "the checkpoint's config")
    if os.path.exists(path):
        raise NotADirectoryError(f"{what} {model_path} is a file; a checkpoint is a folder (or a hub id)")
    if not HUB_ID.match(model_path):
        raise FileNotFoundError(f"{what} {model_path}: no such checkpoint folder (nor a hub id such as "
                                "liuhaotian/llava-v1.5-7b)")
    check_hub_available(model_path, what)
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(model_path)[0]
    except OSError as err:
        raise hub_error(model_path, err, what) from None


def _read_json_object(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); {what} is a JSON object") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {what} is a JSON object: restore "
                         "the file (download it again)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got a JSON {type(data).__name__}")
    return data


def safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file, checked against the file's size (a file cut short, or not a
    safetensors file, raises naming it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path} is cut short or not a safetensors file ({size} bytes, the header alone needs "
                             f"{'8' if n is None else 8 + n}): download or copy it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: its safetensors header is not readable JSON: download or copy it again") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its safetensors header is not a JSON object: download or copy it again")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is cut short: it has {size} bytes, its header describes {8 + n + end} (a download or "
                         "copy that did not finish): download or copy it again")
    return header


def _check_weights(folder: str) -> None:
    """Every safetensors file of ``folder`` whole, and every shard a weight index names present."""
    names = sorted(os.listdir(folder))
    for name in names:
        if name.endswith(".safetensors"):
            safetensors_header(os.path.join(folder, name))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            weight_map = _read_json_object(os.path.join(folder, index), "a weight index").get("weight_map") or {}
            absent = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, str(f)))})
            if absent:
                raise FileNotFoundError(f"{os.path.join(folder, index)} names {len(absent)} weight file(s) that are "
                                        f"not in {folder} ({', '.join(absent[:4])}): download them")


def _check_vision_tower(model_path: str, config: dict[str, Any]) -> None:
    """A LLaVA checkpoint's vision tower: a folder with config, preprocessor config and weights, or a hub id that
    can be fetched."""
    tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if not isinstance(tower, str) or not tower:
        return
    local = tower if os.path.isabs(tower) else os.path.join(model_path, tower)
    if not os.path.isdir(local):
        if HUB_ID.match(tower):
            check_hub_available(tower, f"the vision tower (mm_vision_tower of {model_path}/config.json)")
        return  # a missing folder that is not a hub id: load_llava_config names it
    files = set(os.listdir(local))
    needed = [("config.json", "its configuration"), ("preprocessor_config.json", "its image preprocessing")]
    missing = [f"{name} ({why})" for name, why in needed if name not in files]
    if not config.get("unfreeze_mm_vision_tower") and not files & set(WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[::2]) + " (its weights)")
    if missing:
        raise FileNotFoundError(f"the vision tower folder {local} (mm_vision_tower of {model_path}/config.json) has no "
                                f"{'; no '.join(missing)}: copy the whole tower (e.g. openai/clip-vit-large-patch14-336)")
    _read_json_object(os.path.join(local, "config.json"), "the vision tower's config")
    _check_weights(local)


def check_checkpoint(model_path: str) -> dict[str, Any]:
    """Check what loading ``model_path`` reads, before reading it (module docstring); returns its config dict."""
    config = read_config_json(model_path)
    path = os.path.expanduser(model_path)
    if os.path.isdir(path):
        _check_weights(path)
        _check_vision_tower(path, config)
    elif config.get("model_type") in ("llava_llama", "llava"):
        tower = config.get("mm_vision_tower")
        if isinstance(tower, str) and HUB_ID.match(tower):
            check_hub_available(tower, f"the vision tower (mm_vision_tower of {model_path})")
    return config
