"""Deterministic demo data: WebDataset shards plus a tokenizer trained on them.

    python -m datamodules.demo [--out data/demo] [--force]

Writes, for each split ``{train,val}``:

* ``image_text-NNNNNN.tar``: rendered shapes (png + caption txt + json metadata, with counting
  and colour questions);
* ``text-NNNNNN.tar``: facts about invented kingdoms (txt) and sums worked with a running total
  (json with a ``text`` field);
* ``cot-NNNNNN.tar``: chain-of-thought samples (sums with a running total, shapes of a described
  scene counted one by one);
* ``sft_think-NNNNNN.tar`` / ``sft_nothink-NNNNNN.tar``: chat conversations of the demo tasks
  (:mod:`datamodules.demo_tasks`) in the thinking and the non-thinking mode, images as ``0.png``;
  :data:`SLIP_RATE` of the thinking-mode sums are worked with one slip (:func:`with_slip`);
* ``passkey-NNNNNN.tar``: short needle-in-a-haystack documents (:mod:`lit_bluelm.needle`, up to
  about 400 tokens: within the tiny model's original context), for the reasoning stage;
* ``long-NNNNNN.tar``: long documents (about 500 to 2,000 tokens) of filler and facts with a
  passkey, or named codes, far back and a question about them at the end, for the long-context
  stage;
* ``pref_think-NNNNNN.tar``, ``pref_topic-NNNNNN.tar``, ``pref_color-NNNNNN.tar``: preference
  pairs for the reward model (:func:`datamodules.demo_tasks.preference_pair`): a worked sum
  whose answer follows from its thinking vs the same thinking with a contradicting answer; the
  answer to the question vs an answer to another task's question; an image's caption vs the
  caption with one shape in a wrong colour. Training and validation pairs never share a prompt
  (:func:`datamodules.demo_tasks.pair_split`); they do not train the tokenizer;

and ``<out>/eval/<task>.jsonl`` (+ ``eval/images/``), the held-out items of ``demo_arith``,
``demo_count`` and ``demo_color``, none of which occurs in any shard, and ``<out>/tokenizer``
(byte-level BPE with single-digit numbers, every special token of the pipeline, the chat
template). The content is a function of the seed alone; it is small and regular enough for the
tiny model to learn.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Tuple

import webdataset as wds
from PIL import Image

from datamodules.demo_tasks import (
    COLORS,
    PAIR_TYPES,
    RL_SOURCES,
    SHAPES,
    Item,
    arith_item,
    asked_color,
    caption,
    color_question,
    count_steps,
    fact_text,
    fresh,
    held_out_items,
    image_key,
    kingdoms,
    long_text,
    passkey_text,
    preference_pair,
    rl_prompt,
    scene,
    slipped,
    task_makers,
)
from lit_bluelm.chat import cot_messages, render_chat
from lit_bluelm.tokenizer import train_tokenizer

MARKER = ".complete"
# bumped when the content changes (2: chain-of-thought shards, 3: the tokenizer's chat template,
# 4: single-digit numbers, SFT conversations, held-out evaluation items, 5: sums add a number's
# tens, then its ones, 6: counting by colour alone in
# scenes of 2-4 shapes, more image tasks in SFT, 7: scenes in reading order, counting thinks the
# caption and answers from it, a third of image texts ask a colour's count before the caption, 8:
# SFT task shares arith 0.3, count 0.25, colour 0.25, 9: counting asks the question before the
# image and thinks one short sentence, SFT task shares arith 0.25, count 0.45, colour 0.2, open
# 0.1, three times the SFT conversations, 10: passkey and long documents, the tokenizer trained
# on some of them, 11: preference pairs, which leave every earlier shard and the tokenizer as
# they were, 12: RL prompts, likewise, 13: a fifth of the thinking-mode SFT sums worked with a
# slip, which leaves every other shard and the tokenizer as they were); older sets are rewritten
VERSION = 13
# the tasks of an SFT conversation, with their shares
# (colour at 0.15 left the chat-format colour answer half learned on some runs, 0.51, though the
# same checkpoint named the colour in pre-training's words at 0.99; at 0.25 it read 0.99; counting
# a named colour is the slowest skill to learn, docs/stages.md: at 0.25 it stayed at the majority
# answer, at 0.45 over 1,800 steps it passed 0.70 on three seeds)
SFT_TASKS = {"demo_arith": 0.25, "demo_count": 0.45, "demo_color": 0.2, "demo_open": 0.1}
# the share of the thinking-mode SFT sums worked with one slip (datamodules.demo_tasks.slipped): SFT
# imitates its data, slips included, and repeats them when it samples; GRPO's verifiable reward is
# what teaches past them (docs/stages.md, Stage 6)
SLIP_RATE = 0.2
SYSTEM_PROMPT = "You are a helpful assistant."


def is_current(out: str | Path) -> bool:
    """Is ``out`` a complete demo set of this version?"""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == VERSION
    except ValueError:
        return False


@dataclass(frozen=True)
class DemoSpec:
    """How much demo data to write (the defaults are what `make demo` uses)."""

    train_shards: int = 8
    val_shards: int = 4
    train_per_shard: int = 400
    sft_scale: int = 3  # SFT's train shards hold this many times train_per_shard (it trains longest)
    val_per_shard: int = 64
    long_per_shard: int = 48  # long documents per train shard (a val shard holds a sixth)
    vocab_size: int = 1024
    eval_items: int = 300  # held-out items per evaluation task
    seed: int = 0


# ----------------------------------------------------------------------------- samples


def shapes_sample(rng: random.Random, held_out: FrozenSet[str]) -> Tuple[Image.Image, str, Dict]:
    """A canvas with 1-4 coloured shapes and its caption (reading order), with one counting
    question: two in three after the caption (answered from it), one in three a colour's count
    before it (answered from the image alone, as the demo's counting without thinking is)."""
    while True:
        image, objects = scene(rng, 1, 4)
        if image_key(image) not in held_out:
            break
    n = len(objects)
    meta = {"task": "caption", "width": image.width, "height": image.height, "objects": objects}
    if rng.random() < 1 / 3:  # a colour asked as the demo_count items ask it
        question, _ = color_question(objects, asked_color(rng, objects))
        return image, f"Question: {question} {caption(objects)}", meta
    kind = rng.choice(("shape", "color", "total"))
    if kind == "shape":
        shape = rng.choice(SHAPES)
        count = sum(s == shape for _, s in objects)
        question = f"How many {shape}s are there? Answer: {count}."
    elif kind == "color":
        question, _ = color_question(objects, rng.choice(list(COLORS)))
    else:
        question = f"How many shapes are there? Answer: {n}."
    return image, f"{caption(objects)} Question: {question}", meta


def addition_text(rng: random.Random, held_out: FrozenSet[str]) -> str:
    """A sum of 3-5 numbers worked with a running total (the demo_arith skill, as plain text)."""
    item = fresh(arith_item, rng, held_out)
    return f"Question: {item.prompt} Solution: {item.thinking} The answer is {item.answer}."


def counting_cot(rng: random.Random) -> Dict[str, str]:
    """Counting the shapes of one colour in a described scene, one object at a time."""
    objects = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(rng.randint(2, 5))]
    color = rng.choice([c for c, _ in objects] + [rng.choice(list(COLORS))])
    thinking, count = count_steps(objects, color)
    return {
        "question": f"{caption(objects)} How many {color} shapes are there?",
        "thinking": thinking,
        "answer": str(count),
        "task": "counting",
    }


