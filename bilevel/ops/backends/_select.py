"""Shared pieces of the backends: selecting routed regions without a broadcast gather, region masks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["flat_region_indices", "select_regions", "select_routed", "region_mask", "check_shapes",
           "refuse_region_weights", "unit_channel_stride"]


def check_shapes(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, num_heads: int,
                 region_weights: Optional[Tensor], backend: str) -> None:
    """Raise ValueError naming the backend and argument when the shapes do not fit together."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"{backend}: query, key and value must be (N, R, T, C); got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape[:3] != value.shape[:3] or query.shape[0] != key.shape[0]:
        raise ValueError(f"{backend}: key {tuple(key.shape)} and value {tuple(value.shape)} must share (N, Rk, Tk) "
                         f"and the batch of query {tuple(query.shape)}")
    if query.shape[-1] != key.shape[-1] or query.shape[-1] % num_heads or value.shape[-1] % num_heads:
        raise ValueError(f"{backend}: query/key channels ({query.shape[-1]}, {key.shape[-1]}) must be equal and, "
                         f"like value channels ({value.shape[-1]}), divisible by num_heads={num_heads}")
    if indices.dim() != 3 or indices.shape[:2] != query.shape[:2]:
        raise ValueError(f"{backend}: indices must be (N, Rq, topk) = ({query.shape[0]}, {query.shape[1]}, topk); "
                         f"got {tuple(indices.shape)}")
    if region_weights is not None and region_weights.shape != indices.shape:
        raise ValueError(f"{backend}: region_weights {tuple(region_weights.shape)} must have the shape of "
                         f"indices {tuple(indices.shape)}")


def refuse_region_weights(region_weights: Optional[Tensor], backend: str) -> None:
    """Raise ValueError for the backends that attend over a set of allowed regions (no per-region factors)."""
    if region_weights is not None:
        raise ValueError(f"{backend}: region_weights (soft routing) are not supported; use backend 'sdpa' or "
                         "'recompute' (backend='auto' does so)")


def unit_channel_stride(x: Tensor) -> Tensor:
    """``x`` with stride 1 along its last (channel) axis, copied only when needed.

    PyTorch's fused attention kernels need it, and SDPA otherwise falls back to its slow math path
    (region-partitioned maps that were channels-first, as DBRA's queries, have channel stride T).
    """
    return x if x.stride(-1) == 1 else x.contiguous()


def flat_region_indices(indices: Tensor, num_key_regions: int) -> Tensor:
    """(N, Rq, topk) per-image region indices -> (N * Rq * topk,) indices into the (N * Rk) regions."""
    if indices.shape[0] == 1:     # one image: the indices are already flat (saves two small ops per call)
        return indices.reshape(-1)
    offsets = torch.arange(indices.shape[0], device=indices.device).mul_(num_key_regions)
    return (indices + offsets.view(-1, 1, 1)).reshape(-1)


def select_regions(regions: Tensor, flat_indices: Tensor, weights: Optional[Tensor] = None,
                   out: Optional[Tensor] = None) -> Tensor:
    """Copy the routed regions once with ``index_select`` (backward: a fast ``index_add``).

    regions: (N, Rk, T, C); flat_indices: (N * Rq * k,) from :func:`flat_region_indices` (k routed
    regions per query region); weights: optional (N * Rq * k,) factors; out: optional buffer to fill
    (no autograd), which saves a fresh allocation per call: one page fault per 4 KiB on CPU.
    returns: (N * Rq * k, T, C)
    """
    flat_regions = regions.reshape(-1, *regions.shape[2:])
    if out is not None:
        selected = torch.index_select(flat_regions, 0, flat_indices, out=out)
        return selected if weights is None else selected.mul_(weights.reshape(-1, 1, 1))
    selected = flat_regions.index_select(0, flat_indices)
    if weights is not None:
        selected = selected * weights.reshape(-1, 1, 1)
    return selected


def select_routed(regions: Tensor, flat_indices: Tensor, weights: Optional[Tensor], topk: int, first: int,
                  last: int, buffer: Optional[Tensor] = None) -> Tensor:
    """The routed regions of query regions ``[first, last)``, side by side: (last - first, topk * T, C).

    regions: (N, Rk, T, C); flat_indices, weights: (N * Rq * topk,) as for :func:`select_regions`;
    buffer: optional (at least (last - first) * topk, T, C) memory to fill, reused across chunks (no autograd).
    """
    chosen = slice(first * topk, last * topk)
    out = None if buffer is None else buffer[:(last - first) * topk]
    selected = select_regions(regions, flat_indices[chosen], None if weights is None else weights[chosen], out=out)
    return selected.view(last - first, -1, regions.shape[-1])


def region_mask(indices: Tensor, num_key_regions: int, backend: str) -> Tensor:
    """(N, Rq, topk) indices -> (N, Rq, Rk) bool, True where key region j is routed to query region i.

    Raises ValueError when a query region lists the same key region twice (the reference would
    then count it twice, a set of allowed regions cannot).
    """
    mask = torch.zeros(*indices.shape[:2], num_key_regions, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices, True)
    # a data-dependent check: eager only (compiled graphs take torch.topk indices, distinct by construction)
    if not torch.compiler.is_compiling() and (mask.sum(-1) != indices.shape[-1]).any():
        raise ValueError(f"{backend}: routing indices repeat a key region within one query region; "
                         "this backend needs distinct indices (as torch.topk gives)")
    return mask
