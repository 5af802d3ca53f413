"""Sampling points (e.g. DeBiFormer's deformed agent positions) drawn as dots on the image."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .images import to_uint8_image

__all__ = ["draw_points", "map_points_to_pixels"]


def map_points_to_pixels(points_yx, map_size: tuple[int, int], image_size: tuple[int, int],
                         padded_map_size: tuple[int, int] | None = None) -> np.ndarray:
    """Normalized (y, x) positions on a token map -> (x, y) pixel coordinates on the image.

    points_yx: (..., 2) in [-1, 1], align-corners convention of the (padded) map: -1 and 1 are the
    centres of its first and last tokens (how ``grid_sample(align_corners=True)`` and DBRA's
    recorded ``sampling_points`` read them).
    map_size: (H, W) tokens covering the image; padded_map_size: the map the positions refer to
    when it was padded bottom/right (default: map_size).
    returns: (P, 2) (x, y) pixel coordinates, token centres landing on the centres of their pixel blocks.
    """
    array = np.asarray(points_yx.detach().cpu() if hasattr(points_yx, "detach") else points_yx, dtype=np.float64)
    if array.shape[-1] != 2:
        raise ValueError(f"points_yx must end in a (y, x) pair, got shape {array.shape}")
    array = array.reshape(-1, 2)
    padded_h, padded_w = padded_map_size or map_size
    tokens = (array + 1.0) / 2.0 * np.array([padded_h - 1, padded_w - 1])          # (y, x) in tokens
    pixels = (tokens + 0.5) * np.array([image_size[0] / map_size[0], image_size[1] / map_size[1]]) - 0.5
    return pixels[:, ::-1].copy()


def draw_points(image, points, normalized: bool = True, color: tuple[int, int, int] = (255, 60, 60),
                radius: int = 2) -> np.ndarray:
    """Draw (x, y) points as filled dots.

    points: (P, 2) array or tensor of (x, y); with ``normalized`` they are in [-1, 1]
    (``grid_sample`` convention, align_corners=True: -1 and 1 are the centres of the edge pixels),
    else in pixels. Points outside the image are skipped; radius 0 draws single pixels.
    returns: (image_h, image_w, 3) uint8
    """
    canvas = Image.fromarray(to_uint8_image(image))
    array = np.asarray(points.detach().cpu() if hasattr(points, "detach") else points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"points must be (P, 2) (x, y) pairs, got shape {array.shape}")
    width, height = canvas.size
    if normalized:
        array = (array + 1.0) / 2.0 * np.array([width - 1, height - 1])
    draw = ImageDraw.Draw(canvas)
    for x, y in array:
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            continue
        if radius < 1:
            draw.point((round(x), round(y)), fill=color)
        else:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    return np.asarray(canvas)
