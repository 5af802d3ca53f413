"""Sample photos and conversion of arrays/tensors to uint8 RGB images."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
from PIL import Image

__all__ = ["SAMPLE_IMAGES", "load_sample_image", "to_uint8_image"]

#: photos shipped with scikit-image (no download needed)
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee")


def to_uint8_image(image) -> np.ndarray:
    """Any RGB or grey image -> (H, W, 3) uint8.

    Accepts a PIL image, a numpy array or tensor (H, W), (H, W, 3) or (H, W, 4) (alpha dropped);
    float values are taken to be in [0, 1].
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.round(array * 255.0), 0, 255)
    return array.astype(np.uint8)


def load_sample_image(name: str = "astronaut", size: Optional[Union[int, tuple[int, int]]] = None) -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) uint8, optionally resized.

    name: one of :data:`SAMPLE_IMAGES`
    size: side length (square) or (height, width); None keeps the original size.
    """
    if name not in SAMPLE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose one of {SAMPLE_IMAGES}")
    from skimage import data

    image = to_uint8_image(getattr(data, name)())
    if size is None:
        return image.copy()
    height, width = (size, size) if isinstance(size, int) else size
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
