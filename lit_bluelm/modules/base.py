"""The base LightningModule every stage uses: it owns ``self.model`` (a :class:`BlueLM`), builds it
in ``configure_model`` (so FSDP can shard it), sets up the optimizer and LR schedule, and keeps
the bookkeeping every stage shares (validation loss and perplexity, skipped-sample counts)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lit_bluelm.config import from_container
from lit_bluelm.models import BlueLM, build_model
from lit_bluelm.modules.optim import build_optimizer, freeze_components
from lit_bluelm.modules.weights import load_model_weights
from lit_bluelm.objectives import Head, KDOptions, LossParts, next_token_head_loss, row_ce_sums
from lit_bluelm.parallel import apply_fsdp

Batch = Dict[str, Any]


class BlueLMModule(L.LightningModule):
    """Subclasses implement ``training_step`` and ``validation_step`` for their objective."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__()
        # plain containers only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = from_container(cfg)
        self.model: Optional[BlueLM] = None
        self.val_loss = MeanMetric()  # token-weighted, synced across ranks on compute
        # per source (rows count for the source of their first document)
        # (keys prefixed: a source may be called like a Module attribute, e.g. "train")
        self.val_source_loss = nn.ModuleDict({f"src_{name}": MeanMetric() for name in self.cfg.data.mix})
        self._doc_counts: Dict[str, int] = {}  # documents per source since the last log
        self._skipped = 0  # samples this rank's loader skipped (rank 0 also holds resumed totals)
        self._tokens = [0, 0]  # real tokens and row slots of this rank's batches since the last log

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Lightning may call it again (validate, then fit)
            return
        cfg = self.cfg
        model = build_model(cfg.model)
        self.initialize(model)
        frozen = freeze_components(model, cfg.optim.lr)
        if frozen:
            rank_zero_info(f"frozen (lr=0): {', '.join(frozen)}")
        if cfg.fsdp.activation_checkpointing:
            model.enable_activation_checkpointing()
        if cfg.trainer.strategy == "fsdp":
            param_dtype = torch.bfloat16 if cfg.trainer.precision == "bf16-mixed" else None
            apply_fsdp(model, self.device_mesh["data_parallel"], param_dtype, cfg.fsdp.reshard_after_forward)
        self.model = model

    def initialize(self, model: BlueLM) -> None:
        """Starting weights of a new run (before freezing and sharding): ``init_from``, if set.
        On resume the checkpoint's weights replace these afterwards."""
        cfg = self.cfg
        if cfg.init_from:
            keys = load_model_weights(model, cfg.init_from)
            rank_zero_info(
                f"init_from {cfg.init_from}: loaded weights; {len(keys['missing'])} tensors kept "
                f"their init, {len(keys['unexpected'])} checkpoint tensors unused"
            )

    @classmethod
    def check(cls, cfg: DictConfig, tokenizer: Any) -> None:
        """Start-up checks of what this objective needs (before any data or model work)."""

    def lm_loss(
        self,
        batch: Batch,
        teacher_hidden: Optional[torch.Tensor] = None,
        teacher_head: Optional[Head] = None,
        kd: KDOptions = KDOptions(),
    ) -> LossParts:
        """Next-token CE of a batch (plus KD when a teacher's hidden states are given), from the
        final hidden states in chunks of ``loss.chunk_size`` tokens (no full logits)."""
        assert self.model is not None
        # Right padding + causal attention: pads never influence real tokens and their labels
        # are ignored, so no attention mask is needed (SDPA takes its fast causal path). Packed
        # rows carry position_ids that restart per document, which keeps attention inside each.
        head_fn = next_token_head_loss(
            batch["labels"], self.cfg.loss.chunk_size, teacher_hidden, teacher_head, kd
        )
        return self.model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            pixel_values=batch.get("pixel_values"),
            head_fn=head_fn,
        )

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Dict[str, Any]:
        assert self.model is not None
        optimizer, scheduler = build_optimizer(self.model, self.cfg.optim, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ bookkeeping

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # read the loader's counts while they are still CPU tensors (no device sync)
        skipped = batch.pop("skipped", None)
        data_state = batch.pop("data_state", None)
        sources = batch.pop("doc_sources", None)
        if self.trainer.training:
            datamodule = self.trainer.datamodule
            if data_state is not None and hasattr(datamodule, "consumed"):
                datamodule.consumed(data_state)
            for name in sources or ():
                self._doc_counts[name] = self._doc_counts.get(name, 0) + 1
            if skipped is not None:
                self._skipped += int(skipped)
            mask = batch.get("attention_mask")
            if mask is not None:
                self._tokens[0] += int(mask.sum())
                self._tokens[1] += mask.numel()
        return batch

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # the batches of this optimizer step are trained: their stream states now count
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "step_done"):
            datamodule.step_done()

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        step_done = (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
        if step_done and self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            # one collective for every count: skipped samples, real tokens, slots, documents per source
            names = list(self.cfg.data.mix)
            local = [self._skipped, *self._tokens, *(self._doc_counts.get(n, 0) for n in names)]
            counts = self.trainer.strategy.reduce(
                torch.tensor([float(c) for c in local], device=self.device), reduce_op="sum"
            )
            skipped, real, slots, docs = counts[0], counts[1], counts[2], counts[3:]
            self.log("data/skipped", skipped, on_step=True, on_epoch=False)
            if slots > 0:  # real tokens / row slots since the last log (padding is the rest)
                self.log("data/packing_efficiency", real / slots, on_step=True, on_epoch=False)
            self._tokens = [0, 0]
            if docs.sum() > 0:  # realised fraction of documents per source since the last log
                for name, frac in zip(names, (docs / docs.sum()).tolist(), strict=True):
                    self.log(f"data/frac/{name}", frac, on_step=True, on_epoch=False)
            self._doc_counts = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """The model's next-token CE, overall and per source (``val/loss``, ``val/loss/<source>``)."""
        assert self.model is not None
        sums, counts = self.model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            pixel_values=batch.get("pixel_values"),
            head_fn=lambda hidden, head: row_ce_sums(hidden, head, batch["labels"], self.cfg.loss.chunk_size),
        )
        total = counts.sum()
        if total > 0:
            self.val_loss.update(sums.sum() / total, weight=total)
        for name in set(batch["source"]):
            rows = torch.tensor([s == name for s in batch["source"]], device=sums.device)
            n = counts[rows].sum()
            key = f"src_{name}"
            if key in self.val_source_loss and n > 0:
                self.val_source_loss[key].update(sums[rows].sum() / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        # Whether a metric has data must be decided the same way on every rank (compute() and
        # sync_dist are collectives): use the update counts summed over ranks.
        metrics = {"val/loss": self.val_loss}
        metrics |= {f"val/loss/{key[len('src_') :]}": m for key, m in self.val_source_loss.items()}
        counts = torch.tensor([float(m.update_count) for m in metrics.values()], device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        for (name, metric), count in zip(metrics.items(), counts.tolist(), strict=True):
            if count > 0:
                value = metric.compute()  # reduced across ranks; sync_dist averages equal values
                self.log(name, value, prog_bar=name == "val/loss", sync_dist=True)
                if name == "val/loss":
                    self.log("val/ppl", torch.exp(value.clamp(max=50.0)), sync_dist=True)
            metric.reset()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # every rank calls this; the summed count is stored once (rank 0 restores it)
        local = torch.tensor(float(self._skipped), device=self.device)
        checkpoint["data_skipped"] = int(self.trainer.strategy.reduce(local, reduce_op="sum").item())

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._skipped = int(checkpoint.get("data_skipped", 0)) if self.global_rank == 0 else 0
