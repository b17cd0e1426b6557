"""Shared fixtures: a small demo dataset (written once per session) and config overrides for it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # train.py lives at the repository root
    sys.path.insert(0, str(ROOT))

from datamodules.demo import DemoSpec, write_demo  # noqa: E402

SMALL = DemoSpec(train_shards=4, val_shards=2, train_per_shard=48, val_per_shard=16, vocab_size=1024)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("data") / "demo", SMALL)


def data_args(root: Path) -> List[str]:
    """Overrides that point the joint stage at a demo folder."""
    t, v = SMALL.train_shards - 1, SMALL.val_shards - 1
    args = [f"tokenizer.path={root}/tokenizer", f"data.demo_dir={root}"]
    for name in ("image_text", "text"):
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
    t, v = SMALL.train_shards - 1, SMALL.val_shards - 1
    data = [
        "stage=text",
        f"tokenizer.path={root}/tokenizer",
        f"data.demo_dir={root}",
        f"data.sources.text.train={root}/train/text-{{000000..{t:06d}}}.tar",
        f"data.sources.text.val={root}/val/text-{{000000..{v:06d}}}.tar",
    ]
    return data + run_args(run_dir, *extra)
