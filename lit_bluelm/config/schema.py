"""The config schema: one dataclass per section, every option declared once.

An objective's own section (``loss``, ``distill``, ...) is declared beside the objective and only
composed here; each section may define ``check(cfg)``, which ``lit_bluelm.config.checks`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lit_bluelm.errors import choice
from lit_bluelm.objectives.distill import DistillConfig
from lit_bluelm.objectives.grpo import RewardsConfig, RLConfig
from lit_bluelm.objectives.linear_loss import LossConfig
from lit_bluelm.objectives.reward import RewardConfig

DEFAULT_STAGE = "joint"
DEFAULT_MODEL = "tiny"
# saved with every checkpoint's hyper-parameters; 1 = before the context section and the run's
# tokenizer copy (hyper-parameters without a version)
CONFIG_VERSION = 2


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
    # full model with init_from. Owned by the stage: a preset may not set it (config/load.py)
    text_only: bool = False
    # a scalar reward head (``score``: Linear(hidden, 1, bias=False) on each sequence's last real
    # token) beside the LM head: the reward model (``stage=reward``). Owned by the stage
    reward_head: bool = False
    # id of the <image> placeholder; resolved from the tokenizer at launch when null
    image_token_id: Optional[int] = None


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    kind: str = "text"  # SAMPLE_KINDS key: text | image_text | chat | cot | preference
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
    # tokens per row; null: the model's context (max_position_embeddings after context.rope),
    # resolved at start-up, so a long-context stage trains at the length it switches to
    seq_len: Optional[int] = 512
    batch_size: int = 8
    val_batch_size: Optional[int] = None  # default: batch_size
    num_workers: int = 2
    shuffle_buffer: int = 256
    # images with more pixels are skipped from their header, before decoding (data/skipped/
    # image_too_large); null: no limit but PIL's own (about 179 MP)
    max_image_pixels: Optional[int] = 64_000_000
    # concatenate documents into rows of seq_len (EOS between them, positions restarting, no
    # attention across documents); pack_buffer documents are held to fill rows best-fit
    packing: bool = False
    pack_buffer: int = 64
    seed: int = 1234
    # shards under this folder are written by `python -m datamodules.demo` when missing
    demo_dir: str = "data/demo"


@dataclass
class TokenizerConfig:
    path: str = "${data.demo_dir}/tokenizer"


# ----------------------------------------------------------------------------- training


@dataclass
class ComponentLR:
    """Learning rate per component; 0 freezes it."""

    vision: float = 2e-5
    adapter: float = 1e-3
    llm: float = 2e-4
    score: float = 1e-3  # the reward head (model.reward_head); other models have none


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


THINK_POSITIONS = ("after_query", "before_query")


@dataclass
class SFTConfig:
    """The ``sft`` section: the chat format's thinking control token (``lit_bluelm.chat``)."""

    # [|BlueThink|] at the end of the final user turn (the report's placement) or at its start
    think_token_position: str = "after_query"  # after_query | before_query

    @staticmethod
    def check(cfg: Any) -> None:
        choice(cfg, "sft.think_token_position", THINK_POSITIONS)


@dataclass
class ContextConfig:
    """Context scaling, owned by the stage (model presets never set it). ``rope`` is merged into
    the LLM's ``rope_parameters`` when the model is built, keeping the preset's ``rope_theta``,
    e.g. ``{rope_type: yarn, factor: 8}``; ``original_max_position_embeddings`` is the preset's
    length and ``max_position_embeddings`` becomes original x factor. null: the checkpoint's
    context under ``init_from``, else the preset's plain RoPE."""

    rope: Optional[Dict[str, Any]] = None


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true
    max_steps: int = 1000  # 0: no training; the starting weights are validated (val_*_after)
    val_check_interval: int = 200  # optimizer steps between validations
    limit_val_batches: int = 20  # per rank; the val stream repeats, so every rank runs this many
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    # optimizer steps in a row with a non-finite loss or gradient (each skipped) before the run
    # stops with status=diverged
    max_bad_steps: int = 5
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
    run_dir: str = "runs/${stage}"  # resolved after stage= is known
    seed: int = 1234
    init_from: Optional[str] = None  # checkpoint to take model weights from (new run)
    resume_from: Optional[str] = None  # checkpoint of this run to continue (step, optimizer, LR)
    dry_run: bool = False  # print config + parameter table (meta device) and exit
    validate_before_fit: bool = True  # report val/loss of the starting weights (not on resume)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
