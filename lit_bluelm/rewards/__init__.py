"""Rewards: the learned reward model served as a batched scorer (:class:`RewardModel`), the rule
rewards (:mod:`lit_bluelm.rewards.rules`) and the router that sends each sample to its task's
functions (:class:`RewardRouter`). The two are imported on first use, so the router's worker
processes import the rules without loading models."""

from typing import Any

__all__ = ["RewardModel", "RewardRouter"]


def __getattr__(name: str) -> Any:
    if name == "RewardModel":
        from lit_bluelm.rewards.model import RewardModel

        return RewardModel
    if name == "RewardRouter":
        from lit_bluelm.rewards.router import RewardRouter

        return RewardRouter
    raise AttributeError(name)
