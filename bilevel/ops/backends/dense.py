"""Routed attention as dense attention over all key tokens with a region bias.

For small maps (few regions) one large fused SDPA call over the whole map beats many small ones,
even though it also multiplies the pairs that are not routed; no routed copy of k or v is made.
The bias is log(how often key region j is routed to query region i): -inf for regions not routed, 0 for
regions routed once, and log 2 for a region listed twice, whose tokens the reference gathers (and so
counts in the softmax) twice. So any indices give the reference's function, with no data-dependent check.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import merge_heads, split_heads
from ._select import check_shapes, refuse_region_weights, unit_channel_stride

__all__ = ["dense_mask_routed_attention", "token_bias"]


def token_bias(indices: Tensor, num_key_regions: int, query_tokens: int, key_tokens: int, dtype: torch.dtype
               ) -> Tensor:
    """(N, Rq, topk) -> (N, 1, Rq * Tq, Rk * Tk) additive bias: log of how often key token (region j) is
    routed to query token (region i); -inf where it is not routed."""
    n, num_queries, topk = indices.shape
    counts = torch.zeros(n, num_queries, num_key_regions, dtype=dtype, device=indices.device)
    counts.scatter_add_(-1, indices, torch.ones(n, num_queries, topk, dtype=dtype, device=indices.device))
    bias = counts.log_()                                                         # (N, Rq, Rk)
    tokens = bias[:, :, None, :, None].expand(n, num_queries, query_tokens, num_key_regions, key_tokens)
    return tokens.reshape(n, 1, num_queries * query_tokens, num_key_regions * key_tokens)


def dense_mask_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                                num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention`` (no region_weights)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "dense_mask")
    refuse_region_weights(region_weights, "dense_mask")
    n, num_queries, query_tokens, _ = query.shape
    num_key_regions, key_tokens = key.shape[1], key.shape[2]
    bias = token_bias(indices, num_key_regions, query_tokens, key_tokens, query.dtype)
    q = split_heads(unit_channel_stride(query).reshape(n, num_queries * query_tokens, -1), num_heads)  # (N, H, L, D)
    k = split_heads(key.reshape(n, num_key_regions * key_tokens, -1), num_heads)    # (N, H, Rk * Tk, Dqk)
    v = split_heads(value.reshape(n, num_key_regions * key_tokens, -1), num_heads)  # (N, H, Rk * Tk, Dv)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return merge_heads(out).reshape(n, num_queries, query_tokens, -1)
