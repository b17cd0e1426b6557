"""The demo pipeline: every stage on the tiny model, each from the last, in one process.

    python -m lit_bluelm.demo [--runs runs/demo] [--from RUN] [--seeds N] [--rl] [key=value ...]

Runs each stage of :data:`STAGES` as ``train.py`` would with the arguments it prints
(``$ python train.py ...``), into ``<runs>/<name>``: a larger stage-1
teacher, the tiny student trained from scratch (the baseline), the student pruned out of the
teacher and distilled, joint pre-training, the reasoning stage, the long-context stage (YaRN,
rows of 4x the original context), the long-context model validated on the reasoning stage's
sources (``long_context_short``: ``trainer.max_steps=0``, no training), SFT, the reward
model (from the SFT checkpoint, on the demo's preference pairs) and GRPO (:data:`RL_STAGE`:
``runs/demo/rl`` from the SFT checkpoint, the open questions scored by the reward run); then it
evaluates the SFT checkpoint (``eval_sft``: every demo task, both modes, budgets 0/8/32/128) and
passkey retrieval before the context switch (``passkey_before``: the reasoning checkpoint,
``extrapolate=true``) and after it (``passkey_after``: the long-context checkpoint), and GRPO's
evaluations (:data:`RL_STAGE_EVALS`: the RL checkpoint like the SFT one, and both sampled). It ends
with the table of ``lit_bluelm.summary`` and the block of claims (:mod:`lit_bluelm.claims`: ``claim ...
target ... measured ... met|missed``), writes ``<runs>/report.md`` (:mod:`lit_bluelm.report`) and
exits 1 when a claim is missed.

``--from RUN`` (a stage name, or its run folder) reruns from that stage on (each rerun stage's
folder is emptied first) and reuses the checkpoints of the runs before it, so a change to a late
stage costs minutes, not the whole pipeline (``--from eval_sft``, or either passkey evaluation,
reruns only the evaluations).
``--seeds N`` (``make demo-seeds``) reruns the stages after the text stage, from ``<runs>/text``,
with ``seed`` and ``data.seed`` set to 1234 + k into ``<runs>_seed<k>`` (k = 1..N), and prints
each claim's mean and min over the seeds; with ``--from RUN`` (a later stage or an evaluation)
each seed's folder is rerun from there on. ``key=value`` arguments are added to every stage
(``trainer.max_steps=2`` for a smoke run; ``data.demo_dir=`` also moves the evaluation's tasks).
``--rl`` (``make demo-rl``, which added GRPO before it joined the pipeline) is accepted and
changes nothing; ``--from rl`` runs only GRPO and the evaluations.
One process keeps Python's start-up (about 12 seconds of imports) out of every stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lit_bluelm.claims import (
    CLAIMS,
    Claim,
    ClaimFns,
    Evidence,
    claims_block,
    format_failures,
    judge,
    over_seeds,
    seeds_block,
)
from lit_bluelm.errors import ConfigError
from lit_bluelm.report import REPORT_JSON, SEEDS_JSON, machine, stamp, write_report
from lit_bluelm.summary import write_json


@dataclass(frozen=True)
class Stage:
    name: str
    args: Tuple[str, ...]  # train.py arguments; {runs} is the runs folder
    trains: bool = True  # False: validation only (VALIDATE_ONLY, after any extra arguments)


VALIDATE_ONLY = ("trainer.max_steps=0", "validate_before_fit=false")  # the weights of init_from, once


def _last(name: str) -> str:
    return f"{{runs}}/{name}/checkpoints/last.ckpt"


# GRPO (stage=rl): from the SFT checkpoint, the open questions scored by the reward run, exact
# match logged beside it
RL_STAGE = Stage(
    "rl",
    (
        "stage=rl",
        f"init_from={_last('sft')}",
        "rewards.model={runs}/reward",
        "rewards.routes.demo_open=[{{fn: reward_model, weight: 1.0}}, {{fn: exact, weight: 0.0}}]",
    ),
)
STAGES: Tuple[Stage, ...] = (
    Stage("text_teacher", ("stage=text", "module=next_token", "model=tiny_teacher")),
    Stage("text_scratch", ("stage=text", "module=next_token")),
    Stage(
        "text", ("stage=text", f"distill.teacher={_last('text_teacher')}", "distill.init_from_teacher=true")
    ),
    Stage("joint", ("stage=joint", "init_from={base}/text/checkpoints/last.ckpt")),
    Stage("reasoning", ("stage=reasoning", f"init_from={_last('joint')}")),
    # rows of 4x the original context (the stage's default is the switched 8x): the demo's
    # share of the 20 minutes
    Stage("long_context", ("stage=long_context", f"init_from={_last('reasoning')}", "data.seq_len=2048")),
    # no training: the long-context model validated on the reasoning stage's sources (the same
    # batches as the reasoning run's), so the claims can compare their losses source by source
    Stage("long_context_short", ("stage=reasoning", f"init_from={_last('long_context')}"), trains=False),
    Stage("sft", ("stage=sft", f"init_from={_last('long_context')}")),
    # the reward model: the SFT model with a scalar head, on held-out preference pairs
    Stage("reward", ("stage=reward", f"init_from={_last('sft')}")),
    RL_STAGE,
)
BETTER = ("text", "text_scratch")  # the distilled student must beat the one trained from scratch
TEXT_STAGES = 3  # STAGES[:3] train the text stage; make demo-seeds reruns the ones after them
EVAL = "eval_sft"  # the SFT checkpoint evaluated on the demo tasks, into <runs>/eval_sft
EVAL_BUDGETS = (0, 8, 32, 128)
# passkey retrieval before the context switch (the reasoning checkpoint, measured beyond its
# context) and after it (the long-context checkpoint), into <runs>/passkey_before|after, at the
# lengths up to the claims' 4x: 8x is a third of an evaluation's time (before the switch it has
# read 0.00; `python -m lit_bluelm.evaluate tasks=[passkey]` measures it by default)
PASSKEY_FACTORS = "passkey_factors=[0.5,1,2,4]"
PASSKEY = {
    "passkey_before": ("reasoning", ("extrapolate=true", PASSKEY_FACTORS)),
    "passkey_after": ("long_context", (PASSKEY_FACTORS,)),
}
# GRPO's evaluations beside the SFT one: name -> (the stage whose checkpoint, more evaluate
# arguments), into <runs>/<name>: the RL checkpoint evaluated like the SFT one (greedy) and both
# sampled (T=1, 4 samples) on think-mode demo_arith at the largest budget
SAMPLED = ("tasks=[demo_arith]", "modes=[think]", "budgets=[128]", "samples=4", "temperature=1.0")
RL_STAGE_EVALS = {
    "eval_rl": ("rl", ()),
    "eval_sft_sampled": ("sft", SAMPLED),
    "eval_rl_sampled": ("rl", SAMPLED),
}
PASSKEY_SETTINGS: Tuple[str, ...] = ()  # more evaluate arguments (none: the task's lengths, depths, trials)
DEFAULT_SEED = 1234  # the config's ``seed`` and ``data.seed``; seed run k uses DEFAULT_SEED + k


@dataclass(frozen=True)
class Plan:
    """What a demo run covers: its stages, its evaluations besides the SFT and passkey ones that
    every run has (name -> (stage, more evaluate arguments)) and the claims it judges."""

    stages: Tuple[Stage, ...]
    evals: Dict[str, Tuple[str, Tuple[str, ...]]]
    claims: ClaimFns

    @property
    def eval_names(self) -> Tuple[str, ...]:
        """Every evaluation: ``--from`` any of them reruns them all (two minutes)."""
        return (EVAL, *PASSKEY, *self.evals)


DEMO = Plan(STAGES, RL_STAGE_EVALS, CLAIMS)  # make demo
DEMO_RL = DEMO  # make demo-rl's plan, before GRPO joined make demo


def eval_argv(runs: str, demo_dir: str, name: str = EVAL) -> List[str]:
    """The ``python -m lit_bluelm.evaluate`` arguments of the demo's evaluation ``name`` (the SFT
    checkpoint's, or one of :data:`RL_STAGE_EVALS`); the last value of a key counts."""
    stage, settings = RL_STAGE_EVALS.get(name, ("sft", ()))
    return [
        f"ckpt={runs}/{stage}/checkpoints/last.ckpt",
        f"out={runs}/{name}",
        f"demo_dir={demo_dir}",
        f"budgets=[{','.join(map(str, EVAL_BUDGETS))}]",
        "batch_size=150",
        *settings,
    ]


