"""Decoder LLMs: any transformers causal LM, from a config dict (random init) or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import torch
from omegaconf import OmegaConf
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lit_bluelm.config import ConfigError, LLMConfig


def llm_config(cfg: LLMConfig) -> PretrainedConfig:
    """The transformers config an LLM entry describes, without building weights."""
    if cfg.name == "from_pretrained":
        path = _local_dir(cfg)
        return AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs = (
        OmegaConf.to_container(cfg.config, resolve=True)
        if OmegaConf.is_config(cfg.config)
        else dict(cfg.config)
    )
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.llm.config.model_type is required (e.g. qwen2, llama)")
    rope = kwargs.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" and "original_max_position_embeddings" not in rope:
        # transformers would silently take max_position_embeddings: a wrong scaling range
        raise ConfigError(
            "model.llm.config.rope_parameters: set original_max_position_embeddings with "
            f"rope_type={rope.get('rope_type')}"
        )
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.llm.config.model_type: '{model_type}' is not a transformers model type")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **kwargs)
    except Exception as err:  # a value transformers' config validation rejects
        reason = str(err).strip().splitlines()[-1].strip()[:300]
        raise ConfigError(f"model.llm.config: {reason}") from None
    return hf_cfg


def check_output_head(hf_cfg: PretrainedConfig) -> None:
    """The chunked loss computes logits as ``hidden @ W.T + b``; refuse heads that do more."""
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0)):
        if getattr(hf_cfg, key, None) not in (None, 0, neutral):
            raise ConfigError(
                f"model.llm: {hf_cfg.model_type} applies {key} to its logits, which the chunked "
                "loss (loss.chunk_size) does not model"
            )


def _local_dir(cfg: LLMConfig) -> str:
    if not cfg.path or not Path(cfg.path).is_dir():
        raise ConfigError(f"model.llm.path: '{cfg.path}' is not a local model directory")
    return cfg.path


def _from_config(hf_cfg: PretrainedConfig, attn_implementation: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(
        hf_cfg, attn_implementation=attn_implementation, dtype=torch.float32
    )


def build_from_config(cfg: LLMConfig) -> PreTrainedModel:
    """Random init from ``model.llm.config`` (a transformers config dict plus ``model_type``)."""
    return _from_config(llm_config(cfg), cfg.attn_implementation)


def build_from_pretrained(cfg: LLMConfig) -> PreTrainedModel:
    """Weights from a local Hugging Face directory (nothing is downloaded)."""
    if torch.get_default_device().type == "meta":  # dry run: shapes only
        return _from_config(llm_config(cfg), cfg.attn_implementation)
    return AutoModelForCausalLM.from_pretrained(
        _local_dir(cfg),
        local_files_only=True,
        attn_implementation=cfg.attn_implementation,
        dtype=torch.float32,
    )


LLMS: Dict[str, Callable[[LLMConfig], PreTrainedModel]] = {
    "from_config": build_from_config,
    "from_pretrained": build_from_pretrained,
}
