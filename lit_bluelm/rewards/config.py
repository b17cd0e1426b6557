"""The ``rewards`` config section (declared apart from the router so the config schema imports
nothing heavy; :mod:`lit_bluelm.rewards.router` documents the keys)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lit_bluelm.errors import ConfigError, at_least

LEARNED = "reward_model"  # the route name of the learned reward


@dataclass
class Route:
    fn: str
    weight: float = 1.0


@dataclass
class RewardsConfig:
    """The ``rewards`` section (``module: rl``)."""

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
        from lit_bluelm.rewards.rules import RULES

        names = sorted(RULES) + [LEARNED]
        for task, routes in rewards.routes.items():
            if not routes:
                raise ConfigError(f"rewards.routes.{task}: no reward functions")
            for i, route in enumerate(routes):
                if route.fn not in names:
                    raise ConfigError(
                        f"rewards.routes.{task}[{i}].fn: unknown reward '{route.fn}'; valid: {', '.join(names)}"
                    )
                if not (math.isfinite(route.weight) and route.weight >= 0):
                    raise ConfigError(f"rewards.routes.{task}[{i}].weight must be >= 0, got {route.weight}")
            if all(route.weight == 0 for route in routes):
                raise ConfigError(f"rewards.routes.{task}: every weight is 0 (nothing would be rewarded)")
        if uses_learned(rewards.routes) and not rewards.model:
            raise ConfigError("rewards.routes use reward_model: set rewards.model to a reward run")


def uses_learned(routes: Any) -> bool:
    return any(route.fn == LEARNED for task_routes in routes.values() for route in task_routes)
