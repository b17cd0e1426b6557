"""Reading torch distributed-checkpoint (DCP) folders without running code from them.

Torch's reader unpickles ``.metadata`` with ``pickle.load``; its default planner ``torch.load``s each
non-tensor item (an optimizer's ``lr``...) with ``weights_only=False``: a crafted folder runs code either
way. Here ``.metadata`` passes an allowlist unpickler; bytes items must load with ``weights_only=True``.

Lightning 2.6.6: ``ModelParallelStrategy.load_checkpoint`` (pytorch/strategies/model_parallel.py:332)
calls ``_load_checkpoint`` (fabric/strategies/model_parallel.py:410), which for a folder calls (lines
444, 450) ``_distributed_checkpoint_load`` (fabric/strategies/fsdp.py:879): ``dcp.load(state,
checkpoint_id=path)``, so torch builds a stock ``FileSystemReader``. Line 454 reads ``meta.pt`` with
``torch.load(..., weights_only=weights_only)``: True when the Trainer got ``weights_only=True`` (None:
torch's default, True unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set). Safe resume in a subclass: override
``load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]``
to ``check_sharded_checkpoint`` a folder (bad ``.metadata``, not bad bytes items), then return
``super().load_checkpoint(checkpoint_path, weights_only=True)`` inside ``mock.patch("lightning.fabric.
strategies.model_parallel._distributed_checkpoint_load", safe_load)`` (no hook takes a reader).
"""

from __future__ import annotations

import copyreg
import inspect
import os
import pathlib
import pickle
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.filesystem import _StorageInfo


class UnsafeCheckpointError(ValueError):
    """The checkpoint references something a genuine DCP folder never holds."""


class NotACheckpointError(ValueError):
    """No readable DCP metadata where a sharded checkpoint folder was expected."""


def _allowed() -> frozenset[tuple[str, str]]:
    # derived from the installed torch, so a torch upgrade that adds a metadata class still reads
    mod = md.__name__
    classes = {(mod, n) for n, o in vars(md).items() if inspect.isclass(o) and o.__module__ == mod}
    dtypes = {("torch", n) for n, o in vars(torch).items() if isinstance(o, torch.dtype)}
    layout_fn = copyreg.dispatch_table[torch.layout](torch.strided)[0]  # torch.serialization._get_layout
    # StorageMeta.checkpoint_id is the Path the writer got ("pathlib._local" on Python 3.13)
    posix = (pathlib.PosixPath, pathlib.PurePosixPath)
    paths = {(m, c.__name__) for c in posix for m in ("pathlib", c.__module__)}
    single = {(c.__module__, c.__qualname__) for c in (_StorageInfo, torch.Size, layout_fn)}
    return frozenset(classes | dtypes | paths | single)


ALLOWED: frozenset[tuple[str, str]] = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED`` globals: ``os.system``, ``builtins.eval``... are never called."""

    def __init__(self, file: IO[bytes], where: str | os.PathLike) -> None:
        super().__init__(file)
        self.where = str(where)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(f"refusing '{self.where}': it references {module}.{name}")
        return super().find_class(module, name)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip() or '-').splitlines()[0][:200]}"


def _unpickle(stream: IO[bytes], where: str | os.PathLike) -> md.Metadata:
    try:
        obj = RestrictedUnpickler(stream, where).load()
        why = None if isinstance(obj, md.Metadata) else f"holds a {type(obj).__name__}"
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated / garbage / another pickle: one line, no traceback
        why = _first_line(err)
    if why is not None or not isinstance(obj.storage_data, dict):
        raise NotACheckpointError(f"'{where}' is unreadable as DCP metadata ({why or 'no storage_data'})")
    for info in obj.storage_data.values():
        rel = getattr(info, "relative_path", None)  # DCP writes its data files flat in the folder
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpointError(f"refusing '{where}': data file {rel!r} lies outside the folder")
    return obj


def read_metadata(path: str | os.PathLike) -> md.Metadata:
    """The ``Metadata`` of the sharded checkpoint folder ``path``, read safely."""
    meta = pathlib.Path(path) / ".metadata"
    if not meta.is_file():
        raise NotACheckpointError(f"'{path}' is not a sharded checkpoint folder (no .metadata)")
    with open(meta, "rb") as stream:
        return _unpickle(stream, meta)


def check_sharded_checkpoint(path: str | os.PathLike) -> md.Metadata:
    """Validate a folder's metadata before handing it to third-party code (e.g. Lightning)."""
    return read_metadata(path)


def safe_load(state_dict: dict[str, Any], path: str | os.PathLike) -> None:
    """Drop-in for Lightning's ``_distributed_checkpoint_load(module_state, path)``."""
    check_sharded_checkpoint(path)  # a clear error here; inside dcp.load it comes wrapped
    dcp.load(state_dict, storage_reader=SafeFileSystemReader(path))


class _BytesGuard:
    """The planner ``read_data`` sees: a bytes item must load ``weights_only`` before ``load_bytes``."""

    def __init__(self, planner: Any, where: str) -> None:
        self._planner, self._where = planner, where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: IO[bytes]) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's refusal is many lines: keep the one naming the global
            lines = [ln.strip() for ln in str(err).splitlines() if "unsupported" in ln.lower()]
            reason = f"{read_item.dest_index.fqn}: {lines[0] if lines else _first_line(err)}"
            raise UnsafeCheckpointError(f"refusing '{self._where}': {reason}") from None
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata and bytes items are read without running code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> md.Metadata:
        # torch's, pickle.load aside; **kwargs: dcp.load looks for it to retry "__<rank>.metadata"
        path = self._get_metadata_path(kwargs.get("rank"))
        if not self.fs.exists(path):
            raise NotACheckpointError(f"'{self.path}' is not a sharded checkpoint folder (no {path.name})")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _unpickle(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _BytesGuard(planner, str(self.path)))
