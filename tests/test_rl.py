"""The GRPO stage (``stage=rl``): the rl_prompt kind, a fit from random init with its reward
figures in TensorBoard, exact resume, and the start-up refusals."""

import json

import pytest
import torch

import train
from datamodules.collate import Collator
from datamodules.kinds import SampleError, encode_rl_prompt
from lit_bluelm.config import load_config
from tests.helpers import assert_refused, png_bytes, reward_args, rl_args, scalars

OPEN_TO_LEARNED = "rewards.routes.demo_open=[{fn: reward_model, weight: 1.0}, {fn: exact, weight: 0.0}]"


def _raw(**meta):
    base = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "task": "demo_arith", "answer": "5"}
    return {"__key__": "k", "json": json.dumps({**base, **meta}).encode()}


def test_an_rl_prompt_holds_its_generation_prompt_in_each_mode(processor):
    ex = encode_rl_prompt(_raw(), processor, seq_len=64)
    think, plain = ex["prompt"]["ids"]["think"], ex["prompt"]["ids"]["no_think"]
    text = processor.tokenizer.decode(think)
    assert "[|BlueThink|]" in text and text.endswith("<|im_start|>assistant\n")
    assert "[|BlueThink|]" not in processor.tokenizer.decode(plain)
    assert ex["input_ids"].tolist() == think and (ex["labels"] == -100).all()
    assert ex["prompt"]["answer"] == "5" and ex["prompt"]["task"] == "demo_arith"
    with_image = _raw(messages=[{"role": "user", "content": "<image>\nHow many?"}])
    with_image["0.png"] = png_bytes()
    ex_img = encode_rl_prompt(with_image, processor, seq_len=192)
    assert ex_img["pixel_values"] is not None and len(ex_img["prompt"]["images"]) == 1
    batch = Collator(processor.pad_token_id)([ex, ex_img])
    assert [p["task"] for p in batch["prompts"]] == ["demo_arith", "demo_arith"]
    assert batch["prompts"][0]["pixel_values"] is None and batch["prompts"][1]["pixel_values"] is not None
    for bad, message in (
        ({"task": None}, "'task' str"),
        ({"answer": 5}, "'answer' is a string"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "ends with a user message"),
    ):
        with pytest.raises(SampleError, match=message):
            encode_rl_prompt(_raw(**bad), processor, seq_len=64)


@pytest.fixture(scope="module")
def fitted(demo_dir, tmp_path_factory):
    """``stage=rl`` from random init, 2 steps, the open questions routed to a reward run (one
    step of ``stage=reward``) with exact match logged beside it."""
    root = tmp_path_factory.mktemp("rl")
    reward = train.run(load_config(reward_args(demo_dir, root / "reward", "trainer.max_steps=1")))
    assert reward["status"] == "ok"
    learned = [f"rewards.model={root / 'reward'}", OPEN_TO_LEARNED]
    learned.append("data.mix={rl_arith: 0.4, rl_count: 0.2, rl_open: 0.4}")  # open prompts in 2 steps
    summary = train.run(load_config(rl_args(demo_dir, root / "run", "trainer.max_steps=2", *learned)))
    return root / "run", summary


def test_the_stage_fits_from_random_init_and_logs_its_reward_figures(fitted):
    run_dir, summary = fitted
    assert summary["status"] == "ok" and summary["global_step"] == 2
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["val_reward_before"] is not None and saved["val_reward_after"] is not None
    # the first and the last tenth of 2 steps: step 0 and step 1, each task's mean reward
    assert saved["reward_first_by_task"] and saved["reward_last_by_task"]
    assert set(saved["reward_first_by_task"]) <= {"demo_arith", "demo_count", "demo_open"}
    tags = scalars(run_dir)
    for tag in (
        "train/loss",
        "train/reward",
        "reward/fn/numeric",
        "reward/fn/reward_model",
        "reward/fn/exact",
        "reward/zero_std_frac",
        "reward/unscored",
        "reward/failures/numeric",
        "reward/timeouts/numeric",
        "rollout/completion_len_mean",
        "rollout/completion_len_max",
        "rollout/thinking_len_mean",
        "rollout/truncated_frac",
        "train/kl",
        "train/entropy",
        "train/clip_low",
        "train/clip_high",
        "time/rollout_s",
        "time/learn_s",
        "val/reward",
    ):
        assert tags.get(tag), tag
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert any(k.startswith("BestCheckpoint") and "val/reward" in k for k in ckpt["callbacks"])


