"""Strategies and precision: the one mapping from ``trainer.strategy`` / ``trainer.precision``
to Lightning's arguments and FSDP2's dtype; sharding the composed model (``apply_fsdp``, called
from ``configure_model``); and the Lightning strategy that sets up the data-parallel mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from unittest import mock

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lit_bluelm.models.bluelm import BlueLM


def strategy_and_precision(strategy: str, precision: str) -> Tuple[Any, str]:
    """Lightning's ``strategy`` and ``precision`` for the config's names. Under fsdp, bf16-mixed is
    done by FSDP2's MixedPrecisionPolicy (``fsdp_param_dtype``), so the Trainer runs 32-true."""
    if strategy != "fsdp":
        return strategy, precision
    return FSDP2Strategy(), "32-true" if precision == "bf16-mixed" else precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype frozen models beside the trained one run in (e.g. the distillation teacher)."""
    return torch.bfloat16 if precision.startswith("bf16") else torch.float32


def fsdp_param_dtype(precision: str) -> Optional[torch.dtype]:
    """FSDP2's compute dtype for ``trainer.precision`` (None: the parameters' own)."""
    return torch.bfloat16 if precision == "bf16-mixed" else None


def apply_fsdp(
    model: BlueLM,
    mesh: DeviceMesh,
    param_dtype: Optional[torch.dtype] = None,
    reshard_after_forward: bool = True,
) -> BlueLM:
    """One FSDP unit per vision block and decoder layer, then the root (embeddings, adapter,
    norms, head). ``param_dtype=torch.bfloat16`` computes in bf16 and reduces gradients in fp32."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None
    )
    for unit in model.shard_units():
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # the root is used right after the last layer in backward: keep it gathered
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure data parallelism: one FSDP2 mesh over every
    process of every node (no tensor parallelism), whatever form ``devices`` took."""

    writes_folders = True  # checkpoints are folders of per-rank shards (callbacks.LastCheckpoint)

    def __init__(self, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # the process count is known here (devices=-1, "auto" or a list all resolved)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Lightning's resume, with nothing in the folder able to run code: the ``.metadata`` is
        read by the restricted unpickler first (one clear error), every DCP read goes through
        ``SafeFileSystemReader`` (Lightning offers no hook for the reader, so its loader is
        swapped for the call), and ``meta.pt`` loads with ``weights_only=True``."""
        import lightning.fabric.strategies.model_parallel as fabric_model_parallel

        from lit_bluelm.safe_dcp import check_sharded_checkpoint, safe_load

        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            check_sharded_checkpoint(path)
        with mock.patch.object(fabric_model_parallel, "_distributed_checkpoint_load", safe_load):
            return super().load_checkpoint(checkpoint_path, weights_only=True)
