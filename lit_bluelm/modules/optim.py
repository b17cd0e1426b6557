"""Optimizer parameter groups per component and the warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from lit_bluelm.registry import lookup

COMPONENTS = ("vision", "adapter", "llm", "score")  # score: the reward head, when there is one


def freeze_components(model: nn.Module, lr: Any) -> List[str]:
    """``requires_grad=False`` on every component whose learning rate is 0; returns their names."""
    frozen = []
    for name in COMPONENTS:
        module = getattr(model, name, None)
        if module is not None and lr[name] == 0:
            module.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: nn.Module, lr: Any, weight_decay: float) -> List[Dict[str, Any]]:
    """One decayed and one undecayed group per trainable component (biases and norm weights,
    the 1-d tensors, are not decayed). Group names show up in the LR monitor."""
    groups = []
    for name in COMPONENTS:
        module = getattr(model, name, None)
        if module is None or lr[name] == 0:
            continue
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, ps, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"name": name + suffix, "params": ps, "lr": lr[name], "weight_decay": wd})
    if not groups:
        raise ValueError("optim.lr: every component has learning rate 0, nothing to train")
    return groups


def _adamw8bit(groups, **kwargs) -> torch.optim.Optimizer:
    import bitsandbytes as bnb  # imported on use: optional at run time

    return bnb.optim.AdamW8bit(groups, **kwargs)


OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adamw8bit": _adamw8bit,
}


def warmup_cosine(
    warmup_steps: int, total_steps: int, min_ratio: float, cosine: bool = True
) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``
    at ``total_steps`` (or flat at 1 when ``cosine`` is false)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module, optim: Any, max_steps: int
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over ``param_groups`` and its per-step LR schedule, from ``cfg.optim``."""
    make = lookup(OPTIMIZERS, optim.name, "optim.name")
    optimizer = make(
        param_groups(model, optim.lr, optim.weight_decay), betas=tuple(optim.betas), eps=optim.eps
    )
    factor = warmup_cosine(optim.warmup_steps, max_steps, optim.min_lr_ratio, optim.schedule == "cosine")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
