"""GRPO's math on hand-made tensors (advantages for each scale, the clipped surrogate on both
sides, the k3 KL) and through the chunked per-token loss; the reward router (routing, no score
left out, weight 0 logged not counted, a raising and a hanging rule contained)."""

import math
import statistics
import time

import pytest
import torch

from lit_bluelm.errors import ConfigError
from lit_bluelm.objectives.grpo import (
    RewardsConfig,
    Route,
    group_advantages,
    stat_means,
    surrogate_fn,
    token_mean,
)
from lit_bluelm.objectives.token_logprobs import per_token_loss
from lit_bluelm.rewards.router import RewardRouter, check_names
from lit_bluelm.rewards.rules import RULES, Sample, rule, think_format

NAN = float("nan")
EPS = 1e-4
REWARDS = torch.tensor(
    [
        [1.0, 0.0, 1.0, 0.0],  # mean 0.5, sample std sqrt(1/3)
        [1.0, 1.0, 1.0, 1.0],  # all tie: no signal
        [NAN, 2.0, 0.0, NAN],  # two scored: mean 1, std sqrt(2)
        [3.0, NAN, NAN, NAN],  # one scored: no signal
    ]
)


def test_group_scale_divides_by_each_groups_std_and_zeroes_groups_without_signal():
    out = group_advantages(REWARDS, "group")
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    b = 1.0 / (math.sqrt(2) + EPS)
    expected = [[a, -a, a, -a], [0, 0, 0, 0], [0, b, -b, 0], [0, 0, 0, 0]]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert out.scored.tolist() == [
        [True] * 4,
        [True] * 4,
        [False, True, True, False],
        [True, False, False, False],
    ]
    assert out.flat.tolist() == [False, True, False, True]


def test_batch_scale_divides_by_the_batchs_std_and_none_only_centres():
    values = [1, 0, 1, 0, 1, 1, 1, 1, 2, 0, 3]  # every scored reward
    s = statistics.stdev(values)
    out = group_advantages(REWARDS, "batch")
    expected = [
        [0.5 / (s + EPS), -0.5 / (s + EPS)] * 2,
        [0] * 4,
        [0, 1 / (s + EPS), -1 / (s + EPS), 0],
        [0] * 4,
    ]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    none = group_advantages(REWARDS, "none").advantages
    assert torch.equal(none, torch.tensor([[0.5, -0.5, 0.5, -0.5], [0] * 4, [0, 1, -1, 0], [0] * 4]))
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(REWARDS, "global")


def _surrogate_case():
    # ratios 1.5, 0.5, 1.1, 0.9 against old log-probs of 0; the last token is not counted
    lp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9])).requires_grad_(True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])
    return lp, old, adv, weights


def test_the_clipped_surrogate_clips_each_side_and_counts_the_clipped_tokens():
    lp, old, adv, weights = _surrogate_case()
    stats = surrogate_fn(old, adv, weights, epsilon_low=0.2, epsilon_high=0.3)(lp, None, slice(None))
    # 1.5 with A=1 -> min(1.5, 1.3) = 1.3 (clipped above); 0.5 with A=-1 -> min(-0.5, -0.8) = -0.8
    # (clipped below); 1.1 with A=-1 -> -1.1 (not clipped); the fourth token weighs 0
    loss = -1.3 + 0.8 + 1.1
    assert stats.tolist() == pytest.approx([loss, 3, 0, 1, 1, 0, 1.5 + 0.5 + 1.1])
    assert float(token_mean(stats.detach(), 3)) == pytest.approx(loss / 3)
    (grad,) = torch.autograd.grad(stats[0], lp)
    # clipped tokens have no gradient; the third: d(-ratio * A)/d lp = -ratio * A = 1.1
    assert grad.tolist() == pytest.approx([0.0, 0.0, 1.1, 0.0])
    means = stat_means(stats)
    assert means["clip_low"] == pytest.approx(1 / 3) and means["clip_high"] == pytest.approx(1 / 3)


