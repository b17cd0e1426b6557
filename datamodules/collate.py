"""Padding-aware batching of encoded examples."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from datamodules.kinds import IGNORE_INDEX, Example, Skips


class Collator:
    """Right-pads a list of examples to the longest one (rounded up to ``pad_to_multiple``).

    Batch: ``input_ids``/``labels``/``attention_mask`` [B, T]; ``position_ids`` [B, T] for packed
    rows (restarting per document) or None; ``pixel_values`` [tiles, 3, S, S]
    (every image's tiles, in row order, matching the placeholder order) or None; ``source``,
    ``key``, ``task`` lists; ``doc_sources`` (the source of every draw: a document, or a piece of
    a split one, in batch order) and ``documents`` [B, T] (each token's index into
    ``doc_sources``; a packed row's padding counts for its last document and has no labels);
    ``data_state``; ``skipped`` (samples skipped by the reader since its last batch, per reason:
    a tensor in ``SKIP_REASONS`` order).

    Preference pairs (examples with ``rejected_ids``): P pairs become 2P rows, the chosen
    sequences first (rows 0..P-1), then the rejected ones in the same order (rows P..2P-1), each
    with its own copy of the prompt's image tiles; the batch adds ``pairs`` (P) and ``margin``
    [P]. The per-row lists (``source``, ``key``, ``task``) hold 2P entries in row order.

    RL prompts (examples with ``prompt``, the ``rl_prompt`` kind) keep the rows above for the
    loader's bookkeeping and add ``prompts``: one dict per example with its ``ids`` by mode,
    ``messages``, ``answer``, ``task``, ``images``, ``key``, ``source`` and its own
    ``pixel_values`` (or None).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple = pad_to_multiple

    def __call__(self, examples: List[Example]) -> Dict[str, Any]:
        pairs = [e for e in examples if "rejected_ids" in e]
        if pairs:
            if len(pairs) != len(examples):
                raise ValueError("a batch mixes preference pairs with single sequences")
            batch = self._rows(examples + [_rejected_row(e) for e in examples])
            batch["pairs"] = len(examples)
            batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples])
            return batch
        prompts = [e for e in examples if "prompt" in e]
        if prompts:
            if len(prompts) != len(examples):
                raise ValueError("a batch mixes RL prompts with training sequences")
            batch = self._rows(examples)
            batch["prompts"] = [
                {
                    **e["prompt"],
                    "pixel_values": e.get("pixel_values"),
                    **{k: e.get(k, "") for k in ("source", "key")},
                }
                for e in examples
            ]
            return batch
        return self._rows(examples)

    def _rows(self, examples: List[Example]) -> Dict[str, Any]:
        longest = max(len(e["input_ids"]) for e in examples)
        m = self.pad_to_multiple
        width = -(-longest // m) * m if m > 1 else longest
        b = len(examples)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        # packed rows carry position_ids; the padding after them counts from 0 again, so it
        # forms its own (label-free) segment and no real token attends to it
        packed = any(e.get("position_ids") is not None for e in examples)
        position_ids = torch.arange(width).repeat(b, 1) if packed else None
        documents = torch.zeros((b, width), dtype=torch.long)
        doc_sources: List[str] = []
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, :n] = e["input_ids"]
            labels[row, :n] = e["labels"]
            attention_mask[row, :n] = 1
            if packed:
                pos = e.get("position_ids")
                position_ids[row, :n] = pos if pos is not None else torch.arange(n)
                position_ids[row, n:] = torch.arange(width - n)
            sources = e.get("sources", [e.get("source", "")])
            documents[row] = len(doc_sources) + _document_of(e.get("position_ids"), n, width, len(sources))
            doc_sources += sources
        tiles = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": torch.cat(tiles) if tiles else None,
            "source": [e.get("source", "") for e in examples],
            "key": [e.get("key", "") for e in examples],
            "task": [e.get("task", "") for e in examples],
            "skipped": torch.tensor(Skips.sum(e.get("skipped", 0) for e in examples).as_list()),
            # the source of every draw (a document or a piece of a split one; a packed row holds
            # several), for data/frac/<source> and the validation loss per source
            "doc_sources": doc_sources,
            "documents": documents,
            # the reader state after this batch (training streams; see datamodules.streams)
            "data_state": next((e["data_state"] for e in reversed(examples) if "data_state" in e), None),
        }


def _rejected_row(pair: Example) -> Example:
    """The rejected side of a preference pair as a row of its own (the reader's bookkeeping,
    ``skipped`` and ``data_state``, stays with the chosen side: counted once)."""
    ids = pair["rejected_ids"]
    return {
        "input_ids": ids,
        "labels": torch.full_like(ids, IGNORE_INDEX),
        "pixel_values": pair.get("pixel_values"),
        **{k: pair[k] for k in ("source", "key", "task") if k in pair},
    }


def _document_of(position_ids, n: int, width: int, count: int) -> torch.Tensor:
    """[width]: which of a row's ``count`` documents each position belongs to (its positions
    restart at 0 with every document; padding counts for the last)."""
    if position_ids is None:
        if count != 1:
            raise ValueError(f"a row without position_ids holds one document, not {count}")
        return torch.zeros(width, dtype=torch.long)
    index = (torch.as_tensor(position_ids[:n]) == 0).long().cumsum(0) - 1
    if n and int(index[-1]) != count - 1:
        raise ValueError(f"a packed row's positions restart {int(index[-1]) + 1} times for {count} documents")
    return torch.cat([index, index.new_full((width - n,), count - 1)])
