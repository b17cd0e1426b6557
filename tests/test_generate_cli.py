"""``python -m lit_bluelm.generate``: a trained run's checkpoint, its tokenizer and chat template,
the JSON line, and one-line errors (exit 2) for bad input."""

import json

import pytest

from lit_bluelm import generate
from lit_bluelm.config import load_config
from lit_bluelm.trainer import fit_stage
from tests.helpers import png_bytes, tiny_args


@pytest.fixture(scope="module")
def ckpt(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config(tiny_args(demo_dir, run_dir, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    return fit_stage(cfg)["last_ckpt"]


def _json(capsys, argv):
    assert generate.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_think_with_a_budget_prints_one_json_line(ckpt, capsys):
    out = _json(
        capsys,
        [
            f"ckpt={ckpt}",
            "prompt=What is 12 + 7 + 30?",
            "think=true",
            "thinking_budget=3",
            "json=true",
            "max_new_tokens=24",
        ],
    )
    keys = {
        "text",
        "thinking",
        "answer",
        "thinking_tokens",
        "answer_tokens",
        "budget_exhausted",
        "finish_reason",
    }
    assert set(out) == keys
    assert out["thinking_tokens"] <= 3 and out["finish_reason"] in ("stop", "length")
    if out["text"].startswith("<think>"):  # an untrained model may or may not open the block
        assert out["thinking"] is not None


def test_plain_output_is_the_answer_and_an_image_prompt_runs(ckpt, capsys, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes((112, 112), (220, 40, 40)))
    argv = [
        f"ckpt={ckpt}",
        "prompt=Colour: [red, blue]? 12",  # prompts are free text, not YAML
        f"image={image}",
        "max_new_tokens=6",
        "seed=1",
    ]
    assert generate.main(argv + ["json=true"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == record["answer"] + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["ckpt=/no/such/ckpt"], "ckpt"),
        (["thinking_budget=-1"], "thinking_budget must be >= 0"),
        (["prompt=" + "word " * 3000], "exceeds the model's context"),
        (["nope=1"], "nope"),
        (["temperature=-1"], "temperature"),
        (["context.rope={rope_type: yarn, factor: 4.0}"], "differs from the checkpoint's"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ckpt, capsys, extra, message):
    argv = [f"ckpt={ckpt}", "prompt=hi", *extra]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_files_that_are_not_checkpoints_or_images_are_refused(ckpt, capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert generate.main([f"ckpt={text}", "prompt=hi"]) == 2
    assert "error: ckpt" in capsys.readouterr().err
    assert generate.main([f"ckpt={ckpt}", "prompt=hi", f"image={text}"]) == 2
    assert "error: image: cannot decode" in capsys.readouterr().err


def test_evaluate_writes_results_and_the_plot_and_prints_the_table(ckpt, capsys, tmp_path):
    from lit_bluelm import evaluate

    (tmp_path / "a.png").write_bytes(png_bytes((112, 112), (40, 80, 220)))
    mine = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "What is 1 + 2 + 3?", "answer": "6", "metric": "numeric"},
        {"prompt": "What colour is the shape?", "answer": "blue", "metric": "choice", "image": "a.png"},
        {"prompt": "Capital?", "answer": "Raten", "metric": "exact"},
    ]
    mine.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "eval"
    argv = [
        f"ckpt={ckpt}",
        f"tasks=[{mine}]",
        "budgets=[0,4]",
        f"out={out}",
        "max_new_tokens=12",
        "batch_size=2",
    ]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mine" in printed and "results=" in printed
    record = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["budget"]) for r in record["results"]] == [
        ("think", 0),
        ("think", 4),
        ("no_think", None),
    ]
    assert all(r["n"] == 3 and 0 <= r["accuracy"] <= 1 for r in record["results"])
    assert record["results"][0]["within_budget"] == 1.0 and record["results"][0]["mean_thinking_tokens"] == 0
    assert (out / "accuracy_vs_budget.png").is_file()
    assert record["ckpt"] == str(ckpt) and record["settings"]["budgets"] == [0, 4]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["tasks=[nope.jsonl]"], "no such file"),
        (["budgets=[-1]"], "budgets must be >= 0"),
        (["modes=[maybe]"], "unknown 'maybe'"),
        (["samples=2"], "needs temperature > 0"),
        (["tasks=[{tmp}/broken.jsonl]"], "cannot decode"),
    ],
)
def test_evaluate_bad_input_is_one_line_and_exit_2(ckpt, capsys, tmp_path, extra, message):
    from lit_bluelm import evaluate

    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.jsonl").write_text(
        json.dumps({"prompt": "p", "answer": "a", "image": "broken.png"}) + "\n"
    )
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]

    assert evaluate.main([f"ckpt={ckpt}", f"out={tmp_path}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_passkey_refuses_beyond_the_context_unless_asked_and_writes_its_rows(ckpt, capsys, tmp_path):
    from lit_bluelm import evaluate

    out = tmp_path / "passkey"
    argv = [f"ckpt={ckpt}", f"out={out}", "tasks=[passkey]", "passkey_depths=[0,1]", "passkey_trials=3"]
    assert evaluate.main([*argv, "passkey_factors=[0.5,2]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "1024 tokens exceeds the model's context of 512" in err and "extrapolate=true" in err
    assert evaluate.main([*argv, "passkey_factors=[0.25,2]", "extrapolate=true"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:2] == ["length", "factor"] and "results=" in printed
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["task"], r["length"], r["length_factor"], r["depth"], r["n"]) for r in rows] == [
        ("passkey", 128, 0.25, 0.0, 3),
        ("passkey", 128, 0.25, 1.0, 3),
        ("passkey", 1024, 2.0, 0.0, 3),
        ("passkey", 1024, 2.0, 1.0, 3),
    ]
    assert all(r["accuracy"] in (0, 1 / 3, 2 / 3, 1) for r in rows)
    assert (out / "passkey_heatmap.png").is_file() and not (out / "accuracy_vs_budget.png").exists()
    assert evaluate.main([*argv, "passkey_trials=0"]) == 2
    assert "passkey_trials must be >= 1" in capsys.readouterr().err