def passkey_argv(runs: str, name: str) -> List[str]:
    """The ``python -m lit_bluelm.evaluate`` arguments of the passkey evaluation ``name``."""
    stage, settings = PASSKEY[name]
    return [
        f"ckpt={runs}/{stage}/checkpoints/last.ckpt",
        f"out={runs}/{name}",
        "tasks=[passkey]",
        "batch_size=50",
        *settings,
        *PASSKEY_SETTINGS,  # the last value of a key counts
    ]


def _evaluate(argv: List[str]) -> list:
    from lit_bluelm.evaluate import parse_args, run

    print(f"\n$ python -m lit_bluelm.evaluate {' '.join(argv)}", flush=True)
    return run(parse_args(argv))


def run_eval(runs: str, demo_dir: str) -> list:
    """Evaluate ``<runs>/sft`` on every demo task, both modes, the demo budgets; its rows."""
    return _evaluate(eval_argv(runs, demo_dir))


def run_evals(
    runs: str, demo_dir: str, seconds: Dict[str, float], plan: Plan = DEMO
) -> Tuple[list, dict, dict]:
    """The evaluations of ``plan``: the SFT rows, the passkey rows by "before" / "after" and the
    rows of ``plan.evals`` by name; the time of each goes into ``seconds``."""
    passkey, evals = {}, {}
    began = time.time()
    rows = run_eval(runs, demo_dir)
    seconds[EVAL] = time.time() - began
    for name in PASSKEY:
        began = time.time()
        passkey[name.split("_", 1)[1]] = _evaluate(passkey_argv(runs, name))
        seconds[name] = time.time() - began
    for name in plan.evals:
        began = time.time()
        evals[name] = _evaluate(eval_argv(runs, demo_dir, name))
        seconds[name] = time.time() - began
    for name in plan.eval_names:
        print(f"{name}: {seconds[name]:.0f}s", flush=True)
    return rows, passkey, evals


