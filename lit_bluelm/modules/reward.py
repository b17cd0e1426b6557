"""The reward model (``stage=reward``): the backbone with a scalar head (``model.reward_head``)
trained on preference pairs with the Bradley-Terry loss (``lit_bluelm.objectives.reward``).

A batch of P pairs is 2P rows, chosen first (``datamodules.collate``): one forward scores both
sides. Logged: ``train/loss``, ``train/accuracy``, ``train/margin``, ``train/reward_mean``,
``train/reward_std``; in validation ``val/accuracy`` (the fraction of pairs ranked right; a tie
is wrong), ``val/accuracy/<source>``, ``val/margin`` (mean chosen - rejected reward),
``val/loss``, ``val/reward_mean`` and ``val/reward_std`` (over both sides), ``val/pairs`` (how
many pairs were ranked). The best checkpoint is the one with the highest ``val/accuracy``; the
summary has ``val_accuracy_before``, ``val_accuracy_after``, ``val_accuracy_after_by_source``,
``val_loss_before|after`` and ``val_pairs_before|after``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics.aggregation import MeanMetric, SumMetric

from lit_bluelm.errors import ConfigError
from lit_bluelm.modules.base import Batch, BlueLMModule
from lit_bluelm.objectives.reward import bradley_terry_loss, pair_stats


class RewardModule(BlueLMModule):
    best_metric: ClassVar[str] = "val/accuracy"
    best_mode: ClassVar[str] = "max"
    summary_metrics: ClassVar[Dict[str, str]] = {
        "val_accuracy": "val/accuracy",
        "val_loss": "val/loss",
        "val_pairs": "val/pairs",
    }
    summary_by_source: ClassVar[Optional[str]] = "val/accuracy/"
    reads: ClassVar[str] = "pairs"

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__(cfg)
        # pair-weighted means, synced across ranks on compute
        self.val_metrics = nn.ModuleDict(
            {name: MeanMetric() for name in ("accuracy", "margin", "loss", "reward", "reward_sq")}
        )
        self.val_pairs = SumMetric()  # how many held-out pairs a validation ranked
        self.val_source_accuracy = nn.ModuleDict({f"src_{name}": MeanMetric() for name in self.cfg.data.mix})

    @classmethod
    def check(cls, cfg: DictConfig, tokenizer: Any) -> None:
        super().check(cfg, tokenizer)
        if not cfg.model.reward_head:
            raise ConfigError(f"module={cfg.module} trains the reward head: set model.reward_head=true")
        if cfg.data.packing:
            raise ConfigError(
                f"module={cfg.module}: data.packing must be false (a row is one side of a pair; "
                "the pair's two rows go through one forward)"
            )

    def pair_rewards(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(chosen [P], rejected [P]) rewards of a batch of P pairs."""
        assert self.model is not None
        rewards = self.model.reward(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
        pairs = int(batch["pairs"])
        return rewards[:pairs], rewards[pairs:]

    def pair_loss(self, batch: Batch, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        margin = batch["margin"] if self.cfg.reward.use_margin else None
        return bradley_terry_loss(chosen, rejected, margin, self.cfg.reward.centering)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_rewards(batch)
        loss = self.pair_loss(batch, chosen, rejected)
        stats = pair_stats(chosen, rejected)
        both = torch.cat([chosen, rejected]).detach()
        n = chosen.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/accuracy", stats.correct.mean(), batch_size=n)
        self.log("train/margin", stats.difference.mean(), batch_size=n)
        self.log("train/reward_mean", both.mean(), batch_size=n)
        self.log("train/reward_std", both.std(unbiased=False), batch_size=n)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        chosen, rejected = self.pair_rewards(batch)
        n = chosen.shape[0]
        stats = pair_stats(chosen, rejected)
        both = torch.cat([chosen, rejected]).detach()
        m = self.val_metrics
        self.val_pairs.update(float(n))
        m["accuracy"].update(stats.correct.mean(), weight=n)
        m["margin"].update(stats.difference.mean(), weight=n)
        m["loss"].update(self.pair_loss(batch, chosen, rejected).detach(), weight=n)
        m["reward"].update(both.mean(), weight=2 * n)
        m["reward_sq"].update((both**2).mean(), weight=2 * n)
        sources = batch["source"][:n]  # one per pair (the rejected rows repeat them)
        for name in set(sources):
            key = f"src_{name}"
            if key in self.val_source_accuracy:
                picked = torch.tensor([s == name for s in sources], device=stats.correct.device)
                self.val_source_accuracy[key].update(stats.correct[picked].mean(), weight=picked.sum())

    def on_validation_epoch_end(self) -> None:
        # whether a metric has data is decided the same way on every rank (compute() is a
        # collective): by the update counts summed over ranks
        metrics = {f"val/{name}": metric for name, metric in self.val_metrics.items()}
        metrics["val/pairs"] = self.val_pairs
        metrics |= {f"val/accuracy/{key[len('src_') :]}": m for key, m in self.val_source_accuracy.items()}
        counts = torch.tensor([float(m.update_count) for m in metrics.values()], device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        values = {}
        for (name, metric), count in zip(metrics.items(), counts.tolist(), strict=True):
            if count > 0:
                values[name] = metric.compute()
            metric.reset()
        if "val/reward" in values:
            mean, sq = values.pop("val/reward"), values.pop("val/reward_sq")
            values["val/reward_mean"], values["val/reward_std"] = mean, (sq - mean**2).clamp(min=0).sqrt()
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "val/accuracy", sync_dist=True)
