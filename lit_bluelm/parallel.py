"""FSDP2: sharding the composed model (``apply_fsdp``, called from ``configure_model``) and the
Lightning strategy that sets up the data-parallel mesh for it."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lit_bluelm.models.bluelm import BlueLM


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

    def __init__(self, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # the process count is known here (devices=-1, "auto" or a list all resolved)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
