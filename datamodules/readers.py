"""One source, read by one reader, with a state that can be saved and restored exactly.

Each DataLoader worker of each rank is one *reader* (``reader`` of ``readers``). In training, a
source's shards are dealt anew every epoch: a permutation seeded by (seed, source, epoch), padded
by repeating its first shards to a multiple of ``readers`` (as ``DistributedSampler`` pads), then
every ``readers``-th shard from position ``reader``. Every reader therefore gets the same number
of shards per epoch, whatever the shard count, and shards move between readers across epochs.
Samples pass through a seeded shuffle buffer.

The reader's state is small: epoch, position in the epoch's shard list, samples read from the
current shard, the shuffle RNG, and the buffer as references (shard URL, sample index). Restoring
re-reads the referenced samples and skips to the saved position without decoding anything else.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import webdataset as wds

from datamodules.kinds import SAMPLE_KINDS, Example, Skips, skip_reason
from datamodules.packing import split_long
from lit_bluelm.errors import ConfigError
from lit_bluelm.processor import BlueLMProcessor

log = logging.getLogger(__name__)
Ref = Tuple[str, int]  # (shard url, index of the sample in the shard)


@dataclass
class Source:
    """One named source of one split: its shards, how to encode its samples, how often to draw it."""

    name: str
    kind: str
    urls: List[str]
    weight: float
    repeat: float = 1.0  # key-data upsampling: the effective weight is weight * repeat


def reader_shards(urls: Sequence[str], reader: int, readers: int, strict: bool, key: str) -> List[str]:
    """A fixed share of the shards (validation). With fewer shards than readers, ``strict``
    refuses (training would repeat data); otherwise every reader reads them all from its offset."""
    if len(urls) >= readers:
        return list(urls[reader::readers])
    if strict:
        raise ConfigError(
            f"{key}: {len(urls)} shards for {readers} readers (ranks x data.num_workers); "
            "write more shards or lower data.num_workers"
        )
    offset = reader % len(urls)
    return list(urls[offset:]) + list(urls[:offset])


def epoch_shards(
    urls: Sequence[str], epoch: int, seed: int, name: str, reader: int, readers: int
) -> List[str]:
    """This reader's training shards in ``epoch`` (see the module docstring)."""
    order = list(urls)
    random.Random(f"{seed}/{name}/epoch{epoch}").shuffle(order)
    while len(order) % readers:
        order.append(order[len(order) % len(urls)])
    return order[reader::readers]


class SkipCounter:
    """Per-reader count of skipped samples and unreadable shards by reason (:class:`Skips`),
    handed out with the next example. The first ``MAX_WARNINGS`` skips of each reason are logged
    with the shard and the sample key."""

    MAX_WARNINGS = 3

    def __init__(self) -> None:
        self.pending = Skips()
        self.warned: Dict[str, int] = {}

    def skip(self, what: str, err: BaseException, reason: Optional[str] = None) -> None:
        reason = reason or skip_reason(err)
        self.pending = self.pending + Skips.one(reason)
        if self.warned.get(reason, 0) < self.MAX_WARNINGS:
            self.warned[reason] = self.warned.get(reason, 0) + 1
            log.warning("skipped %s (%s): %s: %s", what, reason, type(err).__name__, str(err)[:200])

    def tar_handler(self, err: BaseException) -> bool:
        """WebDataset handler for unreadable shards/members: count and go on."""
        self.skip("tar data", err, "tar_error")
        return True

    def take(self) -> Skips:
        count, self.pending = self.pending, Skips()
        return count


def _samples(url: str, handler: Callable[[BaseException], bool]) -> Iterator[Dict[str, Any]]:
    return wds.tarfile_samples([{"url": url}], handler=handler)


def peek_meta(url: str, n: int) -> List[Dict[str, Any]]:
    """The ``json`` members of a shard's first ``n`` samples, decoded (a start-up check reads
    what a source's samples declare; one that does not decode is left out: the reader counts it
    when training meets it)."""
    from datamodules.kinds import SampleError, decode_json

    def stop(err: BaseException) -> bool:
        return False  # an unreadable shard ends the peek; the reader reports it

    out: List[Dict[str, Any]] = []
    for raw in _samples(url, stop):
        try:
            out.append(decode_json(raw))
        except SampleError:
            pass
        if len(out) >= n:
            break
    return out


