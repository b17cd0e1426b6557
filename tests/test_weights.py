"""Pickled weights files the model loaders read (a Hugging Face folder's ``pytorch_model*.bin``,
an open_clip ``.bin``): checked at start-up the way they load (``weights_only=True``). A refused
one is one line naming the file and the refused global, exit 2; a plain state dict loads."""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import train
from lit_bluelm.config import ConfigError, load_config
from lit_bluelm.frozen import load_frozen_llm, resolve_source
from lit_bluelm.models import LLMS, build_model
from lit_bluelm.models.vision import build_tiny_vit
from lit_bluelm.models.weights import check_hf_weights, hf_weight_files
from lit_bluelm.startup import load_run_config
from tests.helpers import ROOT, text_args, tiny_args


class _Weights(collections.OrderedDict):
    """A state dict as a custom class: weights-only loading refuses to build it."""


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config([])
    cfg.model.image_token_id = 5
    return cfg.model


def _hf_folder(folder, llm, extra=None):
    """A Hugging Face folder with pickled weights (``pytorch_model.bin``), ``extra`` added to
    its state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    llm.config.save_pretrained(folder)
    state = collections.OrderedDict(llm.state_dict())
    if extra is not None:
        state.update(extra)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _vision_bin(path, tower, extra=None):
    """An open_clip-style checkpoint: ``visual.trunk.*`` keys under ``state_dict``."""
    ckpt = {"state_dict": {f"visual.trunk.{k}": v for k, v in tower.trunk.state_dict().items()}}
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    llm = LLMS["from_config"](tiny.llm)
    tower = build_tiny_vit(tiny.vision)
    return {
        "llm": llm,
        "tower": tower,
        "good_hf": _hf_folder(root / "good_hf", llm),
        # a custom class in place of the state dict's OrderedDict
        "bad_hf": _hf_folder(root / "bad_hf", llm, {"extra": _Weights(a=torch.ones(1))}),
        # a function reference beside the tensors
        "bad_teacher": _hf_folder(root / "bad_teacher", llm, {"hook": torch.nn.functional.relu}),
        "good_vision": _vision_bin(root / "good_vision.bin", tower),
        # open_clip training checkpoints of old kept the argparse namespace of their run
        "bad_vision": _vision_bin(root / "bad_vision.bin", tower, {"args": argparse.Namespace(lr=1)}),
    }


KEYS = ["model.llm.path", "distill.teacher", "model.vision.pretrained"]


def _cases(files):
    """(extra arguments, config key, refused file, refused global) for each refused input."""
    return [
        (
            ["model.llm.name=from_pretrained", f"model.llm.path={files['bad_hf']}"],
            "model.llm.path",
            files["bad_hf"] / "pytorch_model.bin",
            f"{_Weights.__module__}._Weights",
        ),
        (
            [f"distill.teacher={files['bad_teacher']}"],
            "distill.teacher",
            files["bad_teacher"] / "pytorch_model.bin",
            "torch.nn.functional.relu",
        ),
        (
            [f"model.vision.pretrained={files['bad_vision']}"],
            "model.vision.pretrained",
            files["bad_vision"],
            "argparse.Namespace",
        ),
    ]


def _args(demo_dir, run_dir, extra):
    if extra[0].startswith("distill."):
        return text_args(demo_dir, run_dir, *extra)  # the text stage distils from the teacher
    return tiny_args(demo_dir, run_dir, *extra)


@pytest.mark.parametrize("case", range(3), ids=KEYS)
def test_a_refused_weights_file_names_the_file_and_the_global(files, demo_dir, tmp_path, case):
    extra, key, path, refused = _cases(files)[case]
    with pytest.raises(ConfigError) as err:
        load_run_config(_args(demo_dir, tmp_path / "run", extra))
    message = str(err.value)
    assert message == (
        f"{key}: '{path}' pickles {refused}, a global that weights-only loading refuses; "
        "save the weights as safetensors"
    )


@pytest.mark.parametrize("case", range(3), ids=KEYS)
def test_a_refused_weights_file_exits_2_in_one_line_before_any_work(files, demo_dir, tmp_path, case, capsys):
    extra, key, path, refused = _cases(files)[case]
    run_dir = tmp_path / "run"
    assert train.main(_args(demo_dir, run_dir, extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {key}: '{path}'") and refused in err and "safetensors" in err, err
    assert not run_dir.exists()  # refused at start-up: nothing written
    # the dry run (which loads no weights) says the same
    assert train.main([*extra, f"run_dir={run_dir}", "dry_run=true"]) == 2
    assert capsys.readouterr().err.strip() == err


def test_plain_bin_state_dicts_still_load(files, tiny, demo_dir, tmp_path):
    llm, tower = files["llm"], files["tower"]
    args = [
        "model.llm.name=from_pretrained",
        f"model.llm.path={files['good_hf']}",
        f"model.vision.pretrained={files['good_vision']}",
        f"distill.teacher={files['good_hf']}",
    ]
    cfg = load_run_config(tiny_args(demo_dir, tmp_path / "run", *args))  # the start-up checks pass
    cfg.model.image_token_id = 5
    model = build_model(cfg.model, cfg.context)
    for name, tensor in llm.state_dict().items():
        torch.testing.assert_close(model.llm.state_dict()[name], tensor)
    for name, tensor in tower.trunk.state_dict().items():
        torch.testing.assert_close(model.vision.trunk.state_dict()[name], tensor)
    teacher = load_frozen_llm(resolve_source(str(files["good_hf"]), "distill.teacher"), torch.float32)
    torch.testing.assert_close(teacher.lm_head.weight, llm.lm_head.weight)


def test_the_files_from_pretrained_reads_are_the_ones_checked(files, tmp_path):
    llm = files["llm"]
    bad = {"extra": _Weights(a=torch.ones(1))}
    # beside safetensors, a .bin is never read (transformers prefers safetensors)
    both = _hf_folder(tmp_path / "both", llm, bad)
    save_file({"x": torch.zeros(1)}, both / "model.safetensors")
    assert hf_weight_files(both) == []
    check_hf_weights(both, "model.llm.path")
    # a sharded .bin: every shard its index names
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    llm.config.save_pretrained(sharded)
    names = list(llm.state_dict())
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        shard = {n: llm.state_dict()[n] for n in part} | (bad if i else {})
        torch.save(shard, sharded / f"pytorch_model-0000{i + 1}-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 + (j >= half)}-of-00002.bin" for j, n in enumerate(names)}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in hf_weight_files(sharded)] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    with pytest.raises(ConfigError, match=r"pytorch_model-00002-of-00002\.bin' pickles .*_Weights"):
        check_hf_weights(sharded, "model.llm.path")


def test_a_blocked_module_and_a_damaged_file_are_one_line_too(files, tmp_path):
    blocked = _hf_folder(tmp_path / "blocked", files["llm"], {"hook": os.getcwd})
    with pytest.raises(ConfigError, match=r"pickles posix\.getcwd, a global .*safetensors"):
        check_hf_weights(blocked, "distill.teacher")
    path = blocked / "pytorch_model.bin"
    torn = path.read_bytes()[:1000]
    path.write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=r"^distill.teacher: refused to load '.*': Unsupported operand"):
        check_hf_weights(blocked, "distill.teacher")
    path.write_bytes(torn)  # a torn archive
    with pytest.raises(ConfigError, match=r"^distill.teacher: cannot read '.*pytorch_model\.bin'") as err:
        check_hf_weights(blocked, "distill.teacher")
    assert "\n" not in str(err.value)


def test_train_py_refuses_a_pickled_hf_folder_in_one_line(files, tmp_path):
    """The command as a user runs it: exit 2, one line on stderr, nothing else."""
    run_dir = tmp_path / "run"
    args = ["model.llm.name=from_pretrained", f"model.llm.path={files['bad_hf']}", f"run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: model.llm.path: '{files['bad_hf'] / 'pytorch_model.bin'}' pickles "
        f"{_Weights.__module__}._Weights, a global that weights-only loading refuses; "
        "save the weights as safetensors"
    ]
    assert not run_dir.exists()
