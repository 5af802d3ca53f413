"""Routed attention as dense attention over all key tokens with a boolean region mask.

For small maps (few regions) one large fused SDPA call over the whole map beats many small ones,
even though it also multiplies the masked-out pairs; no routed copy of k or v is made.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..attention import merge_heads, split_heads
from ._select import check_shapes, refuse_region_weights, region_mask, unit_channel_stride

__all__ = ["dense_mask_routed_attention", "token_mask"]


def token_mask(indices: Tensor, num_key_regions: int, query_tokens: int, key_tokens: int, backend: str) -> Tensor:
    """(N, Rq, topk) -> (N, 1, Rq * Tq, Rk * Tk) bool: may query token (region i) see key token (region j)."""
    regions = region_mask(indices, num_key_regions, backend)            # (N, Rq, Rk)
    n, num_queries, _ = regions.shape
    tokens = regions[:, :, None, :, None].expand(n, num_queries, query_tokens, num_key_regions, key_tokens)
    return tokens.reshape(n, 1, num_queries * query_tokens, num_key_regions * key_tokens)


def dense_mask_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                                num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention`` (distinct indices, no region_weights)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "dense_mask")
    refuse_region_weights(region_weights, "dense_mask")
    n, num_queries, query_tokens, _ = query.shape
    num_key_regions, key_tokens = key.shape[1], key.shape[2]
    mask = token_mask(indices, num_key_regions, query_tokens, key_tokens, "dense_mask")
    q = split_heads(unit_channel_stride(query).reshape(n, num_queries * query_tokens, -1), num_heads)  # (N, H, L, D)
    k = split_heads(key.reshape(n, num_key_regions * key_tokens, -1), num_heads)    # (N, H, Rk * Tk, Dqk)
    v = split_heads(value.reshape(n, num_key_regions * key_tokens, -1), num_heads)  # (N, H, Rk * Tk, Dv)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return merge_heads(out).reshape(n, num_queries, query_tokens, -1)
