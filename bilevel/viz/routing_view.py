"""The app's routing view: pick a query region by a point on the image, draw its routed regions.

Works on the :class:`bilevel.ops.RoutingRecord` list of one forward pass (batch of one):

    layers = routing_layers(records)                        # {(stage, block): record} of routing modules
    region = region_at((0.5, 0.5), layers[0, 0])            # the region under the image centre
    routes, heat = draw_routing(image, layers[0, 0], region)

For DBRA records the query region's deformed sampling points are dotted; for LSDA records (CrossFormer,
no routing) the SDA/LDA group of the clicked token is highlighted instead.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import numpy as np

from ..ops.recording import RoutingRecord
from .heatmaps import overlay_heatmap, region_values_to_map
from .images import to_uint8_image
from .points import draw_points, map_points_to_pixels
from .regions import draw_region_grid, draw_routes, highlight_regions, region_boxes, token_boxes

__all__ = ["routing_layers", "layer_position", "region_at", "token_at", "routed_regions", "lsda_group",
           "draw_routing", "draw_lsda_group"]

_POSITION = re.compile(r"(?:stages|layers)\.(\d+)\.(?:blocks\.)?(\d+)")
_DRAWN_KINDS = ("bra", "nchw_bra", "dbra", "lsda")


def layer_position(module: str) -> Optional[tuple[int, int]]:
    """(stage, block) of a qualified module name such as ``stages.1.0.attn``; None when it has none."""
    match = _POSITION.search(module)
    return (int(match.group(1)), int(match.group(2))) if match else None


def routing_layers(records: Iterable[RoutingRecord]) -> dict[tuple[int, int], RoutingRecord]:
    """The drawable records by (stage, layer), in stage/layer order.

    layer: the attention calls of a stage numbered in block order, so a block with two attention
    modules (DeBiFormer's BRA then DBRA) gives two layers. Records whose module name has no stage/block
    (a bare operator) count as stage 0 in call order. Kinds this view cannot draw are left out.
    """
    drawable = [(layer_position(record.module) or (0, order), record.module, record)
                for order, record in enumerate(r for r in records if r.kind in _DRAWN_KINDS)]
    layers: dict[tuple[int, int], RoutingRecord] = {}
    for (stage, _), _, record in sorted(drawable, key=lambda item: item[:2]):
        layers[stage, sum(1 for s, _ in layers if s == stage)] = record
    return layers


def token_at(point: tuple[float, float], map_size: tuple[int, int]) -> tuple[int, int]:
    """The (row, column) token under ``point`` = (x, y) as fractions of the image width and height."""
    x, y = (min(max(float(value), 0.0), 1.0) for value in point)
    height, width = map_size
    return min(int(y * height), height - 1), min(int(x * width), width - 1)


def region_at(point: tuple[float, float], record: RoutingRecord) -> int:
    """The row-major index of the region under ``point`` = (x, y) as fractions of the image size."""
    row, column = token_at(point, record.map_size)
    region_h, region_w = record.region_size
    return (row // region_h) * record.region_grid[1] + column // region_w


def routed_regions(record: RoutingRecord, region: int) -> list[int]:
    """The key regions ``region`` routes to, best first (record of a batch of one)."""
    regions = record.region_grid[0] * record.region_grid[1]
    if not 0 <= region < regions:
        raise ValueError(f"region {region} is out of range for a {record.region_grid} grid")
    return [int(index) for index in record.indices[0, region].tolist()]


def _region_points(record: RoutingRecord, region: int) -> np.ndarray:
    """DBRA sampling points of the deformed tokens in ``region``: (P, 2) normalised (y, x), all groups.

    The deformed tokens are cut into the same region grid as the map (``deformed_region_size`` tokens
    each, on the deformed grid padded to a multiple of the grid); regions lying in that padding have none.
    """
    points = record.extras["sampling_points"][0]                            # (groups, Hs, Ws, 2) (y, x)
    per_h, per_w = record.extras["deformed_region_size"]
    row, col = divmod(region, record.region_grid[1])
    return np.asarray(points[:, row * per_h:(row + 1) * per_h, col * per_w:(col + 1) * per_w].reshape(-1, 2))


def draw_routing(image, record: RoutingRecord, region: int) -> tuple[np.ndarray, np.ndarray]:
    """The routing decision of ``region`` drawn on ``image``.

    image: (H, W, 3) uint8 (or anything :func:`to_uint8_image` reads), the picture the record came from
    returns: (routes, heat): the region grid with the query region and its routed regions (ranked), and
    the query region's affinity row to every region as a heat map over the image; both (H, W, 3) uint8.
    For DBRA records the query region's deformed sampling points are dotted on ``routes``.
    """
    picture = to_uint8_image(image)
    size = picture.shape[:2]
    boxes = region_boxes(size, record.map_size, record.region_grid, record.region_size)
    routes = draw_routes(draw_region_grid(picture, boxes, color=(235, 235, 235)), boxes, region,
                         routed_regions(record, region))
    if record.kind == "dbra" and "sampling_points" in record.extras:
        pixels = map_points_to_pixels(_region_points(record, region), record.map_size, size,
                                      record.extras.get("padded_map_size"))
        routes = draw_points(routes, pixels, normalized=False, color=(230, 30, 200), radius=3)
    affinity = region_values_to_map(record.logits[0, region], record.region_grid, record.region_size,
                                    record.map_size)
    heat = draw_region_grid(overlay_heatmap(picture, affinity, alpha=0.65), [boxes[region]], color=(0, 160, 255),
                            width=3)
    return routes, heat


def lsda_group(record: RoutingRecord, token: tuple[int, int]) -> list[int]:
    """The tokens (row-major indices into the unpadded map) sharing a CrossFormer group with ``token``.

    With group size G and interval I (1 for SDA), the padded map is cut into G*I x G*I blocks; a group
    holds the G x G tokens of one block that lie I apart (SDA: adjacent tokens; LDA: dilated), the
    layout of :func:`bilevel.ops.lsda.group_tokens`.
    """
    height, width = record.map_size
    size, interval = int(record.extras["group_size"]), int(record.extras["interval"])
    span = size * interval

    def members(index: int, limit: int) -> list[int]:
        first = index // span * span + index % interval
        return [first + step * interval for step in range(size) if first + step * interval < limit]

    row, col = token
    return [r * width + c for r in members(row, height) for c in members(col, width)]


def draw_lsda_group(image, record: RoutingRecord, point: tuple[float, float]) -> np.ndarray:
    """The CrossFormer group (SDA or LDA) of the token under ``point`` (fractions of the image size).

    returns: (H, W, 3) uint8 with the group's tokens tinted and the clicked token in another colour.
    """
    picture = to_uint8_image(image)
    boxes = token_boxes(picture.shape[:2], record.map_size)
    token = token_at(point, record.map_size)
    grouped = highlight_regions(picture, boxes, lsda_group(record, token), color=(255, 200, 0), alpha=0.55)
    return highlight_regions(grouped, boxes, [token[0] * record.map_size[1] + token[1]], color=(0, 160, 255),
                             alpha=0.8)
