"""Build the composed BlueLM from ``cfg.model`` and count its parameters."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, List, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from lit_bluelm.models.adapter import ADAPTERS
from lit_bluelm.models.bluelm import BlueLM
from lit_bluelm.models.llm import LLMS, check_output_head
from lit_bluelm.models.vision import VISION_ENCODERS
from lit_bluelm.registry import lookup


def build_model(cfg: DictConfig, context: Any = None, device: str | torch.device | None = None) -> BlueLM:
    """Random-init (or local-weights) BlueLM from ``cfg.model``, with the stage's ``context``
    section applied to the LLM. ``device="meta"`` builds shapes only (dry run).

    ``model.text_only: true`` builds the LLM alone (no vision tower, no adapter);
    ``model.reward_head: true`` adds the reward model's scalar head (``score``).
    """
    rope = context.rope if context is not None else None
    with torch.device(device) if device is not None else nullcontext():
        llm = lookup(LLMS, cfg.llm.name, "model.llm.name")(cfg.llm, rope)
        check_output_head(llm.config)
        vision = adapter = None
        if not cfg.text_only:
            vision = lookup(VISION_ENCODERS, cfg.vision.name, "model.vision.name")(cfg.vision)
            build_adapter = lookup(ADAPTERS, cfg.adapter.name, "model.adapter.name")
            adapter = build_adapter(cfg.adapter, vision.embed_dim, llm.config.hidden_size)
        score = nn.Linear(llm.config.hidden_size, 1, bias=False) if cfg.reward_head else None
    image_token_id = cfg.image_token_id if cfg.image_token_id is not None else -1
    return BlueLM(vision, adapter, llm, image_token_id, downsample=cfg.adapter.downsample, score=score)


def parameter_table(model: BlueLM) -> List[Tuple[str, int]]:
    """(component, parameter count) rows for vision, adapter, llm (score, when the model has a
    reward head) and total (shared weights once)."""
    rows = []
    for name in ("vision", "adapter", "llm", *(("score",) if model.score is not None else ())):
        module = getattr(model, name)
        rows.append((name, sum(p.numel() for p in module.parameters()) if module is not None else 0))
    rows.append(("total", sum(p.numel() for p in model.parameters())))
    return rows
