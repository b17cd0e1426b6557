"""Mixtures, schedules reaching DataLoader workers, and exact mid-epoch resume."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import train
from callbacks import ResamplingSchedule
from datamodules.collate import Collator
from datamodules.datamodule import BlueLMDataModule
from datamodules.streams import MixedStream, MixtureWeights, Source, expand_shards
from lit_bluelm.config import load_config
from tests.helpers import data_args, scalars, text_args, tiny_args, train_subprocess


def _sources(root, weights=(0.5, 0.3, 0.1), repeat=(1.0, 1.0, 2.0)):
    kinds = ("image_text", "text", "cot")
    return [
        Source(k, k, expand_shards(f"{root}/train/{k}-{{000000..000003}}.tar", k), w, r)
        for k, w, r in zip(kinds, weights, repeat, strict=True)
    ]


def test_realised_fractions_match_weights_and_repeat_within_2_points(demo_dir, processor):
    stream = iter(MixedStream(_sources(demo_dir), processor, seq_len=256, seed=0, shuffle_buffer=8))
    counts = Counter(next(stream)["source"] for _ in range(1000))
    # cot: weight 0.1 x repeat 2 -> 0.2 of the draws
    for name, target in (("image_text", 0.5), ("text", 0.3), ("cot", 0.2)):
        assert abs(counts[name] / 1000 - target) <= 0.02, counts


def _batches(stream, n, workers):
    loader = DataLoader(stream, batch_size=stream.batch_size, collate_fn=Collator(0), num_workers=workers)
    it = iter(loader)
    return it, [next(it) for _ in range(n)]


def test_schedule_reaches_every_dataloader_worker(demo_dir, processor):
    sources = _sources(demo_dir)[:2]
    # text only until step 4, image_text only from step 5 (a step change)
    weights = MixtureWeights(["image_text", "text"], [0.5, 0.5], [1, 1], [(4, [0.0, 1.0]), (5, [1.0, 0.0])])
    stream = MixedStream(
        sources, processor, seq_len=256, seed=0, shuffle_buffer=4, batch_size=3, weights=weights
    )
    _, batches = _batches(stream, 10, workers=2)
    for b, batch in enumerate(batches):
        assert set(batch["doc_sources"]) == ({"text"} if b <= 4 else {"image_text"}), b
        assert batch["data_state"]["batch"] == b and batch["data_state"]["slot"] == b % 2


def test_adaptive_update_reaches_every_worker_from_its_batch(demo_dir, processor):
    sources = _sources(demo_dir)[:2]
    weights = MixtureWeights(["image_text", "text"], [0.5, 0.5], [1, 1])
    stream = MixedStream(
        sources, processor, seq_len=256, seed=0, shuffle_buffer=4, batch_size=2, weights=weights
    )
    it, batches = _batches(stream, 1, workers=2)
    # the main process drops text from batch 7 on (workers run at most 2 x 2 batches ahead)
    weights.push(7, [1.0, 0.0])
    assert weights.multipliers(6) == [1.0, 1.0] and weights.multipliers(7) == [1.0, 0.0]
    batches += [next(it) for _ in range(11)]
    for b, batch in enumerate(batches):
        assert batch["data_state"]["batch"] == b
        assert set(batch["doc_sources"]) == ({"image_text", "text"} if b < 7 else {"image_text"}), b


def test_mixture_weights_interpolate_linearly():
    w = MixtureWeights(["a", "b"], [1, 0], [1, 2], [(0, [1.0, 0.0]), (10, [0.0, 1.0])], accumulate=2)
    assert w.scheduled(5) == [0.5, 0.5]
    assert w(10) == [0.5, 1.0]  # batch 10 = step 5 with accumulation 2; b repeated twice
    assert w.scheduled(50) == [0.0, 1.0]


def test_adaptive_rule_raises_the_lagging_source():
    cb = ResamplingSchedule(adaptive=True, eta=1.0, smoothing=0.0)
    m = cb.update([1.0, 1.0], losses=[2.0, 1.0], reference=[4.0, 4.0])  # a halved, b quartered
    assert m[1] < 1.0 < m[0] and sum(m) == pytest.approx(2.0)
    smooth = ResamplingSchedule(adaptive=True, eta=1.0, smoothing=1.0).update(
        [1.0, 1.0], [2.0, 1.0], [4.0, 4.0]
    )
    assert smooth == [1.0, 1.0]


def test_datamodule_state_restores_rng_and_weight_log(demo_dir):
    cfg = load_config(tiny_args(demo_dir, "unused"))
    dm = BlueLMDataModule(cfg)
    dm.weights.push(5, [2.0, 1.0])
    state = dm.state_dict()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    other = BlueLMDataModule(cfg)
    other.load_state_dict(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert other.weights.rows() == [[5.0, 2.0, 1.0]]


def test_a_different_layout_warns_and_restarts_the_streams(demo_dir):
    cfg = load_config(tiny_args(demo_dir, "unused"))
    state = BlueLMDataModule(cfg).state_dict()
    state["ranks"][0]["layout"] = [1, 4]  # saved with 4 workers
    dm = BlueLMDataModule(cfg)
    with pytest.warns(UserWarning, match="restart from data.seed"):
        dm.load_state_dict(state)
    assert dm._slots == {} and dm._consumed == 0  # fresh readers; the batch count carries on


# ----------------------------------------------------------------------------- exact resume


def tag_values(run_dir, tag):
    """step -> value of one logged scalar."""
    return dict(scalars(run_dir).get(tag, []))


@pytest.mark.parametrize(
    "stage,workers,accumulate,stop",
    [("joint", 0, 1, 6), ("joint", 2, 1, 6), ("joint", 2, 1, 5), ("text", 2, 2, 6)],
    ids=[
        "joint-0-workers",
        "joint-2-workers",
        "joint-2-workers-odd-stop",
        "text-packed-2-workers-accumulate-2",
    ],
)
def test_resume_sees_exactly_the_uninterrupted_samples_and_losses(
    demo_dir, tmp_path, monkeypatch, stage, workers, accumulate, stop
):
    """12 uninterrupted steps against ``stop`` + the rest resumed from last.ckpt."""
    seen = []
    original = BlueLMDataModule.on_before_batch_transfer

    def record(self, batch, dataloader_idx):
        if self.trainer.training:
            seen.append((self.trainer.global_step, tuple(batch["key"])))
        return original(self, batch, dataloader_idx)

    monkeypatch.setattr(BlueLMDataModule, "on_before_batch_transfer", record)
    make = tiny_args if stage == "joint" else text_args
    common = [
        f"data.num_workers={workers}",
        "data.shuffle_buffer=16",
        f"trainer.accumulate_grad_batches={accumulate}",
        "optim.schedule=constant",  # the stopped run then follows the 12-step run exactly
        "validate_before_fit=false",
        "trainer.val_check_interval=3",  # validations before and after the stop
        "data.adaptive.enabled=true",  # which move the weights: the log must resume too
        f"checkpoint.every_n_steps={stop}",
    ]
    if stage == "text":
        common.append("module=next_token")

    def run(name, *extra):
        seen.clear()
        summary = train.run(load_config(make(demo_dir, tmp_path / name, *common, *extra)))
        return summary, list(seen), tag_values(tmp_path / name, "train/loss")

    _, full_keys, full_loss = run("full", "trainer.max_steps=12")
    # an odd stop with 2 workers: the resumed run's worker 0 continues slot 1
    first, _, _ = run("part", f"trainer.max_steps={stop}")
    _, resumed_keys, resumed_loss = run("part", "trainer.max_steps=12", f"resume_from={first['last_ckpt']}")
    assert len(full_keys) == 12 * accumulate and len(resumed_keys) == (12 - stop) * accumulate
    assert resumed_keys == full_keys[stop * accumulate :]
    assert [resumed_loss[s] for s in range(stop, 12)] == [full_loss[s] for s in range(stop, 12)]
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert len(ckpt["BlueLMDataModule"]["weight_log"]) == 3  # adaptive updates after steps 6, 9 and 12


def test_fit_logs_realised_fractions_weights_and_per_source_val_loss(demo_dir, tmp_path):
    run_dir = tmp_path / "mix"
    args = tiny_args(demo_dir, run_dir, "trainer.max_steps=2", "trainer.val_check_interval=2")
    train.run(load_config(args + ["data.adaptive.enabled=true"]))
    for tag in (
        "data/frac/image_text",
        "data/frac/text",
        "data/weight/text",
        "val/loss/image_text",
        "val/loss/text",
    ):
        assert tag_values(run_dir, tag), tag
    # the adaptive update made after the validation at step 2 is in the checkpoint saved after it
    ckpt = torch.load(run_dir / "checkpoints" / "best-step=2.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["BlueLMDataModule"]["weight_log"] and ckpt["BlueLMDataModule"]["ranks"][0]["consumed"] == 2


def test_bad_mixtures_stop_at_start_up_naming_the_source(demo_dir, tmp_path, capsys):
    base = data_args(demo_dir) + [f"run_dir={tmp_path}"]
    cases = [
        (["data.sources.text.repeat=0"], "data.sources.text.repeat"),
        (["data.mix.text=-1"], "data.mix.text"),
        (["data.sources.text.kind=poetry"], "data.sources.text.kind"),
        ([f"data.sources.text.train={tmp_path}/none-{{0..3}}.tar"], "data.sources.text.train"),
        (["data.mix.text=0", "data.mix.image_text=0"], "all zero"),
        (["data.schedule=[{at: 0.5, mix: {poetry: 1}}]"], "data.schedule[0].mix.poetry"),
    ]
    for extra, message in cases:
        assert train.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra


@pytest.mark.slow
def test_two_ranks_with_an_odd_number_of_shards_run_the_same_batches_and_resume(demo_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    odd = [
        f"data.sources.text.train={demo_dir}/train/text-{{000000..000002}}.tar",  # 3 shards, 2 ranks
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.val_check_interval=100",
        "validate_before_fit=false",
    ]
    # 12 steps cross two data epochs (each rank gets 2 of the 3 shards per epoch, dealt anew)
    out = train_subprocess(text_args(demo_dir, run_dir, "module=next_token", "trainer.max_steps=12", *odd))
    assert out["global_step"] == "12"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    ranks = ckpt["BlueLMDataModule"]["ranks"]
    assert [r["consumed"] for r in ranks] == [12, 12]  # gathered from both ranks
    assert ranks[0]["slots"][0]["reader"] == 0 and ranks[1]["slots"][0]["reader"] == 1
    resume = [f"resume_from={run_dir}/checkpoints/last.ckpt", "trainer.max_steps=14"]
    out = train_subprocess(text_args(demo_dir, run_dir, "module=next_token", *odd, *resume))
    assert out["global_step"] == "14"
