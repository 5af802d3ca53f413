"""Bi-Level Routing Attention (BRA) modules, assembled from the pieces in this package.

``BiLevelRoutingAttention`` is the NHWC ("legacy") module the released BiFormer and DeBiFormer
checkpoints use; ``NCHWBiLevelRoutingAttention`` is the official ``nchwBRA`` of BiFormer-STL-nchw.
Both follow the official numerics exactly (see ``ARCHITECTURES.md`` §1.4 and §1.8):

1. project to q, k, v;
2. cut the map into regions and average q and k per region;
3. route: region affinity, top-k per region (no gradient through routing);
4. attend from every token to the tokens of its region's routed regions;
5. add LePE (a depth-wise conv of V) and project out.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .attention import ATTENTION_BACKENDS, reference_routed_attention, routed_attention
from .linear import FusedLinear
from .recording import emit, is_recording
from .regions import (ceil_region_means, fit_to_region_grid, grid_for_region_size, pad_to_multiple,
                      region_merge, region_partition)
from .routing import TopkRouter, region_affinity, topk_routing

__all__ = ["BiLevelRoutingAttention", "NCHWBiLevelRoutingAttention", "QKVLinear", "lepe_conv", "check_map_shape",
           "check_n_win_and_backend"]

KV_DOWNSAMPLE_MODES = ("identity", "avgpool", "maxpool", "ada_avgpool", "ada_maxpool")


def check_map_shape(x: Tensor, dim: int, channels_last: bool, owner: str) -> None:
    """Raise a ValueError naming ``owner`` unless x is (N, H, W, dim) (channels_last) or (N, dim, H, W).

    Shape only (no data access), so it is cheap enough for every forward.
    """
    channel_axis, other_axis = (3, 1) if channels_last else (1, 3)
    if x.dim() == 4 and x.shape[channel_axis] == dim:
        return
    expected = f"(N, H, W, C={dim}) (NHWC)" if channels_last else f"(N, C={dim}, H, W) (NCHW)"
    hint = ""
    if x.dim() == 4 and x.shape[other_axis] == dim:
        hint = ", which looks like NCHW" if channels_last else ", which looks like NHWC"
    raise ValueError(f"{owner}: x must be {expected}; got {tuple(x.shape)}{hint}")


def check_n_win_and_backend(owner: str, n_win: int, backend: str) -> None:
    """Constructor checks shared by the BRA modules: ``n_win >= 1`` and a known attention ``backend``."""
    if n_win < 1:
        raise ValueError(f"{owner}: n_win must be at least 1 (regions per side), got n_win={n_win}")
    if backend != "auto" and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"{owner}: unknown backend={backend!r}; choose 'auto' or one of "
                         f"{sorted(ATTENTION_BACKENDS)}")


def lepe_conv(dim: int, kernel_size: int, stride: int = 1) -> Optional[nn.Conv2d]:
    """Local enhanced positional encoding: a depth-wise conv (None when kernel_size is 0)."""
    if kernel_size <= 0:
        return None
    return nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim)


class QKVLinear(nn.Module):
    """One linear for q, k and v: channels ``[q (qk_dim) | k (qk_dim) | v (dim)]``.

    Kept as a wrapper so the state-dict key is the official ``qkv.qkv.weight``.
    """

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = FusedLinear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (..., dim) -> q (..., qk_dim), kv (..., qk_dim + dim)."""
        q, kv = self.qkv(x).split([self.qk_dim, self.qkv.out_features - self.qk_dim], dim=-1)
        return q, kv


def _kv_downsampler(mode: str, kv_per_win: int, ratio: int) -> nn.Module:
    if mode == "identity":
        return nn.Identity()
    if mode == "avgpool":
        return nn.AvgPool2d(ratio) if ratio > 1 else nn.Identity()
    if mode == "maxpool":
        return nn.MaxPool2d(ratio) if ratio > 1 else nn.Identity()
    if mode == "ada_avgpool":
        return nn.AdaptiveAvgPool2d(kv_per_win)
    if mode == "ada_maxpool":
        return nn.AdaptiveMaxPool2d(kv_per_win)
    raise ValueError(f"kv_downsample_mode={mode!r} is not supported (the official code does not implement it "
                     f"either); choose one of {KV_DOWNSAMPLE_MODES}")


