"""Fitting documents to ``seq_len``: splitting long ones, and packing several into one row.

A packed row concatenates whole documents (each already ends with EOS). Its ``position_ids``
restart at 0 for every document, which is what keeps attention inside a document: the model
passes them with no attention mask and transformers derives a block-diagonal causal mask from
the resets (SDPA, eager; flash attention would not, so packing refuses it). The first token of every document after the first
gets no label, so the previous document's EOS never learns to predict an unrelated next
document. Rows are filled best-fit from a buffer of pending documents: the oldest document
opens a row (nothing waits forever), then the longest pending documents that still fit follow.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List

import torch

from datamodules.kinds import Example
from lit_bluelm.objectives.lm import IGNORE_INDEX


def split_long(example: Example, seq_len: int) -> List[Example]:
    """``example`` as pieces of at most ``seq_len`` tokens (text only: image samples are cut to
    fit when they are encoded, because their placeholders cannot be split from their tiles)."""
    n = len(example["input_ids"])
    if n <= seq_len:
        return [example]
    assert example.get("pixel_values") is None, "image examples are fitted when encoded"
    pieces = []
    for i, start in enumerate(range(0, n, seq_len)):
        piece = dict(example)
        piece["input_ids"] = example["input_ids"][start : start + seq_len]
        piece["labels"] = example["labels"][start : start + seq_len]
        piece["skipped"] = example.get("skipped", 0) if i == 0 else 0
        pieces.append(piece)
    return pieces


def split_stream(examples: Iterable[Example], seq_len: int) -> Iterator[Example]:
    """Unpacked rows: every document, long ones split into ``seq_len`` pieces."""
    for example in examples:
        yield from split_long(example, seq_len)


def join(docs: List[Example]) -> Example:
    """One packed row from documents whose total length fits."""
    labels = []
    for i, doc in enumerate(docs):
        doc_labels = doc["labels"]
        if i > 0:  # the previous document's last token does not predict this one's first
            doc_labels = doc_labels.clone()
            doc_labels[0] = IGNORE_INDEX
        labels.append(doc_labels)
    tiles = [d["pixel_values"] for d in docs if d.get("pixel_values") is not None]
    return {
        "input_ids": torch.cat([d["input_ids"] for d in docs]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(len(d["input_ids"])) for d in docs]),
        "pixel_values": torch.cat(tiles) if tiles else None,
        "task": docs[0].get("task", ""),
        "source": docs[0].get("source", ""),
        "key": "+".join(str(d.get("key", "")) for d in docs),
        "skipped": sum(int(d.get("skipped", 0)) for d in docs),
        "documents": len(docs),
    }


def pack_stream(examples: Iterable[Example], seq_len: int, buffer_size: int) -> Iterator[Example]:
    """Rows of at most ``seq_len`` tokens, each holding whole documents (or pieces of long ones)."""
    source = iter(examples)
    pending: List[Example] = []
    exhausted = False
    while True:
        while not exhausted and len(pending) < buffer_size:
            try:
                pending.extend(split_long(next(source), seq_len))
            except StopIteration:
                exhausted = True
        if not pending:
            return
        row = [pending.pop(0)]
        space = seq_len - len(row[0]["input_ids"])
        while space > 0:
            best, best_len = -1, 0
            for i, doc in enumerate(pending):
                n = len(doc["input_ids"])
                if best_len < n <= space:
                    best, best_len = i, n
                    if n == space:
                        break
            if best < 0:
                break
            row.append(pending.pop(best))
            space -= best_len
        yield join(row)
