"""Score conversations with a trained reward model.

    python -m lit_bluelm.score ckpt=<reward run or checkpoint> data=<file.jsonl> [json=false]
        [batch_size=32] [device=cpu]

Each line of ``data`` is a JSON object with ``messages`` (a conversation ending with the
assistant reply to score, ``{role, content, thinking?}``; a reply with ``thinking`` is in the
thinking mode) and, for conversations with ``<image>`` markers, ``images``: paths relative to
the file, in marker order. Prints one score per line, in the file's order (``json=true``: one
JSON object per line, ``{"line": n, "score": s}``, n the line's number in the file, from 1;
blank lines are skipped). ``ckpt`` is a run folder
(its best checkpoint by ``val/accuracy``, else ``checkpoints/last.ckpt``) or a checkpoint. Bad
input (a line that is not such an object, an image that does not decode, a reply longer than
the model's context, a run without a reward head) is one line on stderr and exit code 2, before
anything is printed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from lit_bluelm.cli import parse_key_values, run_main
from lit_bluelm.errors import ConfigError

TEXT_KEYS = ("ckpt", "data", "device")


@dataclass
class ScoreArgs:
    ckpt: Optional[str] = None
    data: Optional[str] = None
    json: bool = False
    batch_size: int = 32
    device: str = "cpu"


def parse_args(argv: Sequence[str]) -> ScoreArgs:
    args = parse_key_values(ScoreArgs, argv, TEXT_KEYS)
    if not args.ckpt or not args.data:
        raise ConfigError("ckpt=<reward run or checkpoint> and data=<file.jsonl> are required")
    if args.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {args.batch_size}")
    return args


def read_lines(path: str) -> Tuple[List[int], List[list], List[list]]:
    """(line numbers, conversations, images) of a scoring file; every problem is a ConfigError
    naming its line."""
    from lit_bluelm.processor import load_image

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data: no such file '{path}'")
    numbers, conversations, images = [], [], []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"data: line {n} is not JSON: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ConfigError(f"data: line {n} needs a 'messages' list")
        paths = record.get("images", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"data: line {n}: 'images' is a list of paths")
        numbers.append(n)
        conversations.append(record["messages"])
        images.append([load_image(file.parent / p) for p in paths])
    if not conversations:
        raise ConfigError(f"data: '{path}' has no lines to score")
    return numbers, conversations, images


def run(args: ScoreArgs) -> List[Tuple[int, float]]:
    """(line number, score) per scored line."""
    from lit_bluelm.rewards import RewardModel

    numbers, conversations, images = read_lines(args.data)  # before the model: bad input fails fast
    model = RewardModel.from_run(args.ckpt, device=args.device, batch_size=args.batch_size)
    try:
        scores = model.score(conversations, images)
    except ValueError as err:  # "conversation i: ...": name the file's line instead
        message = str(err)
        if message.startswith("conversation "):
            index, _, rest = message[len("conversation ") :].partition(": ")
            message = f"line {numbers[int(index)]}: {rest}"
        raise ConfigError(f"data: {message}") from None
    return list(zip(numbers, scores, strict=True))


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body(argv: list) -> None:
        args = parse_args(argv)
        for n, score in run(args):
            print(json.dumps({"line": n, "score": score}) if args.json else f"{score:.6f}", flush=True)

    return run_main(body, lambda: __doc__.strip(), argv)


if __name__ == "__main__":
    sys.exit(main())