class BiLevelRoutingAttention(nn.Module):
    """BRA on NHWC maps, with the official constructor (``ops/bra_legacy.py``).

    x: (N, H, W, C) -> (N, H, W, C). With ``auto_pad=False`` H and W must be multiples of ``n_win``;
    with ``auto_pad=True`` the input is zero-padded bottom/right before the projection and the
    output cropped (padded tokens are not masked, as in the official code).
    ``backend`` chooses the attention implementation (:func:`bilevel.ops.attention.routed_attention`).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_kernel: Optional[int] = None, kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False, diff_routing: bool = False,
                 soft_routing: bool = False, side_dwconv: int = 3, auto_pad: bool = False, backend: str = "auto"):
        super().__init__()
        check_n_win_and_backend(type(self).__name__, n_win, backend)
        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.topk = topk
        if diff_routing and not soft_routing:
            raise ValueError("diff_routing=True without soft_routing=True (differentiable hard routing) is not "
                             "supported; the official code raises NotImplementedError for it too")
        self.soft_routing = soft_routing
        self.lepe = lepe_conv(dim, side_dwconv)
        self.router = TopkRouter(self.qk_dim, topk, self.scale, learned=param_routing, differentiable=diff_routing)
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention={param_attention!r} is not supported; choose 'qkvo' or 'qkv'")
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = FusedLinear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_down = _kv_downsampler(kv_downsample_mode, kv_per_win, kv_downsample_ratio)
        self.auto_pad = auto_pad
        self.backend = backend

    def _downsample_kv(self, kv_regions: Tensor, region_size: tuple[int, int]) -> Tensor:
        """(N, R, h * w, C) -> (N, R, h' * w', C) through the configured pooling."""
        if isinstance(self.kv_down, nn.Identity):
            return kv_regions
        n, regions, _, channels = kv_regions.shape
        maps = kv_regions.reshape(n * regions, *region_size, channels).permute(0, 3, 1, 2)
        pooled = self.kv_down(maps)
        return pooled.flatten(2).transpose(1, 2).reshape(n, regions, -1, channels)

    def forward(self, x: Tensor, ret_attn_mask: bool = False):
        """x: (N, H, W, C) -> (N, H, W, C); with ``ret_attn_mask`` also the routing weights,
        routing indices (N, S², topk) and attention weights (N * S², heads, h * w, topk * h * w)."""
        check_map_shape(x, self.dim, True, type(self).__name__)
        n, height, width, _ = x.shape
        grid = (self.n_win, self.n_win)
        x = fit_to_region_grid(x, grid, self.auto_pad, type(self).__name__)
        padded_h, padded_w = x.shape[1], x.shape[2]
        region_size = (padded_h // self.n_win, padded_w // self.n_win)

        # the projection is per token, so partition its C-channel input rather than its 2 * qk + C outputs
        q_regions, kv_regions = self.qkv(region_partition(x, grid))   # (N, S², h * w, qk), (N, S², h * w, qk + C)
        routing = self.router(q_regions.mean(dim=2), kv_regions[..., : self.qk_dim].mean(dim=2))

        key, value = self._downsample_kv(kv_regions, region_size).split([self.qk_dim, self.dim], dim=-1)
        weights = routing.weights if self.soft_routing else None
        if ret_attn_mask:
            out, attention = reference_routed_attention(q_regions, key, value, routing.indices, self.scale,
                                                        self.num_heads, region_weights=weights, return_attention=True)
        else:
            out = routed_attention(q_regions, key, value, routing.indices, self.scale, self.num_heads,
                                   region_weights=weights, backend=self.backend)
        out = region_merge(out, grid, region_size)            # (N, Hp, Wp, C)
        if self.lepe is not None:
            v_map = region_merge(kv_regions[..., self.qk_dim:], grid, region_size).permute(0, 3, 1, 2)
            out = out + self.lepe(v_map).permute(0, 2, 3, 1)
        out = self.wo(out)
        if out.shape[1] != height or out.shape[2] != width:
            out = out[:, :height, :width].contiguous()

        if is_recording():
            emit(self, "bra", (height, width), region_grid=grid, region_size=region_size,
                 indices=routing.indices, logits=routing.logits, weights=routing.weights)
        if ret_attn_mask:
            return out, routing.weights, routing.indices, attention
        return out


class NCHWBiLevelRoutingAttention(nn.Module):
    """BRA on NCHW maps, the official ``nchwBRA`` (``ops/bra_nchw.py``).

    Regions have a fixed size ``(H // n_win, W // n_win)``; the last row/column of regions may be
    partial. Routing averages only real pixels and is unscaled; q, k, v are zero-padded for the
    token attention (padded keys unmasked) and the attention scale is ``dim ** -0.5``.
    x: (N, C, H, W) -> (N, C, H, W), any H, W >= n_win.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_scale: Optional[float] = None,
                 topk: int = 4, side_dwconv: int = 3, auto_pad: bool = False, attn_backend: str = "torch",
                 backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        check_n_win_and_backend(owner, n_win, backend)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_backend != "torch":
            raise ValueError(f"{owner}: attn_backend={attn_backend!r} is not supported; the official code "
                             "accepts only 'torch' (use backend= to pick a bilevel attention backend)")
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or dim ** -0.5
        self.lepe = lepe_conv(dim, side_dwconv)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, kernel_size=1)
        self.output_linear = nn.Conv2d(dim, dim, kernel_size=1)
        self.backend = backend

    def forward(self, x: Tensor, ret_attn_mask: bool = False):
        """x: (N, C, H, W) -> (N, C, H, W); with ``ret_attn_mask`` the official tuple (out, attention
        weights (N, heads, R, rh * rw, topk * rh * rw)), R the number of (possibly partial) regions."""
        check_map_shape(x, self.dim, False, type(self).__name__)
        n, _, height, width = x.shape
        region_size = (height // self.n_win, width // self.n_win)
        if min(region_size) < 1:
            raise ValueError(f"{type(self).__name__}: a {height}x{width} map is smaller than the "
                             f"{self.n_win}x{self.n_win} region grid (each side must be at least {self.n_win})")
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)          # (N, C, H, W) each
        logits = region_affinity(ceil_region_means(q.detach(), region_size),
                                 ceil_region_means(k.detach(), region_size))
        routing = topk_routing(logits, self.topk)              # indices (N, R, topk)
        grid = grid_for_region_size((height, width), region_size)

        def to_regions(t: Tensor) -> Tensor:                    # (N, C, H, W) -> (N, R, h * w, C)
            return region_partition(pad_to_multiple(t, region_size, channels_last=False).permute(0, 2, 3, 1), grid)

        if ret_attn_mask:
            out, attention = reference_routed_attention(to_regions(q), to_regions(k), to_regions(v), routing.indices,
                                                        self.scale, self.num_heads, return_attention=True)
            attention = attention.unflatten(0, (n, -1)).transpose(1, 2)   # (N, heads, R, rh * rw, topk * rh * rw)
        else:
            out = routed_attention(to_regions(q), to_regions(k), to_regions(v), routing.indices, self.scale,
                                   self.num_heads, backend=self.backend)
        out = region_merge(out, grid, region_size)[:, :height, :width].permute(0, 3, 1, 2)
        if self.lepe is not None:
            out = out + self.lepe(v)
        out = self.output_linear(out)
        if is_recording():
            emit(self, "nchw_bra", (height, width), region_grid=grid, region_size=region_size,
                 indices=routing.indices, logits=routing.logits, weights=routing.weights)
        if ret_attn_mask:
            return out, attention
        return out
