"""The demo pipeline (``python -m lit_bluelm.demo``): every stage chained on its predecessor's
checkpoint, the closing comparison, and ``--from`` reusing the earlier runs."""

import json

import pytest

from datamodules.demo import DemoSpec, write_demo
from lit_bluelm import demo
from lit_bluelm.errors import ConfigError
from lit_bluelm.evaluation import Row

# the stage yamls read 8 train and 4 val shards of each source
TINY = DemoSpec(train_per_shard=6, val_per_shard=4, eval_items=4)
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
def test_the_pipeline_chains_every_stage_and_reruns_from_a_late_one(tmp_path, capsys):
    data = write_demo(tmp_path / "demo", TINY)
    runs = tmp_path / "runs"
    args = ["--runs", str(runs), f"data.demo_dir={data}", *SMOKE]
    rc = demo.main(args)
    summaries = {s.name: json.loads((runs / s.name / "summary.json").read_text()) for s in demo.STAGES}
    distilled, scratch = (summaries[name]["val_loss_after"] for name in demo.BETTER)
    results = json.loads((runs / demo.EVAL / "results.json").read_text())["results"]
    assert {r["task"] for r in results} == {"demo_arith", "demo_count", "demo_color"}
    assert all(r["n"] == TINY.eval_items for r in results)
    rows = [Row(**r) for r in results]
    assert rc == (0 if distilled < scratch and not demo.eval_failures(rows) else 1)
    assert (runs / demo.EVAL / "accuracy_vs_budget.png").is_file()
    out = capsys.readouterr().out
    for stage in demo.STAGES:
        assert f"$ python train.py {' '.join(demo.stage_argv(stage, str(runs), args[2:]))}" in out
        assert summaries[stage.name]["global_step"] == 2
    assert summaries["sft"]["stage"] == "sft"
    assert set(summaries["sft"]["val_loss_after_by_source"]) == {"sft_think", "sft_nothink"}
    # each stage started from its predecessor's last checkpoint
    sft_config = (runs / "sft" / "config.yaml").read_text()
    assert f"init_from: {runs}/reasoning/checkpoints/last.ckpt" in sft_config

    teacher_summary = (runs / "text_teacher" / "summary.json").stat().st_mtime_ns
    sft_summary = (runs / "sft" / "summary.json").stat().st_mtime_ns
    demo.main(["--runs", str(runs), "--from", str(runs / "sft"), *args[2:]])
    assert (runs / "text_teacher" / "summary.json").stat().st_mtime_ns == teacher_summary
    assert (runs / "sft" / "summary.json").stat().st_mtime_ns > sft_summary
    out = capsys.readouterr().out
    assert "$ python train.py stage=sft" in out and "stage=joint" not in out


def test_from_names_a_stage_whose_predecessors_have_finished(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown run 'nope'; valid: text_teacher"):
        demo.first_stage("nope", str(tmp_path))
    with pytest.raises(ConfigError, match="reuses .*text_teacher, which has not finished"):
        demo.first_stage("joint", str(tmp_path))
    assert demo.first_stage("text_teacher", str(tmp_path)) == 0
    assert demo.main(["--runs", str(tmp_path), "--from", "joint"]) == 2
    assert "error: --from joint reuses" in capsys.readouterr().err


def test_the_demo_evaluation_targets_on_hand_made_rows():
    def row(mode, budget, acc, opened, within=1.0):
        return Row("demo_arith", mode, budget, acc, 0.02, 300, 10.0, opened, within)

    good = [row("think", 0, 0.05, 1.0), row("think", 128, 0.40, 0.97), row("no_think", None, 0.10, 0.0)]
    assert demo.eval_failures(good) == []
    gains = {name: (round(gain, 3), met) for name, gain, _, met in demo.accuracy_targets(good)}
    assert gains == {
        "demo_arith think@128 over no_think": (0.3, True),
        "demo_arith think@128 over think budget 0": (0.35, True),
    }
    bad = [
        row("think", 8, 0.1, 0.9),
        row("no_think", None, 0.1, 0.2),
        row("think", 32, 0.1, 1.0, within=0.99),
    ]
    assert len(demo.eval_failures(bad)) == 3


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
