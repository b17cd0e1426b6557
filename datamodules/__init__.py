"""Data pipelines: WebDataset streams, mixtures, collation and the demo-data generator."""

from datamodules.collate import Collator
from datamodules.datamodule import BlueLMDataModule
from datamodules.kinds import SAMPLE_KINDS

__all__ = ["SAMPLE_KINDS", "BlueLMDataModule", "Collator"]
