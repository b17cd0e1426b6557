"""Next-token cross-entropy."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of predicting ``labels[:, t + 1]`` from ``logits[:, t]``.

    logits [B, T, V], labels [B, T] with ``IGNORE_INDEX`` where nothing is predicted (padding,
    image placeholders, prompts). Returns (mean loss over counted tokens, number of counted
    tokens); with no counted token the loss is a graph-connected 0.
    """
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1), count
