"""Decode heads for semantic segmentation, in plain PyTorch: Semantic FPN and UPerNet.

Both take the backbone's four stage maps [(N, C_i, H/s_i, W/s_i)] with strides (4, 8, 16, 32) and return
class logits (N, num_classes, H/4, W/4); the task upsamples them to the input size.
- Semantic FPN (Kirillov et al., Panoptic FPN): lateral 1x1 convs + top-down sum, 3x3 output convs, then per
  level a stack of (3x3 conv, norm, ReLU, 2x upsample) down to stride 4, summed, 1x1 classifier.
- UPerNet (Xiao et al.): a pyramid pooling module on the last map, an FPN over all four, the four FPN
  outputs upsampled to stride 4, concatenated and fused by a 3x3 conv, 1x1 classifier.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvNormAct", "SemanticFPNHead", "UPerNetHead", "HEADS", "create_head"]


class ConvNormAct(nn.Sequential):
    """k x k conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _top_down(laterals: list[Tensor]) -> list[Tensor]:
    """FPN top-down pathway: each level plus the upsampled coarser level (coarsest last)."""
    merged = list(laterals)
    for level in range(len(merged) - 2, -1, -1):
        merged[level] = merged[level] + _resize(merged[level + 1], merged[level].shape[-2:])
    return merged


class SemanticFPNHead(nn.Module):
    """Semantic FPN: features [(N, C_i, H_i, W_i)] x 4 -> logits (N, num_classes, H_0, W_0)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 head_channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in in_channels)
        # level i needs i upsampling steps to reach the finest level (at least one conv for level 0)
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(ConvNormAct(fpn_channels if step == 0 else head_channels, head_channels)
                          for step in range(max(level, 1)))
            for level in range(len(in_channels)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        pyramid = _top_down([conv(x) for conv, x in zip(self.lateral, features)])
        pyramid = [conv(x) for conv, x in zip(self.output, pyramid)]
        size = pyramid[0].shape[-2:]
        fused = None
        for level, (x, steps) in enumerate(zip(pyramid, self.scale_heads)):
            for step in steps:
                x = step(x)
                if level > 0:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = _resize(x, size) if x.shape[-2:] != size else x
            fused = x if fused is None else fused + x
        return self.classifier(self.dropout(fused))


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: (N, C, H, W) -> (N, C + len(scales) * channels, H, W)."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels, channels, 1))
                                      for scale in scales)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] + [_resize(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


class UPerNetHead(nn.Module):
    """UPerNet: features [(N, C_i, H_i, W_i)] x 4 -> logits (N, num_classes, H_0, W_0)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.output = nn.ModuleList(ConvNormAct(channels, channels) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral, features[:-1])]
        laterals.append(self.ppm_bottleneck(self.ppm(features[-1])))
        merged = _top_down(laterals)
        outputs = [conv(x) for conv, x in zip(self.output, merged[:-1])] + [merged[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([outputs[0]] + [_resize(x, size) for x in outputs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


#: head name (as in configs) -> class
HEADS = {"fpn": SemanticFPNHead, "upernet": UPerNetHead}


def create_head(name: str, in_channels: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build a decode head by name ("fpn" or "upernet")."""
    if name not in HEADS:
        raise ValueError(f"unknown decode head {name!r}; available: {sorted(HEADS)}")
    return HEADS[name](list(in_channels), num_classes, **kwargs)
