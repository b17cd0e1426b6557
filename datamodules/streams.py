"""Streaming WebDataset sources and their mixture.

Each DataLoader worker of each rank is one *reader*. A source's shards are split across readers
(rank-major, then worker), each reader walks its shards in a seeded order that changes every
epoch, shuffles samples through a buffer, and encodes them with the source's kind. The mixture
draws the source of every sample with a seeded RNG, so the multimodal:text ratio holds inside
every batch. Samples that fail are skipped and counted; the count rides along with the next
example (``skipped``), so the training process sees it without a side channel.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence

import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.kinds import SAMPLE_KINDS, Example
from datamodules.packing import pack_stream, split_stream
from lit_bluelm.config import ConfigError
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.registry import lookup

log = logging.getLogger(__name__)
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


def expand_shards(pattern: str, key: str) -> List[str]:
    """Brace pattern -> shard URLs; local shards must exist (remote ones are opened lazily)."""
    urls = [u for part in pattern.split("::") for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ConfigError(f"{key}: empty shard pattern")
    missing = [u for u in urls if not u.startswith(_REMOTE) and not os.path.exists(u)]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} of {len(urls)} shards not found, e.g. '{missing[0]}'")
    return urls


def reader_shards(urls: Sequence[str], reader: int, readers: int, strict: bool, key: str) -> List[str]:
    """This reader's share of the shards. With fewer shards than readers, ``strict`` refuses
    (training would repeat data); otherwise every reader reads them all from its own offset."""
    if len(urls) >= readers:
        return list(urls[reader::readers])
    if strict:
        raise ConfigError(
            f"{key}: {len(urls)} shards for {readers} readers (ranks x data.num_workers); "
            "write more shards or lower data.num_workers"
        )
    offset = reader % len(urls)
    return list(urls[offset:]) + list(urls[:offset])


class SkipCounter:
    """Per-reader count of skipped samples and unreadable shards, handed out with the next example."""

    MAX_WARNINGS = 5

    def __init__(self) -> None:
        self.pending = 0
        self.warned = 0

    def skip(self, what: str, err: BaseException) -> None:
        self.pending += 1
        if self.warned < self.MAX_WARNINGS:
            self.warned += 1
            log.warning("skipped %s: %s: %s", what, type(err).__name__, str(err)[:200])

    def tar_handler(self, err: BaseException) -> bool:
        """WebDataset handler for unreadable shards/members: count and go on."""
        self.skip("tar data", err)
        return True

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buffer: List[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class Source:
    """One named source of one split: its shards and how to encode its samples."""

    name: str
    kind: str
    urls: List[str]
    weight: float

    def iterate(
        self,
        processor: BlueLMProcessor,
        seq_len: int,
        reader: int,
        readers: int,
        skips: SkipCounter,
        seed: int,
        shuffle_buffer: int,
        train: bool,
    ) -> Iterator[Example]:
        """Endless stream of encoded examples for one reader (epochs are reshuffled when ``train``)."""
        encode = SAMPLE_KINDS[self.kind]
        shards = reader_shards(self.urls, reader, readers, strict=train, key=f"data.sources.{self.name}")
        rng = random.Random(f"{seed}/{self.name}/{reader}")
        epoch = 0
        while True:
            order = list(shards)
            if train:
                rng.shuffle(order)
            raw: Iterator[Dict[str, Any]] = wds.tarfile_samples(
                ({"url": url} for url in order), handler=skips.tar_handler
            )
            if train and shuffle_buffer > 1:
                raw = _shuffled(raw, shuffle_buffer, rng)
            produced = 0
            for sample in raw:
                try:
                    example = encode(sample, processor, seq_len)
                except Exception as err:  # a bad sample never stops the run
                    skips.skip(f"sample {sample.get('__key__')} of {sample.get('__url__')}", err)
                    continue
                example["source"] = self.name
                example["key"] = str(sample.get("__key__", ""))
                produced += 1
                yield example
            if produced == 0:
                raise RuntimeError(
                    f"source '{self.name}' produced no usable sample in a full pass over "
                    f"{len(order)} shards (epoch {epoch}); check the shards and the logged skips"
                )
            epoch += 1


class MixedStream(IterableDataset):
    """Endless mixture of sources; the source of each example is drawn by weight."""

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
    ) -> None:
        super().__init__()
        self.sources = [s for s in sources if s.weight > 0]
        assert self.sources, "a mixture needs a source with positive weight"
        self.processor = processor
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.train = train
        self.packing = packing
        self.pack_buffer = pack_buffer

    def __iter__(self) -> Iterator[Example]:
        """Examples of at most ``seq_len`` tokens: packed rows, or documents (long ones split)."""
        if self.packing:
            return pack_stream(self._mixed(), self.seq_len, self.pack_buffer)
        return split_stream(self._mixed(), self.seq_len)

    def _mixed(self) -> Iterator[Example]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        skips = SkipCounter()
        streams = [
            s.iterate(
                self.processor,
                self.seq_len,
                reader,
                readers,
                skips,
                self.seed,
                self.shuffle_buffer,
                self.train,
            )
            for s in self.sources
        ]
        weights = [s.weight for s in self.sources]
        rng = random.Random(f"{self.seed}/mix/{reader}")
        indices = range(len(streams))
        while True:
            i = rng.choices(indices, weights)[0]
            example = next(streams[i])
            example["skipped"] = skips.take()
            yield example


def build_sources(cfg: Any, split: str) -> List[Source]:
    """Sources of ``split`` ("train" or "val") from ``cfg.data``; checks kinds and shards now,
    so a bad source stops the run at start-up with its name."""
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
        sources.append(Source(name, src.kind, expand_shards(pattern, f"data.sources.{name}.{split}"), weight))
    return sources
