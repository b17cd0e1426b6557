"""Running a stage: start-up checks, the Trainer, fit, and the run's summary. ``train.py`` and
the tests call :func:`fit_stage`; the strategy/precision mapping is ``lit_bluelm.parallel``'s."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Type

from omegaconf import DictConfig, OmegaConf

from lit_bluelm.errors import ConfigError


def quiet_known_warnings() -> None:
    # raised inside Lightning by newer torch; nothing to act on here
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)`? is deprecated.*")


def stage_module(cfg: DictConfig) -> Type[Any]:
    """The stage LightningModule class ``cfg.module`` names."""
    from lit_bluelm.modules import STAGE_MODULES
    from lit_bluelm.registry import lookup

    return lookup(STAGE_MODULES, cfg.module, "module")


def check_names(cfg: DictConfig) -> None:
    """Look up every registry name now, so a typo stops the run before data or model work."""
    from lit_bluelm.models import ADAPTERS, LLMS, VISION_ENCODERS
    from lit_bluelm.modules.optim import OPTIMIZERS
    from lit_bluelm.registry import lookup

    stage_module(cfg)
    lookup(OPTIMIZERS, cfg.optim.name, "optim.name")
    lookup(LLMS, cfg.model.llm.name, "model.llm.name")
    if not cfg.model.text_only:
        lookup(VISION_ENCODERS, cfg.model.vision.name, "model.vision.name")
        lookup(ADAPTERS, cfg.model.adapter.name, "model.adapter.name")


def attach_tokenizer(cfg: DictConfig, tokenizer: Any) -> None:
    """Resolve ``model.image_token_id`` and check that the LLM's vocabulary covers the tokenizer."""
    from lit_bluelm.models.llm import llm_config
    from lit_bluelm.tokenizer import IMAGE

    vocab = llm_config(cfg.model.llm, cfg.context.rope).vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"tokenizer.path has {len(tokenizer)} tokens but the LLM vocabulary is {vocab}; "
            "raise model.llm.config.vocab_size"
        )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if cfg.model.image_token_id is not None and cfg.model.image_token_id != image_id:
        raise ConfigError(
            f"model.image_token_id={cfg.model.image_token_id} but the tokenizer's {IMAGE} is {image_id}"
        )
    cfg.model.image_token_id = image_id


def check_run_dir(cfg: DictConfig) -> None:
    """``run_dir`` can be created and written (one line and exit 2 otherwise, before any work).
    Nothing is created: the probe file goes into the nearest folder that exists, so a run
    refused by a later check leaves no empty run folder behind."""
    run_dir = Path(cfg.run_dir).absolute()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"'{existing}' is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"run_dir: cannot write to '{cfg.run_dir}': {err.strerror or err}") from None


def resumed_step(cfg: DictConfig) -> Optional[int]:
    """The global step of the checkpoint a resumed run continues from (None for a new run)."""
    if not cfg.resume_from:
        return None
    from lit_bluelm.checkpoint import read_meta

    return int(read_meta(cfg.resume_from, "resume_from").get("global_step", 0))


def build_trainer(cfg: DictConfig, module_cls: Type[Any]):
    """The Lightning Trainer of a run: strategy, precision, loop counts in optimizer steps, the
    default callbacks (the module's own come from its ``configure_callbacks``), atomic checkpoint
    writes, TensorBoard (a resumed run purges the events logged after its checkpoint, so the
    curves have no duplicates)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks import default_callbacks
    from lit_bluelm.checkpoint_io import AtomicCheckpointIO
    from lit_bluelm.parallel import strategy_and_precision

    t = cfg.trainer
    strategy, precision = strategy_and_precision(t.strategy, t.precision)
    step = resumed_step(cfg)
    tensorboard = {"purge_step": step} if step is not None else {}
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=t.max_steps,
        # Lightning counts batches here; the config counts optimizer steps
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,  # validation by optimizer steps on endless streams
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        inference_mode=False,  # no_grad: metric states stay usable across validate() and fit()
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar,
        logger=TensorBoardLogger(save_dir=cfg.run_dir, name="tensorboard", version="", **tensorboard),
        callbacks=default_callbacks(cfg, module_cls.best_metric, module_cls.best_mode),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.run_dir,
    )


def prepare(cfg: DictConfig):
    """Start-up checks and construction: (datamodule, module, trainer). Resolves what the
    config's paths hold (``lit_bluelm.startup``), then writes the resolved ``config.yaml`` and
    the run's tokenizer copy into ``run_dir``."""
    import lightning as L

    from datamodules.datamodule import BlueLMDataModule
    from datamodules.demo import ensure_demo_data
    from lit_bluelm.checkpoint import copy_tokenizer
    from lit_bluelm.config import to_container
    from lit_bluelm.startup import resolve_inputs

    quiet_known_warnings()
    resolve_inputs(cfg)  # what the config's paths hold, before run_dir is touched
    check_run_dir(cfg)
    check_names(cfg)
    module_cls = stage_module(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    ensure_demo_data(cfg)
    datamodule = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, datamodule.tokenizer)
    module_cls.check(cfg, datamodule.tokenizer)
    trainer = build_trainer(cfg, module_cls)
    module = module_cls(to_container(cfg))
    if trainer.is_global_zero:
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        copy_tokenizer(cfg.tokenizer.path, run_dir, cfg.sft.think_token_position)
    return datamodule, module, trainer


