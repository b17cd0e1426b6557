"""The chunked output-head path: per-token mode, the autograd fallback, chunking by memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_bluelm.config import ConfigError, load_config
from lit_bluelm.objectives import (
    Chunking,
    Head,
    KDOptions,
    LossConfig,
    chunked_linear_loss,
    naive_linear_loss,
    naive_token_logprobs,
    per_token_loss,
    row_ce_sums,
    token_logprobs,
)
from lit_bluelm.objectives.distill import CEWithKD
from lit_bluelm.objectives.lm import TokenCE
from lit_bluelm.objectives.token_logprobs import PerTokenLoss


def _inputs(seed=0, n=37, d=16, v=50, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    up = (torch.randn(n, generator=g), torch.randn(n, generator=g))
    return hidden, weight, b, targets, up


def _grads(loss, params):
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in params]


# ----------------------------------------------------------------------------- per-token mode


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_token_logprobs_and_their_gradients_match_the_naive_computation(temperature, entropy, chunk_size):
    hidden, weight, bias, targets, (u, w) = _inputs()
    params = (hidden, weight, bias)
    head = Head(weight, bias)

    def upstream(lp, ent, rows=slice(None)):  # any per-token gradients reach backward
        return ((u[rows] * lp).sum() + ((w[rows] * ent).sum() if ent is not None else 0.0))[None]

    ref = naive_token_logprobs(hidden, head, targets, temperature, entropy)
    ref_grads = _grads(upstream(*ref)[0], params)
    out = token_logprobs(hidden, head, targets, temperature, entropy, chunk_size)
    assert out.logprobs.shape == (37,) and (out.entropy is not None) == entropy
    grads = _grads(upstream(*out)[0], params)
    torch.testing.assert_close(out.logprobs, ref.logprobs.detach())
    if entropy:
        torch.testing.assert_close(out.entropy, ref.entropy.detach())
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the same per-token function, differentiated chunk by chunk in the forward pass
    loss, stats = per_token_loss(hidden, head, targets, upstream, temperature, entropy, chunk_size=chunk_size)
    torch.testing.assert_close(loss.detach(), upstream(*ref)[0].detach())
    for a, b in zip(_grads(2.0 * loss, params), ref_grads, strict=True):
        torch.testing.assert_close(a, 2.0 * b, atol=1e-5, rtol=1e-5)


def test_token_logprobs_under_bf16_autocast_and_without_grad():
    hidden, weight, _, targets, (u, w) = _inputs(seed=3, n=40, v=64, bias=False)
    head = Head(weight)
    with torch.no_grad():  # scoring: values only, nothing kept for backward
        fast = token_logprobs(hidden, head, targets, 0.9, True, chunk_size=7)
    ref = naive_token_logprobs(hidden, head, targets, 0.9, True)
    assert not fast.logprobs.requires_grad
    torch.testing.assert_close(fast.logprobs, ref.logprobs.detach())
    torch.testing.assert_close(fast.entropy, ref.entropy.detach())
    results = []
    for fn, extra in ((token_logprobs, {"chunk_size": 16}), (naive_token_logprobs, {})):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(hidden, head, targets, 0.9, True, **extra)
        loss = (u * out.logprobs).sum() + (w * out.entropy).sum()
        results.append((out.logprobs.detach(), out.entropy.detach(), *_grads(loss, (hidden, weight))))
    assert results[0][0].dtype == torch.float32
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=2e-2)


def test_token_logprobs_hand_made_values():
    head = Head(torch.eye(2))  # logits are the hidden state itself
    hidden = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    out = token_logprobs(hidden, head, torch.tensor([1]), entropy=True)
    assert out.logprobs.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert out.entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    # temperature 2: p = softmax((0, log 3) / 2) = (1, sqrt 3) / (1 + sqrt 3)
    soft = token_logprobs(hidden, head, torch.tensor([0]), temperature=2.0)
    assert soft.logprobs.item() == pytest.approx(-math.log(1 + math.sqrt(3)), abs=1e-6)


def test_token_logprobs_refuses_bad_input():
    hidden, weight, _, targets, _ = _inputs(bias=False)
    with pytest.raises(ValueError, match="target ids"):
        token_logprobs(hidden, Head(weight), targets + 50)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, Head(weight), targets, temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(hidden, Head(weight), targets[:-1])


# ----------------------------------------------------------------------------- fused vs spec


class SpecOnly:
    """A ChunkLoss with ``sums``/``combine`` only: the node differentiates them by autograd."""

    def __init__(self, inner):
        self.inner = inner

    def sums(self, logits, rows):
        return self.inner.sums(logits, rows)

    def combine(self, stats):
        return self.inner.combine(stats)


def _losses(targets, up):
    g = torch.Generator().manual_seed(5)
    t_hidden, t_head = torch.randn(37, 24, generator=g), Head(torch.randn(50, 24, generator=g))
    yield "ce", TokenCE(targets)
    for opts in (KDOptions(alpha=0.3, temperature=1.0), KDOptions(alpha=0.6, temperature=2.0, reverse=True)):
        yield str(opts), CEWithKD(targets, t_hidden, t_head, opts)
    yield "kd top-k", CEWithKD(targets, t_hidden, t_head, KDOptions(alpha=0.5, temperature=1.0, top_k=4))
    token_fn = lambda lp, ent, rows: torch.stack([(up[0][rows] * lp).sum(), (up[1][rows] * ent).sum()])  # noqa: E731
    yield "per-token", PerTokenLoss(targets, token_fn, temperature=1.3, entropy=True)


def test_fused_statistics_and_gradients_equal_autograd_of_the_spec():
    hidden, weight, bias, targets, up = _inputs(seed=4)
    params = (hidden, weight, bias)
    for name, loss_fn in _losses(targets, up):
        assert hasattr(loss_fn, "fused_"), name
        runs = []
        for fn in (loss_fn, SpecOnly(loss_fn)):
            loss, stats = chunked_linear_loss(hidden, Head(weight, bias), fn, chunk_size=5)
            runs.append((loss.detach(), stats, *_grads(loss, params)))
        ref_loss, ref_stats = naive_linear_loss(hidden, Head(weight, bias), loss_fn)
        runs.append((ref_loss.detach(), ref_stats, *_grads(ref_loss, params)))
        for run in runs[1:]:
            for a, b in zip(runs[0], run, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_validation_row_sums_equal_full_logits_and_auto_chunks():
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(3, 11, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (3, 11), generator=g)
    labels[1, :4] = -100
    lin = torch.nn.Linear(8, 40, bias=False)
    lin.weight.data = weight
    ce = F.cross_entropy((hidden[:, :-1] @ weight.T).transpose(1, 2), labels[:, 1:], reduction="none")
    for chunk in (3, Chunking(None, memory_mb=1)):
        sums, counts = row_ce_sums(hidden, lin, labels, chunk)
        torch.testing.assert_close(sums, ce.sum(1))
        assert counts.tolist() == [10, 7, 10]


def test_validation_group_sums_count_each_target_for_its_group():
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(2, 6, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (2, 6), generator=g)
    labels[0, 3] = -100  # a packed row: the second document's first token predicts nothing
    lin = torch.nn.Linear(8, 20, bias=False)
    lin.weight.data = weight
    groups = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]])
    ce = F.cross_entropy((hidden[:, :-1] @ weight.T).transpose(1, 2), labels[:, 1:], reduction="none")
    sums, counts = row_ce_sums(hidden, lin, labels, 4, groups, 3)
    # positions 0 and 1 predict the first document's targets 1 and 2; 3 and 4 the second's 4, 5
    torch.testing.assert_close(sums, torch.stack([ce[0, :2].sum(), ce[0, 3:].sum(), ce[1].sum()]))
    assert counts.tolist() == [2, 2, 5]
    with pytest.raises(ValueError, match="must match labels"):
        row_ce_sums(hidden, lin, labels, 4, groups[:, :3], 3)


# ----------------------------------------------------------------------------- chunking


def test_auto_chunks_fit_the_memory_budget():
    auto = Chunking(None, memory_mb=256)
    # 256 MiB of float32 rows of a 151,936 vocabulary fit 441 rows with 1 buffer, 147 with 3;
    # 4,096 tokens would take 10 chunks of 410 and 28 of 147; rounded to multiples of 64 that
    # fit: 384 and 128
    assert auto.rows(4096, 151936, 1) == 384 and auto.rows(4096, 151936, 3) == 128
    assert auto.rows(100, 1024, 1) == 100  # never more than the tokens
    assert auto.rows(510, 151936, 1) == 256  # two chunks of 256 rather than 441 + 69
    assert Chunking(None, memory_mb=1).rows(100, 2**14, 1) == 15  # under 64 rows: 7 equal chunks
    assert Chunking(None, memory_mb=1).rows(10, 10**7, 1) == 1  # at least one row
    assert Chunking(64).rows(4096, 151936, 3) == 64  # a fixed size is a size
    cfg = load_config(["loss.chunk_size=auto", "loss.chunk_memory_mb=128"])
    assert Chunking.of(cfg.loss) == Chunking(None, 128)
    assert LossConfig.chunk_size == "auto" and Chunking.of(load_config([]).loss) == Chunking(None, 256)


@pytest.mark.parametrize("value", ["0", "many", "true", "1.5"])
def test_bad_chunk_sizes_stop_at_start_up(value):
    with pytest.raises(ConfigError, match="loss.chunk_size"):
        load_config([f"loss.chunk_size={value}"])


def test_no_tokens_give_zero_loss_and_zero_gradients():
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    hidden = torch.zeros(0, 16, requires_grad=True)
    loss, _ = chunked_linear_loss(hidden, Head(weight, bias), TokenCE(torch.zeros(0, dtype=torch.long)), 8)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 16)
    assert not weight.grad.any() and not bias.grad.any()
    out = token_logprobs(hidden, Head(weight, bias), torch.zeros(0, dtype=torch.long), entropy=True)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
