"""One safe home for a trained run: checking and reading every checkpoint form, and
``load_run(path)`` -> the saved config, the built model with its weights, and the run's tokenizer.

Checkpoint forms: a Lightning ``.ckpt`` file (a torch zip archive) or a sharded folder written by
the fsdp strategy (``meta.pt`` beside torch distributed-checkpoint files). Nothing read here runs
code: files load with ``weights_only=True``; a folder's ``.metadata`` goes through a restricted
unpickler (``lit_bluelm.safe_dcp``). Every problem is a :class:`ConfigError` naming the config
key the path came from.
"""

from __future__ import annotations

import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from lit_bluelm.errors import ConfigError

PREFIX = "model."
TOKENIZER_DIR = "tokenizer"  # <run_dir>/tokenizer: the run's own copy of its tokenizer


def _meta_path(path: Path) -> Path:
    return path / "meta.pt" if path.is_dir() else path


def check_checkpoint(path: str | Path, key: str) -> None:
    """``path`` is a checkpoint file or a sharded checkpoint folder (its metadata read safely)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: no such checkpoint '{path}'")
    if path.is_dir():
        from lit_bluelm.safe_dcp import check_sharded_checkpoint  # torch.distributed: imported on use

        try:
            check_sharded_checkpoint(path)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
        if not (path / "meta.pt").is_file():
            raise ConfigError(f"{key}: '{path}' is not a lit-bluelm sharded checkpoint (no meta.pt)")
    elif not zipfile.is_zipfile(path):
        raise ConfigError(f"{key}: '{path}' is not a checkpoint file (not a torch.save archive)")


def read_meta(path: str | Path, key: str) -> Dict[str, Any]:
    """The checkpoint's dict (of a folder: ``meta.pt``), tensors memory-mapped, not read."""
    path = Path(path)
    check_checkpoint(path, key)
    meta = _meta_path(path)
    try:
        ckpt = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an unpickling refusal or a damaged archive: one line, no traceback
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        # torch's refusal is many lines; the one naming the refused global is what matters
        reason = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0])
        raise ConfigError(f"{key}: refused to load '{meta}': {reason[:300]}") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{key}: '{meta}' holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


RESUMABLE = ("last.ckpt", "on_exception.ckpt")  # what resume_from=auto looks for, in this order


def recover_checkpoint(path: str | Path) -> None:
    """Repair an interrupted sharded-folder swap of ``path`` (``lit_bluelm.checkpoint_io``)."""
    from lit_bluelm.checkpoint_io import recover_swap

    recover_swap(path)


def newest_resumable(folder: str | Path) -> Optional[Path]:
    """The checkpoint ``resume_from=auto`` continues from: of ``last.ckpt`` and
    ``on_exception.ckpt`` in ``folder``, the loadable one with the highest global step (``last``
    on a tie); None when there is none (a fresh start). One that does not load is passed over
    with a warning."""
    found = []
    for rank, name in enumerate(RESUMABLE):
        path = Path(folder) / name
        recover_checkpoint(path)
        if not path.exists():
            continue
        try:
            step = int(read_meta(path, "resume_from").get("global_step", -1))
        except ConfigError as err:
            warnings.warn(f"resume_from=auto: passing over {path}: {err}", stacklevel=2)
            continue
        found.append((step, -rank, path))
    return max(found)[2] if found else None


def _upgrade(cfg: Dict[str, Any], version: int) -> Dict[str, Any]:
    """A saved config brought to today's schema. Version 1 (no ``config_version``) lacks the
    ``context`` section, which then takes its default (the preset's plain RoPE)."""
    return cfg


def saved_config(path: str | Path, key: str, required: bool = True) -> Optional[Dict[str, Any]]:
    """The config a lit-bluelm checkpoint was trained with (a plain dict, today's schema); None
    for a checkpoint without one (a bare state dict) unless ``required``."""
    hparams = read_meta(path, key).get("hyper_parameters", {})
    cfg = hparams.get("cfg") if isinstance(hparams, dict) else None
    if not isinstance(cfg, dict):
        if not required:
            return None
        raise ConfigError(f"{key}: '{path}' has no lit-bluelm config (hyper_parameters.cfg)")
    return _upgrade(cfg, int(hparams.get("config_version", 1)))