def stage_argv(stage: Stage, runs: str, extra: Sequence[str] = (), base: Optional[str] = None) -> List[str]:
    """``train.py`` arguments of ``stage`` in ``runs``; ``{base}`` (the text stage's folder,
    ``runs`` itself unless given) is where the joint stage starts from."""
    args = [a.format(runs=runs, base=base or runs) for a in stage.args]
    return args + [f"run_dir={runs}/{stage.name}", *extra, *(() if stage.trains else VALIDATE_ONLY)]


def first_stage(start: Optional[str], runs: str, skip: int = 0, plan: Plan = DEMO) -> int:
    """The index of the stage of ``plan`` that ``--from`` names; the runs before it (from
    ``plan.stages[skip]`` on: a seed's folder holds the stages after the text stage) must have
    finished."""
    if not start:
        return 0
    name = Path(start).name
    names = [s.name for s in plan.stages] + list(plan.eval_names)
    if name not in names:
        raise ConfigError(f"--from: unknown run '{start}'; valid: {', '.join(names)}")
    index = names.index(name)
    for stage in plan.stages[skip : min(index, len(plan.stages))]:
        ckpt = Path(runs) / stage.name / "checkpoints" / "last.ckpt"
        summary = Path(runs) / stage.name / "summary.json"
        if not summary.is_file() or (stage.trains and not ckpt.exists()):
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


def run_stages(stages: Sequence[Stage], runs: str, extra: Sequence[str], base: Optional[str] = None):
    """Train ``stages`` in order, each as ``train.py`` would; (seconds by stage, exit code or 0).
    The pipeline stops at a stage that did not end ok: the next must not start from it."""
    from lit_bluelm.config import load_config
    from lit_bluelm.status import EXIT_CODES
    from lit_bluelm.trainer import fit_stage

    seconds: Dict[str, float] = {}
    for stage in stages:
        stage_args = stage_argv(stage, runs, extra, base)
        print(f"\n$ python train.py {' '.join(stage_args)}", flush=True)
        shutil.rmtree(Path(runs) / stage.name, ignore_errors=True)  # a rerun starts clean
        began = time.time()
        status = fit_stage(load_config(stage_args))["status"]  # what train.py runs
        seconds[stage.name] = time.time() - began
        print(f"{stage.name}: {seconds[stage.name]:.0f}s", flush=True)
        if status != "ok":
            print(
                f"error: stage {stage.name} ended with status={status}; the pipeline stops here "
                f"(rerun it with `make demo FROM={stage.name}`)",
                file=sys.stderr,
                flush=True,
            )
            return seconds, EXIT_CODES[status]
    return seconds, 0


def evidence(runs: str, stages: Sequence[Stage], rows: list, passkey: dict, evals: dict) -> Evidence:
    from lit_bluelm.summary import load_summary

    summaries = {s.name: load_summary(f"{runs}/{s.name}") for s in stages}
    return Evidence(summaries, list(rows), dict(passkey), dict(evals))


def report_claims(claims: Sequence[Claim], rows: list) -> None:
    for line in format_failures(rows):
        print(f"error: {line}", file=sys.stderr)
    print("\n" + claims_block(claims), flush=True)


