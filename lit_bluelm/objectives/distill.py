"""Logit distillation: the ``distill`` config section and the CE + KD loss on chunked logits.

Loss = ``alpha`` * CE + (1 - ``alpha``) * T^2 * KL at temperature T, every term a mean over the
counted tokens. KL is forward, KL(teacher || student), or reverse, KL(student || teacher). With
``top_k`` only the teacher's k largest logits per token are kept (renormalised): the forward KL
then compares them with the student's full-vocabulary log-probabilities, the reverse KL
renormalises the student over the same k tokens. The teacher's logits are computed chunk by
chunk beside the student's (``objectives.linear_loss``), so neither ever exists in full.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from lit_bluelm.errors import ConfigError, at_least, choice, in_range
from lit_bluelm.objectives.linear_loss import (
    ChunkSize,
    Head,
    Scratch,
    chunked_linear_loss,
    naive_linear_loss,
    row_dot,
)
from lit_bluelm.objectives.lm import LossParts, TokenCE, ce_grad_, shift_and_select, token_ce


@dataclass
class KDOptions:
    """What the KD math needs (the ``distill`` section's loss options)."""

    alpha: float = 0.5  # loss = alpha * CE + (1 - alpha) * T^2 * KL
    temperature: float = 1.0
    reverse: bool = False  # KL(student || teacher) instead of KL(teacher || student)
    top_k: Optional[int] = None  # keep only the teacher's k largest logits per token

    @classmethod
    def of(cls, section: Any) -> KDOptions:
        """The KD options of a ``distill`` config section."""
        return cls(**{f.name: section[f.name] for f in fields(cls)})


@dataclass
class DistillConfig(KDOptions):
    """The ``distill`` section (``module: distill``): the KD options plus the teacher."""

    # configs/model preset name (random init: smoke tests only), a local Hugging Face model
    # directory, or a lit-bluelm checkpoint file (its saved config says how to build the LLM)
    teacher: Optional[str] = None
    quantize: str = "none"  # none | 8bit | 4bit (bitsandbytes; GPU and a Hugging Face teacher)
    # Minitron-style pruning init: the student's LLM is cut out of the teacher's
    init_from_teacher: bool = False
    keep_layers: Optional[List[int]] = None  # teacher layers to keep; default: the most important
    calibration_batches: int = 8  # training batches that measure layer/head/channel importance

    @staticmethod
    def check(cfg: Any) -> None:
        d = cfg.distill
        choice(cfg, "distill.quantize", ("none", "8bit", "4bit"))
        in_range(cfg, "distill.alpha", 0.0, 1.0)
        if not d.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {d.temperature}")
        at_least(cfg, "distill.top_k", 1, allow_none=True)
        at_least(cfg, "distill.calibration_batches", 1)
        if d.init_from_teacher and cfg.init_from:
            raise ConfigError(
                "distill.init_from_teacher and init_from both set the starting weights: pick one"
            )
        if d.init_from_teacher and cfg.module != "distill":
            raise ConfigError(f"distill.init_from_teacher needs module=distill, not {cfg.module}")
        if d.keep_layers is not None and not d.init_from_teacher:
            raise ConfigError("distill.keep_layers only applies with distill.init_from_teacher=true")
        if d.init_from_teacher and d.quantize != "none":
            raise ConfigError("distill.init_from_teacher copies teacher weights: use distill.quantize=none")
        # what distill.teacher points at is checked at start-up (lit_bluelm.startup)


def kd_sum(logits: torch.Tensor, teacher_logits: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """Summed T^2-scaled KL over the rows of float32 ``logits`` and ``teacher_logits`` [N, V]."""
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
    return kl * (t * t)


class CEWithKD:
    """A ChunkLoss: statistics [CE sum, KD sum]; the teacher's logits are made per chunk."""

    buffers = 3  # student logits, teacher logits, one scratch

    def __init__(
        self, targets: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: Head, opts: KDOptions
    ):
        self.targets, self.teacher_hidden, self.teacher_head, self.opts = (
            targets,
            teacher_hidden,
            teacher_head,
            opts,
        )

    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher_head.logits(self.teacher_hidden[rows])
        return torch.stack([token_ce(logits, self.targets[rows]).sum(), kd_sum(logits, t_logits, self.opts)])

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        return (self.opts.alpha * stats[0] + (1.0 - self.opts.alpha) * stats[1]) / max(
            self.targets.shape[0], 1
        )

    def fused_(self, z: torch.Tensor, rows: slice, grad: bool, scratch: Scratch) -> torch.Tensor:
        """:meth:`sums` and the gradient of :meth:`combine` in place of ``z``, written out:
        d CE / dz = softmax(z) - onehot; with q = softmax(z / T), p the teacher's, T^2 KL(p||q)
        gives T (q - p) and T^2 KL(q||p) gives T q (log q - log p - KL) (top-k: on the teacher's
        support, see :func:`kd_sum`)."""
        n, opts = z.shape[0], self.opts
        t = opts.temperature
        targets = self.targets[rows]
        u = self.teacher_head.project_(scratch.get(1, n), self.teacher_hidden[rows])
        picked = z.gather(1, targets[:, None]).squeeze(1)
        top = z.amax(1, keepdim=True)
        b = z.sub_(top).div_(t)  # student logits / T, max 0 (so exp(T b) = exp(z - max))
        scale = 1.0 / max(self.targets.shape[0], 1)
        w_ce, w_kd = opts.alpha * scale, (1.0 - opts.alpha) * scale * t  # d combine / d (CE, KD/T)
        if opts.top_k is None:
            kl, e_b, g_kd = _full_kd_(b, u, scratch.get(2, n), t, opts.reverse)
        else:
            kl, e_b, g_kd = _top_k_kd_(b, u, lambda: scratch.get(2, n), t, opts)
        # CE needs exp(z - max) = exp(T b): the student's exp at T = 1 exists already
        e = e_b if t == 1.0 and e_b is not None else b.mul_(t).exp_()
        sums = e.sum(1)
        ce = top.squeeze(1) + sums.log() - picked
        stats = torch.stack([ce.sum(), kl.sum() * (t * t)])
        if not grad:
            return stats
        if e is not z:
            z.copy_(e)
        ce_grad_(z, sums, targets, w_ce)
        g_kd(z, w_kd)
        return stats


def _full_kd_(b, u, s, t, reverse):
    """KL rows [n] over the whole vocabulary from student ``b`` = z / T - max (kept) and teacher
    logits ``u`` and scratch ``s`` (both overwritten). Returns (KL rows, exp(b) if it is kept
    in a buffer else None, ``add(g, weight)``: adds ``weight`` x d KL / d b to ``g``)."""
    a = u.sub_(u.amax(1, keepdim=True)).div_(t)  # teacher logits / T, max 0
    log_st = torch.exp(a, out=s).sum(1).log()  # s = exp(a)
    if not reverse:  # KL(p || q) = sum p (a - b) - log St + log Ss; d / db = q - p
        dot = row_dot(s, a.sub_(b))  # sum exp(a) (a - b)
        e_b = torch.exp(b, out=u)
        sum_b = e_b.sum(1)
        kl = dot / log_st.exp() - log_st + sum_b.log()

        def add(g, weight):
            g.addcmul_(e_b, (weight / sum_b)[:, None])
            g.addcmul_(s, (-weight / log_st.exp())[:, None])

        return kl, e_b, add
    # KL(q || p) = sum q (b - a) - log Ss + log St; d / db = q (b - a - log Ss + log St - KL)
    r = torch.sub(b, a, out=u)
    e_b = torch.exp(b, out=s)
    sum_b = e_b.sum(1)
    kl = row_dot(e_b, r) / sum_b - sum_b.log() + log_st

    def add(g, weight):
        r.add_((log_st - sum_b.log() - kl)[:, None]).mul_(e_b)
        g.addcmul_(r, (weight / sum_b)[:, None])

    return kl, e_b, add


def _top_k_kd_(b, u, spare, t, opts):
    """:func:`_full_kd_` with the teacher's ``opts.top_k`` largest logits (renormalised);
    ``spare()`` gives the scratch buffer, which only the forward KL needs."""
    k = min(opts.top_k, u.shape[1])
    values, index = u.topk(k, dim=1)
    log_p = F.log_softmax(values / t, dim=1)  # [n, k]
    p = log_p.exp()
    b_k = b.gather(1, index)
    if not opts.reverse:  # q over the whole vocabulary: KL = sum p log p - sum p b_k + log Ss
        e_b = torch.exp(b, out=spare())
        sum_b = e_b.sum(1)
        kl = (p * (log_p - b_k)).sum(1) + sum_b.log()

        def add(g, weight):  # d / db = q - p on the support
            g.addcmul_(e_b, (weight / sum_b)[:, None])
            g.scatter_add_(1, index, p * -weight)

        return kl, e_b, add
    log_q = F.log_softmax(b_k, dim=1)  # the student renormalised over the support
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum(1)

    def add(g, weight):  # d / db_k = q (log q - log p - KL)
        g.scatter_add_(1, index, q * (log_q - log_p - kl[:, None]) * weight)

    return kl, None, add


def _loss_fn(hidden, head, targets, teacher_hidden, teacher_head, opts):
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head come together")
    if teacher_hidden is None:
        return TokenCE(targets)
    if teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher has {teacher_hidden.shape[0]} tokens, student {hidden.shape[0]}")
    if teacher_head.weight.shape[0] != head.weight.shape[0]:
        raise ValueError(
            f"teacher vocabulary {teacher_head.weight.shape[0]} != student vocabulary {head.weight.shape[0]}"
        )
    teacher_head = Head(*(x.detach() if x is not None else None for x in teacher_head))
    return CEWithKD(targets, teacher_hidden.detach(), teacher_head, opts)


def _parts(loss: torch.Tensor, stats: torch.Tensor, n: int, device) -> LossParts:
    kd = stats[1] / max(n, 1) if stats.shape[0] > 1 else stats.new_zeros(())
    return LossParts(loss, stats[0] / max(n, 1), kd, torch.tensor(n, device=device))


def distill_linear_loss(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    opts: KDOptions = KDOptions(),
    chunk_size: ChunkSize = 1024,
) -> LossParts:
    """CE (+ KD) of ``hidden`` [N, D] against ``targets`` [N] (all counted), chunk by chunk.

    ``teacher_hidden`` [N, Dt] and ``teacher_head`` give the teacher's logits; without them the
    loss is plain CE. Values and gradients match :func:`naive_distill_loss`."""
    fn = _loss_fn(hidden, head, targets, teacher_hidden, teacher_head, opts)
    loss, stats = chunked_linear_loss(hidden, head, fn, chunk_size)
    return _parts(loss, stats, hidden.shape[0], hidden.device)


def naive_distill_loss(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    opts: KDOptions = KDOptions(),
) -> LossParts:
    """The same loss with full ``[N, V]`` logits and plain autograd (reference and benchmark)."""
    fn = _loss_fn(hidden, head, targets, teacher_hidden, teacher_head, opts)
    loss, stats = naive_linear_loss(hidden, head, fn)
    return _parts(loss, stats, hidden.shape[0], hidden.device)


def distill_head_loss(
    labels: torch.Tensor,
    chunk_size: ChunkSize,
    teacher_hidden: torch.Tensor,
    teacher_head: Head,
    opts: KDOptions,
):
    """A ``head_fn`` for ``BlueLM.forward``: next-token CE + KD against the teacher's final
    hidden states ``teacher_hidden`` [B, T, Dt], chunk by chunk. Returns :class:`LossParts`."""

    def head_fn(hidden: torch.Tensor, head: torch.nn.Linear) -> LossParts:
        targets, h, th = shift_and_select(labels, hidden, teacher_hidden)
        return distill_linear_loss(
            h, Head(head.weight, head.bias), targets, th, teacher_head, opts, chunk_size
        )

    return head_fn
