"""The one way an image file enters bilevel: any file -> RGB PIL image -> normalised tensor.

The app, ``bilevel predict`` and every data module read pictures through :func:`read_image`, so a
grayscale scan, a transparent PNG, a CMYK JPEG or a 16-bit TIFF all arrive as the same 8-bit RGB
picture, and a file that cannot be decoded raises :class:`ImageReadError` naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "read_image", "read_mask", "image_to_tensor", "load_image_tensor",
           "list_images"]

PathLike = Union[str, Path]

#: file name endings treated as images when a folder is listed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# A truncated file is an error, never a silently grey-filled picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageReadError(ValueError):
    """A file that is not a readable image (missing, empty, corrupt, truncated)."""


def _open_decoded(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{path}: cannot read this image ({error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit and float rescaled, alpha composited on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: PathLike) -> Image.Image:
    """Read any image file as an 8-bit RGB PIL image (grayscale, RGBA, CMYK, 16-bit, palette converted).

    raises: ImageReadError naming the file when it is missing or cannot be decoded.
    """
    return _to_rgb(_open_decoded(Path(path)))


def read_mask(path: PathLike) -> np.ndarray:
    """Read a label mask (single-channel or palette PNG) as an (H, W) integer array of class indices.

    Palette PNGs hold class indices in their pixel values, so the palette is ignored, not applied.
    raises: ImageReadError naming the file when it is not a single-channel or palette image.
    """
    path = Path(path)
    mask = _open_decoded(path)
    if mask.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise ImageReadError(f"{path}: a mask must be a single-channel or palette PNG of class indices, "
                             f"this one has mode {mask.mode!r}")
    return np.asarray(mask).astype(np.int64)


def image_to_tensor(image: Image.Image, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                    std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def load_image_tensor(path: PathLike, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                      std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tensor:
    """Any image file -> normalised float tensor (3, H, W) at the file's own resolution."""
    return image_to_tensor(read_image(path), mean, std)


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES)
