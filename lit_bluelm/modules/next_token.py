"""Next-token CE (stages 2-4: joint, reasoning, long context; the base of distillation and SFT):
CE on every counted label, validation loss overall and per source, perplexity."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional

import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lit_bluelm.modules.base import Batch, BlueLMModule
from lit_bluelm.objectives import Chunking, LossParts, next_token_head_loss, row_ce_sums


class NextTokenModule(BlueLMModule):
    summary_by_source: ClassVar[Optional[str]] = "val/loss/"

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__(cfg)
        self.val_loss = MeanMetric()  # token-weighted, synced across ranks on compute
        # per source (rows count for the source of their first document); keys prefixed: a
        # source may be called like a Module attribute, e.g. "train"
        self.val_source_loss = nn.ModuleDict({f"src_{name}": MeanMetric() for name in self.cfg.data.mix})

    def forward_loss(self, batch: Batch, head_fn: Any) -> Any:
        """The model on a batch, with ``head_fn`` applied to its final hidden states.

        Right padding + causal attention: pads never influence real tokens and their labels are
        ignored, so no attention mask is needed (SDPA takes its fast causal path). Packed rows
        carry position_ids that restart per document, which keeps attention inside each."""
        assert self.model is not None
        return self.model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            pixel_values=batch.get("pixel_values"),
            head_fn=head_fn,
        )

    def lm_loss(self, batch: Batch) -> LossParts:
        """Next-token CE of a batch, in chunks of ``loss.chunk_size`` tokens (no full logits)."""
        return self.forward_loss(batch, next_token_head_loss(batch["labels"], Chunking.of(self.cfg.loss)))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        parts = self.lm_loss(batch)
        self.log("train/loss", parts.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return parts.loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """The model's next-token CE, overall and per source (``val/loss``, ``val/loss/<source>``)."""
        chunk = Chunking.of(self.cfg.loss)
        sums, counts = self.forward_loss(
            batch, lambda hidden, head: row_ce_sums(hidden, head, batch["labels"], chunk)
        )
        total = counts.sum()
        if total > 0:
            self.val_loss.update(sums.sum() / total, weight=total)
        for name in set(batch["source"]):
            rows = torch.tensor([s == name for s in batch["source"]], device=sums.device)
            n = counts[rows].sum()
            key = f"src_{name}"
            if key in self.val_source_loss and n > 0:
                self.val_source_loss[key].update(sums[rows].sum() / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        # Whether a metric has data must be decided the same way on every rank (compute() and
        # sync_dist are collectives): use the update counts summed over ranks.
        metrics = {"val/loss": self.val_loss}
        metrics |= {f"val/loss/{key[len('src_') :]}": m for key, m in self.val_source_loss.items()}
        counts = torch.tensor([float(m.update_count) for m in metrics.values()], device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        for (name, metric), count in zip(metrics.items(), counts.tolist(), strict=True):
            if count > 0:
                value = metric.compute()  # reduced across ranks; sync_dist averages equal values
                self.log(name, value, prog_bar=name == "val/loss", sync_dist=True)
                if name == "val/loss":
                    self.log("val/ppl", torch.exp(value.clamp(max=50.0)), sync_dist=True)
            metric.reset()
