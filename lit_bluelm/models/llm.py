"""Decoder LLMs: any transformers causal LM, from a config dict (random init) or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from omegaconf import OmegaConf
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lit_bluelm.config import ConfigError, LLMConfig

Rope = Optional[Mapping[str, Any]]


def apply_context(hf_cfg: PretrainedConfig, rope: Rope) -> PretrainedConfig:
    """Merge a stage's context scaling (``context.rope``) into the LLM's ``rope_parameters``.

    The preset keeps ``rope_theta`` and its length, which becomes
    ``original_max_position_embeddings``; ``max_position_embeddings`` is original x factor
    (except ``dynamic``, which scales beyond it at run time and so keeps the original).
    ``rope_type: default`` goes back to plain RoPE at the original length."""
    if not rope:
        return hf_cfg
    rope = dict(rope)
    params = dict(hf_cfg.rope_parameters or {})
    original = int(params.get("original_max_position_embeddings") or hf_cfg.max_position_embeddings)
    theta = params.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if rope["rope_type"] == "default":
        params, length = {"rope_type": "default"}, original
    else:
        params = {**rope, "original_max_position_embeddings": original}
        # dynamic NTK rescales beyond max_position_embeddings, so that stays the original length
        length = original if rope["rope_type"] == "dynamic" else int(original * float(rope["factor"]))
    if theta is not None:
        params["rope_theta"] = theta
    hf_cfg.rope_parameters = params
    hf_cfg.max_position_embeddings = length
    try:
        hf_cfg.validate_rope()
    except Exception as err:  # a scaling value transformers rejects
        raise ConfigError(f"context.rope: {str(err).strip().splitlines()[-1][:300]}") from None
    return hf_cfg


def original_context(hf_cfg: PretrainedConfig) -> int:
    """The context a model was pre-trained with: ``original_max_position_embeddings`` of a scaled
    RoPE, else ``max_position_embeddings``."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or hf_cfg.max_position_embeddings)


def llm_config(cfg: LLMConfig, rope: Rope = None) -> PretrainedConfig:
    """The transformers config an LLM entry describes, with the stage's context scaling applied
    (``rope``: ``context.rope``), without building weights."""
    if cfg.name == "from_pretrained":
        path = _local_dir(cfg)
        return apply_context(AutoConfig.from_pretrained(path, local_files_only=True), rope)
    kwargs = (
        OmegaConf.to_container(cfg.config, resolve=True)
        if OmegaConf.is_config(cfg.config)
        else dict(cfg.config)
    )
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.llm.config.model_type is required (e.g. qwen2, llama)")
    preset_rope = kwargs.get("rope_parameters") or {}
    kind = preset_rope.get("rope_type", "default")
    if kind != "default" and "original_max_position_embeddings" not in preset_rope:
        # transformers would silently take max_position_embeddings: a wrong scaling range
        raise ConfigError(
            f"model.llm.config.rope_parameters: set original_max_position_embeddings with rope_type={kind}"
        )
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.llm.config.model_type: '{model_type}' is not a transformers model type")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **kwargs)
    except Exception as err:  # a value transformers' config validation rejects
        reason = str(err).strip().splitlines()[-1].strip()[:300]
        raise ConfigError(f"model.llm.config: {reason}") from None
    return apply_context(hf_cfg, rope)


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


def build_from_config(cfg: LLMConfig, rope: Rope = None) -> PreTrainedModel:
    """Random init from ``model.llm.config`` (a transformers config dict plus ``model_type``)."""
    return _from_config(llm_config(cfg, rope), cfg.attn_implementation)


def build_from_pretrained(cfg: LLMConfig, rope: Rope = None) -> PreTrainedModel:
    """Weights from a local Hugging Face directory (nothing is downloaded); the stage's context
    scaling replaces the RoPE settings of its config.json."""
    hf_cfg = llm_config(cfg, rope)
    if torch.get_default_device().type == "meta":  # dry run: shapes only
        return _from_config(hf_cfg, cfg.attn_implementation)
    return AutoModelForCausalLM.from_pretrained(
        _local_dir(cfg),
        config=hf_cfg,
        local_files_only=True,
        attn_implementation=cfg.attn_implementation,
        dtype=torch.float32,
    )


LLMS: Dict[str, Callable[[LLMConfig, Rope], PreTrainedModel]] = {
    "from_config": build_from_config,
    "from_pretrained": build_from_pretrained,
}
