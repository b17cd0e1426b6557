"""Reading model weights out of Lightning checkpoints (single file or FSDP folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from lit_bluelm.config import ConfigError

PREFIX = "model."


def read_model_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The ``model.*`` weights of a checkpoint, prefix stripped, loaded with ``weights_only``."""
    path = Path(path)
    if path.is_dir():  # sharded (distributed) checkpoint written by the fsdp strategy
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        ckpt = _load_distributed_checkpoint(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = ckpt.get("state_dict", ckpt)
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def load_model_weights(model: nn.Module, path: str | Path) -> Dict[str, list]:
    """Copy a checkpoint's weights into ``model`` (``init_from``). Components the checkpoint lacks
    keep their init (e.g. a text-only checkpoint into a multimodal model); a shape mismatch or a
    checkpoint with nothing in common is an error. Returns the missing / unexpected keys."""
    state = read_model_state(path)
    own = model.state_dict()
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
