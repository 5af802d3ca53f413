"""Memory-light routed attention: saves no routed copy of k or v, recomputes them in backward.

A custom autograd function. Forward walks the routed regions in chunks, merging the chunks'
partial results through their log-sum-exp (online softmax), so at most one chunk of routed
keys/values exists at a time; it saves only q, k, v (which the graph holds anyway), the output
and the log-sum-exp. Backward re-selects each chunk with ``index_select``, computes its gradients
from the saved output and log-sum-exp (exact per chunk: p = exp(s - lse)) and sends the key/value
gradients back with ``index_add_``.

Two attention kernels do the per-chunk work: on CPU with equal q/k and v head sizes, torch's fused
flash-attention CPU kernels (which never store the score matrix either); elsewhere, explicit
matmuls that hold one chunk's scores.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..attention import merge_heads, split_heads
from ._select import check_shapes, flat_region_indices, select_regions

__all__ = ["recompute_routed_attention", "routed_attention_backward", "regions_per_chunk", "kernel_name",
           "CHUNK_ELEMENTS", "KERNELS"]

#: upper bound on the elements one chunk holds (its routed k and v, or its score matrix): 16 MiB in fp32
CHUNK_ELEMENTS = 1 << 22


def _math_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(B, H, Tq, D), (B, H, S, D), (B, H, S, Dv) -> output (B, H, Tq, Dv), log-sum-exp (B, H, Tq)."""
    scores = (q @ k.transpose(-2, -1)).mul_(scale)
    log_sum_exp = scores.logsumexp(dim=-1, keepdim=True)
    return scores.sub_(log_sum_exp).exp_() @ v, log_sum_exp.squeeze(-1)


def _math_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, log_sum_exp: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients wrt q, k, v of one chunk, given the output and log-sum-exp over all chunks."""
    probs = (q @ k.transpose(-2, -1)).mul_(scale).sub_(log_sum_exp.unsqueeze(-1)).exp_()
    grad_v = probs.transpose(-2, -1) @ grad_out
    delta = (grad_out * out).sum(dim=-1, keepdim=True)
    grad_scores = probs.mul_((grad_out @ v.transpose(-2, -1)).sub_(delta)).mul_(scale)
    return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v


def _flash_cpu_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


def _flash_cpu_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, log_sum_exp: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, log_sum_exp, 0.0, False, scale=scale)


#: name -> (forward, backward); chosen per call by :func:`kernel_name`
KERNELS = {"math": (_math_forward, _math_backward), "flash_cpu": (_flash_cpu_forward, _flash_cpu_backward)}


def kernel_name(query: Tensor, value: Tensor) -> str:
    """The entry of :data:`KERNELS` for these inputs: torch's flash CPU kernels where they apply, else math."""
    fused = query.device.type == "cpu" and query.shape[-1] == value.shape[-1]
    return "flash_cpu" if fused and query.dtype in (torch.float32, torch.float64, torch.bfloat16) else "math"


