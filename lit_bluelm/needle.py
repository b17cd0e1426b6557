"""Needle in a haystack: a passkey hidden in filler text, its documents and its evaluation.

The text forms are shared by the demo data (``datamodules.demo``: short passkey documents for the
reasoning stage, long documents for the long-context stage) and the evaluation
(``python -m lit_bluelm.evaluate tasks=[passkey]``), so the model is asked what it was taught::

    There is a pass key hidden in this text. Remember it.
    <filler> The pass key is 48213. Remember it. 48213 is the pass key. <filler>
    What is the pass key? The pass key is

A prompt of the evaluation is built from token ids (:func:`passkey_prompt`) to an exact length:
``length`` tokens in all, the prompt plus :data:`ANSWER_TOKENS` of room for the answer, with the
needle at ``depth`` (0: right after the opening line, 1: right before the question) of the
filler. A reply is right when the text it generates before the first period is the passkey.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lit_bluelm.errors import ConfigError

TASK = "passkey"
INTRO = "There is a pass key hidden in this text. Remember it."
QUESTION = " What is the pass key? The pass key is"
FILLER = (  # the classic haystack (Mohtashami & Jaggi, 2023)
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
ANSWER_TOKENS = 8  # room left in a cell's length for the reply (a passkey is 5 digits and a period)
FACTORS = (0.5, 1.0, 2.0, 4.0, 8.0)  # lengths as multiples of the original context
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle(passkey: str) -> str:
    return f" The pass key is {passkey}. Remember it. {passkey} is the pass key."


def new_passkey(rng: random.Random) -> str:
    return str(rng.randint(10_000, 99_999))


# ----------------------------------------------------------------------------- documents


def passkey_document(rng: random.Random, sentences: int, filler: Callable[[random.Random], str]) -> str:
    """A training document: the opening line, ``sentences`` filler sentences from ``filler`` with
    the needle among them at a random depth, the question and its answer."""
    passkey = new_passkey(rng)
    body = [filler(rng) for _ in range(sentences)]
    body.insert(rng.randint(0, sentences), needle(passkey))
    return f"{INTRO}{''.join(body)}{QUESTION} {passkey}."


def records_document(
    rng: random.Random, sentences: int, names: Sequence[str], filler: Callable[[random.Random], str]
) -> str:
    """A training document of key-value records spread through filler: two to four named codes,
    then questions about one to three of them (their answers lie far back)."""
    keys = rng.sample(list(names), rng.randint(2, 4))
    codes = {name: new_passkey(rng) for name in keys}
    body = [filler(rng) for _ in range(sentences)]
    for name in keys:
        body.insert(rng.randint(0, len(body)), f" The code of {name} is {codes[name]}.")
    asked = rng.sample(keys, rng.randint(1, min(3, len(keys))))
    questions = "".join(
        f" What is the code of {name}? The code of {name} is {codes[name]}." for name in asked
    )
    return f"Here are the codes of the kingdoms.{''.join(body)}{questions}"


# ----------------------------------------------------------------------------- evaluation


@dataclass
class PasskeyRow:
    """One cell of the evaluation: accuracy (a fraction) of ``n`` trials at one length and depth."""

    task: str
    length: int  # tokens: the prompt plus ANSWER_TOKENS
    length_factor: float  # length / the model's original context
    depth: float  # where the needle is: 0 = start of the filler, 1 = its end
    accuracy: float
    n: int


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, depth: float, passkey: str, rng: random.Random) -> List[int]:
    """The token ids of one prompt of ``length - ANSWER_TOKENS`` tokens: filler sentences (in a
    seeded order, the last one cut to fit) with the needle at ``depth`` of them."""
    head, tail, pin = _ids(tokenizer, INTRO), _ids(tokenizer, QUESTION), _ids(tokenizer, needle(passkey))
    room = length - ANSWER_TOKENS - len(head) - len(tail) - len(pin)
    if room < 0:
        raise ConfigError(f"passkey: a length of {length} tokens cannot hold the needle and question")
    sentences = [_ids(tokenizer, s) for s in FILLER]
    filler: List[List[int]] = []
    used = 0
    while used < room:
        ids = sentences[rng.randrange(len(sentences))][: room - used]
        filler.append(ids)
        used += len(ids)
    at = round(depth * len(filler))
    body = [t for s in filler[:at] for t in s] + pin + [t for s in filler[at:] for t in s]
    return head + body + tail


def answer_of(text: str) -> str:
    """The reply's answer: its text before the first period, trimmed."""
    return text.split(".", 1)[0].strip()


