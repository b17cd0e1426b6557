"""GRPO's objective: the ``rl`` config section (the loss and the rollouts) and the ``rewards``
section (the routes; served by :mod:`lit_bluelm.rewards.router`), group-normalised advantages and
the clipped surrogate with an optional k3 KL to a reference policy, as a per-token function for
:func:`~lit_bluelm.objectives.token_logprobs.per_token_loss` (no full logits).

For a prompt's G completions with rewards r_1..r_G (NaN: no reward function applied, the sample
is left out), the advantage of completion i is

* ``scale: group``: (r_i - mean(r)) / (std(r) + eps), mean and std over the group's scored
  completions (std with Bessel's correction, as ``torch.std``);
* ``scale: batch``: (r_i - mean(r)) / (std of every scored reward of the batch + eps);
* ``scale: none``: r_i - mean(r) (no division: Dr. GRPO's unbiased form).

A group with fewer than two scored completions, or whose scored rewards all tie, carries no
signal: its advantages are 0 (the fraction of such groups is logged).

Every completion token t of completion i with log-probs ``logp`` (the policy being trained),
``old`` (the trainer's recompute at rollout time) and ``ref`` (the frozen reference) has

    ratio = exp(logp - old)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A_i)
             + beta * (exp(ref - logp) - (ref - logp) - 1)          # k3, only when beta > 0

and ``loss_aggregation: token_mean`` is the mean of loss_t over every counted token of the
batch (tokens the budget forced and left-out samples are not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from lit_bluelm.errors import ConfigError, at_least

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token_mean",)
ADVANTAGE_EPS = 1e-4  # added to the std before dividing (TRL's value)

# the summed statistics of :func:`surrogate_fn`, in this order
STATS = ("loss", "tokens", "kl", "clip_low", "clip_high", "entropy", "ratio")


@dataclass
class RLConfig:
    """The ``rl`` section (``module: rl``)."""

    num_generations: int = 4  # G completions per prompt
    scale: str = "group"  # group | batch | none
    epsilon_low: float = 0.2  # the ratio is clipped below at 1 - epsilon_low ...
    epsilon_high: float = 0.2  # ... and above at 1 + epsilon_high (DAPO's clip-higher: > low)
    beta: float = 0.0  # k3 KL coefficient to the reference policy; 0: no reference is built
    reference: Optional[str] = None  # a checkpoint; null: the initial weights (init_from's)
    loss_aggregation: str = "token_mean"
    # rollouts
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    thinking_budget: Optional[int] = None  # null: no limit
    # the modes rollouts sample in: each prompt takes the one its key hashes to
    think: List[str] = field(default_factory=lambda: ["think"])
    val_samples: int = 4  # completions of each held-out prompt in validation

    @staticmethod
    def check(cfg: Any) -> None:
        rl = cfg.rl
        at_least(cfg, "rl.num_generations", 2)
        if rl.scale not in SCALES:
            raise ConfigError(f"rl.scale must be one of {', '.join(SCALES)}, got '{rl.scale}'")
        if rl.loss_aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"rl.loss_aggregation must be one of {', '.join(AGGREGATIONS)}, got '{rl.loss_aggregation}'"
            )
        at_least(cfg, "rl.epsilon_low", 0.0)
        at_least(cfg, "rl.epsilon_high", 0.0)
        if rl.epsilon_low >= 1:
            raise ConfigError(
                f"rl.epsilon_low must be < 1 (the lower clip 1 - epsilon_low > 0), got {rl.epsilon_low}"
            )
        at_least(cfg, "rl.beta", 0.0)
        if not rl.temperature > 0:
            raise ConfigError(f"rl.temperature must be > 0 (rollouts sample), got {rl.temperature}")
        at_least(cfg, "rl.max_new_tokens", 1)
        at_least(cfg, "rl.val_samples", 1)
        at_least(cfg, "rl.thinking_budget", 0, allow_none=True)
        if not 0 < rl.top_p <= 1:
            raise ConfigError(f"rl.top_p must be in (0, 1], got {rl.top_p}")
        at_least(cfg, "rl.top_k", 0)
        bad = [m for m in rl.think if m not in ("think", "no_think")]
        if bad or not rl.think:
            raise ConfigError(f"rl.think: a list of think | no_think, got {list(rl.think)}")


LEARNED = "reward_model"  # the route name of the learned reward


@dataclass
class Route:
    fn: str
    weight: float = 1.0


@dataclass
class RewardsConfig:
    """The ``rewards`` section (``module: rl``; :mod:`lit_bluelm.rewards.router` documents it)."""

    # {task: [{fn, weight}, ...]}: the functions that score a task's samples
    routes: Dict[str, List[Route]] = field(default_factory=dict)
    model: Optional[str] = None  # the reward run (or checkpoint) of fn: reward_model
    workers: int = 2  # rule-scoring worker processes (0: score in this process, no limit)
    timeout_s: float = 10.0  # wall-clock limit of one rule call in a worker

    @staticmethod
    def check(cfg: Any) -> None:
        rewards = cfg.rewards
        at_least(cfg, "rewards.workers", 0)
        if not rewards.timeout_s > 0:
            raise ConfigError(f"rewards.timeout_s must be > 0, got {rewards.timeout_s}")
        for task, routes in rewards.routes.items():
            if not routes:
                raise ConfigError(f"rewards.routes.{task}: no reward functions")
            for i, route in enumerate(routes):  # the names: lit_bluelm.rewards.router.check_names
                if not (math.isfinite(route.weight) and route.weight >= 0):
                    raise ConfigError(f"rewards.routes.{task}[{i}].weight must be >= 0, got {route.weight}")
            if all(route.weight == 0 for route in routes):
                raise ConfigError(f"rewards.routes.{task}: every weight is 0 (nothing would be rewarded)")
        if uses_learned(rewards.routes) and not rewards.model:
            raise ConfigError("rewards.routes use reward_model: set rewards.model to a reward run")


def uses_learned(routes: Any) -> bool:
    return any(route.fn == LEARNED for task_routes in routes.values() for route in task_routes)


class Advantages(NamedTuple):
    advantages: torch.Tensor  # [B, G]; 0 where a sample has no reward or its group no signal
    scored: torch.Tensor  # [B, G] bool: the sample has a reward (it enters the loss)
    flat: torch.Tensor  # [B] bool: the group carries no signal (< 2 scored, or all tie)


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = ADVANTAGE_EPS) -> Advantages:
    """Advantages of rewards [B, G] (NaN: no reward) normalised within each group of G."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = rewards.float()
    scored = ~torch.isnan(rewards)
    n = scored.sum(dim=1, keepdim=True)
    r = torch.where(scored, rewards, 0.0)
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(scored, rewards - mean, 0.0)
    var = (centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()
    flat = (n.squeeze(1) < 2) | (std.squeeze(1) == 0)
    if scale == "group":
        adv = centred / (std + eps)
    elif scale == "batch":
        values = rewards[scored]
        batch_std = values.std() if values.numel() > 1 else values.new_zeros(())
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    adv = torch.where(flat[:, None], 0.0, adv)
    return Advantages(adv, scored, flat)


def surrogate_fn(
    old: Optional[torch.Tensor],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref: Optional[torch.Tensor] = None,
):
    """The per-token function of GRPO's loss for
    :func:`~lit_bluelm.objectives.token_logprobs.per_token_loss`: given a chunk's log-probs
    ``lp`` (and entropies) of the tokens ``rows`` of the flattened completions, it returns the
    chunk's sums of :data:`STATS`: the loss terms, the counted tokens, the k3 KL, the tokens
    clipped below (ratio < 1 - epsilon_low with A < 0) and above (ratio > 1 + epsilon_high with
    A > 0), the entropy and the ratio. ``old``, ``advantages`` (per token), ``weights`` (1 for a
    counted token, 0 for a forced or left-out one) and ``ref`` are [N]; ``old=None`` takes the
    chunk's own log-probs, detached (one update per rollout: the ratio is 1, the gradient the
    surrogate's)."""
    if beta > 0 and ref is None:
        raise ValueError("beta > 0 needs the reference log-probs")

    def fn(lp: torch.Tensor, entropy: Optional[torch.Tensor], rows: slice) -> torch.Tensor:
        w, adv = weights[rows].to(lp.dtype), advantages[rows].to(lp.dtype)
        before = lp.detach() if old is None else old[rows].to(lp.dtype)
        ratio = torch.exp(lp - before)
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        loss = -torch.minimum(ratio * adv, clipped * adv)
        kl = torch.zeros_like(lp)
        if beta > 0:
            d = ref[rows].to(lp.dtype) - lp
            kl = torch.exp(d) - d - 1
            loss = loss + beta * kl
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(lp.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(lp.dtype)
        ent = entropy.detach() if entropy is not None else torch.zeros_like(lp)
        parts = [loss, torch.ones_like(lp), kl, low, high, ent, ratio]
        return torch.stack([(p * w).sum() for p in parts])

    return fn


def token_mean(stats: torch.Tensor, tokens: float) -> torch.Tensor:
    """``loss_aggregation: token_mean``: the summed loss over the counted tokens (``tokens``,
    counted before the loss so each chunk's gradient is scaled right; at least 1)."""
    return stats[0] / max(float(tokens), 1.0)


def stat_means(stats: torch.Tensor) -> dict:
    """The per-token means of :data:`STATS` (over the counted tokens) by name, without the count."""
    tokens = max(float(stats[1]), 1.0)
    return {name: float(stats[i]) / tokens for i, name in enumerate(STATS) if name != "tokens"}
