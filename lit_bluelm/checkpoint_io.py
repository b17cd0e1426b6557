"""Writing checkpoints so that a crash, a kill or a full disk at any moment leaves the previous
checkpoint whole.

- A single-file checkpoint is written to ``<name>.<pid>.tmp`` in its own folder, flushed and
  ``fsync``ed, then ``os.replace``d over ``<name>`` (one rename, same file system; the folder is
  fsynced too). A failed write removes its temporary file and raises
  :class:`CheckpointSaveError` naming the path and the cause (``No space left on device``).
- A sharded checkpoint (a folder, written by every rank) cannot be replaced by one rename: it is
  written as ``<name>.tmp`` and swapped in through ``<name>.old``; :func:`recover_swap` repairs
  whatever an interrupted swap left, so ``<name>`` exists again after a crash at any point.
- :func:`remove_stale_temporaries` clears what killed writes left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_bluelm.errors import RunError

log = logging.getLogger(__name__)
_REMOTE = ("://",)


class CheckpointSaveError(RunError):
    """Writing a checkpoint failed; the previous checkpoint of that name is untouched."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def write_atomic(path: str | Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointSaveError(f"saving checkpoint '{path}' failed: {_reason(err)}") from err
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`write_atomic` for local paths (every checkpoint a
    run writes: ``last.ckpt``, ``on_exception.ckpt``, ``best-step=*``)."""

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if any(m in str(path) for m in _REMOTE):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("storage_options are not supported for local checkpoints")
        write_atomic(path, lambda f: torch.save(checkpoint, f))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_swap(path: str | Path) -> None:
    """Finish or undo an interrupted folder swap of ``path`` (``<path>.tmp`` -> ``<path>``
    through ``<path>.old``): the complete previous checkpoint comes back when ``path`` is gone.
    Safe to call from several processes at once."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not old.exists():
        return
    if not path.exists():
        try:
            os.replace(old, path)  # the swap stopped between its two renames
            log.warning("recovered %s from %s (a checkpoint swap was interrupted)", path, old.name)
        except FileNotFoundError:  # another process recovered it first
            pass
    else:
        _remove(old)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove the temporary files and folders of interrupted writes in a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.endswith(".tmp"):
            _remove(entry)
        elif entry.name.endswith(".old"):
            recover_swap(entry.with_name(entry.name[: -len(".old")]))


def swap_in_folder(tmp: Path, path: Path) -> None:
    """Replace the folder (or file) ``path`` with the folder ``tmp`` (rank 0, after every rank
    has written its shards into ``tmp``); see :func:`recover_swap` for a crash in between."""
    old = path.with_name(path.name + ".old")
    _remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _remove(old)
