"""Helpers shared by the tests (no test file imports another): config arguments for fast tiny
runs, reading TensorBoard scalars, and running train.py in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.demo import DemoSpec

ROOT = Path(__file__).resolve().parent.parent
SMALL = DemoSpec(train_shards=4, val_shards=2, train_per_shard=48, val_per_shard=16, vocab_size=1024)


def data_args(root: Path, sources=("image_text", "text")) -> List[str]:
    """Overrides that point a stage's ``sources`` (the joint stage's by default) at a demo folder."""
    t, v = SMALL.train_shards - 1, SMALL.val_shards - 1
    args = [f"tokenizer.path={root}/tokenizer", f"data.demo_dir={root}"]
    for name in sources:
        args += [
            f"data.sources.{name}.train={root}/train/{name}-{{000000..{t:06d}}}.tar",
            f"data.sources.{name}.val={root}/val/{name}-{{000000..{v:06d}}}.tar",
        ]
    return args


def run_args(run_dir: Path, *extra: str) -> List[str]:
    """A fast tiny run: small batches, 1 loader worker, no progress bar."""
    return [
        f"run_dir={run_dir}",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.seq_len=128",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        *extra,
    ]


def tiny_args(root: Path, run_dir: Path, *extra: str) -> List[str]:
    """A fast tiny joint run on a demo folder."""
    return data_args(root) + run_args(run_dir, *extra)


def text_args(root: Path, run_dir: Path, *extra: str) -> List[str]:
    """A fast tiny text (stage 1) run on a demo folder."""
    return ["stage=text", *data_args(root, ("text",))] + run_args(run_dir, *extra)


def reward_args(root: Path, run_dir: Path, *extra: str) -> List[str]:
    """A fast tiny reward-model run on a demo folder's preference pairs (from random init)."""
    from datamodules.demo_tasks import PAIR_TYPES

    data = ["stage=reward", *data_args(root, PAIR_TYPES), "data.val_batch_size=4"]
    return data + run_args(run_dir, "data.seq_len=256", *extra)


def rl_args(root: Path, run_dir: Path, *extra: str) -> List[str]:
    """A fast tiny GRPO run on a demo folder's RL prompts (from random init): 2 prompts x 2
    completions of at most 8 tokens a step, rules scored in one worker."""
    from datamodules.demo_tasks import RL_SOURCES

    data = ["stage=rl", *data_args(root, RL_SOURCES), "data.val_batch_size=2"]
    rl = ["rl.num_generations=2", "rl.max_new_tokens=8", "rl.thinking_budget=4", "rl.val_samples=2"]
    return data + rl + run_args(run_dir, "data.batch_size=2", "data.seq_len=192", "rewards.workers=1", *extra)


def assert_refused(args: List[str], message: str, capsys) -> str:
    """``train.py ARGS`` is refused at start-up: exit 2 with ``message`` in its one error line
    (returned, the whole stderr)."""
    import train

    assert train.main(args) == 2, args
    err = capsys.readouterr().err
    assert message in err, (args, err)
    return err


def png_bytes(size=(224, 112), color=(0, 128, 255)) -> bytes:
    """A solid-colour PNG image file's bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def scalars(run_dir: Path) -> Dict[str, list]:
    """Every TensorBoard scalar of a run: tag -> [(step, value), ...]. The event files are read
    as one log, as TensorBoard does, so a resumed run's purge of steps past its checkpoint holds."""
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train_subprocess(
    args: List[str], timeout: int = 300, script: str = "train.py", **env_vars: str
) -> Dict[str, str]:
    """``python SCRIPT ARGS`` (``train.py``, or ``bench/fault_child.py`` with its ``FAULT_*``
    variables in ``env_vars``) in a fresh process; returns its ``key=value`` output lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env_vars)
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and " " not in line)
