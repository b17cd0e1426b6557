"""The mixture: named sources drawn by (scheduled) weights into rows and batches, resumably.

Every rank-local training batch has an index ``b`` (0, 1, 2, ... across resumes). With ``W``
DataLoader workers, batch ``b`` is produced by the worker holding *slot* ``b % W`` (the DataLoader
collects batches from its workers round-robin); each slot is one reader with its own shard share
and state. A resumed run that has consumed ``b0`` batches gives worker ``w`` the saved state of
slot ``(b0 + w) % W``, so every slot continues exactly where it stopped.

The weights of batch ``b`` are a pure function of ``b`` (``MixtureWeights``): the piecewise-linear
schedule at step ``b // accumulate``, times adaptive multipliers that the main process appends to a
shared-memory log with the batch index they take effect from (far enough ahead that no worker has
produced that batch yet), times each source's ``repeat``. Workers are separate processes; they
read the log, so new weights reach all of them at the same batch.

Sources are drawn by smooth weighted round-robin: each draw adds every source's share to its
credit and takes the source with the most credit, so realised fractions stay within one sample of
the weights at every point of the stream (no sampling noise), and the sequence is deterministic.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.kinds import SAMPLE_KINDS, Example, Skips
from datamodules.packing import RowBuilder
from datamodules.readers import SkipCounter, Source, SourceReader, reader_shards
from lit_bluelm.errors import ConfigError
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.registry import lookup

_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")
LOG_CAPACITY = 4096  # adaptive weight updates a run can hold (one per validation)

__all__ = ["MixedStream", "MixtureWeights", "Source", "build_sources", "expand_shards", "reader_shards"]


def expand_shards(pattern: str, key: str) -> List[str]:
    """Brace pattern -> shard URLs; local shards must exist (remote ones are opened lazily)."""
    urls = [u for part in pattern.split("::") for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ConfigError(f"{key}: empty shard pattern")
    missing = [u for u in urls if not u.startswith(_REMOTE) and not os.path.exists(u)]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} of {len(urls)} shards not found, e.g. '{missing[0]}'")
    return urls


class MixtureWeights:
    """Source weights as a function of the rank-local batch index (picklable into workers)."""

    def __init__(
        self,
        names: Sequence[str],
        base: Sequence[float],
        repeat: Sequence[float],
        schedule: Sequence[tuple] = (),  # (step, [weight per source]) points, steps ascending
        accumulate: int = 1,
    ) -> None:
        self.names = list(names)
        self.base = [float(w) for w in base]
        self.repeat = [float(r) for r in repeat]
        self.schedule = [(int(step), [float(w) for w in ws]) for step, ws in schedule]
        self.accumulate = accumulate
        # shared memory: row = (first batch index, multiplier per source); count = rows in use
        self.log = torch.zeros(LOG_CAPACITY, 1 + len(self.names), dtype=torch.float64).share_memory_()
        self.count = torch.zeros(1, dtype=torch.int64).share_memory_()
        # guards the log across processes (no reliance on the CPU's store ordering); inherited
        # by forked workers, passed along when workers are spawned
        self.lock = multiprocessing.get_context().Lock()

    def scheduled(self, step: int) -> List[float]:
        """The configured weights at optimizer step ``step`` (piecewise linear between points)."""
        points = self.schedule
        if not points:
            return list(self.base)
        if step <= points[0][0]:
            return list(points[0][1])
        for (s0, w0), (s1, w1) in zip(points, points[1:], strict=False):
            if step <= s1:
                t = (step - s0) / max(s1 - s0, 1)
                return [a + t * (b - a) for a, b in zip(w0, w1, strict=True)]
        return list(points[-1][1])

    def multipliers(self, batch: int) -> List[float]:
        with self.lock:
            n = int(self.count[0])
            for row in range(n - 1, -1, -1):
                if self.log[row, 0] <= batch:
                    return self.log[row, 1:].tolist()
        return [1.0] * len(self.names)

    def __call__(self, batch: int) -> List[float]:
        """Effective (unnormalised) weights of rank-local batch ``batch``."""
        scheduled = self.scheduled(batch // self.accumulate)
        mult = self.multipliers(batch)
        return [w * m * r for w, m, r in zip(scheduled, mult, self.repeat, strict=True)]

    def push(self, first_batch: int, multipliers: Sequence[float]) -> None:
        """Main process: from batch ``first_batch`` on, scale the scheduled weights."""
        with self.lock:
            n = int(self.count[0])
            if n >= LOG_CAPACITY:
                raise RuntimeError(f"more than {LOG_CAPACITY} adaptive weight updates")
            self.log[n, 0] = float(first_batch)
            self.log[n, 1:] = torch.tensor(list(multipliers), dtype=torch.float64)
            self.count[0] = n + 1

    def rows(self) -> List[List[float]]:
        with self.lock:
            return self.log[: int(self.count[0])].tolist()

    def load_rows(self, rows: Sequence[Sequence[float]]) -> None:
        with self.lock:
            self.count[0] = 0
        for row in rows:
            self.push(int(row[0]), row[1:])


class MixedReader:
    """One reader's sources, draws and rows, with a saveable state."""

    def __init__(self, stream: MixedStream, reader: int, readers: int) -> None:
        self.reader = reader
        self.skips = SkipCounter()
        self.sources = [
            SourceReader(
                s,
                stream.processor,
                stream.seq_len,
                reader,
                readers,
                stream.seed,
                stream.shuffle_buffer,
                stream.train,
                self.skips,
            )
            for s in stream.sources
        ]
        self.credits = [0.0] * len(self.sources)
        self.rows = RowBuilder(stream.seq_len, stream.packing, stream.pack_buffer)

    def next_doc(self, weights: Sequence[float]) -> Example:
        total = sum(weights)
        if total <= 0:
            raise RuntimeError("every source has weight 0 at this point of the schedule")
        for i, w in enumerate(weights):
            # a source switched off keeps no credit from before
            self.credits[i] = self.credits[i] + w / total if w > 0 else min(self.credits[i], 0.0)
        pick = max(range(len(weights)), key=lambda i: (self.credits[i], -i))
        self.credits[pick] -= 1.0
        example = self.sources[pick].next_example()
        example["source_index"] = pick
        example["skipped"] = self.skips.take()
        return example

    def next_row(self, weights: Sequence[float]) -> Example:
        return self.rows.next_row(lambda: self.next_doc(weights))

    def state(self) -> Dict[str, Any]:
        return {
            "reader": self.reader,
            "sources": [s.state() for s in self.sources],
            "credits": list(self.credits),
            "rows": self.rows.state(),
            "skipped": self.skips.pending.as_dict(),
        }

    def restore(self, state: Dict[str, Any]) -> None:
        assert state["reader"] == self.reader, "a slot's state belongs to its reader"
        for source, saved in zip(self.sources, state["sources"], strict=True):
            source.restore(saved)
        self.credits = list(state["credits"])

        def encode_refs(items: List[tuple]) -> List[Example]:
            # one pass per source (and shard), not one per pending document
            out: List[Optional[Example]] = [None] * len(items)
            for index, source in enumerate(self.sources):
                doc = source.in_flight_document()  # restored above: not encoded a second time
                if doc is not None:
                    for i, (s, ref) in enumerate(items):
                        if s == index and tuple(ref) == tuple(doc["ref"]):
                            out[i] = dict(doc, source_index=index)
                positions = [i for i, (s, _) in enumerate(items) if s == index and out[i] is None]
                examples = source.encode_refs([items[i][1] for i in positions]) if positions else []
                for i, example in zip(positions, examples, strict=True):
                    example["source_index"] = index
                    out[i] = example
            return out

        self.rows.restore(state["rows"], encode_refs)
        self.skips.pending = Skips.of(state["skipped"])


