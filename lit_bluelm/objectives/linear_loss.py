"""The output projection and a loss over its logits, computed in chunks of tokens.

With a 150k vocabulary the ``[tokens, vocab]`` float32 logits are the memory peak of a step (and
distillation doubles them). Here the projection, the loss and its gradient with respect to the
logits run one chunk of tokens at a time inside one autograd node: a chunk's logits exist only
while it is processed, and the gradients of the hidden states, of the output weight and of its
bias are accumulated chunk by chunk during the forward pass (nothing is recomputed in backward).

What is computed on each chunk's logits is a :class:`ChunkLoss`, an objective's own code:
next-token CE (``objectives.lm``), CE + KD (``objectives.distill``), per-token log-probabilities
(``objectives.token_logprobs``). A ChunkLoss returns differentiable per-chunk *sums* of its
statistics and a ``combine`` that is linear in them, so the total loss is ``combine(sum over
chunks)`` and its gradient is the sum of the chunks' gradients. ``sums`` is the specification
(the naive reference runs it on full logits). A ChunkLoss may also offer ``fused_``: the same
statistics and, in place in the chunk's logit buffer, their gradient written out analytically,
a handful of passes over ``[chunk, V]`` instead of autograd's dozens; without it the node
differentiates ``sums`` chunk by chunk.

The chunk loop keeps its operands in the layouts BLAS wants: a chunk's logits are written by one
matmul ``W @ h.T`` into a ``[V, chunk]`` buffer reused by every chunk (20-40% faster on CPU than
``h @ W.T`` into ``[chunk, V]``, and a fresh 150 MB tensor per chunk costs more in page faults
than its exp); the losses see it as its ``[chunk, V]`` transpose (row-wise passes run as fast on
it). The hidden-state gradient rows are written by another matmul straight into their place and
the ``[V, D]`` weight gradient accumulates in its own layout (``addmm_`` of the ``[V, chunk]``
logit gradient and the chunk's hidden states; the first chunk writes it, nothing is zeroed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, NamedTuple, Optional, Protocol, Tuple, Union

import torch
import torch.nn.functional as F

from lit_bluelm.errors import ConfigError, at_least

AUTO = "auto"
MIB = 2**20
ALIGN = 64  # rows of an auto chunk


@dataclass
class LossConfig:
    """The ``loss`` section: how the output projection is chunked (every stage)."""

    # tokens per chunk of the output projection + loss, or auto: as many as fit
    # loss.chunk_memory_mb of float32 [tokens, vocab] logit buffers (a loss needs 1-3)
    chunk_size: Any = AUTO
    chunk_memory_mb: int = 256  # the logit buffers' budget with chunk_size=auto

    @staticmethod
    def check(cfg) -> None:
        size = cfg.loss.chunk_size
        if not (size == AUTO or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)):
            raise ConfigError(f"loss.chunk_size: expected a token count >= 1 or auto, got {size!r}")
        at_least(cfg, "loss.chunk_memory_mb", 1)


@dataclass(frozen=True)
class Chunking:
    """How many tokens a chunk holds: ``size``, or (``size=None``) as many as fit ``memory_mb``
    of float32 logit buffers."""

    size: Optional[int]
    memory_mb: int = LossConfig.chunk_memory_mb

    @classmethod
    def of(cls, section: Any) -> Chunking:
        """The chunking a ``loss`` config section asks for."""
        size = section.chunk_size
        return cls(None if size == AUTO else int(size), int(section.chunk_memory_mb))

    def rows(self, tokens: int, vocab: int, buffers: int) -> int:
        """Tokens per chunk for ``tokens`` rows of a ``vocab`` head with ``buffers`` logit buffers."""
        if self.size is not None:
            return self.size
        tokens = max(tokens, 1)
        fit = max(1, self.memory_mb * MIB // (4 * vocab * max(buffers, 1)))
        chunks = -(-tokens // fit)  # as few as fit, of equal size (no small last chunk) ...
        rows = -(-tokens // chunks)
        # ... in multiples of 64 rows where that fits: BLAS runs 15% slower on 255 rows than 256
        aligned = -(-rows // ALIGN) * ALIGN
        if aligned <= fit:
            return min(aligned, tokens)
        return fit // ALIGN * ALIGN if fit >= ALIGN else rows


ChunkSize = Union[int, Chunking]


def chunk_rows(chunk: ChunkSize, tokens: int, vocab: int, buffers: int) -> int:
    rows = chunk.rows(tokens, vocab, buffers) if isinstance(chunk, Chunking) else int(chunk)
    assert rows >= 1, rows  # loss.chunk_size is checked at start-up
    return rows


class Head(NamedTuple):
    """An output projection: logits = hidden @ weight.T + bias. ``weight`` [V, D], ``bias`` [V]."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, V] (the matmul runs in the weight's dtype, as the model's head would)."""
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()

    def project_(self, out: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` written into ``out`` [N, V], the float32 transposed view of a
        :class:`Scratch` buffer (one matmul, no copy when everything is float32)."""
        out_t = out.t()  # [V, N], contiguous
        if self.weight.dtype == torch.float32 and hidden.dtype == torch.float32:
            torch.mm(self.weight, hidden.t(), out=out_t)
        else:
            out_t.copy_(self.weight @ hidden.to(self.weight.dtype).t())
        if self.bias is not None:
            out_t.add_(self.bias[:, None])
        return out


class Scratch:
    """float32 buffers for ``rows`` x ``V`` values reused by every chunk of one chunked loss,
    handed out as ``[n, V]`` transposed views of contiguous ``[V, n]`` storage (see the module
    docstring); buffer 0 holds the chunk's logits, a ChunkLoss's ``fused_`` may use the others."""

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.rows, self.vocab, self.device = rows, vocab, device
        self._buffers: Dict[int, torch.Tensor] = {}

    def get(self, index: int, n: int) -> torch.Tensor:
        buf = self._buffers.get(index)
        if buf is None:
            buf = self._buffers[index] = torch.empty(
                self.rows * self.vocab, dtype=torch.float32, device=self.device
            )
        return buf[: self.vocab * n].view(self.vocab, n).t()


def exp_shifted_(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Overwrites the rows of ``z`` [n, V] with ``exp(z - max)``; returns (logsumexp [n], the
    rows' sums of ``exp(z - max)`` [n]). Four passes over ``z`` (``torch.logsumexp`` is ~5x slower
    on CPU)."""
    top = z.amax(1, keepdim=True)
    sums = z.sub_(top).exp_().sum(1)
    return top.squeeze(1) + sums.log(), sums


def row_dot(a: torch.Tensor, b: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """``(a * b).sum(1)`` for [n, V] tensors (any strides) without an [n, V] product: the
    vocabulary in blocks."""
    out = a.new_zeros(a.shape[0])
    for start in range(0, a.shape[1], block):
        out += (a[:, start : start + block] * b[:, start : start + block]).sum(1)
    return out


class ChunkLoss(Protocol):
    def sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Differentiable sums [k] of the loss statistics over float32 ``logits`` [n, V], the
        rows ``rows`` of the whole input."""

    def combine(self, stats: torch.Tensor) -> torch.Tensor:
        """The scalar loss from summed statistics [k]; must be linear in ``stats``."""

    # Optional fast path (see the module docstring):
    #   buffers: int  -- float32 [chunk, V] buffers fused_ uses, the logits' own included
    #   def fused_(self, logits, rows, grad: bool, scratch: Scratch) -> torch.Tensor:
    #       the statistics [k] of ``sums`` (detached); ``logits`` may be overwritten, and with
    #       ``grad`` holds d combine(stats) / d logits on return.


def chunk_stats_(
    loss_fn: ChunkLoss, z: torch.Tensor, rows: slice, grad: bool, scratch: Scratch
) -> torch.Tensor:
    """``loss_fn``'s statistics of the chunk logits ``z``; with ``grad``, ``z`` is overwritten by
    the gradient of ``combine`` with respect to it."""
    fused = getattr(loss_fn, "fused_", None)
    if fused is not None:
        return fused(z, rows, grad, scratch)
    if not grad:
        return loss_fn.sums(z, rows)
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        stats = loss_fn.sums(leaf, rows)
        (g,) = torch.autograd.grad(loss_fn.combine(stats), leaf)
    z.copy_(g)
    return stats.detach()


def head_dtype(weight: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's when it is on (as the model's own head would), else
    the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class GradSinks:
    """The gradients of hidden states, weight and bias, filled chunk by chunk from d loss / d
    chunk logits (weight and bias accumulate in float32)."""

    def __init__(self, hidden, head: Head, needs) -> None:
        need_h, need_w, need_b = needs
        # every row is written once, by its own chunk; weight and bias by the first chunk first
        self.h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        self.w = (
            torch.empty(head.weight.shape, dtype=torch.float32, device=head.weight.device) if need_w else None
        )
        self.b = (
            torch.empty(head.bias.shape, dtype=torch.float32, device=head.bias.device) if need_b else None
        )
        self.started = False

    def add(self, g: torch.Tensor, h: torch.Tensor, head: Head, rows: slice) -> None:
        """Adds the chunk ``rows`` with hidden states ``h`` and logit gradient ``g`` (float32)."""
        w = head.weight
        if self.h is not None:
            out = self.h[rows]
            if out.dtype == w.dtype == torch.float32:
                torch.mm(g, w, out=out)
            else:
                out.copy_(g.to(w.dtype) @ w)
        first, self.started = not self.started, True
        if self.w is not None:
            h32 = h if h.dtype == torch.float32 else h.float()
            if first:
                torch.mm(g.t(), h32, out=self.w)
            else:
                self.w.addmm_(g.t(), h32)
        if self.b is not None:
            if first:
                torch.sum(g, 0, out=self.b)
            else:
                self.b.add_(g.sum(0))

    def scaled(self, grad_out: Optional[torch.Tensor], dtypes) -> Tuple[Optional[torch.Tensor], ...]:
        """The gradients times the upstream ``grad_out`` (None: as they are), in place, cast to
        ``dtypes`` (weight, bias)."""
        if not self.started:  # no tokens: zero gradients
            for g in (self.w, self.b):
                if g is not None:
                    g.zero_()
        grads = [self.h, self.w, self.b]
        if grad_out is not None:
            grads = [g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads]
        h, w, b = grads
        return h, w.to(dtypes[0]) if w is not None else None, b.to(dtypes[1]) if b is not None else None


class Chunk(NamedTuple):
    rows: slice  # the chunk's rows of the whole input
    hidden: torch.Tensor  # [n, D] in the matmul's dtype
    logits: torch.Tensor  # [n, V] float32, a Scratch buffer 0 view
    scratch: Scratch


def head_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows_per_chunk: int, dtype
) -> Iterator[Tuple[Head, Chunk]]:
    """Each chunk of ``hidden`` [N, D] with its logits through (``weight``, ``bias``) in
    ``dtype``, autocast off while the caller works on it; casts happen once, not per chunk.
    Yields (the cast head, the :class:`Chunk`)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        head = Head(weight.to(dtype), bias.to(dtype) if bias is not None else None)
        x = hidden.to(dtype)
        scratch = Scratch(min(rows_per_chunk, max(n, 1)), vocab, hidden.device)
        for start in range(0, n, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            h = x[rows]
            yield head, Chunk(rows, h, head.project_(scratch.get(0, h.shape[0]), h), scratch)


def needs_of(hidden: torch.Tensor, head: Head) -> Tuple[bool, bool, bool]:
    """Which of hidden, weight, bias need gradients (``ctx.needs_input_grad`` stays True under
    no_grad, so the nodes are told)."""
    return tuple(
        torch.is_grad_enabled() and x is not None and x.requires_grad
        for x in (hidden, head.weight, head.bias)
    )


class _ChunkedLinearLoss(torch.autograd.Function):
    """One autograd node for head projection + loss; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_fn, chunk, needs):
        n, (vocab, _) = hidden.shape[0], weight.shape
        dtype = head_dtype(weight)
        wants_grad = any(needs)  # False in validation: statistics only, no gradient buffers
        rows_per_chunk = chunk_rows(chunk, n, vocab, getattr(loss_fn, "buffers", 1))
        sinks = GradSinks(hidden, Head(weight, bias), needs)
        total = None
        for head, c in head_chunks(hidden, weight, bias, rows_per_chunk, dtype):
            stats = chunk_stats_(loss_fn, c.logits, c.rows, wants_grad, c.scratch)
            if wants_grad:
                sinks.add(c.logits, c.hidden, head, c.rows)
            total = stats if total is None else total + stats
        if total is None:  # no tokens: the statistics of an empty chunk
            total = loss_fn.sums(hidden.new_zeros((0, vocab), dtype=torch.float32), slice(0, 0)).detach()
        # kept on ctx, not saved for backward: backward scales them in place (no second copy of
        # the [V, D] weight gradient) and hands them over, so the node runs backward once only
        ctx.sinks = sinks
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(total)
        return loss_fn.combine(total), total

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.sinks is None:
            raise RuntimeError("chunked_linear_loss: backward ran twice (retain_graph is not supported)")
        sinks, ctx.sinks = ctx.sinks, None
        return (*sinks.scaled(grad_loss, ctx.dtypes), None, None, None)


def chunked_linear_loss(
    hidden: torch.Tensor, head: Head, loss_fn: ChunkLoss, chunk_size: ChunkSize
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn`` over the logits of ``hidden`` [N, D], ``chunk_size`` tokens at a time (an int
    or a :class:`Chunking`).

    Returns (the differentiable loss, the summed statistics [k], detached). Values and gradients
    equal :func:`naive_linear_loss` on full logits.
    """
    needs = needs_of(hidden, head)
    return _ChunkedLinearLoss.apply(hidden, head.weight, head.bias, loss_fn, chunk_size, needs)


def naive_linear_loss(
    hidden: torch.Tensor, head: Head, loss_fn: ChunkLoss
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same with full ``[N, V]`` logits and plain autograd (reference and benchmark)."""
    stats = loss_fn.sums(head.logits(hidden), slice(0, hidden.shape[0]))
    return loss_fn.combine(stats), stats.detach()
