"""The demo pipeline (``python -m lit_bluelm.demo``): every stage chained on its predecessor's
checkpoint, the closing comparison, and ``--from`` reusing the earlier runs."""

import json

import pytest

from datamodules.demo import DemoSpec, write_demo
from lit_bluelm import demo
from lit_bluelm.claims import CLAIMS
from lit_bluelm.errors import ConfigError

# the stage yamls read 8 train and 4 val shards of each source
TINY = DemoSpec(train_per_shard=6, val_per_shard=4, long_per_shard=6, eval_items=4)
# the passkey evaluations at the lengths the claims read, one depth, one trial
PASSKEY = ("passkey_factors=[1,4]", "passkey_depths=[0.5]", "passkey_trials=1")
SMOKE = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "data.batch_size=2",
    "data.num_workers=0",
]


@pytest.mark.slow
def test_the_pipeline_chains_every_stage_and_reruns_from_a_late_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "PASSKEY_SETTINGS", PASSKEY)
    data = write_demo(tmp_path / "demo", TINY)
    runs = tmp_path / "runs"
    args = ["--runs", str(runs), f"data.demo_dir={data}", *SMOKE]
    rc = demo.main(args)
    summaries = {s.name: json.loads((runs / s.name / "summary.json").read_text()) for s in demo.STAGES}
    distilled, scratch = (summaries[name]["val_loss_after"] for name in demo.BETTER)
    results = json.loads((runs / demo.EVAL / "results.json").read_text())["results"]
    assert {r["task"] for r in results} == {"demo_arith", "demo_count", "demo_color"}
    assert all(r["n"] == TINY.eval_items for r in results)
    report = json.loads((runs / "report.json").read_text())
    claims = {c["name"]: c for c in report["claims"]}
    assert claims["text: distilled val/loss < scratch's"]["met"] == (distilled < scratch)
    assert len(claims) == len(CLAIMS)  # the whole pipeline holds evidence for every claim
    assert any(name.startswith("rl: ") for name in claims)  # GRPO's among them
    assert rc == (0 if all(c["met"] for c in claims.values()) else 1)
    assert set(report["seconds"]) == {s.name for s in demo.STAGES} | set(demo.DEMO.eval_names)
    for name in demo.PASSKEY:
        rows = json.loads((runs / name / "results.json").read_text())["results"]
        assert [(r["length_factor"], r["depth"], r["n"]) for r in rows] == [(1.0, 0.5, 1), (4.0, 0.5, 1)]
        assert (runs / name / "passkey_heatmap.png").is_file()
    assert (runs / demo.EVAL / "accuracy_vs_budget.png").is_file()
    md = (runs / "report.md").read_text()
    assert report["commit"] in md and "Claims:" in md and "demo_arith     think" in md
    out = capsys.readouterr().out
    assert "claim " in out and "result" in out and f"report={runs / 'report.md'}" in out
    for stage in demo.STAGES:
        assert f"$ python train.py {' '.join(demo.stage_argv(stage, str(runs), args[2:]))}" in out
        assert summaries[stage.name]["global_step"] == (2 if stage.trains else 0)
    assert summaries["sft"]["stage"] == "sft"
    assert set(summaries["sft"]["val_loss_after_by_source"]) == {"sft_think", "sft_nothink"}
    # each stage started from its predecessor's last checkpoint
    sft_config = (runs / "sft" / "config.yaml").read_text()
    assert f"init_from: {runs}/long_context/checkpoints/last.ckpt" in sft_config
    assert "rope_type: yarn" in sft_config  # inherited from the long-context checkpoint
    assert f"init_from: {runs}/sft/checkpoints/last.ckpt" in (runs / "reward" / "config.yaml").read_text()
    assert summaries["reward"]["val_accuracy_after_by_source"].keys() == {
        "pref_think",
        "pref_topic",
        "pref_color",
    }
    long = summaries["long_context"]
    assert (
        long["val_loss_long_after"] > 0
        and "seq_len: 2048" in (runs / "long_context" / "config.yaml").read_text()
    )
    short = summaries["long_context_short"]
    assert set(short["val_loss_after_by_source"]) == set(summaries["reasoning"]["val_loss_after_by_source"])

    teacher_summary = (runs / "text_teacher" / "summary.json").stat().st_mtime_ns
    sft_summary = (runs / "sft" / "summary.json").stat().st_mtime_ns
    demo.main(["--runs", str(runs), "--from", str(runs / "sft"), *args[2:]])
    assert (runs / "text_teacher" / "summary.json").stat().st_mtime_ns == teacher_summary
    assert (runs / "sft" / "summary.json").stat().st_mtime_ns > sft_summary
    out = capsys.readouterr().out
    assert "$ python train.py stage=sft" in out and "stage=joint" not in out
    # the times of the stages --from reused are kept in the report
    assert set(json.loads((runs / "report.json").read_text())["seconds"]) == set(report["seconds"])

    # one more seed of the stages after the text stage, from the text stage's checkpoint
    rc = demo.main(["--runs", str(runs), "--seeds", "1", *args[2:]])
    seeded = tmp_path / "runs_seed1"
    joint = (seeded / "joint" / "config.yaml").read_text()
    assert f"init_from: {runs}/text/checkpoints/last.ckpt" in joint
    assert f"seed: {demo.DEFAULT_SEED + 1}" in joint
    assert not (seeded / "text").exists() and (seeded / demo.EVAL / "results.json").is_file()
    seeds = json.loads((runs / "seeds.json").read_text())
    assert seeds["seeds"] == [demo.DEFAULT_SEED + 1]
    names = [c["name"] for c in seeds["claims"]]
    assert "text: distilled val/loss < scratch's" not in names and len(names) == len(CLAIMS) - 1
    assert rc == (0 if all(c["met"] for c in seeds["claims"]) else 1)
    assert "make demo-seeds" in (runs / "report.md").read_text()
    assert "claims over seeds" in capsys.readouterr().out
    # a late stage of every seed again, reusing the seed's earlier runs
    sft_time = (seeded / "sft" / "summary.json").stat().st_mtime_ns
    reward_time = (seeded / "reward" / "summary.json").stat().st_mtime_ns
    demo.main(["--runs", str(runs), "--seeds", "1", "--from", "reward", *args[2:]])
    assert (seeded / "sft" / "summary.json").stat().st_mtime_ns == sft_time
    assert (seeded / "reward" / "summary.json").stat().st_mtime_ns > reward_time
    out = capsys.readouterr().out
    assert "stage=reward" in out and "stage=sft" not in out and "claims over seeds" in out

    # GRPO alone again (from the SFT checkpoint with the reward run), its evaluations and the
    # claims; --rl (make demo-rl, from before GRPO joined the pipeline) is still accepted
    rc = demo.main(["--runs", str(runs), "--rl", "--from", "rl", *args[2:]])
    rl_config = (runs / "rl" / "config.yaml").read_text()
    assert (
        f"init_from: {runs}/sft/checkpoints/last.ckpt" in rl_config and f"model: {runs}/reward" in rl_config
    )
    assert json.loads((runs / "rl" / "summary.json").read_text())["global_step"] == 2
    sampled = json.loads((runs / "eval_rl_sampled" / "results.json").read_text())["results"]
    assert [(r["task"], r["mode"], r["budget"], r["n"]) for r in sampled] == [
        ("demo_arith", "think", 128, 16)
    ]
    report = json.loads((runs / "report.json").read_text())
    assert len(report["claims"]) == len(CLAIMS) and set(report["evals"]) == set(demo.RL_STAGE_EVALS)
    assert rc == (0 if all(c["met"] for c in report["claims"]) else 1)
    assert {"rl", *demo.RL_STAGE_EVALS} <= set(report["seconds"])
    out = capsys.readouterr().out
    assert "rl: each route's reward" in out and f"{runs}/rl " in out and "val_reward " in out
    assert "stage=sft" not in out


