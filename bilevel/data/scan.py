"""The quick scan before a run: every problem found here names the file (or folder) and what is wrong.

The scan goes through every file (with a progress bar) and reports all the problems it finds at once,
so one pass shows everything to fix. Files it leaves out (not images by their name, images outside any
class folder) are named in a warning. Nothing is written: the user's files are only opened for reading.
"""
from __future__ import annotations

import os
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities import rank_zero_warn
from tqdm import tqdm

from .images import (QUARTER_TURNS, DatasetError, ImageReadError, check_image, folder_files, is_visible, read_mask,
                     stored_orientation)
from .transforms import smallest_input_size, train_labels

__all__ = ["DatasetError", "MaskValues", "require_folder", "require_argument", "check_common_arguments", "first_few",
           "warn_left_out", "warn_unlisted", "sub_folders", "class_folders", "check_images", "mask_problems",
           "check_segmentation_pairs", "implied_class_count", "check_mask_classes"]

Item = TypeVar("Item")
Result = TypeVar("Result")
#: value stored in a mask -> its number of pixels
MaskValues = dict[int, int]

#: the scan's progress bar appears once a scan has taken this long (a quick scan prints nothing)
PROGRESS_DELAY_S = 1.0
#: files checked at once: Pillow decodes without holding the GIL, so threads scale with the cores
SCAN_THREADS = min(8, os.cpu_count() or 1)
#: how many files (or classes) a message names before it gives only their count
SHOWN = 5


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError saying what was expected there."""
    if path.is_file():
        raise DatasetError(f"{path}: the {what} is a file, not a folder")
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} (expected a folder here)")
    return path


def require_argument(valid: bool, name: str, value: Any, expected: str) -> None:
    """A DatasetError naming the data-module argument ``name`` unless ``valid``."""
    if not valid:
        raise DatasetError(f"{name}={value!r}: {expected}")


def check_common_arguments(model_name: Optional[str], image_size: Optional[int], scale: Sequence[float], hflip: float,
                           batch_size: int, num_workers: int) -> None:
    """The arguments both folder data modules take, each in its range (a DatasetError names the first that is not);
    ``image_size`` no smaller than the model ``model_name`` accepts, when it is known."""
    require_argument(image_size is None or image_size >= 1, "image_size", image_size,
                     "must be a side of 1 pixel or more")
    if image_size is not None and model_name is not None:
        smallest = smallest_input_size(model_name)
        require_argument(image_size >= smallest, "image_size", image_size,
                         f"must be at least {smallest} for {model_name} (its smallest input side, in pixels)")
    require_argument(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "scale", tuple(scale),
                     "must be (smallest, largest) fraction of the picture's area kept by the random crop, "
                     "with 0 < smallest <= largest <= 1")
    require_argument(0 <= hflip <= 1, "hflip", hflip, "must be a probability in [0, 1]")
    require_argument(batch_size >= 1, "batch_size", batch_size, "must be 1 or more")
    require_argument(num_workers >= 0, "num_workers", num_workers, "must be 0 (load in the main process) or more")


def first_few(items: Sequence[Any]) -> str:
    """The first ``SHOWN`` items, comma-separated, with the count of the others."""
    shown = ", ".join(str(item) for item in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def warn_left_out(files: Sequence[Path], why: str) -> None:
    """A warning naming a few of ``files``, their count and ``why`` they are not used; nothing when there are none."""
    if files:
        rank_zero_warn(f"{len(files)} file(s) left out, {why}: {first_few(files)}")


def warn_unlisted(others: Sequence[Path]) -> None:
    """The warning for files left out because their names do not end like an image file's."""
    warn_left_out(others, "as their names do not end like an image file's (.jpg, .png, .tif, ... any format Pillow "
                          "reads); give the images among them such an ending")


def sub_folders(split_dir: Path) -> dict[str, Path]:
    """Class name (Unicode NFC, as Linux and Windows write it) -> folder, for the visible sub-folders of a split."""
    folders = {}
    for entry in sorted(split_dir.iterdir()):
        if entry.is_dir() and is_visible(entry.name):
            name = unicodedata.normalize("NFC", entry.name)
            if name in folders:
                raise DatasetError(f"{split_dir}: the class folders {folders[name].name!r} and {entry.name!r} have "
                                   "the same name written two ways (Unicode normalisation): merge them")
            folders[name] = entry
    return folders


