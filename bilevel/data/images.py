"""The one way an image file enters bilevel: any file -> RGB PIL image -> normalised tensor.

The app, ``bilevel predict`` and every data module read pictures through :func:`read_image`, so a
grayscale scan, a transparent PNG, a CMYK JPEG or a 16-bit TIFF all arrive as the same 8-bit RGB
picture, turned upright as its EXIF orientation says (as phones and viewers show it), and a file that
cannot be decoded raises :class:`ImageReadError` naming it. Folders are listed by :func:`folder_files` alone.
"""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "JPEG_SUFFIXES", "QUARTER_TURNS", "ImageReadError", "DatasetError", "read_image",
           "read_mask", "check_image", "stored_orientation", "image_to_tensor", "load_image_tensor", "FolderFiles",
           "is_visible", "folder_files", "list_images"]

PathLike = Union[str, Path]

#: formats Pillow identifies but cannot decode by itself (Ghostscript for EPS; no MPEG decoder at all)
_UNDECODED_FORMATS = ("EPS", "MPEG")
#: formats Pillow opens through another one's reader (MPO, the multi-picture JPEG of many cameras)
_OPENED_AS = {"MPO": "JPEG"}
#: files and folders never meant as pictures that Windows, and macOS zip archives, leave in image folders (ignored
#: like hidden files; lower case)
_SYSTEM_NAMES = ("thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx")
#: EXIF orientations that turn the picture by 90 degrees (displayed width and height swap)
QUARTER_TURNS = (5, 6, 7, 8)
#: the check decodes at 1/8 of the size where the format allows it (JPEG): that still reads all the data,
#: so a truncated file is caught cheaply
_CHECK_SCALE = 8


def _decodable(image_format: str) -> bool:
    """Whether Pillow opens and decodes this format by itself (no stub plugin, no outside program)."""
    opener = Image.OPEN.get(_OPENED_AS.get(image_format, image_format))
    if opener is None or image_format in _UNDECODED_FORMATS:
        return False
    return not (isinstance(opener[0], type) and issubclass(opener[0], ImageFile.StubImageFile))


#: file name endings (lower case) listed as images: every one of a format Pillow decodes
IMAGE_SUFFIXES = tuple(sorted(suffix for suffix, image_format in Image.registered_extensions().items()
                              if _decodable(image_format)))
#: the endings of JPEG files (lossy: never a mask)
JPEG_SUFFIXES = tuple(sorted(suffix for suffix, image_format in Image.registered_extensions().items()
                             if _OPENED_AS.get(image_format, image_format) == "JPEG"))

# A truncated file is an error, never a silently grey-filled picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: what PIL raises for a file it cannot open or decode (DecompressionBombError: over MAX_IMAGE_PIXELS)
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
#: what PIL raises for an EXIF block it cannot parse (the pixels may still decode)
_EXIF_ERRORS = (SyntaxError, ValueError, OSError, KeyError, IndexError, TypeError, struct.error)


