"""Semantic segmentation from image and mask folders paired by file stem.

Layouts (``layout``):
    "folders": ``root/{train,val}/images/*`` and ``root/{train,val}/masks/*.png``
    "ade20k":  ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``
The image folders may hold sub-folders (Cityscapes' cities): ``images/<sub>/x.jpg`` pairs with ``masks/<sub>/x.png``.
Masks hold class indices (single-channel or palette PNG, or another lossless format; never JPEG); 255 is
ignored. Class names come from ``classes``, else ``root/classes.txt`` (one per line, in label order; with
``reduce_zero_label`` its first line, the name of label 0, is dropped), else ``class_0 ...`` up to the largest
training label (an error when more than half of those never occur). At least two classes must occur in the
training masks; a class that never occurs there gets a warning.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Sequence

from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from .classification import UnlabelledImages, data_loader, drop_last_batch, prediction_paths, world_size
from .images import JPEG_SUFFIXES, folder_files, image_to_tensor, list_images, read_image, read_mask
from .scan import (DatasetError, MaskValues, check_common_arguments, check_mask_classes, check_segmentation_pairs,
                   first_few, implied_class_count, mask_problems, require_argument, require_folder, warn_left_out,
                   warn_unlisted)
from .shapes import builtin_shapes
from .transforms import SegmentationTransform, model_data_config

__all__ = ["SegmentationPairs", "SegmentationFolderDataModule", "ShapesSegmentationDataModule", "LAYOUTS"]

#: layout name -> {split: (image folder, mask folder)} relative to the root
LAYOUTS = {
    "folders": {"train": ("train/images", "train/masks"), "val": ("val/images", "val/masks")},
    "ade20k": {"train": ("images/training", "annotations/training"),
               "val": ("images/validation", "annotations/validation")},
}


class SegmentationPairs(Dataset):
    """(image path, mask path) pairs; items are (image (3, S, S), labels (S, S) int64).

    check_classes: when no scan has read the masks, the class count each item's mask is checked against when read
        (its size against its image's too; a DatasetError names the mask), so a dataset read without the scan stops
        at a bad mask, not at a cryptic error later or a stretched mask; None: the scan checked them.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], transform: SegmentationTransform,
                 check_classes: Optional[int] = None):
        self.pairs = list(pairs)
        self.transform = transform
        self.check_classes = check_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if self.check_classes is not None:
            problems = mask_problems(image_path, image.size, mask_path, mask, self.check_classes,
                                     self.transform.ignore_index, self.transform.reduce_zero_label)
            if problems:
                raise DatasetError("; ".join(problems))
        return self.transform(image, mask)


def _name_key(path: Path, folder: Path) -> str:
    """What pairs an image with its mask: the path below its folder without the file ending (``sub/x``)."""
    return path.relative_to(folder).with_suffix("").as_posix()