class SourceReader:
    """Encoded examples of one source for one reader, endlessly (training reshuffles each epoch)."""

    def __init__(
        self,
        source: Source,
        processor: BlueLMProcessor,
        seq_len: int,
        reader: int,
        readers: int,
        seed: int,
        shuffle_buffer: int,
        train: bool,
        skips: SkipCounter,
    ) -> None:
        self.source = source
        self.encode = SAMPLE_KINDS[source.kind]
        self.processor = processor
        self.seq_len = seq_len
        self.reader, self.readers, self.seed = reader, readers, seed
        self.buffer_size = shuffle_buffer if train else 1
        self.train = train
        self.skips = skips
        self.rng = random.Random(f"{seed}/{source.name}/{reader}/shuffle")
        self.epoch = self.pos = self.offset = 0
        self.buffer: List[Tuple[Ref, Dict[str, Any]]] = []
        # failure detection: an epoch without a readable sample, or two epochs of only bad ones
        self.counts = {"raw": 0, "tried": 0, "good": 0, "strikes": 0}
        self._shards: Optional[List[str]] = None
        self._it: Optional[Iterator[Dict[str, Any]]] = None
        self._replaying = False  # skipping to a restored offset: errors there were counted before
        # a split document being drawn: the document, its pieces, the index of the next piece
        self.in_flight: Optional[Tuple[Example, List[Example], int]] = None

    def shards(self) -> List[str]:
        if self._shards is None:
            if self.train:
                self._shards = epoch_shards(
                    self.source.urls, self.epoch, self.seed, self.source.name, self.reader, self.readers
                )
            else:
                self._shards = reader_shards(
                    self.source.urls, self.reader, self.readers, False, self.source.name
                )
        return self._shards

    def _next_raw(self) -> Tuple[Ref, Dict[str, Any]]:
        while True:
            shards = self.shards()
            if self._it is None:
                if self.pos >= len(shards):  # epoch done
                    self._end_epoch(len(shards))
                    continue
                self._it = _samples(shards[self.pos], self._tar_error)
                self._replaying = True
                for _ in range(self.offset):  # resuming inside a shard: skip what was read
                    next(self._it, None)
                self._replaying = False
            raw = next(self._it, None)
            if raw is None:
                self._it = None
                self.pos += 1
                self.offset = 0
                continue
            ref = (shards[self.pos], self.offset)
            self.offset += 1
            self.counts["raw"] += 1
            return ref, raw

    def _tar_error(self, err: BaseException) -> bool:
        return True if self._replaying else self.skips.tar_handler(err)

    def _end_epoch(self, n_shards: int) -> None:
        c = self.counts
        bad = c["tried"] > 0 and c["good"] == 0
        c["strikes"] = c["strikes"] + 1 if bad else 0
        if c["raw"] == 0 or c["strikes"] >= 2:
            raise RuntimeError(
                f"source '{self.source.name}' produced no usable sample in a full pass over "
                f"{n_shards} shards (epoch {self.epoch}); check the shards and the logged skips"
            )
        c["raw"] = c["tried"] = c["good"] = 0
        self.epoch += 1
        self.pos = self.offset = 0
        self._shards = None

    def next_example(self) -> Example:
        """The next draw of this source: a document, or the next piece of a long one (a text
        document longer than ``seq_len`` is split, and its pieces are drawn one at a time, like
        documents, so one long document cannot flood the rows of a mixture)."""
        if self.in_flight is not None:
            doc, pieces, index = self.in_flight
            self.in_flight = (doc, pieces, index + 1) if index + 1 < len(pieces) else None
            return dict(pieces[index])
        while True:
            while len(self.buffer) < self.buffer_size:
                self.buffer.append(self._next_raw())
            i = self.rng.randrange(len(self.buffer)) if self.buffer_size > 1 else 0
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            ref, raw = self.buffer.pop()
            self.counts["tried"] += 1
            example = self._encode(ref, raw)
            if example is not None:
                self.counts["good"] += 1
                return self._first_piece(example)

    def _first_piece(self, example: Example, resume_at: int = 1) -> Example:
        pieces = split_long(example, self.seq_len)
        for i, piece in enumerate(pieces):
            piece["piece"] = i
        self.in_flight = (example, pieces, resume_at) if resume_at < len(pieces) else None
        return pieces[0]

    def in_flight_document(self) -> Optional[Example]:
        """The whole document whose pieces are being drawn (None when there is none)."""
        return self.in_flight[0] if self.in_flight is not None else None

    def _encode(self, ref: Ref, raw: Dict[str, Any]) -> Optional[Example]:
        try:
            example = self.encode(raw, self.processor, self.seq_len)
        except Exception as err:  # a bad sample never stops the run
            self.skips.skip(f"sample {raw.get('__key__')} of {ref[0]}", err)
            return None
        example["source"] = self.source.name
        example["key"] = str(raw.get("__key__", ""))
        example["ref"] = ref
        return example

    def fetch(self, refs: Sequence[Ref]) -> List[Tuple[Ref, Dict[str, Any]]]:
        """Raw samples by reference, in the order given (one pass per distinct shard)."""
        wanted: Dict[str, set] = {}
        for url, index in refs:
            wanted.setdefault(url, set()).add(index)
        found: Dict[Ref, Dict[str, Any]] = {}
        for url, indices in wanted.items():
            for index, raw in enumerate(_samples(url, lambda err: True)):
                if index in indices:
                    found[(url, index)] = raw
                if index >= max(indices):
                    break
        missing = [r for r in refs if tuple(r) not in found]
        if missing:
            raise RuntimeError(
                f"source '{self.source.name}': cannot restore samples {missing[:3]} (shards changed?)"
            )
        return [(tuple(r), found[tuple(r)]) for r in refs]

    def encode_refs(self, refs: Sequence[Ref]) -> List[Example]:
        """Re-encode samples by reference, in order, reading each shard once (restoring rows
        that were pending)."""
        examples = []
        for ref, raw in self.fetch(refs):
            example = self._encode(ref, raw)
            if example is None:
                raise RuntimeError(f"source '{self.source.name}': sample {ref} no longer encodes")
            examples.append(example)
        return examples

    def state(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "offset": self.offset,
            "counts": dict(self.counts),
            "rng": self.rng.getstate(),
            "buffer": [list(ref) for ref, _ in self.buffer],
            # the document being split: its reference and the next piece to draw
            "in_flight": [list(self.in_flight[0]["ref"]), self.in_flight[2]] if self.in_flight else None,
        }

    def restore(self, state: Dict[str, Any]) -> None:
        self.epoch, self.pos, self.offset = state["epoch"], state["pos"], state["offset"]
        self.counts = dict(state["counts"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = self.fetch([tuple(r) for r in state["buffer"]])
        self._shards, self._it = None, None
        self.in_flight = None
        if state.get("in_flight"):  # one tokenization of the document in flight, whatever its length
            ref, index = state["in_flight"]
            self._first_piece(self.encode_refs([tuple(ref)])[0], resume_at=int(index))
