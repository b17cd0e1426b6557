"""The pickled weights files the model loaders read (a Hugging Face folder's ``pytorch_model*.bin``,
an open_clip / timm ``.bin`` or ``.pt``), checked the way they load: ``torch.load`` with
``weights_only=True``. A file that loading refuses is one :class:`ConfigError` naming the file and
the refused global, raised at start-up (``lit_bluelm.startup``) rather than as a traceback from
inside the model build. safetensors files hold no pickle and need no check."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import List

import torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from lit_bluelm.errors import ConfigError

_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")  # how torch names what it refused
_UNPICKLER = "WeightsUnpickler error:"


def check_weights_file(path: str | Path, key: str) -> None:
    """``path`` loads with ``weights_only=True`` (tensors memory-mapped, not read), as the
    loaders will load it; otherwise one line naming the file and what was refused."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return  # nothing pickled; a missing file is the loader's error
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # a refusal (many lines), or a damaged file
        raise ConfigError(f"{key}: {_refusal(path, err)}") from None


def _refusal(path: Path, err: Exception) -> str:
    text = str(err)
    refused = _GLOBAL.search(text)
    if refused is not None:
        return (
            f"'{path}' pickles {refused.group(1)}, a global that weights-only loading refuses; "
            "save the weights as safetensors"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(err).__name__]
    if "Weights only load failed" not in text:
        return f"cannot read '{path}': {lines[0][:300]}"
    after = [ln.strip() for ln in text.partition(_UNPICKLER)[2].splitlines() if ln.strip()]
    reason = after[0] if after else lines[0]  # what the weights-only unpickler stopped at
    return f"refused to load '{path}': {reason[:300]}; save the weights as safetensors"


def hf_weight_files(folder: str | Path) -> List[Path]:
    """The pickled files ``from_pretrained`` reads from a local Hugging Face folder: none when it
    holds safetensors (which transformers prefers), else ``pytorch_model.bin`` or the shards its
    index names."""
    folder = Path(folder)
    explicit = _explicit_weights(folder)  # config.json's transformers_weights, when set
    if explicit is not None:
        names = [explicit]
    elif (folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return []
    else:
        names = [WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else WEIGHTS_INDEX_NAME]
    files = []
    for name in names:
        if name.endswith(".index.json"):
            files += _shards(folder / name)
        elif not name.endswith(".safetensors"):
            files.append(folder / name)
    return [f for f in files if f.is_file()]


def check_hf_weights(folder: str | Path, key: str) -> None:
    """Every pickled weights file of a Hugging Face folder loads with ``weights_only=True``."""
    for path in hf_weight_files(folder):
        check_weights_file(path, key)


def _explicit_weights(folder: Path) -> str | None:
    try:
        name = json.loads((folder / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _shards(index: Path) -> List[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # no index, or one transformers will complain about itself