def class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """Class name -> the image files of its folder (sub-folders too), for the class folders of a split folder.

    Names are compared in Unicode NFC (macOS writes accents decomposed); the files keep their real paths.
    Images lying in ``split_dir`` itself (in no class) and files that are not images by name are named in a warning.
    raises: DatasetError when there is no class folder, or one holds no image.
    """
    require_folder(split_dir, "split folder")
    folders = sub_folders(split_dir)
    loose = folder_files(split_dir).images
    if not folders:
        hint = " (the images directly in it belong to no class)" if loose else ""
        raise DatasetError(f"{split_dir}: no class folders found (expected {split_dir}/<class name>/<image files>)"
                           f"{hint}")
    classes, others = {}, []
    for name, folder in folders.items():
        files = folder_files(folder, recursive=True)
        if not files.images:
            unlisted = f"; its other files are not images by name: {first_few(files.others)}" if files.others else ""
            raise DatasetError(f"{folder}: empty class folder (no image files in it{unlisted})")
        classes[name] = files.images
        others += files.others
    warn_left_out(loose, f"as they lie in {split_dir} itself, outside the class folders; move them into their class "
                         "folder")
    warn_unlisted(others)
    return classes


def _checked(check: Callable[[Item], Result], items: Sequence[Item], description: str) -> list[Result]:
    """``check`` of every item, in order, on ``SCAN_THREADS`` threads; a progress bar on the first process, after
    ``PROGRESS_DELAY_S`` (the others scan silently)."""
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        return list(tqdm(pool.map(check, items), total=len(items), desc=description, unit="file", leave=False,
                         delay=PROGRESS_DELAY_S, disable=rank_zero_only.rank != 0))


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
    def problem(path: Path) -> Optional[str]:
        try:
            check_image(path)
        except ImageReadError as error:
            return str(error)
        return None

    _raise_problems([found for found in _checked(problem, paths, description) if found is not None])


def _size_problems(image_path: Path, mask_path: Path, mask: np.ndarray, image_size: tuple[int, int]) -> list[str]:
    """The message for a mask of another size than its image's displayed ``image_size`` (saying when the image's
    EXIF orientation turns it); none when the sizes agree."""
    mask_size = (mask.shape[1], mask.shape[0])
    if mask_size == image_size:
        return []
    message = (f"{mask_path}: mask size {mask_size[0]}x{mask_size[1]} differs from its image {image_path.name} "
               f"({image_size[0]}x{image_size[1]})")
    orientation = stored_orientation(image_path)
    if orientation in QUARTER_TURNS and mask_size == image_size[::-1]:
        message += (f": {image_path.name} is stored as {mask_size[0]}x{mask_size[1]}, but its EXIF orientation "
                    f"{orientation} displays it as {image_size[0]}x{image_size[1]}; masks must match the picture as "
                    "displayed (turn the mask, or save the image upright without the orientation tag)")
    return [message]


def _quoted_label(label: int, reduce_zero_label: bool) -> str:
    """A training label as a message names it: with ``reduce_zero_label``, with the value stored in the mask file."""
    if reduce_zero_label:
        return f"label {label} (stored value {label + 1}, lowered by one by reduce_zero_label)"
    return f"label {label}"


def _label_problems(mask_path: Path, stored: np.ndarray, num_classes: int, ignore_index: int,
                    reduce_zero_label: bool, range_source: str = "") -> list[str]:
    """What is wrong with the values ``stored`` in a mask: a negative label, or one outside ``num_classes`` that is
    not the ignore index (``range_source`` says where that range comes from)."""
    labels = train_labels(stored, ignore_index, reduce_zero_label)
    labels = labels[labels != ignore_index]
    problems = []
    if labels.size and labels.min() < 0:
        problems.append(f"{mask_path}: negative label {int(labels.min())} in the mask")
    if labels.size and labels.max() >= num_classes:
        problems.append(f"{mask_path}: {_quoted_label(int(labels.max()), reduce_zero_label)} is outside the class "
                        f"range 0..{num_classes - 1}{range_source} (and is not the ignore index {ignore_index})")
    return problems


