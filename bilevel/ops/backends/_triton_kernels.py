"""Triton kernels of the ``triton`` backend: routed attention fused with its gather, forward and backward.

One program takes a tile of ``BLOCK_M`` query tokens of one query region and one head, and walks the
``topk`` key regions that routing chose for that region, ``BLOCK_N`` key tokens at a time, with an online
softmax (FlashAttention's recurrence). q, k, v are read in place from their region-partitioned
(N, R, T, H * D) layout through strides, so nothing is gathered, split into heads or copied. fp32 products
use ``input_precision="ieee"`` (no TF32), to match the reference.

Imported on first use only: Triton is a GPU compiler that not every install has.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_pointers(base, stride_region, stride_token, stride_channel, region, tokens, channels):
    """Pointers to ``tokens`` x ``channels`` of one region (tokens and channels: 1-D offset blocks)."""
    return base + region * stride_region + tokens[:, None] * stride_token + channels[None, :] * stride_channel


@triton.jit
def routed_forward_kernel(q, k, v, indices, out, lse, scale,
                          sq_n, sq_r, sq_t, sq_c, sk_n, sk_r, sk_t, sk_c, sv_n, sv_r, sv_t, sv_c,
                          so_n, so_r, so_t, so_c, si_n, si_r, si_k,
                          num_queries, num_heads, query_tokens, key_tokens, topk, qk_dim, v_dim,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    """Grid (query tiles, N * Rq, H). out: (N, Rq, Tq, H * Dv); lse: (N * Rq, H, Tq) float32."""
    tile, batch_region, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, region = (batch_region // num_queries).to(tl.int64), (batch_region % num_queries).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, dims_v, cols = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
    row_ok, dim_ok, dim_v_ok = rows < query_tokens, dims < qk_dim, dims_v < v_dim

    query = tl.load(_tile_pointers(q + n * sq_n, sq_r, sq_t, sq_c, region, rows, head * qk_dim + dims),
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for slot in range(topk):
        key_region = tl.load(indices + n * si_n + region * si_r + slot * si_k)
        for start in range(0, key_tokens, BLOCK_N):
            tokens = start + cols
            token_ok = tokens < key_tokens
            keys = tl.load(_tile_pointers(k + n * sk_n, sk_r, sk_t, sk_c, key_region, tokens, head * qk_dim + dims),
                           mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
            scores = tl.dot(query, tl.trans(keys), input_precision="ieee") * scale
            scores = tl.where(token_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * correction + tl.sum(weights, axis=1)
            values = tl.load(_tile_pointers(v + n * sv_n, sv_r, sv_t, sv_c, key_region, tokens,
                                            head * v_dim + dims_v),
                             mask=token_ok[:, None] & dim_v_ok[None, :], other=0.0)
            acc = acc * correction[:, None] + tl.dot(weights.to(values.dtype), values, input_precision="ieee")
            running_max = new_max
    result = acc / running_sum[:, None]
    tl.store(_tile_pointers(out + n * so_n, so_r, so_t, so_c, region, rows, head * v_dim + dims_v),
             result.to(out.dtype.element_ty), mask=row_ok[:, None] & dim_v_ok[None, :])
    tl.store(lse + (batch_region * num_heads + head) * query_tokens + rows,
             running_max + tl.log(running_sum), mask=row_ok)


@triton.jit
def routed_backward_kernel(q, k, v, indices, grad_out, lse, delta, grad_q, grad_k, grad_v, scale,
                           sq_n, sq_r, sq_t, sq_c, sk_n, sk_r, sk_t, sk_c, sv_n, sv_r, sv_t, sv_c,
                           so_n, so_r, so_t, so_c, si_n, si_r, si_k,
                           gq_n, gq_r, gq_t, gq_c, gk_n, gk_r, gk_t, gk_c, gv_n, gv_r, gv_t, gv_c,
                           num_queries, num_heads, query_tokens, key_tokens, topk, qk_dim, v_dim,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr):
    """Grid as the forward. so_*: grad_out's strides; gq_*, gk_*, gv_*: those of grad_q, grad_k, grad_v
    (float32, zeroed); lse, delta: (N * Rq, H, Tq) float32. grad_q is written, grad_k and grad_v accumulated
    atomically (key regions are shared between query regions)."""
    tile, batch_region, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, region = (batch_region // num_queries).to(tl.int64), (batch_region % num_queries).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, dims_v, cols = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
    row_ok, dim_ok, dim_v_ok = rows < query_tokens, dims < qk_dim, dims_v < v_dim

    q_mask = row_ok[:, None] & dim_ok[None, :]
    query = tl.load(_tile_pointers(q + n * sq_n, sq_r, sq_t, sq_c, region, rows, head * qk_dim + dims),
                    mask=q_mask, other=0.0)
    out_grad = tl.load(_tile_pointers(grad_out + n * so_n, so_r, so_t, so_c, region, rows, head * v_dim + dims_v),
                       mask=row_ok[:, None] & dim_v_ok[None, :], other=0.0)
    row_stats = (batch_region * num_heads + head) * query_tokens + rows
    row_lse = tl.load(lse + row_stats, mask=row_ok, other=0.0)
    row_delta = tl.load(delta + row_stats, mask=row_ok, other=0.0)
    query_grad = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for slot in range(topk):
        key_region = tl.load(indices + n * si_n + region * si_r + slot * si_k)
        for start in range(0, key_tokens, BLOCK_N):
            tokens = start + cols
            token_ok = tokens < key_tokens
            k_mask = token_ok[:, None] & dim_ok[None, :]
            v_mask = token_ok[:, None] & dim_v_ok[None, :]
            key_channels, value_channels = head * qk_dim + dims, head * v_dim + dims_v
            keys = tl.load(_tile_pointers(k + n * sk_n, sk_r, sk_t, sk_c, key_region, tokens, key_channels),
                           mask=k_mask, other=0.0)
            values = tl.load(_tile_pointers(v + n * sv_n, sv_r, sv_t, sv_c, key_region, tokens, value_channels),
                             mask=v_mask, other=0.0)
            scores = tl.dot(query, tl.trans(keys), input_precision="ieee") * scale
            weights = tl.exp(scores - row_lse[:, None])
            weights = tl.where(row_ok[:, None] & token_ok[None, :], weights, 0.0)
            weight_grad = tl.dot(out_grad, tl.trans(values), input_precision="ieee")
            score_grad = weights * (weight_grad - row_delta[:, None])
            query_grad += tl.dot(score_grad.to(keys.dtype), keys, input_precision="ieee") * scale
            key_grad = tl.dot(tl.trans(score_grad.to(query.dtype)), query, input_precision="ieee") * scale
            value_grad = tl.dot(tl.trans(weights.to(out_grad.dtype)), out_grad, input_precision="ieee")
            tl.atomic_add(_tile_pointers(grad_k + n * gk_n, gk_r, gk_t, gk_c, key_region, tokens, key_channels),
                          key_grad, mask=k_mask)
            tl.atomic_add(_tile_pointers(grad_v + n * gv_n, gv_r, gv_t, gv_c, key_region, tokens, value_channels),
                          value_grad, mask=v_mask)
    tl.store(_tile_pointers(grad_q + n * gq_n, gq_r, gq_t, gq_c, region, rows, head * qk_dim + dims),
             query_grad.to(grad_q.dtype.element_ty), mask=q_mask)
