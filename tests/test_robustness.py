"""A run's robustness: exit statuses, SIGTERM at a step boundary, the non-finite guard, atomic
checkpoints, resume_from=auto and start-up checks (tiny joint runs on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from callbacks import BestCheckpoint, NonFiniteGuard
from lit_bluelm.checkpoint_io import CheckpointSaveError, recover_swap, remove_stale_temporaries, write_atomic
from lit_bluelm.config import load_config, to_container
from lit_bluelm.errors import ConfigError
from lit_bluelm.modules import NextTokenModule
from lit_bluelm.startup import load_run_config
from lit_bluelm.status import EXIT_CODES
from lit_bluelm.trainer import attach_tokenizer, build_trainer
from tests.helpers import ROOT, scalars, tiny_args


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _fit(demo_dir, run_dir, module_cls, *extra):
    """Fit ``module_cls`` on the tiny joint stage; returns the trainer (exceptions propagate)."""
    from datamodules.datamodule import BlueLMDataModule

    cfg = load_config(tiny_args(demo_dir, run_dir, *extra))
    datamodule = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, datamodule.tokenizer)
    trainer = build_trainer(cfg, module_cls)
    trainer.fit(module_cls(to_container(cfg)), datamodule=datamodule)
    return trainer


def test_exit_codes_are_the_documented_ones():
    assert EXIT_CODES == {
        "ok": 0,
        "failed": 1,
        "config_error": 2,
        "diverged": 3,
        "interrupted": 130,
        "preempted": 143,
    }


# --- the non-finite guard ----------------------------------------------------------------------


def test_a_diverging_run_stops_with_its_status_and_no_best_checkpoint(demo_dir, tmp_path, capsys):
    run_dir = tmp_path / "diverge"
    args = ["optim.lr.llm=1e30", "trainer.max_steps=20", "trainer.val_check_interval=5"]
    assert train.main(tiny_args(demo_dir, run_dir, *args)) == EXIT_CODES["diverged"] == 3
    out, err = capsys.readouterr()
    assert "status=diverged" in out.splitlines()
    assert not any(line.startswith("best_ckpt=") for line in out.splitlines())
    assert "training diverged" in err and "from step 1" in err and "trainer.max_bad_steps=5" in err
    summary = _summary(run_dir)
    assert summary["status"] == "diverged" and summary["best_ckpt"] is None
    # step 0 was finite and applied; steps 1..5 were skipped, and the fifth in a row stopped it
    assert summary["global_step"] == 5
    skipped = dict(scalars(run_dir)["train/skipped_steps"])
    assert skipped[0] == 0.0 and skipped[4] == 4.0
    # no NaN validation loss became "best", and no all-NaN weights were written to last.ckpt
    assert not list((run_dir / "checkpoints").glob("best-*"))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


class _NanAtStep1(NextTokenModule):
    """A non-finite loss at step 1 only; records whether the weights moved over that step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 1:
            self.before = {n: p.detach().clone() for n, p in self.named_parameters()}
            return loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == 2:
            self.unchanged = all(torch.equal(p, self.before[n]) for n, p in self.named_parameters())


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(demo_dir, tmp_path):
    run_dir = tmp_path / "nan1"
    trainer = _fit(demo_dir, run_dir, _NanAtStep1, "trainer.max_steps=4", "trainer.val_check_interval=10")
    module = trainer.lightning_module
    assert trainer.global_step == 4  # the skipped step counts
    assert module.unchanged  # ... but applied nothing: no weight moved
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.skipped == 1 and guard.in_a_row == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [v for _, v in scalars(run_dir)["train/skipped_steps"]] == [0.0, 1.0, 1.0, 1.0]
    # its batch was consumed, and the LR schedule advanced over it
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["BlueLMDataModule"]["ranks"][0]["consumed"] == 4
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 4
    assert ckpt["callbacks"]["NonFiniteGuard"]["skipped"] == 1


def test_the_guard_state_resumes():
    guard = NonFiniteGuard(max_bad_steps=3)
    guard.load_state_dict({"skipped": 4, "in_a_row": 2, "first_bad": 17})
    assert guard.state_dict() == {"skipped": 4, "in_a_row": 2, "first_bad": 17}


