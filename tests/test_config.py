import shutil

import pytest
import torch

import train
from lit_bluelm.config import (
    CONFIG_ROOT,
    ConfigError,
    available,
    from_container,
    load,
    load_config,
    to_container,
)
from lit_bluelm.models import LLMS, build_model
from lit_bluelm.models.llm import llm_config
from lit_bluelm.startup import load_run_config


@pytest.mark.parametrize("stage", available("stage"))
@pytest.mark.parametrize("model", available("model"))
def test_every_shipped_yaml_loads(stage, model):
    cfg = load_config([f"stage={stage}", f"model={model}"])
    assert cfg.stage == stage and cfg.model.name == model
    assert cfg.run_dir == f"runs/{stage}"


def test_merge_order_cli_wins():
    cfg = load_config(["trainer.max_steps=7", "data.mix.text=0.25", "model.llm.config.hidden_size=64"])
    assert cfg.trainer.max_steps == 7
    assert cfg.data.mix.text == 0.25 and cfg.data.mix.image_text == 0.6
    assert cfg.model.llm.config.hidden_size == 64
    # the model yaml overrides the stage yaml (tiny sets its own learning rates)
    assert cfg.optim.lr.llm == 1e-3


@pytest.mark.parametrize(
    "argv, words",
    [
        (["trainer.max_stepz=3"], ["trainer.max_stepz"]),
        (["trainer.max_steps=abc"], ["trainer.max_steps", "abc"]),
        (["data.sources.text.kindd=text"], ["data.sources.text.kindd"]),
        (["stage=nope"], ["stage", "nope", "joint"]),
        (["model=nope"], ["model", "nope", "tiny", "bluelm_3b"]),
        (
            ["model.vision.name=resnet", "dry_run=true"],
            ["model.vision.name", "resnet", "siglip2", "tiny_vit"],
        ),
        (["data.mix.video=0.5"], ["data.mix.video", "video"]),
        (["data.mix.text=-1"], ["data.mix.text"]),
        (["trainer.strategy=deepspeed"], ["trainer.strategy", "fsdp"]),
        (["max_steps"], ["key=value"]),
        (["optim.name=sgd"], ["optim.name", "sgd", "adamw8bit"]),
        (["module=nope"], ["module", "next_token"]),
        (["model.llm.name=gguf"], ["model.llm.name", "from_pretrained"]),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, words, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_init_from_and_resume_from_are_exclusive(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config([f"init_from={ckpt}", f"resume_from={ckpt}"])
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_run_config([f"resume_from={tmp_path / 'missing.ckpt'}"])


def test_dry_run_tiny_prints_table_and_total(capsys):
    assert train.main(["dry_run=true"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("total_params=")
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in out[-5:-1]}
    assert rows["total"] == int(out[-1].split("=")[1])
    assert rows["vision"] + rows["adapter"] + rows["llm"] == rows["total"]
    assert "stage: joint" in out  # the resolved config comes first


def test_dry_run_bluelm_3b_is_paper_sized(capsys):
    assert train.main(["stage=joint", "model=bluelm_3b", "dry_run=true"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    total = int(out[-1].split("=")[1])
    assert abs(total - 2.9e9) / 2.9e9 < 0.03
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in out[-5:-1]}
    assert 3.8e8 < rows["vision"] < 4.3e8  # SigLIP2 so400m trunk without its pooling head
    assert 2.3e9 < rows["llm"] < 2.6e9


def test_help_lists_stages_and_models(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "stage=joint" in out and "bluelm_3b" in out


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "arg, words",
    [
        ("run_dir=[1,2", ["run_dir"]),
        ("run_dir=!!python/name:os.system", ["run_dir", "tag"]),
        ("run_dir=${nope}", ["run_dir", "nope"]),
        ("seed=${oc.env:LIT_BLUELM_UNSET_VARIABLE}", ["seed", "LIT_BLUELM_UNSET_VARIABLE"]),
        ("init_from=README.md", ["init_from", "not a checkpoint"]),
        ("init_from=lit_bluelm", ["init_from", "sharded checkpoint"]),
        ("resume_from=setup.cfg", ["resume_from", "not a checkpoint"]),
        ("resume_from=tests", ["resume_from", "sharded checkpoint"]),
        ("distill.teacher=README.md", ["distill.teacher", "not a checkpoint"]),
        ("context.rope={rope_type: yarn}", ["context.rope.factor"]),
        ("context.rope={rope_type: warp, factor: 2}", ["context.rope.rope_type", "yarn"]),
        ("context.rope={rope_type: yarn, factor: 4, rope_theta: 5}", ["context.rope.rope_theta", "preset"]),
        ("data.num_workers=-1", ["data.num_workers"]),
        ("optim.betas=[2,0.9]", ["optim.betas"]),
        ("optim.lr.llm=-1", ["optim.lr.llm"]),
        ("checkpoint.save_top_k=-2", ["checkpoint.save_top_k"]),
        ("model.vision.image_size=100", ["model.vision.image_size", "patch_size"]),
    ],
)
def test_hostile_values_and_paths_are_one_line_errors(arg, words, capsys):
    assert train.main([arg, "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_a_preset_cannot_set_what_a_stage_owns(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT, root)
    monkeypatch.setattr(load, "CONFIG_ROOT", root)
    tiny = (root / "model" / "tiny.yaml").read_text()
    (root / "model" / "textonly.yaml").write_text(tiny.replace("model:\n", "model:\n  text_only: true\n", 1))
    with pytest.raises(ConfigError, match="model.text_only, which belongs to the stage"):
        load_config(["model=textonly"])
    (root / "model" / "scorer.yaml").write_text(tiny.replace("model:\n", "model:\n  reward_head: true\n", 1))
    with pytest.raises(ConfigError, match="model.reward_head, which belongs to the stage"):
        load_config(["model=scorer"])
    scaled = tiny.replace(
        "rope_type: default", "rope_type: yarn, factor: 4, original_max_position_embeddings: 2048"
    )
    (root / "model" / "scaled.yaml").write_text(scaled)
    with pytest.raises(ConfigError, match="context scaling belongs to the stage"):
        load_config(["model=scaled"])


# ----------------------------------------------------------------------------- stage-owned context


def _stage_with_yarn(tmp_path, monkeypatch, factor=8):
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT, root)
    monkeypatch.setattr(load, "CONFIG_ROOT", root)
    joint = (root / "stage" / "joint.yaml").read_text()
    rope = f"context:\n  rope: {{rope_type: yarn, factor: {factor}, beta_fast: 32, beta_slow: 1}}\n"
    (root / "stage" / "long.yaml").write_text(joint + rope)


@pytest.mark.parametrize("model", available("model"))
def test_a_stage_yaml_with_yarn_scales_every_preset(model, tmp_path, monkeypatch):
    original = llm_config(load_config([f"model={model}"]).model.llm).max_position_embeddings
    _stage_with_yarn(tmp_path, monkeypatch)
    cfg = load_config(["stage=long", f"model={model}"])
    hf = llm_config(cfg.model.llm, cfg.context.rope)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 8
    assert hf.rope_parameters["original_max_position_embeddings"] == original
    assert hf.max_position_embeddings == 8 * original
    assert hf.rope_parameters["rope_theta"] == llm_config(cfg.model.llm).rope_parameters["rope_theta"]
    built = build_model(cfg.model, cfg.context, device="meta")
    assert built.llm.model.rotary_emb.rope_type == "yarn"
    # the command line overrides the stage
    cli = load_config(["stage=long", f"model={model}", "context.rope.factor=2"])
    assert llm_config(cli.model.llm, cli.context.rope).max_position_embeddings == 2 * original
    plain = load_config(["stage=long", f"model={model}", "context.rope={rope_type: default}"])
    hf = llm_config(plain.model.llm, plain.context.rope)
    assert hf.rope_parameters["rope_type"] == "default" and hf.max_position_embeddings == original


def test_context_applies_over_a_from_pretrained_config_json(tmp_path):
    cfg = load_config([])
    build_model(cfg.model).llm.save_pretrained(tmp_path / "hf")
    llm = from_container(
        {"model": {"llm": {"name": "from_pretrained", "path": str(tmp_path / "hf")}}}
    ).model.llm
    hf = llm_config(llm, {"rope_type": "yarn", "factor": 4.0})
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.max_position_embeddings == 4 * 512
    assert (
        LLMS["from_pretrained"](llm, {"rope_type": "yarn", "factor": 4.0}).model.rotary_emb.rope_type
        == "yarn"
    )


def _fake_checkpoint(path, cfg):
    """A checkpoint of the schema's shape with no weights (context inheritance reads the config)."""
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": to_container(cfg), "config_version": 2}}, path)


def test_init_from_a_yarn_checkpoint_keeps_its_context_unless_set(tmp_path, monkeypatch):
    _stage_with_yarn(tmp_path, monkeypatch, factor=4)
    yarn_ckpt = tmp_path / "yarn.ckpt"
    _fake_checkpoint(yarn_ckpt, load_config(["stage=long"]))
    inherited = load_run_config(["stage=joint", f"init_from={yarn_ckpt}"])
    assert inherited.context.rope.rope_type == "yarn" and inherited.context.rope.factor == 4
    assert llm_config(inherited.model.llm, inherited.context.rope).max_position_embeddings == 4 * 512
    # the stage (or the command line) decides when it sets a context
    assert load_run_config(["stage=long", f"init_from={yarn_ckpt}"]).context.rope.factor == 4
    own = load_run_config(["stage=joint", f"init_from={yarn_ckpt}", "context.rope={rope_type: default}"])
    assert own.context.rope.rope_type == "default"
    assert load_run_config(["stage=joint"]).context.rope is None
    # resuming keeps it too, and a bare state dict (no saved config) is fine as init_from
    assert load_run_config(["stage=joint", f"resume_from={yarn_ckpt}"]).context.rope.factor == 4
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    assert load_run_config([f"init_from={bare}"]).context.rope is None


def test_dynamic_rope_keeps_the_original_length_and_interpolations_see_the_stage():
    cfg = load_config(["context.rope={rope_type: dynamic, factor: 4}"])
    hf = llm_config(cfg.model.llm, cfg.context.rope)
    assert hf.rope_parameters["rope_type"] == "dynamic" and hf.max_position_embeddings == 512
    cfg = load_config(["stage=text", "model=tiny_teacher", "run_dir=runs/${stage}-${model.name}"])
    assert cfg.run_dir == "runs/text-tiny_teacher"


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoints_are_refused_without_running_code(tmp_path, capsys):
    import pickle
    import zipfile

    marker = tmp_path / "pwned"
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    file = tmp_path / "crafted.ckpt"
    torch.save({"x": 1}, file)
    with zipfile.ZipFile(file, "a") as zf:  # replace the archive's pickle with the payload
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
    with zipfile.ZipFile(file) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = pickle.dumps(_Payload(marker), protocol=2)  # the protocol torch.save writes
    with zipfile.ZipFile(file, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    for arg in (
        f"resume_from={folder}",
        f"init_from={folder}",
        f"distill.teacher={folder}",
        f"init_from={file}",
        f"resume_from={file}",
    ):
        assert train.main([arg, "dry_run=true"]) == 2, arg
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and arg.split("=")[0] in err, err
        assert "system" in err, err
    assert not marker.exists()
