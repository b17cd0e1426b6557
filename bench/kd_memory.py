"""Peak memory of one CE + KD forward/backward, chunked vs naive, measured side by side.

    python bench/kd_memory.py [--tokens 4096] [--vocab 151936] [--hidden 2560] [--chunk-size N|auto]

Both variants run the project's loss code (``lit_bluelm.objectives.distill``) on the same
shapes: student and teacher hidden states [tokens, hidden], output weights [vocab, hidden], a
temperature of 2, backward into the student's hidden states and output weight.
  * naive: ``naive_distill_loss``, full float32 logits of student and teacher;
  * chunked: ``distill_linear_loss`` at the default ``loss`` settings (``loss.chunk_size`` and
    ``loss.chunk_memory_mb``, the ones ``bench/step_speed.py`` times), or ``--chunk-size``.
The figure is the peak of memory allocated during the forward/backward, above what the inputs
already hold (the weights and hidden states exist in any training step). On a GPU it comes from
the CUDA allocator (``torch.cuda.max_memory_allocated``). On CPU the naive peak alone would
exceed this machine's memory, so both variants run on fake tensors (``FakeTensorMode``: real
shapes, dtypes and autograd, no storage) under torch's ``MemTracker``, which adds up every
tensor storage alive at each point of the same code path.
The last line is ``kd_memory=<chunked_peak / naive_peak>`` (target <= 0.25).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lit_bluelm.config import load_config  # noqa: E402
from lit_bluelm.objectives import Chunking, Head, KDOptions, distill_linear_loss, naive_distill_loss  # noqa: E402

GIB = 2**30


def _inputs(args, device: str) -> Tuple[torch.Tensor, ...]:
    g = dict(device=device)
    hidden = torch.randn(args.tokens, args.hidden, **g, requires_grad=True)
    weight = (0.02 * torch.randn(args.vocab, args.hidden, **g)).requires_grad_(True)
    t_hidden = torch.randn(args.tokens, args.hidden, **g)
    t_weight = 0.02 * torch.randn(args.vocab, args.hidden, **g)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    return hidden, weight, t_hidden, t_weight, targets


def _step(variant: str, inputs, chunk_size: Chunking) -> None:
    hidden, weight, t_hidden, t_weight, targets = inputs
    opts = KDOptions(alpha=0.5, temperature=2.0)
    if variant == "naive":
        out = naive_distill_loss(hidden, Head(weight), targets, t_hidden, Head(t_weight), opts)
    else:
        out = distill_linear_loss(hidden, Head(weight), targets, t_hidden, Head(t_weight), opts, chunk_size)
    out.loss.backward()


def peak_cuda(variant: str, args) -> float:
    torch.cuda.empty_cache()
    inputs = _inputs(args, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(variant, inputs, args.chunk_size)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def peak_fake(variant: str, args) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        inputs = _inputs(args, "cpu")
        tracker = MemTracker()
        tracker.track_external(*inputs)
        with tracker:
            _step(variant, inputs, args.chunk_size)
        (per_device,) = tracker.get_tracker_snapshot("peak").values()
        # the inputs are "external" references; their bytes are not the step's own
        own = sum(v for k, v in per_device.items() if k != "Total" and getattr(k, "value", "") != "Other")
        return own / GIB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2560, help="hidden size (bluelm_3b: 2560)")
    parser.add_argument("--chunk-size", default=None, help="loss.chunk_size (default: the config's)")
    args = parser.parse_args()
    overrides = [f"loss.chunk_size={args.chunk_size}"] if args.chunk_size is not None else []
    loss = load_config(overrides).loss
    args.chunk_size = Chunking.of(loss)
    cuda = torch.cuda.is_available()
    measure = peak_cuda if cuda else peak_fake
    how = "CUDA allocator" if cuda else "MemTracker on fake tensors (CPU)"
    print(
        f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} loss.chunk_size={loss.chunk_size} "
        f"loss.chunk_memory_mb={loss.chunk_memory_mb}; {how}"
    )
    peaks = {}
    for variant in ("naive", "chunked"):
        with torch.random.fork_rng() if cuda else nullcontext():
            peaks[variant] = measure(variant, args)
        print(f"{variant:<8} peak above inputs: {peaks[variant]:6.2f} GiB", flush=True)
    print(f"kd_memory={peaks['chunked'] / peaks['naive']:.3f}")


if __name__ == "__main__":
    main()