def pipeline(runs: str, start: int, overrides: Sequence[str], demo_dir: str, plan: Plan = DEMO) -> int:
    """``make demo``: the stages of ``plan`` from ``start``
    on, the evaluations, the table, the claims and ``<runs>/report.md``; 0 when every claim is
    met, 1 when one is missed."""
    from lit_bluelm.summary import check_better, print_table

    previous = Path(runs) / REPORT_JSON  # the times of stages that --from does not rerun
    seconds = json.loads(previous.read_text()).get("seconds", {}) if start and previous.is_file() else {}
    ran, code = run_stages(plan.stages[start:], runs, overrides)
    seconds.update(ran)
    if code:
        return code
    rows, passkey, evals = run_evals(runs, demo_dir, seconds, plan)
    print()
    print_table([f"{runs}/{s.name}" for s in plan.stages])
    check_better(*(f"{runs}/{name}" for name in BETTER))
    claims = judge(evidence(runs, plan.stages, rows, passkey, evals), plan.claims)
    report_claims(claims, rows)
    record = {
        **stamp(),
        "machine": machine(),
        "runs": [f"{runs}/{s.name}" for s in plan.stages],
        "eval": f"{runs}/{EVAL}",
        "passkey": {name: f"{runs}/{name}" for name in PASSKEY},
        "evals": {name: f"{runs}/{name}" for name in plan.evals},
        "seconds": {name: round(sec, 1) for name, sec in seconds.items()},
        "claims": [asdict(c) for c in claims],
    }
    write_json(Path(runs) / REPORT_JSON, record)
    print(f"report={write_report(runs)}")
    return 0 if all(c.met for c in claims) else 1


def seed_runs(
    runs: str, n: int, overrides: Sequence[str], demo_dir: str, start: Optional[str] = None, plan: Plan = DEMO
) -> int:
    """``make demo-seeds``: the stages after the text stage (started from ``<runs>/text``, trained
    first when it has not finished) with ``n`` seeds into ``<runs>_seed<k>``; the claims of each
    seed, then each claim's mean and min over the seeds. 0 when every claim is met. ``start`` (a
    stage after the text stage, or an evaluation) reruns each seed's folder from there on,
    reusing its earlier runs, which must have finished."""
    folders = [f"{runs}_seed{k}" for k in range(1, n + 1)]
    if start:
        # refuses before any work
        first = [first_stage(start, folder, TEXT_STAGES, plan) for folder in folders]
        if min(first) < TEXT_STAGES:
            raise ConfigError(f"--seeds --from {start}: the seeds rerun the stages after the text stage")
    else:
        first = [TEXT_STAGES] * n
        try:
            first_stage(plan.stages[TEXT_STAGES].name, runs, plan=plan)
        except ConfigError:
            _, code = run_stages(plan.stages[:TEXT_STAGES], runs, overrides)
            if code:
                return code
    began_all = time.time()
    seeds = [DEFAULT_SEED + k for k in range(1, n + 1)]
    per_seed: List[Evidence] = []
    for k, seed in enumerate(seeds, start=1):
        folder = folders[k - 1]
        extra = [*overrides, f"seed={seed}", f"data.seed={seed}"]
        _, code = run_stages(plan.stages[first[k - 1] :], folder, extra, base=runs)
        if code:
            return code
        ev = evidence(folder, plan.stages[TEXT_STAGES:], *run_evals(folder, demo_dir, {}, plan))
        per_seed.append(ev)
        print(f"\nseed {seed} ({folder}):")
        report_claims(judge(ev, plan.claims), ev.rows)
    claims = over_seeds(per_seed, plan.claims)
    print("\n" + seeds_block(claims, seeds), flush=True)
    record = {
        **stamp(),
        "seeds": seeds,
        "from": start,  # --from: the stage (or evaluation) each seed's folder was rerun from
        "folders": folders,
        "seconds": round(time.time() - began_all, 1),
        "claims": [asdict(c) for c in claims],
        "per_seed": [[asdict(c) for c in judge(ev, plan.claims)] for ev in per_seed],
    }
    write_json(Path(runs) / SEEDS_JSON, record)
    if (Path(runs) / REPORT_JSON).is_file():
        print(f"report={write_report(runs)}")
    return 0 if all(c.met for c in claims) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="runs/demo", help="folder of the runs (default: runs/demo)")
    parser.add_argument("--from", dest="start", metavar="RUN", help="rerun from this stage on")
    parser.add_argument(
        "--seeds", type=int, metavar="N", help="rerun the stages after the text stage with N seeds"
    )
    parser.add_argument(
        "--rl", action="store_true", help="no effect: GRPO is in the pipeline (kept for make demo-rl)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="added to every stage")
    args = parser.parse_args(argv)
    runs = args.runs.rstrip("/")
    demo_dir = next(
        (a.split("=", 1)[1] for a in args.overrides if a.startswith("data.demo_dir=")), "data/demo"
    )
    plan = DEMO
    try:
        if args.seeds is not None:
            if args.seeds < 1:
                raise ConfigError("--seeds: a number >= 1")
            return seed_runs(runs, args.seeds, args.overrides, demo_dir, args.start, plan)
        return pipeline(runs, first_stage(args.start, runs, plan=plan), args.overrides, demo_dir, plan)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
