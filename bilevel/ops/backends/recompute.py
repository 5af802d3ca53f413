"""Memory-light routed attention: saves no routed copy of k or v, recomputes them in backward.

A custom autograd function. Forward walks the routed regions in chunks with an online softmax
(running max and sum), so at most one chunk of routed keys/values and scores exists at a time,
and saves only q, k, v (which the graph holds anyway), the output and the log-sum-exp. Backward
re-selects each chunk with ``index_select``, rebuilds its probabilities from the saved
log-sum-exp and sends the key/value gradients back with ``index_add_``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..attention import merge_heads, split_heads
from ._select import check_shapes, flat_region_indices, select_regions

__all__ = ["recompute_routed_attention", "CHUNK_ELEMENTS"]

#: upper bound on the elements of one chunk's score matrix (B, H, Tq, chunk * Tk): 32 MiB in float32
CHUNK_ELEMENTS = 1 << 23


def _regions_per_chunk(batch: int, num_heads: int, query_tokens: int, key_tokens: int, topk: int) -> int:
    return max(1, min(topk, CHUNK_ELEMENTS // (batch * num_heads * query_tokens * key_tokens)))


class _RoutedAttentionFunction(torch.autograd.Function):
    """query (N, Rq, Tq, H*D), key (N, Rk, Tk, H*D), value (N, Rk, Tk, H*Dv), flat (B, topk) with
    B = N * Rq indices into the N * Rk regions, weights (B, topk) or None -> (N, Rq, Tq, H*Dv)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, flat: Tensor, weights: Optional[Tensor],
                scale: float, num_heads: int) -> Tensor:
        n, num_queries, query_tokens, _ = query.shape
        batch, topk = flat.shape
        chunk = _regions_per_chunk(batch, num_heads, query_tokens, key.shape[2], topk)
        q = split_heads(query.reshape(batch, query_tokens, -1), num_heads)          # (B, H, Tq, D)
        running_max = running_sum = accumulated = None
        for start in range(0, topk, chunk):
            k_chunk, v_chunk = _routed_chunk(key, value, flat, weights, start, start + chunk, num_heads)
            scores = (q @ k_chunk.transpose(-2, -1)).mul_(scale)                   # (B, H, Tq, c * Tk)
            chunk_max = scores.amax(dim=-1, keepdim=True)
            probs = scores.sub_(chunk_max).exp_()
            chunk_sum, chunk_out = probs.sum(dim=-1, keepdim=True), probs @ v_chunk
            if accumulated is None:
                running_max, running_sum, accumulated = chunk_max, chunk_sum, chunk_out
                continue
            new_max = torch.maximum(running_max, chunk_max)
            old_factor, chunk_factor = (running_max - new_max).exp_(), (chunk_max - new_max).exp_()
            running_sum = running_sum * old_factor + chunk_sum * chunk_factor
            accumulated = accumulated * old_factor + chunk_out * chunk_factor
            running_max = new_max
        out = accumulated.div_(running_sum)                                          # (B, H, Tq, Dv)
        log_sum_exp = running_max + running_sum.log()                                # (B, H, Tq, 1)
        ctx.save_for_backward(query, key, value, flat, weights, out, log_sum_exp)
        ctx.scale, ctx.num_heads, ctx.chunk = scale, num_heads, chunk
        return merge_heads(out).reshape(n, num_queries, query_tokens, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        query, key, value, flat, weights, out, log_sum_exp = ctx.saved_tensors
        scale, num_heads, chunk = ctx.scale, ctx.num_heads, ctx.chunk
        batch, topk = flat.shape
        query_tokens = query.shape[2]
        q = split_heads(query.reshape(batch, query_tokens, -1), num_heads)                  # (B, H, Tq, D)
        grad_out = split_heads(grad_output.reshape(batch, query_tokens, -1), num_heads)     # (B, H, Tq, Dv)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)                                  # (B, H, Tq, 1)
        grad_q = torch.zeros_like(q)
        grad_key = torch.zeros(key.shape, dtype=key.dtype, device=key.device)
        grad_value = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
        grad_weights = None if weights is None else torch.zeros_like(weights)
        for start in range(0, topk, chunk):
            stop = min(start + chunk, topk)
            k_chunk, v_chunk = _routed_chunk(key, value, flat, weights, start, stop, num_heads)
            probs = (q @ k_chunk.transpose(-2, -1)).mul_(scale).sub_(log_sum_exp).exp_()     # (B, H, Tq, c * Tk)
            grad_v_chunk = probs.transpose(-2, -1) @ grad_out                                # (B, H, c * Tk, Dv)
            grad_scores = probs.mul_((grad_out @ v_chunk.transpose(-2, -1)).sub_(delta))
            grad_q += grad_scores @ k_chunk
            grad_k_chunk = (grad_scores.transpose(-2, -1) @ q).mul_(scale)                   # (B, H, c * Tk, D)
            flat_chunk = flat[:, start:stop].reshape(-1)
            grad_k_regions = merge_heads(grad_k_chunk).reshape(flat_chunk.numel(), *key.shape[2:])
            grad_v_regions = merge_heads(grad_v_chunk).reshape(flat_chunk.numel(), *value.shape[2:])
            if weights is not None:
                factors = weights[:, start:stop].reshape(-1, 1, 1)
                grad_weights[:, start:stop] = (
                    (grad_k_regions * select_regions(key, flat_chunk)).sum(dim=(1, 2))
                    + (grad_v_regions * select_regions(value, flat_chunk)).sum(dim=(1, 2))).view(batch, -1)
                grad_k_regions, grad_v_regions = grad_k_regions * factors, grad_v_regions * factors
            grad_key.view(-1, *key.shape[2:]).index_add_(0, flat_chunk, grad_k_regions)
            grad_value.view(-1, *value.shape[2:]).index_add_(0, flat_chunk, grad_v_regions)
        grad_query = merge_heads(grad_q.mul_(scale)).reshape(query.shape)
        return grad_query, grad_key, grad_value, None, grad_weights, None, None


def _routed_chunk(key: Tensor, value: Tensor, flat: Tensor, weights: Optional[Tensor], start: int, stop: int,
                  num_heads: int) -> tuple[Tensor, Tensor]:
    """Routed regions start:stop of every query region, heads split: (B, H, c * Tk, D), (B, H, c * Tk, Dv)."""
    batch = flat.shape[0]
    flat_chunk = flat[:, start:stop].reshape(-1)
    factors = None if weights is None else weights[:, start:stop].reshape(-1)
    k_chunk = select_regions(key, flat_chunk, factors).reshape(batch, -1, key.shape[-1])
    v_chunk = select_regions(value, flat_chunk, factors).reshape(batch, -1, value.shape[-1])
    return split_heads(k_chunk, num_heads), split_heads(v_chunk, num_heads)


def recompute_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                               num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention``; keeps no routed copy for backward."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "recompute")
    n, num_queries, topk = indices.shape
    flat = flat_region_indices(indices, key.shape[1]).view(n * num_queries, topk)
    weights = None if region_weights is None else region_weights.reshape(n * num_queries, topk)
    return _RoutedAttentionFunction.apply(query, key, value, flat, weights, scale, num_heads)
