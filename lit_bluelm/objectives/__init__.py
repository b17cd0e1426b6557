"""Loss math on tensors only: no Lightning, no model building."""

from lit_bluelm.objectives.distill import (
    Head,
    KDOptions,
    LossParts,
    chunked_linear_loss,
    naive_linear_loss,
    next_token_head_loss,
    row_ce_sums,
)
from lit_bluelm.objectives.lm import IGNORE_INDEX, next_token_loss

__all__ = [
    "IGNORE_INDEX",
    "Head",
    "KDOptions",
    "LossParts",
    "chunked_linear_loss",
    "naive_linear_loss",
    "next_token_head_loss",
    "row_ce_sums",
    "next_token_loss",
]
