"""End-to-end runs of the tiny joint stage through train.py (in-process, CPU)."""

import pytest
import torch

import train
from lit_bluelm.checkpoint import load_model_weights, read_model_state
from lit_bluelm.config import load_config, to_container
from lit_bluelm.modules import NextTokenModule
from lit_bluelm.trainer import attach_tokenizer, build_trainer
from tests.helpers import scalars, tiny_args


@pytest.fixture(scope="module")
def fitted(demo_dir, tmp_path_factory):
    """A 3-step run validated at step 2 (last.ckpt at 2 and 3); shared by the checks below."""
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    cfg = load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=3", "trainer.val_check_interval=2"))
    return run_dir, train.run(cfg)


def test_fit_trains_logs_and_reports(fitted, capsys):
    run_dir, summary = fitted
    assert summary["global_step"] == 3
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()  # the run's own tokenizer copy
    tags = scalars(run_dir)
    for tag in ("train/loss", "val/loss", "val/ppl", "data/skipped", "data/too_long"):
        assert tag in tags, sorted(tags)
    assert any(t.startswith("lr-") for t in tags)
    assert sorted({step for step, _ in tags["train/loss"]}) == [0, 1, 2]


def test_checkpoints_load_weights_only_with_every_component(fitted):
    run_dir, summary = fitted
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3
    prefixes = {k.split(".")[1] for k in ckpt["state_dict"]}
    assert prefixes == {"vision", "adapter", "llm"}
    assert isinstance(ckpt["hyper_parameters"]["cfg"], dict)
    assert summary["best_ckpt"] and any((run_dir / "checkpoints").glob("best-step=2*"))
    assert "data_skipped" in ckpt and ckpt["data_too_long"] == 0


def test_resume_continues_step_optimizer_and_schedule(fitted, tmp_path, demo_dir):
    run_dir, _ = fitted
    last = run_dir / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True, map_location="cpu")
    cfg = load_config(
        tiny_args(
            demo_dir, run_dir, "trainer.max_steps=5", "trainer.val_check_interval=2", f"resume_from={last}"
        )
    )
    summary = train.run(cfg)
    assert summary["global_step"] == 5 and summary["val_loss_before"] is None
    after = torch.load(last, weights_only=True, map_location="cpu")
    assert after["global_step"] == 5
    assert after["lr_schedulers"][0]["last_epoch"] == 5  # the schedule went on, not restarted
    state_before = before["optimizer_states"][0]["state"][0]["step"]
    assert after["optimizer_states"][0]["state"][0]["step"] == state_before + 2
    # the resumed steps were logged after the first ones
    steps = sorted({s for s, _ in scalars(run_dir)["train/loss"]})
    assert steps[-2:] == [3, 4]


def test_init_from_takes_weights_only(fitted, tmp_path, demo_dir):
    run_dir, _ = fitted
    source = run_dir / "checkpoints" / "last.ckpt"
    cfg = load_config(tiny_args(demo_dir, tmp_path / "next", "trainer.max_steps=1", f"init_from={source}"))
    cfg.model.image_token_id = 2
    module = NextTokenModule(to_container(cfg))
    module.configure_model()
    weights = read_model_state(source)
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name])
    summary = train.run(cfg)
    assert summary["global_step"] == 1  # a new run: step, optimizer and schedule start fresh


def test_init_from_refuses_a_different_shape(fitted, tmp_path):
    run_dir, _ = fitted
    cfg = load_config(["model.llm.config.hidden_size=64"])
    cfg.model.image_token_id = 2
    from lit_bluelm.config import ConfigError
    from lit_bluelm.models import build_model

    with pytest.raises(ConfigError, match="does not fit"):
        load_model_weights(build_model(cfg.model), run_dir / "checkpoints" / "last.ckpt")


def test_zero_learning_rate_freezes_a_component(demo_dir, tmp_path):
    cfg = load_config(tiny_args(demo_dir, tmp_path, "optim.lr.vision=0"))
    cfg.model.image_token_id = 2
    module = NextTokenModule(to_container(cfg))
    module.configure_model()
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert {g["name"] for g in groups} == {"adapter", "adapter_no_decay", "llm", "llm_no_decay"}
    assert not any(p.requires_grad for p in module.model.vision.parameters())
    decayed = next(g for g in groups if g["name"] == "llm")
    assert all(p.ndim >= 2 for p in decayed["params"]) and decayed["weight_decay"] > 0


class _Crash(NextTokenModule):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def _fit_until_it_fails(demo_dir, run_dir, module_cls, match):
    """Fit ``module_cls`` (which raises ``match``) for up to 4 steps; returns on_exception.ckpt."""
    from datamodules.datamodule import BlueLMDataModule

    cfg = load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=4", "trainer.val_check_interval=10"))
    datamodule = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, datamodule.tokenizer)
    trainer = build_trainer(cfg, module_cls)
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(module_cls(to_container(cfg)), datamodule=datamodule)
    return run_dir / "checkpoints" / "on_exception.ckpt"


