"""Fast implementations of :func:`bilevel.ops.attention.reference_routed_attention`.

Every backend has the reference's signature ``(query, key, value, indices, scale, num_heads,
region_weights=None) -> (N, Rq, Tq, H * Dv)`` and computes the same function:

=============  =====================================================================  ==============
name           idea                                                                   region_weights
=============  =====================================================================  ==============
``sdpa``       ``index_select`` the routed regions (no broadcast gather), then         yes
               ``F.scaled_dot_product_attention`` per query region
``matmul``     ``index_select`` the routed regions, then per head two batched BLAS     yes
               products and a softmax on channel slices (small tiles: 224 px, CPU)
``recompute``  custom autograd function: saves only q, k, v, output and log-sum-exp;   yes
               the routed regions are re-selected in backward, in chunks of regions
``dense_mask`` all key tokens, biased by the log of the routing counts (small maps)    ValueError
``fused_cpu``  one C++ kernel (CPU, float32, built on first use) reads the routed      yes
               regions in place: BLAS products around an exact softmax; backward
               as recompute's
``flex``       FlexAttention with a block mask from the routing indices (CUDA, least   ValueError
               memory; forward only on CPU, where torch has no FlexAttention backward)
``triton``     one Triton kernel per pass: the routed regions read in place inside an  ValueError
               online-softmax attention (CUDA; CPU only under Triton's interpreter)
=============  =====================================================================  ==============

``flex`` expresses routing as a set of allowed key regions, so it needs distinct indices per query
region (as ``torch.topk`` gives) and raises ``ValueError`` otherwise; ``dense_mask`` weighs a region
listed twice twice, as the reference does.
"""
from .dense import dense_mask_routed_attention
from .flex import flex_routed_attention
from .fused_cpu import fused_cpu_routed_attention
from .matmul import matmul_routed_attention
from .recompute import recompute_routed_attention
from .sdpa import sdpa_routed_attention
from .triton_fused import triton_routed_attention

BACKENDS = {
    "sdpa": sdpa_routed_attention,
    "matmul": matmul_routed_attention,
    "recompute": recompute_routed_attention,
    "dense_mask": dense_mask_routed_attention,
    "fused_cpu": fused_cpu_routed_attention,
    "flex": flex_routed_attention,
    "triton": triton_routed_attention,
}

__all__ = ["BACKENDS", "sdpa_routed_attention", "matmul_routed_attention", "recompute_routed_attention",
           "dense_mask_routed_attention", "fused_cpu_routed_attention", "flex_routed_attention",
           "triton_routed_attention"]
