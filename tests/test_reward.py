"""The reward model: the Bradley-Terry loss and the last-token head on hand-made tensors, the
preference sample kind and its pairs in a batch, the stage (fit, best checkpoint by accuracy,
exact resume), serving (``RewardModel``, ``python -m lit_bluelm.score``) and its refusals."""

import json
import math

import pytest
import torch
from torch import nn

import train
from datamodules.collate import Collator
from datamodules.kinds import IGNORE_INDEX, SampleError, Skips, TooLong, encode_preference
from lit_bluelm.config import ConfigError, load_config
from lit_bluelm.objectives.reward import bradley_terry_loss, last_token_index, last_token_rewards, pair_stats
from tests.helpers import assert_refused, png_bytes, reward_args, scalars

PROMPT = [{"role": "user", "content": "What is 4 + 5?"}]
CHOSEN = {"content": "9", "thinking": "4 + 5 = 9."}
REJECTED = {"content": "12", "thinking": "4 + 5 = 9."}


def _raw(**fields):
    meta = {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED} | fields
    return {"__key__": "k", "json": json.dumps({k: v for k, v in meta.items() if v is not None}).encode()}


# ----------------------------------------------------------------------------- objective


def test_the_bradley_terry_loss_equals_its_value_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.5]), torch.tensor([1.0, 1.0, 1.5])
    margin = torch.tensor([0.5, 0.0, 0.25])

    def nll(x):  # -log sigmoid(x)
        return math.log(1 + math.exp(-x))

    plain = (nll(1.0) + nll(-1.0) + nll(0.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(plain, rel=1e-6)
    with_margin = (nll(0.5) + nll(-1.0) + nll(-0.25)) / 3
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(with_margin, rel=1e-6)
    centred = with_margin + 0.1 * (3.0**2 + 1.0**2 + 3.0**2) / 3
    assert bradley_terry_loss(chosen, rejected, margin, centering=0.1).item() == pytest.approx(
        centred, rel=1e-6
    )
    stats = pair_stats(chosen, rejected)
    assert stats.correct.tolist() == [1.0, 0.0, 0.0]  # a tie is not ranked right
    assert stats.difference.tolist() == [1.0, -1.0, 0.0]


def test_the_head_reads_the_last_real_token_under_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float).reshape(3, 5, 2)  # every position distinct
    score = nn.Linear(2, 1, bias=False)
    nn.init.constant_(score.weight, 1.0)
    expected = [hidden[0, 2].sum(), hidden[1, 4].sum(), hidden[2, 0].sum()]
    assert last_token_rewards(hidden, right, score).tolist() == [float(e) for e in expected]
    with pytest.raises(ValueError, match="no last token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_the_model_rewards_a_sequence_alike_under_left_and_right_padding():
    from lit_bluelm.models import build_model

    cfg = load_config(["stage=reward"])
    cfg.model.image_token_id = 2
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.context).eval()
    assert model.score is not None and model.score.bias is None
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left_ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        right = model.reward(ids, mask)
        left = model.reward(left_ids, left_mask)
        alone = model.reward(ids[1:, :3], mask[1:, :3])
    torch.testing.assert_close(right, left, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right[1:], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- data


def test_a_pair_encodes_both_sides_in_the_chat_format_without_targets(processor):
    ex = encode_preference(_raw(margin=0.5), processor, seq_len=256)
    tok = processor.tokenizer
    chosen, rejected = tok.decode(ex["input_ids"]), tok.decode(ex["rejected_ids"])
    assert chosen.endswith("<think>\n4 + 5 = 9.\n</think>\n9<|im_end|>\n<|endoftext|>")
    assert rejected.endswith("</think>\n12<|im_end|>\n<|endoftext|>")
    assert "[|BlueThink|]" in chosen  # a reply with thinking is in the thinking mode
    assert (ex["labels"] == IGNORE_INDEX).all() and ex["margin"] == 0.5


def test_bad_pairs_are_skipped_with_their_reason(processor):
    cases = [
        (_raw(chosen=None), "bad_json"),
        (_raw(rejected={"text": "no content"}), "bad_json"),
        (_raw(messages=None), "bad_json"),
        (_raw(margin="big"), "bad_json"),
        (_raw(rejected=CHOSEN), "invalid"),  # identical
        (_raw(chosen={"content": "  "}), "invalid"),  # empty
        (_raw(messages=PROMPT + [{"role": "assistant", "content": "9"}]), "invalid"),  # no user turn last
        (_raw(messages=[{"role": "user", "content": "<image>\nWhat?"}]), "invalid"),  # a marker, no image
    ]
    for raw, reason in cases:
        with pytest.raises(SampleError) as err:
            encode_preference(raw, processor, seq_len=256)
        assert err.value.reason == reason, (raw, err.value)
    with pytest.raises(TooLong):
        encode_preference(_raw(rejected={"content": "long " * 300}), processor, seq_len=256)


def test_a_batch_of_pairs_is_chosen_rows_then_rejected_rows_with_the_images_each(processor):
    with_image = _raw(messages=[{"role": "user", "content": "<image>\nDescribe the image."}])
    with_image["0.png"] = png_bytes((112, 112))
    pairs = [
        encode_preference(with_image, processor, 256),
        encode_preference(_raw(margin=1.0), processor, 256),
    ]
    for i, pair in enumerate(pairs):
        pair |= {"source": f"s{i}", "key": f"k{i}", "skipped": Skips.one("bad_json")}
    batch = Collator(processor.pad_token_id)(pairs)
    assert batch["pairs"] == 2 and batch["margin"].tolist() == [0.0, 1.0]
    assert batch["source"] == ["s0", "s1", "s0", "s1"]
    for row, ids in enumerate([p["input_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]):
        n = len(ids)
        assert torch.equal(batch["input_ids"][row, :n], ids) and batch["attention_mask"][row].sum() == n
    tiles = pairs[0]["pixel_values"]
    assert torch.equal(batch["pixel_values"], torch.cat([tiles, tiles]))  # rows 0 and 2 hold the image
    assert Skips.of(batch["skipped"]).total == 2  # counted once per pair, not per row
    with pytest.raises(ValueError, match="mixes"):
        Collator(processor.pad_token_id)(
            [pairs[0], {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}]
        )


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def fitted(demo_dir, tmp_path_factory):
    """``stage=reward`` from random init: 2 steps."""
    run_dir = tmp_path_factory.mktemp("reward") / "run"
    summary = train.run(load_config(reward_args(demo_dir, run_dir, "trainer.max_steps=2")))
    return run_dir, summary


def test_the_stage_fits_from_random_init_and_reports_pair_accuracy(fitted):
    run_dir, summary = fitted
    assert summary["status"] == "ok" and summary["global_step"] == 2
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_accuracy_before", "val_accuracy_after", "val_loss_after", "val_pairs_after"):
        assert saved[key] is not None, key
    assert saved["val_pairs_after"] == 8  # 2 batches of 4 pairs
    assert set(saved["val_accuracy_after_by_source"]) <= {"pref_think", "pref_topic", "pref_color"}
    tags = scalars(run_dir)
    for tag in ("train/loss", "train/accuracy", "train/reward_mean", "train/reward_std", "val/margin"):
        assert tags.get(tag), tag
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    hidden = ckpt["hyper_parameters"]["cfg"]["model"]["llm"]["config"]["hidden_size"]
    assert ckpt["state_dict"]["model.score.weight"].shape == (1, hidden)
    assert any(k.startswith("BestCheckpoint") and "val/accuracy" in k for k in ckpt["callbacks"])


def test_the_stage_resumes_exactly(demo_dir, tmp_path):
    # the schedule by step, not by fraction: the stopped run has another max_steps
    schedule = "data.schedule=[{step: 0, mix: {pref_think: 1.0, pref_topic: 0.0}}, {step: 4, mix: {pref_topic: 1.0}}]"
    common = [
        "optim.schedule=constant",
        "validate_before_fit=false",
        "trainer.val_check_interval=3",
        schedule,
    ]

    def run(name, *extra):
        summary = train.run(load_config(reward_args(demo_dir, tmp_path / name, *common, *extra)))
        return summary, dict(scalars(tmp_path / name)["train/loss"])

    _, full = run("full", "trainer.max_steps=6")
    first, _ = run("part", "trainer.max_steps=3")
    _, resumed = run("part", "trainer.max_steps=6", f"resume_from={first['last_ckpt']}")
    assert [resumed[s] for s in range(3, 6)] == [full[s] for s in range(3, 6)]


def test_the_stage_refuses_what_it_cannot_read(demo_dir, tmp_path, capsys):
    base = reward_args(demo_dir, tmp_path / "x", "trainer.max_steps=1")
    cases = [
        (["model.reward_head=false"], "model.reward_head=true"),
        (["data.packing=true"], "data.packing must be false"),
        (["data.sources.pref_color.kind=chat"], "data.sources.pref_color is chat"),
        (["module=next_token"], "data.sources.pref_think is preference"),
    ]
    for extra, message in cases:
        assert_refused(base + extra, message, capsys)


# ----------------------------------------------------------------------------- serving


def test_served_scores_equal_the_trained_modules_rewards(fitted, demo_dir, processor):
    from lit_bluelm.checkpoint import load_run
    from lit_bluelm.rewards import RewardModel

    run_dir, _ = fitted
    rm = RewardModel.from_run(run_dir, batch_size=2)
    conversations = [PROMPT + [{"role": "assistant", **reply}] for reply in (CHOSEN, REJECTED)]
    conversations.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    scores = rm.score(conversations)
    assert scores == pytest.approx(RewardModel.from_run(run_dir, batch_size=1).score(conversations), abs=1e-5)
    # the same pair through the training path: the encoder, the collator and the model's head
    loaded = load_run(run_dir / "checkpoints" / "last.ckpt")
    batch = Collator(processor.pad_token_id)([encode_preference(_raw(), rm.processor, 256)])
    with torch.no_grad():
        trained = loaded.model.reward(batch["input_ids"], batch["attention_mask"])
    assert scores[:2] == pytest.approx(trained.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="conversation 0: .*ends with the assistant reply"):
        rm.score([PROMPT])


def test_serving_refuses_another_tokenizer_and_a_run_without_a_head(fitted, tmp_path):
    from lit_bluelm.checkpoint import LoadedRun, load_run
    from lit_bluelm.models import build_model
    from lit_bluelm.rewards import RewardModel
    from lit_bluelm.tokenizer import load_tokenizer

    run_dir, _ = fitted
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    RewardModel.from_run(run_dir, tokenizer=tokenizer)  # the policy's own tokenizer: accepted
    tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="tokenizer .* differs from the policy's"):
        RewardModel.from_run(run_dir, tokenizer=tokenizer)
    other = load_tokenizer(run_dir / "tokenizer")
    other.chat_template = "{{ messages }}"
    with pytest.raises(ConfigError, match="chat template"):
        RewardModel.from_run(run_dir, tokenizer=other)
    with pytest.raises(ConfigError, match="chat template"):
        RewardModel.check_run(run_dir, tokenizer=other)  # the start-up check: the same refusals
    with pytest.raises(ConfigError, match="tokenizer .* differs from the policy's"):
        RewardModel.check_run(run_dir, tokenizer=tokenizer)
    loaded = load_run(run_dir / "checkpoints" / "last.ckpt")
    cfg = loaded.config.copy()
    cfg.model.reward_head = False
    plain = LoadedRun(cfg, build_model(cfg.model, cfg.context), loaded.tokenizer, loaded.path)
    with pytest.raises(ConfigError, match="not a reward run"):
        RewardModel(plain)


def test_the_start_up_check_reads_no_weights(fitted, monkeypatch):
    import lit_bluelm.checkpoint as checkpoint
    from lit_bluelm.rewards import RewardModel
    from lit_bluelm.tokenizer import load_tokenizer

    run_dir, _ = fitted

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(checkpoint, "load_model_weights", no_weights)
    RewardModel.check_run(run_dir, load_tokenizer(run_dir / "tokenizer"))  # accepted, no weights
    with pytest.raises(AssertionError, match="weights were read"):
        RewardModel.from_run(run_dir)


def test_the_score_command_prints_a_score_per_line(fitted, tmp_path, capsys):
    from lit_bluelm import score
    from lit_bluelm.rewards import RewardModel

    run_dir, _ = fitted
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes((112, 112)))
    lines = [
        {"messages": PROMPT + [{"role": "assistant", **CHOSEN}]},
        {
            "messages": [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "There is 1 shape: a red circle."},
            ],
            "images": ["img/a.png"],
        },
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert score.main([f"ckpt={run_dir}", f"data={data}"]) == 0
    printed = [float(x) for x in capsys.readouterr().out.split()]
    assert len(printed) == 2
    assert score.main([f"ckpt={run_dir}", f"data={data}", "json=true"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in records] == [1, 2]
    assert [r["score"] for r in records] == pytest.approx(printed, abs=1e-6)
    from lit_bluelm.processor import load_image

    direct = RewardModel.from_run(run_dir).score(
        [line["messages"] for line in lines], [[], [load_image(tmp_path / "img" / "a.png")]]
    )
    assert direct == pytest.approx(printed, abs=1e-5)
    # bad input: one line naming the file's line, exit 2
    data.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"messages": PROMPT}) + "\n")
    assert score.main([f"ckpt={run_dir}", f"data={data}"]) == 2
    assert "line 2" in capsys.readouterr().err
    data.write_text("not json\n")
    assert score.main([f"ckpt={run_dir}", f"data={data}"]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