def test_a_crash_leaves_a_checkpoint_to_resume_from(demo_dir, tmp_path):
    run_dir = tmp_path / "crash"
    saved = _fit_until_it_fails(demo_dir, run_dir, _Crash, "simulated crash")
    assert torch.load(saved, weights_only=True, map_location="cpu")["global_step"] == 2
    summary = train.run(
        load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=4", f"resume_from={saved}"))
    )
    assert summary["global_step"] == 4


def test_gradient_accumulation_counts_optimizer_steps(demo_dir, tmp_path, monkeypatch):
    from callbacks import LastCheckpoint

    run_dir = tmp_path / "accum"
    args = ["trainer.accumulate_grad_batches=2", "trainer.val_check_interval=2", "validate_before_fit=false"]
    summary = train.run(load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=3", *args)))
    assert summary["global_step"] == 3
    # validation (and the best checkpoint) every 2 optimizer steps, not every 2 micro-batches
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("best-*")) == ["best-step=2.ckpt"]

    saves = []
    original = LastCheckpoint.save

    def spy(self, trainer, path=None):
        saves.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.total.ready))
        original(self, trainer, path)

    monkeypatch.setattr(LastCheckpoint, "save", spy)
    # resume at step 2, a multiple of the save interval, and go on to step 3
    best = run_dir / "checkpoints" / "best-step=2.ckpt"
    train.run(load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=3", f"resume_from={best}", *args)))
    # one save, after the 6th micro-batch completed step 3; none in the middle of an accumulation
    assert saves == [(3, 6)]


def test_too_few_shards_for_the_readers_is_a_one_line_error(demo_dir, tmp_path, capsys):
    assert train.main(tiny_args(demo_dir, tmp_path, "data.num_workers=5", "trainer.max_steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.sources.") and "data.num_workers" in err[-1]


class _FailingStep(NextTokenModule):
    """Raises inside the optimizer step of step 2, after its forward and backward ran."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.global_step == 2:
            optimizer_closure()
            raise RuntimeError("failure inside optimizer.step")
        return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def test_a_batch_counts_only_once_its_optimizer_update_is_applied(demo_dir, tmp_path):
    path = _fit_until_it_fails(demo_dir, tmp_path / "failstep", _FailingStep, "inside optimizer.step")
    saved = torch.load(path, weights_only=True, map_location="cpu")
    # steps 0 and 1 were applied; the batch of the failed step 2 is read again on resume
    assert saved["global_step"] == 2
    assert saved["BlueLMDataModule"]["ranks"][0]["consumed"] == 2


def test_the_skipped_sample_total_survives_resume(fitted, tmp_path, demo_dir):
    run_dir, _ = fitted
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    ckpt["data_skipped"] = 7  # as if the first part of the run had skipped 7 bad samples ...
    ckpt["data_too_long"] = 2  # ... 2 of them too long
    del ckpt["data_skipped_by_reason"]  # a checkpoint older than the reasons
    path = tmp_path / "with_skips.ckpt"
    torch.save(ckpt, path)
    args = [
        f"resume_from={path}",
        f"trainer.max_steps={ckpt['global_step'] + 1}",
        "trainer.val_check_interval=50",
    ]
    summary = train.run(load_config(tiny_args(demo_dir, tmp_path / "resumed", *args)))
    logged = scalars(tmp_path / "resumed")
    assert [v for _, v in logged["data/skipped"]] == [7.0] and [v for _, v in logged["data/too_long"]] == [
        2.0
    ]
    last = torch.load(summary["last_ckpt"], weights_only=True, map_location="cpu")
    assert last["data_skipped"] == 7 and last["data_too_long"] == 2
    assert last["data_skipped_by_reason"] == {"too_long": 2, "other": 5}
    assert [v for _, v in logged["data/skipped/other"]] == [5.0]


def test_zero_steps_validates_the_starting_weights_only(tmp_path, demo_dir):
    first = train.run(load_config(tiny_args(demo_dir, tmp_path / "fit", "trainer.max_steps=2")))
    source = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    args = ["trainer.max_steps=0", "validate_before_fit=false", f"init_from={source}"]
    again = train.run(load_config(tiny_args(demo_dir, tmp_path / "val", *args)))
    # the same weights on the same validation batches: the first run's closing figure, exactly
    assert again["val_loss_after"] == first["val_loss_after"]
    assert again["val_loss_before"] is None and again["global_step"] == 0 and again["status"] == "ok"
    assert again["last_ckpt"] is None and not (tmp_path / "val" / "checkpoints").exists()
