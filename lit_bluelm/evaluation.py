"""Evaluation: tasks (JSONL files, the demo's by name), answer metrics, the accuracy of each
(task, mode, budget) through the generation engine, ``results.json`` and the budget plot.

A task file has one JSON object a line: ``{"prompt": ..., "answer": ..., "image": optional path
relative to the file, "metric": "exact" | "numeric" | "choice" | "math"}``. The answer compared
is the reply's text after ``</think>`` (the whole reply without a think block):

* ``exact``: equal after trimming spaces and a final period, ignoring case;
* ``numeric``: the first number in the answer equals the gold number;
* ``choice``: the first word of the answer (letters and digits only) is the gold choice, ignoring case;
* ``math``: ``math-verify`` finds the answer equivalent to the gold one (its timeouts use SIGALRM,
  so they run in the main thread; elsewhere they are off).
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from lit_bluelm.errors import ConfigError
from lit_bluelm.summary import write_json

METRICS = ("exact", "numeric", "choice", "math")
DEMO_TASKS = ("demo_arith", "demo_count", "demo_color")
MODES = ("think", "no_think")


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    answer: str
    metric: str
    image: Optional[Path] = None


@dataclass
class Task:
    name: str
    path: Path
    items: List[EvalItem]


def load_task(spec: str, demo_dir: str | Path = "data/demo") -> Task:
    """A demo task by name (``demo_arith`` -> ``<demo_dir>/eval/demo_arith.jsonl``) or any JSONL
    file by its path (the task's name is the file's stem). A malformed line is one error naming
    the file and the line."""
    path = Path(demo_dir) / "eval" / f"{spec}.jsonl" if spec in DEMO_TASKS else Path(spec)
    if not path.is_file():
        hint = (
            "; write the demo data with python -m datamodules.demo"
            if spec in DEMO_TASKS
            else f"; valid names: {', '.join(DEMO_TASKS)} or a .jsonl path"
        )
        raise ConfigError(f"tasks: '{spec}': no such file {path}{hint}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_item(line, path, number))
    if not items:
        raise ConfigError(f"{path}: no items")
    return Task(path.stem, path, items)


def _item(line: str, path: Path, number: int) -> EvalItem:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ConfigError(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: a line is a JSON object")
    for key in ("prompt", "answer"):
        if not isinstance(record.get(key), str):
            raise ConfigError(f"{where}: '{key}' must be a string")
    metric = record.get("metric", "exact")
    if metric not in METRICS:
        raise ConfigError(f"{where}: unknown metric '{metric}'; valid: {', '.join(METRICS)}")
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ConfigError(f"{where}: 'image' must be a path string")
        image = path.parent / image
        if not image.is_file():
            raise ConfigError(f"{where}: image {image} not found")
    return EvalItem(record["prompt"], record["answer"], metric, image)


# ----------------------------------------------------------------------------- metrics

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _plain(text: str) -> str:
    return text.strip().rstrip(".").strip().casefold()


def _first_number(text: str) -> Optional[float]:
    match = _NUMBER.search(text.replace(",", ""))
    return float(match.group()) if match else None


def _math_equal(answer: str, gold: str) -> bool:
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if in_main else None  # SIGALRM only works in the main thread
    try:
        gold_parsed = parse(gold, parsing_timeout=timeout)
        answer_parsed = parse(answer, parsing_timeout=timeout)
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))
    except Exception:  # a parse or verify failure (or timeout) counts as wrong
        return False


def score(metric: str, answer: str, gold: str) -> bool:
    """Is ``answer`` (the text after the think block) right by ``metric``?"""
    if metric == "exact":
        return _plain(answer) == _plain(gold)
    if metric == "numeric":
        got, want = _first_number(answer), _first_number(gold)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)
    if metric == "choice":
        words = re.findall(r"[^\W_]+", answer.casefold())
        return bool(words) and words[0] == _plain(gold)
    if metric == "math":
        return _math_equal(answer, gold)
    raise ConfigError(f"unknown metric '{metric}'; valid: {', '.join(METRICS)}")


# ----------------------------------------------------------------------------- running


@dataclass
class Row:
    task: str
    mode: str
    budget: Optional[int]
    accuracy: float
    stderr: float
    n: int
    mean_thinking_tokens: float
    think_open_rate: float
    within_budget: float


def settings_grid(modes: Sequence[str], budgets: Sequence[Optional[int]]) -> List[tuple]:
    """(mode, budget) pairs: every budget in think mode, one no-think row (budget null)."""
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"modes: unknown '{mode}'; valid: {', '.join(MODES)}")
    grid = []
    for mode in modes:
        grid += [(mode, b) for b in budgets] if mode == "think" else [(mode, None)]
    return grid


def summarize(task: str, mode: str, budget: Optional[int], outcomes: List[dict]) -> Row:
    """A row from outcomes; with several samples of an item (outcomes with the same ``item``)
    the stderr is that of the mean over items of each item's mean (samples of one item are not
    independent draws); with one sample an item it is sqrt(p (1 - p) / n)."""
    n = len(outcomes)
    correct = [o["correct"] for o in outcomes]
    acc = sum(correct) / n
    by_item: Dict[Any, List[float]] = {}
    for i, o in enumerate(outcomes):
        by_item.setdefault(o.get("item", i), []).append(float(o["correct"]))
    means = [sum(v) / len(v) for v in by_item.values()]
    items = len(means)
    variance = sum((m - acc) ** 2 for m in means) / items  # the population variance of item means
    return Row(
        task=task,
        mode=mode,
        budget=budget,
        accuracy=acc,
        stderr=math.sqrt(variance / items) if items > 1 else 0.0,
        n=n,
        mean_thinking_tokens=sum(o["thinking_tokens"] for o in outcomes) / n,
        think_open_rate=sum(o["opened"] for o in outcomes) / n,
        within_budget=(1.0 if budget is None else sum(o["thinking_tokens"] <= budget for o in outcomes) / n),
    )


def evaluate_task(
    generator,
    processor,
    task: Task,
    mode: str,
    budget: Optional[int],
    cfg,
    samples: int = 1,
    batch_size: int = 64,
    progress: Optional[Callable[[int], None]] = None,
    prompts: Optional[list] = None,
) -> Row:
    """One row: every item of ``task`` (``samples`` times, seeds ``cfg.seed + k``), generated in
    batches of ``batch_size``; ``prompts`` from :func:`build_prompts` (built here when not given;
    the same for every budget of a mode)."""
    from dataclasses import replace

    prompts = prompts if prompts is not None else build_prompts(processor, task, mode == "think")
    outcomes: List[dict] = []
    for k in range(samples):
        run_cfg = replace(cfg, thinking_budget=budget, seed=cfg.seed + k)
        for start in range(0, len(prompts), batch_size):
            batch = generator.generate(prompts[start : start + batch_size], run_cfg)
            for index, (item, out) in enumerate(
                zip(task.items[start : start + batch_size], batch, strict=True)
            ):
                outcomes.append(
                    {
                        "item": start + index,
                        "correct": score(item.metric, out.answer, item.answer),
                        "thinking_tokens": out.thinking_tokens,
                        "opened": out.thinking is not None,
                    }
                )
            if progress is not None:
                progress(len(batch))
    return summarize(task.name, mode, budget, outcomes)


def load_images(task: Task) -> List[list]:
    """Each item's images, decoded (an image that cannot be is one error naming it)."""
    from lit_bluelm.processor import load_image

    return [[load_image(item.image)] if item.image is not None else [] for item in task.items]


