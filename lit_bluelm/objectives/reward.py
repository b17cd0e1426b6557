"""The reward model's objective: the ``reward`` config section, reading a sequence's reward off its
last real token, and the Bradley-Terry loss on (chosen, rejected) reward pairs.

Loss per pair = ``-log sigmoid(r_chosen - r_rejected - margin)`` (``margin``: the pair's own,
0 when it has none) ``+ centering * (r_chosen + r_rejected)^2``, the mean over pairs. The
centring term (as in TRL's ``center_rewards_coefficient``) keeps rewards near 0, which the
pairwise term alone leaves free (it sees only differences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lit_bluelm.errors import at_least


@dataclass
class RewardConfig:
    """The ``reward`` section (``module: reward``)."""

    # coefficient of the centring term (r_chosen + r_rejected)^2; 0: off
    centering: float = 0.0
    # use each pair's ``margin`` (samples without one have 0); false: every margin is 0
    use_margin: bool = True

    @staticmethod
    def check(cfg: Any) -> None:
        at_least(cfg, "reward.centering", 0.0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the column of each row's last real token (mask 1), under left or right padding. A row
    with no real token is an error: it has no reward."""
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row without real tokens has no last token to read a reward from")
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, columns, -1).amax(dim=1)


def last_token_rewards(
    hidden: torch.Tensor, attention_mask: torch.Tensor, score: torch.nn.Linear
) -> torch.Tensor:
    """[B] rewards: ``score`` (hidden -> 1) applied to each row's hidden state at its last real
    token (``hidden`` [B, T, D]); only those B vectors go through the head."""
    index = last_token_index(attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # [B, D]
    return score(last).squeeze(-1).float()


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    centering: float = 0.0,
) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(chosen - rejected - margin) + centering * (chosen +
    rejected)^2`` (rewards [P], margin [P] or None)."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff)
    if centering:
        loss = loss + centering * (chosen.float() + rejected.float()) ** 2
    return loss.mean()


@dataclass
class PairStats:
    """Per-pair figures of a batch: ranked right (chosen > rejected; a tie is wrong) and the
    reward difference."""

    correct: torch.Tensor  # [P] float 0/1
    difference: torch.Tensor  # [P] chosen - rejected


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> PairStats:
    diff = (chosen.float() - rejected.float()).detach()
    return PairStats((diff > 0).float(), diff)
