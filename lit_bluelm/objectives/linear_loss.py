"""The output projection and a loss over its logits, computed in chunks of tokens.

With a 150k vocabulary the ``[tokens, vocab]`` float32 logits are the memory peak of a step (and
distillation doubles them). Here the projection, the loss and its gradient with respect to the
logits run one chunk of tokens at a time inside one autograd node: a chunk's logits exist only
while it is processed, and the gradients of the hidden states, of the output weight and of its
bias are accumulated chunk by chunk during the forward pass (nothing is recomputed in backward).

What is computed on each chunk's logits is a :class:`ChunkLoss`, an objective's own code:
next-token CE (``objectives.lm``), CE + KD (``objectives.distill``), and later per-token
log-probabilities for GRPO. A ChunkLoss returns differentiable per-chunk *sums* of its statistics
and a ``combine`` that is linear in them, so the total loss is ``combine(sum over chunks)`` and
its gradient is the sum of the chunks' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from lit_bluelm.errors import at_least


@dataclass
class LossConfig:
    """The ``loss`` section: how the output projection is chunked (every stage)."""

    # tokens per chunk of the output projection + loss: only chunk_size x vocab float32 logits
    # exist at a time (256 x 151,936 x 4 bytes = 156 MB per tensor)
    chunk_size: int = 256

    @staticmethod
    def check(cfg) -> None:
        at_least(cfg, "loss.chunk_size", 1)


class Head(NamedTuple):
    """An output projection: logits = hidden @ weight.T + bias. ``weight`` [V, D], ``bias`` [V]."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, V] (the matmul runs in the weight's dtype, as the model's head would)."""
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()


class ChunkLoss(Protocol):
    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Differentiable sums [k] of the loss statistics over float32 ``logits`` [n, V], the
        rows ``rows`` of the whole input."""

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        """The scalar loss from summed statistics [k]; must be linear in ``stats``."""


class _ChunkedLinearLoss(torch.autograd.Function):
    """One autograd node for head projection + loss; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_fn, chunk_size, needs):
        n = hidden.shape[0]
        device = hidden.device.type
        # the head matmul runs in the autocast dtype when autocast is on (as the model's own head
        # would); casts happen once here, not per chunk, and autocast is off for the explicit ops
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        # (needs, not ctx.needs_input_grad: that stays True under no_grad)
        need_h, need_w, need_b = needs
        wants_grad = any(needs)  # False in validation: sums only, no gradient buffers
        with torch.autocast(device, enabled=False):
            head = Head(weight.to(dtype), bias.to(dtype) if bias is not None else None)
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = None
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows]
                logits = head.logits(h).requires_grad_(wants_grad)  # a leaf of this chunk's graph
                with torch.set_grad_enabled(wants_grad):
                    stats = loss_fn.sums(logits, rows)
                    if wants_grad:  # d loss / d chunk logits [n_chunk, V]
                        (g,) = torch.autograd.grad(loss_fn.combine(stats), logits)
                del logits
                if need_h:
                    grad_h[rows] = g.to(dtype) @ head.weight
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
                if need_b:
                    grad_b += g.sum(0)
                total = stats.detach() if total is None else total + stats.detach()
        if total is None:  # no tokens: the statistics of an empty chunk
            total = loss_fn.sums(hidden.new_zeros((0, weight.shape[0]), dtype=torch.float32), slice(0, 0))
        # kept on ctx, not saved for backward: backward scales them in place (no second copy of
        # the [V, D] weight gradient) and hands them over, so the node runs backward once only
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(total)
        return loss_fn.combine(total), total

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grads is None:
            raise RuntimeError("chunked_linear_loss: backward ran twice (retain_graph is not supported)")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def chunked_linear_loss(
    hidden: torch.Tensor, head: Head, loss_fn: ChunkLoss, chunk_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn`` over the logits of ``hidden`` [N, D], ``chunk_size`` tokens at a time.

    Returns (the differentiable loss, the summed statistics [k], detached). Values and gradients
    equal :func:`naive_linear_loss` on full logits.
    """
    assert chunk_size >= 1, chunk_size  # loss.chunk_size is checked at start-up
    needs = tuple(
        torch.is_grad_enabled() and x is not None and x.requires_grad
        for x in (hidden, head.weight, head.bias)
    )
    return _ChunkedLinearLoss.apply(hidden, head.weight, head.bias, loss_fn, chunk_size, needs)


def naive_linear_loss(
    hidden: torch.Tensor, head: Head, loss_fn: ChunkLoss
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same with full ``[N, V]`` logits and plain autograd (reference and benchmark)."""
    stats = loss_fn.sums(head.logits(hidden), slice(0, hidden.shape[0]))
    return loss_fn.combine(stats), stats.detach()
