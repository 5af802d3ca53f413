"""Analytic FLOP counter for the project's models, BRA's routing and routed attention included.

fvcore-style counting: one multiply-add is one FLOP (the convention of the papers' "GFLOPs"),
element-wise work (norms, activations, softmax, residual adds) is not counted. Generic tools miss
parts of it: fvcore skips the operators it has no handler for (BiFormer#33), and PyTorch's
``FlopCounterMode`` counts fused ``scaled_dot_product_attention`` kernels on CPU as zero. Here every
attention module is counted from its configuration and the input shape a forward hook records:

- ``routing``: region means of q and k (one add per averaged element), the region affinity matmul
  (Rq * Rk * C_qk), and top-k selection (one comparison per candidate region);
- ``attention``: q·k and p·v over the routed tokens only, ``Rq * Tq * topk * Tk * (C_qk + C_v)``;
  DBRA adds its deformable attention (every query pixel onto the Hg * Wg deformed tokens), CrossFormer
  the attention inside its groups, BiFormer's last stage full attention;
- ``gather``: not FLOPs but memory, reported apart as the elements the reference k-fold gather
  copies (``Rq * topk * Tk * (C_qk + C_v)``);
- ``linear`` / ``conv``: every ``nn.Linear`` and ``nn.Conv2d`` called, wherever it sits (DBRA's
  projections and offset network, CrossFormer's position-bias MLP included).

Bilinear sampling (DBRA's deformed tokens and position bias) is element-wise and not counted.
Usage: ``count_flops(model, x).total``; further attention modules register with
:func:`register_flop_counter`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .ops.bra import BiLevelRoutingAttention, NCHWBiLevelRoutingAttention
from .ops.dbra import DeBiLevelRoutingAttention
from .ops.lsda import GroupAttention

__all__ = ["FlopCount", "count_flops", "register_flop_counter", "routed_attention_flops", "routing_flops",
           "global_attention_flops"]


@dataclass
class FlopCount:
    """Multiply-adds of one forward pass, by category and by module name; gather elements apart."""

    by_category: Counter = field(default_factory=Counter)
    by_module: Counter = field(default_factory=Counter)
    gather_elements: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_category.values())

    def add(self, module_name: str, category: str, flops: int) -> None:
        self.by_category[category] += flops
        self.by_module[module_name] += flops


def routed_attention_flops(batch: int, query_regions: int, query_tokens: int, topk: int, key_tokens: int,
                           qk_channels: int, v_channels: int) -> int:
    """q·k and p·v multiply-adds of routed attention (all heads together: channels = heads * head dim)."""
    return batch * query_regions * query_tokens * topk * key_tokens * (qk_channels + v_channels)


def routing_flops(batch: int, query_regions: int, key_regions: int, averaged_elements: int, qk_channels: int) -> int:
    """Region means (``averaged_elements`` adds), affinity matmul and top-k comparisons."""
    return averaged_elements + batch * query_regions * key_regions * (qk_channels + 1)


def global_attention_flops(batch: int, tokens: int, channels: int) -> int:
    """q·k and p·v multiply-adds of full attention over ``tokens`` tokens."""
    return batch * tokens * tokens * 2 * channels


def _kv_tokens(module: BiLevelRoutingAttention, region_size: tuple[int, int]) -> int:
    """Key/value tokens per region after the module's kv downsampling."""
    down = module.kv_down
    if isinstance(down, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = down.output_size
        return math.prod(size) if isinstance(size, tuple) else size * size
    if isinstance(down, (nn.AvgPool2d, nn.MaxPool2d)):
        ratio = down.kernel_size
        return (region_size[0] // ratio) * (region_size[1] // ratio)
    return region_size[0] * region_size[1]


def _count_bra(module: BiLevelRoutingAttention, inputs: tuple, count: FlopCount, name: str) -> None:
    n, height, width, _ = inputs[0].shape                                    # NHWC
    if module.auto_pad:
        height, width = -(-height // module.n_win) * module.n_win, -(-width // module.n_win) * module.n_win
    regions = module.n_win ** 2
    region_size = (height // module.n_win, width // module.n_win)
    tokens, key_tokens = region_size[0] * region_size[1], _kv_tokens(module, region_size)
    count.add(name, "routing", routing_flops(n, regions, regions, 2 * n * height * width * module.qk_dim,
                                             module.qk_dim))
    count.add(name, "attention", routed_attention_flops(n, regions, tokens, module.topk, key_tokens,
                                                        module.qk_dim, module.dim))
    count.gather_elements += n * regions * module.topk * key_tokens * (module.qk_dim + module.dim)


def _count_nchw_bra(module: NCHWBiLevelRoutingAttention, inputs: tuple, count: FlopCount, name: str) -> None:
    n, channels, height, width = inputs[0].shape                             # NCHW, partial last regions
    region_size = (height // module.n_win, width // module.n_win)
    regions = -(-height // region_size[0]) * -(-width // region_size[1])
    tokens = region_size[0] * region_size[1]
    count.add(name, "routing", routing_flops(n, regions, regions, 2 * n * height * width * channels, channels))
    count.add(name, "attention", routed_attention_flops(n, regions, tokens, module.topk, tokens, channels, channels))
    count.gather_elements += n * regions * module.topk * tokens * 2 * channels


def _count_dbra(module: DeBiLevelRoutingAttention, inputs: tuple, count: FlopCount, name: str) -> None:
    n, height, width, channels = inputs[0].shape                             # NHWC
    n_win, stride = module.n_win, module.settings.stride
    if module.auto_pad:
        height, width = -(-height // n_win) * n_win, -(-width // n_win) * n_win
    deformed_h, deformed_w = -(-height // stride), -(-width // stride)       # the offset network's grid
    if module.auto_pad:
        deformed_h, deformed_w = -(-deformed_h // n_win) * n_win, -(-deformed_w // n_win) * n_win
    regions = n_win ** 2
    query_tokens = (deformed_h // n_win) * (deformed_w // n_win)
    key_tokens = (height // n_win) * (width // n_win)
    averaged = n * (deformed_h * deformed_w + height * width) * channels
    count.add(name, "routing", routing_flops(n, regions, regions, averaged, channels))
    count.add(name, "attention", routed_attention_flops(n, regions, query_tokens, module.topk, key_tokens,
                                                        channels, channels))
    count.add(name, "attention", n * height * width * deformed_h * deformed_w * 2 * channels)
    count.gather_elements += n * regions * module.topk * key_tokens * 2 * channels


def _count_group_attention(module: GroupAttention, inputs: tuple, count: FlopCount, name: str) -> None:
    n, num_groups, tokens, channels = inputs[0].shape                        # (N, groups, G², C)
    count.add(name, "attention", n * num_groups * tokens * tokens * 2 * channels)


def _count_global_nhwc(module: nn.Module, inputs: tuple, count: FlopCount, name: str) -> None:
    n, height, width, channels = inputs[0].shape
    count.add(name, "attention", global_attention_flops(n, height * width, channels))


def _count_global_nchw(module: nn.Module, inputs: tuple, count: FlopCount, name: str) -> None:
    n, channels, height, width = inputs[0].shape
    count.add(name, "attention", global_attention_flops(n, height * width, channels))


ModuleCounter = Callable[[nn.Module, tuple, FlopCount, str], None]

#: attention module class -> function(module, forward inputs, FlopCount, module name) adding its own
#: (non-Linear, non-Conv2d) work; its Linear/Conv2d children are counted by their own hooks
FLOP_COUNTERS: dict[type, ModuleCounter] = {
    BiLevelRoutingAttention: _count_bra,
    NCHWBiLevelRoutingAttention: _count_nchw_bra,
    DeBiLevelRoutingAttention: _count_dbra,
    GroupAttention: _count_group_attention,
}


def register_flop_counter(cls: type, counter: ModuleCounter) -> None:
    """Count ``cls`` modules with ``counter`` (for attention modules of other families)."""
    FLOP_COUNTERS[cls] = counter


def _register_biformer_attention() -> None:
    from .models.biformer import Attention, AttentionLePE, NCHWAttentionLePE
    register_flop_counter(Attention, _count_global_nhwc)
    register_flop_counter(AttentionLePE, _count_global_nhwc)
    register_flop_counter(NCHWAttentionLePE, _count_global_nchw)


def _count_linear(module: nn.Linear, inputs: tuple, output: Tensor) -> int:
    return output.numel() * module.in_features


def _count_conv(module: nn.Conv2d, inputs: tuple, output: Tensor) -> int:
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


@torch.no_grad()
def count_flops(model: nn.Module, *inputs: Tensor) -> FlopCount:
    """Run ``model(*inputs)`` once with hooks and return the analytic multiply-add count."""
    _register_biformer_attention()
    count = FlopCount()
    handles = []
    for name, module in model.named_modules():
        counter = FLOP_COUNTERS.get(type(module))
        if counter is not None:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name, counter=counter: counter(mod, args, count, name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: count.add(name, "linear", _count_linear(mod, args, out))))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: count.add(name, "conv", _count_conv(mod, args, out))))
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return count
