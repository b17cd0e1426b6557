"""The demo pipeline: every stage on the tiny model, each from the last, in one process.

    python -m lit_bluelm.demo [--runs runs/demo] [--from RUN] [key=value ...]

Runs each stage of :data:`STAGES` as ``train.py`` would with
the arguments it prints (``$ python train.py ...``), into ``<runs>/<name>``: a larger stage-1
teacher, the tiny student trained from scratch (the baseline), the student pruned out of the
teacher and distilled, joint pre-training, the reasoning stage and SFT. It ends with the table of
``lit_bluelm.summary`` and exits 1 unless the distilled student beats the one trained from
scratch.

``--from RUN`` (a stage name, or its run folder) reruns from that stage on (each rerun stage's
folder is emptied first) and reuses the checkpoints of the runs before it, so a change to a late
stage costs minutes, not the whole pipeline. ``key=value`` arguments are added to every stage (``trainer.max_steps=2`` for a smoke
run). One process keeps Python's start-up (about 12 seconds of imports) out of every stage.
"""

from __future__ import annotations

import argparse
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


def stage_argv(stage: Stage, runs: str, extra: Sequence[str] = ()) -> List[str]:
    return [a.format(runs=runs) for a in stage.args] + [f"run_dir={runs}/{stage.name}", *extra]


def first_stage(start: Optional[str], runs: str) -> int:
    """The index of the stage ``--from`` names; the runs before it must have finished."""
    if not start:
        return 0
    name = Path(start).name
    names = [s.name for s in STAGES]
    if name not in names:
        raise ConfigError(f"--from: unknown run '{start}'; valid: {', '.join(names)}")
    index = names.index(name)
    for stage in STAGES[:index]:
        ckpt = Path(runs) / stage.name / "checkpoints" / "last.ckpt"
        if not (Path(runs) / stage.name / "summary.json").is_file() or not ckpt.exists():
            raise ConfigError(
                f"--from {name} reuses {Path(runs) / stage.name}, which has not finished "
                f"(no summary.json or {ckpt}); run the whole demo first"
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
            fit_stage(load_config(stage_args))  # what train.py runs
            print(f"{stage.name}: {time.time() - began:.0f}s", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print_table([f"{runs}/{s.name}" for s in STAGES])
    return 0 if check_better(*(f"{runs}/{name}" for name in BETTER)) else 1


if __name__ == "__main__":
    sys.exit(main())
