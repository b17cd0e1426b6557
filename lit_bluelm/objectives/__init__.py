"""Loss math on tensors only: no Lightning, no model building.

``linear_loss``: the chunked output projection any loss runs through; ``lm``: next-token CE;
``distill``: CE + logit distillation and the ``distill`` config section; ``token_logprobs``:
per-token log-probabilities and entropies of given tokens (RL, scoring); ``reward``: the
Bradley-Terry loss of the reward model and the ``reward`` config section.
"""

from lit_bluelm.objectives.distill import (
    DistillConfig,
    KDOptions,
    distill_head_loss,
    distill_linear_loss,
    naive_distill_loss,
)
from lit_bluelm.objectives.linear_loss import (
    Chunking,
    ChunkLoss,
    Head,
    LossConfig,
    chunked_linear_loss,
    naive_linear_loss,
)
from lit_bluelm.objectives.lm import LossParts, next_token_head_loss, next_token_loss, row_ce_sums
from lit_bluelm.objectives.reward import (
    PairStats,
    RewardConfig,
    bradley_terry_loss,
    last_token_index,
    last_token_rewards,
    pair_stats,
)
from lit_bluelm.objectives.token_logprobs import (
    TokenLogprobs,
    naive_token_logprobs,
    per_token_loss,
    token_logprobs,
)

__all__ = [
    "ChunkLoss",
    "Chunking",
    "DistillConfig",
    "Head",
    "KDOptions",
    "LossConfig",
    "LossParts",
    "PairStats",
    "RewardConfig",
    "TokenLogprobs",
    "bradley_terry_loss",
    "chunked_linear_loss",
    "distill_head_loss",
    "distill_linear_loss",
    "last_token_index",
    "last_token_rewards",
    "naive_distill_loss",
    "naive_linear_loss",
    "naive_token_logprobs",
    "next_token_head_loss",
    "next_token_loss",
    "pair_stats",
    "per_token_loss",
    "row_ce_sums",
    "token_logprobs",
]
