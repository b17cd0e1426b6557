"""Start-up: what a run's config points at, read before any data or model work. The config
(``lit_bluelm.config``) checks keys and values and reads no file it names; here the checkpoints
of ``init_from`` / ``resume_from`` are read (safely), ``resume_from=auto`` is resolved, the
``distill.teacher`` is checked, the context scaling a run inherits from its checkpoint is
applied, and the pickled weights files the model loaders will read are checked the way they
load. Every problem is a :class:`ConfigError` (one line, exit 2).

:func:`resolve_inputs` runs it all and may run again on the same config (``trainer.prepare``
and ``trainer.dry_run`` call it, so ``fit_stage(load_config(argv))`` is what ``train.py`` runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from lit_bluelm.checkpoint import newest_resumable, read_meta, recover_checkpoint, saved_config
from lit_bluelm.config import load_config
from lit_bluelm.errors import ConfigError
from lit_bluelm.frozen import resolve_source
from lit_bluelm.models.weights import check_hf_weights, check_weights_file

TEACHER_KEY = "distill.teacher"


def load_run_config(argv: Sequence[str] = ()) -> DictConfig:
    """``load_config(argv)`` with what its paths hold resolved and checked: the config a run
    trains with."""
    return resolve_inputs(load_config(argv))


def resolve_inputs(cfg: DictConfig) -> DictConfig:
    """Resolve and check, in place, everything ``cfg`` reads from disk at start-up."""
    resolve_checkpoints(cfg)
    check_teacher(cfg)
    inherit_context(cfg)
    resolve_seq_len(cfg)
    check_weights(cfg)
    return cfg


def resolve_checkpoints(cfg: DictConfig) -> None:
    """``resume_from=auto`` becomes the newest resumable checkpoint of ``run_dir`` (None: a
    fresh start); an interrupted sharded swap of ``resume_from`` is repaired; ``init_from`` and
    ``resume_from`` are read: the form, the sharded metadata and the pickle, all safely."""
    if cfg.resume_from == "auto":  # a requeued job: continue if there is something to continue
        found = newest_resumable(Path(cfg.run_dir) / "checkpoints")
        cfg.resume_from = str(found) if found is not None else None
    elif cfg.resume_from:
        recover_checkpoint(cfg.resume_from)  # a sharded swap a crash interrupted
    for key in ("init_from", "resume_from"):
        if cfg[key]:
            read_meta(cfg[key], key)


def check_teacher(cfg: DictConfig) -> None:
    """``distill.teacher`` is a preset, a Hugging Face folder whose weights load safely, or a
    lit-bluelm checkpoint (its saved config read safely)."""
    if not cfg.distill.teacher:
        return
    source = resolve_source(cfg.distill.teacher, TEACHER_KEY)
    if source.llm.name == "from_pretrained" and source.checkpoint is None:
        check_hf_weights(source.llm.path, TEACHER_KEY)


def inherit_context(cfg: DictConfig) -> None:
    """A run started (``init_from``) or continued (``resume_from``) from a checkpoint keeps that
    checkpoint's context scaling unless its stage or command line sets one (``context.rope``);
    config.yaml then shows what was applied."""
    key = "resume_from" if cfg.resume_from else "init_from" if cfg.init_from else None
    if key is None or cfg.context.rope is not None:
        return
    saved = saved_config(cfg[key], key, required=False)  # a bare state dict has no config
    rope = ((saved or {}).get("context") or {}).get("rope")
    if rope is not None:
        cfg.context.rope = rope


def resolve_seq_len(cfg: DictConfig) -> None:
    """``data.seq_len: null`` becomes the model's context (``max_position_embeddings`` after the
    stage's ``context.rope``); a row longer than that context is refused: its positions would be
    ones the model's RoPE was never set up for."""
    from lit_bluelm.models.llm import llm_config

    if cfg.model.llm.name == "from_pretrained" and not Path(str(cfg.model.llm.path)).is_dir():
        return  # the loader names the missing folder
    context = llm_config(cfg.model.llm, cfg.context.rope).max_position_embeddings
    if cfg.data.seq_len is None:
        cfg.data.seq_len = int(context)
    elif cfg.data.seq_len > context:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's context of {context} tokens "
            "(model.llm max_position_embeddings, scaled by context.rope); extend it with a "
            "long-context stage (stage=long_context) or shorten the rows"
        )


def check_weights(cfg: DictConfig) -> None:
    """The pickled weights of ``model.llm.path`` (a Hugging Face folder) and
    ``model.vision.pretrained`` load with ``weights_only=True``. A missing path is left to the
    loader's own error."""
    llm = cfg.model.llm
    if llm.name == "from_pretrained" and llm.path and Path(llm.path).is_dir():
        check_hf_weights(llm.path, "model.llm.path")
    if not cfg.model.text_only and cfg.model.vision.pretrained:
        check_weights_file(cfg.model.vision.pretrained, "model.vision.pretrained")