def mask_problems(image_path: Path, image_size: tuple[int, int], mask_path: Path, mask: np.ndarray,
                  num_classes: int, ignore_index: int, reduce_zero_label: bool) -> list[str]:
    """What is wrong with a mask already read, each naming it: its size against its image's displayed
    ``image_size``, and its labels against ``num_classes``."""
    return (_size_problems(image_path, mask_path, mask, image_size)
            + _label_problems(mask_path, mask, num_classes, ignore_index, reduce_zero_label))


def _pair_problems(image_path: Path, mask_path: Path) -> tuple[list[str], MaskValues]:
    """(what is wrong with the files of one image/mask pair, the pixel count of each value stored in its mask); its
    labels are checked once the class range is known."""
    try:
        image_size = check_image(image_path)
        mask = read_mask(mask_path)
    except ImageReadError as error:
        return [str(error)], {}
    values, pixels = np.unique(mask, return_counts=True)
    return _size_problems(image_path, mask_path, mask, image_size), dict(zip(values.tolist(), pixels.tolist()))


def _label_pixels(mask_values: Iterable[MaskValues], ignore_index: int, reduce_zero_label: bool) -> Counter:
    """Training label -> its pixels over all the masks (the ignore index left out)."""
    totals = Counter()
    for values in mask_values:
        for value, pixels in values.items():
            label = int(train_labels(np.array(value), ignore_index, reduce_zero_label))
            if label != ignore_index:
                totals[label] += pixels
    return totals


def check_segmentation_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: Optional[int],
                             ignore_index: int, reduce_zero_label: bool,
                             description: str = "checking images and masks",
                             counted: Optional[int] = None) -> list[MaskValues]:
    """Check image/mask pairs: readable, same size, labels within [0, num_classes) or the ignore index.

    num_classes: None for the count the labels of the first ``counted`` pairs imply (:func:`implied_class_count`;
        all pairs when ``counted`` is None), which the other pairs' labels are then checked against.
    returns: the pixel count of each value stored in each mask, in the order of ``pairs``.
    raises: one DatasetError listing every problem, each naming its file; also when every mask holds
        only the ignore index.
    """
    checked = _checked(lambda pair: _pair_problems(*pair), pairs, description)
    problems = [problem for found, _ in checked for problem in found]
    mask_values = [values for _, values in checked]
    range_source = ""
    if num_classes is None:
        num_classes = implied_class_count(mask_values[:counted], ignore_index, reduce_zero_label)
        range_source = (" that the training masks' largest label implies (root/classes.txt or --data.classes "
                        "can name more classes)")
    for (_, mask_path), values in zip(pairs, mask_values):
        problems += _label_problems(mask_path, np.array(list(values), dtype=np.int64), num_classes, ignore_index,
                                    reduce_zero_label, range_source)
    if not problems and pairs and not _label_pixels(mask_values, ignore_index, reduce_zero_label):
        folders = ", ".join(sorted({str(mask_path.parent) for _, mask_path in pairs}))
        problems.append(f"{folders}: every mask holds only the ignore index {ignore_index}, so there is no "
                        "class to learn or measure")
    _raise_problems(problems)
    return mask_values


def implied_class_count(mask_values: Iterable[MaskValues], ignore_index: int, reduce_zero_label: bool) -> int:
    """The number of classes the masks imply: their largest training label + 1."""
    return max(_label_pixels(mask_values, ignore_index, reduce_zero_label), default=-1) + 1


def _ignore_index_hint(holding: Sequence[str], ignore_index: int, num_classes: int) -> str:
    """What to do when the ignore index, found in the masks ``holding``, may mark the objects (binary masks of 0 and
    255); a plain pointer to the masks and class names when it cannot (no mask holds it, or it is a class label)."""
    if not holding or ignore_index < num_classes:
        return "Check the masks, and the class names (--data.classes or root/classes.txt)."
    return (f"{ignore_index} is the ignore index, left out of training, and {len(holding)} mask(s) hold it "
            f"({first_few(holding)}): if it marks your objects (binary masks of 0 and {ignore_index}, perhaps with "
            f"anti-aliased edge values between), write the objects as 1 instead (numpy: "
            f"(mask > {ignore_index // 2}).astype(np.uint8), which also sets the edge values to 0 or 1), "
            "or set --data.ignore_index to a value the masks do not use.")


