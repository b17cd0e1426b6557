"""Next-token cross-entropy: on full logits, and chunked from the final hidden states."""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.objectives.linear_loss import Head, chunked_linear_loss


class LossParts(NamedTuple):
    loss: torch.Tensor  # what is optimised (differentiable)
    ce: torch.Tensor  # mean CE (detached)
    kd: torch.Tensor  # mean T^2-scaled KL (detached; 0 without a teacher)
    count: torch.Tensor  # number of counted tokens


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


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE [N] of float32 ``logits`` [N, V], as logsumexp - target logit: no [N, V]
    log-probabilities are kept for backward."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)


def shift_and_select(labels: torch.Tensor, *hidden: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Next-token targets: position t predicts ``labels[:, t + 1]``. Returns the counted targets
    [N] followed by each ``hidden`` [B, T, D] reduced to the same N positions [N, D]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return (targets[keep], *(h[:, :-1][keep] for h in hidden))


class TokenCE:
    """A :class:`~lit_bluelm.objectives.linear_loss.ChunkLoss`: mean CE over ``targets`` [N]."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return token_ce(logits, self.targets[rows]).sum()[None]

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[0] / max(self.targets.shape[0], 1)


def ce_parts(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk_size: int) -> LossParts:
    """Chunked mean CE of ``hidden`` [N, D] against ``targets`` [N] (all counted)."""
    loss, stats = chunked_linear_loss(hidden, head, TokenCE(targets), chunk_size)
    n = hidden.shape[0]
    return LossParts(loss, stats[0] / max(n, 1), stats.new_zeros(()), torch.tensor(n, device=hidden.device))


def next_token_head_loss(labels: torch.Tensor, chunk_size: int):
    """A ``head_fn`` for ``BlueLM.forward``: next-token CE of the final hidden states, computed
    chunk by chunk. Returns :class:`LossParts`."""

    def head_fn(hidden: torch.Tensor, head: torch.nn.Linear) -> LossParts:
        targets, h = shift_and_select(labels, hidden)
        return ce_parts(h, Head(head.weight, head.bias), targets, chunk_size)

    return head_fn


@torch.no_grad()
def row_ce_sums(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and counted tokens per row ([B] each), chunk by chunk, no gradients
    (validation: per-source losses from one forward)."""
    b, t = labels.shape
    row_ids = torch.arange(b, device=labels.device)[:, None, None].expand(b, t, 1)
    flat_targets, flat_hidden, rows = shift_and_select(labels, hidden, row_ids)
    rows = rows.squeeze(-1)
    proj = Head(head.weight, head.bias)
    sums = torch.zeros(b, dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_targets.shape[0], chunk_size):
        stop = start + chunk_size
        sums.index_add_(
            0, rows[start:stop], token_ce(proj.logits(flat_hidden[start:stop]), flat_targets[start:stop])
        )
    return sums, torch.bincount(rows, minlength=b)
