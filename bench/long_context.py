"""One long-context training step of the tiny model at 1x, 4x and 8x its original context, with
and without activation checkpointing, measured side by side in one run.

    python bench/long_context.py [--rows 2] [--factors 1,4,8] [--steps 3]

Each step is the stage's own code path: ``NextTokenModule`` configured by ``stage=long_context``
(YaRN factor 8, so every length is inside the switched context), its model built and, with
``fsdp.activation_checkpointing=true``, recomputing each decoder layer in backward; unpacked rows
of one long document each (no attention mask: SDPA's causal path), the chunked next-token loss,
backward and the AdamW step. The rows are random tokens at a fixed count (``--rows``).
  * peak: the most memory held by live tensors during one step (torch's ``MemTracker``, which adds
    up every tensor storage alive at each point: parameters, gradients, optimizer state,
    activations, temporaries); on CPU no allocator statistic exists for this;
  * tokens/s: rows x length over the median of ``--steps`` timed steps (after one warm-up step).
The last line is ``long_context_memory_growth=<peak(8x) / peak(1x)>`` without checkpointing
(target <= 9: linear in the length, no dense [T, T] mask or score matrix).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lit_bluelm.config import load_config, to_container  # noqa: E402
from lit_bluelm.models.llm import llm_config, original_context  # noqa: E402
from lit_bluelm.modules import NextTokenModule  # noqa: E402

MIB = 2**20


def make_module(checkpointing: bool, length: int):
    cfg = load_config(
        [
            "stage=long_context",
            f"data.seq_len={length}",
            f"fsdp.activation_checkpointing={str(checkpointing).lower()}",
            "model.text_only=true",  # the vision tower sees no image in a long document
            "data.mix.image_text=0",  # text only: no image source
        ]
    )
    module = NextTokenModule(to_container(cfg))
    module.configure_model()
    module.model.train()
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def batch(rows: int, length: int, vocab: int):
    ids = torch.randint(8, vocab, (rows, length))  # past the special tokens
    return {"input_ids": ids, "labels": ids.clone()}


def step(module, optimizer, data) -> None:
    loss = module.lm_loss(data).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_mib(module, optimizer, data) -> float:
    from torch.distributed._tools.mem_tracker import MemTracker

    step(module, optimizer, data)  # optimizer state exists, as in every step after the first
    tracker = MemTracker()
    tracker.track_external(module.model, optimizer)
    with tracker:
        step(module, optimizer, data)
    (per_device,) = tracker.get_tracker_snapshot("peak").values()
    return per_device["Total"] / MIB


def seconds(module, optimizer, data, steps: int) -> float:
    step(module, optimizer, data)  # warm-up
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step(module, optimizer, data)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2, help="rows per step (fixed for every length)")
    parser.add_argument("--factors", default="1,4,8", help="lengths as multiples of the original context")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(["stage=long_context"])
    hf = llm_config(cfg.model.llm, cfg.context.rope)
    original = original_context(hf)
    factors = [float(f) for f in args.factors.split(",")]
    print(
        f"tiny model, YaRN x{cfg.context.rope.factor:g} ({original} -> {hf.max_position_embeddings} tokens), "
        f"{args.rows} rows a step, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'length':>7} {'factor':>6} {'checkpointing':>13} {'peak MiB':>9} {'tokens/s':>9}")
    peaks = {}
    for factor in factors:
        length = int(original * factor)
        data = batch(args.rows, length, hf.vocab_size)
        for checkpointing in (False, True):
            torch.manual_seed(0)
            module, optimizer = make_module(checkpointing, length)
            peak = peak_mib(module, optimizer, data)
            rate = args.rows * length / seconds(module, optimizer, data, args.steps)
            peaks[factor, checkpointing] = peak
            print(f"{length:>7} {factor:>6g} {str(checkpointing):>13} {peak:>9.1f} {rate:>9.0f}", flush=True)
    low, high = min(factors), max(factors)
    print(
        f"activation checkpointing at {high:g}x: peak x{peaks[high, True] / peaks[high, False]:.2f} of without"
    )
    print(f"long_context_memory_growth={peaks[high, False] / peaks[low, False]:.2f}")


if __name__ == "__main__":
    main()
