"""The quick scan before a run: every problem found here names the file (or folder) and what is wrong.

The scan goes through every file (with a progress bar) and reports all the problems it finds at once,
so one pass shows everything to fix. Nothing is written: the user's files are only opened for reading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, TypeVar

import numpy as np
from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from .images import DatasetError, ImageReadError, check_image, list_images, read_mask
from .transforms import train_labels

__all__ = ["DatasetError", "require_folder", "class_folders", "check_images", "check_segmentation_pairs"]

Item = TypeVar("Item")

#: the scan's progress bar appears once a scan has taken this long (a quick scan prints nothing)
PROGRESS_DELAY_S = 1.0


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError saying what was expected there."""
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} (expected a folder here)")
    return path


def class_folders(split_dir: Path) -> list[str]:
    """Class names = the sub-folders of a split folder, sorted; each must hold an image (at any depth)."""
    require_folder(split_dir, "split folder")
    names = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DatasetError(f"{split_dir}: no class folders found (expected {split_dir}/<class name>/<image files>)")
    for name in names:
        if not list_images(split_dir / name, recursive=True):
            raise DatasetError(f"{split_dir / name}: empty class folder (no image files in it)")
    return names


def _progress(items: Sequence[Item], description: str) -> Iterable[Item]:
    """``items`` with a progress bar on the first process, after ``PROGRESS_DELAY_S`` (the others scan silently)."""
    return tqdm(items, desc=description, unit="file", leave=False, delay=PROGRESS_DELAY_S,
                disable=rank_zero_only.rank != 0)


def _raise_problems(problems: list[str]) -> None:
    """One DatasetError listing every problem found (nothing when there is none)."""
    if len(problems) == 1:
        raise DatasetError(problems[0])
    if problems:
        raise DatasetError(f"{len(problems)} problems found in the data:\n  " + "\n  ".join(problems))


def check_images(paths: Sequence[Path], description: str = "checking images") -> None:
    """Decode-check every image (:func:`bilevel.data.images.check_image`).

    raises: one DatasetError listing every file that is not a readable image.
    """
    problems = []
    for path in _progress(paths, description):
        try:
            check_image(path)
        except ImageReadError as error:
            problems.append(str(error))
    _raise_problems(problems)


def _pair_problems(image_path: Path, mask_path: Path, num_classes: Optional[int], ignore_index: int,
                   reduce_zero_label: bool) -> tuple[list[str], np.ndarray]:
    """(what is wrong with one image/mask pair, its training labels other than the ignore index)."""
    try:
        image_size = check_image(image_path)
        mask = read_mask(mask_path)
    except ImageReadError as error:
        return [str(error)], np.zeros(0, dtype=np.int64)
    problems = []
    if (mask.shape[1], mask.shape[0]) != image_size:
        problems.append(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{image_path.name} ({image_size[0]}x{image_size[1]})")
    labels = train_labels(np.unique(mask), ignore_index, reduce_zero_label)
    labels = labels[labels != ignore_index]
    if labels.size and labels.min() < 0:
        problems.append(f"{mask_path}: negative label {int(labels.min())} in the mask")
    if labels.size and num_classes is not None and labels.max() >= num_classes:
        problems.append(f"{mask_path}: label {int(labels.max())} is outside the class range "
                        f"0..{num_classes - 1} (and is not the ignore index {ignore_index})")
    return problems, labels


def check_segmentation_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: Optional[int],
                             ignore_index: int, reduce_zero_label: bool,
                             description: str = "checking images and masks") -> int:
    """Check image/mask pairs: readable, same size, labels within [0, num_classes) or the ignore index.

    returns: the number of classes the masks imply (largest label + 1, after ``reduce_zero_label``).
    raises: one DatasetError listing every problem, each naming its file; also when every mask holds
        only the ignore index.
    """
    problems, largest = [], -1
    for image_path, mask_path in _progress(pairs, description):
        found, labels = _pair_problems(image_path, mask_path, num_classes, ignore_index, reduce_zero_label)
        problems += found
        if labels.size:
            largest = max(largest, int(labels.max()))
    if not problems and pairs and largest < 0:
        folders = ", ".join(sorted({str(mask_path.parent) for _, mask_path in pairs}))
        problems.append(f"{folders}: every mask holds only the ignore index {ignore_index}, so there is no "
                        "class to learn or measure")
    _raise_problems(problems)
    return largest + 1
