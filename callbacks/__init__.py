"""Stage behaviour that hooks into the Lightning loop (checkpointing, throughput, schedules)."""

from callbacks.checkpoint import LastCheckpoint

__all__ = ["LastCheckpoint"]
