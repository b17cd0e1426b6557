"""Reading torch distributed-checkpoint (DCP) folders without running code from them.

``FileSystemReader.read_metadata`` unpickles ``<folder>/.metadata`` with plain ``pickle.load``,
and the default load planner ``torch.load``s every non-tensor value ("bytes" items, e.g. an
optimizer's ``lr``) with ``weights_only=False``: a crafted folder runs a ``__reduce__`` payload
either way. Here ``.metadata`` goes through an allowlist unpickler and bytes items must pass
``torch.load(weights_only=True)`` before the planner sees them.

Lightning 2.6.6: ``ModelParallelStrategy.load_checkpoint`` (lightning/pytorch/strategies/
model_parallel.py:332) calls fabric's ``_load_checkpoint`` (lightning/fabric/strategies/
model_parallel.py:410), which for a folder calls ``_distributed_checkpoint_load`` (fabric/
strategies/fsdp.py:879): ``dcp.load(state, checkpoint_id=path)``, no reader given, so torch picks
a stock ``FileSystemReader`` (lines 444, 450: model, then each optimizer). ``meta.pt`` is read at
line 454 by ``torch.load(path / "meta.pt", weights_only=weights_only)``: True when the Trainer
got ``weights_only=True``; None falls to torch's default (True, unless the environment sets
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD). The minimal safe resume in a subclass overrides
``load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) ->
dict[str, Any]``: call ``check_sharded_checkpoint(checkpoint_path)`` for a folder (refuses a bad
``.metadata`` with a clear error, but not bad bytes items), then, to cover those too, run
``super().load_checkpoint(checkpoint_path, weights_only=True)`` inside
``unittest.mock.patch("lightning.fabric.strategies.model_parallel._distributed_checkpoint_load",
safe_load)`` (the name that module imported; there is no hook to pass a reader).
"""

from __future__ import annotations

import copyreg
import inspect
import io
import os
import pathlib
import pickle
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"


class UnsafeCheckpointError(ValueError):
    """The checkpoint references something a genuine DCP folder never holds."""


class NotACheckpointError(ValueError):
    """No readable DCP metadata where a sharded checkpoint folder was expected."""


def _allowed() -> frozenset[tuple[str, str]]:
    # derived from the installed torch, so a torch upgrade that adds a metadata class still reads
    classes = {
        (_md.__name__, n) for n, o in vars(_md).items() if inspect.isclass(o) and o.__module__ == _md.__name__
    }
    dtypes = {("torch", n) for n, o in vars(torch).items() if isinstance(o, torch.dtype)}
    layout_fn = copyreg.dispatch_table[torch.layout](torch.strided)[0]  # torch.serialization._get_layout
    # StorageMeta.checkpoint_id is the Path the writer was given ("pathlib._local" on Python 3.13)
    paths = {
        (m, c.__name__) for c in (pathlib.PosixPath, pathlib.PurePosixPath) for m in ("pathlib", c.__module__)
    }
    return frozenset(
        classes
        | dtypes
        | paths
        | {
            (_StorageInfo.__module__, _StorageInfo.__qualname__),
            (torch.Size.__module__, torch.Size.__name__),
            (layout_fn.__module__, layout_fn.__name__),
        }
    )


ALLOWED: frozenset[tuple[str, str]] = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only ``ALLOWED`` globals: every other name (``os.system``,
    ``builtins.eval``, ...) is refused before it can be called."""

    def __init__(self, file: IO[bytes], where: str | os.PathLike) -> None:
        super().__init__(file)
        self.where = str(where)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(
                f"refusing '{self.where}': it references {module}.{name}, which a torch checkpoint never holds"
            )
        return super().find_class(module, name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _unpickle(stream: IO[bytes], where: str | os.PathLike) -> Metadata:
    try:
        obj = RestrictedUnpickler(stream, where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated / garbage / wrong pickle: one line, no traceback
        raise NotACheckpointError(
            f"'{where}' is unreadable as checkpoint metadata ({_first_line(err)})"
        ) from None
    if not isinstance(obj, Metadata) or not isinstance(obj.storage_data, dict):
        raise NotACheckpointError(
            f"'{where}' is unreadable as checkpoint metadata (holds a {type(obj).__name__})"
        )
    for info in obj.storage_data.values():
        # DCP writes its data files flat in the folder: a path elsewhere would read outside it
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpointError(f"refusing '{where}': data file {rel!r} lies outside the folder")
    return obj


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The ``Metadata`` of the sharded checkpoint folder ``path``, read safely."""
    meta = pathlib.Path(path) / METADATA_FILE
    if not meta.is_file():
        raise NotACheckpointError(f"'{path}' is not a sharded checkpoint folder (no {METADATA_FILE})")
    with open(meta, "rb") as stream:
        return _unpickle(stream, meta)


def check_sharded_checkpoint(path: str | os.PathLike) -> Metadata:
    """Validate a folder's metadata before handing it to third-party code (e.g. Lightning)."""
    return read_metadata(path)


class _BytesGuard:
    """Stands in for the load planner during ``read_data``: a bytes item reaches the planner's
    ``load_bytes`` (``torch.load(weights_only=False)`` in torch's default planner) only after the
    same bytes loaded with ``weights_only=True``."""

    def __init__(self, planner: Any, where: str) -> None:
        self._planner, self._where = planner, where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as err:
            lines = str(err).splitlines()
            reason = next((ln.strip() for ln in lines if "unsupported" in ln.lower()), _first_line(err))
            raise UnsafeCheckpointError(
                f"refusing '{self._where}': {read_item.dest_index.fqn}: {reason}"
            ) from None
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata and bytes items are read without running code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # same as torch's, pickle.load aside; keep **kwargs: dcp.load checks for it to retry
        # with the rank-local "__<rank>.metadata"
        path = self._get_metadata_path(kwargs.get("rank"))
        if not self.fs.exists(path):
            raise NotACheckpointError(f"'{self.path}' is not a sharded checkpoint folder (no {path.name})")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _unpickle(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _BytesGuard(planner, str(self.path)))
