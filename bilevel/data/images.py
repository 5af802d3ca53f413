"""The one way an image file enters bilevel: any file -> RGB PIL image -> normalised tensor.

The app, ``bilevel predict`` and every data module read pictures through :func:`read_image`, so a
grayscale scan, a transparent PNG, a CMYK JPEG or a 16-bit TIFF all arrive as the same 8-bit RGB
picture, turned upright as its EXIF orientation says (as phones and viewers show it), and a file that
cannot be decoded raises :class:`ImageReadError` naming it. Folders are listed by :func:`list_images` alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "DatasetError", "read_image", "read_mask", "check_image",
           "image_to_tensor", "load_image_tensor", "list_images"]

PathLike = Union[str, Path]

#: file name endings treated as images when a folder is listed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: EXIF orientations that turn the picture by 90 degrees (displayed width and height swap)
_QUARTER_TURNS = (5, 6, 7, 8)
#: decoding a JPEG at 1/8 of its size still reads all its data, so a truncated file is caught cheaply
_JPEG_CHECK_SCALE = 8

# A truncated file is an error, never a silently grey-filled picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: what PIL raises for a file it cannot open or decode (DecompressionBombError: over MAX_IMAGE_PIXELS)
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """A file that is not a readable image (missing, empty, corrupt, truncated, too large)."""


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on as it is (missing split, empty class, bad file...)."""


def _read_error(path: Path, error: Exception) -> ImageReadError:
    """The ImageReadError naming ``path`` for what PIL raised while opening or decoding it."""
    if isinstance(error, Image.DecompressionBombError):
        return ImageReadError(f"{path}: too large to decode safely ({error}); downscale it, or raise "
                              "PIL.Image.MAX_IMAGE_PIXELS if you trust the file")
    return ImageReadError(f"{path}: cannot read this image ({error})")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")


def _open_decoded(path: Path) -> Image.Image:
    """The fully decoded picture, turned upright by its EXIF orientation (pixel format unchanged)."""
    _require_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            upright = image.copy()
    except _READ_ERRORS as error:
        raise _read_error(path, error) from None
    ImageOps.exif_transpose(upright, in_place=True)
    return upright


def _header_orientation(image: Image.Image) -> Optional[int]:
    """The EXIF orientation an opened file declares ahead of its pixels (JPEG, WebP, PNG eXIf, TIFF tag).

    Read without decoding anything (``getexif`` would decode a whole PNG).
    """
    if "exif" in image.info:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        return exif.get(ExifTags.Base.Orientation)
    tiff_tags = getattr(image, "tag_v2", None)
    return tiff_tags.get(ExifTags.Base.Orientation) if tiff_tags is not None else None


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is shown: swapped when EXIF says it is turned a quarter."""
    width, height = image.size
    if _header_orientation(image) in _QUARTER_TURNS:
        return height, width
    return width, height


def check_image(path: PathLike) -> tuple[int, int]:
    """Check that a file decodes, without the cost of a full decode; returns its displayed (width, height).

    JPEGs are decoded at 1/8 scale (which still reads every byte, so truncation shows); other formats
    are checked by PIL's ``verify`` (PNG checksums etc.). The size follows the EXIF orientation, like
    :func:`read_image`.
    raises: ImageReadError naming the file when it is missing, corrupt, truncated or too large.
    """
    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as image:
            size = _displayed_size(image)
            if image.format == "JPEG":
                image.draft(image.mode, (image.width // _JPEG_CHECK_SCALE, image.height // _JPEG_CHECK_SCALE))
                image.load()
            else:
                image.verify()
    except _READ_ERRORS as error:
        raise _read_error(path, error) from None
    return size


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
    """Read any image file as an upright 8-bit RGB PIL image (grayscale, RGBA, CMYK, 16-bit, palette converted).

    The EXIF orientation is applied, so the picture is the one a viewer shows (phone photos).
    raises: ImageReadError naming the file when it is missing, cannot be decoded or is too large.
    """
    return _to_rgb(_open_decoded(Path(path)))


def read_mask(path: PathLike) -> np.ndarray:
    """Read a label mask (single-channel or palette PNG) as an (H, W) integer array of class indices.

    Palette PNGs hold class indices in their pixel values, so the palette is ignored, not applied. The
    EXIF orientation is applied, as :func:`read_image` does, so mask and picture stay aligned.
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


def list_images(folder: PathLike, recursive: bool = False) -> list[Path]:
    """Image files inside ``folder`` (with ``recursive``, in its sub-folders too), sorted by path.

    Hidden files and hidden folders (``.ipynb_checkpoints``...) are skipped; links to folders are not followed.
    raises: DatasetError naming a broken symbolic link with an image file name.
    """
    found = []
    for current, sub_folders, names in os.walk(folder):
        sub_folders[:] = [name for name in sub_folders if not name.startswith(".")] if recursive else []
        for name in names:
            path = Path(current) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_symlink() and not path.exists():
                raise DatasetError(f"{path}: broken symbolic link (it points to {os.readlink(path)}, which does "
                                   "not exist)")
            if path.is_file():
                found.append(path)
    return sorted(found)
