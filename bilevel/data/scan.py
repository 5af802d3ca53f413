"""The quick scan before training: every problem found here names the file (or folder) and what is wrong.

Nothing is written: the user's files are only opened for reading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import ImageReadError, list_images, read_mask
from .transforms import train_labels

__all__ = ["DatasetError", "require_folder", "class_folders", "check_images", "check_segmentation_pairs"]


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on as it is (missing split, empty class, bad file...)."""


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError saying what was expected there."""
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} (expected a folder here)")
    return path


def class_folders(split_dir: Path) -> list[str]:
    """Class names = the sub-folders of a split folder, sorted; every one must hold at least one image."""
    require_folder(split_dir, "split folder")
    names = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DatasetError(f"{split_dir}: no class folders found (expected {split_dir}/<class name>/<image files>)")
    for name in names:
        if not list_images(split_dir / name):
            raise DatasetError(f"{split_dir / name}: empty class folder (no image files in it)")
    return names


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, after checking the file's integrity without a full decode."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{path}: corrupt or unreadable image ({error})") from None


def check_images(paths: Iterable[Path]) -> None:
    """Raise ImageReadError naming the first file that is not a readable image."""
    for path in paths:
        _header_size(path)


def check_segmentation_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: Optional[int],
                             ignore_index: int, reduce_zero_label: bool) -> int:
    """Check image/mask pairs: readable, same size, labels within [0, num_classes) or the ignore index.

    returns: the number of classes the masks imply (largest label + 1, after ``reduce_zero_label``).
    raises: ImageReadError or DatasetError naming the file and the problem.
    """
    largest = -1
    for image_path, mask_path in pairs:
        image_size = _header_size(image_path)
        mask = read_mask(mask_path)
        if (mask.shape[1], mask.shape[0]) != image_size:
            raise DatasetError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                               f"{image_path.name} ({image_size[0]}x{image_size[1]})")
        labels = train_labels(np.unique(mask), ignore_index, reduce_zero_label)
        labels = labels[labels != ignore_index]
        if labels.size and labels.min() < 0:
            raise DatasetError(f"{mask_path}: negative label {int(labels.min())} in the mask")
        if labels.size and num_classes is not None and labels.max() >= num_classes:
            raise DatasetError(f"{mask_path}: label {int(labels.max())} is outside the class range "
                               f"0..{num_classes - 1} (and is not the ignore index {ignore_index})")
        if labels.size:
            largest = max(largest, int(labels.max()))
    return largest + 1
