"""What a checkpoint sees: the demo's held-out images read back as colour words, captions and counts.

    python bench/vision_probe.py CKPT [CKPT ...] [--items 200] [--seed 0] [--batch 100]

The held-out items of ``demo_count`` and ``demo_color`` are rebuilt from the demo data's seed
(the same images as ``<demo_dir>/eval``, with their scenes); each checkpoint is asked, greedily
and in pre-training's plain text format (no chat template, so any stage's checkpoint can be
probed):

* ``colour``: ``<image>\\nThere is 1 shape: a`` on the one-shape images -> the colour word;
* ``caption``: ``<image>\\n`` -> the caption; ``caption_exact`` is the share whose colour sequence
  is the scene's exactly, ``caption_count`` the share whose count of the item's colour is right;
* ``direct``: ``<image>\\nQuestion: How many red shapes are there? Answer:`` -> the count from the
  image alone (what the SFT model's non-thinking counting has to do); ``question_first`` the same
  with the question before the image; ``direct_majority`` is the accuracy of always answering the
  most frequent count, ``direct_answers`` how often each direct answer was given.

Answers are scored with the evaluation's own metrics (``numeric``, ``choice``). One line per
checkpoint: ``ckpt=... colour=... caption_exact=... caption_count=... direct=...``. A diagnostic
for the demo's recipe (docs/stages.md), not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def colours_of(caption: str) -> List[str]:
    """The colour sequence a caption names (``a red circle and a blue square`` -> red, blue)."""
    from datamodules.demo_tasks import COLORS

    words = re.compile(rf"\ba ({'|'.join(COLORS)}) ")
    return words.findall(caption.split(" Question:")[0] + " ")


def probe(ckpt: str, n: int, seed: int, batch: int) -> dict:
    import torch

    from datamodules.demo_tasks import held_out_items
    from lit_bluelm.checkpoint import load_run
    from lit_bluelm.evaluation import score
    from lit_bluelm.generation import GenerationConfig, Generator, Prompt
    from lit_bluelm.processor import BlueLMProcessor
    from lit_bluelm.tokenizer import IMAGE

    torch.manual_seed(0)
    held_out = held_out_items(seed, n)
    items, singles = held_out["demo_count"], held_out["demo_color"]
    loaded = load_run(ckpt, key="ckpt")
    processor = BlueLMProcessor.from_config(loaded.tokenizer, loaded.config.model)
    generator = Generator(loaded.model, loaded.tokenizer)

    def ask(items, texts: Sequence[str], cfg: GenerationConfig) -> List[str]:
        prompts = []
        for text, item in zip(texts, items, strict=True):
            enc = processor.encode(text, [item.image])
            prompts.append(Prompt(enc.input_ids, enc.pixel_values))
        out = []
        for i in range(0, len(prompts), batch):
            out += [g.text for g in generator.generate(prompts[i : i + batch], cfg)]
        return out

    def accuracy(metric: str, answers: Sequence[str], items) -> float:
        return sum(score(metric, a, it.answer) for a, it in zip(answers, items, strict=True)) / n

    short = GenerationConfig(max_new_tokens=3, stop=(".",))
    colour = ask(singles, [f"{IMAGE}\nThere is 1 shape: a"] * n, GenerationConfig(max_new_tokens=2))
    captions = ask(items, [f"{IMAGE}\n"] * n, GenerationConfig(max_new_tokens=48, stop=(" Question",)))
    asked = [re.search(r"How many (\w+) shapes", it.prompt).group(1) for it in items]
    exact = sum(colours_of(c) == colours_of(it.thinking) for c, it in zip(captions, items, strict=True))
    cap_count = sum(
        colours_of(c).count(k) == int(it.answer) for c, k, it in zip(captions, asked, items, strict=True)
    )
    direct = ask(items, [f"{IMAGE}\nQuestion: {it.prompt} Answer:" for it in items], short)
    first = ask(items, [f"Question: {it.prompt}\n{IMAGE}\nAnswer:" for it in items], short)
    majority = Counter(it.answer for it in items).most_common(1)[0][1]
    return {
        "ckpt": ckpt,
        "colour": accuracy("choice", colour, singles),
        "caption_exact": exact / n,
        "caption_count": cap_count / n,
        "direct": accuracy("numeric", direct, items),
        "question_first": accuracy("numeric", first, items),
        "direct_majority": majority / n,
        "direct_answers": dict(Counter(d.strip().rstrip(".") for d in direct)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpts", nargs="+", metavar="CKPT")
    parser.add_argument("--items", type=int, default=200, help="held-out counting items (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed (default 0)")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    for ckpt in args.ckpts:
        r = probe(ckpt, args.items, args.seed, args.batch)
        print(
            " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
