"""Packing efficiency of the text stage's loader on the demo text.

    python bench/packing.py [--batches 50] [key=value ...]

Runs the real training DataLoader of ``stage=text`` (demo shards, written on first use) for
``--batches`` batches and counts real tokens against row slots (the padded batch width x rows,
padding included): the same ratio training logs as ``data/packing_efficiency``. For comparison it also
reports the unpacked ratio (one document per row, padded to the longest in the batch).
The last line is ``packing=<efficiency>`` (target >= 0.98).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.datamodule import BlueLMDataModule  # noqa: E402
from datamodules.demo import ensure_demo_data  # noqa: E402
from lit_bluelm.config import load_config  # noqa: E402


def efficiency(cfg, batches: int) -> float:
    datamodule = BlueLMDataModule(cfg)
    datamodule.setup("fit")
    real = slots = 0
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == batches:
            break
        mask = batch["attention_mask"]
        real += int(mask.sum())
        slots += mask.numel()
    return real / slots


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=50)
    args, overrides = parser.parse_known_args()
    cfg = load_config(["stage=text", *overrides])
    ensure_demo_data(cfg)
    unpacked = efficiency(load_config(["stage=text", *overrides, "data.packing=false"]), args.batches)
    packed = efficiency(cfg, args.batches)
    print(f"seq_len={cfg.data.seq_len} batch_size={cfg.data.batch_size} batches={args.batches}")
    print(f"unpacked (one document per row): {unpacked:.4f}")
    print(f"packed (data.pack_buffer={cfg.data.pack_buffer}): {packed:.4f}")
    print(f"packing={packed:.4f}")


if __name__ == "__main__":
    main()
