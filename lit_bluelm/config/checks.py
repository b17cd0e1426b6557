"""Checks that span keys (the schema already checked names and types). Generic only: an
objective's checks live with its section (``check(cfg)`` on the dataclass), run from here."""

from __future__ import annotations

import dataclasses
import math
import re

from omegaconf import DictConfig, OmegaConf

from lit_bluelm.config.schema import Config
from lit_bluelm.errors import ConfigError, at_least, choice, in_range

# no fp16: the chunked loss casts per-chunk logit gradients to the compute dtype before the
# loss scale applies, where fp16 would flush small softmax terms to zero
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "fsdp")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def validate(cfg: DictConfig) -> None:
    _check_run(cfg)
    _check_data(cfg)
    _check_schedule(cfg)
    _check_trainer(cfg)
    _check_optim(cfg)
    _check_model(cfg)
    for f in dataclasses.fields(Config):  # each objective's own section checks itself
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        check = getattr(type(section), "check", None)
        if check is not None:
            check(cfg)


def _check_run(cfg: DictConfig) -> None:
    # what the paths hold (resume_from=auto, the checkpoints' form) is read at start-up
    # (lit_bluelm.startup): the config reads no checkpoint
    if cfg.init_from and cfg.resume_from and cfg.resume_from != "auto":
        raise ConfigError(
            "init_from and resume_from are mutually exclusive: init_from starts a new run from "
            "weights, resume_from continues this run (resume_from=auto allows both: it resumes "
            "when run_dir has a checkpoint, else starts from init_from)"
        )
    at_least(cfg, "checkpoint.every_n_steps", 1, allow_none=True)
    at_least(cfg, "checkpoint.save_top_k", -1)  # -1: keep every best checkpoint


def _check_data(cfg: DictConfig) -> None:
    data = cfg.data
    for name in data.sources:
        if name not in data.mix:
            raise ConfigError(f"data.sources.{name} has no weight: set data.mix.{name} (0 disables it)")
    for name, weight in data.mix.items():
        if name not in data.sources:
            raise ConfigError(
                f"data.mix.{name}: no source named '{name}'; sources: {', '.join(data.sources)}"
            )
        if not weight >= 0 or not math.isfinite(weight):
            raise ConfigError(f"data.mix.{name}: weight must be >= 0, got {weight}")
    if data.mix and sum(data.mix.values()) <= 0:
        raise ConfigError("data.mix: weights are all zero")
    for name, src in data.sources.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ConfigError(f"data.sources.{name}: a source name uses letters, digits, '_' and '-' only")
        if not src.repeat > 0 or not math.isfinite(src.repeat):
            raise ConfigError(f"data.sources.{name}.repeat must be > 0, got {src.repeat}")
        if data.adaptive.enabled and not data.mix.get(name, 0) > 0:
            raise ConfigError(f"data.adaptive: validation draws by data.mix, so data.mix.{name} must be > 0")
        if data.adaptive.enabled and not src.val:
            raise ConfigError(
                f"data.adaptive needs validation shards for every source: set data.sources.{name}.val"
            )
        if cfg.model.text_only and src.kind == "image_text" and data.mix.get(name, 0) > 0:
            raise ConfigError(f"model.text_only has no vision tower, but data.sources.{name} is image_text")
    for key in ("data.batch_size", "data.pack_buffer", "data.shuffle_buffer"):
        at_least(cfg, key, 1)
    at_least(cfg, "data.seq_len", 1, allow_none=True)  # null: the model's context (lit_bluelm.startup)
    at_least(cfg, "data.val_batch_size", 1, allow_none=True)
    at_least(cfg, "data.num_workers", 0)
    at_least(cfg, "data.max_image_pixels", 1, allow_none=True)
    if data.packing and cfg.model.llm.attn_implementation.startswith("flash"):
        # transformers derives per-document (varlen) attention from position_ids only for a
        # batch of one row with flash attention: packed batches would attend across documents
        raise ConfigError(
            "data.packing with model.llm.attn_implementation="
            f"{cfg.model.llm.attn_implementation} would attend across documents; use sdpa or eager"
        )


def schedule_step(point: DictConfig, max_steps: int) -> int:
    """The optimizer step of a ``data.schedule`` point (``step``, or ``at`` x ``max_steps``)."""
    return point.step if point.step is not None else round(point.at * max_steps)