def build_prompts(processor, task: Task, think: bool, images: Optional[List[list]] = None) -> list:
    """The engine's prompts for every item of ``task`` in one mode (``images`` from
    :func:`load_images`, decoded here when not given)."""
    from lit_bluelm.generation import build_prompt

    images = images if images is not None else load_images(task)
    return [
        build_prompt(processor, it.prompt, imgs, think=think)
        for it, imgs in zip(task.items, images, strict=True)
    ]


def write_results(out_dir: str | Path, ckpt: str, settings: Dict, rows: Iterable[Row]) -> Path:
    from dataclasses import asdict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    record = {"ckpt": ckpt, "settings": settings, "results": [asdict(r) for r in rows]}
    return write_json(path, record)


def read_results(path: str | Path) -> tuple:
    """The rows of a ``results.json``: (thinking rows as :class:`Row`, passkey rows as
    :class:`lit_bluelm.needle.PasskeyRow`), told apart by the passkey rows' ``depth``."""
    from lit_bluelm.needle import PasskeyRow

    records = json.loads(Path(path).read_text())["results"]
    return (
        [Row(**r) for r in records if "depth" not in r],
        [PasskeyRow(**r) for r in records if "depth" in r],
    )


def plot(rows: Sequence[Row], path: str | Path) -> Path:
    """Per task: think-mode accuracy against the mean thinking tokens used (one point per
    budget), the no-think accuracy as a marked point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        think = sorted(
            (r for r in rows if r.task == task and r.mode == "think"), key=lambda r: r.mean_thinking_tokens
        )
        if think:
            ax.errorbar(
                [r.mean_thinking_tokens for r in think],
                [r.accuracy for r in think],
                yerr=[r.stderr for r in think],
                marker="o",
                label="think",
            )
            for r in think:
                ax.annotate(
                    "none" if r.budget is None else str(r.budget), (r.mean_thinking_tokens, r.accuracy)
                )
        for r in rows:
            if r.task == task and r.mode == "no_think":
                ax.errorbar(
                    [0], [r.accuracy], yerr=[r.stderr], marker="*", markersize=12, ls="", label="no_think"
                )
        ax.set_title(task)
        ax.set_xlabel("mean thinking tokens")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def table(rows: Sequence[Row]) -> str:
    lines = [
        f"{'task':<14} {'mode':<9} {'budget':>6} {'accuracy':>9} {'stderr':>7} {'n':>5} "
        f"{'think_tok':>9} {'opened':>7} {'in_budget':>9}"
    ]
    for r in rows:
        budget = "-" if r.budget is None else str(r.budget)
        lines.append(
            f"{r.task:<14} {r.mode:<9} {budget:>6} {r.accuracy:>9.3f} {r.stderr:>7.3f} {r.n:>5} "
            f"{r.mean_thinking_tokens:>9.1f} {r.think_open_rate:>7.2f} {r.within_budget:>9.2f}"
        )
    return "\n".join(lines)
