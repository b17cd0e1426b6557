"""Evaluate a trained run: thinking vs non-thinking across thinking budgets, and passkey
retrieval across lengths.

    python -m lit_bluelm.evaluate ckpt=<ckpt> tasks=[demo_arith,demo_count,path/to/mine.jsonl]
        modes=[think,no_think] budgets=[0,8,32,128] out=<dir> [samples=1] [temperature=0]
        [seed=0] [batch_size=64] [max_new_tokens=256] [max_answer_tokens=16] [device=cpu]
        [demo_dir=data/demo]
    python -m lit_bluelm.evaluate ckpt=<ckpt> tasks=[passkey] out=<dir>
        [passkey_factors=[0.5,1,2,4,8]] [passkey_depths=[0,0.25,0.5,0.75,1]] [passkey_trials=20]
        [extrapolate=false]

Runs the generation engine over every item of every task, once per (mode, budget) (think mode:
each budget, ``null`` for no limit; no-think: one row), with a progress bar; prints a table and
writes ``<out>/results.json`` (``{"ckpt", "settings", "results": [rows]}``, a row per (task,
mode, budget) with ``accuracy`` and ``stderr`` as fractions, ``n``, ``mean_thinking_tokens``,
``think_open_rate``, ``within_budget``) and ``<out>/accuracy_vs_budget.png``. Greedy by default;
``samples=k`` with a temperature averages sampled pass@1 over k seeds. Bad input is one line and
exit 2.

``passkey`` is the needle-in-a-haystack task (:mod:`lit_bluelm.needle`): a completion-style
prompt of ``length`` tokens (``passkey_factors`` x the model's original context) with a passkey
at each of ``passkey_depths``, ``passkey_trials`` seeded prompts per cell, greedy, exact match.
Its rows (``task``, ``length``, ``length_factor``, ``depth``, ``accuracy``, ``n``) join
``results.json``; it prints a table by length and depth and writes ``<out>/passkey_heatmap.png``.
A length beyond the model's context (``max_position_embeddings``) is refused unless
``extrapolate=true``, which measures a model there anyway (a model before its context switch).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from lit_bluelm.cli import parse_key_values, run_main
from lit_bluelm.errors import ConfigError
from lit_bluelm.evaluation import DEMO_TASKS, MODES
from lit_bluelm.needle import DEPTHS, FACTORS
from lit_bluelm.needle import TASK as PASSKEY

TEXT_KEYS = ("ckpt", "out", "device", "demo_dir")


@dataclass
class EvaluateArgs:
    ckpt: Optional[str] = None
    tasks: List[str] = field(default_factory=lambda: list(DEMO_TASKS))
    modes: List[str] = field(default_factory=lambda: list(MODES))
    budgets: List[Optional[int]] = field(default_factory=lambda: [0, 8, 32, 128])
    out: Optional[str] = None
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64
    max_new_tokens: int = 256
    max_answer_tokens: Optional[int] = 16
    device: str = "cpu"
    demo_dir: str = "data/demo"
    passkey_factors: List[float] = field(default_factory=lambda: list(FACTORS))
    passkey_depths: List[float] = field(default_factory=lambda: list(DEPTHS))
    passkey_trials: int = 20
    extrapolate: bool = False  # passkey: measure lengths beyond the model's context


def parse_args(argv: Sequence[str]) -> EvaluateArgs:
    args = parse_key_values(EvaluateArgs, argv, TEXT_KEYS)
    if not args.ckpt or not args.out:
        raise ConfigError("ckpt=<checkpoint> and out=<dir> are required")
    if args.samples < 1 or args.batch_size < 1:
        raise ConfigError("samples and batch_size must be >= 1")
    if args.samples > 1 and args.temperature == 0:
        raise ConfigError("samples > 1 needs temperature > 0 (greedy repeats itself)")
    if any(b is not None and b < 0 for b in args.budgets):
        raise ConfigError(f"budgets must be >= 0 (or null for no limit), got {args.budgets}")
    if not args.tasks:
        raise ConfigError("tasks: give at least one task")
    if PASSKEY in args.tasks:
        if args.passkey_trials < 1:
            raise ConfigError(f"passkey_trials must be >= 1, got {args.passkey_trials}")
        if not args.passkey_factors or any(not f > 0 for f in args.passkey_factors):
            raise ConfigError(
                f"passkey_factors: lengths as multiples > 0 of the context, got {args.passkey_factors}"
            )
        if not args.passkey_depths or any(not 0 <= d <= 1 for d in args.passkey_depths):
            raise ConfigError(f"passkey_depths: fractions in [0, 1], got {args.passkey_depths}")
    return args


def run(args: EvaluateArgs):
    from dataclasses import asdict
    from pathlib import Path

    from tqdm import tqdm

    from lit_bluelm.checkpoint import load_run
    from lit_bluelm.evaluation import (
        build_prompts,
        evaluate_task,
        load_images,
        load_task,
        plot,
        settings_grid,
        table,
        write_results,
    )
    from lit_bluelm.generation import GenerationConfig, Generator
    from lit_bluelm.processor import BlueLMProcessor

    grid = settings_grid(args.modes, args.budgets)
    gen_cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_answer_tokens=args.max_answer_tokens,
    )
    gen_cfg.check()  # settings are checked before any task is read
    tasks = [load_task(t, args.demo_dir) for t in args.tasks if t != PASSKEY]
    images = {task.name: load_images(task) for task in tasks}  # decoded once, before any work
    loaded = load_run(args.ckpt, key="ckpt")
    cfg = loaded.config
    if cfg.model.text_only and any(it.image is not None for t in tasks for it in t.items):
        raise ConfigError(f"tasks: '{args.ckpt}' is a text-only model but a task has images")
    processor = BlueLMProcessor.from_config(loaded.tokenizer, cfg.model, cfg.sft.think_token_position)
    generator = Generator(loaded.model.to(args.device), loaded.tokenizer)
    passkey_rows = run_passkey(args, loaded) if PASSKEY in args.tasks else []
    total = sum(len(t.items) for t in tasks) * len(grid) * args.samples
    rows = []
    with tqdm(total=total, desc="evaluate", unit="reply", disable=not tasks) as bar:
        for task in tasks:
            prompts = {
                mode: build_prompts(processor, task, mode == "think", images[task.name]) for mode, _ in grid
            }
            for mode, budget in grid:
                bar.set_postfix_str(f"{task.name} {mode} {budget}")
                rows.append(
                    evaluate_task(
                        generator,
                        processor,
                        task,
                        mode,
                        budget,
                        gen_cfg,
                        args.samples,
                        args.batch_size,
                        bar.update,
                        prompts[mode],
                    )
                )
    settings = {k: v for k, v in asdict(args).items() if k not in ("ckpt", "out")}
    results = write_results(args.out, str(args.ckpt), settings, [*rows, *passkey_rows])
    if rows:
        plot(rows, Path(args.out) / "accuracy_vs_budget.png")
        print(table(rows))
    if passkey_rows:
        from lit_bluelm import needle

        needle.heatmap(passkey_rows, Path(args.out) / "passkey_heatmap.png", f"passkey: {args.ckpt}")
        print(needle.table(passkey_rows))
    print(f"results={results}")
    return [*rows, *passkey_rows]


def run_passkey(args: EvaluateArgs, loaded) -> list:
    """The passkey cells of ``args`` on a loaded run; a length beyond the model's context is
    refused unless ``extrapolate``."""
    from tqdm import tqdm

    from lit_bluelm import needle
    from lit_bluelm.generation import Generator
    from lit_bluelm.models.llm import original_context

    llm_cfg = loaded.model.llm.config
    original, context = original_context(llm_cfg), int(llm_cfg.max_position_embeddings)
    longest = max(needle.lengths_for(original, args.passkey_factors))
    if longest > context and not args.extrapolate:
        raise ConfigError(
            f"passkey: a length of {longest} tokens exceeds the model's context of {context}; "
            "pass extrapolate=true to measure it there anyway"
        )
    generator = Generator(loaded.model.to(args.device), loaded.tokenizer, max_length=max(longest, context))
    cells = len(args.passkey_factors) * len(args.passkey_depths)
    with tqdm(total=cells * args.passkey_trials, desc="passkey", unit="prompt") as bar:
        return needle.evaluate_passkey(
            generator,
            loaded.tokenizer,
            original,
            args.passkey_factors,
            args.passkey_depths,
            args.passkey_trials,
            args.seed,
            args.batch_size,
            bar.update,
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body(argv: list) -> None:
        run(parse_args(argv))

    return run_main(body, lambda: __doc__.strip(), argv)


if __name__ == "__main__":
    sys.exit(main())
