"""Routed attention as two BLAS products per head: ``index_select`` the routed regions, then
``softmax(scale * q kᵀ) v`` with one batched matmul per head on strided channel slices.

PyTorch's fused CPU attention kernel splits the queries of each (region, head) into blocks of 32
rows, and for the small tiles of BiFormer at 224 px (64 routed keys per query) its per-block work
costs more than the products themselves. Two batched BLAS calls per head are faster there
(``benchmarks/results/bra_cpu.md``). The heads are channel slices of q, k and v and of the output,
read and written in place: no head-major copies and no merge copy.

Without autograd the query regions go in chunks whose routed copy and score matrix together hold at
most ``CHUNK_BYTES`` (they then stay in cache); their buffers are allocated once per call, and one score
buffer is reused by every head.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attention import tracks_gradients
from ._select import check_shapes, flat_region_indices, select_routed

__all__ = ["matmul_routed_attention", "CHUNK_BYTES"]

#: inference: routed keys, values and the score matrix of one chunk of query regions hold at most this many bytes
CHUNK_BYTES = 4 * 2 ** 20


def _attend(queries: Tensor, keys: Tensor, values: Tensor, scale: float, num_heads: int,
            out: Optional[Tensor] = None, scores: Optional[Tensor] = None) -> Tensor:
    """(B, Tq, H * Dqk), (B, L, H * Dqk), (B, L, H * Dv) -> (B, Tq, H * Dv), head by head.

    out, scores: buffers of shape (B, Tq, H * Dv) and (B, Tq, L) to fill (no autograd); without them
    every head's output is a new tensor and the heads are concatenated (autograd).
    """
    qk_dim, v_dim = queries.shape[-1] // num_heads, values.shape[-1] // num_heads
    keys_t = keys.transpose(1, 2)                                        # (B, H * Dqk, L)
    ignored = queries.new_empty(1, 1, 1) if scores is None else scores   # baddbmm's input, times beta=0
    heads = []
    for head in range(num_heads):
        logits = torch.baddbmm(ignored, queries.narrow(-1, head * qk_dim, qk_dim),
                               keys_t.narrow(1, head * qk_dim, qk_dim), beta=0, alpha=scale,
                               **({} if scores is None else {"out": scores}))
        head_out = torch.bmm(logits.softmax(dim=-1), values.narrow(-1, head * v_dim, v_dim))
        if out is None:
            heads.append(head_out)
        else:   # bmm(out=) into a channel slice is 3x slower than this copy
            out.narrow(-1, head * v_dim, v_dim).copy_(head_out)
    return torch.cat(heads, dim=-1) if out is None else out


def matmul_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                            num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention``; (N, Rq, Tq, H * Dqk) ... -> (N, Rq, Tq, H * Dv)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "matmul")
    n, num_queries, query_tokens, _ = query.shape
    topk, key_tokens = indices.shape[-1], key.shape[2]
    routed_tokens = topk * key_tokens
    flat = flat_region_indices(indices, key.shape[1])
    weights = None if region_weights is None else region_weights.reshape(-1)
    queries = query.reshape(n * num_queries, query_tokens, -1)

    def routed(regions: Tensor, first: int, last: int, buffer: Optional[Tensor] = None) -> Tensor:
        return select_routed(regions, flat, weights, topk, first, last, buffer)   # (last - first, topk * Tk, C)

    batch = n * num_queries
    if tracks_gradients(query, key, value, region_weights):
        return _attend(queries, routed(key, 0, batch), routed(value, 0, batch), scale,
                       num_heads).reshape(n, num_queries, query_tokens, -1)
    region_bytes = routed_tokens * (key.shape[-1] + value.shape[-1] + query_tokens) * key.element_size()
    step = max(1, CHUNK_BYTES // region_bytes)
    out = query.new_empty(batch, query_tokens, value.shape[-1])
    step = min(step, batch)
    scores = query.new_empty(step, query_tokens, routed_tokens)
    key_buffer = key.new_empty(step * topk, *key.shape[2:])
    value_buffer = value.new_empty(step * topk, *value.shape[2:])
    for first in range(0, batch, step):
        last = min(first + step, batch)
        _attend(queries[first:last], routed(key, first, last, key_buffer), routed(value, first, last, value_buffer),
                scale, num_heads, out=out[first:last], scores=scores[:last - first])
    return out.reshape(n, num_queries, query_tokens, -1)
