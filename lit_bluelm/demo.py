"""The demo pipeline: every stage on the tiny model, each from the last, in one process.

    python -m lit_bluelm.demo [--runs runs/demo] [--from RUN] [key=value ...]

Runs each stage of :data:`STAGES` as ``train.py`` would with the arguments it prints
(``$ python train.py ...``), into ``<runs>/<name>``: a larger stage-1
teacher, the tiny student trained from scratch (the baseline), the student pruned out of the
teacher and distilled, joint pre-training, the reasoning stage and SFT; then it evaluates the SFT
checkpoint (``eval_sft``: every demo task, both modes, budgets 0/8/32/128) and prints the
accuracy targets. It ends with the table of ``lit_bluelm.summary`` and exits 1 unless the
distilled student beats the one trained from scratch and the evaluation meets its deterministic
targets (think mode opens ``<think>`` on >= 95% of replies, no-think on <= 5%, every reply within
its budget).

``--from RUN`` (a stage name, or its run folder) reruns from that stage on (each rerun stage's
folder is emptied first) and reuses the checkpoints of the runs before it, so a change to a late
stage costs minutes, not the whole pipeline (``--from eval_sft`` reruns only the evaluation).
``key=value`` arguments are added to every stage (``trainer.max_steps=2`` for a smoke run;
``data.demo_dir=`` also moves the evaluation's tasks). One process keeps Python's start-up (about
12 seconds of imports) out of every stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from lit_bluelm.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    args: Tuple[str, ...]  # train.py arguments; {runs} is the runs folder


def _last(name: str) -> str:
    return f"{{runs}}/{name}/checkpoints/last.ckpt"


STAGES: Tuple[Stage, ...] = (
    Stage("text_teacher", ("stage=text", "module=next_token", "model=tiny_teacher")),
    Stage("text_scratch", ("stage=text", "module=next_token")),
    Stage(
        "text", ("stage=text", f"distill.teacher={_last('text_teacher')}", "distill.init_from_teacher=true")
    ),
    Stage("joint", ("stage=joint", f"init_from={_last('text')}")),
    Stage("reasoning", ("stage=reasoning", f"init_from={_last('joint')}")),
    Stage("sft", ("stage=sft", f"init_from={_last('reasoning')}")),
)
BETTER = ("text", "text_scratch")  # the distilled student must beat the one trained from scratch
EVAL = "eval_sft"  # the SFT checkpoint evaluated on the demo tasks, into <runs>/eval_sft
EVAL_BUDGETS = (0, 8, 32, 128)
EVAL_TASK = "demo_arith"  # where the accuracy targets are stated
TARGET_GAIN = 0.10  # think mode at the largest budget over no-think, and over think at budget 0


def eval_failures(rows) -> List[str]:
    """The deterministic targets a demo evaluation must meet (each failure as a line)."""
    failures = []
    for r in rows:
        where = f"{r.task} {r.mode} budget={r.budget}"
        if r.mode == "think" and r.think_open_rate < 0.95:
            failures.append(f"{where}: think_open_rate {r.think_open_rate:.3f} < 0.95")
        if r.mode == "no_think" and r.think_open_rate > 0.05:
            failures.append(f"{where}: think_open_rate {r.think_open_rate:.3f} > 0.05")
        if r.within_budget != 1.0:
            failures.append(f"{where}: within_budget {r.within_budget:.3f} != 1.0")
    return failures


def accuracy_targets(rows) -> List[Tuple[str, float, float, bool]]:
    """The accuracy targets on ``EVAL_TASK``: (name, gain, its standard error, met)."""
    task = [r for r in rows if r.task == EVAL_TASK]
    think = {r.budget: r for r in task if r.mode == "think"}
    plain = next((r for r in task if r.mode == "no_think"), None)
    top = think.get(max(EVAL_BUDGETS))
    out = []
    for name, base in (("over no_think", plain), ("over think budget 0", think.get(0))):
        if top is not None and base is not None:
            gain = top.accuracy - base.accuracy
            stderr = (top.stderr**2 + base.stderr**2) ** 0.5
            out.append((f"{EVAL_TASK} think@{max(EVAL_BUDGETS)} {name}", gain, stderr, gain >= TARGET_GAIN))
    return out


def eval_argv(runs: str, demo_dir: str) -> List[str]:
    """The ``python -m lit_bluelm.evaluate`` arguments of the demo's evaluation."""
    return [
        f"ckpt={runs}/sft/checkpoints/last.ckpt",
        f"out={runs}/{EVAL}",
        f"demo_dir={demo_dir}",
        f"budgets=[{','.join(map(str, EVAL_BUDGETS))}]",
        "batch_size=150",
    ]


