"""Is the data loader ever the bottleneck? Loader throughput vs what the tiny joint step consumes.

    python bench/loader.py [--batches 40] [--steps 20] [key=value ...]

Both figures come from one run, one after the other, on the joint stage's real code:
  * loader: the training DataLoader that ``train.py`` builds (the 60:40 image-text + text mixture
    from the demo shards: PNG decoding, AnyRes tiling, tokenisation, collation) with its
    ``data.num_workers`` workers; samples per second over ``--batches`` batches after the first
    few (the shuffle buffers fill first);
  * step: forward, backward and AdamW step of the tiny BlueLM on pre-loaded batches of the same
    loader (the ``raw`` loop of ``bench/train_overhead.py``); samples per second consumed.
The last line is ``loader=<loader samples/s / step samples/s>`` (target >= 3).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from train_overhead import run_raw  # noqa: E402

from datamodules.datamodule import BlueLMDataModule  # noqa: E402
from datamodules.demo import ensure_demo_data  # noqa: E402
from lit_bluelm.config import load_config  # noqa: E402
from lit_bluelm.trainer import attach_tokenizer, quiet_known_warnings  # noqa: E402

WARMUP_BATCHES = 4


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    args, overrides = parser.parse_known_args()
    cfg = load_config(
        ["stage=joint", "trainer.accelerator=cpu", f"trainer.max_steps={args.steps}", *overrides]
    )
    ensure_demo_data(cfg)
    datamodule = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, datamodule.tokenizer)
    quiet_known_warnings()
    batch_size = cfg.data.batch_size

    loader = iter(datamodule.train_dataloader())
    kept = [next(loader) for _ in range(WARMUP_BATCHES)]
    start = time.perf_counter()
    for _ in range(args.batches):
        kept.append(next(loader))
    loader_rate = args.batches * batch_size / (time.perf_counter() - start)
    del loader  # stop the workers before timing the step

    batches = [dict(b) for b in kept[: args.steps]]
    times = run_raw(cfg, batches, warmup=3)
    step_rate = len(times) * batch_size / sum(times)
    print(
        f"batch_size={batch_size} workers={cfg.data.num_workers} threads={torch.get_num_threads()} "
        f"loader_samples_per_s={loader_rate:.1f} step_samples_per_s={step_rate:.1f}"
    )
    print(f"loader={loader_rate / step_rate:.2f}")


if __name__ == "__main__":
    main()
