"""Mixture weights during training: logs them, and adapts them to lagging sources.

The piecewise-linear schedule itself (``data.schedule``) needs no callback: it is a pure function
of the batch index that every DataLoader worker evaluates (``datamodules.streams.MixtureWeights``).
This callback logs the effective weights as ``data/weight/<source>`` and, with
``data.adaptive.enabled``, updates multipliers after every validation, DoReMi-style:

    lag_s = val_loss_s / reference_s           (reference: the first validation's loss)
    m_s  <- m_s * exp(eta * (lag_s - mean(lag)))  then normalised to mean 1
    m_s  <- (1 - smoothing) * m_s + smoothing

so sources whose loss fell least are drawn more. The multipliers reach the workers through the
datamodule's shared-memory log (``weights.push``), from a batch index no worker has produced yet,
which keeps resumed runs exact.

It uses the datamodule's two documented methods ``mixture_weights()`` (source -> weight in
force) and ``set_multipliers()``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import lightning as L


class ResamplingSchedule(L.Callback):
    def __init__(self, adaptive: bool = False, eta: float = 1.0, smoothing: float = 0.2) -> None:
        self.adaptive = adaptive
        self.eta = eta
        self.smoothing = smoothing
        self.reference: Optional[List[float]] = None
        self.multipliers: Optional[List[float]] = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps:
            return
        for name, w in trainer.datamodule.mixture_weights().items():
            pl_module.log(f"data/weight/{name}", w, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.adaptive or trainer.sanity_checking:
            return
        names = list(trainer.datamodule.mixture_weights())
        metrics = trainer.callback_metrics
        losses = [metrics.get(f"val/loss/{n}") for n in names]
        if any(v is None for v in losses):
            return  # a source without validation data: nothing to compare
        losses = [float(v) for v in losses]
        if self.reference is None:  # the first validation (before fit, or the first in it)
            self.reference = losses
            self.multipliers = [1.0] * len(names)
            return
        if trainer.state.fn != "fit":
            return
        self.multipliers = self.update(self.multipliers, losses, self.reference)
        trainer.datamodule.set_multipliers(dict(zip(names, self.multipliers, strict=True)))

    def update(self, multipliers: List[float], losses: List[float], reference: List[float]) -> List[float]:
        lag = [loss / max(ref, 1e-8) for loss, ref in zip(losses, reference, strict=True)]
        mean_lag = sum(lag) / len(lag)
        raised = [m * math.exp(self.eta * (g - mean_lag)) for m, g in zip(multipliers, lag, strict=True)]
        mean = sum(raised) / len(raised)
        return [(1 - self.smoothing) * m / mean + self.smoothing for m in raised]

    def state_dict(self) -> Dict[str, Any]:
        return {"reference": self.reference, "multipliers": self.multipliers}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self.multipliers = state_dict.get("multipliers")
