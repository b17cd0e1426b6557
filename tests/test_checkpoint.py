"""Loading trained runs: load_run, checkpoints written before config_version, frozen models."""

import pytest
import torch

from lit_bluelm.chat import render_chat
from lit_bluelm.checkpoint import load_model_weights, load_run, read_model_state
from lit_bluelm.config import ConfigError, load_config, to_container
from lit_bluelm.frozen import load_frozen_llm, resolve_source
from lit_bluelm.models import build_model
from lit_bluelm.startup import load_run_config
from lit_bluelm.tokenizer import load_tokenizer
from tests.helpers import tiny_args


@pytest.fixture
def old_checkpoint(demo_dir, tmp_path):
    """A checkpoint as the code before the structure issue wrote it: no config_version, no
    context section, no tokenizer copy (the saved tokenizer.path points at the data folder)."""
    cfg = load_config(tiny_args(demo_dir, tmp_path / "old_run"))
    cfg.model.image_token_id = 2
    torch.manual_seed(0)
    model = build_model(cfg.model)
    saved = to_container(cfg)
    del saved["context"]
    path = tmp_path / "old.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": saved}, "global_step": 7}, path)
    return path, model


def test_an_old_checkpoint_loads_with_load_run_init_from_and_as_a_teacher(old_checkpoint, demo_dir, tmp_path):
    path, model = old_checkpoint
    run = load_run(path)
    assert run.config.context.rope is None and run.config.model.name == "tiny"
    assert run.tokenizer.get_vocab() == load_tokenizer(demo_dir / "tokenizer").get_vocab()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[name], tensor)
    # init_from: a new run takes the weights (and no context, as the old run had none)
    cfg = load_run_config(tiny_args(demo_dir, tmp_path / "new", f"init_from={path}"))
    assert cfg.context.rope is None
    fresh = build_model(cfg.model, cfg.context)
    assert load_model_weights(fresh, path)["missing"] == []
    # as a distillation teacher: its LLM, frozen; its tokenizer may be gone (ids compared then
    # only by vocabulary size)
    moved = torch.load(path, weights_only=True)
    moved["hyper_parameters"]["cfg"]["tokenizer"]["path"] = str(tmp_path / "gone")
    path = tmp_path / "old_without_tokenizer.ckpt"
    torch.save(moved, path)
    source = resolve_source(str(path), "distill.teacher")
    assert source.tokenizer is None
    teacher = load_frozen_llm(source, torch.float32)
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, tensor in model.llm.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[name], tensor)


def test_load_run_finds_the_runs_own_tokenizer_copy(demo_dir, tmp_path):
    import shutil

    import train

    run_dir = tmp_path / "run"
    summary = train.run(
        load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=1", "validate_before_fit=false"))
    )
    ckpt = torch.load(summary["last_ckpt"], weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["config_version"] == 2
    # the run moved elsewhere and its data folder is gone: the copy inside the run still loads
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    shutil.rmtree(run_dir)
    run = load_run(moved / "checkpoints" / "last.ckpt")
    assert run.tokenizer.name_or_path == str(moved / "tokenizer")
    # the chat format travels with the run as its tokenizer's chat template
    prompt = run.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, enable_thinking=True, add_generation_prompt=True
    )
    assert prompt == render_chat(
        [{"role": "user", "content": "hi"}], enable_thinking=True, add_generation_prompt=True
    )
    assert run.tokenizer.get_vocab() == load_tokenizer(demo_dir / "tokenizer").get_vocab()
    state = read_model_state(moved / "checkpoints" / "last.ckpt")
    for name, tensor in run.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name])
    assert not run.model.training


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ConfigError, match="checkpoint: .* has no lit-bluelm config"):
        load_run(tmp_path / "bare.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a checkpoint file"):
        load_run(tmp_path / "text.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ConfigError, match="holds a list"):
        load_run(tmp_path / "list.ckpt", key="init_from")