def _ignore_index_marks_objects(mask_values: Sequence[MaskValues], labels: Counter, ignore_index: int,
                                num_classes: int) -> bool:
    """Whether the ignore index, above the class labels, covers more pixels than every label but 0 together:
    binary masks of 0 and 255 (perhaps with anti-aliased edges), where 255 meant the object."""
    ignored = sum(values.get(ignore_index, 0) for values in mask_values)
    return ignore_index >= num_classes and ignored > sum(pixels for label, pixels in labels.items() if label != 0)


def _sparse_labels_message(pairs: Sequence[tuple[Path, Path]], mask_values: Sequence[MaskValues], ignore_index: int,
                           reduce_zero_label: bool, mask_folder: Path, implied: int, absent: int) -> str:
    """The error for masks whose largest label implies ``implied`` classes, most of them ``absent`` (a stray value,
    or classes scaled for visibility as 0/85/170): the values found, and the masks holding those beyond a numbering
    0, 1, 2, ... of the values found."""
    stored = sorted({value for values in mask_values for value in values})
    label_of = {value: int(train_labels(np.array(value), ignore_index, reduce_zero_label)) for value in stored}
    kept = [value for value in stored if label_of[value] != ignore_index]
    outliers = [value for value in kept if label_of[value] >= len(kept)]
    holding = [str(mask_path.relative_to(mask_folder)) for (_, mask_path), values in zip(pairs, mask_values)
               if set(values) & set(outliers)]
    return (f"{mask_folder}: the training masks hold the values {first_few(kept)} (the ignore index left out), "
            f"whose largest implies {implied} classes, {absent} of which never occur (more than half); the values "
            f"{first_few(outliers)} are in {len(holding)} mask(s) ({first_few(holding)}). Classes must be numbered "
            "0, 1, 2, ...: rewrite those masks (a stray value, or classes scaled for visibility such as 0/85/170), "
            "or name the classes in root/classes.txt or --data.classes if so many are really absent")


def check_mask_classes(pairs: Sequence[tuple[Path, Path]], mask_values: Sequence[MaskValues],
                       class_names: Sequence[str], ignore_index: int, reduce_zero_label: bool,
                       mask_folder: Path, names_implied: bool) -> None:
    """Every class should occur in the training masks (``mask_values``, as :func:`check_segmentation_pairs` gives).

    A warning names the classes that never occur (but the one whose label is the ignore index, if any). It is an
    error when fewer than two classes occur, or when the classes were implied by the masks' largest label
    (``names_implied``: no names given) and the ignore index seems to mark the objects
    (:func:`_ignore_index_marks_objects`): the message then says how to rewrite the masks. Named classes are
    trusted: void borders (the ignore index around objects, as VOC draws them) may outnumber small objects.
    Implied classes more than half of which never occur are an error too (:func:`_sparse_labels_message`).
    """
    labels = _label_pixels(mask_values, ignore_index, reduce_zero_label)
    present = [name for label, name in enumerate(class_names) if labels[label]]
    absent = [name for label, name in enumerate(class_names) if not labels[label] and label != ignore_index]
    if len(present) >= 2 and not absent:
        return
    if len(present) < 2:
        problem = f"the training masks hold a single class ({first_few(present)}), and segmentation needs at least two"
    else:
        problem = (f"{len(absent)} of the {len(class_names)} classes never occur in the training masks "
                   f"({first_few(absent)})")
    if len(present) < 2 or (names_implied and _ignore_index_marks_objects(mask_values, labels, ignore_index,
                                                                          len(class_names))):
        holding = [str(mask_path.relative_to(mask_folder)) for (_, mask_path), values in zip(pairs, mask_values)
                   if ignore_index in values]
        raise DatasetError(f"{mask_folder}: {problem}. {_ignore_index_hint(holding, ignore_index, len(class_names))}")
    if names_implied and 2 * len(absent) > len(class_names):
        raise DatasetError(_sparse_labels_message(pairs, mask_values, ignore_index, reduce_zero_label, mask_folder,
                                                  len(class_names), len(absent)))
    rank_zero_warn(f"{mask_folder}: {problem}, so the model cannot learn them; check the masks, and the class names "
                   "(--data.classes or root/classes.txt)")