def cot_sample(rng: random.Random, held_out: FrozenSet[str]) -> Dict[str, str]:
    """A sum with a running total, or counting in a described scene."""
    if rng.random() < 0.85:
        item = fresh(arith_item, rng, held_out)
        return {
            "question": item.prompt,
            "thinking": item.thinking,
            "answer": item.answer,
            "task": "arithmetic",
        }
    return counting_cot(rng)


def text_sample(
    rng: random.Random, table: List[Dict[str, str]], held_out: FrozenSet[str]
) -> Tuple[str, Dict]:
    if rng.random() < 0.4:
        return fact_text(rng, table), {"task": "fact"}
    return addition_text(rng, held_out), {"task": "arithmetic"}


def sft_conversation(
    rng: random.Random, makers, held_out: FrozenSet[str], think: bool
) -> Tuple[List[Dict[str, str]], Item]:
    """An SFT conversation in one mode: a task item as the final exchange, sometimes after a
    system prompt or an earlier question (whose answer is kept alone, as the chat format does)."""
    task = rng.choices(list(SFT_TASKS), weights=list(SFT_TASKS.values()))[0]
    item = fresh(makers[task], rng, held_out)
    messages: List[Dict[str, str]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    if rng.random() < 0.15:
        earlier = makers["demo_open"](rng)
        messages += [
            {"role": "user", "content": earlier.prompt},
            {"role": "assistant", "content": earlier.answer},
        ]
    messages.append({"role": "user", "content": item.user_content()})
    reply = {"role": "assistant", "content": item.answer}
    if think:
        reply["thinking"] = item.thinking
    messages.append(reply)
    return messages, item


def with_slip(messages: List[Dict[str, str]], item: Item) -> List[Dict[str, str]]:
    """A thinking-mode conversation whose final sum is, for :data:`SLIP_RATE` of the sums, worked
    with a slip (its own draws, from the sum: every other sample stays as it was)."""
    slips = random.Random(f"slip/{item.key}")
    if item.task != "demo_arith" or slips.random() >= SLIP_RATE:
        return messages
    item = slipped(item, slips)
    return [*messages[:-1], {**messages[-1], "thinking": item.thinking, "content": item.answer}]


# ----------------------------------------------------------------------------- writing


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path, samples: Iterator[Dict[str, bytes]]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def _json_sample(key: str, meta: Dict, image) -> Dict[str, bytes]:
    """A sample of a ``json`` member and, when the item has an image, ``0.png``."""
    sample = {"__key__": key, "json": json.dumps(meta).encode()}
    if image is not None:
        sample["0.png"] = _png(image)
    return sample


def _image_text_samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
    for i in range(n):
        image, caption, meta = shapes_sample(rng, ctx.held_out)
        ctx.texts.append(caption)
        yield {
            "__key__": f"{prefix}-{i:05d}",
            "png": _png(image),
            "txt": caption.encode(),
            "json": json.dumps(meta).encode(),
        }


def _text_samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
    for i in range(n):
        text, meta = text_sample(rng, ctx.table, ctx.held_out)
        ctx.texts.append(text)
        key = f"{prefix}-{i:05d}"
        if meta["task"] == "fact":  # both text layouts occur: txt, and json with a text field
            yield {"__key__": key, "txt": text.encode()}
        else:
            yield {"__key__": key, "json": json.dumps({"text": text, **meta}).encode()}


def _document_samples(make, tokenizer_share: int):
    """Text documents of ``make(rng, table)``; one in ``tokenizer_share`` also trains the
    tokenizer (the filler repeats: a few teach it the words)."""

    def samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
        for i in range(n):
            text = make(rng, ctx.table)
            if i % tokenizer_share == 0:
                ctx.texts.append(text)
            yield {"__key__": f"{prefix}-{i:05d}", "txt": text.encode()}

    return samples


def _cot_samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
    for i in range(n):
        sample = cot_sample(rng, ctx.held_out)
        ctx.texts.append(render_chat(cot_messages(sample["question"], sample["thinking"], sample["answer"])))
        yield {"__key__": f"{prefix}-{i:05d}", "json": json.dumps(sample).encode()}


def _sft_samples(think: bool):
    def samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
        for i in range(n):
            messages, item = sft_conversation(rng, ctx.makers, ctx.held_out, think)
            ctx.texts.append(render_chat(messages))  # the tokenizer learns from the clean replies
            if think:
                messages = with_slip(messages, item)
            yield _json_sample(f"{prefix}-{i:05d}", {"messages": messages, "task": item.task}, item.image)

    return samples


def _pair_samples(pair_type: str):
    """Preference pairs of one type (``json``: messages, chosen, rejected, task; ``0.png``)."""

    def samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
        split = prefix.split("-", 1)[0]
        for i in range(n):
            item, chosen, rejected = preference_pair(pair_type, rng, ctx.makers, ctx.held_out, split)
            meta = {
                "messages": [{"role": "user", "content": item.user_content()}],
                "chosen": chosen,
                "rejected": rejected,
                "task": pair_type,
            }
            yield _json_sample(f"{prefix}-{i:05d}", meta, item.image)

    return samples


def _rl_samples(source: str):
    """RL prompts of one source (``json``: messages, task, answer; ``0.png``)."""

    def samples(rng: random.Random, ctx: _Context, prefix: str, n: int) -> Iterator[Dict]:
        split = prefix.split("-", 1)[0]
        for i in range(n):
            item = rl_prompt(source, rng, ctx.makers, ctx.held_out, split)
            meta = {
                "messages": [{"role": "user", "content": item.user_content()}],
                "task": item.task,
                "answer": item.answer,
            }
            yield _json_sample(f"{prefix}-{i:05d}", meta, item.image)

    return samples


SOURCES = {  # source name -> writer of its samples
    "image_text": _image_text_samples,
    "text": _text_samples,
    "cot": _cot_samples,
    "sft_think": _sft_samples(think=True),
    "sft_nothink": _sft_samples(think=False),
    "passkey": _document_samples(passkey_text, 4),
    "long": _document_samples(long_text, 8),
    **{name: _pair_samples(name) for name in PAIR_TYPES},
    **{name: _rl_samples(name) for name in RL_SOURCES},
}


@dataclass
class _Context:
    table: List[Dict[str, str]]
    makers: Dict
    held_out: FrozenSet[str]
    texts: List[str]  # training texts (for the tokenizer)


def write_eval(out: Path, items: Dict[str, List[Item]]) -> None:
    """``<out>/<task>.jsonl`` (prompt, answer, metric, image path relative to the file) and
    ``<out>/images/``. An item asked before its image has the ``<image>`` marker in its prompt
    (the evaluation puts the image first otherwise)."""
    (out / "images").mkdir(parents=True)
    for task, task_items in items.items():
        with open(out / f"{task}.jsonl", "w") as f:
            for i, item in enumerate(task_items):
                prompt = item.user_content() if item.question_first else item.prompt
                line = {"prompt": prompt, "answer": item.answer, "metric": item.metric}
                if item.image is not None:
                    name = f"images/{task}-{i:05d}.png"
                    item.image.save(out / name)
                    line["image"] = name
                f.write(json.dumps(line) + "\n")


def _samples_per_shard(spec: DemoSpec, split: str, name: str, per_shard: int) -> int:
    if name == "long":
        return spec.long_per_shard if split == "train" else max(1, spec.long_per_shard // 6)
    if split == "train" and name.startswith("sft_"):
        return per_shard * spec.sft_scale
    return per_shard


def write_demo(out: str | Path, spec: DemoSpec = DemoSpec(), force: bool = False) -> Path:
    """Write the demo shards, held-out evaluation items and tokenizer to ``out`` (atomically: a
    crash leaves no half set)."""
    out = Path(out)
    if is_current(out) and not force:
        return out
    force = force or out.exists()  # an older version is replaced
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    table = kingdoms(spec.seed)
    held_out = held_out_items(spec.seed, spec.eval_items)
    write_eval(tmp / "eval", held_out)
    train_texts: List[str] = []
    keys = frozenset(item.key for items in held_out.values() for item in items)
    for split, shards, per_shard in (
        ("train", spec.train_shards, spec.train_per_shard),
        ("val", spec.val_shards, spec.val_per_shard),
    ):
        (tmp / split).mkdir(parents=True)
        ctx = _Context(table, task_makers(table), keys, train_texts if split == "train" else [])
        for s in range(shards):
            for name, samples in SOURCES.items():
                rng = random.Random(f"{spec.seed}/{split}/{name}/{s}")
                n = _samples_per_shard(spec, split, name, per_shard)
                _write_shard(tmp / split / f"{name}-{s:06d}.tar", samples(rng, ctx, f"{split}-{name}{s}", n))
    train_tokenizer(train_texts, spec.vocab_size, tmp / "tokenizer")
    (tmp / MARKER).write_text(json.dumps({"version": VERSION, **spec.__dict__}))
    if force:
        shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process (rank) finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / MARKER).exists():
            raise
    print(
        f"demo data: wrote {len(SOURCES) * (spec.train_shards + spec.val_shards)} shards, "
        f"{len(held_out)} held-out evaluation sets of {spec.eval_items} items and a tokenizer "
        f"to {out} in {time.time() - start:.1f}s",
        flush=True,
    )
    return out


def uses_demo_data(cfg) -> bool:
    """Does the config read from ``data.demo_dir`` (so the demo data may be written for it)?"""
    root = Path(cfg.data.demo_dir).resolve()
    paths = [cfg.tokenizer.path] + [p for s in cfg.data.sources.values() for p in (s.train, s.val) if p]
    return any(Path(p).resolve().is_relative_to(root) for p in paths)


def ensure_demo_data(cfg) -> None:
    """Write the demo data on first use of a config that points into ``data.demo_dir``."""
    if uses_demo_data(cfg) and not is_current(cfg.data.demo_dir):
        write_demo(cfg.data.demo_dir)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--force", action="store_true", help="rewrite even if it exists")
    args = parser.parse_args(argv)
    out = write_demo(args.out, force=args.force)
    print(f"demo data ready in {out}")


if __name__ == "__main__":
    main()
