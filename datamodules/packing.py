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

from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import torch

from datamodules.kinds import Example, Skips
from lit_bluelm.labels import IGNORE_INDEX


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
        piece["skipped"] = example.get("skipped", Skips()) if i == 0 else Skips()
        pieces.append(piece)
    return pieces


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
        "sources": [d.get("source", "") for d in docs],  # one per draw: a document or a piece
        "key": "+".join(str(d.get("key", "")) for d in docs),
        "skipped": Skips.sum(d.get("skipped", 0) for d in docs),
        "documents": len(docs),
    }


class RowBuilder:
    """Rows from a document source: packed best-fit, or one document (piece) per row.

    ``pending`` holds documents (and pieces of split ones) not yet placed in a row; its state is
    their references, so a restored builder re-encodes exactly the same documents.
    """

    def __init__(self, seq_len: int, packing: bool, buffer_size: int) -> None:
        self.seq_len = seq_len
        self.packing = packing
        self.buffer_size = buffer_size if packing else 1
        self.pending: List[Example] = []

    def _fill(self, next_doc: Callable[[], Example]) -> None:
        while len(self.pending) < self.buffer_size:
            try:
                doc = next_doc()
            except StopIteration:
                return
            if "piece" in doc:  # a reader's draw: already a piece (or a whole document) that fits
                self.pending.append(doc)
                continue
            pieces = split_long(doc, self.seq_len)
            for i, piece in enumerate(pieces):
                piece["piece"] = i
            self.pending.extend(pieces)

    def next_row(self, next_doc: Callable[[], Example]) -> Example:
        """The next row; ``next_doc`` yields documents (StopIteration ends a finite source)."""
        if not self.pending or self.packing:
            self._fill(next_doc)
        if not self.pending:
            raise StopIteration
        if not self.packing:
            return self.pending.pop(0)
        row = [self.pending.pop(0)]  # the oldest opens the row: nothing waits forever
        space = self.seq_len - len(row[0]["input_ids"])
        while space > 0:
            best, best_len = -1, 0
            for i, doc in enumerate(self.pending):
                n = len(doc["input_ids"])
                if best_len < n <= space:
                    best, best_len = i, n
                    if n == space:
                        break
            if best < 0:
                break
            row.append(self.pending.pop(best))
            space -= best_len
        return join(row)

    def state(self) -> List[Dict[str, Any]]:
        return [
            {
                "source": d.get("source_index", 0),
                "ref": list(d["ref"]),
                "piece": d["piece"],
                "skipped": Skips.of(d.get("skipped", 0)).as_dict(),
            }
            for d in self.pending
        ]

    def restore(
        self,
        state: List[Dict[str, Any]],
        encode_refs: Callable[[List[Tuple[int, Tuple[str, int]]]], List[Example]],
    ) -> None:
        """``encode_refs`` re-encodes (source index, ref) pairs, in order, all at once; each
        document is encoded and split once, however many of its pieces are pending."""
        keys = [(item["source"], tuple(item["ref"])) for item in state]
        unique = list(dict.fromkeys(keys))
        split = {
            key: split_long(doc, self.seq_len) for key, doc in zip(unique, encode_refs(unique), strict=True)
        }
        self.pending = []
        for item, key in zip(state, keys, strict=True):
            piece = dict(split[key][item["piece"]])
            piece["piece"], piece["skipped"] = item["piece"], Skips.of(item["skipped"])
            self.pending.append(piece)


def _rows(examples: Iterable[Example], builder: RowBuilder) -> Iterator[Example]:
    source = iter(examples)
    while True:
        try:
            yield builder.next_row(lambda: next(source))
        except StopIteration:
            return


def pack_stream(examples: Iterable[Example], seq_len: int, buffer_size: int) -> Iterator[Example]:
    """Rows of at most ``seq_len`` tokens, each holding whole documents (or pieces of long ones)."""
    return _rows(examples, RowBuilder(seq_len, True, buffer_size))


def split_stream(examples: Iterable[Example], seq_len: int) -> Iterator[Example]:
    """Unpacked rows: every document, long ones split into ``seq_len`` pieces."""
    return _rows(examples, RowBuilder(seq_len, False, 1))
