"""Per-token log-probabilities and entropies of given tokens, chunked (no full logits).

What RL losses (GRPO's clipped surrogate, a k3 KL to a reference, an entropy bonus) and the
scoring of given completions consume: for each token, ``log p(target)`` under
``softmax(logits / temperature)`` and optionally the entropy of that distribution.

Two ways in, both chunked like every other loss (``objectives.linear_loss``):
  * :func:`token_logprobs` returns ``[tokens]`` tensors whose backward accepts any per-token
    gradients. Backward recomputes each chunk's logits (one more head matmul than a step that
    keeps full logits, the price of not keeping them).
  * :func:`per_token_loss` takes the per-token function of the loss up front (``fn``: log-probs
    and entropies of a chunk -> summed statistics) and differentiates it chunk by chunk in the
    forward pass, as the CE does: no recomputation. GRPO's loss is such a function.
Both equal :func:`naive_token_logprobs` on full logits in values and gradients.

With y = logits / T, p = softmax(y), l = log p and H = -sum p l, the gradients are
d l_target / dy = onehot - p and dH / dy = -p (l + H); d / d logits = (d / dy) / T.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_bluelm.objectives.linear_loss import (
    ChunkSize,
    GradSinks,
    Head,
    Scratch,
    chunk_rows,
    chunked_linear_loss,
    head_chunks,
    head_dtype,
    needs_of,
    row_dot,
)


class TokenLogprobs(NamedTuple):
    logprobs: torch.Tensor  # [N] log p(target) at logits / temperature
    entropy: Optional[torch.Tensor]  # [N] entropy of softmax(logits / temperature), if asked


# A chunk's per-token function: (log-probs [n], entropies [n] or None, rows) -> statistics [k]
TokenFn = Callable[[torch.Tensor, Optional[torch.Tensor], slice], torch.Tensor]


def _check(hidden: torch.Tensor, head: Head, targets: torch.Tensor, temperature: float) -> None:
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match {hidden.shape[0]} hidden states")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < head.weight.shape[0]:
        raise ValueError(f"target ids must lie in [0, {head.weight.shape[0]})")


class _Chunk(NamedTuple):
    """One chunk's per-token statistics and what their gradient needs."""

    logprobs: torch.Tensor  # [n]
    entropy: Optional[torch.Tensor]  # [n]
    log_sums: torch.Tensor  # [n] log sum exp(y - max y)
    exp: Optional[torch.Tensor]  # exp(y - max y) [n, V] (with entropy; else it replaced y)


def _chunk_stats_(z: torch.Tensor, targets, temperature: float, entropy: bool, scratch: Scratch) -> _Chunk:
    """Per-token log-probs (and entropies) of the logits ``z`` [n, V]; ``z`` becomes
    y - max y (with ``entropy``, its exp goes to scratch buffer 1) or exp(y - max y) (without)."""
    picked = z.gather(1, targets[:, None]).squeeze(1)
    top = z.amax(1)
    y = z.sub_(top[:, None])
    if temperature != 1.0:
        y.div_(temperature)
    if entropy:
        e = torch.exp(y, out=scratch.get(1, z.shape[0]))
        sums = e.sum(1)
        log_sums = sums.log()
        ent = log_sums - row_dot(e, y) / sums
    else:
        e, ent = None, None
        log_sums = y.exp_().sum(1).log()
    logprobs = (picked - top) / temperature - log_sums
    return _Chunk(logprobs, ent, log_sums, e)


def _grad_(z: torch.Tensor, chunk: _Chunk, targets, temperature: float, g_lp, g_ent) -> torch.Tensor:
    """d / d logits in place of ``z`` (as :func:`_chunk_stats_` left it), from the per-token
    gradients ``g_lp`` [n] of the log-probs and ``g_ent`` [n] (or None) of the entropies."""
    scale = 1.0 / temperature
    if chunk.exp is not None:  # z = y - max y; -p (g_lp + g_ent (l + H)) / T
        g_ent = torch.zeros_like(g_lp) if g_ent is None else g_ent
        z.add_((chunk.entropy - chunk.log_sums)[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None])
        z.mul_(chunk.exp).mul_((-scale / chunk.log_sums.exp())[:, None])
    else:  # z = exp(y - max y); -p g_lp / T
        z.mul_((-scale * g_lp / chunk.log_sums.exp())[:, None])
    return z.scatter_add_(1, targets[:, None], (scale * g_lp)[:, None])


