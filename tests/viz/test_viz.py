import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bilevel.ops import region_partition  # noqa: E402
from bilevel.viz import (draw_points, map_points_to_pixels, draw_region_grid, draw_routes, highlight_regions, load_sample_image,  # noqa: E402
                         overlay_heatmap, plot_affinity, region_boxes, region_values_to_map, to_uint8_image,
                         token_boxes)


def grey_image(height=70, width=56):
    return np.full((height, width, 3), 100, dtype=np.uint8)


def test_region_boxes_tile_the_image_row_major():
    boxes = region_boxes((70, 56), map_size=(14, 14), region_grid=(7, 7))
    assert len(boxes) == 49
    assert boxes[0] == (0, 0, 10, 8)
    assert boxes[1] == (0, 8, 10, 16)  # row-major: region 1 is right of region 0
    assert boxes[7] == (10, 0, 20, 8)
    cover = np.zeros((70, 56), dtype=int)
    for top, left, bottom, right in boxes:
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()


def test_region_boxes_of_a_padded_map_are_clipped_to_the_image():
    # a 5x5 map padded to 6x6 and cut into 3x3 regions of 2x2 tokens; the image is 50x50 pixels
    boxes = region_boxes((50, 50), map_size=(5, 5), region_grid=(3, 3), region_size=(2, 2))
    assert boxes[8] == (40, 40, 50, 50)
    assert boxes[0] == (0, 0, 20, 20)


def test_token_boxes_are_one_token_regions():
    assert token_boxes((8, 12), (2, 3)) == region_boxes((8, 12), (2, 3), (2, 3), (1, 1))
    assert token_boxes((8, 12), (2, 3))[5] == (4, 8, 8, 12)


def test_region_boxes_reject_empty_sizes():
    with pytest.raises(ValueError, match="region_grid"):
        region_boxes((10, 10), (4, 4), (0, 2))


def test_highlight_changes_exactly_the_chosen_boxes():
    image = grey_image()
    boxes = region_boxes(image.shape[:2], (14, 14), (7, 7))
    chosen = [3, 10, 48]
    out = highlight_regions(image, boxes, chosen, color=(255, 0, 0), alpha=0.5)
    inside = np.zeros(image.shape[:2], dtype=bool)
    for region in chosen:
        top, left, bottom, right = boxes[region]
        inside[top:bottom, left:right] = True
    changed = (out != image).any(axis=2)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (changed == inside).all()
    assert tuple(out[inside][0]) == (178, 50, 50)  # round(0.5 * 100 + 0.5 * 255), round(0.5 * 100)


def test_highlight_rejects_bad_region_and_alpha():
    image = grey_image()
    boxes = region_boxes(image.shape[:2], (14, 14), (7, 7))
    with pytest.raises(ValueError, match="out of range"):
        highlight_regions(image, boxes, [49])
    with pytest.raises(ValueError, match="alpha"):
        highlight_regions(image, boxes, [0], alpha=1.5)


def test_draw_routes_only_touches_query_and_routed_regions():
    image = grey_image()
    boxes = region_boxes(image.shape[:2], (14, 14), (7, 7))
    out = draw_routes(image, boxes, query_region=24, routed_regions=[0, 30])
    touched = np.zeros(image.shape[:2], dtype=bool)
    for region in (24, 0, 30):
        top, left, bottom, right = boxes[region]
        touched[top:bottom, left:right] = True
    changed = (out != image).any(axis=2)
    assert changed[~touched].sum() == 0
    assert changed[touched].all()


def test_region_grid_draws_lines_on_box_edges_only():
    image = grey_image()
    boxes = region_boxes(image.shape[:2], (14, 14), (7, 7))
    out = draw_region_grid(image, boxes, color=(255, 255, 255))
    assert (out[0, :] == 255).all() and (out[10, :] == 255).all()
    assert (out[5, 4] == 100).all()  # interior of region 0


def test_region_values_to_map_inverts_region_partition():
    torch.manual_seed(0)
    token_map = torch.randn(1, 6, 9, 1)
    regions = region_partition(token_map, (2, 3))[0, ..., 0]   # (6 regions, 9 tokens)
    assert np.allclose(region_values_to_map(regions, (2, 3), (3, 3)), token_map[0, ..., 0].numpy())
    per_region = region_values_to_map(torch.arange(6.0), (2, 3), (3, 3), map_size=(5, 8))
    assert per_region.shape == (5, 8)
    assert per_region[4, 7] == 5 and per_region[0, 3] == 1


def test_overlay_heatmap_leaves_nan_pixels_untouched():
    image = grey_image(40, 40)
    values = np.full((4, 4), np.nan)
    values[0, 0] = 1.0
    values[3, 3] = 0.0
    out = overlay_heatmap(image, values)
    changed = (out != image).any(axis=2)
    assert changed[:10, :10].all() and changed[30:, 30:].all()
    assert not changed[10:30].any()


def test_draw_points_puts_normalized_corners_on_corner_pixels():
    image = np.zeros((21, 31, 3), dtype=np.uint8)
    out = draw_points(image, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [3.0, 0.0]]), radius=0, color=(9, 9, 9))
    assert (out[0, 0] == 9).all() and (out[20, 30] == 9).all()
    assert (out != 0).any(axis=2).sum() == 2  # the third point lies outside


def test_plot_affinity_marks_topk():
    figure, ax = plt.subplots()
    logits = torch.randn(4, 4)
    shown = plot_affinity(ax, logits, indices=torch.topk(logits, 2).indices, highlight_rows=[1])
    assert shown.get_array().shape == (4, 4)
    assert len(ax.collections[0].get_offsets()) == 8
    plt.close(figure)


def test_images_convert_and_load():
    assert to_uint8_image(np.ones((3, 4))).shape == (3, 4, 3)
    assert to_uint8_image(np.ones((3, 4, 3)))[0, 0, 0] == 255
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(np.ones((3, 4, 5)))
    assert load_sample_image("chelsea", size=(60, 80)).shape == (60, 80, 3)
    with pytest.raises(ValueError, match="unknown sample image"):
        load_sample_image("lena")


def test_map_points_land_on_token_centres():
    # a 4x4 map over a 40x80 image: tokens are 10x20 pixel blocks; (y, x) = (-1, 1) is the top-right token
    pixels = map_points_to_pixels(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]), map_size=(4, 4), image_size=(40, 80))
    assert np.allclose(pixels, [[69.5, 4.5], [9.5, 34.5]])  # (x, y): centres of the corner blocks
    # positions on a map padded from 3x3 to 4x4: the padded last token lies outside the image
    padded = map_points_to_pixels(np.array([[1.0, 1.0]]), map_size=(3, 3), image_size=(30, 30), padded_map_size=(4, 4))
    assert np.allclose(padded, [[34.5, 34.5]])
    with pytest.raises(ValueError, match="pair"):
        map_points_to_pixels(np.zeros((2, 3)), (4, 4), (8, 8))