class MixedStream(IterableDataset):
    """Endless rows of a mixture for one rank; see the module docstring.

    In training, the last row of every batch carries ``data_state``: the producing slot, the
    batch index and the slot's state after the batch (what a checkpoint needs to resume there).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        processor: BlueLMProcessor,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        train: bool = True,
        packing: bool = False,
        pack_buffer: int = 64,
        batch_size: int = 1,
        weights: Optional[MixtureWeights] = None,
        resume: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.sources = list(sources)
        assert self.sources, "a mixture needs a source"
        self.processor = processor
        self.seq_len = seq_len
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.train = train
        self.packing, self.pack_buffer = packing, pack_buffer
        self.batch_size = batch_size
        names = [s.name for s in self.sources]
        self.weights = weights or MixtureWeights(
            names, [s.weight for s in sources], [s.repeat for s in sources]
        )
        self.resume = resume

    def __iter__(self) -> Iterator[Example]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = int(self.resume["consumed"]) if self.resume else 0
        slot = (first + worker) % workers
        reader = MixedReader(self, self.rank * workers + slot, self.world_size * workers)
        saved = (self.resume or {}).get("slots", {}).get(slot)
        if saved is not None:
            reader.restore(saved)
        batch = first + worker  # the rank-local index of this worker's next batch
        while True:
            weights = self.weights(batch)
            for i in range(self.batch_size):
                row = reader.next_row(weights)
                if self.train and i == self.batch_size - 1:
                    row["data_state"] = {"slot": slot, "batch": batch, "state": reader.state()}
                yield row
            batch += workers


def build_sources(cfg: Any, split: str) -> List[Source]:
    """Sources of ``split`` ("train" or "val") from ``cfg.data``, in ``data.mix`` order; checks
    kinds and shards now, so a bad source stops the run at start-up with its name."""
    data = cfg.data
    if not data.mix:
        raise ConfigError("data.mix: no source has a weight")
    sources = []
    for name, weight in data.mix.items():
        src = data.sources[name]
        lookup(SAMPLE_KINDS, src.kind, f"data.sources.{name}.kind")
        pattern = src.train if split == "train" else src.val
        if not pattern:
            if split == "train":
                raise ConfigError(f"data.sources.{name}.train: no shard pattern")
            continue
        urls = expand_shards(pattern, f"data.sources.{name}.{split}")
        sources.append(Source(name, src.kind, urls, weight, src.repeat))
    return sources
