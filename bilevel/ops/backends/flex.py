"""Routed attention with FlexAttention and a block mask built from the routing indices (CUDA).

The block mask lets the compiled FlexAttention kernel skip every (query block, key block) pair that
no routing decision connects, so compute follows the routed pairs and memory stays linear in the
number of tokens. When regions hold a multiple of ``REGION_BLOCK_MULTIPLE`` tokens, the mask's blocks
are the regions themselves, built straight from the indices: each query region lists its routed key
regions as full blocks, the kernel computes exactly the routed pairs and no mask is evaluated. Other
region sizes get a token-level mask in the default 128-token blocks (``create_block_mask``). On CUDA
the kernel is ``torch.compile``-d once per process. It needs the least memory of all backends, but on an
H200 in fp32 it was slower than ``sdpa`` (``benchmarks/results/bra_gpu.md``), so ``auto`` does not pick it.
On CPU torch runs FlexAttention eagerly and forward only (it has no CPU backward): there the backend is
for checking equivalence, and it raises ValueError when a gradient is needed.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ..attention import merge_heads, split_heads, tracks_gradients
from ._select import check_shapes, refuse_region_weights, region_mask

__all__ = ["flex_routed_attention", "routed_block_mask", "REGION_BLOCK_MULTIPLE"]

#: region-sized mask blocks need regions of a multiple of this many tokens: the compiled kernels' tiles
#: (64 rows and columns in torch's default CUDA configurations) must divide the mask's blocks
REGION_BLOCK_MULTIPLE = 64
#: shapes compiled per process before dynamo would fall back to eager FlexAttention, which holds the full
#: token-by-token matrix (its default limit, 8, is below one segmentation model's distinct stage shapes)
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention() -> Callable[..., Tensor]:
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


def _region_blocks_fit(query_tokens: int, key_tokens: int) -> bool:
    """True when the block mask can have one block per region (see ``REGION_BLOCK_MULTIPLE``)."""
    return query_tokens % REGION_BLOCK_MULTIPLE == 0 and key_tokens % REGION_BLOCK_MULTIPLE == 0


def _listed_first(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(N, R, R') bool -> counts (N, 1, R) and column lists (N, 1, R, R'), the True columns first (ascending).

    Both contiguous int32, the layout the kernels read (a list of a transposed view would keep its strides).
    """
    counts = rows.sum(-1, dtype=torch.int32)
    order = torch.argsort((~rows).to(torch.uint8), dim=-1, stable=True)
    return (counts.to(torch.int32, memory_format=torch.contiguous_format)[:, None],
            order.to(torch.int32, memory_format=torch.contiguous_format)[:, None])


def routed_block_mask(indices: Tensor, num_key_regions: int, query_tokens: int, key_tokens: int,
                      compile_mask: bool = True) -> BlockMask:
    """The block mask of routed attention over region-major token sequences.

    indices: (N, Rq, topk) distinct routed key regions; sequences: Rq * query_tokens queries and
    num_key_regions * key_tokens keys per batch element, region after region. With region-sized blocks
    every routed pair is a full block, listed for the forward pass (key regions of each query region)
    and the backward pass (query regions of each key region): the tensors ``BlockMask.from_kv_blocks``
    would make, without its per-call vmap. compile_mask: build a token-level mask with compiled
    ``create_block_mask`` (CUDA); unused for region-sized blocks.
    """
    allowed = region_mask(indices, num_key_regions, "flex")             # (N, Rq, Rk)

    def routed(batch: Tensor, head: Tensor, query_index: Tensor, key_index: Tensor) -> Tensor:
        return allowed[batch, query_index // query_tokens, key_index // key_tokens]

    n, num_queries, _ = indices.shape
    if _region_blocks_fit(query_tokens, key_tokens):
        key_counts, key_lists = _listed_first(allowed)
        query_counts, query_lists = _listed_first(allowed.transpose(1, 2))
        # no partial blocks (empty lists); routed is the mask_mod too: the compiled kernel never calls it on
        # full blocks, eager CPU FlexAttention does
        return BlockMask(seq_lengths=(num_queries * query_tokens, num_key_regions * key_tokens),
                         kv_num_blocks=torch.zeros_like(key_counts), kv_indices=torch.zeros_like(key_lists),
                         full_kv_num_blocks=key_counts, full_kv_indices=key_lists,
                         q_num_blocks=torch.zeros_like(query_counts), q_indices=torch.zeros_like(query_lists),
                         full_q_num_blocks=query_counts, full_q_indices=query_lists,
                         BLOCK_SIZE=(query_tokens, key_tokens), mask_mod=routed)
    # compiled mask construction on GPU never materialises the (L, S) token mask
    return create_block_mask(routed, n, None, num_queries * query_tokens, num_key_regions * key_tokens,
                             device=indices.device, _compile=compile_mask)


def flex_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                          num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention`` (distinct indices, no region_weights)."""
    check_shapes(query, key, value, indices, num_heads, region_weights, "flex")
    refuse_region_weights(region_weights, "flex")
    on_cpu = query.device.type == "cpu"
    if on_cpu and tracks_gradients(query, key, value):
        raise ValueError("flex: torch has no FlexAttention backward on CPU; use backend 'recompute' or 'sdpa' "
                         "for training on CPU (backend='auto' does so)")
    n, num_queries, query_tokens, _ = query.shape
    num_key_regions, key_tokens = key.shape[1], key.shape[2]
    block_mask = routed_block_mask(indices, num_key_regions, query_tokens, key_tokens, compile_mask=not on_cpu)
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
