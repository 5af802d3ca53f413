"""Values drawn as colour: token or region scores over the image, and the region affinity matrix."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .images import to_uint8_image

__all__ = ["region_values_to_map", "overlay_heatmap", "plot_affinity"]


def region_values_to_map(values, region_grid: tuple[int, int], region_size: tuple[int, int],
                         map_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Spread per-region values (or per-token values grouped by region) over the token map.

    values: (Sh * Sw,) one value per region, or (Sh * Sw, h * w) one per token in region order
    returns: (H, W) float array, cropped to ``map_size`` when the map was padded
    """
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float32)
    (rows, cols), (region_h, region_w) = region_grid, region_size
    if array.shape[0] != rows * cols:
        raise ValueError(f"values has {array.shape[0]} regions but the grid {region_grid} has {rows * cols}")
    if array.ndim == 1:
        array = np.repeat(array[:, None], region_h * region_w, axis=1)
    if array.shape[1] != region_h * region_w:
        raise ValueError(f"values has {array.shape[1]} tokens per region but region_size {region_size} "
                         f"has {region_h * region_w}")
    grid = array.reshape(rows, cols, region_h, region_w).transpose(0, 2, 1, 3).reshape(rows * region_h, cols * region_w)
    if map_size is not None:
        grid = grid[: map_size[0], : map_size[1]]
    return grid


def overlay_heatmap(image, values, alpha: float = 0.6, cmap: str = "magma",
                    value_range: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Colour a (H, W) map of values and blend it over the image (nearest-neighbour upsampling).

    values: (H, W) array or tensor covering the whole image; NaN leaves the pixels untouched
    value_range: (low, high) for the colour scale, default the finite min and max
    returns: (image_h, image_w, 3) uint8
    """
    base = to_uint8_image(image)
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"values must be a (H, W) map, got shape {array.shape}")
    finite = np.isfinite(array)
    if not finite.any():
        return base.copy()
    low, high = value_range or (float(array[finite].min()), float(array[finite].max()))
    normalized = np.clip((array - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    colors = colormaps[cmap](np.where(finite, normalized, 0.0))[..., :3]
    size = (base.shape[1], base.shape[0])
    colors = np.asarray(Image.fromarray(np.round(colors * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
    mask = np.asarray(Image.fromarray(finite.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)).astype(bool)
    blended = base.astype(np.float32)
    blended[mask] = (1 - alpha) * blended[mask] + alpha * colors[mask]
    return np.round(blended).astype(np.uint8)


def plot_affinity(ax, logits, indices=None, highlight_rows: Sequence[int] = (), cmap: str = "viridis"):
    """Draw a region affinity matrix (rows: query regions, columns: key regions).

    logits: (R, R) affinity; indices: optional (R, topk) routed regions, marked with dots;
    highlight_rows: query regions whose rows get a frame. Returns the matplotlib image (for a colorbar).
    """
    matrix = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"logits must be (R, R) for one image, got shape {matrix.shape}")
    shown = ax.imshow(matrix, cmap=cmap, interpolation="nearest")
    if indices is not None:
        routed = np.asarray(indices.detach().cpu() if hasattr(indices, "detach") else indices)
        rows = np.repeat(np.arange(routed.shape[0]), routed.shape[1])
        ax.scatter(routed.reshape(-1), rows, s=6, c="red", marker="o", linewidths=0)
    for row in highlight_rows:
        ax.add_patch(_row_frame(row, matrix.shape[1]))
    ax.set_xlabel("key region")
    ax.set_ylabel("query region")
    return shown


def _row_frame(row: int, width: int):
    from matplotlib.patches import Rectangle
    return Rectangle((-0.5, row - 0.5), width, 1, fill=False, edgecolor="white", linewidth=1.5)
