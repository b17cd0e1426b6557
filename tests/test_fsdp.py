"""The sharded path: FSDP2 through Lightning's ModelParallelStrategy on 2 CPU processes (gloo)."""

import pytest
import torch

from lit_bluelm.checkpoint import load_model_weights, read_model_state
from lit_bluelm.config import load_config
from lit_bluelm.models import build_model
from tests.helpers import text_args, tiny_args, train_subprocess

pytestmark = pytest.mark.slow


def test_fsdp_fit_two_processes_then_resume(demo_dir, tmp_path):
    run_dir = tmp_path / "fsdp"
    fsdp = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.val_check_interval=2"]
    out = train_subprocess(tiny_args(demo_dir, run_dir, *fsdp, "trainer.max_steps=3"))
    assert out["global_step"] == "3"
    assert float(out["val_loss_after"]) < float(out["val_loss_before"])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    # the data state of both ranks rides in the sharded checkpoint's metadata
    meta = torch.load(last / "meta.pt", weights_only=True, map_location="cpu")
    assert [r["consumed"] for r in meta["BlueLMDataModule"]["ranks"]] == [3, 3]
    # continue the sharded run
    out = train_subprocess(tiny_args(demo_dir, run_dir, *fsdp, "trainer.max_steps=4", f"resume_from={last}"))
    assert out["global_step"] == "4"
    # the sharded checkpoint feeds a single-process model (init_from)
    state = read_model_state(last)
    assert {k.split(".")[0] for k in state} == {"vision", "adapter", "llm"}
    cfg = load_config(tiny_args(demo_dir, run_dir))
    cfg.model.image_token_id = 2
    model = build_model(cfg.model)
    load_model_weights(model, last)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name])


def test_fsdp_distillation_with_pruning_init(demo_dir, tmp_path):
    run_dir = tmp_path / "fsdp_text"
    args = text_args(
        demo_dir,
        run_dir,
        "trainer.strategy=fsdp",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "distill.teacher=tiny_teacher",
        "distill.init_from_teacher=true",
        "distill.calibration_batches=1",
    )
    out = train_subprocess(args)
    assert out["global_step"] == "2"
    state = read_model_state(run_dir / "checkpoints" / "last.ckpt")
    assert {k.split(".")[0] for k in state} == {"llm"}  # the teacher is never saved


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(demo_dir, tmp_path):
    run_dir = tmp_path / "fsdp_nan"
    args = tiny_args(
        demo_dir,
        run_dir,
        "trainer.strategy=fsdp",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "validate_before_fit=false",
    )
    # bench/fault_child.py is train.py with test-only fault hooks: NaN at step 1 on rank 1 only
    out = train_subprocess(args, 600, "bench/fault_child.py", FAULT_NAN_STEP="1", FAULT_NAN_RANK="1")
    assert out["status"] == "ok"
    meta = torch.load(
        run_dir / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True, map_location="cpu"
    )
    assert meta["global_step"] == 3
    assert meta["callbacks"]["NonFiniteGuard"]["skipped"] == 1  # rank 0 skipped it too
    state = read_model_state(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
