import pytest

import train
from lit_bluelm.config import ConfigError, available, load_config


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
        load_config([f"resume_from={tmp_path / 'missing.ckpt'}"])


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
