"""Train one stage of the BlueLM pipeline.

    python train.py stage=joint [model=tiny] [key=value ...]

Arguments are ``key=value`` overrides of the config (see README, "Config reference"):
``stage=`` and ``model=`` pick ``configs/stage/<stage>.yaml`` and ``configs/model/<model>.yaml``;
``dry_run=true`` prints the resolved config and the parameter table without training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from lit_bluelm.config import ConfigError, available, load_config, to_container

USAGE = (
    __doc__.strip()
    + f"""

stages: {", ".join(available("stage"))}
models: {", ".join(available("model"))}"""
)


def dry_run(cfg: DictConfig) -> None:
    """Resolved config and per-component parameter counts, built on the meta device."""
    from lit_bluelm.models import build_model, parameter_table

    model = build_model(cfg.model, device="meta")
    print(OmegaConf.to_yaml(cfg), end="")
    rows = parameter_table(model)
    print(f"{'component':<10} {'params':>16}")
    for name, count in rows:
        print(f"{name:<10} {count:>16,}")
    print(f"total_params={rows[-1][1]}")


def attach_tokenizer(cfg: DictConfig, tokenizer) -> None:
    """Resolve ``model.image_token_id`` and check that the LLM's vocabulary covers the tokenizer."""
    from lit_bluelm.models.llm import llm_config
    from lit_bluelm.tokenizer import IMAGE

    vocab = llm_config(cfg.model.llm).vocab_size
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


def _quiet_known_warnings() -> None:
    import warnings

    # BlueLMModule reads the loader's skip count in on_before_batch_transfer, on purpose
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")
    # raised inside Lightning by newer torch; nothing to act on here
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)`? is deprecated.*")


def build_trainer(cfg: DictConfig):
    import lightning as L
    from lightning.pytorch.callbacks import (
        LearningRateMonitor,
        ModelCheckpoint,
        TQDMProgressBar,
    )
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks import LastCheckpoint, ResamplingSchedule
    from lit_bluelm.parallel import FSDP2Strategy

    t = cfg.trainer
    strategy, precision = t.strategy, t.precision
    if strategy == "fsdp":
        strategy = FSDP2Strategy()
        if precision == "bf16-mixed":  # done by FSDP2's MixedPrecisionPolicy (see BlueLMModule)
            precision = "32-true"
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    callbacks = [
        # best by validation loss, saved after each validation
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-step={step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            mode="min",
            save_top_k=cfg.checkpoint.save_top_k,
            enable_version_counter=False,
        ),
        # logs data/weight/<source>; adapts the weights to lagging sources when enabled
        ResamplingSchedule(cfg.data.adaptive.enabled, cfg.data.adaptive.eta, cfg.data.adaptive.smoothing),
        # last.ckpt every few steps and at the end (with adaptive weights, again after a
        # validation at that step, so after ResamplingSchedule above); on_exception.ckpt when fit
        # is interrupted
        LastCheckpoint(
            ckpt_dir,
            cfg.checkpoint.every_n_steps or t.val_check_interval,
            resave_after_validation=cfg.data.adaptive.enabled,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if t.enable_progress_bar:  # tqdm: the rich bar costs several ms per step on small models
        callbacks.append(TQDMProgressBar(refresh_rate=t.progress_refresh_rate))
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
        logger=TensorBoardLogger(save_dir=cfg.run_dir, name="tensorboard", version=""),
        callbacks=callbacks,
        default_root_dir=cfg.run_dir,
    )


def check_names(cfg: DictConfig) -> None:
    """Look up every registry name now, so a typo stops the run before data or model work."""
    from lit_bluelm.models import ADAPTERS, LLMS, VISION_ENCODERS
    from lit_bluelm.modules import STAGE_MODULES
    from lit_bluelm.modules.optim import OPTIMIZERS
    from lit_bluelm.registry import lookup

    lookup(STAGE_MODULES, cfg.module, "module")
    lookup(OPTIMIZERS, cfg.optim.name, "optim.name")
    lookup(LLMS, cfg.model.llm.name, "model.llm.name")
    if not cfg.model.text_only:
        lookup(VISION_ENCODERS, cfg.model.vision.name, "model.vision.name")
        lookup(ADAPTERS, cfg.model.adapter.name, "model.adapter.name")


def _val_loss(results: List[dict]) -> Optional[float]:
    return float(results[0]["val/loss"]) if results and "val/loss" in results[0] else None


def run(cfg: DictConfig) -> dict:
    """Train one stage; returns a summary (val losses, checkpoint paths, steps)."""
    import lightning as L

    from callbacks import LastCheckpoint
    from datamodules.datamodule import BlueLMDataModule
    from datamodules.demo import ensure_demo_data
    from lit_bluelm.modules import STAGE_MODULES

    _quiet_known_warnings()
    check_names(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    module_cls = STAGE_MODULES[cfg.module]
    ensure_demo_data(cfg)
    datamodule = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, datamodule.tokenizer)
    module_cls.check(cfg, datamodule.tokenizer)
    trainer = build_trainer(cfg)
    module = module_cls(to_container(cfg))
    if trainer.is_global_zero:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(cfg.run_dir) / "config.yaml")
        print(f"run_dir={cfg.run_dir}", flush=True)

    start = time.time()
    before = None
    if cfg.validate_before_fit and not cfg.resume_from:
        before = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume_from, weights_only=True)
    last = next(cb.path for cb in trainer.callbacks if isinstance(cb, LastCheckpoint))
    after = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False))
    by_source = {
        key[len("val/loss/") :]: round(float(value), 4)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/loss/")
    }
    summary = {
        "val_loss_before": before,
        "val_loss_after": after,
        "global_step": trainer.global_step,
        "last_ckpt": str(last.resolve()),
        "best_ckpt": trainer.checkpoint_callback.best_model_path or None,
        "train_seconds": f"{time.time() - start:.1f}",
    }
    if trainer.is_global_zero:
        summary_path = Path(cfg.run_dir) / "summary.json"
        record = {"stage": cfg.stage, "module": cfg.module, **summary, "val_loss_after_by_source": by_source}
        summary_path.write_text(json.dumps(record, indent=1))
        for key, value in summary.items():
            if value is not None:
                print(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}", flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    try:
        cfg = load_config(argv)
        if cfg.dry_run:
            dry_run(cfg)
        else:
            run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
