"""Step time of the chunked output-head path against full logits, measured side by side.

    python bench/step_speed.py [--repeats 2] [--head-tokens 256] [--keep-freed-memory] [--quick]

Per LLM shape, one fwd + bwd + AdamW step of the LLM alone on the same weights, tokens and
optimizer, float32, alternating between:
  * ours: ``llm.base_model`` + ``objectives.next_token_head_loss`` (what every stage trains
    with) at the default ``loss`` settings (``configs``' defaults, as ``train.py`` uses them);
  * transformers: ``llm(input_ids, labels=labels).loss``, full ``[tokens, vocab]`` logits.
The figure is the ratio of the medians over ``--repeats`` interleaved steps (after a warm-up
step of each); ``mfu`` is model FLOPs per step (6 x matmul parameters incl. the head x tokens +
12 x layers x width x sequence x tokens) / our step time / the float32 matmul rate measured in
this run. Then, at the paper's head (width 2,560, vocabulary 151,936), the head path alone
against the naive full-logits code (``objectives``' own references) on the same hidden states:
  * ``kd_vs_naive``: CE + KD with a teacher (T = 2), fwd + bwd;
  * ``val_vs_naive``: validation's per-row CE sums, no grad (naive: F.cross_entropy);
  * ``logprob_vs_naive``: per-token log-probs + entropy (T = 0.8) under a per-token loss
    (GRPO-like), fwd + bwd, as ``per_token_loss`` computes it; ``logprob_tensors_vs_naive``:
    the same through ``token_logprobs``' [tokens] tensors (backward recomputes the logits).
The allocator is the system's, as a user's run has it: glibc returns every freed block over
32 MB to the OS and page-faults it in again on its next use, which on this sandboxed machine
costs about as much as the arithmetic for full-logit temporaries and AdamW's. With
``--keep-freed-memory`` the job runs again with malloc told to keep freed memory
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``: what tcmalloc or jemalloc do), which
isolates the arithmetic. The tiny model is reported but not in the summary. The last lines are
``step_vs_transformers_max=`` (worst of the three shapes) and ``step_vs_transformers_geomean=``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lit_bluelm.config import load_config  # noqa: E402
from lit_bluelm.models.llm import build_from_config  # noqa: E402
from lit_bluelm.objectives import (  # noqa: E402
    Chunking,
    Head,
    KDOptions,
    distill_linear_loss,
    naive_distill_loss,
    next_token_head_loss,
    row_ce_sums,
)
from lit_bluelm.objectives.token_logprobs import (  # noqa: E402
    naive_token_logprobs,
    per_token_loss,
    token_logprobs,
)

SEQ = 512
# name: (width, layers, vocab, tokens per step, in the summary)
SHAPES = {
    "tiny": (128, 4, 1024, 2048, False),
    "w512_l8_v32000": (512, 8, 32000, 2048, True),
    "w512_l4_v151936": (512, 4, 151936, 1024, True),
    "w2560_l1_v151936": (2560, 1, 151936, 512, True),
}
PAPER_HEAD = (2560, 151936)
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def matmul_rate() -> float:
    """float32 FLOP/s of a large square matmul on this machine, now."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def build_llm(width: int, layers: int, vocab: int):
    cfg = load_config([]).model.llm
    heads = max(width // 64, 1)
    cfg.config.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * 2.7),  # bluelm_3b: 6912 / 2560
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    return build_from_config(cfg).train()


