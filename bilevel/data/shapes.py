"""The built-in dataset: coloured shapes on textured backgrounds, generated deterministically on first use.

Every picture holds one large object (its class for classification) and sometimes a smaller one of
any class drawn over it; the pixel masks label both, so the same pictures serve classification (class folders)
and segmentation (images/ and masks/ per split). Files go to a cache folder, never into the repository:
``$BILEVEL_CACHE/shapes-v2`` or ``~/.cache/bilevel/shapes-v2``. Layout::

    shapes-v2/classification/{train,val}/<class>/<stem>.png
    shapes-v2/segmentation/{train,val}/{images,masks}/<stem>.png   (mask value = class index, 0 = background)
    shapes-v2/segmentation/classes.txt
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_CLASSES", "SEGMENTATION_CLASSES", "cache_dir", "builtin_shapes", "render_scene"]

#: object classes, in class-index order for classification
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
#: segmentation classes: background is index 0, then the shapes
SEGMENTATION_CLASSES = ("background",) + SHAPE_CLASSES
# Each class has a base colour (RGB) that is jittered per object.
_BASE_COLOURS = ((220, 60, 50), (60, 170, 60), (60, 90, 220), (230, 190, 40))
_VERSION = "shapes-v2"
_SPLIT_SIZES = {"train": 160, "val": 48}
_SPLIT_SEEDS = {"train": 0, "val": 1}


def cache_dir() -> Path:
    """Where bilevel keeps generated data: ``$BILEVEL_CACHE`` or ``~/.cache/bilevel``."""
    return Path(os.environ.get("BILEVEL_CACHE", Path.home() / ".cache" / "bilevel")).expanduser()


def _texture(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A textured background (size, size, 3) uint8: slanted stripes of two muted colours plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
    waves = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    low, high = rng.uniform(70, 130, 3), rng.uniform(130, 190, 3)
    mix = (waves[..., None] + 1) / 2
    pixels = low * (1 - mix) + high * mix + rng.normal(0, 10, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, centre: tuple[float, float], radius: float, fill) -> None:
    cx, cy = centre
    if SHAPE_CLASSES[shape] == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif SHAPE_CLASSES[shape] == "square":
        side = radius * 0.85
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif SHAPE_CLASSES[shape] == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=fill)
    else:
        arm = radius * 0.35
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)


def render_scene(seed: int, size: int = 64) -> tuple[Image.Image, Image.Image, int]:
    """One picture: (RGB image, mask 'L' with 0 = background and k+1 = shape k, index of the dominant shape)."""
    rng = np.random.RandomState(seed)
    image = Image.fromarray(_texture(rng, size))
    mask = Image.new("L", (size, size), 0)
    dominant = int(rng.randint(len(SHAPE_CLASSES)))
    objects = [(dominant, rng.uniform(0.25, 0.35) * size)]
    if rng.rand() < 0.5:
        objects.append((int(rng.randint(len(SHAPE_CLASSES))), rng.uniform(0.1, 0.14) * size))
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for shape, radius in objects:
        centre = tuple(rng.uniform(radius, size - radius, 2))
        colour = tuple(int(c) for c in np.clip(np.array(_BASE_COLOURS[shape]) + rng.randint(-30, 31, 3), 0, 255))
        _draw_shape(draw_image, shape, centre, radius, colour)
        _draw_shape(draw_mask, shape, centre, radius, shape + 1)
    return image, mask, dominant


def _generate(target: Path, size: int = 64) -> None:
    for split, count in _SPLIT_SIZES.items():
        for name in SHAPE_CLASSES:
            (target / "classification" / split / name).mkdir(parents=True)
        (target / "segmentation" / split / "images").mkdir(parents=True)
        (target / "segmentation" / split / "masks").mkdir(parents=True)
        for index in range(count):
            image, mask, dominant = render_scene(_SPLIT_SEEDS[split] * 100_000 + index, size)
            stem = f"{split}_{index:04d}"
            image.save(target / "classification" / split / SHAPE_CLASSES[dominant] / f"{stem}.png")
            image.save(target / "segmentation" / split / "images" / f"{stem}.png")
            mask.save(target / "segmentation" / split / "masks" / f"{stem}.png")
    (target / "segmentation" / "classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")


def builtin_shapes(root: Optional[Union[str, Path]] = None) -> Path:
    """The built-in dataset's folder (64 x 64 px pictures), generated on first use (safe when processes race).

    root: the cache folder (default :func:`cache_dir`). returns: ``<root>/shapes-v2``.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / _VERSION
    if (target / "complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _generate(staging)
        (staging / "complete").write_text("generated by bilevel.data.shapes\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "complete").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
