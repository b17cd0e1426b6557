"""Next-token CE (stages 2-4: joint, reasoning, long context; the base of distillation and SFT):
CE on every counted label, validation loss overall and per source, perplexity, and, when rows
are longer than the model's original context, the loss of the tokens beyond it
(``val/loss_long``, summary ``val_loss_long``)."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional

import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.modules.base import Batch, BlueLMModule
from lit_bluelm.objectives import Chunking, LossParts, next_token_head_loss, row_ce_sums


def beyond(labels: torch.Tensor, position_ids: Optional[torch.Tensor], original: int) -> torch.Tensor:
    """``labels`` with only the targets at positions >= ``original`` kept (the position of a
    target is its column, or its ``position_ids`` entry in packed rows)."""
    width = labels.shape[1]
    positions = position_ids if position_ids is not None else torch.arange(width, device=labels.device)
    return labels.masked_fill(positions.expand_as(labels) < original, IGNORE_INDEX)


class NextTokenModule(BlueLMModule):
    summary_by_source: ClassVar[Optional[str]] = "val/loss/"

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__(cfg)
        self.val_loss = MeanMetric()  # token-weighted, synced across ranks on compute
        # per source (every document's tokens count for its own source); keys prefixed: a
        # source may be called like a Module attribute, e.g. "train"
        self.val_source_loss = nn.ModuleDict({f"src_{name}": MeanMetric() for name in self.cfg.data.mix})
        # rows longer than the original context: the loss of the tokens beyond it, by itself
        self.original_context = _original_context(self.cfg)
        self.val_long_loss = MeanMetric()
        if self.original_context is not None:
            self.summary_metrics = {**self.summary_metrics, "val_loss_long": "val/loss_long"}

    def forward_loss(self, batch: Batch, head_fn: Any) -> Any:
        """The model on a batch, with ``head_fn`` applied to its final hidden states.

        Right padding + causal attention: pads never influence real tokens and their labels are
        ignored, so no attention mask is needed (SDPA takes its fast causal path). Packed rows
        carry position_ids that restart per document, which keeps attention inside each."""
        assert self.model is not None
        return self.model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            pixel_values=batch.get("pixel_values"),
            head_fn=head_fn,
        )

    def lm_loss(self, batch: Batch) -> LossParts:
        """Next-token CE of a batch, in chunks of ``loss.chunk_size`` tokens (no full logits)."""
        return self.forward_loss(batch, next_token_head_loss(batch["labels"], Chunking.of(self.cfg.loss)))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        parts = self.lm_loss(batch)
        self.log("train/loss", parts.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return parts.loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """The model's next-token CE, overall and per source (``val/loss``, ``val/loss/<source>``)."""
        chunk = Chunking.of(self.cfg.loss)
        long_labels = (
            beyond(batch["labels"], batch.get("position_ids"), self.original_context)
            if self.original_context is not None
            else None
        )

        # per document: a packed row holds several, each counted for its own source
        documents, doc_sources = batch.get("documents"), batch.get("doc_sources")
        if documents is None or doc_sources is None:  # batches not from our collator: per row
            documents = torch.arange(len(batch["source"]), device=batch["labels"].device)[:, None]
            documents, doc_sources = documents.expand_as(batch["labels"]), batch["source"]

        def head_fn(hidden: torch.Tensor, head: nn.Linear):
            found = row_ce_sums(hidden, head, batch["labels"], chunk, documents, len(doc_sources))
            if long_labels is not None and (long_labels != IGNORE_INDEX).any():
                return found, row_ce_sums(hidden, head, long_labels, chunk)
            return found, None

        (sums, counts), long = self.forward_loss(batch, head_fn)
        if long is not None and long[1].sum() > 0:
            self.val_long_loss.update(long[0].sum() / long[1].sum(), weight=long[1].sum())
        total = counts.sum()
        if total > 0:
            self.val_loss.update(sums.sum() / total, weight=total)
        for name in set(doc_sources):
            docs = torch.tensor([s == name for s in doc_sources], device=sums.device)
            n = counts[docs].sum()
            key = f"src_{name}"
            if key in self.val_source_loss and n > 0:
                self.val_source_loss[key].update(sums[docs].sum() / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        # Whether a metric has data must be decided the same way on every rank (compute() and
        # sync_dist are collectives): use the update counts summed over ranks.
        metrics = {"val/loss": self.val_loss, "val/loss_long": self.val_long_loss}
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


def _original_context(cfg: Any) -> Optional[int]:
    """The model's original context when ``data.seq_len`` rows reach beyond it, else None."""
    from lit_bluelm.models.llm import llm_config, original_context

    if cfg.data.seq_len is None or cfg.context.rope is None:
        return None
    original = original_context(llm_config(cfg.model.llm, cfg.context.rope))
    return original if cfg.data.seq_len > original else None
