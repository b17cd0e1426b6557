"""The generation engine against transformers' ``generate``, measured side by side in one run.

    python bench/generation.py [--repeats 5] [--train-steps 40] [--device cpu]

1. Correctness gate: the tiny preset's LLM trains ``--train-steps`` steps on the demo text (so its
   logits have clear margins); then, on 8 demo prompts of different lengths (left padding), our
   greedy ids for 64 new tokens must equal ``generate``'s on the same weights (the vocabulary
   rows past the tokenizer's are suppressed there, as the engine never picks them). Exits 1
   otherwise.
2. Speed: tokens per second of our engine, ``generate`` with its default dynamic cache and with
   the static cache, for batch 1 and 8, prompts of 32 tokens, exactly 64 new tokens (no stop),
   greedy, interleaved ``--repeats`` times (the fastest repeat of each counts), on two shapes:
   the tiny trained model, and a width-512, 8-layer LLM of random weights (where compute, not
   Python overhead, dominates).

The last lines are ``generation=<ours / generate at batch 8, tiny>`` (target >= 1.2) and
``generation_width512=<the same at width 512>`` (target >= 1.0), after the ratios against the
static cache (``generation_static=``, ``generation_width512_static=``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datamodules.datamodule import BlueLMDataModule  # noqa: E402
from datamodules.demo import ensure_demo_data  # noqa: E402
from lit_bluelm.config import load_config  # noqa: E402
from lit_bluelm.generation import GenerationConfig, Generator, Prompt, build_prompt  # noqa: E402
from lit_bluelm.models import build_model  # noqa: E402
from lit_bluelm.modules.optim import build_optimizer  # noqa: E402
from lit_bluelm.objectives import Chunking, next_token_head_loss  # noqa: E402
from lit_bluelm.processor import BlueLMProcessor  # noqa: E402
from lit_bluelm.trainer import attach_tokenizer, quiet_known_warnings  # noqa: E402

NEW_TOKENS = 64
PROMPT_LEN = 32
GATE_PROMPTS = [
    "What is 12 + 7 + 30?",
    "The capital of",
    "How many red shapes are there?",
    "Question: What is 51 + 3 + 31? Solution:",
    "The river",
    "What colour is the flag of",
    "There are 3 shapes:",
    "Question: What is the capital of",
]


def train_tiny(steps: int, device: str):
    """The tiny preset's LLM (text only) after ``steps`` steps on the demo text."""
    cfg = load_config(["stage=text", "module=next_token", "data.num_workers=0", f"trainer.max_steps={steps}"])
    ensure_demo_data(cfg)
    data = BlueLMDataModule(cfg)
    attach_tokenizer(cfg, data.tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.context).to(device).train()
    optimizer, schedule = build_optimizer(model, cfg.optim, steps)
    stream = iter(data.train_dataloader())
    for _ in range(steps):
        batch = next(stream)
        head_fn = next_token_head_loss(batch["labels"].to(device), Chunking.of(cfg.loss))
        loss = model(
            batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), head_fn=head_fn
        ).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"trained the tiny LLM {steps} steps: loss {loss.item():.3f}", flush=True)
    processor = BlueLMProcessor.from_config(data.tokenizer, cfg.model)
    return model.eval(), data.tokenizer, processor


def left_padded(prompts: List[Prompt], pad_id: int, device: str):
    longest = max(len(p.input_ids) for p in prompts)
    ids = torch.tensor(
        [[pad_id] * (longest - len(p.input_ids)) + p.input_ids for p in prompts], device=device
    )
    mask = torch.tensor(
        [[0] * (longest - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts], device=device
    )
    return ids, mask


def gate(model, tok, processor, device: str) -> bool:
    prompts = [build_prompt(processor, text) for text in GATE_PROMPTS]
    ours = Generator(model, tok).generate(
        prompts, GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    )
    ids, mask = left_padded(prompts, tok.pad_token_id, device)
    ref = model.llm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=list(range(len(tok), model.llm.config.vocab_size)) or None,
    )[:, ids.shape[1] :].tolist()
    same = [o.token_ids == r for o, r in zip(ours, ref, strict=True)]
    print(
        f"gate: greedy ids equal to transformers' generate for {sum(same)}/{len(same)} prompts "
        f"(batch {len(prompts)}, prompt lengths {sorted({len(p.input_ids) for p in prompts})}, "
        f"{NEW_TOKENS} new tokens)",
        flush=True,
    )
    return all(same)


def wide_model(vocab: int, device: str):
    cfg = load_config(
        [
            "stage=text",
            "model.llm.config.hidden_size=512",
            "model.llm.config.intermediate_size=1536",
            "model.llm.config.num_hidden_layers=8",
            "model.llm.config.num_attention_heads=8",
            "model.llm.config.num_key_value_heads=4",
            f"model.llm.config.vocab_size={vocab}",
            "model.image_token_id=2",
        ]
    )
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.context).to(device).eval()


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(name: str, model, tok, repeats: int, device: str) -> Dict[int, Dict[str, float]]:
    """Tokens per second for each way and batch size (fastest of ``repeats``, interleaved)."""
    g = torch.Generator().manual_seed(1)
    engine = Generator(model, tok)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    hf = dict(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
    )
    out: Dict[int, Dict[str, float]] = {}
    for batch in (1, 8):
        ids = torch.randint(10, len(tok), (batch, PROMPT_LEN), generator=g).tolist()
        prompts = [Prompt(row) for row in ids]
        tensor, mask = left_padded(prompts, tok.pad_token_id, device)
        ways = {
            "ours": functools.partial(engine.generate, prompts, cfg),
            "generate": functools.partial(model.llm.generate, input_ids=tensor, attention_mask=mask, **hf),
            "generate_static": functools.partial(
                model.llm.generate, input_ids=tensor, attention_mask=mask, cache_implementation="static", **hf
            ),
        }
        for fn in ways.values():  # warm-up
            fn()
        best = {way: float("inf") for way in ways}
        for _ in range(repeats):
            for way, fn in ways.items():
                best[way] = min(best[way], timed(fn))
        out[batch] = {way: batch * NEW_TOKENS / t for way, t in best.items()}
        print(
            f"{name} batch={batch}: " + " ".join(f"{way}={tps:.0f} tok/s" for way, tps in out[batch].items()),
            flush=True,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    quiet_known_warnings()
    torch.set_grad_enabled(True)
    model, tok, processor = train_tiny(args.train_steps, args.device)
    with torch.no_grad():
        if not gate(model, tok, processor, args.device):
            print("error: the engine's greedy ids differ from transformers'", file=sys.stderr)
            return 1
        tiny = speed("tiny", model, tok, args.repeats, args.device)
        wide = speed("width512", wide_model(len(tok), args.device), tok, args.repeats, args.device)
    for label, result in (("generation", tiny), ("generation_width512", wide)):
        print(f"{label}_static={result[8]['ours'] / result[8]['generate_static']:.3f}")
    print(f"generation={tiny[8]['ours'] / tiny[8]['generate']:.3f}")
    print(f"generation_width512={wide[8]['ours'] / wide[8]['generate']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
