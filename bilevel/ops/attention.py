"""Token-to-token attention over routed regions: the core of bi-level routing attention.

Every query token of region ``i`` attends to all tokens of the ``topk`` regions that routing
chose for ``i``. All backends compute the same function; ``reference`` is the readable one
(gather, then plain softmax attention) and defines the numerics the others must match. The fast
backends (``sdpa``, ``matmul``, ``recompute``, ``dense_mask``, ``fused_cpu``, ``flex``, ``triton``) live in
:mod:`bilevel.ops.backends`; ``backend="auto"`` picks one by device, shape and grad mode
(:func:`select_backend`).

Layout used throughout (channels split into heads head-major, as the official code does):
    query:   (N, Rq, Tq, H * Dqk)   region-partitioned queries
    key:     (N, Rk, Tk, H * Dqk)   region-partitioned keys
    value:   (N, Rk, Tk, H * Dv)    region-partitioned values
    indices: (N, Rq, topk)          routed key regions of each query region
    output:  (N, Rq, Tq, H * Dv)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .gather import gather_regions

__all__ = ["routed_attention", "reference_routed_attention", "select_backend", "ATTENTION_BACKENDS", "split_heads",
           "merge_heads", "tracks_gradients"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., T, H * D) -> (..., H, T, D), channels head-major."""
    *lead, tokens, channels = x.shape
    return x.reshape(*lead, tokens, num_heads, channels // num_heads).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(..., H, T, D) -> (..., T, H * D)."""
    *lead, heads, tokens, dim = x.shape
    return x.transpose(-3, -2).reshape(*lead, tokens, heads * dim)


def tracks_gradients(*tensors: Optional[Tensor]) -> bool:
    """True when autograd is on and records any of ``tensors`` (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def reference_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                               num_heads: int, region_weights: Optional[Tensor] = None,
                               return_attention: bool = False):
    """Gather the routed regions, then softmax attention per query region and head.

    region_weights: optional (N, Rq, topk) factors multiplied into the gathered keys and values
    (the official ``soft_routing``).
    Returns the output (N, Rq, Tq, H * Dv), and with ``return_attention`` also the attention
    weights (N * Rq, H, Tq, topk * Tk), the layout the official ``ret_attn_mask`` gives.
    """
    n, num_queries, _, _ = query.shape
    key_sel = gather_regions(key, indices)        # (N, Rq, topk, Tk, H * Dqk)
    value_sel = gather_regions(value, indices)    # (N, Rq, topk, Tk, H * Dv)
    if region_weights is not None:
        factors = region_weights.reshape(*region_weights.shape, 1, 1)
        key_sel, value_sel = key_sel * factors, value_sel * factors
    key_sel = split_heads(key_sel.flatten(2, 3), num_heads)      # (N, Rq, H, topk * Tk, Dqk)
    value_sel = split_heads(value_sel.flatten(2, 3), num_heads)  # (N, Rq, H, topk * Tk, Dv)
    q = split_heads(query, num_heads)                            # (N, Rq, H, Tq, Dqk)
    attention = torch.softmax((q * scale) @ key_sel.transpose(-2, -1), dim=-1)
    out = merge_heads(attention @ value_sel)                     # (N, Rq, Tq, H * Dv)
    if return_attention:
        return out, attention.flatten(0, 1)
    return out


AttentionBackend = Callable[..., Tensor]

#: name -> function with the signature of :func:`reference_routed_attention` (without return_attention);
#: the fast backends of :mod:`bilevel.ops.backends` are added at the end of this module
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {"reference": reference_routed_attention}

#: dense_mask is chosen when the whole key map has at most this many tokens ...
DENSE_MAX_KEY_TOKENS = 256
#: ... and the routed regions cover at least this fraction of it (the masked-out work is then small)
DENSE_MIN_ROUTED_FRACTION = 0.25
#: ... except in CPU float32 inference with fused_cpu's kernel, which is faster up to this routed fraction
FUSED_CPU_MAX_ROUTED_FRACTION = 0.4
#: when training, recompute is chosen once sdpa's saved routed copy of k and v would exceed this
ROUTED_COPY_LIMIT_BYTES = 256 * 2 ** 20
#: CPU inference: matmul is chosen for at most this many routed key tokens per query ...
MATMUL_MAX_ROUTED_TOKENS = 128
#: ... and at least this many query tokens per region (fewer: its per-head calls cost more than they save)
MATMUL_MIN_QUERY_TOKENS = 32


def select_backend(query: Tensor, key: Tensor, indices: Tensor, region_weights: Optional[Tensor] = None,
                   value_channels: Optional[int] = None) -> str:
    """The backend ``backend="auto"`` uses; the rule follows ``benchmarks/results/bra_{cpu,gpu}.md``.

    - CUDA: ``sdpa``, the fastest backend in training at every setting measured on an H200 (fp32,
      ``benchmarks/results/bra_gpu.md``; ``flex`` needs the least memory but was slower there);
    - small key maps routed densely (at most ``DENSE_MAX_KEY_TOKENS`` key tokens, topk covering at least
      ``DENSE_MIN_ROUTED_FRACTION`` of the regions), no region_weights: ``dense_mask`` (one large
      SDPA beats many small ones there), except in CPU float32 inference with ``fused_cpu``'s kernel up to
      ``FUSED_CPU_MAX_ROUTED_FRACTION`` (BiFormer-T stage 3, a third of the regions: ``fused_cpu``);
    - training where the routed copy sdpa keeps for backward (topk x the size of k and v) would exceed
      ``ROUTED_COPY_LIMIT_BYTES``: ``fused_cpu`` where it applies (below), else ``recompute``; neither keeps
      a routed copy, and fused_cpu's forward is the faster one;
    - CPU float32 inference, when the C++ kernel is built and no tool needs standard operators (export,
      tracing, FLOP counting): ``fused_cpu``, which reads routed regions of 32 or more tokens in place and packs
      smaller ones (faster than sdpa and matmul from regions of 1 token to 256 in ``bench_bra.py``);
    - CPU inference with small tiles (at most ``MATMUL_MAX_ROUTED_TOKENS`` routed keys and at least
      ``MATMUL_MIN_QUERY_TOKENS`` queries per region: BiFormer-T stage 1 at 224 px) without the kernel:
      ``matmul``, where PyTorch's fused CPU kernel spends more on its 32-query blocks than on the products;
    - otherwise ``sdpa``, the fastest backend at every other measured setting, training and inference.
    value_channels: channels of the values (default: those of the keys).
    """
    if query.device.type == "cuda":
        return "sdpa"
    _, num_key_regions, key_tokens, key_channels = key.shape
    topk = indices.shape[-1]
    training = tracks_gradients(query, key, region_weights)

    def fused_cpu_applies() -> bool:    # asked only where it decides: the first answer may build the kernel
        return (query.device.type == "cpu" and query.dtype == key.dtype == torch.float32
                and not standard_ops_wanted()
                and fused_cpu_unavailable_reason() is None)

    if (region_weights is None and num_key_regions * key_tokens <= DENSE_MAX_KEY_TOKENS
            and topk >= DENSE_MIN_ROUTED_FRACTION * num_key_regions
            and (training or topk > FUSED_CPU_MAX_ROUTED_FRACTION * num_key_regions or not fused_cpu_applies())):
        return "dense_mask"
    routed_copy = (indices.numel() * key_tokens * (key_channels + (value_channels or key_channels))
                   * key.element_size())
    if training and routed_copy > ROUTED_COPY_LIMIT_BYTES:
        return "fused_cpu" if fused_cpu_applies() else "recompute"
    if not training and fused_cpu_applies():
        return "fused_cpu"
    if (not training and query.device.type == "cpu" and topk * key_tokens <= MATMUL_MAX_ROUTED_TOKENS
            and query.shape[2] >= MATMUL_MIN_QUERY_TOKENS):
        return "matmul"
    return "sdpa"


def routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float, num_heads: int,
                     region_weights: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Attention of every query region over its routed key/value regions (see the module docstring).

    backend: "auto" (see :func:`select_backend`) or one of :data:`ATTENTION_BACKENDS`.
    """
    if backend == "auto":
        backend = select_backend(query, key, indices, region_weights, value.shape[-1])
    try:
        function = ATTENTION_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; choose 'auto' or one of "
                         f"{sorted(ATTENTION_BACKENDS)}") from None
    return function(query, key, value, indices, scale, num_heads, region_weights=region_weights)


# The backends import split_heads/merge_heads from this module, so they are registered last.
from .backends import BACKENDS as _FAST_BACKENDS  # noqa: E402
from .backends.fused_cpu import fused_cpu_unavailable_reason, standard_ops_wanted  # noqa: E402

ATTENTION_BACKENDS.update(_FAST_BACKENDS)
