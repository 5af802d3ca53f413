"""Cutting a feature map into a grid of regions and putting it back together.

Bi-level routing attention works on an ``Sh x Sw`` grid of regions. Regions are numbered
row-major (region ``p = r * Sw + c``) and the tokens inside a region are row-major too. Every
function here is layout-explicit: ``NHWC`` means (batch, height, width, channels).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "padding_to_multiple",
    "pad_to_multiple",
    "region_partition",
    "region_merge",
    "region_means",
    "ceil_region_means",
    "grid_for_region_size",
    "check_region_grid",
    "fit_to_region_grid",
]


def padding_to_multiple(size: int, multiple: int) -> int:
    """How many rows (or columns) to add so that ``size`` becomes a multiple of ``multiple``."""
    return (multiple - size % multiple) % multiple


def pad_to_multiple(x: Tensor, multiple: tuple[int, int], channels_last: bool = True) -> Tensor:
    """Zero-pad the bottom and right of a map so both sides are multiples of ``multiple``.

    x: (N, H, W, C) when ``channels_last`` else (N, C, H, W)
    returns: the same layout with H and W rounded up (the input itself when no padding is needed).
    """
    height, width = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    pad_bottom = padding_to_multiple(height, multiple[0])
    pad_right = padding_to_multiple(width, multiple[1])
    if pad_bottom == 0 and pad_right == 0:
        return x
    if channels_last:
        return F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
    return F.pad(x, (0, pad_right, 0, pad_bottom))


def region_partition(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Cut an NHWC map into a grid of equal regions.

    x: (N, H, W, C) with H divisible by grid[0] and W by grid[1]
    returns: (N, grid[0] * grid[1], (H / grid[0]) * (W / grid[1]), C), regions and the tokens
    inside each region in row-major order.
    """
    n, height, width, channels = x.shape
    rows, cols = grid
    if height % rows or width % cols:
        raise ValueError(
            f"a {height}x{width} map does not split into a {rows}x{cols} region grid; "
            "pad it first (pad_to_multiple)"
        )
    region_h, region_w = height // rows, width // cols
    x = x.reshape(n, rows, region_h, cols, region_w, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, rows * cols, region_h * region_w, channels)


def region_merge(regions: Tensor, grid: tuple[int, int], region_size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`region_partition`.

    regions: (N, grid[0] * grid[1], region_size[0] * region_size[1], C)
    returns: (N, grid[0] * region_size[0], grid[1] * region_size[1], C)
    """
    n, _, _, channels = regions.shape
    rows, cols = grid
    region_h, region_w = region_size
    x = regions.reshape(n, rows, cols, region_h, region_w, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, rows * region_h, cols * region_w, channels)


def region_means(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average every region of an NHWC map: the region descriptors routing compares.

    x: (N, H, W, C) with H, W divisible by the grid
    returns: (N, grid[0] * grid[1], C)
    """
    return region_partition(x, grid).mean(dim=2)


def ceil_region_means(x: Tensor, region_size: tuple[int, int]) -> Tensor:
    """Region means of an NCHW map cut into regions of a fixed size, the last ones partial.

    Averages only the real pixels of a partial region (``count_include_pad=False``), as the
    official NCHW BRA does with ``avg_pool2d(ceil_mode=True)``.
    x: (N, C, H, W)
    returns: (N, ceil(H / region_size[0]) * ceil(W / region_size[1]), C)
    """
    pooled = F.avg_pool2d(x, kernel_size=region_size, ceil_mode=True, count_include_pad=False)
    return pooled.flatten(2).transpose(1, 2)


def grid_for_region_size(size: tuple[int, int], region_size: tuple[int, int]) -> tuple[int, int]:
    """Number of regions along each side when ``size`` is cut into ``region_size`` tiles (ceil)."""
    return (-(-size[0] // region_size[0]), -(-size[1] // region_size[1]))



def check_region_grid(height: int, width: int, grid: tuple[int, int], what: str) -> None:
    """Raise a clear error when an unpadded map cannot be cut into ``grid`` regions."""
    if height % grid[0] or width % grid[1]:
        raise ValueError(
            f"{what}: a {height}x{width} map does not divide into {grid[0]}x{grid[1]} regions; "
            "build it with auto_pad=True (zero padding, as the official segmentation models do) "
            f"or give a size that is a multiple of {grid[0]}x{grid[1]}"
        )



def fit_to_region_grid(x: Tensor, grid: tuple[int, int], auto_pad: bool, what: str) -> Tensor:
    """Make an NHWC map divisible into ``grid`` regions: zero-pad it (auto_pad) or check that it is.

    x: (N, H, W, C) -> (N, Hp, Wp, C), padded bottom/right; raises ValueError naming ``what`` when
    the map does not divide and padding is off.
    """
    if auto_pad:
        return pad_to_multiple(x, grid)
    check_region_grid(x.shape[1], x.shape[2], grid, what)
    return x
