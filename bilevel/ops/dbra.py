"""Deformable Bi-Level Routing Attention (DBRA), the attention of DeBiFormer (Long et al., ACCV 2024).

Checkpoint- and numerics-compatible with ``DeBiLevelRoutingAttention`` of ``maclong01/DeBiFormer``
(``ARCHITECTURES.md`` §2.4). On an NHWC map x (N, H, W, C):

1. q, k, v = 1x1 conv of x at full resolution;
2. an offset network on q (per offset group: depth-wise kk x kk conv with stride s, LayerNorm, GELU,
   1x1 conv to ONE channel) moves a coarse (Hk, Wk) = ceil(H/s, W/s) grid of reference points; the
   single offset is added to both coordinates and the positions clamped to [-1, 1];
3. x is sampled bilinearly at those positions: the deformed tokens x_s (N, C, Hk, Wk);
4. bi-level routing from the deformed tokens to the full-resolution keys: region means of
   proj_q(x_s) and of k, top-k regions, token attention (``bilevel.ops.attention.routed_attention``,
   deformed queries, full-resolution keys/values), + LePE of v with stride s, unifyheads1, residual
   x_s, MLP refinement, LayerNorm: the refined deformed tokens o;
5. every full-resolution query (the raw q of step 1) attends to the Hk*Wk tokens
   (keys proj_k(o), values proj_v(o)) with a relative-position bias read from ``rpe_table`` at the
   halved displacement between the query and the sampling point; proj_out.

Padding (``auto_pad=True``, the official path): x is zero-padded bottom/right to a multiple of
``n_win``, and the deformed grid (x_s, lepe and the positions) to a multiple of ``n_win`` too; the
padded deformed tokens (position (0, 0), the map centre) stay in the final attention unmasked, as in
the official code; the output is cropped. With ``auto_pad=False`` both the map and the deformed grid
must already split into ``n_win x n_win`` regions (the published code crashes there instead: its
``Hg, Wg`` exist only on the padding path; for such sizes padding is a no-op, so both agree).

Recording (``bilevel.ops.record_routing``): every call emits a ``"dbra"`` record with the routing
``indices`` (N, n_win², topk) and ``logits``, and in ``extras``: ``sampling_points`` (N, g, Hk, Wk, 2),
the clamped positions as (y, x) in [-1, 1] in the align-corners convention of the (padded) input map
(-1 and 1 are the centres of its first and last pixels: pixel = (p + 1) / 2 * (side - 1)),
``reference_points`` (Hk, Wk, 2) the un-moved pixel centres of the deformed grid, ``padded_map_size``,
``deformed_grid`` (Hg, Wg) and ``deformed_region_size``. ``region_size`` is the key region size on
the (padded) input map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import merge_heads, reference_routed_attention, routed_attention, split_heads
from .bra import check_map_shape, check_n_win_and_backend, lepe_conv
from .recording import emit, is_recording
from .regions import check_region_grid, fit_to_region_grid, pad_to_multiple, region_merge, region_partition
from .routing import TopkRouter

__all__ = ["DeBiLevelRoutingAttention", "TransformerMLPWithConv", "DeformableSettings", "DEFORMABLE_SETTINGS",
           "reference_points", "query_grid"]


@dataclass(frozen=True)
class DeformableSettings:
    """Per-stage constants of DBRA, chosen by ``param_size`` and the stage width.

    groups: offset groups g; kernel: offset-conv kernel kk; stride: s (deformed grid = map / s);
    mlp_ratio: hidden ratio of the DBRA-internal MLP; rpe_size: q_size of ``rpe_table``
    (the table is (heads, 2 * rpe_size - 1, 2 * rpe_size - 1), fixed whatever the input size).
    """

    groups: int
    kernel: int
    stride: int
    mlp_ratio: int
    rpe_size: int


def _stage_table(dims: tuple[int, ...], groups: tuple[int, ...], mlp_ratios: tuple[int, ...]
                 ) -> dict[int, DeformableSettings]:
    kernels, strides, rpe_sizes = (9, 7, 5, 3), (8, 4, 2, 1), (56, 28, 14, 7)
    return {dim: DeformableSettings(g, kk, s, r, q)
            for dim, g, kk, s, r, q in zip(dims, groups, kernels, strides, mlp_ratios, rpe_sizes)}


#: param_size -> stage width -> settings (ARCHITECTURES.md §2.2)
DEFORMABLE_SETTINGS: dict[str, dict[int, DeformableSettings]] = {
    "tiny": _stage_table((64, 128, 256, 512), (1, 2, 4, 8), (3, 3, 3, 3)),
    "small": _stage_table((64, 128, 256, 512), (1, 2, 4, 8), (3, 3, 3, 1)),
    "base": _stage_table((96, 192, 384, 768), (1, 2, 3, 6), (3, 3, 3, 3)),
}


class TransformerMLPWithConv(nn.Module):
    """1x1 conv C -> rC, x + depth-wise 3x3 conv(x), GELU, 1x1 conv rC -> C (official keys).

    x: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        hidden = channels * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(channels, hidden, 1))
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, channels, 1))
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear1(x)
        return self.linear2(self.act(x + self.dwc(x)))


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (key ``norm``, as the official LayerNormProxy)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class QKVConv(nn.Module):
    """One 1x1 conv for q, k, v (key ``qkv``): (N, C, H, W) -> q, k (qk_dim each), v (C)."""

    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.sizes = [qk_dim, qk_dim, dim]
        self.qkv = nn.Conv2d(dim, 2 * qk_dim + dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).split(self.sizes, dim=1)
        return q, k, v