def _metrics(results: Any, names: Dict[str, str]) -> Dict[str, Optional[float]]:
    first = results[0] if results else {}
    return {name: float(first[m]) if m in first else None for name, m in names.items()}


def fit_stage(cfg: DictConfig) -> Dict[str, Any]:
    """Train one stage; returns its summary (also written to ``<run_dir>/summary.json``), whose
    ``status`` says how it ended (``lit_bluelm.status``). A config error raises ConfigError
    before any work; a failed run writes its summary and raises."""
    from lit_bluelm.status import handle_signals

    with handle_signals():
        return _fit_stage(cfg)


def _fit_stage(cfg: DictConfig) -> Dict[str, Any]:
    from callbacks import LastCheckpoint
    from lit_bluelm.status import Preempted, RunStopped, active
    from lit_bluelm.summary import print_summary, write_summary

    run: Dict[str, Any] = {}  # what exists so far: trainer, module, names, before
    status, error = "ok", None
    start = time.time()
    try:
        datamodule, run["module"], run["trainer"] = prepare(cfg)
        module, trainer = run["module"], run["trainer"]
        if trainer.is_global_zero:
            print(f"run_dir={cfg.run_dir}", flush=True)
        names = module.summary_metrics
        run["before"] = {name: None for name in names}
        if cfg.validate_before_fit and not cfg.resume_from:
            run["before"] = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False), names)
        if cfg.trainer.max_steps > 0:  # 0: validation only (the starting weights, as val_*_after)
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume_from, weights_only=True)
        signals = active()
        if signals is not None and signals.requested:  # during the last step: no validation now
            raise Preempted(signals.signum)
        run["after"] = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False), names)
    except ConfigError:
        raise
    except RunStopped as stop:
        status, error = stop.status, str(stop)
    except Exception as err:
        status, error = "failed", str(err).splitlines()[0] if str(err) else type(err).__name__
        failure = err  # re-raised below: a traceback, or one line for a RunError
    trainer, module = run.get("trainer"), run.get("module")
    names = module.summary_metrics if module is not None else {"val_loss": "val/loss"}
    before = run.get("before") or {name: None for name in names}
    after = run.get("after") or {name: None for name in names}
    summary: Dict[str, Any] = {}
    for name in names:
        summary[f"{name}_before"], summary[f"{name}_after"] = before[name], after[name]
    last_cb = (
        next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None) if trainer else None
    )
    last = last_cb.path if last_cb is not None and last_cb.path.exists() else None
    best = trainer.checkpoint_callback.best_model_path if trainer is not None else None
    summary |= {
        "global_step": trainer.global_step if trainer is not None else 0,
        "last_ckpt": str(last.resolve()) if last else None,
        # a diverged run has no best checkpoint to offer (the chain must not go on from it)
        "best_ckpt": (best or None) if status != "diverged" else None,
        "on_exception_ckpt": str(last_cb.exception_path.resolve())
        if last_cb is not None and last_cb.exception_path is not None
        else None,
        "train_seconds": f"{time.time() - start:.1f}",
        "status": status,
    }
    if error is not None:
        summary["error"] = error
    if module is not None and status == "ok" and cfg.trainer.max_steps > 0:
        summary |= module.summary_extra()
    if trainer is None or trainer.is_global_zero:
        by_source = {}
        if module is not None and module.summary_by_source and status == "ok":
            prefix = module.summary_by_source
            by_source = {
                f"{next(iter(names))}_after_by_source": {
                    k[len(prefix) :]: round(float(v), 4)
                    for k, v in trainer.callback_metrics.items()
                    if k.startswith(prefix)
                }
            }
        with contextlib.suppress(OSError):  # a run stopped before prepare() made its folder
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if Path(cfg.run_dir).is_dir():
            write_summary(cfg.run_dir, {"stage": cfg.stage, "module": cfg.module, **summary, **by_source})
        print_summary({k: v for k, v in summary.items() if k != "error"})
        if error is not None and status != "failed":
            print(f"error: {error}", file=sys.stderr, flush=True)
    if status == "failed":
        raise failure
    return summary


def dry_run(cfg: DictConfig) -> None:
    """Resolved config and per-component parameter counts, built on the meta device."""
    from lit_bluelm.models import build_model, parameter_table
    from lit_bluelm.startup import resolve_inputs

    resolve_inputs(cfg)
    model = build_model(cfg.model, cfg.context, device="meta")
    print(OmegaConf.to_yaml(cfg), end="")
    rows = parameter_table(model)
    print(f"{'component':<10} {'params':>16}")
    for name, count in rows:
        print(f"{name:<10} {count:>16,}")
    print(f"total_params={rows[-1][1]}")