def test_a_non_finite_validation_loss_never_becomes_best(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1)
    trainer = type("T", (), {"global_step": 3})()
    assert not cb.check_monitor_top_k(trainer, torch.tensor(float("nan")))
    assert not cb.check_monitor_top_k(trainer, torch.tensor(float("inf")))
    assert cb.check_monitor_top_k(trainer, torch.tensor(2.5))  # nothing saved yet: a finite one is


def test_init_from_a_checkpoint_with_non_finite_tensors_is_refused(demo_dir, tmp_path):
    run_dir = tmp_path / "src"
    train.run(load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=1", "validate_before_fit=false")))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name][0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(ConfigError, match=r"init_from: .*non-finite"):
        train.run(
            load_config(tiny_args(demo_dir, tmp_path / "dst", "trainer.max_steps=1", f"init_from={bad}"))
        )


# --- a failure inside optimizer.step --------------------------------------------------------


class _HalfUpdate(NextTokenModule):
    """At step 2, fails inside the optimizer's own step, after changing one weight."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.global_step == 2:
            inner = optimizer.optimizer

            def step(closure=None, **kwargs):
                closure()  # forward, backward and the hooks before the update
                with torch.no_grad():
                    inner.param_groups[0]["params"][0].add_(1.0)  # half of an update
                raise RuntimeError("failure inside the update")

            inner.step = step
        return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def test_a_failure_inside_the_update_writes_no_on_exception_checkpoint(demo_dir, tmp_path, caplog):
    run_dir = tmp_path / "half"
    with pytest.raises(RuntimeError, match="failure inside the update"):
        _fit(demo_dir, run_dir, _HalfUpdate, "trainer.max_steps=4", "checkpoint.every_n_steps=1")
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "on_exception.ckpt").exists()
    assert "half-updated" in caplog.text and "last.ckpt" in caplog.text
    # last.ckpt (step 2, before the failed update) is what resume_from=auto offers
    cfg = load_run_config(tiny_args(demo_dir, run_dir, "resume_from=auto"))
    assert cfg.resume_from == str(ckpts / "last.ckpt")
    assert torch.load(cfg.resume_from, weights_only=True, map_location="cpu")["global_step"] == 2


# --- resume_from=auto -----------------------------------------------------------------------


def test_resume_from_auto_starts_fresh_without_a_checkpoint(demo_dir, tmp_path):
    assert load_run_config(tiny_args(demo_dir, tmp_path / "new", "resume_from=auto")).resume_from is None


def test_resume_from_auto_takes_the_newest_loadable_checkpoint(demo_dir, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"global_step": 4, "state_dict": {}}, ckpts / "last.ckpt")
    torch.save({"global_step": 6, "state_dict": {}}, ckpts / "on_exception.ckpt")
    auto = tiny_args(demo_dir, tmp_path / "run", "resume_from=auto")
    assert load_run_config(auto).resume_from == str(ckpts / "on_exception.ckpt")
    torch.save({"global_step": 6, "state_dict": {}}, ckpts / "last.ckpt")
    assert load_run_config(auto).resume_from == str(ckpts / "last.ckpt")  # a tie: last
    (ckpts / "last.ckpt").write_bytes(b"torn")  # not loadable: passed over with a warning
    with pytest.warns(UserWarning, match="passing over"):
        assert load_run_config(auto).resume_from == str(ckpts / "on_exception.ckpt")


# --- SIGTERM --------------------------------------------------------------------------------


def _losses(run_dir):
    return {step: value for step, value in scalars(run_dir)["train/loss"]}


@pytest.mark.timeout(600)
def test_sigterm_to_the_process_group_saves_stops_and_resumes_exactly(demo_dir, tmp_path):
    common = ["trainer.max_steps=12", "trainer.val_check_interval=50", "checkpoint.every_n_steps=2"]
    reference = tmp_path / "reference"
    train.run(load_config(tiny_args(demo_dir, reference, *common, "validate_before_fit=false")))

    run_dir = tmp_path / "preempted"
    args = tiny_args(demo_dir, run_dir, *common, "resume_from=auto", "validate_before_fit=false")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a scheduler sees it
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its DataLoader worker
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and " " not in line)
    assert lines["status"] == "preempted"
    assert "val_loss_after" not in lines and _summary(run_dir)["val_loss_after"] is None  # not validated
    stopped = torch.load(lines["on_exception_ckpt"], weights_only=True, map_location="cpu")
    assert 2 <= stopped["global_step"] < 12
    assert _summary(run_dir)["status"] == "preempted"

    # the requeued job runs the same command
    assert train.main(args) == 0
    assert _summary(run_dir)["status"] == "ok" and _summary(run_dir)["global_step"] == 12
    resumed, expected = _losses(run_dir), _losses(reference)
    assert sorted(resumed) == sorted(expected)  # neither holes nor duplicates in the curves
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


# --- atomic checkpoints ---------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    write_atomic(path, lambda f: torch.save({"step": 1}, f))

    def full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(
        CheckpointSaveError, match=rf"saving checkpoint '{path}' failed: No space left on device"
    ):
        write_atomic(path, full)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_a_failed_save_in_a_run_is_one_line_and_keeps_last_ckpt(demo_dir, tmp_path, monkeypatch, capsys):
    import lit_bluelm.checkpoint_io as cio

    run_dir = tmp_path / "full"
    args = tiny_args(
        demo_dir, run_dir, "trainer.max_steps=4", "checkpoint.every_n_steps=2", "validate_before_fit=false"
    )
    original, calls = cio.torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second save, at step 4
            raise OSError(28, "No space left on device")
        return original(obj, f, *a, **k)

    monkeypatch.setattr(cio.torch, "save", save)
    assert train.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: saving checkpoint '") and err[-1].endswith("No space left on device")
    monkeypatch.setattr(cio.torch, "save", original)
    ckpts = run_dir / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 2
    assert not (ckpts / "on_exception.ckpt").exists()  # it would fail the same way
    assert not list(ckpts.glob("*.tmp"))
    assert _summary(run_dir)["status"] == "failed"


def test_stale_temporaries_go_and_an_interrupted_folder_swap_is_recovered(tmp_path):
    (tmp_path / "last.ckpt.1234.tmp").write_bytes(b"killed mid-write")
    (tmp_path / "last.ckpt.tmp").mkdir()
    (tmp_path / "last.ckpt.tmp" / "shard").write_bytes(b"x")
    # a kill between the swap's two renames: the previous folder is only under .old
    (tmp_path / "last.ckpt.old").mkdir()
    (tmp_path / "last.ckpt.old" / "shard").write_bytes(b"previous")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt" / "shard").read_bytes() == b"previous"
    # a kill after both renames: the .old copy is dropped
    (tmp_path / "last.ckpt.old").mkdir()
    recover_swap(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# --- start-up checks ------------------------------------------------------------------------


def test_an_unusable_run_dir_is_one_line_and_exit_2(demo_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert train.main(tiny_args(demo_dir, blocker / "run", "trainer.max_steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run_dir: cannot write to")


def test_a_refused_run_leaves_no_run_dir_behind(demo_dir, tmp_path, capsys):
    run_dir = tmp_path / "nested" / "run"
    assert train.main(tiny_args(demo_dir, run_dir, "optim.name=sgd")) == 2  # refused after check_run_dir
    assert "optim.name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_signal_is_a_stop_request_in_training_and_immediate_outside():
    from lit_bluelm.status import Preempted, StopSignals, active, handle_signals

    previous = signal.getsignal(signal.SIGTERM)
    with handle_signals() as state:
        assert active() is state
        with pytest.raises(Preempted) as stopped:  # outside the training loop: at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.status == "preempted"
    assert active() is None and signal.getsignal(signal.SIGTERM) == previous  # handlers restored

    state = StopSignals()
    state.deferred = True  # inside the training loop: a flag read at the next step boundary
    state.handler(signal.SIGINT, None)
    assert state.requested and Preempted(state.signum).status == "interrupted"
    state.handler(signal.SIGTERM, None)  # a second SIGTERM is ignored ...
    with pytest.raises(KeyboardInterrupt):  # ... a second Ctrl-C interrupts at once
        state.handler(signal.SIGINT, None)


def test_data_loader_workers_ignore_stop_signals(monkeypatch):
    from lit_bluelm.status import ignore_stop_signals

    set_to = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: set_to.__setitem__(signum, handler))
    ignore_stop_signals(0)
    assert set_to == {signal.SIGTERM: signal.SIG_IGN, signal.SIGINT: signal.SIG_IGN}
