"""CrossFormer: a vision transformer with cross-scale embedding and long-short distance attention.

Wang et al., "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention"
(ICLR 2022). Checkpoint-compatible with the official code (``cheerss/CrossFormer``): state-dict
keys, shapes and numerics follow ``ARCHITECTURES.md`` §3, and the released (v1) checkpoints,
which carry two extra tables per attention, load with ``strict=True`` (the tables are dropped).

* Cross-scale embedding (CEL): four convs of kernel 4, 8, 16, 32 at stride 4, concatenated.
* Blocks alternate SDA and LDA (``bilevel.ops.lsda``) with a dynamic position bias.
* Patch merging: LayerNorm, then convs of kernel 2 and 4 at stride 2, concatenated.

Stages. The official ``layers.{i}`` hold the blocks of stage i *then* the merging into stage i+1.
Here stage i runs ``layers.{i-1}.downsample`` (for i > 0) then ``layers.{i}.blocks`` so that stage
outputs are the standard pyramid features (strides 4, 8, 16, 32); the state-dict keys are the
official ones. Maps travel between stages as NHWC ``(N, H, W, C)``.

Input sizes. The official model fixes ``img_size`` (square, a multiple of 32) at construction and
derives every stage's grouping from it. Here the same rules are applied to the size seen at run
time (group size, SDA fallback for small maps, interval, padding and masks; cached by size), which
gives identical results when the input has the ``img_size`` the official model was built for, and
lets any size of at least 32 px run: non-square maps, and odd maps, which patch merging pads by one
zero row/column (after its LayerNorm) to an even size. ``img_size`` (an int, or (height, width))
still sets ``pretrained_cfg["input_size"]`` and the shapes of the v1 checkpoint tables.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ..ops.linear import FusedLinear
from ..ops.lsda import V1_BUFFER_NAMES, GroupAttention, GroupLayout, attend_in_groups, padded_key_bias, plan_groups
from ..ops.regions import pad_to_multiple
from ._pyramid import PyramidBackbone, build_pyramid, imagenet_cfg

__all__ = ["CrossFormer", "CrossFormerBlock", "CrossScaleEmbedding", "PatchMerging"]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def _split_widths(total: int, num_kernels: int) -> list[int]:
    """Channels per kernel of a cross-scale layer: total/2, total/4, ..., the last two equal."""
    widths = [total // 2 ** (i + 1) for i in range(num_kernels - 1)]
    return widths + [total // 2 ** (num_kernels - 1)]


class CrossScaleEmbedding(nn.Module):
    """Cross-scale embedding layer (``patch_embed``): (N, in_chans, H, W) -> (N, H/4, W/4, embed_dim).

    One conv per kernel size (4, 8, 16, 32), all at stride ``kernel_sizes[0]`` with padding
    (k - stride) / 2 so they see the same centres; channels embed/2, /4, /8, /8, concatenated in
    kernel order, then LayerNorm.
    """

    def __init__(self, kernel_sizes: Sequence[int] = (4, 8, 16, 32), in_chans: int = 3, embed_dim: int = 96,
                 patch_norm: bool = True):
        super().__init__()
        stride = kernel_sizes[0]
        self.projs = nn.ModuleList(
            nn.Conv2d(in_chans, width, kernel_size=k, stride=stride, padding=(k - stride) // 2)
            for k, width in zip(kernel_sizes, _split_widths(embed_dim, len(kernel_sizes))))
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.cat([proj(x) for proj in self.projs], dim=1).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Cross-scale patch merging: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 2C).

    LayerNorm, then one stride-2 conv per kernel size (2, 4; padding (k - 2) / 2), channels
    C and C, concatenated. An odd side is padded with one zero row/column after the norm (the
    official code requires even sides).
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (2, 4)):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reductions = nn.ModuleList(
            nn.Conv2d(dim, width, kernel_size=k, stride=2, padding=(k - 2) // 2)
            for k, width in zip(kernel_sizes, _split_widths(2 * dim, len(kernel_sizes))))

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(self.norm(x), (2, 2)).permute(0, 3, 1, 2)
        return torch.cat([reduce(x) for reduce in self.reductions], dim=1).permute(0, 2, 3, 1)


def _token_mlp(dim: int, hidden: int, drop: float) -> Mlp:
    """timm's ``Mlp`` (keys ``fc1``, ``fc2``) with :class:`FusedLinear` layers; fc1 applies the GELU (one pass
    in CPU inference) and ``act`` is an ``nn.Identity``."""
    mlp = Mlp(dim, hidden, drop=drop)
    mlp.fc1, mlp.act, mlp.fc2 = FusedLinear(dim, hidden, activation="gelu"), nn.Identity(), FusedLinear(hidden, dim)
    return mlp


class CrossFormerBlock(nn.Module):
    """Pre-norm LSDA + MLP: (N, H, W, C) -> (N, H, W, C).

    long_distance: LDA (True) or SDA (False) block; group_size, interval: G and I of the stage.
    nominal_size: the stage map size of the official model built for ``img_size``; it fixes the
    group size of the attention's v1 tables only, the grouping follows the run-time size.
    """

    #: padding masks kept per block (one per map size and device) before the cache starts over
    max_cached_sizes = 8

    def __init__(self, dim: int, num_heads: int, group_size: int = 7, interval: int = 8,
                 long_distance: bool = False, nominal_size: tuple[int, int] = (56, 56), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.group_size, self.interval, self.long_distance = group_size, interval, long_distance
        nominal = plan_groups(nominal_size, group_size, interval, long_distance)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupAttention(dim, group_size=nominal.group_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                   qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _token_mlp(dim, int(dim * mlp_ratio), proj_drop)
        self._key_bias_cache: dict[tuple, Optional[Tensor]] = {}

    def layout(self, map_size: tuple[int, int]) -> GroupLayout:
        """The grouping this block applies to a map of ``map_size``."""
        return plan_groups(map_size, self.group_size, self.interval, self.long_distance)

    def _key_bias(self, layout: GroupLayout, device: torch.device) -> Optional[Tensor]:
        if torch.compiler.is_compiling():
            return padded_key_bias(layout, device)
        key = (layout, device)
        if key not in self._key_bias_cache:
            if len(self._key_bias_cache) >= self.max_cached_sizes:
                self._key_bias_cache.clear()
            self._key_bias_cache[key] = padded_key_bias(layout, device)
        return self._key_bias_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        layout = self.layout((x.shape[1], x.shape[2]))
        x = x + self.drop_path(attend_in_groups(self.norm1(x), self.attn, layout, self._key_bias(layout, x.device)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        kind = "LDA" if self.long_distance else "SDA"
        return f"{kind}, group_size={self.group_size}, interval={self.interval}"


class CrossFormerStage(nn.Module):
    """``layers.{i}``: the blocks of stage i and the merging into stage i+1 (None for the last)."""

    def __init__(self, blocks: Sequence[CrossFormerBlock], downsample: Optional[PatchMerging]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def _image_size(img_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    """``img_size`` as (height, width), from an int (square) or a pair."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(side, int) for side in size):
        raise ValueError(f"CrossFormer: img_size must be an int or (height, width), got {img_size!r}")
    return size


