"""The WebDataset LightningDataModule: mixed, streamed, padded batches for every stage."""

from __future__ import annotations

import os

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datamodules.collate import Collator
from datamodules.streams import MixedStream, build_sources, reader_shards
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.tokenizer import load_tokenizer


class BlueLMDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        # tokenizers' own thread pool does not survive DataLoader worker forks
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.processor = BlueLMProcessor.from_config(self.tokenizer, cfg.model)
        # checked now, so a bad source stops the run before any model is built
        self.train_sources = build_sources(cfg, "train")
        self.val_sources = build_sources(cfg, "val")
        self.collate = Collator(self.processor.pad_token_id)

    def setup(self, stage: str) -> None:
        # each reader (rank x worker) needs its own training shards; say so before any worker starts
        rank, world = self._rank_world()
        readers = world * max(1, self.cfg.data.num_workers)
        for src in self.train_sources:
            reader_shards(src.urls, rank, readers, strict=True, key=f"data.sources.{src.name}.train")

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
        )
        return DataLoader(
            stream,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=data.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_sources, self.cfg.data.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        batch = self.cfg.data.val_batch_size or self.cfg.data.batch_size
        return self._loader(self.val_sources, batch, train=False)
