"""The GRPO stage (``stage=rl``): the rl_prompt kind, a fit from random init with its reward
figures in TensorBoard, exact resume, and the start-up refusals."""

import json

import pytest
import torch

import train
from datamodules.collate import Collator
from datamodules.kinds import SampleError, encode_rl_prompt
from lit_bluelm.config import load_config
from tests.helpers import png_bytes, rl_args, scalars


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
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    summary = train.run(load_config(rl_args(demo_dir, run_dir, "trainer.max_steps=2")))
    return run_dir, summary


def test_the_stage_fits_from_random_init_and_logs_its_reward_figures(fitted):
    run_dir, summary = fitted
    assert summary["status"] == "ok" and summary["global_step"] == 2
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["val_reward_before"] is not None and saved["val_reward_after"] is not None
    tags = scalars(run_dir)
    for tag in (
        "train/loss",
        "train/reward",
        "reward/fn/numeric",
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
        assert train.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
