"""Config schema and loading.

Merge order: dataclass defaults <- ``configs/stage/<stage>.yaml`` <- ``configs/model/<model>.yaml``
<- command-line dotlist (``trainer.max_steps=20 model=bluelm_3b data.mix.text=0.4``).

``stage=<name>`` and ``model=<name>`` (no dot) pick the YAML files; every other argument is an
OmegaConf dotlist entry checked against the schema, so an unknown key or a wrong type is a
:class:`ConfigError` that names the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_STAGE = "joint"
DEFAULT_MODEL = "tiny"


class ConfigError(ValueError):
    """A user or config error: printed as one line, exit code 2, no traceback."""


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    name: str = "tiny_vit"  # VISION_ENCODERS key
    # siglip2: the open_clip model whose timm trunk is built (image/patch sizes come from it)
    open_clip_model: str = "ViT-SO400M-14-SigLIP2-378"
    # tiny_vit: the timm family that is scaled down with the kwargs below
    timm_model: str = "vit_so400m_patch14_siglip_378"
    image_size: int = 378  # tile side in pixels
    patch_size: int = 14
    embed_dim: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_ratio: float = 3.7362
    pretrained: Optional[str] = None  # local open_clip / timm weights file


@dataclass
class AdapterConfig:
    name: str = "mlp2x2"  # ADAPTERS key
    downsample: int = 2  # 2x2 space-to-depth
    hidden_size: Optional[int] = None  # default: the LLM hidden size


@dataclass
class LLMConfig:
    name: str = "from_config"  # LLMS key: from_config | from_pretrained
    path: Optional[str] = None  # local Hugging Face directory (from_pretrained)
    config: Dict[str, Any] = field(default_factory=dict)  # transformers config kwargs + model_type
    attn_implementation: str = "sdpa"


@dataclass
class AnyResConfig:
    max_grid: int = 4  # tiles per side: grids up to max_grid x max_grid
    max_tiles: int = 16  # cap on cols * rows
    thumbnail: bool = True  # add a whole-image thumbnail tile when the grid has > 1 tile


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # the configs/model/<name>.yaml preset
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    anyres: AnyResConfig = field(default_factory=AnyResConfig)
    # the LLM alone, no vision tower or adapter (stage 1); later stages load its weights into a
    # full model with init_from
    text_only: bool = False
    # id of the <image> placeholder; resolved from the tokenizer at launch when null
    image_token_id: Optional[int] = None


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    kind: str = "text"  # SAMPLE_KINDS key: text | image_text | chat | cot
    train: str = ""  # brace pattern of shards (local path or any webdataset gopen URL)
    val: Optional[str] = None
    repeat: float = 1.0  # key-data upsampling: drawn repeat x as often as its data.mix weight says


@dataclass
class SchedulePoint:
    """One point of a piecewise-linear mixture schedule (``step`` or ``at`` = fraction of max_steps)."""

    step: Optional[int] = None
    at: Optional[float] = None
    mix: Dict[str, float] = field(default_factory=dict)  # sources left out keep their data.mix weight


@dataclass
class AdaptiveConfig:
    """DoReMi-style multiplicative weights: after each validation, sources whose validation loss
    fell least (relative to their first validation) get more weight."""

    enabled: bool = False
    eta: float = 1.0  # step size of the multiplicative update
    smoothing: float = 0.2  # mix the multipliers this much towards 1 (uniform) after each update


@dataclass
class DataConfig:
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    mix: Dict[str, float] = field(default_factory=dict)  # source name -> sampling weight
    schedule: List[SchedulePoint] = field(default_factory=list)  # weights over the steps of the run
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    seq_len: int = 512
    batch_size: int = 8
    val_batch_size: Optional[int] = None  # default: batch_size
    num_workers: int = 2
    shuffle_buffer: int = 256
    # concatenate documents into rows of seq_len (EOS between them, positions restarting, no
    # attention across documents); pack_buffer documents are held to fill rows best-fit
    packing: bool = False
    pack_buffer: int = 64
    seed: int = 1234
    # shards under this folder are written by `python -m datamodules.demo` when missing
    demo_dir: str = "data/demo"


@dataclass
class TokenizerConfig:
    path: str = "data/demo/tokenizer"


# ----------------------------------------------------------------------------- training


@dataclass
class ComponentLR:
    """Learning rate per component; 0 freezes it."""

    vision: float = 2e-5
    adapter: float = 1e-3
    llm: float = 2e-4


@dataclass
class OptimConfig:
    name: str = "adamw"  # OPTIMIZERS key: adamw | adamw8bit
    lr: ComponentLR = field(default_factory=ComponentLR)
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    schedule: str = "cosine"  # cosine | constant


@dataclass
class LossConfig:
    # tokens per chunk of the output projection + CE/KD: only chunk_size x vocab float32 logits
    # exist at a time (256 x 151,936 x 4 bytes = 156 MB per tensor)
    chunk_size: int = 256


@dataclass
class DistillConfig:
    """Logit distillation from a frozen teacher LLM (``module: distill``)."""

    # configs/model preset name (random init: smoke tests only), a local Hugging Face model
    # directory, or a lit-bluelm checkpoint file (its saved config says how to build the LLM)
    teacher: Optional[str] = None
    alpha: float = 0.5  # loss = alpha * CE + (1 - alpha) * T^2 * KL
    temperature: float = 1.0
    reverse: bool = False  # KL(student || teacher) instead of KL(teacher || student)
    top_k: Optional[int] = None  # keep only the teacher's k largest logits per token
    quantize: str = "none"  # none | 8bit | 4bit (bitsandbytes; GPU and a Hugging Face teacher)
    # Minitron-style pruning init: the student's LLM is cut out of the teacher's
    init_from_teacher: bool = False
    keep_layers: Optional[List[int]] = None  # teacher layers to keep; default: the most important
    calibration_batches: int = 8  # training batches that measure layer/head/channel importance


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true
    max_steps: int = 1000
    val_check_interval: int = 200  # optimizer steps between validations
    limit_val_batches: int = 20  # per rank; the val stream repeats, so every rank runs this many
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    progress_refresh_rate: int = 1  # steps between progress-bar redraws


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False  # per decoder layer and vision block (any strategy)


@dataclass
class CheckpointConfig:
    every_n_steps: Optional[int] = None  # default: trainer.val_check_interval
    save_top_k: int = 1  # best checkpoints kept by val/loss (plus last.ckpt)


@dataclass
class Config:
    stage: str = DEFAULT_STAGE
    module: str = "next_token"  # STAGE_MODULES key
    run_dir: Optional[str] = None  # default: runs/<stage>
    seed: int = 1234
    init_from: Optional[str] = None  # checkpoint to take model weights from (new run)
    resume_from: Optional[str] = None  # checkpoint of this run to continue (step, optimizer, LR)
    dry_run: bool = False  # print config + parameter table (meta device) and exit
    validate_before_fit: bool = True  # report val/loss of the starting weights (not on resume)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------- loading


def available(kind: str) -> List[str]:
    """Names of the shipped ``configs/<kind>/*.yaml`` files."""
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))


def _yaml(kind: str, name: str) -> DictConfig:
    path = CONFIG_ROOT / kind / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} '{name}'; valid: {', '.join(available(kind))}")
    loaded = OmegaConf.load(path)
    assert isinstance(loaded, DictConfig), path
    return loaded


def _explain(err: OmegaConfBaseException, source: str, key: str = "?") -> ConfigError:
    key = getattr(err, "full_key", None) or key
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"bad config key '{key}' ({source}): {first}")


def _merge(base: DictConfig, other: Any, source: str, key: str = "?") -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source, key) from None
    assert isinstance(merged, DictConfig)
    return merged


def load_config(argv: Sequence[str] = ()) -> DictConfig:
    """Build the resolved, validated config from ``key=value`` arguments."""
    stage, model, dotlist = DEFAULT_STAGE, DEFAULT_MODEL, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"arguments are key=value, got '{arg}' (try: python train.py --help)")
        key, value = arg.split("=", 1)
        if key == "stage":
            stage = value
        elif key == "model":
            model = value
        else:
            dotlist.append(arg)

    cfg = OmegaConf.structured(Config)
    cfg = _merge(cfg, _yaml("stage", stage), f"configs/stage/{stage}.yaml")
    model_yaml = _yaml("model", model)
    if set(model_yaml) != {"model"}:
        # presets describe the model only; training settings belong to the stage yaml, so a
        # preset can never undo what a stage sets (e.g. a frozen component)
        extra = sorted(set(model_yaml) - {"model"})
        raise ConfigError(f"configs/model/{model}.yaml may only set 'model', not {extra}")
    cfg = _merge(cfg, model_yaml, f"configs/model/{model}.yaml")
    for arg in dotlist:  # one at a time, so an error names its key
        key = arg.split("=", 1)[0]
        if key == "model.name":
            raise ConfigError("model.name is set by model=<preset> (a configs/model yaml)")
        try:
            cli = OmegaConf.from_dotlist([arg])
        except OmegaConfBaseException as err:
            raise _explain(err, "command line", key) from None
        cfg = _merge(cfg, cli, "command line", key)
    cfg.stage, cfg.model.name = stage, model
    if cfg.run_dir is None:
        cfg.run_dir = f"runs/{stage}"
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that span keys (the schema already checked names and types)."""
    if cfg.init_from and cfg.resume_from:
        raise ConfigError(
            "init_from and resume_from are mutually exclusive: init_from starts a new run from "
            "weights, resume_from continues this run"
        )
    for key in ("init_from", "resume_from"):
        if cfg[key] and not Path(cfg[key]).exists():
            raise ConfigError(f"{key}: no such checkpoint '{cfg[key]}'")
    for name in cfg.data.sources:
        if name not in cfg.data.mix:
            raise ConfigError(f"data.sources.{name} has no weight: set data.mix.{name} (0 disables it)")
    for name, weight in cfg.data.mix.items():
        if name not in cfg.data.sources:
            raise ConfigError(
                f"data.mix.{name}: no source named '{name}'; sources: {', '.join(cfg.data.sources)}"
            )
        if not weight >= 0 or not math.isfinite(weight):
            raise ConfigError(f"data.mix.{name}: weight must be >= 0, got {weight}")
    if cfg.data.mix and sum(cfg.data.mix.values()) <= 0:
        raise ConfigError("data.mix: weights are all zero")
    for name, src in cfg.data.sources.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ConfigError(f"data.sources.{name}: a source name uses letters, digits, '_' and '-' only")
        if not src.repeat > 0 or not math.isfinite(src.repeat):
            raise ConfigError(f"data.sources.{name}.repeat must be > 0, got {src.repeat}")
        if cfg.data.adaptive.enabled and not cfg.data.mix.get(name, 0) > 0:
            raise ConfigError(f"data.adaptive: validation draws by data.mix, so data.mix.{name} must be > 0")
        if cfg.data.adaptive.enabled and not src.val:
            raise ConfigError(
                f"data.adaptive needs validation shards for every source: set data.sources.{name}.val"
            )
    _validate_schedule(cfg)
    for key in ("data.seq_len", "data.batch_size", "data.pack_buffer", "loss.chunk_size"):
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    _validate_distill(cfg)
    _choice(cfg, "trainer.strategy", ("auto", "ddp", "fsdp"))
    _choice(cfg, "trainer.precision", PRECISIONS)
    _choice(cfg, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
    _choice(cfg, "optim.schedule", ("cosine", "constant"))
    devices = cfg.trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and (devices >= 1 or devices == -1))):
        raise ConfigError(f"trainer.devices: expected a count >= 1, -1 (all) or auto, got {devices!r}")
    for key in (
        "trainer.max_steps",
        "trainer.val_check_interval",
        "trainer.log_every_n_steps",
        "trainer.accumulate_grad_batches",
        "trainer.num_nodes",
        "model.anyres.max_grid",
        "model.anyres.max_tiles",
        "model.adapter.downsample",
    ):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    every = cfg.checkpoint.every_n_steps
    if every is not None and every < 1:
        raise ConfigError(f"checkpoint.every_n_steps must be >= 1 (or null), got {every}")


def _validate_schedule(cfg: DictConfig) -> None:
    last = -1
    for i, point in enumerate(cfg.data.schedule):
        key = f"data.schedule[{i}]"
        if (point.step is None) == (point.at is None):
            raise ConfigError(
                f"{key}: give exactly one of step (optimizer step) or at (fraction of max_steps)"
            )
        if point.at is not None and not 0.0 <= point.at <= 1.0:
            raise ConfigError(f"{key}.at must be in [0, 1], got {point.at}")
        step = point.step if point.step is not None else round(point.at * cfg.trainer.max_steps)
        if step < last:
            raise ConfigError(f"{key}: points must be in step order ({step} after {last})")
        last = step
        for name, weight in point.mix.items():
            if name not in cfg.data.mix:
                raise ConfigError(f"{key}.mix.{name}: no source named '{name}'")
            if weight < 0:
                raise ConfigError(f"{key}.mix.{name}: weight must be >= 0, got {weight}")
        if sum(point.mix.get(n, w) for n, w in cfg.data.mix.items()) <= 0:
            raise ConfigError(f"{key}: weights are all zero")
    a = cfg.data.adaptive
    if a.eta <= 0 or not 0.0 <= a.smoothing <= 1.0:
        raise ConfigError(f"data.adaptive: need eta > 0 and smoothing in [0, 1], got {a.eta}, {a.smoothing}")


def _validate_distill(cfg: DictConfig) -> None:
    d = cfg.distill
    _choice(cfg, "distill.quantize", ("none", "8bit", "4bit"))
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be in [0, 1], got {d.alpha}")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature must be > 0, got {d.temperature}")
    if d.top_k is not None and d.top_k < 1:
        raise ConfigError(f"distill.top_k must be >= 1 (or null), got {d.top_k}")
    if d.calibration_batches < 1:
        raise ConfigError(f"distill.calibration_batches must be >= 1, got {d.calibration_batches}")
    if d.init_from_teacher and cfg.init_from:
        raise ConfigError("distill.init_from_teacher and init_from both set the starting weights: pick one")
    if d.init_from_teacher and cfg.module != "distill":
        raise ConfigError(f"distill.init_from_teacher needs module=distill, not {cfg.module}")
    if d.keep_layers is not None and not d.init_from_teacher:
        raise ConfigError("distill.keep_layers only applies with distill.init_from_teacher=true")
    if d.init_from_teacher and d.quantize != "none":
        raise ConfigError("distill.init_from_teacher copies teacher weights: use distill.quantize=none")
    if cfg.model.text_only:
        for name, src in cfg.data.sources.items():
            if src.kind == "image_text" and cfg.data.mix.get(name, 0) > 0:
                raise ConfigError(
                    f"model.text_only has no vision tower, but data.sources.{name} is image_text"
                )
    if cfg.data.packing and cfg.model.llm.attn_implementation.startswith("flash"):
        # transformers derives per-document (varlen) attention from position_ids only for a
        # batch of one row with flash attention: packed batches would attend across documents
        raise ConfigError(
            "data.packing with model.llm.attn_implementation="
            f"{cfg.model.llm.attn_implementation} would attend across documents; use sdpa or eager"
        )


# no fp16: the chunked loss casts per-chunk logit gradients to the compute dtype before the
# loss scale applies, where fp16 would flush small softmax terms to zero
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def _choice(cfg: DictConfig, key: str, valid: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in valid:
        raise ConfigError(f"{key}: unknown '{value}'; valid: {', '.join(valid)}")


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """Plain dict (for checkpoints: a DictConfig does not load with ``weights_only=True``)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def from_container(data: Dict[str, Any]) -> DictConfig:
    """Schema-checked config from a plain dict (e.g. a checkpoint's hyper-parameters)."""
    return _merge(OmegaConf.structured(Config), data, "checkpoint")