def test_the_k3_kl_to_the_reference_is_added_with_beta():
    lp, old, adv, weights = _surrogate_case()
    ref = lp.detach() + math.log(2.0)  # ref / policy = 2 on every token: k3 = 2 - ln 2 - 1
    k3 = 2 - math.log(2) - 1
    stats = surrogate_fn(old, adv, weights, 0.2, 0.3, beta=0.1, ref=ref)(lp, None, slice(None))
    assert float(stats[0]) == pytest.approx(0.6 + 0.1 * 3 * k3)
    assert float(stats[2]) == pytest.approx(3 * k3)
    with pytest.raises(ValueError, match="beta > 0 needs the reference"):
        surrogate_fn(old, adv, weights, 0.2, 0.2, beta=0.1)


def test_old_none_takes_the_forwards_own_log_probs_ratio_one():
    lp, _, adv, weights = _surrogate_case()
    stats = surrogate_fn(None, adv, weights, 0.2, 0.2)(lp, None, slice(None))
    assert float(stats[0]) == pytest.approx(-(1 - 1 - 1))  # -sum(A) over counted tokens
    assert float(stats[6]) == pytest.approx(3.0)  # every ratio is 1
    (grad,) = torch.autograd.grad(stats[0], lp)
    assert grad.tolist() == pytest.approx([-1.0, 1.0, 1.0, 0.0])  # -A: the policy gradient


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_the_chunked_grpo_loss_equals_the_one_on_full_logits(chunk_size):
    torch.manual_seed(0)
    n, d, v, temperature = 10, 8, 17, 0.7
    hidden = torch.randn(n, d, requires_grad=True)
    head = torch.nn.Linear(d, v, bias=False)
    targets = torch.randint(0, v, (n,))
    old = torch.randn(n) * 0.1 - 2.5
    ref = torch.randn(n) * 0.1 - 2.5
    adv = torch.randn(n)
    weights = (torch.arange(n) % 4 != 0).float()
    tokens = float(weights.sum())
    fn = surrogate_fn(old, adv, weights, 0.2, 0.28, beta=0.05, ref=ref)
    loss, stats = per_token_loss(
        hidden,
        head,
        targets,
        fn,
        temperature,
        entropy=True,
        combine=lambda s: token_mean(s, tokens),
        chunk_size=chunk_size,
    )
    loss.backward()
    got = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    log_p = torch.log_softmax(head(hidden) / temperature, dim=-1)
    lp = log_p.gather(1, targets[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    ref_stats = fn(lp, entropy, slice(None))
    ref_loss = ref_stats[0] / tokens
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert stats.tolist() == pytest.approx(ref_stats.detach().tolist(), rel=1e-5)
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], head.weight.grad, atol=1e-6)


# ----------------------------------------------------------------------------- rewards


def _sample(task, completion, answer=None, think=True):
    return Sample(
        task=task, completion=completion, think=think, answer_gold=answer, tokens=10, max_new_tokens=40
    )


@rule("test_raises")
def _raises(sample):
    raise RuntimeError("broken rule")


@rule("test_hangs")
def _hangs(sample):
    time.sleep(60)
    return 1.0


def _router(routes, workers=0, timeout_s=10.0, learned=None):
    cfg = RewardsConfig(
        routes={t: [Route(**r) for r in rs] for t, rs in routes.items()}, workers=workers, timeout_s=timeout_s
    )
    return RewardRouter(cfg, learned)