# ----------------------------------------------------------------------------- [tokens] tensors


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, entropy, chunk, needs):
        n, (vocab, _) = hidden.shape[0], weight.shape
        dtype = head_dtype(weight)
        rows_per_chunk = chunk_rows(chunk, n, vocab, 2 if entropy else 1)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(logprobs) if entropy else None
        for _, c in head_chunks(hidden, weight, bias, rows_per_chunk, dtype):
            out = _chunk_stats_(c.logits, targets[c.rows], temperature, entropy, c.scratch)
            logprobs[c.rows] = out.logprobs
            if entropy:
                ent[c.rows] = out.entropy
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.settings = (temperature, entropy, rows_per_chunk, dtype, needs)
        if ent is None:
            return logprobs
        return logprobs, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, bias, targets = ctx.saved_tensors
        temperature, entropy, rows_per_chunk, dtype, needs = ctx.settings
        sinks = GradSinks(hidden, Head(weight, bias), needs)
        for head, c in head_chunks(hidden, weight, bias, rows_per_chunk, dtype):  # logits again
            t = targets[c.rows]
            out = _chunk_stats_(c.logits, t, temperature, entropy, c.scratch)
            g_e = g_ent[c.rows].float() if g_ent is not None else None
            sinks.add(
                _grad_(c.logits, out, t, temperature, g_lp[c.rows].float(), g_e), c.hidden, head, c.rows
            )
        grad_h, grad_w, grad_b = sinks.scaled(None, (weight.dtype, bias.dtype if bias is not None else None))
        return grad_h, grad_w, grad_b, None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: ChunkSize = 256,
) -> TokenLogprobs:
    """Per-token log p(``targets``) [N] under softmax(logits / ``temperature``) of ``hidden``
    [N, D] through ``head``, and with ``entropy`` the entropies [N]; differentiable, chunked."""
    _check(hidden, head, targets, temperature)
    needs = needs_of(hidden, head)
    out = _TokenLogprobs.apply(
        hidden, head.weight, head.bias, targets, float(temperature), entropy, chunk_size, needs
    )
    return TokenLogprobs(*out) if entropy else TokenLogprobs(out, None)


def naive_token_logprobs(
    hidden: torch.Tensor, head: Head, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False
) -> TokenLogprobs:
    """The same from full ``[N, V]`` logits and plain autograd (reference and benchmark)."""
    return logits_logprobs(head.logits(hidden), targets, temperature, entropy)


def logits_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
) -> TokenLogprobs:
    """Per-token log-probs (and entropies) of float32 ``logits`` [N, V] by plain autograd-able
    ops: the specification the chunked paths are held to."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    picked = log_p.gather(-1, targets[:, None]).squeeze(-1)
    return TokenLogprobs(picked, -(log_p.exp() * log_p).sum(-1) if entropy else None)


# ----------------------------------------------------------------------------- a per-token loss


class PerTokenLoss:
    """A :class:`~lit_bluelm.objectives.linear_loss.ChunkLoss` from a per-token function: the
    statistics of a chunk are ``fn(log-probs, entropies, rows)``, the loss ``combine(stats)``
    (default: their sum), linear in them."""

    def __init__(
        self,
        targets: torch.Tensor,
        fn: TokenFn,
        temperature: float = 1.0,
        entropy: bool = False,
        combine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.targets, self.fn, self.temperature, self.entropy = targets, fn, float(temperature), entropy
        self._combine = combine
        self.buffers = 2 if entropy else 1

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        return stats.sum() if self._combine is None else self._combine(stats)

    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return self.fn(*logits_logprobs(logits, self.targets[rows], self.temperature, self.entropy), rows)

    def fused_(self, z: torch.Tensor, rows: slice, grad: bool, scratch: Scratch) -> torch.Tensor:
        targets = self.targets[rows]
        out = _chunk_stats_(z, targets, self.temperature, self.entropy, scratch)
        if not grad:
            return self.fn(out.logprobs, out.entropy, rows)
        lp = out.logprobs.requires_grad_(True)
        ent = out.entropy.requires_grad_(True) if out.entropy is not None else None
        with torch.enable_grad():
            stats = self.fn(lp, ent, rows)
            grads = torch.autograd.grad(
                self.combine(stats), [lp] + ([ent] if ent is not None else []), allow_unused=True
            )
        g_lp, g_ent = grads[0], grads[1] if len(grads) > 1 else None
        g_lp = torch.zeros_like(out.logprobs) if g_lp is None else g_lp
        _grad_(z, out, targets, self.temperature, g_lp, g_ent)
        return stats.detach()


def per_token_loss(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    fn: TokenFn,
    temperature: float = 1.0,
    entropy: bool = False,
    combine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    chunk_size: ChunkSize = 256,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A loss that is a per-token function of log-probs (and entropies), differentiated chunk by
    chunk: (the differentiable ``combine(sum of fn over chunks)``, the summed statistics)."""
    _check(hidden, head, targets, temperature)
    return chunked_linear_loss(
        hidden, head, PerTokenLoss(targets, fn, temperature, entropy, combine), chunk_size
    )