def run_eval(argv: Sequence[str]) -> bool:
    """Evaluate the SFT checkpoint on every demo task, both modes, the demo budgets; print the
    targets. False when a deterministic target fails (the accuracy targets are reported)."""
    from lit_bluelm.evaluate import parse_args, run

    rows = run(parse_args(argv))
    for name, gain, stderr, met in accuracy_targets(rows):
        print(
            f"accuracy target {name}: {gain:+.3f} (stderr {stderr:.3f}), target >= {TARGET_GAIN}: {'met' if met else 'NOT met'}"
        )
    failures = eval_failures(rows)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return not failures


def stage_argv(stage: Stage, runs: str, extra: Sequence[str] = ()) -> List[str]:
    return [a.format(runs=runs) for a in stage.args] + [f"run_dir={runs}/{stage.name}", *extra]


def first_stage(start: Optional[str], runs: str) -> int:
    """The index of the stage ``--from`` names; the runs before it must have finished."""
    if not start:
        return 0
    name = Path(start).name
    names = [s.name for s in STAGES] + [EVAL]
    if name not in names:
        raise ConfigError(f"--from: unknown run '{start}'; valid: {', '.join(names)}")
    index = names.index(name)
    for stage in STAGES[: min(index, len(STAGES))]:
        ckpt = Path(runs) / stage.name / "checkpoints" / "last.ckpt"
        summary = Path(runs) / stage.name / "summary.json"
        if not summary.is_file() or not ckpt.exists():
            raise ConfigError(
                f"--from {name} reuses {Path(runs) / stage.name}, which has not finished "
                f"(no summary.json or {ckpt}); run the whole demo first"
            )
        status = json.loads(summary.read_text()).get("status", "ok")  # older summaries: finished
        if status != "ok":
            raise ConfigError(
                f"--from {name} reuses {Path(runs) / stage.name}, which ended with "
                f"status={status}; rerun from {stage.name}"
            )
    return index


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="runs/demo", help="folder of the runs (default: runs/demo)")
    parser.add_argument("--from", dest="start", metavar="RUN", help="rerun from this stage on")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="added to every stage")
    args = parser.parse_args(argv)

    from lit_bluelm.config import load_config
    from lit_bluelm.status import EXIT_CODES
    from lit_bluelm.summary import check_better, print_table
    from lit_bluelm.trainer import fit_stage

    runs = args.runs.rstrip("/")
    try:
        start = first_stage(args.start, runs)
        for stage in STAGES[start:]:
            stage_args = stage_argv(stage, runs, args.overrides)
            print(f"\n$ python train.py {' '.join(stage_args)}", flush=True)
            shutil.rmtree(Path(runs) / stage.name, ignore_errors=True)  # a rerun starts clean
            began = time.time()
            status = fit_stage(load_config(stage_args))["status"]  # what train.py runs
            print(f"{stage.name}: {time.time() - began:.0f}s", flush=True)
            if status != "ok":  # the next stage must not start from a stopped one
                print(
                    f"error: stage {stage.name} ended with status={status}; the pipeline stops here "
                    f"(rerun it with `make demo FROM={stage.name}`)",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_CODES[status]
        demo_dir = next(
            (a.split("=", 1)[1] for a in args.overrides if a.startswith("data.demo_dir=")), "data/demo"
        )
        argv_eval = eval_argv(runs, demo_dir)
        print(f"\n$ python -m lit_bluelm.evaluate {' '.join(argv_eval)}", flush=True)
        began = time.time()
        evaluated = run_eval(argv_eval)
        print(f"{EVAL}: {time.time() - began:.0f}s", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print_table([f"{runs}/{s.name}" for s in STAGES])
    better = check_better(*(f"{runs}/{name}" for name in BETTER))
    return 0 if better and evaluated else 1


if __name__ == "__main__":
    sys.exit(main())
