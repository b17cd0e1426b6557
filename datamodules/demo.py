"""Deterministic demo data: WebDataset shards plus a tokenizer trained on them.

    python -m datamodules.demo [--out data/demo] [--force]

Writes ``<out>/{train,val}/image_text-NNNNNN.tar`` (rendered shapes: png + caption txt + json
metadata, with counting and colour questions), ``<out>/{train,val}/text-NNNNNN.tar`` (facts
about invented kingdoms as txt, arithmetic with worked solutions as json) and
``<out>/tokenizer`` (byte-level BPE, every special token of the pipeline). The content is a
function of the seed alone; it is small and regular enough for the tiny model to learn.
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
from typing import Dict, Iterator, List, Tuple

import webdataset as wds
from PIL import Image, ImageDraw

from lit_bluelm.chat import cot_messages, render_chat
from lit_bluelm.tokenizer import train_tokenizer

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CANVASES = ((112, 112), (224, 112), (112, 224), (224, 224))  # varied aspect ratios for AnyRes
CELL = 56
MARKER = ".complete"
VERSION = 3  # bumped when the content changes (2: chain-of-thought shards, 3: the tokenizer's chat template); older sets are rewritten


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
    val_per_shard: int = 64
    vocab_size: int = 1024
    seed: int = 0


# ----------------------------------------------------------------------------- image-text


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _join(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shapes_sample(rng: random.Random) -> Tuple[Image.Image, str, Dict]:
    """A canvas with 1-4 coloured shapes, a left-to-right caption and one question."""
    width, height = rng.choice(CANVASES)
    cells = [(c, r) for r in range(height // CELL) for c in range(width // CELL)]
    chosen = sorted(rng.sample(cells, rng.randint(1, min(4, len(cells)))))
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    objects = []
    for col, row in chosen:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        size = rng.randint(30, 46)
        x = col * CELL + rng.randint(2, CELL - size - 2)
        y = row * CELL + rng.randint(2, CELL - size - 2)
        _draw(draw, shape, (x, y, x + size, y + size), COLORS[color])
        objects.append((color, shape))
    n = len(objects)
    described = _join([f"a {color} {shape}" for color, shape in objects])
    caption = f"There {'is' if n == 1 else 'are'} {n} {_plural('shape', n)}: {described}."
    kind = rng.choice(("shape", "color", "total"))
    if kind == "shape":
        shape = rng.choice(SHAPES)
        count = sum(s == shape for _, s in objects)
        question = f"How many {shape}s are there? Answer: {count}."
    elif kind == "color":
        color = rng.choice(list(COLORS))
        count = sum(c == color for c, _ in objects)
        question = f"How many {color} shapes are there? Answer: {count}."
    else:
        question = f"How many shapes are there? Answer: {n}."
    meta = {"task": "caption", "width": width, "height": height, "objects": objects}
    return image, f"{caption} Question: {question}", meta


# ----------------------------------------------------------------------------- text

_SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "vor", "zu", "bel", "dra", "ni", "sol", "pur", "quen", "tha")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def kingdoms(seed: int, n: int = 40) -> List[Dict[str, str]]:
    """A fixed table of invented facts, the same in every shard (so it can be learned)."""
    rng = random.Random(f"kingdoms/{seed}")
    return [
        {"kingdom": _name(rng), "capital": _name(rng), "river": _name(rng), "color": rng.choice(list(COLORS))}
        for _ in range(n)
    ]


def fact_text(rng: random.Random, table: List[Dict[str, str]]) -> str:
    k = rng.choice(table)
    return rng.choice(
        (
            f"The capital of {k['kingdom']} is {k['capital']}.",
            f"{k['capital']} is the capital of {k['kingdom']}.",
            f"Question: What is the capital of {k['kingdom']}? Answer: {k['capital']}.",
            f"The river {k['river']} flows through {k['kingdom']}, whose flag is {k['color']}.",
            f"Question: What colour is the flag of {k['kingdom']}? Answer: {k['color']}.",
        )
    )


def addition_text(rng: random.Random) -> str:
    """Two-digit addition worked digit by digit, with carries."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    steps = [f"{a % 10} + {b % 10} = {ones}" + (f", write {ones % 10} carry 1." if ones >= 10 else ".")]
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    steps.append(f"{a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}.")
    return f"Question: What is {a} + {b}? Solution: {' '.join(steps)} The answer is {a + b}."