class ImageReadError(ValueError):
    """A file that is not a readable image (missing, empty, corrupt, truncated, too large)."""


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on as it is (missing split, empty class, bad file...), or a data
    module argument out of its range."""


def _read_error(path: Path, error: Exception) -> ImageReadError:
    """The ImageReadError naming ``path`` for what PIL raised while opening or decoding it."""
    if isinstance(error, Image.DecompressionBombError):
        return ImageReadError(f"{path}: too large to decode safely ({error}); downscale it, or raise "
                              "PIL.Image.MAX_IMAGE_PIXELS if you trust the file")
    return ImageReadError(f"{path}: cannot read this image ({error})")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")


def _warn_corrupt_exif(path: Path, error: Exception) -> None:
    warnings.warn(f"{path}: its EXIF metadata cannot be read ({error}), so its orientation is unknown: the picture "
                  "is used as stored", stacklevel=3)


def _open_decoded(path: Path) -> Image.Image:
    """The fully decoded picture, turned upright by its EXIF orientation (pixel format unchanged)."""
    _require_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            upright = image.copy()
    except _READ_ERRORS as error:
        raise _read_error(path, error) from None
    try:
        ImageOps.exif_transpose(upright, in_place=True)
    except _EXIF_ERRORS as error:
        _warn_corrupt_exif(path, error)
    return upright


def _header_orientation(image: Image.Image, path: Path) -> Optional[int]:
    """The EXIF orientation an opened file declares ahead of its pixels (JPEG, WebP, PNG eXIf, TIFF tag).

    Read without decoding anything (``getexif`` would decode a whole PNG); None, with a warning naming
    ``path``, when the EXIF block cannot be parsed (the picture is then used as stored, as :func:`read_image` does).
    """
    try:
        if "exif" in image.info:
            exif = Image.Exif()
            exif.load(image.info["exif"])
            return exif.get(ExifTags.Base.Orientation)
        tiff_tags = getattr(image, "tag_v2", None)
        return tiff_tags.get(ExifTags.Base.Orientation) if tiff_tags is not None else None
    except _EXIF_ERRORS as error:
        _warn_corrupt_exif(path, error)
        return None


def _displayed_size(image: Image.Image, path: Path) -> tuple[int, int]:
    """(width, height) as the picture is shown: swapped when EXIF says it is turned a quarter."""
    width, height = image.size
    if _header_orientation(image, path) in QUARTER_TURNS:
        return height, width
    return width, height


def stored_orientation(path: PathLike) -> Optional[int]:
    """The EXIF orientation of an image file (None when it declares none), its pixels left undecoded.

    raises: ImageReadError naming the file when it cannot be opened.
    """
    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as image:
            return _header_orientation(image, path)
    except _READ_ERRORS as error:
        raise _read_error(path, error) from None


def check_image(path: PathLike) -> tuple[int, int]:
    """Check that a file decodes, as cheaply as its format allows; returns its displayed (width, height).

    Every format is decoded in full, but at 1/8 scale where Pillow can (JPEG and MPO), which still reads every
    byte, so truncation shows. The size follows the EXIF orientation, like :func:`read_image`.
    raises: ImageReadError naming the file when it is missing, corrupt, truncated or too large.
    """
    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as image:
            size = _displayed_size(image, path)
            image.draft(image.mode, (max(1, image.width // _CHECK_SCALE), max(1, image.height // _CHECK_SCALE)))
            image.load()
    except _READ_ERRORS as error:
        raise _read_error(path, error) from None
    return size


def _rescaled(values: np.ndarray) -> np.ndarray:
    """Values stretched over 0..255 as uint8; NaN and infinite values (nodata) become 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return np.where(finite, scaled, 0.0).round().astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit and float rescaled, alpha composited on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_rescaled(np.asarray(image, dtype=np.float64)), mode="L")
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
    path = Path(path)
    picture = _open_decoded(path)
    try:
        return _to_rgb(picture)
    except _READ_ERRORS as error:
        raise _read_error(path, error) from None


def _gray_rgb_hint(mask: Image.Image) -> str:
    """How to save an RGB mask whose three channels are equal (class indices saved as gray RGB) as one channel."""
    if mask.mode != "RGB":
        return ""
    pixels = np.asarray(mask)
    if not ((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])).all():
        return ""
    return "; its three channels are equal, so save it as one channel: Image.open(p).convert(\"L\").save(p)"


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
                             f"this one has mode {mask.mode!r}{_gray_rgb_hint(mask)}")
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


class FolderFiles(NamedTuple):
    """The files of a folder: images (by their name's ending) and the others, which are left out."""

    images: list[Path]
    others: list[Path]


def is_visible(name: str) -> bool:
    """Whether a file or folder of this name is looked at: not hidden, and not one the system leaves behind."""
    return not name.startswith(".") and name.lower() not in _SYSTEM_NAMES


def _walk(folder: PathLike, recursive: bool):
    """(folder, file names) for ``folder`` and, with ``recursive``, its visible sub-folders at any depth; links to
    folders are followed, each real folder visited once (a link back up makes no loop)."""
    visited = set()
    for current, sub_folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in visited:
            sub_folders[:] = []
            continue
        visited.add(real)
        sub_folders[:] = [name for name in sub_folders if is_visible(name)] if recursive else []
        yield Path(current), names


def folder_files(folder: PathLike, recursive: bool = False) -> FolderFiles:
    """The image files inside ``folder`` (with ``recursive``, in its sub-folders too) and the other files, each
    sorted by path.

    Images are the files whose name ends in one of :data:`IMAGE_SUFFIXES` (any case). Hidden files and folders
    (``.ipynb_checkpoints``...), Windows' ``Thumbs.db``/``desktop.ini`` and macOS' ``__MACOSX`` are in neither list.
    raises: DatasetError naming a broken symbolic link with an image file name.
    """
    images, others = [], []
    for current, names in _walk(folder, recursive):
        for name in filter(is_visible, names):
            path = current / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                others.append(path)
            elif path.is_symlink() and not path.exists():
                raise DatasetError(f"{path}: broken symbolic link (it points to {os.readlink(path)}, which does "
                                   "not exist)")
            elif path.is_file():
                images.append(path)
    return FolderFiles(sorted(images), sorted(others))


def list_images(folder: PathLike, recursive: bool = False) -> list[Path]:
    """The image files of :func:`folder_files`, sorted by path."""
    return folder_files(folder, recursive).images
