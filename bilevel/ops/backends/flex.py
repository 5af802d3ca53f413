"""Routed attention with FlexAttention and a block mask built from the routing indices (the GPU path).

The block mask lets the compiled FlexAttention kernel skip every (query block, key block) pair that
no routing decision connects, so compute follows the routed pairs and memory stays linear in the
number of tokens. On CUDA the kernel is ``torch.compile``-d once per process. On CPU torch runs
FlexAttention eagerly and forward only (it has no CPU backward): there the backend is for checking
equivalence, and it raises ValueError when a gradient is needed.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..attention import merge_heads, split_heads, tracks_gradients
from ._select import check_shapes, region_mask

__all__ = ["flex_routed_attention"]


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention() -> Callable[..., Tensor]:
    return torch.compile(flex_attention, dynamic=False)


def flex_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                          num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention`` (distinct indices, no region_weights)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "flex")
    if region_weights is not None:
        raise ValueError("flex: region_weights (soft routing) are not supported; use backend 'sdpa' or "
                         "'recompute' (backend='auto' does so)")
    on_cpu = query.device.type == "cpu"
    if on_cpu and tracks_gradients(query, key, value):
        raise ValueError("flex: torch has no FlexAttention backward on CPU; use backend 'recompute' or 'sdpa' "
                         "for training on CPU (backend='auto' does so)")
    n, num_queries, query_tokens, _ = query.shape
    num_key_regions, key_tokens = key.shape[1], key.shape[2]
    allowed = region_mask(indices, num_key_regions, "flex")             # (N, Rq, Rk)

    def routed(batch: Tensor, head: Tensor, query_index: Tensor, key_index: Tensor) -> Tensor:
        return allowed[batch, query_index // query_tokens, key_index // key_tokens]

    # compiled mask construction on GPU never materialises the (L, S) token mask
    block_mask = create_block_mask(routed, n, None, num_queries * query_tokens, num_key_regions * key_tokens,
                                   device=query.device, _compile=not on_cpu)
    q = split_heads(query.reshape(n, num_queries * query_tokens, -1), num_heads).contiguous()
    k = split_heads(key.reshape(n, num_key_regions * key_tokens, -1), num_heads).contiguous()
    v = split_heads(value.reshape(n, num_key_regions * key_tokens, -1), num_heads).contiguous()
    if on_cpu:   # no gradient is taken here (checked above); torch refuses inputs that merely require one
        q, k, v = q.detach(), k.detach(), v.detach()
        with warnings.catch_warnings():   # eager FlexAttention warns that it is unfused; on CPU that is the point
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    else:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)
    return merge_heads(out).reshape(n, num_queries, query_tokens, -1)
