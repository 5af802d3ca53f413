"""Lightning's FSDPStrategy on CPU processes (gloo), for the tests: only the device differs.

Lightning accepts the ``fsdp`` strategy only with a CUDA accelerator (a subclass of FSDPStrategy passes its
check), and it hands torch's FSDP ``device_id=root_device.index``, which is None on a CPU, where torch then
asks for an accelerator. This subclass wraps the model on the CPU device; activation checkpointing, the
checkpoint's state-dict gathering and the precision plugin stay Lightning's.
"""
from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
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
