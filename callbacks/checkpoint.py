"""Crash-safe ``last.ckpt``: written every N optimizer steps and at the final step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class LastCheckpoint(Callback):
    """Saves ``<dirpath>/last.ckpt`` every ``every_n_steps`` optimizer steps and when ``max_steps``
    is reached.

    It saves inside the training loop (like ``ModelCheckpoint``), so a run resumed from it
    continues its step counters exactly. The checkpoint is written under a temporary name and
    then swapped in, so a crash while saving never leaves a broken ``last.ckpt`` behind; this
    also holds for sharded (folder) checkpoints.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, filename: str = "last.ckpt") -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._saved_step or step == 0:  # gradient-accumulation micro-batches
            return
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        old = self.path.with_name(self.path.name + ".old")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("last_checkpoint_prepare")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank; ends with a barrier
        if trainer.is_global_zero:
            _remove(old)
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            _remove(old)
        trainer.strategy.barrier("last_checkpoint_swap")
        self._saved_step = trainer.global_step


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