def _by_name(paths: Sequence[Path], folder: Path) -> dict[str, Path]:
    """Name key -> file; a DatasetError names the files that share a key (pairing by name would mix them up)."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(_name_key(path, folder), []).append(path)
    shared = [" and ".join(str(path.relative_to(folder)) for path in group) for group in groups.values()
              if len(group) > 1]
    if shared:
        raise DatasetError(f"{folder}: files differing only in extension cannot be paired by name: "
                           f"{'; '.join(shared)} (keep one file per name)")
    return {key: group[0] for key, group in groups.items()}


def pair_by_stem(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """Pair every image with the mask of the same name in the same sub-folder (``images/a/x.jpg``, ``masks/a/x.png``).

    Files of the image folder that are not images by name, and masks without an image, are named in a warning.
    raises: DatasetError naming an image without a mask, files sharing a name, or a JPEG mask.
    """
    require_folder(image_dir, "image folder")
    require_folder(mask_dir, "mask folder")
    images, others = folder_files(image_dir, recursive=True)
    if not images:
        raise DatasetError(f"{image_dir}: no image files in it")
    warn_unlisted(others)
    _by_name(images, image_dir)
    mask_files = list_images(mask_dir, recursive=True)
    lossy = [path for path in mask_files if path.suffix.lower() in JPEG_SUFFIXES]
    if lossy:
        raise DatasetError(f"{lossy[0]}: masks must be lossless (PNG, or BMP/TIFF): JPEG compression changes the "
                           f"class indices along edges ({len(lossy)} JPEG mask(s) in {mask_dir}; save them as PNG)")
    masks = _by_name(mask_files, mask_dir)
    image_keys = {_name_key(path, image_dir) for path in images}
    missing = [path for path in images if _name_key(path, image_dir) not in masks]
    if missing:
        expected = mask_dir / Path(_name_key(missing[0], image_dir)).parent
        raise DatasetError(f"{missing[0]}: no mask with the same name in {expected} "
                           f"({len(missing)} image(s) without a mask)")
    warn_left_out([path for key, path in masks.items() if key not in image_keys],
                  f"as no image in {image_dir} has the same name (a renamed or deleted image?)")
    return [(path, masks[_name_key(path, image_dir)]) for path in images]


class SegmentationFolderDataModule(LightningDataModule):
    """Image/mask folders -> batches ((N, 3, S, S) images, (N, S, S) labels with ``ignore_index``).

    Training images and masks are scaled, cropped and flipped together; validation resizes both to S x S.
    Prediction keeps each image at its own size (batch size 1), so masks come back at input resolution.
    """

    def __init__(self, root: str, model_name: Optional[str] = None, image_size: Optional[int] = 512,
                 layout: str = "folders", reduce_zero_label: bool = False, classes: Optional[list[str]] = None,
                 ignore_index: int = 255, scale: tuple[float, float] = (0.25, 1.0), hflip: float = 0.5,
                 batch_size: int = 8, num_workers: int = 4, predict_root: Optional[str] = None, scan: bool = True):
        super().__init__()
        self.save_hyperparameters()
        # settings are read from attributes: under the CLI, hparams hold only what a subclass was given
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        self.scale, self.hflip = tuple(scale), hflip
        self.batch_size, self.num_workers = batch_size, num_workers
        self.predict_root, self.scan = predict_root, scan
        check_common_arguments(model_name, image_size, self.scale, hflip, batch_size, num_workers)
        require_argument(layout in LAYOUTS, "layout", layout, f"must be one of {sorted(LAYOUTS)}")
        self.root = Path(root).expanduser()
        require_folder(self.root, "dataset root")
        self.data_config = model_data_config(model_name, image_size)
        self.train_pairs, self.val_pairs = (pair_by_stem(*(self.root / part for part in LAYOUTS[layout][split]))
                                            for split in ("train", "val"))
        self.train_mask_dir = self.root / LAYOUTS[layout]["train"][1]
        # the values of each training mask, once the scan has read them (counting the classes reads every mask here)
        self._train_mask_values: Optional[list[MaskValues]] = None
        self.class_names = self._class_names(classes)
        if self._train_mask_values is not None:
            self._check_mask_classes()
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _names_file(self) -> Optional[list[str]]:
        """The class names of ``root/classes.txt`` (a byte-order mark, as Notepad writes, is dropped); None without
        the file."""
        names_file = self.root / "classes.txt"
        if not names_file.is_file():
            return None
        names = [line.strip() for line in names_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not names:
            raise DatasetError(f"{names_file}: no class names in it")
        if not self.reduce_zero_label:
            return names
        dropped = (f"{names_file}: reduce_zero_label ignores the value 0 and lowers the others by one, so the first "
                   f"name, {names[0]!r}, is dropped as the name of value 0")
        if len(names) < 2:
            raise DatasetError(f"{dropped}, and no class is left")
        rank_zero_info(f"{dropped}; the classes are {first_few(names[1:])} (value 1 is {names[1]!r})")
        return names[1:]

    def _class_names(self, given: Optional[list[str]]) -> list[str]:
        """``given``, else those of classes.txt, else ``class_<i>`` up to the largest training label (every mask is
        then scanned here, the validation ones against that count)."""
        names = list(given) if given else self._names_file()
        self.names_implied = names is None
        if names is None:
            mask_values = check_segmentation_pairs(self.train_pairs + self.val_pairs, None, self.ignore_index,
                                                   self.reduce_zero_label, "counting classes in the masks",
                                                   counted=len(self.train_pairs))
            self._train_mask_values = mask_values[:len(self.train_pairs)]
            count = implied_class_count(self._train_mask_values, self.ignore_index, self.reduce_zero_label)
            return [f"class_{index}" for index in range(count)]
        if len(names) < 2:
            raise DatasetError(f"{self.root}: one class ({names[0]}); segmentation needs at least two "
                               "(e.g. background and your object)")
        return names

    def _check_mask_classes(self) -> None:
        check_mask_classes(self.train_pairs, self._train_mask_values, self.class_names, self.ignore_index,
                           self.reduce_zero_label, self.train_mask_dir, self.names_implied)

    def _transform(self, training: bool) -> SegmentationTransform:
        cfg = self.data_config
        return SegmentationTransform(cfg.image_size, cfg.mean, cfg.std, training=training, scale=self.scale,
                                     hflip=self.hflip, ignore_index=self.ignore_index,
                                     reduce_zero_label=self.reduce_zero_label)

    def setup(self, stage: str) -> None:
        """Build the datasets of ``stage``, after scanning the files it reads (unless ``scan`` is off)."""
        if stage == "predict":
            paths = prediction_paths(self.predict_root, [image for image, _ in self.val_pairs], self.scan,
                                     processes=world_size(self))
            cfg = self.data_config
            self.predict_dataset = UnlabelledImages(paths, partial(image_to_tensor, mean=cfg.mean, std=cfg.std))
            return
        if self.scan:
            self._scan(stage)
        # counting the classes (names implied) read and checked every mask, as the scan does
        check_classes = None if self.scan or self.names_implied else self.num_classes
        self.train_dataset = SegmentationPairs(self.train_pairs, self._transform(training=True), check_classes)
        self.val_dataset = SegmentationPairs(self.val_pairs, self._transform(training=False), check_classes)

    def _scan(self, stage: str) -> None:
        """Check the pairs ``stage`` reads (none when counting the classes read them all): for fit, the training ones
        too, whose classes are then checked against the class names."""
        if self.names_implied:
            return
        scan_train = stage == "fit"
        pairs = self.train_pairs + self.val_pairs if scan_train else self.val_pairs
        mask_values = check_segmentation_pairs(pairs, self.num_classes, self.ignore_index, self.reduce_zero_label)
        if scan_train:
            self._train_mask_values = mask_values[:len(self.train_pairs)]
            self._check_mask_classes()

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        return data_loader(self, dataset, batch_size, shuffle, drop_last)

    def train_dataloader(self) -> DataLoader:
        drop_last = drop_last_batch(self, len(self.train_dataset), self.batch_size)
        return self._loader(self.train_dataset, True, self.batch_size, drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False, self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, False, 1)


class ShapesSegmentationDataModule(SegmentationFolderDataModule):
    """The built-in shapes dataset (generated into the cache on first use): background + 4 shape classes.

    root: where to keep the generated data (default ``$BILEVEL_CACHE`` or ``~/.cache/bilevel``).
    """

    def __init__(self, root: Optional[str] = None, model_name: Optional[str] = None, image_size: Optional[int] = 64,
                 ignore_index: int = 255, scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                 batch_size: int = 16, num_workers: int = 0, predict_root: Optional[str] = None, scan: bool = True):
        super().__init__(str(builtin_shapes(root) / "segmentation"), model_name, image_size, ignore_index=ignore_index,
                         scale=scale, hflip=hflip, batch_size=batch_size, num_workers=num_workers,
                         predict_root=predict_root, scan=scan)
