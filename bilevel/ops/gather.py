"""Collect the key/value regions that routing chose for every query region.

This is the readable reference: it materialises a dense (N, Rq, topk, T, C) tensor, i.e. every
routed region is copied once per query region that routes to it (the k-fold copy that makes the
official BiFormer memory-hungry). The fast backends in :mod:`bilevel.ops.attention` avoid it.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_regions"]


def gather_regions(regions: Tensor, indices: Tensor) -> Tensor:
    """Pick, for every query region, its routed regions.

    regions: (N, Rk, T, C) tokens of every key/value region
    indices: (N, Rq, topk) int64 routed region indices
    returns: (N, Rq, topk, T, C) with ``out[n, i, j] = regions[n, indices[n, i, j]]``
    """
    n, num_regions, tokens, channels = regions.shape
    num_queries, topk = indices.shape[1], indices.shape[2]
    expanded = regions.unsqueeze(1).expand(n, num_queries, num_regions, tokens, channels)
    index = indices.reshape(n, num_queries, topk, 1, 1).expand(n, num_queries, topk, tokens, channels)
    return torch.gather(expanded, dim=2, index=index)