def addition_cot(rng: random.Random) -> Dict[str, str]:
    """Two-digit addition with the digit-by-digit working as the thinking."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    carry = ones // 10
    steps = [f"Ones: {a % 10} + {b % 10} = {ones}" + (f", write {ones % 10}, carry 1." if carry else ".")]
    tens = a // 10 + b // 10 + carry
    steps.append(f"Tens: {a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}.")
    steps.append(f"So {a} + {b} = {a + b}.")
    return {
        "question": f"What is {a} + {b}?",
        "thinking": " ".join(steps),
        "answer": str(a + b),
        "task": "arithmetic",
    }


def counting_cot(rng: random.Random) -> Dict[str, str]:
    """Counting the shapes of one colour in a described scene, one object at a time."""
    objects = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(rng.randint(2, 5))]
    color = rng.choice([c for c, _ in objects] + [rng.choice(list(COLORS))])
    described = _join([f"a {c} {s}" for c, s in objects])
    steps, count = [], 0
    for c, s in objects:
        if c == color:
            count += 1
            steps.append(f"The {c} {s} is {color}: {count}.")
        else:
            steps.append(f"The {c} {s} is not {color}.")
    return {
        "question": f"There are {described}. How many {color} shapes are there?",
        "thinking": " ".join(steps + [f"That makes {count}."]),
        "answer": str(count),
        "task": "counting",
    }


def cot_sample(rng: random.Random) -> Dict[str, str]:
    return addition_cot(rng) if rng.random() < 0.5 else counting_cot(rng)


def text_sample(rng: random.Random, table: List[Dict[str, str]]) -> Tuple[str, Dict]:
    if rng.random() < 0.5:
        return fact_text(rng, table), {"task": "fact"}
    return addition_text(rng), {"task": "arithmetic"}


# ----------------------------------------------------------------------------- writing


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path, samples: Iterator[Dict[str, bytes]]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def _image_text_samples(rng: random.Random, prefix: str, n: int, texts: List[str]) -> Iterator[Dict]:
    for i in range(n):
        image, caption, meta = shapes_sample(rng)
        texts.append(caption)
        yield {
            "__key__": f"{prefix}-{i:05d}",
            "png": _png(image),
            "txt": caption.encode(),
            "json": json.dumps(meta).encode(),
        }


def _text_samples(rng: random.Random, prefix: str, n: int, table, texts: List[str]) -> Iterator[Dict]:
    for i in range(n):
        text, meta = text_sample(rng, table)
        texts.append(text)
        key = f"{prefix}-{i:05d}"
        if meta["task"] == "fact":  # both text layouts occur: txt, and json with a text field
            yield {"__key__": key, "txt": text.encode()}
        else:
            yield {"__key__": key, "json": json.dumps({"text": text, **meta}).encode()}


def _cot_samples(rng: random.Random, prefix: str, n: int, texts: List[str]) -> Iterator[Dict]:
    for i in range(n):
        sample = cot_sample(rng)
        texts.append(render_chat(cot_messages(sample["question"], sample["thinking"], sample["answer"])))
        yield {"__key__": f"{prefix}-{i:05d}", "json": json.dumps(sample).encode()}


def write_demo(out: str | Path, spec: DemoSpec = DemoSpec(), force: bool = False) -> Path:
    """Write the demo shards and tokenizer to ``out`` (atomically: a crash leaves no half set)."""
    out = Path(out)
    if is_current(out) and not force:
        return out
    force = force or out.exists()  # an older version is replaced
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    table = kingdoms(spec.seed)
    train_texts: List[str] = []
    for split, shards, per_shard in (
        ("train", spec.train_shards, spec.train_per_shard),
        ("val", spec.val_shards, spec.val_per_shard),
    ):
        (tmp / split).mkdir(parents=True)
        texts = train_texts if split == "train" else []
        for s in range(shards):
            rng = random.Random(f"{spec.seed}/{split}/image_text/{s}")
            _write_shard(
                tmp / split / f"image_text-{s:06d}.tar",
                _image_text_samples(rng, f"{split}-it{s}", per_shard, texts),
            )
            rng = random.Random(f"{spec.seed}/{split}/text/{s}")
            _write_shard(
                tmp / split / f"text-{s:06d}.tar",
                _text_samples(rng, f"{split}-tx{s}", per_shard, table, texts),
            )
            rng = random.Random(f"{spec.seed}/{split}/cot/{s}")
            _write_shard(
                tmp / split / f"cot-{s:06d}.tar", _cot_samples(rng, f"{split}-cot{s}", per_shard, texts)
            )
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
        f"demo data: wrote {3 * (spec.train_shards + spec.val_shards)} shards and a tokenizer "
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
