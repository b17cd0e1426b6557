"""Stage 1 (``stage=text``): the LLM trained on text with logit distillation from a frozen teacher.

Loss = ``alpha`` * CE + (1 - ``alpha``) * T^2 * KL (``distill.*``), computed in token chunks from
the final hidden states of student and teacher (``lit_bluelm.objectives.distill``). The teacher
runs in eval mode without gradients. It is held outside the module's registered children, so it
is never written into checkpoints, never reaches the optimizer and is never sharded. Validation
reports the student's plain CE (``val/loss``), comparable with runs trained without a teacher.

With ``distill.init_from_teacher`` the student's LLM starts as a pruned copy of the teacher
(``lit_bluelm.models.prune``), importance measured on ``distill.calibration_batches`` batches.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from transformers import PreTrainedModel

from lit_bluelm.errors import ConfigError
from lit_bluelm.frozen import check_quantize, load_frozen_llm, resolve_source
from lit_bluelm.models import BlueLM
from lit_bluelm.models.llm import llm_config
from lit_bluelm.models.prune import check_prunable, measure_importance, prune_into, reduce_importance
from lit_bluelm.modules.base import Batch
from lit_bluelm.modules.next_token import NextTokenModule
from lit_bluelm.objectives import Chunking, Head, KDOptions, distill_head_loss
from lit_bluelm.parallel import compute_dtype
from lit_bluelm.tokenizer import load_tokenizer, tokenizer_difference

TEACHER_KEY = "distill.teacher"


class DistillModule(NextTokenModule):
    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__(cfg)
        self.kd = KDOptions.of(self.cfg.distill)
        # not a registered submodule: out of state_dict, optimizer, FSDP and .to() (moved by hand)
        self.__dict__["_teacher"] = None

    @classmethod
    def check(cls, cfg: DictConfig, tokenizer: Any) -> None:
        super().check(cfg, tokenizer)
        if not cfg.distill.teacher:
            raise ConfigError(
                "module=distill needs distill.teacher (a model preset, a Hugging Face directory or a "
                "lit-bluelm checkpoint); train without a teacher with module=next_token"
            )
        for name, src in cfg.data.sources.items():
            if src.kind == "image_text" and cfg.data.mix[name] > 0:
                raise ConfigError(f"module=distill trains on text: data.sources.{name} is {src.kind}")
        source = resolve_source(cfg.distill.teacher, TEACHER_KEY)
        student = llm_config(cfg.model.llm, cfg.context.rope)
        check_teacher(source, student.vocab_size, tokenizer)
        if cfg.distill.init_from_teacher:
            check_prunable(source.hf_config, student, cfg.distill.keep_layers)
        check_quantize(source, cfg.distill.quantize, "distill.quantize", cfg.trainer.accelerator)
        if cfg.data.packing and str(source.llm.attn_implementation).startswith("flash"):
            raise ConfigError(
                f"{TEACHER_KEY} uses flash attention, which would attend across packed documents"
            )

    # ------------------------------------------------------------------ teacher

    def _load_teacher(self) -> PreTrainedModel:
        d = self.cfg.distill
        dtype = compute_dtype(self.cfg.trainer.precision)
        teacher = load_frozen_llm(
            resolve_source(d.teacher, TEACHER_KEY), dtype, d.quantize, "distill.quantize"
        )
        if d.quantize == "none" and self._trainer is not None:
            teacher.to(self.trainer.strategy.root_device)
        n = sum(p.numel() for p in teacher.parameters())
        rank_zero_info(f"teacher {d.teacher}: {n:,} parameters, frozen, {dtype}")
        self.__dict__["_teacher"] = teacher
        return teacher

    def initialize(self, model: BlueLM) -> None:
        teacher = self.teacher or self._load_teacher()
        d = self.cfg.distill
        if not d.init_from_teacher or self.cfg.resume_from:
            return super().initialize(model)
        # configure_model may run under the accelerator's default-device context; the loader
        # (and its forked workers) must build CPU tensors
        with torch.device("cpu"):
            loader = self.trainer.datamodule.train_dataloader()
            batches = list(itertools.islice(loader, d.calibration_batches))
        importance = reduce_importance(measure_importance(teacher, batches))
        report = prune_into(teacher, model.llm, importance, d.keep_layers)
        rank_zero_info(
            f"init_from_teacher: kept teacher layers {report['layers']}, "
            f"{len(report['heads'][0])} query heads and {report['channels'][0]} MLP channels per layer "
            f"(importance from {len(batches)} batches)"
        )

    def teacher_hidden(self, batch: Batch) -> torch.Tensor:
        """The teacher's final hidden states [B, T, Dt] for the batch (no gradients)."""
        teacher = self.teacher
        if batch.get("pixel_values") is not None:
            raise ValueError("distillation runs on text batches; this batch carries images")
        if teacher.device != self.device and self.cfg.distill.quantize == "none":
            teacher.to(self.device)
        with torch.no_grad():
            out = teacher.base_model(
                input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False
            )
        return out.last_hidden_state

    def teacher_head(self) -> Head:
        head = self.teacher.get_output_embeddings()
        return Head(head.weight, head.bias)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        head_fn = distill_head_loss(
            batch["labels"],
            Chunking.of(self.cfg.loss),
            self.teacher_hidden(batch),
            self.teacher_head(),
            self.kd,
        )
        parts = self.forward_loss(batch, head_fn)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", parts.loss, prog_bar=True, batch_size=size)
        self.log("train/ce_loss", parts.ce, batch_size=size)
        self.log("train/kd_loss", parts.kd, batch_size=size)
        return parts.loss

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        leaked = [k for k in checkpoint.get("state_dict", {}) if k.startswith("teacher.")]
        assert not leaked, f"teacher weights in a checkpoint: {leaked[:3]}"

    @property
    def teacher(self) -> Optional[PreTrainedModel]:
        return self.__dict__["_teacher"]


def check_teacher(source, student_vocab: int, tokenizer) -> None:
    """Logit distillation compares distributions over the same token ids: refuse a teacher whose
    vocabulary size or tokenizer differs from the student's."""
    vocab = source.hf_config.vocab_size
    if vocab != student_vocab:
        raise ConfigError(
            f"{TEACHER_KEY}: its vocabulary has {vocab} entries, the student's {student_vocab} "
            "(model.llm.config.vocab_size); logit distillation needs the same vocabulary"
        )
    if source.tokenizer is None or not Path(source.tokenizer).exists():
        return  # a preset teacher, or a directory without tokenizer files: ids are assumed shared
    difference = tokenizer_difference(load_tokenizer(source.tokenizer), tokenizer)
    if difference is not None:
        raise ConfigError(
            f"{TEACHER_KEY}: its tokenizer ({source.tokenizer}) differs from tokenizer.path: {difference}"
        )
