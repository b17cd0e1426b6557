"""The frozen teacher LLM of distillation: where it comes from, checks, and loading.

``distill.teacher`` is one of
  * a ``configs/model`` preset name: its LLM with random weights (smoke tests and dry runs only);
  * a local Hugging Face model directory (``config.json`` + weights), optionally quantized to
    8 or 4 bits with bitsandbytes on a GPU;
  * a lit-bluelm checkpoint (a ``.ckpt`` file or a sharded folder): its saved config says how to
    build the LLM and its ``model.llm.*`` tensors are the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lit_bluelm.config import ConfigError, available, from_container, load_config
from lit_bluelm.models.llm import LLMS, check_output_head, llm_config
from lit_bluelm.modules.weights import read_model_state

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class TeacherSource:
    spec: str  # what distill.teacher said
    llm: DictConfig  # a model.llm section: how to build the teacher's LLM
    weights: Optional[str] = None  # lit-bluelm checkpoint holding model.llm.* (None: llm builds them)
    tokenizer: Optional[str] = None  # the tokenizer the teacher was trained with, when known

    @property
    def hf_config(self) -> PretrainedConfig:
        return llm_config(self.llm)


def _saved_run_config(path: Path) -> Dict[str, Any]:
    """The ``cfg`` hyper-parameter of a lit-bluelm checkpoint file or sharded folder."""
    meta = path / "meta.pt" if path.is_dir() else path
    if not meta.is_file():
        raise ConfigError(f"distill.teacher: '{path}' is neither a checkpoint file nor a sharded checkpoint")
    ckpt = torch.load(meta, map_location="cpu", weights_only=True, mmap=not path.is_dir())
    cfg = ckpt.get("hyper_parameters", {}).get("cfg")
    if not isinstance(cfg, dict):
        raise ConfigError(f"distill.teacher: '{path}' has no lit-bluelm config (hyper_parameters.cfg)")
    return cfg


def resolve_teacher(spec: str) -> TeacherSource:
    """Where the teacher comes from; checks the spec without loading weights."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():  # Hugging Face directory
        llm = from_container({"model": {"llm": {"name": "from_pretrained", "path": str(path)}}}).model.llm
        has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
        return TeacherSource(spec, llm, tokenizer=str(path) if has_tokenizer else None)
    if path.exists():  # lit-bluelm checkpoint
        saved = from_container(_saved_run_config(path))
        return TeacherSource(spec, saved.model.llm, weights=str(path), tokenizer=saved.tokenizer.path)
    if spec in available("model"):
        return TeacherSource(spec, load_config([f"model={spec}"]).model.llm)
    raise ConfigError(
        f"distill.teacher: '{spec}' is not a model preset ({', '.join(available('model'))}), "
        "a Hugging Face model directory or a lit-bluelm checkpoint"
    )


def check_teacher(source: TeacherSource, student_vocab: int, tokenizer) -> None:
    """Logit distillation compares distributions over the same token ids: refuse a teacher whose
    vocabulary size or tokenizer differs from the student's."""
    vocab = source.hf_config.vocab_size
    if vocab != student_vocab:
        raise ConfigError(
            f"distill.teacher: its vocabulary has {vocab} entries, the student's {student_vocab} "
            "(model.llm.config.vocab_size); logit distillation needs the same vocabulary"
        )
    if source.tokenizer is None or not Path(source.tokenizer).exists():
        return  # a preset teacher, or a directory without tokenizer files: ids are assumed shared
    from lit_bluelm.tokenizer import load_tokenizer

    theirs, ours = load_tokenizer(source.tokenizer).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])
        raise ConfigError(
            f"distill.teacher: its tokenizer ({source.tokenizer}) differs from tokenizer.path: "
            f"{len(theirs)} vs {len(ours)} tokens, {len(differ)} (token, id) pairs differ, "
            f"e.g. {differ[0]!r}"
        )


def build_teacher(source: TeacherSource, dtype: torch.dtype, quantize: str = "none") -> PreTrainedModel:
    """The teacher LLM in eval mode, every parameter frozen."""
    if quantize != "none":
        teacher = _quantized(source, quantize, dtype)
    else:
        teacher = LLMS[source.llm.name](source.llm)
        if source.weights is not None:
            prefix = "llm."
            state = {
                k[len(prefix) :]: v
                for k, v in read_model_state(source.weights).items()
                if k.startswith(prefix)
            }
            missing, unexpected = teacher.load_state_dict(state, strict=False)
            # tied output weights may be stored once; anything else missing is a wrong checkpoint
            missing = [k for k in missing if k not in teacher._tied_weights_keys]
            if missing or not state:
                raise ConfigError(
                    f"distill.teacher: '{source.weights}' lacks LLM weights, e.g. {missing[:3]}"
                )
        teacher = teacher.to(dtype)
    check_output_head(teacher.config)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _quantized(source: TeacherSource, quantize: str, dtype: torch.dtype) -> PreTrainedModel:
    if source.llm.name != "from_pretrained":
        raise ConfigError("distill.quantize needs a Hugging Face directory as distill.teacher")
    if not torch.cuda.is_available():
        raise ConfigError(f"distill.quantize={quantize} needs a GPU (bitsandbytes quantizes on CUDA)")
    from transformers import BitsAndBytesConfig

    bits = (
        BitsAndBytesConfig(load_in_8bit=True)
        if quantize == "8bit"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    )
    device = torch.cuda.current_device()
    return AutoModelForCausalLM.from_pretrained(
        source.llm.path,
        local_files_only=True,
        quantization_config=bits,
        device_map={"": device},
        dtype=dtype,  # the parts bitsandbytes leaves unquantized (embeddings, norms, head)
    )
