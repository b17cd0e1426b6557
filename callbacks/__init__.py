"""Behaviour that hooks into the Lightning loop: checkpointing, data progress, mixture schedules.

``default_callbacks`` is the list every stage runs with; a stage module adds its own through
Lightning's ``configure_callbacks()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

from callbacks.checkpoint import BestCheckpoint, LastCheckpoint
from callbacks.data_progress import DataProgress
from callbacks.guard import NonFiniteGuard
from callbacks.preemption import Preemption
from callbacks.resampling import ResamplingSchedule


def default_callbacks(cfg: Any, best_metric: str, best_mode: str) -> List[Any]:
    """The callbacks of every run, in the order they must run (see each one's docstring).
    ``best_metric`` / ``best_mode``: what the stage module chooses its best checkpoint by."""
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    t = cfg.trainer
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    adaptive = cfg.data.adaptive
    callbacks = [
        # skips non-finite updates on every rank; stops a diverged run. Before LastCheckpoint,
        # which marks the update as in progress once the guard let it through
        NonFiniteGuard(t.max_bad_steps),
        # marks optimizer-step boundaries for the data state and logs data/*; before LastCheckpoint
        DataProgress(list(cfg.data.mix)),
        # logs data/weight/<source>; adapts the weights to lagging sources when enabled
        ResamplingSchedule(adaptive.enabled, adaptive.eta, adaptive.smoothing),
        # last.ckpt every few steps and at the end (with adaptive weights, again after a
        # validation at that step, so after ResamplingSchedule above); on_exception.ckpt when fit
        # is interrupted
        LastCheckpoint(
            ckpt_dir,
            cfg.checkpoint.every_n_steps or t.val_check_interval,
            resave_after_validation=adaptive.enabled,
        ),
        # best by the stage's metric, saved after each validation (never a non-finite one)
        BestCheckpoint(
            dirpath=ckpt_dir,
            filename="best-step={step}",
            auto_insert_metric_name=False,
            monitor=best_metric,
            mode=best_mode,
            save_top_k=cfg.checkpoint.save_top_k,
            enable_version_counter=False,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if t.enable_progress_bar:  # tqdm: the rich bar costs several ms per step on small models
        callbacks.append(TQDMProgressBar(refresh_rate=t.progress_refresh_rate))
    # last: stops at a step boundary on SIGTERM/SIGINT, after the step was counted and saved
    callbacks.append(Preemption())
    return callbacks


__all__ = [
    "BestCheckpoint",
    "DataProgress",
    "LastCheckpoint",
    "NonFiniteGuard",
    "Preemption",
    "ResamplingSchedule",
    "default_callbacks",
]
