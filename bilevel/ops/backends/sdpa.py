"""Gather-free routed attention: ``index_select`` the routed regions, then fused SDPA.

The reference builds the routed keys with ``torch.gather`` on a broadcast (N, Rq, Rk, T, C) view,
whose backward is a slow scatter into that view. Here each routed region is copied once with
``index_select`` (backward: ``index_add``) and every query region attends with
``F.scaled_dot_product_attention``, which never stores the attention matrix.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..attention import merge_heads, split_heads
from ._select import check_shapes, flat_region_indices, select_regions

__all__ = ["sdpa_routed_attention"]


def sdpa_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float, num_heads: int,
                          region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention``; (N, Rq, Tq, H * Dqk) ... -> (N, Rq, Tq, H * Dv)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "sdpa")
    n, num_queries, query_tokens, _ = query.shape
    flat = flat_region_indices(indices, key.shape[1])
    weights = None if region_weights is None else region_weights.reshape(-1)
    batch = n * num_queries

    def routed(regions: Tensor) -> Tensor:      # (N, Rk, Tk, H * D) -> (N * Rq, H, topk * Tk, D)
        selected = select_regions(regions, flat, weights)
        return split_heads(selected.reshape(batch, -1, regions.shape[-1]), num_heads)

    q = split_heads(query.reshape(batch, query_tokens, -1), num_heads)   # (N * Rq, H, Tq, Dqk)
    out = F.scaled_dot_product_attention(q, routed(key), routed(value), scale=scale)
    return merge_heads(out).reshape(n, num_queries, query_tokens, -1)
