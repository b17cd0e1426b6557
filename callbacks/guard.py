"""The non-finite guard: a step whose loss or gradients are not finite is not applied.

The loss of every micro-batch is checked before its backward pass and the gradients before the
optimizer step (each rank its own shard); one flag, summed over ranks, decides for all of them,
so no rank ever steps alone. A skipped step drops its gradients, so the optimizer leaves every
parameter and its moments as they were; the step still counts (its batches are consumed,
``global_step`` and the LR schedule advance) and is logged as ``train/skipped_steps`` (the run's
total). After ``max_bad_steps`` skipped steps in a row the run stops with :class:`Diverged`
(``status=diverged``), naming the first of them.

Costs one host sync and, with several ranks, one all-reduce of one number per optimizer step.
"""

from __future__ import annotations

from typing import Any, Dict, List

import lightning as L
import torch

from lit_bluelm.status import Diverged


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (an FSDP2 DTensor's local shard)."""
    to_local = getattr(grad, "to_local", None)
    return to_local() if callable(to_local) else grad


def grads_finite(grads: List[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor: every value of every gradient is finite (no host sync)."""
    if not grads:
        return torch.tensor(True)
    # one foreach pass over all gradients (what clip_grad_norm_ uses); NaN and inf propagate
    return torch.isfinite(torch.nn.utils.get_total_norm([_local(g).detach() for g in grads]))


class NonFiniteGuard(L.Callback):
    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # skipped steps of the run (resumed with the checkpoint)
        self.in_a_row = 0
        self.first_bad = -1  # global step of the first of the current bad streak
        self._loss_ok: torch.Tensor | None = None
        self._step_at_batch_start = -1

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        ok = grads_finite([p.grad for p in params])
        if self._loss_ok is not None:
            ok = ok & self._loss_ok.to(ok.device)
        self._loss_ok = None
        bad = (~ok).float().reshape(1).to(pl_module.device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        step = trainer.global_step
        if bad.item() > 0:
            for p in params:  # the optimizer skips parameters without a gradient
                p.grad = None
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row == 1:
                self.first_bad = step
        else:
            self.in_a_row = 0
        if self.in_a_row >= self.max_bad_steps:
            raise Diverged(
                f"training diverged: the loss or gradients were non-finite at {self.in_a_row} "
                f"optimizer steps in a row from step {self.first_bad} (trainer.max_bad_steps="
                f"{self.max_bad_steps}); those updates were skipped. Lower the learning rate or "
                "restart from an earlier checkpoint"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # at the logging steps only (a log call costs more than the check itself)
        step = trainer.global_step
        if step != self._step_at_batch_start and step % trainer.log_every_n_steps == 0:
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "first_bad": self.first_bad}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
        self.first_bad = int(state_dict.get("first_bad", -1))
