"""Data bookkeeping at optimizer-step boundaries: tells the datamodule when the batches of a step
are trained (``step_done``), and logs ``data/skipped`` (every sample the loader skipped),
``data/skipped/<reason>`` (the same by reason, ``datamodules.kinds.SKIP_REASONS``),
``data/too_long`` (= ``data/skipped/too_long``, kept for existing dashboards),
``data/packing_efficiency`` and ``data/frac/<source>`` (the realised share of draws per source
since the last log: a document, or a piece of a split one, is one draw). The totals are kept in
checkpoints (``data_skipped``, ``data_too_long``, ``data_skipped_by_reason``).

Uses the datamodule's documented ``step_done()`` and ``take_counts()``. It must come before
``LastCheckpoint`` in the callback list, so a checkpoint saved at a step includes that step's
batches.
"""

from __future__ import annotations

from typing import Any, Dict, List

import lightning as L
import torch

from datamodules.kinds import SKIP_REASONS, Skips


class DataProgress(L.Callback):
    def __init__(self, sources: List[str]) -> None:
        self.sources = list(sources)
        self.skipped = Skips()  # this rank's skipped samples (rank 0 also holds the resumed total)
        self._real = self._slots = 0
        self._docs: Dict[str, int] = {}
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        counts = trainer.datamodule.take_counts()
        self.skipped = self.skipped + counts.skipped
        self._real += counts.real_tokens
        self._slots += counts.slots
        for name, n in counts.documents.items():
            self._docs[name] = self._docs.get(name, 0) + n
        if trainer.global_step == self._step_at_batch_start:
            return  # gradient accumulation: no optimizer step yet
        # the optimizer update has been applied: the step's batches now count for resuming
        trainer.datamodule.step_done()
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # one collective for every count: skipped samples, real tokens, slots, documents per source
        n = len(SKIP_REASONS)
        local = [
            *self.skipped.as_list(),
            self._real,
            self._slots,
            *(self._docs.get(name, 0) for name in self.sources),
        ]
        counts = trainer.strategy.reduce(
            torch.tensor([float(c) for c in local], device=pl_module.device), reduce_op="sum"
        )
        by_reason, real, slots, docs = counts[:n], counts[n], counts[n + 1], counts[n + 2 :]
        pl_module.log("data/skipped", by_reason.sum(), on_step=True, on_epoch=False)
        pl_module.log(
            "data/too_long", by_reason[SKIP_REASONS.index("too_long")], on_step=True, on_epoch=False
        )
        for reason, count in zip(SKIP_REASONS, by_reason, strict=True):
            pl_module.log(f"data/skipped/{reason}", count, on_step=True, on_epoch=False)
        if slots > 0:  # real tokens / row slots since the last log (padding is the rest)
            pl_module.log("data/packing_efficiency", real / slots, on_step=True, on_epoch=False)
        if docs.sum() > 0:  # realised fraction of draws per source since the last log
            for name, frac in zip(self.sources, (docs / docs.sum()).tolist(), strict=True):
                pl_module.log(f"data/frac/{name}", frac, on_step=True, on_epoch=False)
        self._real = self._slots = 0
        self._docs = {}

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        # every rank calls this; the summed count is stored once (rank 0 restores it)
        local = torch.tensor([float(c) for c in self.skipped.as_list()], device=pl_module.device)
        total = Skips.of([int(c) for c in trainer.strategy.reduce(local, reduce_op="sum").tolist()])
        checkpoint["data_skipped"], checkpoint["data_too_long"] = total.total, total.too_long
        checkpoint["data_skipped_by_reason"] = total.as_dict()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        rank0 = trainer.global_rank == 0
        if not rank0:
            self.skipped = Skips()
        elif "data_skipped_by_reason" in checkpoint:
            self.skipped = Skips.of(checkpoint["data_skipped_by_reason"])
        else:  # a checkpoint older than the reasons: its totals
            self.skipped = Skips.of([checkpoint.get("data_skipped", 0), checkpoint.get("data_too_long", 0)])