def model_flops(llm, tokens: int, seq: int) -> float:
    c = llm.config
    # every nn.Linear is a matmul (the tied head too: it is the embedding's weight)
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear))
    return 6 * linear * tokens + 12 * c.num_hidden_layers * c.hidden_size * seq * tokens


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: bool = True) -> Dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, run alternately (after a
    warm-up round unless ``warmup`` is False)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for round_ in range(repeats + int(warmup)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ or not warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def step_ratio(name: str, shape, chunk: Chunking, repeats: int, rate: float) -> float:
    width, layers, vocab, tokens, _ = shape
    llm = build_llm(width, layers, vocab)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    seq = min(SEQ, tokens)  # sequences of SEQ tokens (fewer for a shorter step)
    ids = torch.randint(0, vocab, (tokens // seq, seq), generator=g)

    def step(loss_of):
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())

    def ours():
        hidden = llm.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return next_token_head_loss(ids, chunk)(hidden, llm.get_output_embeddings()).loss

    def theirs():
        return llm(input_ids=ids, labels=ids, use_cache=False).loss

    med = interleaved({"ours": lambda: step(ours), "transformers": lambda: step(theirs)}, repeats)
    ratio = med["ours"] / med["transformers"]
    mfu = model_flops(llm, tokens, seq) / med["ours"] / rate
    print(
        f"{name:<18} tokens={tokens:<5} ours={med['ours']:.2f}s transformers={med['transformers']:.2f}s "
        f"step_vs_transformers={ratio:.3f} mfu={mfu:.3f}",
        flush=True,
    )
    return ratio


def head_ratios(chunk: Chunking, tokens: int, repeats: int) -> None:
    # a warm-up on 16 tokens (every code path once), then the timed rounds on all of them
    for n in sorted({16, tokens}):
        _head_ratios(chunk, n, repeats, report=n == tokens)


def _head_ratios(chunk: Chunking, tokens: int, repeats: int, report: bool) -> None:
    width, vocab = PAPER_HEAD
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, width, generator=g).requires_grad_(True)
    weight = (0.02 * torch.randn(vocab, width, generator=g)).requires_grad_(True)
    t_hidden = torch.randn(tokens, width, generator=g)
    t_head = Head(0.02 * torch.randn(vocab, width, generator=g))
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    head, opts = Head(weight), KDOptions(alpha=0.5, temperature=2.0)
    up_lp, up_ent = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)

    def backward(loss):
        loss.backward()
        hidden.grad = weight.grad = None

    def token_fn(lp, ent, rows):  # a per-token loss of log-probs and entropies
        return ((up_lp[rows] * lp).sum() + (up_ent[rows] * ent).sum())[None]

    def tensors_loss(out):
        return token_fn(out.logprobs, out.entropy, slice(None))[0]

    # validation's layout: position t of [1, tokens + 1] predicts labels[t + 1]
    labels = torch.cat([targets[:1], targets])[None]
    val_hidden = torch.cat([hidden.detach(), hidden.detach()[-1:]])[None]
    lin = torch.nn.Linear(width, vocab, bias=False)
    lin.weight = torch.nn.Parameter(weight.detach())

    @torch.no_grad()
    def val_naive():
        F.cross_entropy(head.logits(hidden), targets, reduction="none")

    @torch.no_grad()
    def val_ours():
        row_ce_sums(val_hidden, lin, labels, chunk)

    pairs = {
        "kd": (
            lambda: backward(naive_distill_loss(hidden, head, targets, t_hidden, t_head, opts).loss),
            lambda: backward(distill_linear_loss(hidden, head, targets, t_hidden, t_head, opts, chunk).loss),
        ),
        "val": (val_naive, val_ours),
        "logprob": (
            lambda: backward(tensors_loss(naive_token_logprobs(hidden, head, targets, 0.8, True))),
            lambda: backward(per_token_loss(hidden, head, targets, token_fn, 0.8, True, chunk_size=chunk)[0]),
        ),
        "logprob_tensors": (
            lambda: backward(tensors_loss(naive_token_logprobs(hidden, head, targets, 0.8, True))),
            lambda: backward(tensors_loss(token_logprobs(hidden, head, targets, 0.8, True, chunk))),
        ),
    }
    for name, (naive, ours) in pairs.items():
        med = interleaved({"naive": naive, "ours": ours}, repeats if report else 1, warmup=False)
        if not report:
            continue
        print(
            f"{name + '_vs_naive':<24} width={width} vocab={vocab} tokens={tokens} "
            f"ours={med['ours']:.2f}s naive={med['naive']:.2f}s",
            flush=True,
        )
        print(f"{name}_vs_naive={med['ours'] / med['naive']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up")
    parser.add_argument("--head-tokens", type=int, default=256, help="tokens of the head-only comparisons")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="malloc keeps freed memory (see above)"
    )
    parser.add_argument("--quick", action="store_true", help="the tiny shape only, 1 repeat (smoke test)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. loss.chunk_size=auto")
    args = parser.parse_args()
    began = time.perf_counter()
    if args.keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED.items()):
        # glibc reads these at start-up: run this script again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED})
    cfg = load_config(args.overrides)
    chunk = Chunking.of(cfg.loss)
    torch.set_grad_enabled(True)
    rate = matmul_rate()
    print(
        f"loss.chunk_size={cfg.loss.chunk_size} loss.chunk_memory_mb={cfg.loss.chunk_memory_mb} "
        f"threads={torch.get_num_threads()} float32 matmul={rate / 1e9:.0f} GFLOP/s "
        f"malloc={'keeps freed memory' if args.keep_freed_memory else 'system'}",
        flush=True,
    )
    shapes = {"tiny": SHAPES["tiny"]} if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    ratios = {}
    for name, shape in shapes.items():
        ratio = step_ratio(name, shape, chunk, repeats, rate)
        if shape[-1]:
            ratios[name] = ratio
    head_ratios(chunk, 16 if args.quick else args.head_tokens, repeats)
    print(f"took={time.perf_counter() - began:.0f}s", flush=True)
    if ratios:
        print(f"step_vs_transformers_max={max(ratios.values()):.3f}")
        geomean = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
        print(f"step_vs_transformers_geomean={geomean:.3f}")


if __name__ == "__main__":
    main()
