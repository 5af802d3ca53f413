"""Region-to-region routing: which regions each region attends to.

Each region is summarised by the mean of its queries and the mean of its keys. The region
affinity ``A = (q_r * scale) @ k_rᵀ`` scores every pair of regions; each row keeps its ``topk``
best columns. Those indices decide which key/value regions the token-level attention reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Routing", "region_affinity", "topk_routing", "TopkRouter"]


@dataclass
class Routing:
    """The result of routing for a batch of region grids.

    logits:  (N, Rq, Rk) region affinity
    weights: (N, Rq, topk) softmax of the kept logits (used only by soft routing)
    indices: (N, Rq, topk) int64, the routed key regions of each query region, best first
    """

    logits: Tensor
    weights: Tensor
    indices: Tensor


def region_affinity(query_regions: Tensor, key_regions: Tensor, scale: float = 1.0) -> Tensor:
    """Score every (query region, key region) pair.

    query_regions: (N, Rq, C), key_regions: (N, Rk, C)
    returns: (N, Rq, Rk) = (query_regions * scale) @ key_regionsᵀ
    """
    return (query_regions * scale) @ key_regions.transpose(-2, -1)


def topk_routing(logits: Tensor, topk: int) -> Routing:
    """Keep the ``topk`` largest affinities of every row (sorted, largest first).

    logits: (N, Rq, Rk) -> Routing with indices (N, Rq, topk)
    """
    if not 1 <= topk <= logits.shape[-1]:
        raise ValueError(f"topk={topk} must be between 1 and the number of regions ({logits.shape[-1]})")
    kept, indices = torch.topk(logits, k=topk, dim=-1)
    return Routing(logits=logits, weights=torch.softmax(kept, dim=-1), indices=indices)


class TopkRouter(nn.Module):
    """Routing as a module, with the official options.

    differentiable=False (the released models) detaches the region descriptors, so no gradient
    flows through routing. ``learned=True`` adds a linear embedding of the descriptors
    (``emb``, the official ``param_routing``); it needs ``differentiable=True``.
    """

    def __init__(self, qk_dim: int, topk: int, scale: float, learned: bool = False,
                 differentiable: bool = False):
        super().__init__()
        if learned and not differentiable:
            raise ValueError("param_routing=True needs diff_routing=True (a learned router must receive gradients)")
        self.topk = topk
        self.scale = scale
        self.differentiable = differentiable
        self.emb = nn.Linear(qk_dim, qk_dim) if learned else nn.Identity()

    def forward(self, query_regions: Tensor, key_regions: Tensor) -> Routing:
        """query_regions: (N, Rq, C), key_regions: (N, Rk, C) -> Routing with (N, Rq, topk) indices."""
        if not self.differentiable:
            query_regions, key_regions = query_regions.detach(), key_regions.detach()
        logits = region_affinity(self.emb(query_regions), self.emb(key_regions), self.scale)
        return topk_routing(logits, self.topk)