def regions_per_chunk(batch: int, num_heads: int, query_tokens: int, key_tokens: int, channels: int,
                      topk: int) -> int:
    """Routed regions per chunk: their k and v copies, or their score matrix, hold at most CHUNK_ELEMENTS."""
    per_region = batch * key_tokens * max(channels, num_heads * query_tokens)
    return max(1, min(topk, CHUNK_ELEMENTS // per_region))


def _routed_chunk(key: Tensor, value: Tensor, flat: Tensor, weights: Optional[Tensor], start: int, stop: int,
                  num_heads: int) -> tuple[Tensor, Tensor]:
    """Routed regions start:stop of every query region, heads split: (B, H, c * Tk, D), (B, H, c * Tk, Dv)."""
    batch = flat.shape[0]
    flat_chunk = flat[:, start:stop].reshape(-1)
    factors = None if weights is None else weights[:, start:stop].reshape(-1)
    k_chunk = select_regions(key, flat_chunk, factors).reshape(batch, -1, key.shape[-1])
    v_chunk = select_regions(value, flat_chunk, factors).reshape(batch, -1, value.shape[-1])
    return split_heads(k_chunk, num_heads), split_heads(v_chunk, num_heads)


def routed_attention_backward(grad_output: Tensor, query: Tensor, key: Tensor, value: Tensor, flat: Tensor,
                              weights: Optional[Tensor], out: Tensor, log_sum_exp: Tensor, scale: float,
                              num_heads: int):
    """Gradients of routed attention wrt query, key, value, (flat: None) and weights, from the forward's output
    out (B, H, Tq, Dv) and log-sum-exp (B, H, Tq); the routed regions are re-selected chunk by chunk
    (:func:`regions_per_chunk`), each attended by the kernel :func:`kernel_name` picks.

    Shapes as :class:`_RoutedAttentionFunction`; shared with :mod:`.fused_cpu`, whose kernel gives the same two.
    """
    batch, topk = flat.shape
    query_tokens = query.shape[2]
    chunk = regions_per_chunk(batch, num_heads, query_tokens, key.shape[2], key.shape[3] + value.shape[3], topk)
    kernel = kernel_name(query, value)
    q = split_heads(query.reshape(batch, query_tokens, -1), num_heads)                  # (B, H, Tq, D)
    grad_out = split_heads(grad_output.contiguous().view(batch, query_tokens, -1), num_heads)  # (B, H, Tq, Dv)
    attend_backward = KERNELS[kernel][1]
    grad_q = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    grad_key = torch.zeros(key.shape, dtype=key.dtype, device=key.device)
    grad_value = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    grad_weights = None if weights is None else torch.zeros_like(weights)
    for start in range(0, topk, chunk):
        stop = min(start + chunk, topk)
        k_chunk, v_chunk = _routed_chunk(key, value, flat, weights, start, stop, num_heads)
        grad_q_chunk, grad_k_chunk, grad_v_chunk = attend_backward(grad_out, q, k_chunk, v_chunk, out,
                                                                   log_sum_exp, scale)
        grad_q += grad_q_chunk
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
    return merge_heads(grad_q).reshape(query.shape), grad_key, grad_value, None, grad_weights


class _RoutedAttentionFunction(torch.autograd.Function):
    """query (N, Rq, Tq, H*D), key (N, Rk, Tk, H*D), value (N, Rk, Tk, H*Dv), flat (B, topk) with
    B = N * Rq indices into the N * Rk regions, weights (B, topk) or None -> (N, Rq, Tq, H*Dv)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, flat: Tensor, weights: Optional[Tensor],
                scale: float, num_heads: int) -> Tensor:
        n, num_queries, query_tokens, _ = query.shape
        batch, topk = flat.shape
        chunk = regions_per_chunk(batch, num_heads, query_tokens, key.shape[2], key.shape[3] + value.shape[3], topk)
        attend = KERNELS[kernel_name(query, value)][0]
        q = split_heads(query.reshape(batch, query_tokens, -1), num_heads)          # (B, H, Tq, D)
        out = log_sum_exp = None
        for start in range(0, topk, chunk):
            chunk_out, chunk_lse = attend(q, *_routed_chunk(key, value, flat, weights, start, start + chunk,
                                                            num_heads), scale)
            if out is None:
                out, log_sum_exp = chunk_out, chunk_lse
                continue
            merged_lse = torch.logaddexp(log_sum_exp, chunk_lse)
            out = out.mul_(log_sum_exp.sub_(merged_lse).exp_().unsqueeze(-1))
            out.add_(chunk_out.mul_(chunk_lse.sub_(merged_lse).exp_().unsqueeze(-1)))
            log_sum_exp = merged_lse
        ctx.save_for_backward(query, key, value, flat, weights, out, log_sum_exp)
        ctx.scale, ctx.num_heads = scale, num_heads
        return merge_heads(out).reshape(n, num_queries, query_tokens, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        query, key, value, flat, weights, out, log_sum_exp = ctx.saved_tensors
        grads = routed_attention_backward(grad_output, query, key, value, flat, weights, out, log_sum_exp,
                                          ctx.scale, ctx.num_heads)
        return *grads, None, None


def recompute_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                               num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention``; keeps no routed copy for backward."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "recompute")
    n, num_queries, topk = indices.shape
    flat = flat_region_indices(indices, key.shape[1]).view(n * num_queries, topk)
    weights = None if region_weights is None else region_weights.reshape(n * num_queries, topk)
    # the fused CPU kernel needs unit stride along channels (DBRA hands over transposed queries)
    return _RoutedAttentionFunction.apply(query.contiguous(), key.contiguous(), value.contiguous(), flat, weights,
                                          scale, num_heads)
