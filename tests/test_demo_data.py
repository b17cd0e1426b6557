"""The demo data: held-out evaluation items (format, size, kept out of every shard by content),
the tasks' worked thinking, the slipped sums of thinking-mode SFT, and single-digit numbers in the
demo tokenizer."""

import io
import json
import random
import re
import tarfile

import pytest
from PIL import Image

from datamodules.demo_tasks import (
    BACKGROUND,
    CELL,
    COLORS,
    EVAL_TASKS,
    arith_item,
    color_item,
    count_item,
    fresh,
    held_out_items,
    image_key,
    scene,
    slipped,
    sum_steps,
)
from lit_bluelm.tokenizer import load_tokenizer

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def _eval_lines(demo_dir, task):
    return [json.loads(line) for line in (demo_dir / "eval" / f"{task}.jsonl").read_text().splitlines()]


def _shard_contents(demo_dir):
    """Every text member (txt, json) and the pixel digest of every image in every shard."""
    texts, images = [], set()
    for shard in sorted(demo_dir.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(IMAGE_EXTS):
                    images.add(image_key(Image.open(io.BytesIO(data))))
                else:
                    texts.append(data.decode("utf-8"))
    return "\n".join(texts), images


def test_held_out_sets_have_300_items_in_the_documented_format(demo_dir):
    for task in EVAL_TASKS:
        lines = _eval_lines(demo_dir, task)
        assert len(lines) >= 300
        for line in lines:
            assert set(line) <= {"prompt", "answer", "image", "metric"}
            assert line["metric"] in ("exact", "numeric", "choice")
            assert isinstance(line["prompt"], str) and isinstance(line["answer"], str)
            if "image" in line:  # relative to the file
                Image.open(demo_dir / "eval" / line["image"]).verify()
    assert all("image" not in line for line in _eval_lines(demo_dir, "demo_arith"))
    # counting is asked as SFT asks it: the question, then the image
    assert all(
        "image" in line and line["prompt"].endswith("?\n<image>")
        for line in _eval_lines(demo_dir, "demo_count")
    )
    assert all("<image>" not in line["prompt"] for line in _eval_lines(demo_dir, "demo_color"))
    arith = _eval_lines(demo_dir, "demo_arith")
    assert len({line["prompt"] for line in arith}) == len(arith)  # distinct items
    for line in arith:  # the answer is the sum the prompt asks for
        numbers = [int(n) for n in line["prompt"].removeprefix("What is ").rstrip("?").split(" + ")]
        assert 3 <= len(numbers) <= 5 and all(1 <= n <= 99 for n in numbers)
        assert int(line["answer"]) == sum(numbers)


def test_no_held_out_item_occurs_in_any_shard(demo_dir):
    texts, images = _shard_contents(demo_dir)
    assert "What is " in texts and len(images) > 100  # the scan saw the shards' content
    for task in EVAL_TASKS:
        for line in _eval_lines(demo_dir, task):
            if "image" in line:  # an image item: its image is nowhere in training
                assert image_key(Image.open(demo_dir / "eval" / line["image"])) not in images
            else:  # a text item: its prompt text is nowhere in training
                assert line["prompt"] not in texts, line["prompt"]


def test_training_items_are_drawn_again_when_they_are_held_out():
    first = arith_item(random.Random(1))
    again = fresh(arith_item, random.Random(1), frozenset({first.key}))
    assert again.key != first.key and again.prompt != first.prompt
    image_item = count_item(random.Random(2))
    assert fresh(count_item, random.Random(2), frozenset({image_item.key})).key != image_item.key
    # the held-out sets are fixed by the seed
    assert [i.prompt for i in held_out_items(0, 5)["demo_arith"]] == [
        i.prompt for i in held_out_items(0, 5)["demo_arith"]
    ]


def test_the_worked_thinking_of_each_task():
    item = arith_item(random.Random(3))
    numbers = [int(n) for n in item.prompt.removeprefix("What is ").rstrip("?").split(" + ")]
    steps = item.thinking.split(". ")
    assert len(steps) == len(numbers) - 1  # one running total per added number
    assert item.thinking.endswith(f"= {sum(numbers)}.") and item.answer == str(sum(numbers))
    # a one-digit number in one step; a two-digit number's tens, then its ones
    assert (item.prompt, item.thinking) == ("What is 26 + 8 + 18?", "26 + 8 = 34. 34 + 10 = 44, 44 + 8 = 52.")
    counted = count_item(random.Random(4))
    # counting asks before the image, so the image tokens come after the colour they are matched with
    assert counted.user_content() == f"{counted.prompt}\n<image>"
    assert color_item(random.Random(4)).user_content().startswith("<image>\n")
    # its thinking names the asked colour and the count of that colour in the scene
    _, objects = scene(random.Random(4), 2, 4)
    color = counted.prompt.removeprefix("How many ").removesuffix(" shapes are there?")
    count = sum(c == color for c, _ in objects)
    assert counted.thinking == f"I count the {color} shapes in the image: {count}." and counted.answer == str(
        count
    )


def _wrong_results(thinking):
    """The written results ``a + b = c`` of a sum's thinking where c != a + b."""
    found = re.findall(r"(\d+) \+ (\d+) = (\d+)", thinking)
    assert found
    return [(a, b, c) for a, b, c in found if int(a) + int(b) != int(c)]


def test_a_slipped_sum_is_off_at_one_result_and_carries_on_from_it():
    numbers = [26, 8, 18]
    assert sum_steps(numbers) == ("26 + 8 = 34. 34 + 10 = 44, 44 + 8 = 52.", 52)
    # the second result written (the tens of 18) off by 10: the chain and the answer follow it
    assert sum_steps(numbers, (1, 10)) == ("26 + 8 = 34. 34 + 10 = 54, 54 + 8 = 62.", 62)
    assert sum_steps(numbers, (0, -1)) == ("26 + 8 = 33. 33 + 10 = 43, 43 + 8 = 51.", 51)
    for seed in range(50):
        item = arith_item(random.Random(seed))
        slip = slipped(item, random.Random(seed))
        assert (slip.prompt, slip.key, slip.task) == (item.prompt, item.key, item.task)
        [(a, b, c)] = _wrong_results(slip.thinking)
        assert int(c) - int(a) - int(b) in (-10, -1, 1, 10) and int(c) > 0
        assert slip.thinking.endswith(f"= {slip.answer}.") and slip.answer != item.answer


def test_a_fifth_of_the_thinking_mode_sft_sums_hold_a_slip(demo_dir):
    by_mode = {}
    for mode in ("sft_think", "sft_nothink"):
        replies = []
        for shard in sorted((demo_dir / "train").glob(f"{mode}-*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())
                        if meta["task"] == "demo_arith":
                            replies.append(meta["messages"][-1])
        by_mode[mode] = replies
    think = by_mode["sft_think"]
    wrong = [r for r in think if _wrong_results(r["thinking"])]
    assert len(think) >= 50 and 0.1 <= len(wrong) / len(think) <= 0.3, (len(wrong), len(think))
    for reply in think:  # one slip at most, and the answer is where the chain ends
        assert len(_wrong_results(reply["thinking"])) <= 1
        assert reply["thinking"].endswith(f"= {reply['content']}.")
    assert by_mode["sft_nothink"] and all("thinking" not in r for r in by_mode["sft_nothink"])


def _cell_colours(image):
    """The colour of the shape in each 56px cell, cells in reading order (rows top to bottom)."""
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    found = []
    for top in range(0, image.height, CELL):
        for left in range(0, image.width, CELL):
            pixels = image.crop((left, top, left + CELL, top + CELL)).getdata()
            names = {by_rgb[p] for p in pixels if p != BACKGROUND and p in by_rgb}
            assert len(names) <= 1
            found += names
    return found


@pytest.mark.parametrize("seed", range(20))
def test_a_scene_lists_its_shapes_in_reading_order(seed):
    image, objects = scene(random.Random(seed), 2, 4)
    assert _cell_colours(image) == [color for color, _ in objects]


@pytest.mark.parametrize("text", ["123 + 45 = 168.", "What is 7 + 90?", "2026"])
def test_the_demo_tokenizer_writes_numbers_one_digit_a_token(demo_dir, text):
    tok = load_tokenizer(demo_dir / "tokenizer")
    pieces = [tok.decode([i]) for i in tok(text)["input_ids"]]
    assert "".join(pieces) == text
    for piece in pieces:
        digits = sum(ch.isdigit() for ch in piece)
        assert digits <= 1 and (digits == 0 or piece.strip().isdigit()), pieces