class CrossFormer(PyramidBackbone):
    """CrossFormer (official constructor arguments, see ``ARCHITECTURES.md`` §3).

    img_size: int or (height, width); the official models are square.
    """

    #: final features are (N, H, W, C) tokens
    feature_fmt = "NHWC"

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: Sequence[int] = (4, 8, 16, 32),
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), group_size: Sequence[int] = (7, 7, 7, 7),
                 crs_interval: Sequence[int] = (8, 4, 2, 1), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, patch_norm: bool = True,
                 merge_size: Sequence[Sequence[int]] = ((2, 4), (2, 4), (2, 4)), global_pool: str = "avg"):
        super().__init__()
        if len(depths) != self.num_stages:
            raise ValueError(f"CrossFormer has {self.num_stages} stages; depths={tuple(depths)}")
        height, width = _image_size(img_size)
        if min(height, width) < self.min_input_size:
            raise ValueError(f"CrossFormer: img_size={img_size} is below the smallest input, {self.min_input_size} px")
        self.in_chans = in_chans
        self.img_size = (height, width)
        dims = [embed_dim * 2 ** i for i in range(self.num_stages)]
        self.patch_embed = CrossScaleEmbedding(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            nominal_size = (height // patch_size[0] // 2 ** i, width // patch_size[0] // 2 ** i)
            blocks = [CrossFormerBlock(dims[i], num_heads[i], group_size[i], crs_interval[i], long_distance=j % 2 == 1,
                                       nominal_size=nominal_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                       qk_scale=qk_scale, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                       drop_path=rates[sum(depths[:i]) + j])
                      for j in range(depth)]
            downsample = PatchMerging(dims[i], merge_size[i]) if i < self.num_stages - 1 else None
            self.layers.append(CrossFormerStage(blocks, downsample))
        self.norm = nn.LayerNorm(dims[-1])
        self.init_classifier(dims[-1], num_classes, drop_rate, global_pool,
                             [dict(num_chs=dim, reduction=patch_size[0] * 2 ** i, module=f"layers.{i}.blocks")
                              for i, dim in enumerate(dims)])

    def run_stage(self, index: int, x: Tensor) -> Tensor:
        """Stage 0: (N, 3, H, W) image -> (N, H/4, W/4, C0); stage i > 0: merge, then the blocks.

        returns: (N, H_i, W_i, C_i) NHWC, taken before the merging into the next stage.
        """
        if index == 0:
            x = self.pos_drop(self.patch_embed(x))
        else:
            x = self.layers[index - 1].downsample(x)
        return self.layers[index].blocks(x)

    def stage_to_nchw(self, index: int, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2).contiguous()

    def stage_containers(self) -> list[nn.ModuleList]:
        return [self.layers]

    def truncate_stages(self, count: int) -> None:
        """Keep stages 0..count-1, without the merging that fed the first dropped stage."""
        super().truncate_stages(count)
        self.layers[count - 1].downsample = None

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Drop the per-attention tables that released (v1) checkpoints carry (recomputed here)."""
        suffixes = tuple(f".attn.{name}" for name in V1_BUFFER_NAMES)
        return {key: value for key, value in state_dict.items() if not key.endswith(suffixes)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (for layer-wise lr decay): embedding, then stages/blocks."""
        return dict(stem=r"^patch_embed",
                    blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)\.downsample", (99998,)),
                                                             (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                                                             (r"^norm", (99999,))])


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------

#: every conv of the cross-scale embedding takes the image
_cfg = partial(imagenet_cfg, tuple(f"patch_embed.projs.{i}" for i in range(4)), paper_ids="arXiv:2108.00154",
               origin_url="https://github.com/cheerss/CrossFormer")


default_cfgs = generate_default_cfgs({
    "crossformer_tiny.in1k": _cfg(),
    "crossformer_small.in1k": _cfg(),
    "crossformer_base.in1k": _cfg(),
    "crossformer_large.in1k": _cfg(),
})


def _build(variant: str, pretrained: bool, kwargs: dict, **args) -> CrossFormer:
    """Build a variant; ``img_size`` other than 224 goes into ``pretrained_cfg`` (under the caller's overlay)."""
    height, width = _image_size(kwargs.get("img_size", 224))
    if (height, width) != (224, 224):
        final_map = tuple(-(-(side // 4) // 8) for side in (height, width))   # stride 4, then three ceil halvings
        size_cfg = dict(input_size=(3, height, width), pool_size=final_map)
        kwargs["pretrained_cfg_overlay"] = {**size_cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build_pyramid(CrossFormer, variant, pretrained, **dict(args, **kwargs))


@register_model
def crossformer_tiny(pretrained: bool = False, **kwargs) -> CrossFormer:
    """CrossFormer-T: 27.8 M parameters."""
    return _build("crossformer_tiny", pretrained, kwargs, embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))


@register_model
def crossformer_small(pretrained: bool = False, **kwargs) -> CrossFormer:
    """CrossFormer-S: 30.7 M parameters."""
    return _build("crossformer_small", pretrained, kwargs, embed_dim=96, depths=(2, 2, 6, 2),
                  num_heads=(3, 6, 12, 24))


@register_model
def crossformer_base(pretrained: bool = False, **kwargs) -> CrossFormer:
    """CrossFormer-B: 52.0 M parameters."""
    return _build("crossformer_base", pretrained, kwargs, embed_dim=96, depths=(2, 2, 18, 2),
                  num_heads=(3, 6, 12, 24))


@register_model
def crossformer_large(pretrained: bool = False, **kwargs) -> CrossFormer:
    """CrossFormer-L: 92.0 M parameters."""
    return _build("crossformer_large", pretrained, kwargs, embed_dim=128, depths=(2, 2, 18, 2),
                  num_heads=(4, 8, 16, 32))
