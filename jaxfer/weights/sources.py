"""Where a checkpoint lives: a local directory (or file), or a Hugging Face Hub id.

Hub ids go through ``huggingface_hub.snapshot_download``, which honours
``HF_HUB_OFFLINE`` and the local cache. Only one weights format is fetched:
safetensors if the repo has it, else ``flax_model.msgpack``, else PyTorch ``.bin``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_METADATA = ["*.json", "*.txt", "*.model", "*.tiktoken"]
_WEIGHTS = [["*.safetensors"], ["flax_model.msgpack"], ["pytorch_model*.bin"]]


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or (d / "flax_model.msgpack").exists() or any(d.glob("pytorch_model*.bin"))


def resolve(source: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local path for ``source``; downloads (or finds in the cache) a hub repo."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise FileNotFoundError(f"{text}: no such local path (and not a Hugging Face Hub id)")
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    local = None
    try:
        for weights in _WEIGHTS:
            local = Path(huggingface_hub.snapshot_download(text, revision=revision,
                                                           allow_patterns=_METADATA + weights))
            if _has_weights(local):
                break
    except Exception as e:
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
               if offline else "the Hugging Face Hub could not be reached or has no such repo")
        raise FileNotFoundError(
            f"{text!r} is not a local path and could not be fetched: {why}. "
            f"Pass a local directory, or download it first. ({type(e).__name__}: {e})"
        ) from e
    return local


def read_config(directory: str | os.PathLike) -> Any:
    """``config.json`` as a ``transformers`` config (plain dict if transformers cannot parse it)."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json; name the architecture with config=, e.g. "
                                "load(path, config={'model_type': 'efficientnet_lite', 'variant': 'lite0'})")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if "model_type" not in raw:
        raise ValueError(f"{path}: has no 'model_type'")
    try:
        import transformers

        return transformers.AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError):
        return raw


def model_type(config: Any) -> str:
    return config["model_type"] if isinstance(config, dict) else config.model_type


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _side(x: Any) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, dict):
        return x.get("shortest_edge") or x.get("height")
    return None


def read_preprocessing(directory: str | os.PathLike) -> dict | None:
    """``preprocessor_config.json`` (a HF image processor's) -> ``{size, crop_pct, mean, std,
    resample}`` (see :func:`jaxfer.data.image.transform_options`); ``None`` without the file.

    ``size: {height, width}`` without a centre crop resizes straight to it
    (``crop_pct=None``); ``size: {shortest_edge}`` with ``crop_pct`` (ConvNeXt/ResNet)
    or with ``crop_size`` (``do_center_crop``) resizes the shorter side and crops.
    """
    directory = Path(directory)
    path = (directory if directory.is_dir() else directory.parent) / "preprocessor_config.json"
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    size_field = raw.get("size")
    resized = _side(size_field)
    if resized is None:
        raise ValueError(f"{path}: no usable 'size' ({size_field!r})")
    if raw.get("do_center_crop") and _side(raw.get("crop_size")):
        size, crop_pct = _side(raw["crop_size"]), _side(raw["crop_size"]) / resized
    elif isinstance(size_field, dict) and "shortest_edge" in size_field:
        size, crop_pct = resized, float(raw.get("crop_pct") or 1.0)
    else:
        size, crop_pct = resized, None
    normalise = raw.get("do_normalize", True)
    return {"size": int(size), "crop_pct": crop_pct,
            "mean": tuple(raw.get("image_mean", (0.0, 0.0, 0.0))) if normalise else (0.0, 0.0, 0.0),
            "std": tuple(raw.get("image_std", (1.0, 1.0, 1.0))) if normalise else (1.0, 1.0, 1.0),
            "resample": _PIL_RESAMPLE.get(raw.get("resample", 2), "bilinear")}
