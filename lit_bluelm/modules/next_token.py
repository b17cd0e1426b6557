"""Next-token pre-training (stages 2-4: joint, reasoning, long context): CE on every label."""

from __future__ import annotations

import torch

from lit_bluelm.modules.base import Batch, BlueLMModule


class NextTokenModule(BlueLMModule):
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        parts = self.lm_loss(batch)
        self.log("train/loss", parts.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return parts.loss