def test_the_stage_refuses_bad_settings_at_start_up(demo_dir, tmp_path, capsys):
    base = rl_args(demo_dir, tmp_path / "x", "trainer.max_steps=1")
    cases = [
        (["rl.num_generations=1"], "rl.num_generations must be >= 2"),
        (["data.packing=true"], "data.packing must be false"),
        (["rl.max_new_tokens=400"], "exceeds the model's context of 512 tokens"),
        (["rl.beta=0.1"], "rl.beta > 0 needs a reference policy"),
        (["module=next_token"], "data.sources.rl_arith is rl_prompt"),
        (["rewards.routes.demo_arith=[{fn: nope}]"], "unknown reward 'nope'"),
    ]
    for extra, message in cases:
        assert_refused(base + extra, message, capsys)


def _shard(path, metas):
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, meta in enumerate(metas):
            sink.write({"__key__": f"p{i}", "json": json.dumps(meta).encode()})
    return str(path)


def test_prompts_whose_route_cannot_score_them_are_refused_at_start_up(demo_dir, tmp_path, capsys):
    user = [{"role": "user", "content": "What is 1 + 1?"}]
    ok = {"messages": user, "task": "demo_arith", "answer": "2"}
    cases = [
        ({"messages": user, "task": "mystery"}, "task 'mystery' has no route in rewards.routes"),
        (
            {"messages": user, "task": "demo_arith"},
            "no 'answer', which rewards.routes.demo_arith compares (numeric)",
        ),
    ]
    for bad, message in cases:
        shard = _shard(tmp_path / "bad.tar", [ok, bad])
        args = rl_args(demo_dir, tmp_path / "x", "trainer.max_steps=1", f"data.sources.rl_open.train={shard}")
        assert "data.sources.rl_open.train: sample 1" in assert_refused(args, message, capsys)


def test_a_resumed_run_samples_and_scores_what_the_uninterrupted_one_did(demo_dir, tmp_path):
    common = ["optim.schedule=constant", "validate_before_fit=false", "trainer.val_check_interval=2"]

    def run(name, *extra):
        summary = train.run(load_config(rl_args(demo_dir, tmp_path / name, *common, *extra)))
        tags = scalars(tmp_path / name)
        return summary, {
            tag: dict(tags[tag]) for tag in ("train/reward", "train/loss", "rollout/completion_len_mean")
        }

    _, full = run("full", "trainer.max_steps=4")
    first, _ = run("part", "trainer.max_steps=2")
    _, resumed = run("part", "trainer.max_steps=4", f"resume_from={first['last_ckpt']}")
    for tag, values in full.items():
        assert [resumed[tag][s] for s in (2, 3)] == [values[s] for s in (2, 3)], tag


@pytest.mark.slow
def test_two_processes_with_different_completion_lengths_do_not_hang(demo_dir, tmp_path):
    """FSDP2 on 2 gloo processes: each rank samples its own prompts (their completions end at
    different steps); decoding runs in lockstep until every rank's rows have finished."""
    from tests.helpers import train_subprocess

    run_dir = tmp_path / "run"
    fsdp = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.max_steps=2", "rl.max_new_tokens=24"]
    out = train_subprocess(rl_args(demo_dir, run_dir, *fsdp), timeout=400)
    assert out["status"] == "ok" and out["global_step"] == "2"


def test_beta_builds_a_frozen_reference_and_logs_the_kl_to_it(fitted, demo_dir, tmp_path):
    """rl.beta > 0 from a checkpoint: the reference defaults to init_from's weights (the first
    step's KL is 0); rl.reference names another checkpoint (here the reward run's LLM: a KL above 0)."""
    run_dir, _ = fitted
    reward = run_dir.parent / "reward"
    base = ["trainer.max_steps=1", "rl.beta=0.1", f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}"]
    base += ["validate_before_fit=false", OPEN_TO_LEARNED, f"rewards.model={reward}"]
    for name, extra in (("init", []), ("other", [f"rl.reference={reward / 'checkpoints' / 'last.ckpt'}"])):
        assert train.run(load_config(rl_args(demo_dir, tmp_path / name, *base, *extra)))["status"] == "ok"
    same, other = (dict(scalars(tmp_path / name)["train/kl"])[0] for name in ("init", "other"))
    assert same == pytest.approx(0.0, abs=1e-7) and other > 1e-4
