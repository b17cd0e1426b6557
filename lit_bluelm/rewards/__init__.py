"""Rewards: the learned reward model served as a batched scorer (:class:`RewardModel`); GRPO's
reward registry and router will live here too."""

from lit_bluelm.rewards.model import RewardModel

__all__ = ["RewardModel"]