def test_each_sample_goes_to_its_tasks_functions_and_no_score_is_left_out():
    seen = []

    def learned(items):
        seen.extend(items)
        return [0.25 for _ in items]

    router = _router(
        {
            "arith": [{"fn": "numeric", "weight": 1.0}, {"fn": "think_format", "weight": 0.5}],
            "open": [{"fn": "reward_model", "weight": 1.0}, {"fn": "exact", "weight": 0.0}],
        },
        learned=learned,
    )
    samples = [
        _sample("arith", "<think>\n3 + 4 = 7.\n</think>\n7", "7"),  # right and well formed
        _sample("arith", "<think>\nhm", "7"),  # never closed: no answer, bad format
        _sample("open", "Paris", "Rome", think=False),
        _sample("arith", "<think>\nx\n</think>\n7", None),  # no gold answer: numeric gives no score
    ]
    scores = router.score(samples, learned_inputs=["c0", "c1", "c2", "c3"])
    assert scores.by_fn["numeric"] == [1.0, 0.0, None, None]
    assert scores.by_fn["think_format"] == [1.0, 0.0, None, 1.0]
    assert scores.by_fn["reward_model"] == [None, None, 0.25, None]
    assert scores.by_fn["exact"] == [None, None, 0.0, None]  # computed and logged, weight 0
    assert seen == ["c2"]  # only the open sample reached the learned reward
    assert scores.rewards[0] == pytest.approx(1.0)
    assert scores.rewards[1] == pytest.approx(0.0)
    assert scores.rewards[2] == pytest.approx(0.25)  # exact's 0 is not counted
    assert scores.rewards[3] == pytest.approx(1.0)  # only think_format applied
    only_numeric = _router({"arith": [{"fn": "numeric", "weight": 1.0}]})
    assert math.isnan(only_numeric.score([samples[3]]).rewards[0])  # no score at all: NaN
    unrouted = only_numeric.score([_sample("count", "3")])
    assert math.isnan(unrouted.rewards[0]) and unrouted.unrouted == 1


def test_think_format_accepts_a_prefilled_think_and_checks_each_mode():
    assert think_format(_sample("t", "<think>\na\n</think>\nb")) == 1.0
    assert think_format(Sample("t", "\na\n</think>\nb", think=True, prefilled_think=True)) == 1.0
    assert think_format(_sample("t", "b")) == 0.0  # thinking mode without a block
    assert think_format(_sample("t", "<think>\na\n</think>\n")) == 0.0  # no answer
    assert think_format(_sample("t", "b", think=False)) == 1.0
    assert think_format(_sample("t", "<think>\na\n</think>\nb", think=False)) == 0.0


def test_a_raising_rule_is_a_counted_failure_not_a_stop():
    router = _router({"t": [{"fn": "test_raises", "weight": 1.0}, {"fn": "exact", "weight": 1.0}]}, workers=1)
    try:
        scores = router.score([_sample("t", "a", "a"), _sample("t", "b", "a")])
    finally:
        router.close()
    assert scores.failures == {"test_raises": 2}
    assert scores.rewards == [1.0, 0.0]  # the other function still scores
    assert "broken rule" in scores.errors[0]


def test_a_hanging_rule_times_out_and_its_worker_is_replaced():
    router = _router(
        {"t": [{"fn": "test_hangs", "weight": 1.0}, {"fn": "exact", "weight": 1.0}]}, workers=1, timeout_s=5.0
    )
    try:
        start = time.monotonic()
        scores = router.score([_sample("t", "a", "a")])
        assert time.monotonic() - start < 40
        assert scores.timeouts == {"test_hangs": 1}
        assert scores.rewards == [1.0]  # exact ran in the replacement worker
        again = router.score([_sample("t", "b", "a")])  # the router keeps working
        assert again.timeouts == {"test_hangs": 1} and again.rewards == [0.0]
    finally:
        router.close()


def test_bad_routes_are_one_line_config_errors():
    from lit_bluelm.config import load_config

    with pytest.raises(ConfigError, match=r"rewards.routes.demo_arith\[0\].fn: unknown reward 'nope'"):
        check_names(load_config(["stage=rl", "rewards.routes.demo_arith=[{fn: nope}]"]).rewards.routes)
    with pytest.raises(ConfigError, match="every weight is 0"):
        load_config(["stage=rl", "rewards.routes.demo_arith=[{fn: numeric, weight: 0.0}]"])
    with pytest.raises(ConfigError, match="rewards.routes use reward_model: set rewards.model"):
        load_config(["stage=rl", "rewards.routes.demo_open=[{fn: reward_model}]"])
    with pytest.raises(ConfigError, match="rl.num_generations must be >= 2"):
        load_config(["stage=rl", "rl.num_generations=1"])
    with pytest.raises(ConfigError, match="rl.scale must be one of group, batch, none"):
        load_config(["stage=rl", "rl.scale=global"])
    assert "numeric" in RULES and "reward_model" not in RULES
