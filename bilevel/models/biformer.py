"""BiFormer: vision transformer with bi-level routing attention (Zhu et al., CVPR 2023).

Checkpoint-compatible with the official releases (``rayleizhu/BiFormer``): the state-dict keys,
shapes and numerics follow ``ARCHITECTURES.md`` §1. Two layouts:

* ``BiFormer`` (tiny/small/base): a conv stem, then per stage a stride-2 conv and blocks of
  [depth-wise conv position encoding, BRA, MLP]; stage 4 uses global attention.
* ``BiFormerSTL`` (the Swin-tiny layout of the ablation, ``biformer_stl``/``biformer_stl_nchw``).

Input sizes: the official models require sides that split into 7x7 regions at every BRA stage
(multiples of 112 px). Here every BRA pads its input bottom/right with zeros to the next multiple
of 7 and crops the result (the official ``auto_pad`` used for segmentation), so any size of at
least 32 px works; at the official sizes nothing is padded and the output is identical.
"""
from __future__ import annotations

import math
from functools import cached_property, partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ..ops.bra import BiLevelRoutingAttention, NCHWBiLevelRoutingAttention, lepe_conv
from ..ops.linear import FusedLinear
from ._pyramid import InputSizeError, PyramidBackbone, build_pyramid, imagenet_cfg

__all__ = ["BiFormer", "BiFormerSTL", "AttentionLePE", "NCHWAttentionLePE"]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def conv_stem(in_chans: int, dim: int) -> nn.Sequential:
    """Two stride-2 3x3 convs (keys 0..4): (N, in_chans, H, W) -> (N, dim, ceil(H/4), ceil(W/4))."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(dim // 2),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(dim),
    )


def conv_downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    """Stride-2 3x3 conv + BatchNorm: (N, in_dim, H, W) -> (N, out_dim, ceil(H/2), ceil(W/2))."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1), nn.BatchNorm2d(out_dim))


