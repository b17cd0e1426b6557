"""Loss math on tensors only: no Lightning, no model building.

``linear_loss``: the chunked output projection any loss runs through; ``lm``: next-token CE;
``distill``: CE + logit distillation and the ``distill`` config section.
"""

from lit_bluelm.objectives.distill import (
    DistillConfig,
    KDOptions,
    distill_head_loss,
    distill_linear_loss,
    naive_distill_loss,
)
from lit_bluelm.objectives.linear_loss import (
    ChunkLoss,
    Head,
    LossConfig,
    chunked_linear_loss,
    naive_linear_loss,
)
from lit_bluelm.objectives.lm import LossParts, next_token_head_loss, next_token_loss, row_ce_sums

__all__ = [
    "ChunkLoss",
    "DistillConfig",
    "Head",
    "KDOptions",
    "LossConfig",
    "LossParts",
    "chunked_linear_loss",
    "distill_head_loss",
    "distill_linear_loss",
    "naive_distill_loss",
    "naive_linear_loss",
    "next_token_head_loss",
    "next_token_loss",
    "row_ce_sums",
]
