"""Lightning's overhead on the tiny joint stage, measured side by side in one run.

    python bench/train_overhead.py [--steps 50] [--warmup 5] [--repeats 4] [key=value ...]

Both loops train the same model (same seed, same init) on the same pre-loaded batches with the
same optimizer, schedule, loss and gradient clipping:
  * lightning: ``NextTokenModule`` under the Trainer that ``train.py`` builds (callbacks, logger,
    progress bar; validation and periodic checkpoints pushed past the timed steps);
  * raw: a plain PyTorch loop over ``BlueLM``.
Step time is the interval between consecutive batch starts. Each loop runs ``--repeats`` times,
interleaved; for every step after the warm-up the fastest of its repeats counts (this machine's
noise comes in bursts, while periodic work such as logging recurs at the same step in every
repeat, so it stays in), and the sums of those per-step times are compared.
The last line is ``train_overhead=<lightning_time / raw_time>`` (target <= 1.05).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from datamodules.datamodule import BlueLMDataModule  # noqa: E402
from datamodules.demo import ensure_demo_data  # noqa: E402
from lit_bluelm.config import load_config, to_container  # noqa: E402
from lit_bluelm.models import build_model  # noqa: E402
from lit_bluelm.modules import NextTokenModule  # noqa: E402
from lit_bluelm.modules.optim import build_optimizer  # noqa: E402
from lit_bluelm.objectives import Chunking, next_token_head_loss  # noqa: E402
from lit_bluelm.trainer import attach_tokenizer, build_trainer, quiet_known_warnings  # noqa: E402


class Replay(IterableDataset):
    """Yields pre-loaded batches (fresh dict copies: hooks may pop keys)."""

    def __init__(self, batches: List[Dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self):
        for batch in self.batches:
            yield dict(batch)


def _as_is(batch: Dict[str, Any]) -> Dict[str, Any]:
    return batch


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.starts: List[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())


def step_times(starts: List[float], warmup: int) -> List[float]:
    return [b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1 :], strict=True)]


def run_lightning(cfg, batches, warmup: int, datamodule=None) -> List[float]:
    torch.manual_seed(cfg.seed)
    module = NextTokenModule(to_container(cfg))
    trainer = build_trainer(cfg, NextTokenModule)
    clock = StepClock()
    trainer.callbacks.insert(0, clock)
    # the batches are already collated: hand them over as they are (the default per-item
    # conversion would walk every nested field, which a real collating loader never does);
    # the datamodule's own bookkeeping hooks still run on every batch
    loader = DataLoader(Replay(batches), batch_size=None, collate_fn=_as_is)
    datamodule.train_dataloader = lambda: loader
    datamodule.val_dataloader = lambda: []
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == len(batches)
    return step_times(clock.starts, warmup)


def run_raw(cfg, batches, warmup: int) -> List[float]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.context)
    model.train()
    optimizer, schedule = build_optimizer(model, cfg.optim, cfg.trainer.max_steps)
    starts = []
    for batch in batches:
        starts.append(time.perf_counter())
        head_fn = next_token_head_loss(batch["labels"], Chunking.of(cfg.loss))
        loss = model(batch["input_ids"], pixel_values=batch["pixel_values"], head_fn=head_fn).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # Lightning reads the loss back for its progress bar and logs
    starts.append(time.perf_counter())
    return step_times(starts, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    args, overrides = parser.parse_known_args()

    cfg = load_config(
        [
            f"run_dir={ROOT / 'runs' / 'bench_overhead'}",
            f"trainer.max_steps={args.steps}",
            f"trainer.val_check_interval={args.steps + 1}",
            "trainer.limit_val_batches=0",
            "trainer.accelerator=cpu",
            "validate_before_fit=false",
            "data.num_workers=0",
            # the joint stage's batch before the demo recipes were halved: Lightning's cost per
            # step is fixed (about 11-15 ms here), so its ratio grows as steps shrink (1.10 at 8)
            "data.batch_size=16",
            *overrides,
        ]
    )
    ensure_demo_data(cfg)
    datamodule = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, datamodule.tokenizer)
    quiet_known_warnings()
    stream = iter(datamodule.train_dataloader())
    batches = [next(stream) for _ in range(args.steps)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(
        f"steps={args.steps} warmup={args.warmup} batch_size={cfg.data.batch_size} "
        f"tokens={tokens} threads={torch.get_num_threads()}"
    )

    results: Dict[str, List[List[float]]] = {"raw": [], "lightning": []}
    for rep in range(args.repeats):
        lightning = functools.partial(run_lightning, datamodule=datamodule)
        for name, fn in (("raw", run_raw), ("lightning", lightning)):
            times = fn(cfg, batches, args.warmup)
            results[name].append(times)
            print(f"rep={rep} {name}_seconds={sum(times):.3f}", flush=True)
    best = {name: [min(step) for step in zip(*runs, strict=True)] for name, runs in results.items()}
    raw, lit = sum(best["raw"]), sum(best["lightning"])
    n = len(best["raw"])
    print(
        f"raw_ms_per_step={1000 * raw / n:.1f} lightning_ms_per_step={1000 * lit / n:.1f} "
        f"median_step_ratio={statistics.median(best['lightning']) / statistics.median(best['raw']):.3f}"
    )
    print(f"train_overhead={lit / raw:.3f}")


if __name__ == "__main__":
    main()
