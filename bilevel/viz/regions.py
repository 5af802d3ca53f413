"""Regions and tokens of a feature map, drawn on the image the map came from.

A feature map of ``map_size = (H, W)`` tokens covers the whole image; token ``(y, x)`` covers the
pixels ``[y * image_h / H, (y + 1) * image_h / H)`` (and likewise for columns). Regions are
numbered row-major, as in :mod:`bilevel.ops.regions`. When the map was padded before the cut,
the last regions reach past the map: their boxes are clipped to the image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .images import to_uint8_image

__all__ = ["region_boxes", "token_boxes", "draw_region_grid", "highlight_regions", "draw_routes"]

Box = tuple[int, int, int, int]  # (top, left, bottom, right) in pixels, bottom/right exclusive


def region_boxes(image_size: tuple[int, int], map_size: tuple[int, int], region_grid: tuple[int, int],
                 region_size: Optional[tuple[int, int]] = None) -> list[Box]:
    """Pixel box of every region, row-major.

    image_size: (image_h, image_w) pixels; map_size: (H, W) tokens of the feature map
    region_grid: (Sh, Sw) regions; region_size: (h, w) tokens per region, default ceil(H / Sh), ceil(W / Sw)
    returns: Sh * Sw boxes (top, left, bottom, right), clipped to the image (a region lying wholly
    in the padding has an empty box).
    """
    (image_h, image_w), (map_h, map_w), (rows, cols) = image_size, map_size, region_grid
    if min(image_h, image_w, map_h, map_w, rows, cols) < 1:
        raise ValueError(f"image_size {image_size}, map_size {map_size} and region_grid {region_grid} must be positive")
    region_h, region_w = region_size or (-(-map_h // rows), -(-map_w // cols))

    def to_pixels(token: int, tokens: int, pixels: int) -> int:
        return round(min(token, tokens) * pixels / tokens)

    return [(to_pixels(r * region_h, map_h, image_h), to_pixels(c * region_w, map_w, image_w),
             to_pixels((r + 1) * region_h, map_h, image_h), to_pixels((c + 1) * region_w, map_w, image_w))
            for r in range(rows) for c in range(cols)]


def token_boxes(image_size: tuple[int, int], map_size: tuple[int, int]) -> list[Box]:
    """Pixel box of every token of an (H, W) map, row-major (a region grid of 1x1 regions)."""
    return region_boxes(image_size, map_size, map_size, (1, 1))


def draw_region_grid(image, boxes: Sequence[Box], color: tuple[int, int, int] = (255, 255, 255),
                     width: int = 1, labels: bool = False) -> np.ndarray:
    """Outline every box; with ``labels`` write each region's number in its top-left corner.

    image: anything :func:`to_uint8_image` accepts -> (image_h, image_w, 3) uint8
    """
    canvas = Image.fromarray(to_uint8_image(image))
    draw = ImageDraw.Draw(canvas)
    for number, (top, left, bottom, right) in enumerate(boxes):
        if bottom <= top or right <= left:
            continue
        draw.rectangle((left, top, right - 1, bottom - 1), outline=color, width=width)
        if labels:
            draw.text((left + 2, top + 1), str(number), fill=color)
    return np.asarray(canvas)


def highlight_regions(image, boxes: Sequence[Box], regions: Sequence[int],
                      color: tuple[int, int, int] = (255, 200, 0), alpha: float = 0.5) -> np.ndarray:
    """Blend ``color`` into the boxes of the chosen regions; every other pixel is left untouched.

    image: anything :func:`to_uint8_image` accepts; regions: indices into ``boxes``
    returns: (image_h, image_w, 3) uint8
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    canvas = to_uint8_image(image).copy()
    tint = np.asarray(color, dtype=np.float32)
    for region in regions:
        if not 0 <= int(region) < len(boxes):
            raise ValueError(f"region {int(region)} is out of range for {len(boxes)} boxes")
        top, left, bottom, right = boxes[int(region)]
        patch = canvas[top:bottom, left:right].astype(np.float32)
        canvas[top:bottom, left:right] = np.round((1 - alpha) * patch + alpha * tint).astype(np.uint8)
    return canvas


def draw_routes(image, boxes: Sequence[Box], query_region: int, routed_regions: Sequence[int],
                query_color: tuple[int, int, int] = (0, 160, 255), routed_color: tuple[int, int, int] = (255, 200, 0),
                alpha: float = 0.45, ranks: bool = True) -> np.ndarray:
    """The routing decision of one region: the query region in one colour, its routed regions in another.

    routed_regions: the query region's routed key regions, best first (a row of ``Routing.indices``);
    with ``ranks`` each routed region is numbered 1 (best) .. k.
    returns: (image_h, image_w, 3) uint8
    """
    canvas = highlight_regions(image, boxes, [int(r) for r in routed_regions], routed_color, alpha)
    canvas = highlight_regions(canvas, boxes, [int(query_region)], query_color, alpha)
    outlined = [boxes[int(r)] for r in routed_regions] + [boxes[int(query_region)]]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for (top, left, bottom, right), color in zip(outlined, [routed_color] * len(routed_regions) + [query_color]):
        draw.rectangle((left, top, right - 1, bottom - 1), outline=color, width=2)
    if ranks:
        for rank, region in enumerate(routed_regions, start=1):
            top, left, _, _ = boxes[int(region)]
            draw.text((left + 3, top + 2), str(rank), fill=(0, 0, 0))
    inside = np.zeros(canvas.shape[:2], dtype=bool)  # labels of small regions must not spill over
    for top, left, bottom, right in outlined:
        inside[top:bottom, left:right] = True
    return np.where(inside[..., None], np.asarray(picture), canvas)
