"""How many examples the demo's LLM needs to learn to count a colour from the image, no thinking.

    python bench/count_learnability.py [CKPT] [--order after first] [--loss answer]
        [--steps 800] [--batch 32] [--lr 1e-3] [--every 200] [--items 300] [--seed 0]

Starting from a checkpoint with a vision tower (default: the demo's joint stage), the adapter and
the LLM are trained on nothing but the direct counting question of ``demo_count``, on fresh
scenes of 2-4 shapes (every canvas of the demo, never a held-out image; the tower stays frozen,
as in the demo's recipe), with AdamW at a constant rate. Every ``--every`` steps the held-out
``demo_count`` items are answered greedily, in pre-training's plain format, and scored:

* ``--order after``: ``<image>\\nQuestion: How many red shapes are there? Answer: 1`` (the demo's
  order: the question follows the image);
* ``--order first``: ``Question: How many red shapes are there?\\n<image>\\nAnswer: 1`` (the image
  tokens come after the asked colour, so causal attention lets them compare themselves with it);
* ``--loss answer``: cross-entropy on the count only (as SFT trains a reply); ``--loss lm``: on
  every text token (as pre-training does).

One line per evaluation: ``order=first loss=answer step=200 examples=6400 train_s=55.1
accuracy=0.600 answers=...`` (the most frequent answer of the held-out set scores
``majority=``). It answers the question the demo cannot afford to: how far past the demo's few
thousand counting examples the target of issue 21 lies (docs/stages.md). A diagnostic, not part
of ``make bench``; each arm runs a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CKPT = "runs/demo/joint/checkpoints/last.ckpt"
ASKED = re.compile(r"How many (\w+) shapes")


def prompt_text(color: str, order: str) -> str:
    """The counting prompt up to (and including) the space before the answer."""
    from lit_bluelm.tokenizer import IMAGE

    question = f"How many {color} shapes are there?"
    if order == "first":
        return f"Question: {question}\n{IMAGE}\nAnswer: "
    return f"{IMAGE}\nQuestion: {question} Answer: "


def arm(ckpt: str, order: str, loss_kind: str, args: argparse.Namespace) -> None:
    """Train one arm from ``ckpt``, printing a line per evaluation."""
    import torch

    from datamodules.collate import Collator
    from datamodules.demo_tasks import asked_color, color_question, held_out_items, image_key, scene
    from datamodules.kinds import IGNORE_INDEX
    from lit_bluelm.checkpoint import load_run
    from lit_bluelm.evaluation import score
    from lit_bluelm.objectives.lm import next_token_loss
    from lit_bluelm.processor import BlueLMProcessor

    torch.manual_seed(0)
    loaded = load_run(ckpt, key="ckpt")
    model, tokenizer = loaded.model, loaded.tokenizer
    if model.vision is None:
        raise SystemExit(f"{ckpt}: a text-only checkpoint has no image tokens to count from")
    processor = BlueLMProcessor.from_config(tokenizer, loaded.config.model)
    held = held_out_items(args.seed, args.items)["demo_count"]
    held_keys = {item.key for item in held}
    majority = Counter(item.answer for item in held).most_common(1)[0][1] / len(held)
    split = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Answer: ", "Answer: 1")]
    if split[1][:-1] != split[0]:  # the prompt must end where the count's one token begins
        raise SystemExit(f"{ckpt}: its tokenizer does not give a count a token of its own")

    collate = Collator(tokenizer.pad_token_id, pad_to_multiple=1)

    def encode(color: str, image, answer: str | None) -> dict:
        """An example whose labels train the answer (and, for ``lm``, the text)."""
        enc = processor.encode(prompt_text(color, order) + (answer or ""), [image])
        ids = torch.tensor(enc.input_ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        if answer is not None:
            if loss_kind == "lm":
                labels = torch.where(ids == model.image_token_id, IGNORE_INDEX, ids)
            labels[-1] = ids[-1]
        return {"input_ids": ids, "labels": labels, "pixel_values": enc.pixel_values}

    def forward(examples: List[dict]):
        """Right-padded like the training batches: (logits, the batch)."""
        b = collate(examples)
        return model(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]), b

    def evaluate() -> Tuple[float, Counter]:
        model.eval()
        answers: List[str] = []
        with torch.no_grad():
            for start in range(0, len(held), 50):
                chunk = held[start : start + 50]
                logits, b = forward(
                    [encode(ASKED.search(it.prompt).group(1), it.image, None) for it in chunk]
                )
                last = logits[torch.arange(len(chunk)), b["attention_mask"].sum(1) - 1]
                answers += tokenizer.convert_ids_to_tokens(last.argmax(-1).tolist())
        model.train()
        right = sum(score(it.metric, a, it.answer) for a, it in zip(answers, held, strict=True))
        return right / len(held), Counter(answers)

    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("vision."))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    rng, trained_s = random.Random(f"count_learnability/{args.seed}"), 0.0
    for step in range(1, args.steps + 1):
        rows = []
        while len(rows) < args.batch:
            image, objects = scene(rng, 2, 4)
            if image_key(image) in held_keys:
                continue
            color = asked_color(rng, objects)
            _, count = color_question(objects, color)
            rows.append(encode(color, image, str(count)))
        start = time.perf_counter()
        logits, b = forward(rows)
        loss, _ = next_token_loss(logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        trained_s += time.perf_counter() - start
        if step % args.every == 0 or step == args.steps:
            accuracy, answers = evaluate()
            print(
                f"order={order} loss={loss_kind} step={step} examples={step * args.batch} "
                f"train_s={trained_s:.1f} accuracy={accuracy:.3f} majority={majority:.3f} "
                f"answers={dict(answers.most_common(5))}",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", nargs="?", default=DEFAULT_CKPT, metavar="CKPT")
    parser.add_argument("--order", nargs="+", choices=("after", "first"), default=["after", "first"])
    parser.add_argument("--loss", nargs="+", choices=("answer", "lm"), default=["answer"])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=200, help="evaluate every N steps (default 200)")
    parser.add_argument("--items", type=int, default=300, help="held-out counting items (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed (default 0)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        parser.error(f"no checkpoint at {args.ckpt} (run `make demo` first, or pass one)")
    for order in args.order:
        for loss_kind in args.loss:
            arm(args.ckpt, order, loss_kind, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
