"""lit_bluelm.safe_dcp: genuine DCP folders read back; crafted ones are refused before any code runs."""

from __future__ import annotations

import builtins
import dataclasses
import os
import pickle
import shlex
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from lit_bluelm.safe_dcp import (
    ALLOWED,
    NotACheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    check_sharded_checkpoint,
    read_metadata,
    safe_load,
)


class Touch:
    """Unpickling runs ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w')",))


def _state():
    return {
        "w": torch.randn(3, 4),
        "b": torch.randn(5, dtype=torch.bfloat16),
        "nested": {"i": torch.arange(6).view(2, 3), "lr": 0.5, "name": "adam", "betas": (0.9, 0.95)},
        "step": 7,
        "flag": None,
    }


def _save(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _load(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)


@pytest.fixture
def genuine(tmp_path):
    state = _state()
    _save(state, tmp_path / "ckpt")
    return tmp_path / "ckpt", state


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_genuine_folder_loads_back(genuine):
    path, saved = genuine
    template = {
        "w": torch.zeros(3, 4),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "nested": {"i": torch.zeros(2, 3, dtype=torch.int64), "lr": 0.0, "name": "", "betas": ()},
        "step": 0,
        "flag": 1,
    }
    _load(template, path)
    for key in ("w", "b"):
        torch.testing.assert_close(template[key], saved[key])
    torch.testing.assert_close(template["nested"]["i"], saved["nested"]["i"])
    assert template["nested"]["lr"] == 0.5 and template["nested"]["betas"] == (0.9, 0.95)
    assert template["nested"]["name"] == "adam" and template["step"] == 7 and template["flag"] is None


def test_reader_replicates_torch_side_effects(genuine):
    path, _ = genuine
    ours, theirs = SafeFileSystemReader(str(path)), dcp.FileSystemReader(str(path))
    mine, stock = ours.read_metadata(), theirs.read_metadata()
    assert mine.storage_meta.load_id == ours.load_id
    assert dataclasses.replace(mine.storage_meta, load_id=None) == dataclasses.replace(
        stock.storage_meta, load_id=None
    )
    assert mine.state_dict_metadata == stock.state_dict_metadata and mine.storage_data == stock.storage_data
    assert check_sharded_checkpoint(path).state_dict_metadata.keys() == stock.state_dict_metadata.keys()


def test_allowed_is_the_genuine_vocabulary():
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in ALLOWED
    assert ("torch", "bfloat16") in ALLOWED and ("torch", "Size") in ALLOWED
    assert not {("builtins", "eval"), ("posix", "system"), ("os", "system")} & ALLOWED


# every way the project reads a folder's metadata: each must refuse the same files
METADATA_READERS = (
    read_metadata,
    check_sharded_checkpoint,
    lambda p: SafeFileSystemReader(str(p)).read_metadata(),
)


@pytest.mark.parametrize(
    "payload, refused", [(Touch, f"{os.system.__module__}.system"), (Eval, "builtins.eval")]
)
def test_crafted_metadata_is_refused_unrun(tmp_path, genuine, payload, refused):
    path, _ = genuine
    marker = tmp_path / "pwned"
    # bare payload, and payload hidden inside an otherwise genuine Metadata
    bare = pickle.dumps(payload(marker))
    md = dcp.FileSystemReader(str(path)).read_metadata()
    md.planner_data = {"x": payload(marker)}
    for blob in (bare, pickle.dumps(md)):
        (path / ".metadata").write_bytes(blob)
        for read in METADATA_READERS:
            with pytest.raises(UnsafeCheckpointError) as err:
                read(path)
            assert refused in _one_line(err) and ".metadata" in str(err.value)
        # dcp.load swallows the read_metadata error, tries "__0.metadata", then raises a
        # CheckpointException (a BaseException) around an AssertionError quoting both errors
        with pytest.raises(CheckpointException) as err:
            _load({"w": torch.zeros(3, 4)}, path)
        assert refused in str(err.value.failures[0][0])
    assert not marker.exists()


def test_crafted_bytes_item_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    _save({"w": torch.ones(2), "evil": Touch(marker)}, tmp_path / "ckpt")
    check_sharded_checkpoint(tmp_path / "ckpt")  # the metadata itself is genuine
    with pytest.raises(CheckpointException) as err:
        _load({"w": torch.zeros(2), "evil": None}, tmp_path / "ckpt")
    refusal = err.value.failures[0][0]
    assert isinstance(refusal, UnsafeCheckpointError) and "\n" not in str(refusal)
    assert "evil" in str(refusal) and f"{os.system.__module__}.system" in str(refusal)
    assert not marker.exists()


def test_data_file_outside_the_folder_is_refused(genuine):
    path, _ = genuine
    md = dcp.FileSystemReader(str(path)).read_metadata()
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match="outside the folder"):
        read_metadata(path)


def test_missing_metadata(tmp_path):
    for read in METADATA_READERS:
        with pytest.raises(NotACheckpointError) as err:
            read(tmp_path)
        assert _one_line(err) == f"'{tmp_path}' is not a sharded checkpoint folder (no .metadata)"


def test_garbage_and_truncated_metadata(genuine):
    path, _ = genuine
    whole = (path / ".metadata").read_bytes()
    for blob in (b"", b"not a pickle at all", whole[: len(whole) // 2], pickle.dumps({"a": 1})):
        (path / ".metadata").write_bytes(blob)
        with pytest.raises(NotACheckpointError) as err:
            read_metadata(path)
        assert "unreadable" in _one_line(err)


def test_safe_load(genuine, tmp_path):
    path, saved = genuine
    template = {"w": torch.zeros(3, 4), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        safe_load(template, path)
    torch.testing.assert_close(template["w"], saved["w"])
    assert template["step"] == 7
    (path / ".metadata").write_bytes(pickle.dumps(Touch(tmp_path / "pwned")))
    with pytest.raises(UnsafeCheckpointError):  # checked first: not wrapped in a CheckpointException
        safe_load(template, path)
    assert not (tmp_path / "pwned").exists()


def test_lightning_resume_goes_through_the_patched_loader(tmp_path):
    """The override the module docstring recommends: Lightning's sharded-folder load (model, then
    each optimizer) calls the patched module-level name, and so reads through SafeFileSystemReader."""
    import torch.distributed as dist
    from lightning.fabric.strategies.model_parallel import _load_checkpoint
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = fully_shard(torch.nn.Linear(3, 2), mesh=init_device_mesh("cpu", (1,)))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        ckpt = tmp_path / "last.ckpt"
        dcp.save(
            {"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, opt)},
            checkpoint_id=ckpt,
        )
        torch.save({"global_step": 1}, ckpt / "meta.pt")
        calls = []

        def spy(state, path):
            calls.append(sorted(state))
            safe_load(state, path)

        with mock.patch("lightning.fabric.strategies.model_parallel._distributed_checkpoint_load", spy):
            state = {"state_dict": model, "optimizer_0": opt}
            meta = _load_checkpoint(ckpt, state, optimizer_states_from_list=True, weights_only=True)
        assert calls == [["state_dict"], ["optimizer_0"]] and meta == {"global_step": 1}
    finally:
        dist.destroy_process_group()
