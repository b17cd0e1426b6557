"""Crash-safe ``last.ckpt``: written every N optimizer steps and at the final step, plus
``on_exception.ckpt`` when training is interrupted."""

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

    When a single-process run fails or is interrupted (Ctrl-C) inside the training loop, the
    state of the last finished step goes to ``on_exception.ckpt`` beside it, to resume from
    explicitly with ``resume_from``; ``last.ckpt`` is left as it was. Multi-process runs rely on
    ``last.ckpt`` alone: ranks fail at different points, and a collective save could hang.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int,
        filename: str = "last.ckpt",
        resave_after_validation: bool = False,
    ) -> None:
        assert every_n_steps >= 1, every_n_steps  # checkpoint.every_n_steps is checked at start-up
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self._step_at_batch_start = -1
        self._saved_step = -1
        self.resave_after_validation = resave_after_validation
        self._in_loop = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_loop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_loop = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._step_at_batch_start:  # no optimizer step (gradient accumulation)
            return
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self.save(trainer)
            self._saved_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation at the step just saved runs after the save, and Lightning does not repeat
        # it when resuming from that checkpoint. When the validation changes training state
        # (adaptive mixture weights), save again so last.ckpt holds it; this callback must come
        # after the callbacks that act on validation (default_callbacks orders them).
        if (
            self.resave_after_validation
            and self._in_loop
            and not trainer.sanity_checking
            and trainer.global_step == self._saved_step
        ):
            self.save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._in_loop and trainer.world_size == 1:
            self.save(trainer, self.path.with_name("on_exception.ckpt"))

    def save(self, trainer: L.Trainer, path: Path | None = None) -> None:
        path = path or self.path
        tmp = path.with_name(path.name + ".tmp")
        old = path.with_name(path.name + ".old")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("last_checkpoint_prepare")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank; ends with a barrier
        if trainer.is_global_zero:
            _remove(old)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        trainer.strategy.barrier("last_checkpoint_swap")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