def _check_schedule(cfg: DictConfig) -> None:
    last = -1
    for i, point in enumerate(cfg.data.schedule):
        key = f"data.schedule[{i}]"
        if (point.step is None) == (point.at is None):
            raise ConfigError(
                f"{key}: give exactly one of step (optimizer step) or at (fraction of max_steps)"
            )
        if point.at is not None and not 0.0 <= point.at <= 1.0:
            raise ConfigError(f"{key}.at must be in [0, 1], got {point.at}")
        step = schedule_step(point, cfg.trainer.max_steps)
        if step < last:
            raise ConfigError(f"{key}: points must be in step order ({step} after {last})")
        last = step
        for name, weight in point.mix.items():
            if name not in cfg.data.mix:
                raise ConfigError(f"{key}.mix.{name}: no source named '{name}'")
            if not weight >= 0:
                raise ConfigError(f"{key}.mix.{name}: weight must be >= 0, got {weight}")
        if sum(point.mix.get(n, w) for n, w in cfg.data.mix.items()) <= 0:
            raise ConfigError(f"{key}: weights are all zero")
    a = cfg.data.adaptive
    if a.eta <= 0 or not 0.0 <= a.smoothing <= 1.0:
        raise ConfigError(f"data.adaptive: need eta > 0 and smoothing in [0, 1], got {a.eta}, {a.smoothing}")


def _check_trainer(cfg: DictConfig) -> None:
    choice(cfg, "trainer.strategy", STRATEGIES)
    choice(cfg, "trainer.precision", PRECISIONS)
    choice(cfg, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
    choice(cfg, "optim.schedule", ("cosine", "constant"))
    devices = cfg.trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and (devices >= 1 or devices == -1))):
        raise ConfigError(f"trainer.devices: expected a count >= 1, -1 (all) or auto, got {devices!r}")
    at_least(cfg, "trainer.max_steps", 0)  # 0: no training, the starting weights validated
    for key in (
        "trainer.val_check_interval",
        "trainer.log_every_n_steps",
        "trainer.accumulate_grad_batches",
        "trainer.num_nodes",
        "trainer.progress_refresh_rate",
        "trainer.max_bad_steps",
    ):
        at_least(cfg, key, 1)
    at_least(cfg, "trainer.limit_val_batches", 0)
    at_least(cfg, "trainer.gradient_clip_val", 0, allow_none=True)


def _check_optim(cfg: DictConfig) -> None:
    for name in ("vision", "adapter", "llm"):
        at_least(cfg, f"optim.lr.{name}", 0)
    at_least(cfg, "optim.warmup_steps", 0)
    at_least(cfg, "optim.weight_decay", 0)
    in_range(cfg, "optim.min_lr_ratio", 0.0, 1.0)
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optim.betas: two values in [0, 1), got {betas}")
    if not cfg.optim.eps > 0:
        raise ConfigError(f"optim.eps must be > 0, got {cfg.optim.eps}")


def _check_model(cfg: DictConfig) -> None:
    for key in ("model.anyres.max_grid", "model.anyres.max_tiles", "model.adapter.downsample"):
        at_least(cfg, key, 1)
    vision = cfg.model.vision
    if vision.patch_size < 1 or vision.image_size % vision.patch_size:
        raise ConfigError(
            f"model.vision.image_size={vision.image_size} must be a multiple of model.vision.patch_size={vision.patch_size}"
        )
    rope = cfg.context.rope
    if rope is None:
        return
    rope = OmegaConf.to_container(rope) if OmegaConf.is_config(rope) else dict(rope)
    kind = rope.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"context.rope.rope_type: unknown '{kind}'; valid: {', '.join(ROPE_TYPES)}")
    for owned in ("rope_theta", "original_max_position_embeddings"):
        if owned in rope:
            raise ConfigError(
                f"context.rope.{owned}: comes from the model preset (rope_theta, "
                "max_position_embeddings), not the stage"
            )
    if kind != "default":
        if not isinstance(rope.get("factor"), (int, float)):
            raise ConfigError(f"context.rope.factor: rope_type={kind} needs a scaling factor")
        if not 1.0 <= rope["factor"] <= 1024.0:
            raise ConfigError(f"context.rope.factor must be in [1, 1024], got {rope['factor']}")
