"""Drawing what bi-level routing attention does, on top of the input image.

Pure functions on numpy arrays (uint8 RGB images, H x W x 3) and matplotlib axes, shared by the
notebooks and the Gradio app. Nothing here runs a model: feed them a :class:`bilevel.ops.RoutingRecord`'s
fields (map size, region grid, region size, indices, logits) or tensors you computed yourself.

images   - sample photos and conversions to uint8 RGB
regions  - pixel boxes of regions/tokens, the region grid, highlighted and routed regions
heatmaps - per-token or per-region values as colour overlays; the region affinity matrix
points   - sampling points (e.g. DeBiFormer's deformed agents) as dots
masks    - class masks (segmentation) as colours over the image, with a legend
"""
from .heatmaps import overlay_heatmap, plot_affinity, region_values_to_map
from .images import load_sample_image, to_uint8_image
from .masks import draw_mask_legend, mask_colours, mask_palette, overlay_mask
from .points import draw_points, map_points_to_pixels
from .regions import draw_region_grid, draw_routes, highlight_regions, region_boxes, token_boxes

__all__ = [
    "overlay_heatmap", "plot_affinity", "region_values_to_map", "load_sample_image", "to_uint8_image",
    "draw_mask_legend", "mask_colours", "mask_palette", "overlay_mask",
    "draw_points", "map_points_to_pixels", "draw_region_grid", "draw_routes", "highlight_regions", "region_boxes", "token_boxes",
]
