"""The diagnostics of bench/ that are not part of `make bench` still run the real code path."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers import tiny_args


@pytest.fixture(scope="module")
def joint_ckpt(demo_dir, tmp_path_factory):
    import train
    from lit_bluelm.config import load_config

    run_dir = tmp_path_factory.mktemp("runs") / "joint"
    summary = train.run(
        load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=1", "validate_before_fit=false"))
    )
    return summary["last_ckpt"]


def test_count_learnability_trains_on_counting_and_scores_the_held_out_items(joint_ckpt, capsys):
    from bench import count_learnability
    from datamodules.demo_tasks import held_out_items

    args = ["--steps", "2", "--every", "1", "--batch", "2", "--items", "6"]
    assert count_learnability.main([joint_ckpt, "--order", "first", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["order=first", "loss=answer", "step=1"],
        ["order=first", "loss=answer", "step=2"],
    ]
    assert "examples=4 " in lines[1]
    majority = Counter(it.answer for it in held_out_items(0, 6)["demo_count"]).most_common(1)[0][1] / 6
    assert f"majority={majority:.3f}" in lines[0]
    # each order puts the question where it says
    assert count_learnability.prompt_text("red", "first").startswith("Question: How many red shapes")
    assert count_learnability.prompt_text("red", "after").startswith("<image>\nQuestion: How many red")


def test_count_learnability_refuses_a_missing_checkpoint(tmp_path, capsys):
    from bench import count_learnability

    with pytest.raises(SystemExit) as err:
        count_learnability.main([str(tmp_path / "none.ckpt")])
    assert err.value.code == 2
    assert "no checkpoint at" in capsys.readouterr().err