def lengths_for(original: int, factors: Sequence[float]) -> List[int]:
    return [int(round(original * f)) for f in factors]


def evaluate_passkey(
    generator,
    tokenizer,
    original: int,
    factors: Sequence[float] = FACTORS,
    depths: Sequence[float] = DEPTHS,
    trials: int = 20,
    seed: int = 0,
    batch_size: int = 50,
    progress: Optional[Callable[[int], None]] = None,
) -> List[PasskeyRow]:
    """Every (length, depth) cell: ``trials`` seeded prompts, greedy, exact match of the passkey.
    The prompts of one length (every depth) have that length, so a batch needs no padding."""
    from lit_bluelm.generation import GenerationConfig, Prompt

    cfg = GenerationConfig(max_new_tokens=ANSWER_TOKENS, stop=(".",))
    rows = []
    for factor, length in zip(factors, lengths_for(original, factors), strict=True):
        cells = []  # (depth, passkeys, prompts)
        for depth in depths:
            rng = random.Random(f"{TASK}/{seed}/{length}/{depth}")
            keys = [new_passkey(rng) for _ in range(trials)]
            cells.append(
                (depth, keys, [Prompt(passkey_prompt(tokenizer, length, depth, k, rng)) for k in keys])
            )
        prompts = [p for _, _, ps in cells for p in ps]
        texts: List[str] = []
        for start in range(0, len(prompts), batch_size):
            batch = generator.generate(prompts[start : start + batch_size], cfg)
            texts += [g.text for g in batch]
            if progress is not None:
                progress(len(batch))
        for i, (depth, keys, _) in enumerate(cells):
            replies = texts[i * trials : (i + 1) * trials]
            correct = sum(answer_of(t) == k for t, k in zip(replies, keys, strict=True))
            rows.append(PasskeyRow(TASK, length, float(factor), float(depth), correct / trials, trials))
    return rows


def by_length(rows: Sequence[PasskeyRow]) -> Dict[float, float]:
    """The accuracy at each length factor, averaged over depths."""
    out: Dict[float, List[float]] = {}
    for r in rows:
        out.setdefault(r.length_factor, []).append(r.accuracy)
    return {f: sum(a) / len(a) for f, a in out.items()}


def table(rows: Sequence[PasskeyRow]) -> str:
    """Accuracy by length (rows) and depth (columns), with the mean over depths."""
    depths = sorted({r.depth for r in rows})
    cells = {(r.length, r.depth): r.accuracy for r in rows}
    factors = {r.length: r.length_factor for r in rows}
    means = by_length(rows)
    lines = [f"{'length':>7} {'factor':>6} " + " ".join(f"{d:>6.2f}" for d in depths) + f" {'mean':>6}"]
    for length in sorted(factors):
        accs = " ".join(f"{cells[length, d]:>6.2f}" if (length, d) in cells else f"{'-':>6}" for d in depths)
        lines.append(f"{length:>7} {factors[length]:>6g} {accs} {means[factors[length]]:>6.2f}")
    return "\n".join(lines)


def heatmap(rows: Sequence[PasskeyRow], path: str | Path, title: str = "passkey retrieval") -> Path:
    """Accuracy as a length x depth heat-map (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r.length for r in rows})
    depths = sorted({r.depth for r in rows})
    grid = [[math.nan] * len(lengths) for _ in depths]
    for r in rows:
        grid[depths.index(r.depth)][lengths.index(r.length)] = r.accuracy
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
    factors = {r.length: r.length_factor for r in rows}
    ax.set_xticks(range(len(lengths)), [f"{n}\n({factors[n]:g}x)" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("length in tokens (x original context)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            if not math.isnan(acc):
                ax.text(j, i, f"{acc:.2f}", ha="center", va="center", color="w" if acc < 0.6 else "k")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
