"""Evaluation: answer extraction and every metric on hand-made replies, task files (an image item,
malformed lines), the results schema, the plot, and math-verify's equivalence and timeout."""

import json
import threading

import pytest

from lit_bluelm.chat import split_reply
from lit_bluelm.errors import ConfigError
from lit_bluelm.evaluation import Row, load_task, plot, score, settings_grid, summarize, write_results
from tests.helpers import png_bytes


@pytest.mark.parametrize(
    "reply, metric, gold, right",
    [
        ("<think>\n12 + 7 = 19. 19 + 30 = 49.\n</think>\n49", "numeric", "49", True),
        ("<think>\n12 + 7 = 19.\n</think>\n19", "numeric", "49", False),
        ("The total is 49.", "numeric", "49", True),
        ("no number", "numeric", "49", False),
        ("<think>\nThe shape is a blue circle.\n</think>\nBlue.", "choice", "blue", True),
        ("red, not blue", "choice", "blue", False),
        ("Raten.", "exact", "Raten", True),
        ("raten ", "exact", "Raten", True),
        ("Raten river", "exact", "Raten", False),
        # only the text after the block counts: thinking that names the answer is not an answer
        ("<think>\n49\n</think>\n50", "numeric", "49", False),
        ("<think>\nnever closed 49", "numeric", "49", False),
        ("$\\frac{1}{2}$", "math", "0.5", True),
        ("\\boxed{2}", "math", "3", False),
    ],
)
def test_answers_are_scored_after_the_think_block(reply, metric, gold, right):
    _, answer = split_reply(reply)
    assert score(metric, answer, gold) is right


def test_math_verify_equivalence_and_its_timeout_outside_the_main_thread():
    assert score("math", "x = \\frac{2}{4}", "\\frac{1}{2}")
    results = []
    worker = threading.Thread(target=lambda: results.append(score("math", "0.5", "\\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [True]  # off the main thread the SIGALRM timeouts are off, not an error


def test_a_task_file_with_an_image_and_the_malformed_lines(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png_bytes())
    good = tmp_path / "mine.jsonl"
    good.write_text(
        json.dumps({"prompt": "What colour?", "answer": "blue", "metric": "choice", "image": "pics/a.png"})
        + "\n\n"
        + json.dumps({"prompt": "1 + 1?", "answer": "2", "metric": "numeric"})
        + "\n"
    )
    task = load_task(str(good))
    assert task.name == "mine" and len(task.items) == 2
    assert task.items[0].image == tmp_path / "pics" / "a.png" and task.items[1].image is None
    for line, message in [
        ("{not json", "mine2.jsonl:2: not JSON"),
        ('{"prompt": 1, "answer": "2"}', "'prompt' must be a string"),
        ('{"prompt": "p", "answer": "a", "metric": "fuzzy"}', "unknown metric 'fuzzy'"),
        ('{"prompt": "p", "answer": "a", "image": "missing.png"}', "not found"),
    ]:
        bad = tmp_path / "mine2.jsonl"
        bad.write_text(json.dumps({"prompt": "ok", "answer": "ok"}) + "\n" + line + "\n")
        with pytest.raises(ConfigError, match=message):
            load_task(str(bad))
    with pytest.raises(ConfigError, match="valid names: demo_arith"):
        load_task("demo_nope")


def test_demo_tasks_load_by_name(demo_dir):
    task = load_task("demo_count", demo_dir)
    assert len(task.items) >= 300 and all(it.image is not None for it in task.items)


def test_rows_the_json_schema_and_the_plot(tmp_path):
    outcomes = [
        {"correct": True, "thinking_tokens": 5, "opened": True},
        {"correct": False, "thinking_tokens": 9, "opened": True},
        {"correct": True, "thinking_tokens": 8, "opened": False},
        {"correct": True, "thinking_tokens": 2, "opened": True},
    ]
    row = summarize("demo_arith", "think", 8, outcomes)
    assert row.accuracy == 0.75 and row.n == 4 and row.mean_thinking_tokens == 6.0
    assert abs(row.stderr - (0.75 * 0.25 / 4) ** 0.5) < 1e-12
    assert row.think_open_rate == 0.75 and row.within_budget == 0.75
    assert summarize("demo_arith", "no_think", None, outcomes).within_budget == 1.0
    # two samples of each of two items: item means 0.5 and 1.0, the stderr of their mean
    sampled = [{**o, "item": i % 2} for i, o in enumerate(outcomes)]
    assert abs(summarize("demo_arith", "think", 8, sampled).stderr - (0.0625 / 2) ** 0.5) < 1e-12
    assert settings_grid(["think", "no_think"], [0, None]) == [
        ("think", 0),
        ("think", None),
        ("no_think", None),
    ]
    with pytest.raises(ConfigError, match="unknown 'maybe'"):
        settings_grid(["maybe"], [0])
    rows = [row, Row("demo_arith", "no_think", None, 0.25, 0.2, 4, 0.0, 0.0, 1.0)]
    path = write_results(tmp_path, "ckpt.ckpt", {"temperature": 0.0}, rows)
    record = json.loads(path.read_text())
    assert set(record) == {"ckpt", "settings", "results"}
    keys = {
        "task",
        "mode",
        "budget",
        "accuracy",
        "stderr",
        "n",
        "mean_thinking_tokens",
        "think_open_rate",
        "within_budget",
    }
    assert all(set(r) == keys for r in record["results"]) and record["results"][1]["budget"] is None
    png = plot(rows, tmp_path / "accuracy_vs_budget.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_math_verify_gets_its_timeouts_in_the_main_thread_only(monkeypatch):
    import math_verify

    seen = []
    monkeypatch.setattr(
        math_verify, "parse", lambda text, parsing_timeout: seen.append(("parse", parsing_timeout)) or text
    )
    monkeypatch.setattr(
        math_verify,
        "verify",
        lambda gold, answer, timeout_seconds: seen.append(("verify", timeout_seconds)) or True,
    )
    assert score("math", "1", "1")
    assert seen == [("parse", 5), ("parse", 5), ("verify", 5)]
    seen.clear()
    worker = threading.Thread(target=lambda: score("math", "1", "1"))
    worker.start()
    worker.join()
    assert seen == [("parse", None), ("parse", None), ("verify", None)]

    def slow(*args, **kwargs):
        raise TimeoutError("math-verify timed out")

    monkeypatch.setattr(math_verify, "verify", slow)
    assert score("math", "1", "1") is False  # a timeout counts as wrong, it does not stop the run
