"""Cross-entropy and logit distillation computed from hidden states, in chunks of tokens.

With a 150k vocabulary the ``[tokens, vocab]`` float32 logits are the memory peak of a step, and
distillation doubles them (student and teacher) and their softmax intermediates. Here the
output projection, the losses and their gradient with respect to the logits run one chunk of
tokens at a time inside one autograd node: each chunk's logits exist only while that chunk is
processed, and the gradients of the hidden states, of the output weight and of its bias are
accumulated chunk by chunk during the forward pass (nothing is recomputed in backward).

Loss = ``alpha`` * CE + (1 - ``alpha``) * T^2 * KL at temperature T, every term a mean over the
counted tokens. KL is forward, KL(teacher || student), or reverse, KL(student || teacher). With
``top_k`` only the teacher's k largest logits per token are kept (renormalised): the forward KL
then compares them with the student's full-vocabulary log-probabilities, the reverse KL
renormalises the student over the same k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_bluelm.objectives.lm import IGNORE_INDEX


@dataclass(frozen=True)
class KDOptions:
    alpha: float = 0.5  # weight of CE; 1 - alpha goes to the distillation term
    temperature: float = 1.0
    reverse: bool = False  # KL(student || teacher) instead of KL(teacher || student)
    top_k: Optional[int] = None  # keep only the teacher's k largest logits per token


class Head(NamedTuple):
    """An output projection: logits = hidden @ weight.T + bias. ``weight`` [V, D], ``bias`` [V]."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, V] (the matmul runs in the weight's dtype, as the model's head would)."""
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()


class LossParts(NamedTuple):
    loss: torch.Tensor  # what is optimised (differentiable)
    ce: torch.Tensor  # mean CE (detached)
    kd: torch.Tensor  # mean T^2-scaled KL (detached; 0 without a teacher)
    count: torch.Tensor  # number of counted tokens


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE [N] of float32 ``logits`` [N, V], as logsumexp - target logit: no [N, V]
    log-probabilities are kept for backward."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)


