"""Class masks over the image: colours per class index, blending, the legend strip."""
import colorsys

import numpy as np
import pytest

from bilevel.viz import draw_mask_legend, mask_colours, mask_palette, overlay_mask


def test_colours_are_fixed_per_class_whatever_the_palette_size():
    few, many = mask_colours(5), mask_colours(150)
    assert np.array_equal(few, many[:5]) and not few[0].any()
    assert len({tuple(colour) for colour in many[1:]}) > 140, "classes need distinguishable colours"
    assert mask_palette(4) == few[:4].ravel().tolist()


def hue_degrees(colour) -> float:
    return 360 * colorsys.rgb_to_hsv(*(np.asarray(colour, float) / 255))[0]


def test_the_first_classes_are_saturated_with_clearly_distinct_hues():
    """A legend can be matched by hue: background black, then tab10's colours (no two greyish blues)."""
    colours = mask_colours(10)
    assert not colours[0].any()
    assert all(colorsys.rgb_to_hsv(*(colour / 255))[1] > 0.4 for colour in colours[1:])
    hues = sorted(hue_degrees(colour) for colour in colours[1:6])
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() > 25, f"hues of classes 1-5 too close: {hues}"


@pytest.mark.parametrize("beneath", [(240, 220, 30), (30, 60, 200), (250, 250, 250), (10, 10, 10)])
def test_overlay_keeps_the_class_hue_whatever_lies_beneath(beneath):
    """The image is greyed under the colours, so the drawn class has its legend swatch's hue."""
    image = np.full((2, 2, 3), beneath, np.uint8)
    for index in (1, 2, 3):
        blended = overlay_mask(image, np.full((2, 2), index), num_classes=5)
        assert abs(hue_degrees(blended[0, 0]) - hue_degrees(mask_colours(5)[index])) < 4, (index, blended[0, 0])


def test_overlay_blends_each_pixel_towards_its_class_colour():
    image = np.full((4, 6, 3), 200, np.uint8)
    mask = np.zeros((4, 6), np.int64)
    mask[:, 3:] = 2
    blended = overlay_mask(image, mask, alpha=0.5, num_classes=3)
    colours = mask_colours(3).astype(float)
    assert np.array_equal(blended[0, 0], np.round(100 + colours[0] / 2).astype(np.uint8))
    assert np.array_equal(blended[3, 5], np.round(100 + colours[2] / 2).astype(np.uint8))


def test_a_smaller_mask_is_stretched_to_the_image_by_nearest_class():
    mask = np.array([[0, 1], [1, 0]])
    blended = overlay_mask(np.zeros((40, 40, 3), np.uint8), mask, alpha=1.0)
    colours = mask_colours(2)
    assert np.array_equal(blended[5, 30], colours[1]) and np.array_equal(blended[30, 30], colours[0])
    with pytest.raises(ValueError, match="mask must be"):
        overlay_mask(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4)))


def test_legend_strip_below_the_image_shows_each_class_swatch():
    image = np.full((50, 300, 3), 128, np.uint8)
    drawn = draw_mask_legend(image, [(3, "road 60%"), (7, "car 40%")], num_classes=10)
    assert drawn.shape[1] == 300 and drawn.shape[0] > 50 and np.array_equal(drawn[:50], image)
    strip = drawn[50:].reshape(-1, 3)
    for index in (3, 7):
        assert (strip == mask_colours(10)[index]).all(axis=1).sum() > 20, f"no swatch of class {index}"
    assert not (strip == mask_colours(10)[5]).all(axis=1).any(), "a class not listed has no swatch"
