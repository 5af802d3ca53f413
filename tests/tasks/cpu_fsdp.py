"""Lightning's FSDPStrategy on CPU processes (gloo), for the tests: only the device differs.

Lightning accepts the ``fsdp`` strategy only with a CUDA accelerator (a subclass of FSDPStrategy passes its
check), and it hands torch's FSDP ``device_id=root_device.index``, which is None on a CPU, where torch then
asks for an accelerator. This subclass wraps the model on the CPU device; activation checkpointing, the
checkpoint's state-dict gathering and the precision plugin stay Lightning's. On a CPU, FSDP's "offload to
CPU" of the optimiser state is a no-op that leaves every state tensor a view of one shared storage, which
Lightning's lazy checkpoint loader then reads once per view (tens of GB on resume): the state is cloned
before saving (on a GPU the offload copies).
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed.fsdp import FullyShardedDataParallel


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                           **self.kwargs)
        # wrapped already: Lightning's own set-up must not apply the policy a second time
        self.kwargs.pop("auto_wrap_policy", None)
        return super()._setup_model(wrapped)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        return apply_to_collection(state, torch.Tensor, torch.Tensor.clone)
