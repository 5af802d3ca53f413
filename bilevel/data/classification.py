"""Image classification from a folder of class folders (``root/train/<class>/*``, ``root/val/<class>/*``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from lightning import LightningDataModule
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from .images import list_images, read_image
from .scan import DatasetError, check_images, class_folders, require_folder
from .shapes import builtin_shapes
from .transforms import model_data_config

__all__ = ["LabelledImages", "UnlabelledImages", "ImageFolderDataModule", "ShapesClassificationDataModule",
           "prediction_paths", "drop_last_batch"]


class LabelledImages(Dataset):
    """(path, label) pairs read through :func:`bilevel.data.images.read_image`; items are (image (3, S, S), label)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(read_image(path)), label


class UnlabelledImages(Dataset):
    """Every image of a folder for prediction; items are {"image": tensor, "path": str}."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        return {"image": self.transform(read_image(path)), "path": str(path)}


def prediction_paths(predict_root: Optional[str], default: Sequence[Path], scan: bool,
                     processes: int = 1) -> list[Path]:
    """The images to predict on: those of ``predict_root`` (its sub-folders too, hidden ones skipped), else
    ``default``; with ``scan``, all decode-checked first (one DatasetError listing every unreadable file).

    processes: the trainer's world size; Lightning's prediction sampler gives every process one image at least.
    raises: DatasetError when the folder is missing, holds no image, or fewer images than ``processes``.
    """
    if predict_root is None:
        paths = list(default)
    else:
        folder = require_folder(Path(predict_root).expanduser(), "prediction folder")
        paths = list_images(folder, recursive=True)
        if not paths:
            raise DatasetError(f"{folder}: no image files to predict on")
    if len(paths) < processes:
        where = predict_root if predict_root is not None else "the validation images"
        raise DatasetError(f"{len(paths)} image(s) to predict in {where} for {processes} processes: every process "
                           f"needs one at least; predict with --trainer.devices {len(paths)} (or fewer processes)")
    if scan:
        check_images(paths, "checking images to predict")
    return paths


def world_size(datamodule: LightningDataModule) -> int:
    """The processes of the attached trainer (1 without one)."""
    return datamodule.trainer.world_size if datamodule.trainer is not None else 1


def drop_last_batch(datamodule: LightningDataModule, dataset_size: int, batch_size: int) -> bool:
    """Whether training drops each process's last, partial batch: yes, unless a process would get no batch.

    Each of the trainer's ``world_size`` processes sees ``ceil(dataset_size / world_size)`` samples, so the
    choice is made for that share, not for the whole dataset (one process when no trainer is attached).
    """
    return math.ceil(dataset_size / world_size(datamodule)) > batch_size


class ImageFolderDataModule(LightningDataModule):
    """Class folders on disk -> timm-augmented batches ((N, 3, S, S) images, (N,) labels).

    root: a folder with ``train/`` and ``val/`` class folders, or (with ``val_fraction``) one folder of
        class folders split with the fixed ``split_seed``. Images in sub-folders of a class folder belong to
        that class; hidden files and folders are skipped; ``val/`` may lack some classes.
    model_name: the backbone, for its mean/std/input size (linked from the model by ``bilevel`` CLI).
    image_size: overrides the backbone's input size.
    predict_root: images to predict on (``bilevel predict``); default: the validation images.
    ``num_classes`` and ``class_names`` are known as soon as the module exists, so the CLI hands them to the model.
    """

    def __init__(self, root: str, model_name: Optional[str] = None, image_size: Optional[int] = None,
                 val_fraction: float = 0.2, split_seed: int = 0, batch_size: int = 32, num_workers: int = 4,
                 scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, auto_augment: Optional[str] = None,
                 predict_root: Optional[str] = None, scan: bool = True):
        super().__init__()
        self.save_hyperparameters()
        # settings are read from attributes: under the CLI, hparams hold only what a subclass was given
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.scale, self.hflip, self.auto_augment = tuple(scale), hflip, auto_augment
        self.predict_root, self.scan = predict_root, scan
        self.root = Path(root).expanduser()
        require_folder(self.root, "dataset root")
        self.data_config = model_data_config(model_name, image_size)
        self.train_samples, self.val_samples, self.class_names = self._find_samples()
        if len(self.class_names) < 2:
            raise DatasetError(f"{self.root}: only one class folder ({self.class_names[0]}); a classifier needs "
                               "at least two classes (add a class folder of other images)")
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _find_samples(self):
        train_dir, val_dir = self.root / "train", self.root / "val"
        if train_dir.is_dir():
            names = class_folders(train_dir)
            if not val_dir.is_dir():
                raise DatasetError(f"{val_dir}: missing split folder (found {train_dir}; put the validation "
                                   f"class folders in {val_dir}, or point root at one folder of class folders to "
                                   "split it with val_fraction)")
            val_names = class_folders(val_dir)
            unknown = sorted(set(val_names) - set(names))
            if unknown:
                raise DatasetError(f"{val_dir}: class folders {unknown} are not in {train_dir}")
            return self._samples(train_dir, names), self._samples(val_dir, names), names
        names = class_folders(self.root)
        samples = self._samples(self.root, names)
        if not 0 < self.val_fraction < 1:
            raise DatasetError(f"{self.root} has no train/ and val/ folders: set val_fraction in (0, 1) to split it "
                               f"(got {self.val_fraction})")
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = max(1, round(len(samples) * self.val_fraction))
        val = [samples[i] for i in sorted(order[:n_val].tolist())]
        train = [samples[i] for i in sorted(order[n_val:].tolist())]
        return train, val, names

    @staticmethod
    def _samples(split_dir: Path, names: Sequence[str]) -> list[tuple[Path, int]]:
        """(image, label) of every image of the class folders (nested sub-folders too); absent folders are skipped."""
        return [(path, label) for label, name in enumerate(names) if (split_dir / name).is_dir()
                for path in list_images(split_dir / name, recursive=True)]

    def transform(self, training: bool):
        """timm's train (random-resized crop, flip, optional auto-augment) or eval (resize, centre crop) pipeline."""
        cfg = self.data_config
        if training:
            return create_transform(cfg.image_size, is_training=True, mean=cfg.mean, std=cfg.std,
                                    scale=tuple(self.scale), hflip=self.hflip,
                                    auto_augment=self.auto_augment)
        return create_transform(cfg.image_size, is_training=False, mean=cfg.mean, std=cfg.std,
                                crop_pct=cfg.crop_pct)

    def setup(self, stage: str) -> None:
        """Build the datasets of ``stage``, after scanning the images it reads (unless ``scan`` is off)."""
        if stage == "predict":
            paths = prediction_paths(self.predict_root, [path for path, _ in self.val_samples], self.scan,
                                     processes=world_size(self))
            self.predict_dataset = UnlabelledImages(paths, self.transform(training=False))
            return
        if self.scan:
            samples = self.train_samples + self.val_samples if stage == "fit" else self.val_samples
            check_images([path for path, _ in samples])
        self.train_dataset = LabelledImages(self.train_samples, self.transform(training=True))
        self.val_dataset = LabelledImages(self.val_samples, self.transform(training=False))

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.num_workers
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        drop_last = drop_last_batch(self, len(self.train_dataset), self.batch_size)
        return self._loader(self.train_dataset, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, shuffle=False)


class ShapesClassificationDataModule(ImageFolderDataModule):
    """The built-in shapes dataset (generated into the cache on first use) as class folders.

    root: where to keep the generated data (default ``$BILEVEL_CACHE`` or ``~/.cache/bilevel``).
    """

    def __init__(self, root: Optional[str] = None, model_name: Optional[str] = None,
                 image_size: Optional[int] = 64, batch_size: int = 32, num_workers: int = 0,
                 scale: tuple[float, float] = (0.6, 1.0), hflip: float = 0.5, auto_augment: Optional[str] = None,
                 predict_root: Optional[str] = None, scan: bool = True):
        super().__init__(str(builtin_shapes(root) / "classification"), model_name, image_size,
                         batch_size=batch_size, num_workers=num_workers, scale=scale, hflip=hflip,
                         auto_augment=auto_augment, predict_root=predict_root, scan=scan)
