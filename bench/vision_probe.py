"""What a checkpoint sees: the demo's counting images read back as captions and as direct counts.

    python bench/vision_probe.py CKPT [CKPT ...] [--items 200] [--demo-dir data/demo]

For the held-out ``demo_count`` items (the images of ``<demo-dir>/eval``, rebuilt from the demo's
seed with their scenes), each checkpoint is asked, greedily and in pre-training's plain text
format (no chat template, so any stage's checkpoint can be probed):

* ``caption``: ``<image>\\n`` -> the caption; ``caption_exact`` is the share whose colour sequence
  is the scene's exactly, ``caption_count`` the share whose count of the item's colour is right;
* ``direct``: ``<image>\\nQuestion: How many red shapes are there? Answer:`` -> the count from the
  image alone (what the SFT model's non-thinking counting has to do); ``direct_majority`` is the
  accuracy of always answering the most frequent count.

One line per checkpoint: ``ckpt=... caption_exact=... caption_count=... direct=...``. A
diagnostic for the demo's recipe (docs/stages.md), not part of ``make bench``.
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

COLOUR_WORDS = re.compile(r"\ba (red|green|blue|yellow) ")


def colours_of(caption: str) -> List[str]:
    """The colour sequence a caption names (``a red circle and a blue square`` -> red, blue)."""
    return COLOUR_WORDS.findall(caption.split(" Question:")[0] + " ")


def first_int(text: str):
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def probe(ckpt: str, n: int, seed: int, batch: int) -> dict:
    import torch

    from datamodules.demo_tasks import held_out_items
    from lit_bluelm.checkpoint import load_run
    from lit_bluelm.generation import GenerationConfig, Generator, Prompt
    from lit_bluelm.processor import BlueLMProcessor
    from lit_bluelm.tokenizer import IMAGE

    torch.manual_seed(0)
    items = held_out_items(seed, n)["demo_count"]
    loaded = load_run(ckpt, key="ckpt")
    processor = BlueLMProcessor.from_config(loaded.tokenizer, loaded.config.model)
    generator = Generator(loaded.model, loaded.tokenizer)

    def run(texts: Sequence[str], cfg: GenerationConfig) -> List[str]:
        return run_items(items, texts, cfg)

    def run_items(items, texts: Sequence[str], cfg: GenerationConfig) -> List[str]:
        prompts = []
        for text, item in zip(texts, items, strict=True):
            enc = processor.encode(text, [item.image])
            prompts.append(Prompt(enc.input_ids, enc.pixel_values))
        out = []
        for i in range(0, len(prompts), batch):
            out += [g.text for g in generator.generate(prompts[i : i + batch], cfg)]
        return out

    gold_caps = [item.thinking.split(" Question:")[0] for item in items]
    colours = [re.search(r"How many (\w+) shapes", item.prompt).group(1) for item in items]
    captions = run([f"{IMAGE}\n"] * len(items), GenerationConfig(max_new_tokens=48, stop=(" Question",)))
    exact = sum(colours_of(c) == colours_of(g) for c, g in zip(captions, gold_caps, strict=True))
    cap_count = sum(
        colours_of(c).count(k) == int(it.answer) for c, k, it in zip(captions, colours, items, strict=True)
    )
    direct = run(
        [f"{IMAGE}\nQuestion: {it.prompt} Answer:" for it in items],
        GenerationConfig(max_new_tokens=3, stop=(".",)),
    )
    direct_ok = sum(first_int(d) == int(it.answer) for d, it in zip(direct, items, strict=True))
    first = run(
        [f"Question: {it.prompt}\n{IMAGE}\nAnswer:" for it in items],
        GenerationConfig(max_new_tokens=3, stop=(".",)),
    )
    first_ok = sum(first_int(d) == int(it.answer) for d, it in zip(first, items, strict=True))
    majority = Counter(it.answer for it in items).most_common(1)[0][1]
    singles = held_out_items(seed, n)["demo_color"]
    colour = run_items(singles, [f"{IMAGE}\nThere is 1 shape: a"] * n, GenerationConfig(max_new_tokens=2))
    colour_ok = sum(c.strip().startswith(it.answer) for c, it in zip(colour, singles, strict=True))
    return {
        "ckpt": ckpt,
        "colour": colour_ok / n,
        "caption_exact": exact / n,
        "caption_count": cap_count / n,
        "direct": direct_ok / n,
        "question_first": first_ok / n,
        "direct_majority": majority / n,
        "direct_answers": dict(Counter(str(first_int(d)) for d in direct)),
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
