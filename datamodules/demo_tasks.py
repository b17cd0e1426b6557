"""The demo's tasks: rendered scenes, invented facts and sums, each item with a prompt, worked
thinking and a short answer, written as pre-training text, chain-of-thought samples, SFT
conversations and held-out evaluation items by :mod:`datamodules.demo`.

* ``demo_arith``: the sum of 3-5 numbers of 1-2 digits; the thinking keeps a running total,
  adding a two-digit number's tens and then its ones (easy step by step, hard in one shot for a
  tiny model).
* ``demo_count``: how many shapes of a colour are in an image of 2-4 shapes, asked before the image
  (``How many red shapes are there?\n<image>``: the image tokens then come after the colour they
  are to be matched with, which the tiny model learns far sooner than the reverse; see
  docs/stages.md); the thinking is one short sentence (``I count the red shapes in the image:
  1.``).
* ``demo_color``: the colour of the one shape in an image; a direct answer (thinking adds little).
* ``demo_open``: short open answers about invented kingdoms (their capital, river, flag).

Every item has a ``key`` that identifies its content (the numbers of a sum, the pixels of an
image), so the held-out evaluation items can be kept out of every training shard.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from PIL import Image, ImageDraw

from lit_bluelm.needle import FILLER, passkey_document, records_document
from lit_bluelm.tokenizer import IMAGE

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CANVASES = ((112, 112), (224, 112), (112, 224), (224, 224))  # varied aspect ratios for AnyRes
CELL = 56
BACKGROUND = (245, 245, 245)
EVAL_TASKS = ("demo_arith", "demo_count", "demo_color")
METRICS = {"demo_arith": "numeric", "demo_count": "numeric", "demo_color": "choice", "demo_open": "exact"}


@dataclass(frozen=True)
class Item:
    """One task item. ``prompt`` is the user's question without the image marker: an item with an
    image is asked as ``<image>\\n{prompt}``, or as ``{prompt}\\n<image>`` when
    ``question_first`` (:meth:`user_content`)."""

    task: str
    prompt: str
    thinking: str
    answer: str
    key: str
    image: Optional[Image.Image] = None
    question_first: bool = False

    @property
    def metric(self) -> str:
        return METRICS[self.task]

    def user_content(self) -> str:
        if self.image is None:
            return self.prompt
        return f"{self.prompt}\n{IMAGE}" if self.question_first else f"{IMAGE}\n{self.prompt}"


def image_key(image: Image.Image) -> str:
    """The identity of an image: a digest of its pixels (not of an encoding of them)."""
    rgb = image.convert("RGB")
    return "image:" + hashlib.sha1(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()


def sum_key(numbers: List[int]) -> str:
    return "sum:" + "+".join(map(str, numbers))


# ----------------------------------------------------------------------------- scenes

Obj = Tuple[str, str]  # (colour, shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def scene(rng: random.Random, min_objects: int, max_objects: int) -> Tuple[Image.Image, List[Obj]]:
    """A canvas with coloured shapes, one per 56px cell, listed in reading order (row by row, top
    to bottom, left to right within a row): the order of the image tokens, which are raster
    ordered within a tile and in the thumbnail."""
    fits = [c for c in CANVASES if (c[0] // CELL) * (c[1] // CELL) >= min_objects]
    width, height = rng.choice(fits)
    cells = [(c, r) for r in range(height // CELL) for c in range(width // CELL)]
    chosen = sorted(
        rng.sample(cells, rng.randint(min_objects, min(max_objects, len(cells)))), key=lambda cell: cell[::-1]
    )
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = []
    for col, row in chosen:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        size = rng.randint(30, 46)
        x = col * CELL + rng.randint(2, CELL - size - 2)
        y = row * CELL + rng.randint(2, CELL - size - 2)
        _draw(draw, shape, (x, y, x + size, y + size), COLORS[color])
        objects.append((color, shape))
    return image, objects


def plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def join_words(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(objects: List[Obj]) -> str:
    return join_words([f"a {color} {shape}" for color, shape in objects])


def caption(objects: List[Obj]) -> str:
    """``There are 2 shapes: a red circle and a blue square.``: a scene in reading order."""
    n = len(objects)
    return f"There {'is' if n == 1 else 'are'} {n} {plural('shape', n)}: {describe(objects)}."


def count_steps(objects: List[Obj], color: str) -> Tuple[str, int]:
    """Counting the shapes of ``color`` one at a time, by colour alone (``Shape 2 is red: 1.``):
    the thinking and the count. It names no shape kind: perceiving one is not needed to count a
    colour."""
    steps, count = [], 0
    for i, (c, _) in enumerate(objects, 1):
        if c == color:
            count += 1
            steps.append(f"Shape {i} is {color}: {count}.")
        else:
            steps.append(f"Shape {i} is {c}.")
    return " ".join(steps + [f"That makes {count}."]), count


def asked_color(rng: random.Random, objects: List[Obj]) -> str:
    """The colour a counting question asks: mostly one that is in the scene."""
    return rng.choice([c for c, _ in objects]) if rng.random() < 0.8 else rng.choice(list(COLORS))


def color_question(objects: List[Obj], color: str) -> Tuple[str, int]:
    """``How many red shapes are there? Answer: 1.`` (pre-training's question) and the count."""
    count = sum(c == color for c, _ in objects)
    return f"How many {color} shapes are there? Answer: {count}.", count


# ----------------------------------------------------------------------------- the tasks


def sum_steps(numbers: List[int], slip: Optional[Tuple[int, int]] = None) -> Tuple[str, int]:
    """The thinking of a sum (a running total; a two-digit number's tens, then its ones) and the
    total it ends on. ``slip=(k, by)``: the k-th result written (0-based) is off by ``by`` and the
    chain carries on from it, as a teacher's slip would."""
    steps: List[str] = []
    results = 0

    def result(value: int) -> int:
        nonlocal results
        results += 1
        return value + slip[1] if slip is not None and results - 1 == slip[0] else value

    total = numbers[0]
    for x in numbers[1:]:
        tens = x // 10 * 10
        if x >= 10 and x % 10:  # a two-digit number: its tens, then its ones
            before, mid = total, result(total + tens)
            total = result(mid + x % 10)
            steps.append(f"{before} + {tens} = {mid}, {mid} + {x % 10} = {total}.")
        else:
            before, total = total, result(total + x)
            steps.append(f"{before} + {x} = {total}.")
    return " ".join(steps), total


def arith_item(rng: random.Random) -> Item:
    numbers = [
        rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(10, 99) for _ in range(rng.randint(3, 5))
    ]
    thinking, total = sum_steps(numbers)
    prompt = f"What is {' + '.join(map(str, numbers))}?"
    return Item("demo_arith", prompt, thinking, str(total), sum_key(numbers))


SLIPS = (-10, -1, 1, 10)  # how far a slipped result is off: a carry or a last digit


def slipped(item: Item, rng: random.Random) -> Item:
    """``item`` (a ``demo_arith`` one) worked with one slip at a random result (off by one of
    :data:`SLIPS`, never below 1), the answer the chain's: a wrong worked solution, as an
    unfiltered teacher writes some."""
    numbers = [int(x) for x in item.key.removeprefix("sum:").split("+")]
    results = item.thinking.count(" = ")  # the places a slip can be
    while True:
        k, by = rng.randrange(results), rng.choice(SLIPS)
        thinking, total = sum_steps(numbers, (k, by))
        if all(int(n) > 0 for n in re.findall(r"-?\d+", thinking)):
            return Item(item.task, item.prompt, thinking, str(total), item.key)


def count_item(rng: random.Random) -> Item:
    image, objects = scene(rng, 2, 4)  # the scenes of pre-training's captions hold 1-4 shapes
    color = asked_color(rng, objects)
    _, count = color_question(objects, color)
    return Item(
        "demo_count",
        f"How many {color} shapes are there?",
        f"I count the {color} shapes in the image: {count}.",
        str(count),
        image_key(image),
        image,
        question_first=True,
    )


COLOR_QUESTION = f"What colour is the shape: {join_words(list(COLORS)).replace(' and ', ' or ')}?"


def color_item(rng: random.Random) -> Item:
    image, [(color, shape)] = scene(rng, 1, 1)
    return Item(
        "demo_color", COLOR_QUESTION, f"The shape is a {color} {shape}.", color, image_key(image), image
    )


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


def open_item(rng: random.Random, table: List[Dict[str, str]]) -> Item:
    k = rng.choice(table)
    prompt, thinking, answer = rng.choice(
        (
            (
                f"What is the capital of {k['kingdom']}?",
                f"The capital of {k['kingdom']} is {k['capital']}.",
                k["capital"],
            ),
            (
                f"Which river flows through {k['kingdom']}?",
                f"The river {k['river']} flows through {k['kingdom']}.",
                k["river"],
            ),
            (
                f"What colour is the flag of {k['kingdom']}?",
                f"The flag of {k['kingdom']} is {k['color']}.",
                k["color"],
            ),
        )
    )
    return Item("demo_open", prompt, thinking, answer, f"open:{prompt}")


def task_makers(table: List[Dict[str, str]]) -> Dict[str, Callable[[random.Random], Item]]:
    return {
        "demo_arith": arith_item,
        "demo_count": count_item,
        "demo_color": color_item,
        "demo_open": lambda rng: open_item(rng, table),
    }


def held_out_items(seed: int, n: int) -> Dict[str, List[Item]]:
    """The fixed evaluation items: ``n`` distinct ones per task of :data:`EVAL_TASKS`."""
    makers = task_makers(kingdoms(seed))
    out: Dict[str, List[Item]] = {}
    for task in EVAL_TASKS:
        rng, items, keys = random.Random(f"{seed}/eval/{task}"), [], set()
        while len(items) < n:
            item = makers[task](rng)
            if item.key not in keys:
                keys.add(item.key)
                items.append(item)
        out[task] = items
    return out


def fresh(make: Callable[[random.Random], Item], rng: random.Random, held_out: FrozenSet[str]) -> Item:
    """An item of ``make`` that is not a held-out one (drawn again until it is not)."""
    while True:
        item = make(rng)
        if item.key not in held_out:
            return item


# ----------------------------------------------------------------------------- texts


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


def haystack(table: List[Dict[str, str]]):
    """Filler for the demo's needle documents: the classic haystack sentences, and one in three a
    fact about the kingdoms."""

    def filler(rng: random.Random) -> str:
        return " " + fact_text(rng, table) if rng.random() < 1 / 3 else rng.choice(FILLER)

    return filler


def passkey_text(rng: random.Random, table: List[Dict[str, str]]) -> str:
    """A short needle document: 4 to 50 filler sentences (up to about 400 tokens)."""
    return passkey_document(rng, rng.randint(4, 50), haystack(table))


def long_text(rng: random.Random, table: List[Dict[str, str]]) -> str:
    """A long document of 70 to 260 filler sentences (about 500 to 2,000 tokens): a passkey, or
    two to four named codes, far back, and the question at the end."""
    sentences = rng.randint(70, 260)
    if rng.random() < 0.5:
        return passkey_document(rng, sentences, haystack(table))
    return records_document(rng, sentences, [k["kingdom"] for k in table], haystack(table))


# ----------------------------------------------------------------------------- preference pairs

# the demo's preference pair types (one source each, so val/accuracy/<source> is per type)
PAIR_TYPES = ("pref_think", "pref_topic", "pref_color")
DESCRIBE = "Describe the image."


def pair_split(key: str) -> str:
    """Which split a pair's prompt belongs to ("val" for one in eight keys, else "train"), so
    the held-out pairs never share a prompt with a training pair."""
    return "val" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % 8 == 0 else "train"


def _reply(answer: str, thinking: Optional[str] = None) -> Dict[str, str]:
    return {"content": answer} if thinking is None else {"content": answer, "thinking": thinking}


def _wrong_sum(rng: random.Random, total: int) -> int:
    while True:
        wrong = total + rng.choice((-20, -10, 10, 20)) + rng.randint(-3, 3)
        if wrong != total and wrong > 0:
            return wrong


def think_pair(rng: random.Random, item: Item) -> Tuple[Dict, Dict]:
    """A worked sum whose answer follows from its thinking vs the same thinking with an answer
    that contradicts it."""
    wrong = _wrong_sum(rng, int(item.answer))
    return _reply(item.answer, item.thinking), _reply(str(wrong), item.thinking)


def topic_pair(rng: random.Random, item: Item, other: Item) -> Tuple[Dict, Dict]:
    """The answer to the question vs an answer to another task's question (it ignores this one)."""
    return _reply(item.answer), _reply(other.answer)


def describe_item(rng: random.Random) -> Tuple[Item, List[Obj]]:
    """An image of one or two shapes to describe, with its caption as the answer."""
    image, objects = scene(rng, 1, 2)
    return Item("demo_describe", DESCRIBE, "", caption(objects), image_key(image), image), objects


def color_pair(rng: random.Random, objects: List[Obj]) -> Tuple[Dict, Dict]:
    """The scene's caption vs the same caption with one shape in a wrong colour."""
    i = rng.randrange(len(objects))
    wrong = list(objects)
    wrong[i] = (rng.choice([c for c in COLORS if c != objects[i][0]]), objects[i][1])
    return _reply(caption(objects)), _reply(caption(wrong))


def preference_pair(
    pair_type: str,
    rng: random.Random,
    makers: Dict[str, Callable[[random.Random], Item]],
    held_out: FrozenSet[str],
    split: str,
) -> Tuple[Item, Dict, Dict]:
    """A pair of ``pair_type`` whose prompt is of ``split`` (:func:`pair_split`) and not a held-out
    evaluation item: (the prompt's item, chosen, rejected)."""
    while True:
        if pair_type == "pref_think":
            item = arith_item(rng)
            chosen, rejected = think_pair(rng, item)
        elif pair_type == "pref_topic":
            tasks = ("demo_arith", "demo_count", "demo_color", "demo_open")
            task, other = rng.sample(tasks, 2)
            item = makers[task](rng)
            chosen, rejected = topic_pair(rng, item, makers[other](rng))
        elif pair_type == "pref_color":
            item, objects = describe_item(rng)
            chosen, rejected = color_pair(rng, objects)
        else:
            raise ValueError(f"unknown pair type '{pair_type}'; valid: {', '.join(PAIR_TYPES)}")
        if item.key not in held_out and pair_split(item.key) == split and chosen != rejected:
            return item, chosen, rejected


# ----------------------------------------------------------------------------- RL prompts

# the demo's RL prompt sources: name -> the task (its reward route) whose items they ask
RL_SOURCES = {"rl_arith": "demo_arith", "rl_count": "demo_count", "rl_open": "demo_open"}


def rl_prompt(
    source: str,
    rng: random.Random,
    makers: Dict[str, Callable[[random.Random], Item]],
    held_out: FrozenSet[str],
    split: str,
) -> Item:
    """An RL prompt's item of ``source``'s task: not a held-out evaluation item, its key of
    ``split`` (:func:`pair_split`: the RL validation prompts never occur in training)."""
    if source not in RL_SOURCES:
        raise ValueError(f"unknown RL source '{source}'; valid: {', '.join(RL_SOURCES)}")
    while True:
        item = makers[RL_SOURCES[source]](rng)
        if item.key not in held_out and pair_split(item.key) == split:
            return item
