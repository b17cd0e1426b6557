"""The WebDataset LightningDataModule: mixed, streamed, padded batches for every stage, with an
exactly resumable training stream.

Resuming: every training batch carries the state of the reader slot that produced it, with its
skip count and document sources. The datamodule takes these keys off the batch itself
(``on_before_batch_transfer``); a batch's state counts once the optimizer update that trained on
it has been applied (:meth:`BlueLMDataModule.step_done`, called by ``callbacks.DataProgress``).
The ``state_dict`` (stored by Lightning in every checkpoint) gathers those states from all ranks,
with each rank's torch/numpy/python RNG states and the adaptive-weight log. On resume
``load_state_dict`` gives each rank its own part before the training stream is created.

Documented methods for callbacks: ``step_done()``, ``take_counts()`` (data progress),
``mixture_weights()`` and ``set_multipliers()`` (mixture schedules).
"""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datamodules.collate import Collator
from datamodules.kinds import Skips
from datamodules.streams import MixedStream, MixtureWeights, build_sources, reader_shards
from lit_bluelm.config import schedule_step
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.status import ignore_stop_signals
from lit_bluelm.tokenizer import load_tokenizer

PREFETCH = 2  # DataLoader prefetch_factor: batches requested ahead per worker
BATCH_KEYS = ("skipped", "data_state")  # the loader's bookkeeping, not model input


def schedule_points(cfg: DictConfig, names: Sequence[str]) -> List[tuple]:
    """``data.schedule`` as (step, [weight per source]); sources a point omits keep ``data.mix``.
    (The config checks guarantee step order.)"""
    return [
        (
            schedule_step(point, cfg.trainer.max_steps),
            [float(point.mix.get(n, cfg.data.mix[n])) for n in names],
        )
        for point in cfg.data.schedule
    ]


@dataclass
class DataCounts:
    """What this rank's training batches held since the last ``take_counts()``."""

    skipped: Skips = field(default_factory=Skips)  # samples the loader skipped, by reason
    real_tokens: int = 0
    slots: int = 0  # row slots (real tokens + padding)
    documents: Counter = field(default_factory=Counter)  # documents per source


class BlueLMDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        # tokenizers' own thread pool does not survive DataLoader worker forks
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.processor = BlueLMProcessor.from_config(
            self.tokenizer, cfg.model, cfg.sft.think_token_position, cfg.data.max_image_pixels
        )
        # checked now, so a bad source stops the run before any model is built
        self.train_sources = build_sources(cfg, "train")
        self.val_sources = build_sources(cfg, "val")
        self.collate = Collator(self.processor.pad_token_id)
        names = [s.name for s in self.train_sources]
        self.weights = MixtureWeights(
            names,
            [s.weight for s in self.train_sources],
            [s.repeat for s in self.train_sources],
            schedule_points(cfg, names),
            cfg.trainer.accumulate_grad_batches,
        )
        self._slots: Dict[int, Any] = {}  # slot -> state after the last trained batch it produced
        self._consumed = 0  # rank-local training batches trained on (at optimizer-step boundaries)
        self._pending: List[Dict[str, Any]] = []  # batches of the optimizer step in progress
        self._counts = DataCounts()

    # ------------------------------------------------------------------ loaders

    def setup(self, stage: str) -> None:
        # each reader (rank x worker) needs its own training shards; say so before any worker starts
        rank, world = self._rank_world()
        readers = world * self.workers
        for src in self.train_sources:
            reader_shards(src.urls, rank, readers, strict=True, key=f"data.sources.{src.name}.train")

    @property
    def workers(self) -> int:
        return max(1, self.cfg.data.num_workers)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, sources, batch_size: int, train: bool) -> DataLoader:
        rank, world = self._rank_world()
        data = self.cfg.data
        stream = MixedStream(
            sources,
            self.processor,
            data.seq_len,
            data.seed,
            rank,
            world,
            data.shuffle_buffer,
            train,
            packing=data.packing,
            pack_buffer=data.pack_buffer,
            batch_size=batch_size,
            weights=self.weights if train else None,
            # a training stream continues where training stands (0 in a new run)
            resume={"consumed": self._consumed, "slots": dict(self._slots)} if train else None,
        )
        return DataLoader(
            stream,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=data.num_workers,
            prefetch_factor=PREFETCH if data.num_workers else None,
            pin_memory=torch.cuda.is_available(),
            # worker seeds from the loader's own generator, not the global torch RNG, so creating
            # an iterator (each validation, or after a resume) never shifts training randomness
            generator=torch.Generator().manual_seed(data.seed),
            # a signal to the whole process group is the main process's to handle
            worker_init_fn=ignore_stop_signals,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_sources, self.cfg.data.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        batch = self.cfg.data.val_batch_size or self.cfg.data.batch_size
        return self._loader(self.val_sources, batch, train=False)

    # ------------------------------------------------------------------ progress and resume

    def on_before_batch_transfer(self, batch: Dict[str, Any], dataloader_idx: int) -> Dict[str, Any]:
        """Take the loader's bookkeeping off the batch (still CPU tensors: no device sync); the
        documents' sources stay (validation reports the loss per source)."""
        skipped, data_state = (batch.pop(k, None) for k in BATCH_KEYS)
        sources = batch.get("doc_sources")
        if self.trainer is not None and self.trainer.training:
            if data_state is not None:
                self._pending.append(data_state)
            self._counts.documents.update(sources or ())
            if skipped is not None:
                self._counts.skipped = self._counts.skipped + Skips.of(skipped)
            mask = batch.get("attention_mask")
            if mask is not None:
                self._counts.real_tokens += int(mask.sum())
                self._counts.slots += mask.numel()
        return batch

    def take_counts(self) -> DataCounts:
        """This rank's counts since the last call (then reset)."""
        counts, self._counts = self._counts, DataCounts()
        return counts

    def step_done(self) -> None:
        """The optimizer update that trained on the pending batches has been applied: their
        stream states now count (a crash before or inside the step resumes before them)."""
        for data_state in self._pending:
            self._slots[int(data_state["slot"])] = data_state["state"]
            self._consumed = int(data_state["batch"]) + 1
        self._pending = []

    @property
    def consumed_batches(self) -> int:
        return self._consumed

    def first_unproduced_batch(self) -> int:
        """The earliest batch index no worker can have started yet: workers run at most
        ``PREFETCH`` batches each ahead, and Lightning fetches one more."""
        ahead = PREFETCH * self.cfg.data.num_workers if self.cfg.data.num_workers else 0
        return self._consumed + ahead + 2

    def mixture_weights(self) -> Dict[str, float]:
        """Source -> normalised sampling weight in force at the current training batch."""
        weights = self.weights(self._consumed)
        total = sum(weights) or 1.0
        return {name: w / total for name, w in zip(self.weights.names, weights, strict=True)}

    def set_multipliers(self, multipliers: Dict[str, float]) -> None:
        """Scale the scheduled weights by ``multipliers`` (source -> factor) from the first batch
        no worker has produced yet, so every worker, and a resumed run, switches at one batch."""
        self.weights.push(self.first_unproduced_batch(), [float(multipliers[n]) for n in self.weights.names])

    def layout(self) -> Dict[str, Any]:
        """What a saved stream state is only valid for: resuming under anything else restarts
        the readers (the batch count, and so the schedule, carries on)."""
        _, world = self._rank_world()
        data = self.cfg.data
        return {
            "layout": [world, self.workers],
            "sources": [[s.name, s.kind, len(s.urls), s.urls[0]] for s in self.train_sources],
            "stream": [
                data.seed,
                data.batch_size,
                data.seq_len,
                data.shuffle_buffer,
                data.packing,
                data.pack_buffer,
            ],
        }

    def state_dict(self) -> Dict[str, Any]:
        local = {**self.layout(), "consumed": self._consumed, "slots": dict(self._slots), "rng": _rng_state()}
        ranks = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Lightning writes rank 0's checkpoint only: gather there
            ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(local, ranks, dst=0)
            ranks = ranks or [local]
        return {"ranks": ranks, "weight_log": self.weights.rows()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        rank, world = self._rank_world()
        self.weights.load_rows(state.get("weight_log", []))
        ranks = state.get("ranks", [])
        if not ranks:
            return
        # every rank trains on the same number of batches: the count (and the schedule) carries on
        self._consumed = int(ranks[0]["consumed"])
        mine = ranks[rank] if len(ranks) == world else None
        now = self.layout()
        saved = {k: mine.get(k) for k in now} if mine else None
        if saved != _plain(now):
            warnings.warn(
                f"data: the checkpoint's data layout {saved} differs from this run's {now}; the "
                "training streams restart from data.seed (the batch count and schedule carry on)",
                stacklevel=2,
            )
            return
        self._slots = {int(k): v for k, v in mine["slots"].items()}
        _set_rng_state(mine["rng"])


def _plain(value: Any) -> Any:
    """Tuples as lists, as a value looks after a checkpoint round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],  # plain lists: weights_only loads
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
