"""Class masks (semantic segmentation) as colours over the image, with a legend."""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import to_uint8_image

__all__ = ["mask_palette", "mask_colours", "overlay_mask", "draw_mask_legend"]


#: the colours of classes 1-18: Matplotlib's tab10 without its grey, then tab20's lighter partners of those hues
_QUALITATIVE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (188, 189, 34), (23, 190, 207),
                (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
                (247, 182, 210), (219, 219, 141), (158, 218, 229))
#: the colour of class 0, the background of most segmentation datasets
_BACKGROUND = (0, 0, 0)
#: the share of a class colour in an overlay pixel
MASK_OPACITY = 0.7


def mask_palette(num_colours: int = 256) -> list[int]:
    """A fixed palette (flat RGB list, as ``PIL.Image.putpalette`` takes) with distinct colours; 0 is black."""
    return mask_colours(num_colours).ravel().tolist()


def _spread_colour(index: int) -> tuple[int, int, int]:
    """A colour for a class past the qualitative ones: hues spread by the golden ratio, in four shades."""
    hue = index * 0.618033988749895 % 1.0
    saturation, value = 0.9 - 0.35 * (index % 2), 0.95 - 0.25 * (index // 2 % 2)
    return tuple(round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value))


def mask_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colour of each class index, the same in every picture: class 0 black, the next 18
    clearly distinct hues (tab10, then tab20's lighter ones), any further class a hue of its own."""
    colours = [_BACKGROUND, *_QUALITATIVE][:max(num_classes, 1)]
    colours += [_spread_colour(index) for index in range(len(colours), num_classes)]
    return np.array(colours, dtype=np.uint8)


def overlay_mask(image, mask: np.ndarray, alpha: float = MASK_OPACITY, num_classes: Optional[int] = None) -> np.ndarray:
    """Class colours over the image in grey: image (H, W, 3) and mask (h, w) of class indices -> (H, W, 3) uint8.

    The image is greyed first, so that every class keeps its colour's hue (its legend swatch's) whatever lies
    beneath. A mask of another size is resized (nearest) to the image. num_classes: palette size (default: mask
    max + 1).
    """
    image = to_uint8_image(image)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W) class indices, got shape {mask.shape}")
    if mask.shape != image.shape[:2]:
        resized = Image.fromarray(mask.astype(np.int32)).resize(image.shape[1::-1], Image.Resampling.NEAREST)
        mask = np.asarray(resized)
    grey = np.asarray(Image.fromarray(image).convert("L"), dtype=np.float32)[..., None]
    colours = mask_colours(num_classes or int(mask.max()) + 1)
    coloured = colours[np.clip(mask, 0, len(colours) - 1)].astype(np.float32)
    return np.round(grey * (1 - alpha) + coloured * alpha).astype(np.uint8)


def draw_mask_legend(image, entries: Sequence[tuple[int, str]], num_classes: int, row_height: int = 18) -> np.ndarray:
    """The image with a legend strip below it: a colour swatch and a label per (class index, label) entry.

    image: (H, W, 3); returns (H + legend height, W, 3) uint8. Entries wrap into as many columns as fit.
    """
    image = to_uint8_image(image)
    height, width = image.shape[:2]
    colours = mask_colours(num_classes)
    font = ImageFont.load_default(size=row_height - 5)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = max([int(measure.textlength(label, font=font)) for _, label in entries] + [0]) + row_height + 16
    columns = max(1, width // cell)
    rows = -(-len(entries) // columns)
    legend = Image.new("RGB", (width, rows * row_height + 6), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for position, (index, label) in enumerate(entries):
        left, top = (position % columns) * cell + 4, (position // columns) * row_height + 3
        swatch = tuple(int(c) for c in colours[min(index, len(colours) - 1)])
        draw.rectangle((left, top + 2, left + row_height - 6, top + row_height - 4), fill=swatch, outline=(0, 0, 0))
        draw.text((left + row_height, top + 1), label, fill=(0, 0, 0), font=font)
    return np.concatenate([image, np.asarray(legend)], axis=0)