def test_from_names_a_stage_whose_predecessors_have_finished(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown run 'nope'; valid: text_teacher"):
        demo.first_stage("nope", str(tmp_path))
    with pytest.raises(ConfigError, match="reuses .*text_teacher, which has not finished"):
        demo.first_stage("joint", str(tmp_path))
    assert demo.first_stage("text_teacher", str(tmp_path)) == 0
    assert demo.main(["--runs", str(tmp_path), "--from", "joint"]) == 2
    assert "error: --from joint reuses" in capsys.readouterr().err


def test_seeds_needs_a_count_and_finished_runs_to_rerun_from(tmp_path, capsys):
    assert demo.main(["--seeds", "0"]) == 2
    assert "error: --seeds: a number >= 1" in capsys.readouterr().err
    assert demo.main(["--runs", str(tmp_path / "runs"), "--seeds", "2", "--from", "sft"]) == 2
    assert "error: --from sft reuses" in capsys.readouterr().err


def test_the_pipeline_stops_at_a_diverged_stage(tmp_path, capsys):
    data = write_demo(tmp_path / "demo", TINY)
    runs = tmp_path / "runs"
    diverge = [
        "optim.lr.llm=1e30",
        "trainer.max_bad_steps=1",
        "checkpoint.every_n_steps=1",
        "validate_before_fit=false",
    ]
    rc = demo.main(["--runs", str(runs), f"data.demo_dir={data}", *SMOKE, *diverge])
    assert rc == 3  # the diverged status's exit code
    first = demo.STAGES[0].name
    assert json.loads((runs / first / "summary.json").read_text())["status"] == "diverged"
    assert not (runs / demo.STAGES[1].name).exists()  # the next stage never started from it
    assert f"error: stage {first} ended with status=diverged" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"ended with status=diverged; rerun from {first}"):
        demo.first_stage(demo.STAGES[1].name, str(runs))
