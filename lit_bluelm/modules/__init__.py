"""Stage LightningModules: one base owning ``self.model``, thin subclasses per objective."""

from typing import Dict, Type

from lit_bluelm.modules.base import BlueLMModule
from lit_bluelm.modules.distill import DistillModule
from lit_bluelm.modules.next_token import NextTokenModule
from lit_bluelm.modules.reward import RewardModule
from lit_bluelm.modules.rl import RLModule

STAGE_MODULES: Dict[str, Type[BlueLMModule]] = {
    "next_token": NextTokenModule,
    "distill": DistillModule,
    "reward": RewardModule,
    "rl": RLModule,
}

__all__ = ["STAGE_MODULES", "BlueLMModule", "DistillModule", "NextTokenModule", "RewardModule", "RLModule"]
