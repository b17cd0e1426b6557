"""The base LightningModule of every stage: it owns ``self.model`` (a :class:`BlueLM`), builds it
in ``configure_model`` (so FSDP can shard it), starts it from ``init_from``, freezes components
whose learning rate is 0, shards it, and sets up the optimizer and LR schedule. Nothing else:
training and validation belong to the objective's subclass."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from lit_bluelm.checkpoint import load_model_weights
from lit_bluelm.config import CONFIG_VERSION, from_container
from lit_bluelm.errors import ConfigError
from lit_bluelm.models import BlueLM, build_model
from lit_bluelm.modules.optim import build_optimizer, freeze_components
from lit_bluelm.parallel import apply_fsdp, fsdp_param_dtype

Batch = Dict[str, Any]


class BlueLMModule(L.LightningModule):
    """Subclasses implement ``training_step`` and ``validation_step`` for their objective and
    declare how a run of theirs is judged (the class attributes below)."""

    # the best checkpoint is chosen by this logged metric and mode (ModelCheckpoint)
    best_metric: ClassVar[str] = "val/loss"
    best_mode: ClassVar[str] = "min"
    # summary.json and the closing lines: <name>_before / <name>_after for each logged metric
    summary_metrics: ClassVar[Dict[str, str]] = {"val_loss": "val/loss"}
    # logged metrics under this prefix go to summary.json as <first summary name>_after_by_source
    summary_by_source: ClassVar[Optional[str]] = None
    # what the objective reads (datamodules.kinds.sample_shape): single "sequences", (chosen,
    # rejected) "pairs" or "prompts" to sample from; every source of a stage is of that shape
    reads: ClassVar[str] = "sequences"

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__()
        # plain containers only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters({"cfg": cfg, "config_version": CONFIG_VERSION})
        self.cfg = from_container(cfg)
        self.model: Optional[BlueLM] = None

    @classmethod
    def check(cls, cfg: DictConfig, tokenizer: Any) -> None:
        """Start-up checks of what this objective needs from the tokenizer and its sources
        (after the config's own checks, before any data or model work). Here: every source
        is of the sample shape the objective reads (:attr:`reads`)."""
        from datamodules.kinds import SAMPLE_KINDS, sample_shape

        for name, src in cfg.data.sources.items():
            if src.kind in SAMPLE_KINDS and sample_shape(src.kind) != cls.reads:
                kinds = sorted(k for k in SAMPLE_KINDS if sample_shape(k) == cls.reads)
                raise ConfigError(
                    f"module={cfg.module} reads {cls.reads} (kinds {', '.join(kinds)}): "
                    f"data.sources.{name} is {src.kind}"
                )

    def summary_extra(self) -> Dict[str, Any]:
        """More ``summary.json`` keys of a finished run (collective: every rank calls it)."""
        return {}

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Lightning may call it again (validate, then fit)
            return
        cfg = self.cfg
        model = build_model(cfg.model, cfg.context)
        self.initialize(model)
        frozen = freeze_components(model, cfg.optim.lr)
        if frozen:
            rank_zero_info(f"frozen (lr=0): {', '.join(frozen)}")
        if cfg.fsdp.activation_checkpointing:
            model.enable_activation_checkpointing()
        if cfg.trainer.strategy == "fsdp":
            mesh = self.device_mesh["data_parallel"]
            apply_fsdp(model, mesh, fsdp_param_dtype(cfg.trainer.precision), cfg.fsdp.reshard_after_forward)
        self.model = model

    def initialize(self, model: BlueLM) -> None:
        """Starting weights of a new run (before freezing and sharding): ``init_from``, if set.
        On resume the checkpoint's weights replace these afterwards, so ``init_from`` is not
        read then (``resume_from=auto`` may find a checkpoint in a run started from one)."""
        cfg = self.cfg
        if cfg.init_from and not cfg.resume_from:
            keys = load_model_weights(model, cfg.init_from, "init_from")
            rank_zero_info(
                f"init_from {cfg.init_from}: loaded weights; {len(keys['missing'])} tensors kept "
                f"their init, {len(keys['unexpected'])} checkpoint tensors unused"
            )

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Dict[str, Any]:
        assert self.model is not None
        optimizer, scheduler = build_optimizer(self.model, self.cfg.optim, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