def _sharded_model_state(path: Path) -> Dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a sharded folder, and nothing else (the optimizer state beside
    them is never read)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lit_bluelm.safe_dcp import SafeFileSystemReader

    reader = SafeFileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    prefix = "state_dict." + PREFIX  # how Lightning's ModelParallelStrategy lays out the folder
    template = {
        k[len("state_dict.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for k, meta in stored.items()
        if k.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        planner = DefaultLoadPlanner(allow_partial_load=True)
        try:
            load({"state_dict": template}, storage_reader=reader, planner=planner, no_dist=True)
        except BaseException as err:  # torch's CheckpointException is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            reason = next((ln for ln in lines if "refusing" in ln or "Error" in ln), lines[0])
            raise ConfigError(f"checkpoint: cannot read the shards of '{path}': {reason[:300]}") from None
    return {k[len(PREFIX) :]: v for k, v in template.items()}


def read_model_state(path: str | Path, key: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The ``model.*`` weights of a checkpoint, prefix stripped."""
    path = Path(path)
    if path.is_dir():
        check_checkpoint(path, key)
        return _sharded_model_state(path)
    state = read_meta(path, key)
    state = state.get("state_dict", state)
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def load_model_weights(model: nn.Module, path: str | Path, key: str = "init_from") -> Dict[str, list]:
    """Copy a checkpoint's weights into ``model``. Components the checkpoint lacks keep their
    init (e.g. a text-only checkpoint into a multimodal model); a shape mismatch or a checkpoint
    with nothing in common is an error. Returns the missing / unexpected keys."""
    own = model.state_dict()
    state = read_model_state(path, key)
    common = [k for k in state if k in own]
    if not common:
        raise ConfigError(f"{key}: '{path}' has no weights for this model")
    wrong = [k for k in common if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{key}: '{path}' does not fit this model: {k} is {tuple(state[k].shape)} there, "
            f"{tuple(own[k].shape)} here ({len(wrong)} tensors differ)"
        )
    bad = [k for k in common if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise ConfigError(
            f"{key}: '{path}' holds non-finite values ({len(bad)} tensors, e.g. {bad[0]}); it "
            "comes from a diverged run: pick an earlier checkpoint"
        )
    result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


# ----------------------------------------------------------------------------- a trained run


def copy_tokenizer(src: str | Path, run_dir: str | Path, think_position: str = "after_query") -> Path:
    """Copy the tokenizer directory into ``<run_dir>/tokenizer`` (atomically replaced), so the
    run stays loadable after its data folder is gone, with the chat format as its chat template
    (``think_position``: the run's ``sft.think_token_position``)."""
    from lit_bluelm.chat import chat_template
    from lit_bluelm.tokenizer import load_tokenizer

    dst = Path(run_dir) / TOKENIZER_DIR
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tokenizer = load_tokenizer(tmp)
    tokenizer.chat_template = chat_template(think_position)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def run_tokenizer(path: str | Path, saved: DictConfig) -> Optional[Path]:
    """The tokenizer of the run a checkpoint belongs to: ``<run_dir>/tokenizer`` beside its
    ``checkpoints/`` folder, else under the saved ``run_dir``, else (runs written before the
    copy existed) the saved ``tokenizer.path``."""
    path = Path(path)
    for candidate in (
        path.parent.parent / TOKENIZER_DIR,  # <run_dir>/checkpoints/<ckpt>
        Path(str(saved.run_dir)) / TOKENIZER_DIR,
        Path(str(saved.tokenizer.path)),
    ):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    return None


@dataclass
class LoadedRun:
    config: DictConfig  # the config the run was trained with (today's schema)
    model: Any  # BlueLM with the checkpoint's weights, eval mode, on CPU (None: weights=False)
    tokenizer: Any  # the run's tokenizer (transformers)
    path: Path


def load_run(
    path: str | Path,
    key: str = "checkpoint",
    text_only: bool = False,
    tokenizer: bool = True,
    weights: bool = True,
) -> LoadedRun:
    """A trained run from one of its checkpoints: saved config, model, tokenizer.
    ``text_only`` builds the LLM alone (e.g. a distillation teacher); ``tokenizer=False`` skips
    the tokenizer (``LoadedRun.tokenizer`` is None), for callers that check ids another way;
    ``weights=False`` builds no model and reads no weights (``LoadedRun.model`` is None), for
    start-up checks of the saved config and tokenizer."""
    from lit_bluelm.config import from_container
    from lit_bluelm.models import build_model
    from lit_bluelm.tokenizer import load_tokenizer

    cfg = from_container(saved_config(path, key), f"{key} (saved config)")
    if text_only:
        cfg.model.text_only = True
    tok_dir = run_tokenizer(path, cfg) if tokenizer else None
    if tokenizer and tok_dir is None:
        raise ConfigError(f"{key}: no tokenizer found for '{path}' (expected <run_dir>/{TOKENIZER_DIR})")
    if not weights:
        return LoadedRun(cfg, None, load_tokenizer(tok_dir) if tok_dir else None, Path(path))
    model = build_model(cfg.model, cfg.context)
    keys = load_model_weights(model, path, key)
    missing = [k for k in keys["missing"] if k not in _tied(model)]
    if missing:
        raise ConfigError(f"{key}: '{path}' lacks weights of its own model, e.g. {missing[:3]}")
    return LoadedRun(cfg, model.eval(), load_tokenizer(tok_dir) if tok_dir else None, Path(path))


def _tied(model: nn.Module) -> set:
    """State-dict keys of tied weights, which a checkpoint may store once."""
    llm = getattr(model, "llm", None)
    tied = getattr(llm, "_tied_weights_keys", None) or {}
    return {f"llm.{k}" for k in tied}
