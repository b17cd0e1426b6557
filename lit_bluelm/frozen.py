"""Frozen LLMs next to the one being trained (the distillation teacher; the GRPO reference next):
where one comes from, its checks and loading. Errors name the caller's config key.

A spec is one of
  * a ``configs/model`` preset name: its LLM with random weights (smoke tests and dry runs only);
  * a local Hugging Face model directory (``config.json`` + weights), optionally quantized to
    8 or 4 bits with bitsandbytes on a GPU;
  * a lit-bluelm checkpoint (a ``.ckpt`` file or a sharded folder), read with ``load_run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lit_bluelm.checkpoint import load_run, run_tokenizer, saved_config
from lit_bluelm.config import available, from_container, preset
from lit_bluelm.errors import ConfigError
from lit_bluelm.models.llm import LLMS, check_output_head, llm_config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class ModelSource:
    spec: str  # what the config key said
    key: str  # the config key, for errors
    llm: DictConfig  # a model.llm section: how to build the LLM
    rope: Any = None  # the context scaling it was trained with (context.rope)
    checkpoint: Optional[str] = None  # a lit-bluelm checkpoint holding its weights
    tokenizer: Optional[str] = None  # the tokenizer it was trained with, when known

    @property
    def hf_config(self) -> PretrainedConfig:
        return llm_config(self.llm, self.rope)


def resolve_source(spec: str, key: str) -> ModelSource:
    """Where a frozen model comes from; checks the spec without loading weights."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():  # Hugging Face directory
        llm = from_container({"model": {"llm": {"name": "from_pretrained", "path": str(path)}}}).model.llm
        has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
        return ModelSource(spec, key, llm, tokenizer=str(path) if has_tokenizer else None)
    if path.exists():  # lit-bluelm checkpoint (saved_config checks its form, safely)
        saved = from_container(saved_config(path, key), f"{key} (saved config)")
        tok = run_tokenizer(path, saved)
        return ModelSource(
            spec, key, saved.model.llm, saved.context.rope, str(path), str(tok) if tok else None
        )
    if spec in available("model"):
        return ModelSource(spec, key, preset(spec).llm)
    raise ConfigError(
        f"{key}: '{spec}' is not a model preset ({', '.join(available('model'))}), "
        "a Hugging Face model directory or a lit-bluelm checkpoint"
    )


def check_quantize(source: ModelSource, quantize: str, quantize_key: str, accelerator: str = "auto") -> None:
    """bitsandbytes quantizes a Hugging Face model on a GPU (and the run must be on one too)."""
    if quantize == "none":
        return
    if source.llm.name != "from_pretrained":
        raise ConfigError(f"{quantize_key} needs a Hugging Face directory as {source.key}")
    if accelerator == "cpu" or not torch.cuda.is_available():
        raise ConfigError(f"{quantize_key}={quantize} needs a GPU (bitsandbytes quantizes on CUDA)")


def load_frozen_llm(
    source: ModelSource, dtype: torch.dtype, quantize: str = "none", quantize_key: str = "quantize"
) -> PreTrainedModel:
    """The LLM in eval mode, every parameter frozen."""
    check_quantize(source, quantize, quantize_key)
    if quantize != "none":
        llm = _quantized(source, quantize, dtype)
    elif source.checkpoint is not None:
        # its tokenizer is compared separately (when it can be found), so none is needed here
        llm = load_run(source.checkpoint, source.key, text_only=True, tokenizer=False).model.llm.to(dtype)
    else:
        llm = LLMS[source.llm.name](source.llm, source.rope).to(dtype)
    check_output_head(llm.config)
    llm.eval()
    llm.requires_grad_(False)
    return llm


def _quantized(source: ModelSource, quantize: str, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import BitsAndBytesConfig

    bits = (
        BitsAndBytesConfig(load_in_8bit=True)
        if quantize == "8bit"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    )
    return AutoModelForCausalLM.from_pretrained(
        source.llm.path,
        local_files_only=True,
        quantization_config=bits,
        device_map={"": torch.cuda.current_device()},
        dtype=dtype,  # the parts bitsandbytes leaves unquantized (embeddings, norms, head)
    )
