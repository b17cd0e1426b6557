"""Crash-safe ``last.ckpt``: written every N optimizer steps and at the final step, plus
``on_exception.ckpt`` when training is stopped or fails."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_bluelm.checkpoint_io import remove_stale_temporaries, swap_in_folder
from lit_bluelm.status import Diverged, Preempted

log = logging.getLogger(__name__)
ON_EXCEPTION = "on_exception.ckpt"


class LastCheckpoint(Callback):
    """Saves ``<dirpath>/last.ckpt`` every ``every_n_steps`` optimizer steps and when ``max_steps``
    is reached.

    It saves inside the training loop (like ``ModelCheckpoint``), so a run resumed from it
    continues its step counters exactly. A file is written atomically by the run's checkpoint
    IO (``lit_bluelm.checkpoint_io``: temporary file, fsync, one rename); a sharded folder is
    written beside it and swapped in, and an interrupted swap is repaired at the next save or
    resume. Either way a crash, a kill or a full disk while saving keeps the previous
    ``last.ckpt``. TensorBoard is flushed at every save, so the curves reach the checkpoint.

    ``on_exception.ckpt`` beside it holds the state of the last finished step when training is
    stopped (SIGTERM/SIGINT, :class:`Preempted`: at a step boundary on every rank) or, in a
    single-process run, fails; ``last.ckpt`` is left as it was. It is not written when
    - the run diverged (its last update was skipped; ``last.ckpt`` is the checkpoint to keep),
    - the failure happened inside ``optimizer.step`` (the weights may be half-updated),
    - the failure was a checkpoint save itself (the emergency save would fail the same way and
      hide the cause),
    - ranks failed separately (multi-process): a collective save could hang.
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
        self._updating = False  # between the optimizer step's gradient checks and its end
        self._saving = False
        self._exception_save = False
        self.exception_path: Path | None = None  # on_exception.ckpt, once this run wrote it

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_loop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_loop = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self._updating = True  # from here to the end of the batch the weights may be mid-update

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._updating = False
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
        if not self._in_loop or isinstance(exception, Diverged):
            return
        path = self.path.with_name(ON_EXCEPTION)
        if self._saving:
            log.error("no %s: the failure was a checkpoint save", ON_EXCEPTION)
        elif self._updating and not isinstance(exception, Preempted):
            log.error(
                "no %s: the failure happened inside optimizer.step, so the weights may be "
                "half-updated; resume from %s (resume_from=auto takes it)",
                ON_EXCEPTION,
                self.path,
            )
        elif isinstance(exception, Preempted) or trainer.world_size == 1:
            self._exception_save = True
            try:
                self.save(trainer, path)
                self.exception_path = path
            except Exception as err:  # the original failure is what the run reports
                log.error("could not write %s: %s", path, err)
            finally:
                self._exception_save = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        # Lightning's logging step (``_batches_that_stepped``) is one behind ``global_step`` in a
        # checkpoint saved at the end of a step, and a resumed run adds one. An exception
        # checkpoint is written after the count moved on: stored as is, the resumed curves would
        # skip a step. Stored at the end-of-step value, they continue without a hole.
        if not self._exception_save or trainer.global_step == 0:
            return
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in loop:
            loop["_batches_that_stepped"] = trainer.global_step - 1

    def save(self, trainer: L.Trainer, path: Path | None = None) -> None:
        path = path or self.path
        folders = getattr(trainer.strategy, "writes_folders", False)
        tmp = path.with_name(path.name + ".tmp")
        self._saving = True
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            # left by a kill during an earlier save; repairs an interrupted folder swap too
            remove_stale_temporaries(path.parent)
        if folders:
            trainer.strategy.barrier("last_checkpoint_prepare")
            trainer.save_checkpoint(tmp, weights_only=False)  # every rank; ends with a barrier
            if trainer.is_global_zero:
                swap_in_folder(tmp, path)
            trainer.strategy.barrier("last_checkpoint_swap")
        else:
            trainer.save_checkpoint(path, weights_only=False)  # atomic: AtomicCheckpointIO
        self._saving = False
        for logger in trainer.loggers:  # the curves up to the checkpoint are on disk with it
            experiment = logger.experiment
            if hasattr(experiment, "flush"):
                experiment.flush()


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` by the stage's metric, except that a non-finite value
    (a diverging run's NaN validation loss) never becomes "best"."""

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not torch.isfinite(torch.as_tensor(current)).all():
            return False
        return super().check_monitor_top_k(trainer, current)
