"""Loss math on tensors only: no Lightning, no model building."""

from lit_bluelm.objectives.lm import IGNORE_INDEX, next_token_loss

__all__ = ["IGNORE_INDEX", "next_token_loss"]
