"""Stage behaviour that hooks into the Lightning loop (checkpointing, throughput, schedules)."""

from callbacks.checkpoint import LastCheckpoint
from callbacks.resampling import ResamplingSchedule

__all__ = ["LastCheckpoint", "ResamplingSchedule"]