def _global_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Softmax attention (N, heads, L, D) x3 -> (N, heads, L, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class AttentionLePE(nn.Module):
    """Global multi-head attention + LePE of the *input*, BiFormer's stage-4 attention.

    x: (N, H, W, C) -> (N, H, W, C). 8 heads whatever the width, qkv without bias, scale (C/8)^-0.5.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = FusedLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = FusedLinear(dim, dim)
        self.lepe = lepe_conv(dim, side_dwconv)

    def forward(self, x: Tensor) -> Tensor:
        n, height, width, channels = x.shape
        tokens = x.reshape(n, height * width, channels)
        qkv = self.qkv(tokens).reshape(n, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                      # (N, heads, L, D) each
        out = _global_attention(q, k, v, self.scale).transpose(1, 2).reshape(n, height, width, channels)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class Attention(nn.Module):
    """Global multi-head attention without LePE (``topk=-1`` in the NHWC models). x: (N, H, W, C)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = FusedLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = FusedLinear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, height, width, channels = x.shape
        qkv = self.qkv(x.reshape(n, height * width, channels))
        q, k, v = qkv.reshape(n, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = _global_attention(q, k, v, self.scale).transpose(1, 2).reshape(n, height, width, channels)
        return self.proj(out)


class NCHWAttentionLePE(nn.Module):
    """Global attention on NCHW maps + LePE of V (BiFormer-STL-nchw stage 4).

    x: (N, C, H, W) -> (N, C, H, W); 1x1-conv qkv without bias, 8 heads, scale (C/8)^-0.5.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.lepe = lepe_conv(dim, side_dwconv)

    def forward(self, x: Tensor) -> Tensor:
        n, channels, height, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)

        def heads(t: Tensor) -> Tensor:                          # (N, C, H, W) -> (N, heads, HW, D)
            return t.reshape(n, self.num_heads, channels // self.num_heads, height * width).transpose(-1, -2)

        out = _global_attention(heads(q), heads(k), heads(v), self.scale)
        out = out.transpose(-1, -2).reshape(n, channels, height, width)
        if self.lepe is not None:
            out = out + self.lepe(v)
        return self.proj(out)


class DWConv(nn.Module):
    """Depth-wise 3x3 conv on NHWC tokens (the optional ``mlp_dwconv`` of the MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _attention(dim: int, num_heads: int, topk: int, n_win: int, qk_dim: int, qk_scale: Optional[float],
               side_dwconv: int, auto_pad: bool, backend: str, **bra_options) -> nn.Module:
    """The attention of one NHWC block: BRA for topk > 0, global attention for -1 / -2."""
    if topk > 0:
        return BiLevelRoutingAttention(dim=dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
                                       topk=topk, side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend,
                                       **bra_options)
    if topk == -1:
        return Attention(dim)
    if topk == -2:
        return AttentionLePE(dim, side_dwconv=side_dwconv)
    raise ValueError(f"topk={topk} is not supported: use a positive top-k (BRA), -1 (global attention) or "
                     "-2 (global attention with LePE)")


class Block(nn.Module):
    """BiFormer block: x + pos_embed(x), then pre-norm attention and MLP. x: (N, C, H, W) -> same."""

    def __init__(self, dim: int, num_heads: int, topk: int, qk_dim: int, drop_path: float = 0.0,
                 layer_scale_init_value: float = -1, n_win: int = 7, qk_scale: Optional[float] = None,
                 mlp_ratio: float = 3, mlp_dwconv: bool = False, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 pre_norm: bool = True, auto_pad: bool = True, backend: str = "auto", **bra_options):
        super().__init__()
        self.pos_embed = (nn.Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim)
                          if before_attn_dwconv > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _attention(dim, num_heads, topk, n_win, qk_dim, qk_scale, side_dwconv, auto_pad, backend,
                               **bra_options)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        if mlp_dwconv:
            self.mlp = nn.Sequential(FusedLinear(dim, hidden), DWConv(hidden), nn.GELU(), FusedLinear(hidden, dim))
        else:   # fc1 applies the GELU (one pass in CPU inference); the Identities keep fc2's official key mlp.3
            self.mlp = nn.Sequential(FusedLinear(dim, hidden, activation="gelu"), nn.Identity(), nn.Identity(),
                                     FusedLinear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None
        self.pre_norm = pre_norm

    def _scaled(self, gamma: Optional[Tensor], x: Tensor) -> Tensor:
        return self.drop_path(x if gamma is None else gamma * x)

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)                                  # NHWC
        if self.pre_norm:
            x = x + self._scaled(self.gamma1, self.attn(self.norm1(x)))
            x = x + self._scaled(self.gamma2, self.mlp(self.norm2(x)))
        else:
            x = self.norm1(x + self._scaled(self.gamma1, self.attn(x)))
            x = self.norm2(x + self._scaled(self.gamma2, self.mlp(x)))
        return x.permute(0, 3, 1, 2)


class STLBlock(nn.Module):
    """BiFormer-STL block: pre-norm attention + MLP, no position conv.

    NHWC tokens (``nchw=False``: LayerNorm, legacy BRA, Linear MLP) or NCHW maps (``nchw=True``:
    LayerNorm2d, NCHW BRA, 1x1-conv MLP).
    """

    def __init__(self, dim: int, num_heads: int, topk: int, n_win: int = 7, drop_path: float = 0.0,
                 mlp_ratio: float = 4, side_dwconv: int = 5, nchw: bool = False, auto_pad: bool = True,
                 backend: str = "auto"):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        if nchw:
            self.norm1 = LayerNorm2d(dim, eps=1e-6)
            if topk > 0:
                self.attn = NCHWBiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, topk=topk,
                                                        side_dwconv=side_dwconv, backend=backend)
            elif topk == -1:
                self.attn = NCHWAttentionLePE(dim, side_dwconv=side_dwconv)
            else:
                raise ValueError(f"topk={topk} is not supported by the NCHW layout: use a positive top-k or -1")
            self.norm2 = LayerNorm2d(dim, eps=1e-6)
            self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        else:
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = _attention(dim, num_heads, topk, n_win, dim, None, side_dwconv, auto_pad, backend)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = nn.Sequential(FusedLinear(dim, hidden, activation="gelu"), nn.Identity(),   # GELU in fc1
                                     FusedLinear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class STLStage(nn.Module):
    """A BiFormer-STL stage (keys ``blocks.{j}``): NCHW in and out."""

    def __init__(self, blocks: Sequence[STLBlock], nchw: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.nchw = nchw

    def forward(self, x: Tensor) -> Tensor:
        if not self.nchw:
            x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return x if self.nchw else x.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

class _BiFormerBase(PyramidBackbone):
    """What both BiFormer layouts share: stem/downsample list, stages, BatchNorm head."""

    def _init_head(self, dims: Sequence[int], num_classes: int, drop_rate: float, global_pool: str) -> None:
        self.init_classifier(dims[-1], num_classes, drop_rate, global_pool,
                             [dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}")
                              for i, dim in enumerate(dims)])

    @cached_property
    def unpadded_side_multiple(self) -> int:
        """The multiple of which image sides must be when some BRA stage is built with ``auto_pad=False``
        (stride of that stage x n_win, e.g. 112 for the official models); 1 when every BRA pads."""
        multiple = 1
        for index, stage in enumerate(self.stages):
            for module in stage.modules():
                if isinstance(module, BiLevelRoutingAttention) and not module.auto_pad:
                    multiple = math.lcm(multiple, 2 ** (index + 2) * module.n_win)
        return multiple

    def prepare_input(self, x: Tensor) -> Tensor:
        """Check the image batch (N, C, H, W); return it in channels-last memory.

        Every conv then keeps that memory format, so the blocks' NHWC views of their maps are contiguous (no copy
        before each LayerNorm and linear) and the depthwise convs run in their fast layout (on the CPU, 3x3 over
        8x64x56x56: 30x faster than on an NCHW-contiguous map).
        """
        x = super().prepare_input(x)
        multiple = self.unpadded_side_multiple
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise InputSizeError(f"a {x.shape[-2]}x{x.shape[-1]} image does not fit {type(self).__name__} built with "
                                 f"auto_pad=False: each side must be a multiple of {multiple} pixels, so that every "
                                 "BRA stage splits into its regions; build it with auto_pad=True (the default) to pad")
        return x.contiguous(memory_format=torch.channels_last)

    def run_stage(self, index: int, x: Tensor) -> Tensor:
        """(N, C_{i-1}, H, W) -> (N, C_i, H', W'): downsample, then the blocks of stage ``index``."""
        return self.stages[index](self.downsample_layers[index](x))

    def stage_to_nchw(self, index: int, x: Tensor) -> Tensor:
        """The stage output, kept in channels-last memory, as an NCHW-contiguous map (necks may ``view`` it)."""
        return x.contiguous()

    def stage_containers(self) -> list[nn.ModuleList]:
        return [self.downsample_layers, self.stages]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (for layer-wise lr decay): stem, then stages/blocks.

        coarse: one group per stage, its downsampling included (as timm's Swin), then the final norm and head.
        """
        return dict(stem=r"^downsample_layers\.0",
                    blocks=r"^(?:downsample_layers|stages)\.(\d+)" if coarse else [
                        (r"^downsample_layers\.(\d+)", None),
                        (r"^stages\.(\d+)\.(?:blocks\.)?(\d+)", None),
                        (r"^norm", (99999,))])


class BiFormer(_BiFormerBase):
    """BiFormer (tiny/small/base layout). Official constructor arguments; see ``ARCHITECTURES.md`` §1."""

    def __init__(self, depth=(3, 4, 8, 3), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim=(64, 128, 320, 512), head_dim: int = 64, qk_scale: Optional[float] = None,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, n_win: int = 7,
                 kv_downsample_mode: str = "identity", kv_per_wins=(2, 2, -1, -1), topks=(8, 8, -1, -1),
                 side_dwconv: int = 5, layer_scale_init_value: float = -1, qk_dims=(None, None, None, None),
                 param_routing: bool = False, diff_routing: bool = False, soft_routing: bool = False,
                 pre_norm: bool = True, before_attn_dwconv: int = 3, auto_pad: bool = True,
                 kv_downsample_kernels=(4, 2, 1, 1), kv_downsample_ratios=(4, 2, 1, 1), mlp_ratios=(4, 4, 4, 4),
                 param_attention: str = "qkvo", mlp_dwconv: bool = False, global_pool: str = "avg",
                 attn_backend: str = "auto"):
        super().__init__()
        self.in_chans = in_chans
        qk_dims = [qk or dim for qk, dim in zip(qk_dims, embed_dim)]
        self.downsample_layers = nn.ModuleList(
            [conv_stem(in_chans, embed_dim[0])]
            + [conv_downsample(embed_dim[i], embed_dim[i + 1]) for i in range(3)])
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            first = sum(depth[:i])
            self.stages.append(nn.Sequential(*[
                Block(embed_dim[i], num_heads=qk_dims[i] // head_dim, topk=topks[i], qk_dim=qk_dims[i],
                      drop_path=rates[first + j], layer_scale_init_value=layer_scale_init_value, n_win=n_win,
                      qk_scale=qk_scale, mlp_ratio=mlp_ratios[i], mlp_dwconv=mlp_dwconv, side_dwconv=side_dwconv,
                      before_attn_dwconv=before_attn_dwconv, pre_norm=pre_norm, auto_pad=auto_pad,
                      backend=attn_backend, kv_per_win=kv_per_wins[i], kv_downsample_ratio=kv_downsample_ratios[i],
                      kv_downsample_kernel=kv_downsample_kernels[i], kv_downsample_mode=kv_downsample_mode,
                      param_attention=param_attention, param_routing=param_routing, diff_routing=diff_routing,
                      soft_routing=soft_routing)
                for j in range(depth[i])]))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self._init_head(embed_dim, num_classes, drop_rate, global_pool)


class BiFormerSTL(_BiFormerBase):
    """BiFormer in the Swin-tiny layout (``biformer_stl``; ``nchw=True`` gives ``biformer_stl_nchw``)."""

    def __init__(self, depth=(2, 2, 6, 2), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim=(96, 192, 384, 768), head_dim: int = 32, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, mlp_ratios=(4, 4, 4, 4), n_wins=(7, 7, 7, 7), topks=(1, 4, 16, -2),
                 side_dwconv: int = 5, nchw: bool = False, auto_pad: bool = True, global_pool: str = "avg",
                 attn_backend: str = "auto"):
        super().__init__()
        self.in_chans = in_chans
        if nchw:
            # the NCHW BRA needs at least one pixel per region: 7 at stage 3 (stride 16)
            self.min_input_size = 16 * n_wins[2]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, embed_dim[0], kernel_size=4, stride=4), nn.BatchNorm2d(embed_dim[0]))]
            + [nn.Sequential(nn.BatchNorm2d(embed_dim[i]), nn.Conv2d(embed_dim[i], embed_dim[i + 1], 2, stride=2))
               for i in range(3)])
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        block = partial(STLBlock, side_dwconv=side_dwconv, nchw=nchw, auto_pad=auto_pad, backend=attn_backend)
        self.stages = nn.ModuleList(
            STLStage([block(embed_dim[i], num_heads=embed_dim[i] // head_dim, topk=topks[i], n_win=n_wins[i],
                            drop_path=rates[sum(depth[:i]) + j], mlp_ratio=mlp_ratios[i]) for j in range(depth[i])],
                     nchw=nchw)
            for i in range(4))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self._init_head(embed_dim, num_classes, drop_rate, global_pool)


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------

_cfg = partial(imagenet_cfg, "downsample_layers.0.0", paper_ids="arXiv:2303.08810",
               origin_url="https://github.com/rayleizhu/BiFormer")


default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(),
    "biformer_small.in1k": _cfg(),
    "biformer_base.in1k": _cfg(),
    "biformer_stl.in1k": _cfg(),
    "biformer_stl_nchw.in1k": _cfg(),
})

_BIFORMER_COMMON = dict(n_win=7, kv_downsample_mode="identity", kv_per_wins=(-1, -1, -1, -1), topks=(1, 4, 16, -2),
                        side_dwconv=5, before_attn_dwconv=3, layer_scale_init_value=-1, head_dim=32,
                        mlp_ratios=(3, 3, 3, 3))


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1 M parameters, 81.4 % ImageNet-1K top-1 (official)."""
    args = dict(_BIFORMER_COMMON, depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512))
    return build_pyramid(BiFormer, "biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5 M parameters, 83.8 % ImageNet-1K top-1 (official)."""
    args = dict(_BIFORMER_COMMON, depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512))
    return build_pyramid(BiFormer, "biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8 M parameters, 84.3 % ImageNet-1K top-1 (official)."""
    args = dict(_BIFORMER_COMMON, depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768), qk_dims=(96, 192, 384, 768))
    return build_pyramid(BiFormer, "biformer_base", pretrained, **dict(args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormerSTL:
    """BiFormer-STL (Swin-T layout with BRA): 28.4 M parameters, 82.7 % top-1 (official ablation)."""
    return build_pyramid(BiFormerSTL, "biformer_stl", pretrained, **kwargs)


@register_model
def biformer_stl_nchw(pretrained: bool = False, **kwargs) -> BiFormerSTL:
    """BiFormer-STL with the NCHW BRA: 28.4 M parameters, 82.7 % top-1 (official)."""
    args = dict(topks=(1, 4, 16, -1), nchw=True)
    return build_pyramid(BiFormerSTL, "biformer_stl_nchw", pretrained, **dict(args, **kwargs))