def reference_points(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Pixel centres of a height x width grid in [-1, 1]: (height, width, 2) as (y, x)."""
    ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def query_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Pixel positions in the align-corners convention, i / (height - 1) * 2 - 1: (height, width, 2) (y, x)."""
    ys = torch.arange(height, dtype=dtype, device=device) / (height - 1.0) * 2 - 1
    xs = torch.arange(width, dtype=dtype, device=device) / (width - 1.0) * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


#: dtypes whose CPU grid_sample misreads channels-last (non-contiguous) maps (PyTorch 2.x: garbage, NaN)
_CPU_GRID_SAMPLE_NEEDS_CONTIGUOUS = (torch.bfloat16, torch.float16)


def _sample(maps: Tensor, positions_yx: Tensor) -> Tensor:
    """Bilinear sampling (align_corners=True, zeros outside): maps (B, C, H, W), positions (B, h, w, 2) (y, x)
    -> (B, C, h, w).

    The maps are the channels-last view of the NHWC input. PyTorch's CPU kernel reads such maps wrongly in
    bfloat16/float16, so there they are copied to a contiguous layout first; float32 reads them correctly and
    skips the copy (a full-resolution copy costs far more than sampling the few deformed points).
    """
    if maps.device.type == "cpu" and maps.dtype in _CPU_GRID_SAMPLE_NEEDS_CONTIGUOUS:
        maps = maps.contiguous()
    return F.grid_sample(maps, positions_yx.flip(-1), mode="bilinear", align_corners=True)


class DeBiLevelRoutingAttention(nn.Module):
    """DBRA on NHWC maps with the official constructor (see the module docstring).

    x: (N, H, W, C) -> (N, H, W, C). ``param_size`` ("tiny", "small", "base") and ``dim`` select the
    per-stage constants (:data:`DEFORMABLE_SETTINGS`). ``uto_pad`` is accepted as an alias of
    ``auto_pad`` (the official Block passes that misspelt keyword). ``backend`` picks the routed
    attention implementation (:func:`bilevel.ops.attention.routed_attention`).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_kernel: Optional[int] = None, kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False, diff_routing: bool = False,
                 soft_routing: bool = False, side_dwconv: int = 3, auto_pad: bool = False,
                 param_size: str = "small", uto_pad: Optional[bool] = None, backend: str = "auto"):
        super().__init__()
        check_n_win_and_backend(type(self).__name__, n_win, backend)
        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim != dim:
            raise ValueError(f"DeBiLevelRoutingAttention needs qk_dim == dim (got qk_dim={self.qk_dim}, dim={dim}): "
                             "deformed queries (dim channels) are routed against keys (qk_dim channels)")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        try:
            self.settings = DEFORMABLE_SETTINGS[param_size][dim]
        except KeyError:
            known = {size: sorted(table) for size, table in DEFORMABLE_SETTINGS.items()}
            raise ValueError(f"no DBRA settings for param_size={param_size!r} and dim={dim}; "
                             f"known (param_size: dims): {known}") from None
        groups = self.settings.groups
        if num_heads % groups:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by the {groups} offset groups of "
                             f"param_size={param_size!r}, dim={dim}")
        if kv_downsample_mode != "identity":
            raise ValueError(f"kv_downsample_mode={kv_downsample_mode!r} is not supported by DBRA; every "
                             "DeBiFormer release uses 'identity'")
        if diff_routing and not soft_routing:
            raise ValueError("diff_routing=True without soft_routing=True (differentiable hard routing) is not "
                             "supported; the official code raises NotImplementedError for it too")
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention={param_attention!r} is not supported; choose 'qkvo' or 'qkv'")
        self.param_size = param_size
        self.topk = topk
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.soft_routing = soft_routing
        self.auto_pad = auto_pad if uto_pad is None else uto_pad
        self.backend = backend
        stride, group_channels = self.settings.stride, dim // groups

        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * self.settings.rpe_size - 1,
                                                  2 * self.settings.rpe_size - 1))
        nn.init.trunc_normal_(self.rpe_table, std=0.01)
        self.lepe1 = lepe_conv(dim, side_dwconv, stride=stride)
        self.router = TopkRouter(self.qk_dim, topk, self.scale, learned=param_routing, differentiable=diff_routing)
        self.qkv_conv = QKVConv(dim, self.qk_dim)
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.unifyheads1 = nn.Conv2d(dim, dim, 1)
        kernel = self.settings.kernel
        self.conv_offset_q = nn.Sequential(
            nn.Conv2d(group_channels, group_channels, kernel, stride, kernel // 2, groups=group_channels, bias=False),
            ChannelsFirstLayerNorm(group_channels, eps=1e-5),
            nn.GELU(),
            nn.Conv2d(group_channels, 1, 1, bias=False),
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TransformerMLPWithConv(dim, self.settings.mlp_ratio)

    def sampling_positions(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Where the deformed tokens are read, from the full-resolution queries.

        q: (N, C, H, W) -> positions (N * g, Hk, Wk, 2) clamped to [-1, 1] as (y, x) (align-corners
        convention of the H x W map), and the reference points (Hk, Wk, 2) they moved from.
        """
        n, channels, height, width = q.shape
        groups = self.settings.groups
        offsets = self.conv_offset_q(q.reshape(n * groups, channels // groups, height, width))  # (N*g, 1, Hk, Wk)
        reference = reference_points(offsets.shape[2], offsets.shape[3], q.dtype, q.device)
        return (reference + offsets.permute(0, 2, 3, 1)).clamp(-1.0, 1.0), reference

    @staticmethod
    def rpe_displacement(map_size: tuple[int, int], positions: Tensor) -> Tensor:
        """Halved displacement from every sampling point to every query pixel, in grid_sample's (x, y) order.

        positions: (N * g, Hg, Wg, 2) (y, x) -> (N * g, H * W, Hg * Wg, 2). The official
        ``0.5 * (grid - positions)`` flipped to (x, y): halving is exact in floating point, so halving and
        flipping the small operands gives the same numbers in one pass over the large tensor instead of three.
        """
        grid = 0.5 * query_grid(*map_size, positions.dtype, positions.device).flip(-1).reshape(1, -1, 1, 2)
        return grid - 0.5 * positions.flip(-1).reshape(positions.shape[0], 1, -1, 2)

    def relative_position_bias(self, map_size: tuple[int, int], positions: Tensor) -> Tensor:
        """rpe_table read at :meth:`rpe_displacement`.

        positions: (N * g, Hg, Wg, 2) (y, x) -> bias (N, heads, H * W, Hg * Wg).
        """
        groups = self.settings.groups
        batch_groups = positions.shape[0]
        table = self.rpe_table.reshape(groups, self.num_heads // groups, *self.rpe_table.shape[1:])
        table = table.repeat(batch_groups // groups, 1, 1, 1)                          # (N*g, heads/g, ., .)
        displacement_xy = self.rpe_displacement(map_size, positions)                   # (N*g, HW, HgWg, 2)
        bias = F.grid_sample(table, displacement_xy, mode="bilinear", align_corners=True)  # (N*g, heads/g, HW, HgWg)
        return bias.reshape(batch_groups // groups, self.num_heads, *bias.shape[2:])

    def forward(self, x: Tensor, ret_attn_mask: bool = False):
        """x: (N, H, W, C) -> (N, H, W, C); with ``ret_attn_mask`` the official tuple (out, routing
        weights (N, S², topk), routing indices (N, S², topk), routed attention weights
        (N * S², heads, hg * wg, topk * h * w))."""
        check_map_shape(x, self.dim, True, type(self).__name__)
        n, height, width, channels = x.shape
        grid = (self.n_win, self.n_win)
        x = fit_to_region_grid(x, grid, self.auto_pad, type(self).__name__)
        padded_h, padded_w = x.shape[1], x.shape[2]
        groups = self.settings.groups

        x_map = x.permute(0, 3, 1, 2)                                          # (N, C, Hp, Wp)
        q, k, v = self.qkv_conv(x_map)
        positions, reference = self.sampling_positions(q)                     # (N*g, Hk, Wk, 2)
        sampled_h, sampled_w = positions.shape[1], positions.shape[2]
        sampled = _sample(x_map.reshape(n * groups, channels // groups, padded_h, padded_w), positions)
        sampled = sampled.reshape(n, channels, sampled_h, sampled_w)          # x_s (N, C, Hk, Wk)
        lepe = self.lepe1(v) if self.lepe1 is not None else torch.zeros_like(sampled)
        if self.auto_pad:
            sampled = pad_to_multiple(sampled, grid, channels_last=False)
            lepe = pad_to_multiple(lepe, grid, channels_last=False)
            grid_positions = pad_to_multiple(positions, grid)
        else:
            check_region_grid(sampled_h, sampled_w, grid, f"{type(self).__name__} deformed grid")
            grid_positions = positions
        deformed_h, deformed_w = sampled.shape[2], sampled.shape[3]           # Hg, Wg

        # bi-level routing: deformed queries -> full-resolution key/value regions
        query_regions = region_partition(self.proj_q(sampled).permute(0, 2, 3, 1), grid)   # (N, S², hg*wg, C)
        key_regions = region_partition(k.permute(0, 2, 3, 1), grid)                        # (N, S², h*w, C)
        value_regions = region_partition(v.permute(0, 2, 3, 1), grid)
        routing = self.router(query_regions.mean(dim=2), key_regions.mean(dim=2))
        weights = routing.weights if self.soft_routing else None
        if ret_attn_mask:
            routed, routed_attention_weights = reference_routed_attention(
                query_regions, key_regions, value_regions, routing.indices, self.scale, self.num_heads,
                region_weights=weights, return_attention=True)
        else:
            routed = routed_attention(query_regions, key_regions, value_regions, routing.indices, self.scale,
                                      self.num_heads, region_weights=weights, backend=self.backend)
        deformed_region = (deformed_h // self.n_win, deformed_w // self.n_win)
        tokens = region_merge(routed, grid, deformed_region).permute(0, 3, 1, 2)          # (N, C, Hg, Wg)
        tokens = sampled + self.unifyheads1(tokens + lepe)
        tokens = tokens + self.mlp(self.norm2(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        tokens = self.norm(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        # deformable attention: every full-resolution query onto the Hg*Wg refined tokens
        queries = split_heads(q.flatten(2).transpose(1, 2), self.num_heads)               # (N, heads, HpWp, D)
        keys = split_heads(self.proj_k(tokens).flatten(2).transpose(1, 2), self.num_heads)  # (N, heads, HgWg, D)
        values = split_heads(self.proj_v(tokens).flatten(2).transpose(1, 2), self.num_heads)
        bias = self.relative_position_bias((padded_h, padded_w), grid_positions)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=self.scale)
        out = merge_heads(out).transpose(1, 2).reshape(n, channels, padded_h, padded_w)
        out = self.proj_out(out).permute(0, 2, 3, 1)
        if padded_h != height or padded_w != width:
            out = out[:, :height, :width].contiguous()

        if is_recording():
            emit(self, "dbra", (height, width), region_grid=grid,
                 region_size=(padded_h // self.n_win, padded_w // self.n_win),
                 indices=routing.indices, logits=routing.logits, weights=routing.weights,
                 sampling_points=positions.reshape(n, groups, sampled_h, sampled_w, 2),
                 reference_points=reference, padded_map_size=(padded_h, padded_w),
                 deformed_grid=(deformed_h, deformed_w), deformed_region_size=deformed_region)
        if ret_attn_mask:
            return out, routing.weights, routing.indices, routed_attention_weights
        return out
