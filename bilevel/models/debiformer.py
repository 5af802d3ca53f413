"""DeBiFormer: vision transformer with deformable bi-level routing attention (Long et al., ACCV 2024).

Checkpoint-compatible with ``maclong01/DeBiFormer`` (``classification/debiformer.py``): state-dict
keys, shapes and numerics follow ``ARCHITECTURES.md`` §2. The stem, the stride-2 downsampling
convs, the final BatchNorm and the classifier are BiFormer's (imported from
:mod:`bilevel.models.biformer`); every block runs two attentions:

    x + pos_embed1(x) -> x + attn1(norm1(x)) -> x + mlp1(norm2(x))
    -> x + pos_embed2(x) -> x + attn2(norm3(x)) -> x + mlp2(norm4(x))

with attn1 = BRA (top-k 1 / 4 / 16 in stages 1-3) or DBRA (stage 4) and attn2 = DBRA.

The published code cannot run as released (a misspelt ``uto_pad`` keyword, and no grid size for
the deformed tokens when padding is off; ``ARCHITECTURES.md`` §2.1). Here every BRA and DBRA pads
its input bottom/right to a multiple of 7 (the official ``auto_pad`` path), which is what the
official code computes wherever it runs, and makes any input of at least 32 px work: the 7x7
region grid and the deformed grid (ceil(side / stride)) are padded when they do not divide.
At 224, 448 and 224x448 nothing is padded.

Parameter counts (measured): debiformer_tiny 21,495,598; debiformer_small 44,008,028;
debiformer_base 95,501,926. The official README lists 77 M for DeBiFormer-B; the released code
(from which the checkpoints were saved) builds 95.5 M, and that is what is built here.
``debi_tiny``, ``debi_small`` and ``debi_base`` are the official names of the same variants.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ..ops.bra import BiLevelRoutingAttention
from ..ops.dbra import DeBiLevelRoutingAttention, TransformerMLPWithConv
from ._pyramid import build_pyramid, imagenet_cfg
from .biformer import _BiFormerBase, conv_downsample, conv_stem

__all__ = ["DeBiFormer", "Block"]

#: block top-k -> top-k of the BRA that runs first in that block (stages 1-3)
BRA_TOPK_OF_BLOCK = {4: 1, 8: 4, 16: 16}
#: regions the two DBRAs of a last-stage block (top-k -2) route to: a fixed 49 in the official code, which is
#: every region at the classification n_win of 7 and 49 of 64 at the segmentation n_win of 8
LAST_STAGE_ROUTED_REGIONS = 49


class Block(nn.Module):
    """DeBiFormer block (pre-norm, two attentions, two MLPs). x: (N, C, H, W) -> (N, C, H, W).

    topk: 4, 8 or 16 -> attn1 = BRA with top-k 1, 4 or 16 and attn2 = DBRA with this top-k;
    -2 (last stage) -> attn1 and attn2 both DBRA routing to ``LAST_STAGE_ROUTED_REGIONS`` regions (every
    region when n_win² is not more).
    """

    def __init__(self, dim: int, num_heads: int, topk: int, param_size: str, drop_path: float = 0.0,
                 n_win: int = 7, qk_dim: Optional[int] = None, qk_scale: Optional[float] = None,
                 mlp_ratio: int = 3, side_dwconv: int = 5, before_attn_dwconv: int = 3, attn_backend: str = "auto"):
        super().__init__()
        qk_dim = qk_dim or dim
        padding = before_attn_dwconv // 2
        self.pos_embed1 = nn.Conv2d(dim, dim, before_attn_dwconv, padding=padding, groups=dim)
        self.pos_embed2 = nn.Conv2d(dim, dim, before_attn_dwconv, padding=padding, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)

        def dbra(routed_regions: int) -> DeBiLevelRoutingAttention:
            return DeBiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
                                             topk=routed_regions, side_dwconv=side_dwconv, auto_pad=True,
                                             param_size=param_size, backend=attn_backend)

        if topk in BRA_TOPK_OF_BLOCK:
            self.attn1 = BiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim,
                                                 qk_scale=qk_scale, topk=BRA_TOPK_OF_BLOCK[topk],
                                                 side_dwconv=side_dwconv, auto_pad=True, backend=attn_backend)
            self.attn2 = dbra(topk)
        elif topk == -2:
            routed_regions = min(LAST_STAGE_ROUTED_REGIONS, n_win * n_win)
            self.attn1 = dbra(routed_regions)
            self.attn2 = dbra(routed_regions)
        else:
            raise ValueError(f"topk={topk} is not a DeBiFormer block setting: use 4, 8, 16 (BRA + DBRA) or "
                             f"-2 (two DBRAs routing to {LAST_STAGE_ROUTED_REGIONS} regions)")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp1 = TransformerMLPWithConv(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.norm4 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp2 = TransformerMLPWithConv(dim, mlp_ratio)

    def _mlp(self, mlp: TransformerMLPWithConv, norm: nn.LayerNorm, x: Tensor) -> Tensor:
        """Pre-norm conv-MLP residual branch on NHWC tokens."""
        return self.drop_path(mlp(norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = (x + self.pos_embed1(x)).permute(0, 2, 3, 1)                       # NHWC
        x = x + self.drop_path(self.attn1(self.norm1(x)))
        x = x + self._mlp(self.mlp1, self.norm2, x)
        x = x + self.pos_embed2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn2(self.norm3(x)))
        x = x + self._mlp(self.mlp2, self.norm4, x)
        return x.permute(0, 3, 1, 2)


class DeBiFormer(_BiFormerBase):
    """DeBiFormer (official constructor arguments of the released variants; ``ARCHITECTURES.md`` §2).

    x: (N, in_chans, H, W), H and W >= 32 -> logits (N, num_classes); ``forward_features`` gives the
    (N, C4, ceil(H/32), ceil(W/32)) map after the final BatchNorm.
    """

    def __init__(self, depth=(1, 1, 4, 1), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim=(64, 128, 256, 512), head_dim: int = 32, qk_scale: Optional[float] = None,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, n_win: int = 7, topks=(4, 8, 16, -2),
                 side_dwconv: int = 5, qk_dims: Sequence[Optional[int]] = (None, None, None, None),
                 before_attn_dwconv: int = 3, mlp_ratios=(3, 3, 3, 3), param_size: str = "tiny",
                 global_pool: str = "avg", attn_backend: str = "auto"):
        super().__init__()
        self.in_chans = in_chans
        qk_dims = [qk or dim for qk, dim in zip(qk_dims, embed_dim)]
        self.downsample_layers = nn.ModuleList(
            [conv_stem(in_chans, embed_dim[0])] + [conv_downsample(embed_dim[i], embed_dim[i + 1]) for i in range(3)])
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.stages = nn.ModuleList(
            nn.Sequential(*[
                Block(embed_dim[i], num_heads=qk_dims[i] // head_dim, topk=topks[i], param_size=param_size,
                      drop_path=rates[sum(depth[:i]) + j], n_win=n_win, qk_dim=qk_dims[i], qk_scale=qk_scale,
                      mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                      attn_backend=attn_backend)
                for j in range(depth[i])])
            for i in range(4))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self._init_head(embed_dim, num_classes, drop_rate, global_pool)


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------

_cfg = partial(imagenet_cfg, "downsample_layers.0.0", origin_url="https://github.com/maclong01/DeBiFormer")


default_cfgs = generate_default_cfgs({
    "debiformer_tiny.in1k": _cfg(),
    "debiformer_small.in1k": _cfg(),
    "debiformer_base.in1k": _cfg(),
    "debi_tiny.in1k": _cfg(),
    "debi_small.in1k": _cfg(),
    "debi_base.in1k": _cfg(),
})

_COMMON = dict(n_win=7, topks=(4, 8, 16, -2), side_dwconv=5, before_attn_dwconv=3, head_dim=32)
_TINY = dict(_COMMON, depth=(1, 1, 4, 1), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512),
             mlp_ratios=(3, 3, 3, 3), param_size="tiny")
_SMALL = dict(_COMMON, depth=(2, 2, 9, 3), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512),
              mlp_ratios=(3, 3, 3, 2), param_size="small")
_BASE = dict(_COMMON, depth=(2, 2, 9, 2), embed_dim=(96, 192, 384, 768), qk_dims=(96, 192, 384, 768),
             mlp_ratios=(3, 3, 3, 3), param_size="base")


def _build(variant: str, settings: dict, pretrained: bool, kwargs: dict) -> DeBiFormer:
    return build_pyramid(DeBiFormer, variant, pretrained, **dict(settings, **kwargs))


@register_model
def debiformer_tiny(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """DeBiFormer-T: 21.5 M parameters, 81.9 % ImageNet-1K top-1 (official)."""
    return _build("debiformer_tiny", _TINY, pretrained, kwargs)


@register_model
def debiformer_small(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """DeBiFormer-S: 44.0 M parameters, 83.9 % ImageNet-1K top-1 (official)."""
    return _build("debiformer_small", _SMALL, pretrained, kwargs)


@register_model
def debiformer_base(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """DeBiFormer-B: 95.5 M parameters in the released code (its README says 77 M), 84.4 % top-1 (official)."""
    return _build("debiformer_base", _BASE, pretrained, kwargs)


@register_model
def debi_tiny(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """Official name of :func:`debiformer_tiny`."""
    return _build("debi_tiny", _TINY, pretrained, kwargs)


@register_model
def debi_small(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """Official name of :func:`debiformer_small`."""
    return _build("debi_small", _SMALL, pretrained, kwargs)


@register_model
def debi_base(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """Official name of :func:`debiformer_base`."""
    return _build("debi_base", _BASE, pretrained, kwargs)
