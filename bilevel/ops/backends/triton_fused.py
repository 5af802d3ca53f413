"""Routed attention as one Triton kernel per pass: gather fused into FlashAttention-style attention (CUDA).

The official code's open to-do, "fuse gather and attention": each program reads its query tile and the
routed key/value regions in place (no routed copy, no head split), keeps an online softmax, and saves
only the log-sum-exp for backward. The backward recomputes the attention weights tile by tile, writes
the query gradient and adds the key/value gradients atomically (a key region serves several query
regions). Nothing is stored per routed pair, so memory is linear in the number of tokens.

Runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported), which is how the CPU test suite checks it against the reference.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ._select import check_shapes, refuse_region_weights

__all__ = ["triton_routed_attention", "triton_available"]

#: token tiles: at most this many query (rows) and key (columns) tokens per step, at least 16 (tl.dot)
MAX_TILE = 64


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import _triton_kernels
    return _triton_kernels


def triton_available(device: torch.device) -> bool:
    """True when the kernels can run on ``device``: CUDA with Triton, or Triton's CPU interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _power_of_two(size: int) -> int:
    """The smallest power of two covering ``size``, at least 16 (tl.dot's smallest operand)."""
    return max(16, 1 << (size - 1).bit_length())


def _blocks(query_tokens: int, key_tokens: int, qk_dim: int, v_dim: int) -> dict:
    """Tile sizes: token tiles up to ``MAX_TILE``, channel tiles covering a head."""
    return dict(BLOCK_M=min(MAX_TILE, _power_of_two(query_tokens)),
                BLOCK_N=min(MAX_TILE, _power_of_two(key_tokens)),
                BLOCK_D=_power_of_two(qk_dim), BLOCK_DV=_power_of_two(v_dim))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                num_heads: int) -> Tensor:
        n, num_queries, query_tokens, channels = query.shape
        key_tokens, value_channels = key.shape[2], value.shape[-1]
        out = query.new_empty(n, num_queries, query_tokens, value_channels)
        lse = torch.empty(n * num_queries, num_heads, query_tokens, device=query.device, dtype=torch.float32)
        blocks = _blocks(query_tokens, key_tokens, channels // num_heads, value_channels // num_heads)
        grid = (_cdiv(query_tokens, blocks["BLOCK_M"]), n * num_queries, num_heads)
        _kernels().routed_forward_kernel[grid](
            query, key, value, indices, out, lse, scale,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            *indices.stride(), num_queries, num_heads, query_tokens, key_tokens, indices.shape[-1],
            channels // num_heads, value_channels // num_heads, **blocks)
        ctx.save_for_backward(query, key, value, indices, out, lse)
        ctx.scale, ctx.num_heads, ctx.blocks = scale, num_heads, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, indices, out, lse = ctx.saved_tensors
        n, num_queries, query_tokens, channels = query.shape
        heads = ctx.num_heads
        # delta: the row sums of grad_out * out per head, (N * Rq, H, Tq) as lse
        delta = (grad_out.float() * out.float()).reshape(n * num_queries, query_tokens, heads, -1).sum(-1)
        delta = delta.transpose(1, 2).contiguous()
        grad_query = torch.empty(query.shape, device=query.device, dtype=torch.float32)
        grad_key = torch.zeros(key.shape, device=key.device, dtype=torch.float32)
        grad_value = torch.zeros(value.shape, device=value.device, dtype=torch.float32)
        grid = (_cdiv(query_tokens, ctx.blocks["BLOCK_M"]), n * num_queries, heads)
        _kernels().routed_backward_kernel[grid](
            query, key, value, indices, grad_out, lse, delta, grad_query, grad_key, grad_value, ctx.scale,
            *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *indices.stride(),
            *grad_query.stride(), *grad_key.stride(), *grad_value.stride(), num_queries, heads, query_tokens,
            key.shape[2], indices.shape[-1], channels // heads, value.shape[-1] // heads, **ctx.blocks)
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None


def triton_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                            num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention`` (no region_weights)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "triton")
    refuse_region_weights(region_weights, "triton")
    if query.dtype == torch.float64:
        raise ValueError("triton: float64 inputs are not supported (the kernels keep softmax statistics and "
                         "gradients in float32); use backend 'sdpa' or 'reference'")
    if not triton_available(query.device):
        raise ValueError(f"triton: needs a CUDA device with Triton (got {query.device}); on CPU only under "
                         "Triton's interpreter (TRITON_INTERPRET=1), for checking")
    return _RoutedAttention.apply(query, key, value, indices, float(scale), num_heads)
