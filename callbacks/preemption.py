"""Stopping at a step boundary when the run is asked to (SIGTERM, SIGINT; ``lit_bluelm.status``).

While the training loop runs, a signal only sets a flag. Before the first batch of every
optimizer step, i.e. once the previous step is counted, logged, validated and saved if due, the
flag is read (the maximum over ranks when there are several, so a signal that reached one rank
stops all of them at the same step) and :class:`Preempted` is raised: ``LastCheckpoint`` then
writes ``on_exception.ckpt`` on every rank at that boundary. The batch already fetched for the
next step is not trained and not counted, so the resumed run reads it again. A validation in
progress finishes first. Must be the last callback (``default_callbacks`` puts it there).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lit_bluelm.status import Preempted, StopSignals, active


class Preemption(L.Callback):
    @property
    def signals(self) -> StopSignals | None:
        return active()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signals = self.signals
        if signals is not None:
            signals.install()  # Lightning installed its own SIGTERM handler when fit started
            signals.deferred = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signals is not None:
            self.signals.deferred = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.signals is not None:
            self.signals.deferred = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # the first micro-batch of an optimizer step
            self._check(trainer, pl_module)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signals = self.signals
        if signals is None:
            return
        signum = float(signals.signum or 0)
        if trainer.world_size > 1:  # every rank stops at the same boundary
            flags = trainer.strategy.reduce(torch.tensor([signum], device=pl_module.device), reduce_op="max")
            signum = float(flags.item())
        if signum:
            raise Preempted(int(signum))
