"""Gather-free routed attention: ``index_select`` the routed regions, then fused SDPA.

The reference builds the routed keys with ``torch.gather`` on a broadcast (N, Rq, Rk, T, C) view,
whose backward is a slow scatter into that view. Here each routed region is copied once with
``index_select`` (backward: ``index_add``) and every query region attends with
``F.scaled_dot_product_attention``, which never stores the attention matrix.

Without autograd on CPU the query regions go in chunks whose routed copy is at most ``CHUNK_BYTES``: the
copy then stays in cache, and its buffers are allocated once per call, where one large copy, or a fresh
one per chunk, costs a page fault per 4 KiB (at 1024 px, stage 2 of BiFormer-T, chunking halves the
time). On a GPU cache-sized chunks cost more launches than they save (twice the time at 1024 px, stage 2,
on an H200): there chunks only bound the routed copy's memory, at ``DEVICE_CHUNK_BYTES``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import merge_heads, split_heads, tracks_gradients
from ._select import check_shapes, flat_region_indices, select_routed, unit_channel_stride

__all__ = ["sdpa_routed_attention", "CHUNK_BYTES", "DEVICE_CHUNK_BYTES"]

#: inference on CPU: the routed key and value copy of one chunk of query regions holds at most this many bytes
CHUNK_BYTES = 4 * 2 ** 20
#: inference on other devices (GPU): the same bound, for memory only
DEVICE_CHUNK_BYTES = 512 * 2 ** 20


def sdpa_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float, num_heads: int,
                          region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention``; (N, Rq, Tq, H * Dqk) ... -> (N, Rq, Tq, H * Dv)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "sdpa")
    n, num_queries, query_tokens, _ = query.shape
    topk = indices.shape[-1]
    flat = flat_region_indices(indices, key.shape[1])
    weights = None if region_weights is None else region_weights.reshape(-1)
    queries = unit_channel_stride(query).reshape(n * num_queries, query_tokens, -1)

    def attend(first: int, last: int, key_buffer: Optional[Tensor] = None, value_buffer: Optional[Tensor] = None
               ) -> Tensor:                                 # query regions [first, last) -> (last - first, H, Tq, Dv)
        def routed(regions: Tensor, buffer: Optional[Tensor]) -> Tensor:   # -> (last - first, H, topk * Tk, D)
            return split_heads(select_routed(regions, flat, weights, topk, first, last, buffer), num_heads)

        q = split_heads(queries[first:last], num_heads)                  # (last - first, H, Tq, Dqk)
        return F.scaled_dot_product_attention(q, routed(key, key_buffer), routed(value, value_buffer), scale=scale)

    batch = n * num_queries
    region_bytes = topk * key.shape[2] * (key.shape[-1] + value.shape[-1]) * key.element_size()
    step = max(1, (CHUNK_BYTES if query.device.type == "cpu" else DEVICE_CHUNK_BYTES) // region_bytes)
    if step >= batch or torch.compiler.is_compiling() or tracks_gradients(query, key, value, region_weights):
        return merge_heads(attend(0, batch)).reshape(n, num_queries, query_tokens, -1)
    out = query.new_empty(batch, query_tokens, value.shape[-1])
    out_heads = split_heads(out, num_heads)                          # (B, H, Tq, Dv) view: one copy per chunk
    key_buffer = key.new_empty(step * topk, *key.shape[2:])          # the chunks' routed copies, reused
    value_buffer = value.new_empty(step * topk, *value.shape[2:])
    for first in range(0, batch, step):
        out_heads[first:first + step] = attend(first, min(first + step, batch), key_buffer, value_buffer)
    return out.reshape(n, num_queries, query_tokens, -1)
