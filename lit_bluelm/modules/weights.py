"""Reading model weights out of Lightning checkpoints (single file or FSDP folder)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from lit_bluelm.config import ConfigError

PREFIX = "model."


def _sharded_model_state(path: Path) -> Dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a distributed (DCP) checkpoint folder, and nothing else: the
    optimizer state beside them is never read."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    prefix = "state_dict." + PREFIX  # how Lightning's ModelParallelStrategy lays out the folder
    template = {
        key[len("state_dict.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    state = {"state_dict": template}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return {k[len(PREFIX) :]: v for k, v in template.items()}


def read_model_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The ``model.*`` weights of a checkpoint, prefix stripped. Files load with
    ``weights_only=True`` and ``mmap``, so entries other than the weights are never read."""
    path = Path(path)
    if path.is_dir():  # sharded checkpoint written by the fsdp strategy
        return _sharded_model_state(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = ckpt.get("state_dict", ckpt)
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def load_model_weights(model: nn.Module, path: str | Path) -> Dict[str, list]:
    """Copy a checkpoint's weights into ``model`` (``init_from``). Components the checkpoint lacks
    keep their init (e.g. a text-only checkpoint into a multimodal model); a shape mismatch or a
    checkpoint with nothing in common is an error. Returns the missing / unexpected keys."""
    own = model.state_dict()
    state = read_model_state(path)
    common = [k for k in state if k in own]
    if not common:
        raise ConfigError(f"init_from: '{path}' has no weights for this model")
    wrong = [k for k in common if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"init_from: '{path}' does not fit this model: {k} is {tuple(state[k].shape)} there, "
            f"{tuple(own[k].shape)} here ({len(wrong)} tensors differ)"
        )
    result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
