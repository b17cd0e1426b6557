"""Next-token cross-entropy: on full logits, and chunked from the final hidden states."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.objectives.linear_loss import ChunkSize, Head, Scratch, chunked_linear_loss, exp_shifted_


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

    buffers = 1

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return token_ce(logits, self.targets[rows]).sum()[None]

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[0] / max(self.targets.shape[0], 1)

    def fused_(self, z: torch.Tensor, rows: slice, grad: bool, scratch: Scratch) -> torch.Tensor:
        targets = self.targets[rows]
        ce, sums = ce_(z, targets)
        if grad:  # (softmax - one-hot) / N
            ce_grad_(z, sums, targets, 1.0 / max(self.targets.shape[0], 1))
        return ce.sum()[None]


def ce_(z: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE [n] of float32 logits ``z`` [n, V], which become ``exp(z - max)``; also
    returns their row sums [n] (the softmax is ``z / sums``)."""
    picked = z.gather(1, targets[:, None]).squeeze(1)
    lse, sums = exp_shifted_(z)
    return lse - picked, sums


def ce_grad_(e: torch.Tensor, sums: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (softmax - one-hot(targets))`` in place of ``e = exp(z - max)`` with row sums ``sums``."""
    e.mul_((scale / sums)[:, None])
    return e.scatter_add_(1, targets[:, None], e.new_full((e.shape[0], 1), -scale))


class RowCE:
    """A ChunkLoss (statistics only): summed CE [B] per batch row ``row_of`` [N] of ``targets``."""

    buffers = 1

    def __init__(self, targets: torch.Tensor, row_of: torch.Tensor, batch: int) -> None:
        self.targets, self.row_of, self.batch = targets, row_of, batch

    def _per_row(self, ce: torch.Tensor, rows: slice) -> torch.Tensor:
        return ce.new_zeros(self.batch).index_add_(0, self.row_of[rows], ce)

    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return self._per_row(token_ce(logits, self.targets[rows]), rows)

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        return stats.sum()

    def fused_(self, z: torch.Tensor, rows: slice, grad: bool, scratch: Scratch) -> torch.Tensor:
        assert not grad, "RowCE is for validation"
        return self._per_row(ce_(z, self.targets[rows])[0], rows)


def ce_parts(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk_size: ChunkSize) -> LossParts:
    """Chunked mean CE of ``hidden`` [N, D] against ``targets`` [N] (all counted)."""
    loss, stats = chunked_linear_loss(hidden, head, TokenCE(targets), chunk_size)
    n = hidden.shape[0]
    return LossParts(loss, stats[0] / max(n, 1), stats.new_zeros(()), torch.tensor(n, device=hidden.device))


def next_token_head_loss(labels: torch.Tensor, chunk_size: ChunkSize):
    """A ``head_fn`` for ``BlueLM.forward``: next-token CE of the final hidden states, computed
    chunk by chunk. Returns :class:`LossParts`."""

    def head_fn(hidden: torch.Tensor, head: torch.nn.Linear) -> LossParts:
        targets, h = shift_and_select(labels, hidden)
        return ce_parts(h, Head(head.weight, head.bias), targets, chunk_size)

    return head_fn


@torch.no_grad()
def row_ce_sums(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_size: ChunkSize,
    groups: Optional[torch.Tensor] = None,
    n_groups: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and counted tokens per row ([B] each), chunk by chunk, no gradients
    (validation: per-source losses from one forward). With ``groups`` [B, T] (ids below
    ``n_groups``, e.g. the document of every position of packed rows), per group instead
    ([n_groups] each): a target counts for the group of the position that predicts it."""
    b, t = labels.shape
    if groups is None:
        groups, n_groups = torch.arange(b, device=labels.device)[:, None].expand(b, t), b
    elif n_groups is None or groups.shape != labels.shape:
        raise ValueError(
            f"groups {tuple(groups.shape)} must match labels {tuple(labels.shape)}, with n_groups"
        )
    targets, flat_hidden, ids = shift_and_select(labels, hidden, groups[..., None])
    ids = ids.squeeze(-1)
    _, sums = chunked_linear_loss(
        flat_hidden, Head(head.weight, head.bias), RowCE(targets, ids, n_groups), chunk_size
    )
    return sums, torch.bincount(ids, minlength=n_groups)