def ce_kd_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    opts: KDOptions = KDOptions(),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and summed T^2-scaled KL over the rows of float32 ``logits`` [N, V].

    ``targets`` [N] are all counted (selection happens before); ``teacher_logits`` [N, V] or None.
    """
    ce = token_ce(logits, targets).sum()
    if teacher_logits is None:
        return ce, logits.new_zeros(())
    t = opts.temperature
    with torch.no_grad():
        teacher = teacher_logits / t
        if opts.top_k is not None:
            teacher, index = teacher.topk(min(opts.top_k, teacher.shape[-1]), dim=-1)
        log_p = F.log_softmax(teacher, dim=-1)
        del teacher
    student = logits / t
    if opts.top_k is not None and opts.reverse:  # the student renormalised over the teacher's support
        log_q = F.log_softmax(student.gather(-1, index), dim=-1)
    elif opts.top_k is not None:
        log_q = F.log_softmax(student, dim=-1).gather(-1, index)
    else:
        log_q = F.log_softmax(student, dim=-1)
    del student
    if opts.reverse:  # sum q (log q - log p)
        kl = (log_q.exp() * (log_q - log_p)).sum()
    else:  # sum p log p - sum p log q, the first term constant; vdot keeps no [N, V] product
        p = log_p.exp()
        kl = torch.vdot(p.flatten(), log_p.flatten()) - torch.vdot(p.flatten(), log_q.flatten())
    return ce, kl * (t * t)


def _combine(ce: torch.Tensor, kd: torch.Tensor, count: int, opts: KDOptions, teacher: bool) -> torch.Tensor:
    if not teacher:
        return ce / max(count, 1)
    return (opts.alpha * ce + (1.0 - opts.alpha) * kd) / max(count, 1)


class _ChunkedLinearLoss(torch.autograd.Function):
    """One autograd node for head projection + losses; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_hidden, teacher_head, opts, chunk_size, needs):
        n = hidden.shape[0]
        device = hidden.device.type
        # the head matmuls run in the autocast dtype when autocast is on (as the model's own head
        # would); casts happen once here, not per chunk, and autocast is off for the explicit ops
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        # (needs, not ctx.needs_input_grad: that stays True under no_grad)
        need_h, need_w, need_b = needs
        wants_grad = any(needs)  # False in validation: sums only, no gradient buffers
        with torch.autocast(device, enabled=False):
            head = Head(weight.to(dtype), bias.to(dtype) if bias is not None else None)
            has_teacher = teacher_hidden is not None
            if has_teacher:
                teacher_head = Head(*(x.to(dtype) if x is not None else None for x in teacher_head))
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            ce_total = hidden.new_zeros((), dtype=torch.float32)
            kd_total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, n, chunk_size):
                stop = start + chunk_size
                h = hidden[start:stop]
                t_logits = teacher_head.logits(teacher_hidden[start:stop]) if has_teacher else None
                logits = head.logits(h).requires_grad_(wants_grad)  # a leaf of this chunk's graph
                with torch.set_grad_enabled(wants_grad):
                    ce, kd = ce_kd_sums(logits, targets[start:stop], t_logits, opts)
                    del t_logits  # not needed by the chunk's backward
                    if wants_grad:
                        part = _combine(ce, kd, n, opts, has_teacher)
                        (g,) = torch.autograd.grad(part, logits)  # d loss / d chunk logits [n_chunk, V]
                del logits
                if need_h:
                    grad_h[start:stop] = g.to(dtype) @ head.weight
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
                if need_b:
                    grad_b += g.sum(0)
                ce_total += ce.detach()
                kd_total += kd.detach()
        loss = _combine(ce_total, kd_total, n, opts, has_teacher)
        # kept on ctx, not saved for backward: backward scales them in place (no second copy of
        # the [V, D] weight gradient) and hands them over, so the node runs backward once only
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ce_mean, kd_mean = ce_total / max(n, 1), kd_total / max(n, 1)
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return loss, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
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
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def chunked_linear_loss(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    opts: KDOptions = KDOptions(),
    chunk_size: int = 1024,
) -> LossParts:
    """CE (+ KD) of ``hidden`` [N, D] against ``targets`` [N] (all counted), chunk by chunk.

    ``teacher_hidden`` [N, Dt] and ``teacher_head`` give the teacher's logits; without them the
    loss is plain CE. Gradients match the naive computation on full logits (``naive_linear_loss``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head come together")
    if teacher_hidden is not None and teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher has {teacher_hidden.shape[0]} tokens, student {hidden.shape[0]}")
    if teacher_head is not None and teacher_head.weight.shape[0] != head.weight.shape[0]:
        raise ValueError(
            f"teacher vocabulary {teacher_head.weight.shape[0]} != student vocabulary {head.weight.shape[0]}"
        )
    teacher_hidden = teacher_hidden.detach() if teacher_hidden is not None else None
    if teacher_head is not None:
        teacher_head = Head(*(x.detach() if x is not None else None for x in teacher_head))
    needs = tuple(
        torch.is_grad_enabled() and x is not None and x.requires_grad
        for x in (hidden, head.weight, head.bias)
    )
    loss, ce, kd = _ChunkedLinearLoss.apply(
        hidden, head.weight, head.bias, targets, teacher_hidden, teacher_head, opts, chunk_size, needs
    )
    return LossParts(loss, ce, kd, torch.tensor(hidden.shape[0], device=hidden.device))


def naive_linear_loss(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    opts: KDOptions = KDOptions(),
) -> LossParts:
    """The same loss with full ``[N, V]`` logits and plain autograd (reference and benchmark)."""
    logits = head.logits(hidden)
    t_logits = None
    if teacher_hidden is not None:
        with torch.no_grad():
            t_logits = teacher_head.logits(teacher_hidden)
    ce, kd = ce_kd_sums(logits, targets, t_logits, opts)
    n = hidden.shape[0]
    loss = _combine(ce, kd, n, opts, t_logits is not None)
    return LossParts(loss, ce.detach() / max(n, 1), kd.detach() / max(n, 1), torch.tensor(n))


def shift_and_select(labels: torch.Tensor, *hidden: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Next-token targets: position t predicts ``labels[:, t + 1]``. Returns the counted targets
    [N] followed by each ``hidden`` [B, T, D] reduced to the same N positions [N, D]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return (targets[keep], *(h[:, :-1][keep] for h in hidden))


def next_token_head_loss(
    labels: torch.Tensor,
    chunk_size: int,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    opts: KDOptions = KDOptions(),
):
    """A ``head_fn`` for ``BlueLM.forward``: next-token CE (+ KD against ``teacher_hidden``
    [B, T, Dt]) of the final hidden states, computed chunk by chunk. Returns :class:`LossParts`."""

    def head_fn(hidden: torch.Tensor, head: torch.nn.Linear) -> LossParts:
        if teacher_hidden is None:
            targets, h = shift_and_select(labels, hidden)
            return chunked_linear_loss(h, Head(head.weight, head.bias), targets, chunk_size=chunk_size)
        targets, h, th = shift_and_select(labels, hidden, teacher_hidden)
        return chunked_linear_loss(
            h, Head(head.weight, head.bias), targets, th, teacher_head, opts, chunk_size
        )

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
