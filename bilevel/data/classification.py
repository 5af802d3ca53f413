"""Image classification from a folder of class folders (``root/train/<class>/*``, ``root/val/<class>/*``)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from lightning import LightningDataModule
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from .images import folder_files, is_visible, read_image
from .scan import (DatasetError, check_common_arguments, check_images, class_folders, first_few, require_argument,
                   require_folder, sub_folders, warn_unlisted)
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
    """The images to predict on: those of ``predict_root`` (its sub-folders too, hidden ones skipped; a warning
    names the files that are not images by name), else ``default``; with ``scan``, all decode-checked first (one
    DatasetError listing every unreadable file).

    processes: the trainer's world size; Lightning's prediction sampler gives every process one image at least.
    raises: DatasetError when the folder is missing, holds no image, or fewer images than ``processes``.
    """
    if predict_root is None:
        paths = list(default)
    else:
        folder = require_folder(Path(predict_root).expanduser(), "prediction folder")
        paths, others = folder_files(folder, recursive=True)
        if not paths:
            raise DatasetError(f"{folder}: no image files to predict on")
        warn_unlisted(others)
    if len(paths) < processes:
        where = predict_root if predict_root is not None else "the validation images"
        raise DatasetError(f"{len(paths)} image(s) to predict in {where} for {processes} processes: every process "
                           f"needs one at least; predict with --trainer.devices {len(paths)} (or fewer processes)")
    if scan:
        check_images(paths, "checking images to predict")
    return paths


#: split folder names in other spellings (lower case): a root of such folders is no folder of classes
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev")


def _misnamed_splits(root: Path) -> dict[str, set[str]]:
    """The folders of ``root`` (name -> the names of their sub-folders) when they look like split folders named
    otherwise than ``train``/``val`` (``Train/``, ``validation/``): one at least is named like a split, and each
    holds no image of its own, only sub-folders, some of whose names another one shares. Empty otherwise."""
    folders = sub_folders(root)
    if len(folders) < 2 or not any(name.lower() in SPLIT_NAMES for name in folders):
        return {}
    contents = {}
    for name, folder in folders.items():
        if folder_files(folder).images:
            return {}
        contents[name] = set(sub_folders(folder))
    for name, inside in contents.items():
        if not any(inside & other for other_name, other in contents.items() if other_name != name):
            return {}
    return contents


def _labelled(classes: dict[str, list[Path]], names: Sequence[str]) -> list[tuple[Path, int]]:
    """(image, label) of every image of ``classes`` (name -> images), label = the name's index in ``names``."""
    return [(path, label) for label, name in enumerate(names) for path in classes.get(name, [])]


def world_size(datamodule: LightningDataModule) -> int:
    """The processes of the attached trainer (1 without one)."""
    return datamodule.trainer.world_size if datamodule.trainer is not None else 1


def drop_last_batch(datamodule: LightningDataModule, dataset_size: int, batch_size: int) -> bool:
    """Whether training drops each process's last, partial batch: yes, unless a process would get no batch.

    Each of the trainer's ``world_size`` processes sees ``ceil(dataset_size / world_size)`` samples, so the
    choice is made for that share, not for the whole dataset (one process when no trainer is attached).
    """
    return math.ceil(dataset_size / world_size(datamodule)) > batch_size


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def feeds_cuda(datamodule: LightningDataModule) -> bool:
    """Whether the attached trainer runs on CUDA GPUs."""
    trainer = datamodule.trainer
    return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)


def data_loader(datamodule: LightningDataModule, dataset: Dataset, batch_size: int, shuffle: bool,
                drop_last: bool = False) -> DataLoader:
    """``datamodule``'s DataLoader over ``dataset``, with at most one worker process per usable CPU: more only
    wait for a core (PyTorch warns that they may slow loading or freeze it), as when a config written for a GPU
    server's 8 workers runs on a 2-core machine. Workers persist between epochs; for a CUDA trainer, batches
    come in page-locked memory, which Lightning copies to the GPU asynchronously."""
    requested = datamodule.num_workers
    workers = min(requested, usable_cpus())
    if workers < requested:
        rank_zero_info(f"num_workers={requested}: this process may use {workers} CPUs, so it loads data with "
                       f"{workers} worker processes")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=feeds_cuda(datamodule))


class ImageFolderDataModule(LightningDataModule):
    """Class folders on disk -> timm-augmented batches ((N, 3, S, S) images, (N,) labels).

    root: a folder with ``train/`` and ``val/`` class folders, or (with ``val_fraction``) one folder of
        class folders, each split with the fixed ``split_seed`` in the same proportion (stratified). ``train/`` is
        taken as the split folder when there is a ``val/`` or it holds sub-folders; otherwise it is a class like
        any other. Split folders named otherwise (``Train/``, ``validation/``...: see ``_misnamed_splits``) are
        refused. Images in sub-folders of a class folder (links followed) belong to that class; hidden files and
        folders are skipped; ``val/`` may lack some classes. A warning names the files left out: those that are not
        images by name, and images lying outside the class folders.
    model_name: the backbone, for its mean/std/input size (linked from the model by ``bilevel`` CLI).
    image_size: overrides the backbone's input size; refused when smaller than ``model_name`` accepts.
    predict_root: images to predict on (``bilevel predict``); default: the validation images.
    ``num_classes`` and ``class_names`` are known as soon as the module exists, so the CLI hands them to the model.
    raises: DatasetError naming the folder, or the argument, that cannot be used.
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
        check_common_arguments(model_name, image_size, self.scale, hflip, batch_size, num_workers)
        self.root = Path(root).expanduser()
        require_folder(self.root, "dataset root")
        self.data_config = model_data_config(model_name, image_size)
        self._check_auto_augment()
        self.train_samples, self.val_samples, self.class_names = self._find_samples()
        if len(self.class_names) < 2:
            raise DatasetError(f"{self.root}: only one class folder ({self.class_names[0]}); a classifier needs "
                               "at least two classes (add a class folder of other images)")
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_auto_augment(self) -> None:
        """A DatasetError naming ``auto_augment`` when timm does not know the policy."""
        try:
            self.transform(training=True)
        except (AssertionError, ValueError, KeyError, IndexError):
            raise DatasetError(f"auto_augment={self.auto_augment!r}: not a timm augmentation policy; use "
                               "e.g. 'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w4-d2' (AugMix) or "
                               "'original' (AutoAugment), or None for none") from None

    def _is_split_layout(self) -> bool:
        """``root/train/`` is the training split, not a class: there is a ``val/``, or it holds sub-folders."""
        train_dir = self.root / "train"
        return train_dir.is_dir() and ((self.root / "val").is_dir() or any(
            entry.is_dir() and is_visible(entry.name) for entry in train_dir.iterdir()))

    def _refuse_misnamed_splits(self) -> None:
        """A DatasetError naming the folders of the root when they look like split folders (``_misnamed_splits``),
        which would otherwise be taken as classes named after the splits."""
        splits = _misnamed_splits(self.root)
        if splits:
            shared = sorted(set.union(*splits.values()))
            raise DatasetError(f"{self.root}: the folders {', '.join(sorted(splits))} look like split folders (each "
                               f"holds no image of its own but class folders that another shares: {first_few(shared)}),"
                               " so they would be taken as classes named after the splits; name the split folders "
                               f"exactly {self.root}/train/<class> and {self.root}/val/<class>, or put the class "
                               f"folders directly in {self.root} to split them with val_fraction")

    def _find_samples(self):
        if not self._is_split_layout():
            self._refuse_misnamed_splits()
            classes = class_folders(self.root)
            names = sorted(classes)
            return (*self._split(classes, names), names)
        train_dir, val_dir = self.root / "train", self.root / "val"
        classes = class_folders(train_dir)
        if not val_dir.is_dir():
            raise DatasetError(f"{val_dir}: missing split folder (found {train_dir}, taken as the training split as it "
                               f"holds sub-folders; put the validation class folders in {val_dir}, or point root at "
                               "one folder of class folders to split it with val_fraction)")
        val_classes = class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DatasetError(f"{val_dir}: class folders {unknown} are not in {train_dir}")
        names = sorted(classes)
        return _labelled(classes, names), _labelled(val_classes, names), names

    def _held_out(self, classes: dict[str, list[Path]]) -> dict[str, int]:
        """Class name -> how many of its images ``val_fraction`` holds out (rounded), each class keeping one training
        image at least; one image of the largest class when the rounding holds out none."""
        require_argument(0 < self.val_fraction < 1, "val_fraction", self.val_fraction,
                         f"{self.root} has no train/ and val/ folders: set val_fraction in (0, 1) to split it")
        counts = {name: min(round(len(images) * self.val_fraction), len(images) - 1)
                  for name, images in classes.items()}
        largest = max(classes, key=lambda name: len(classes[name]))
        if not any(counts.values()) and len(classes[largest]) > 1:
            counts[largest] = 1
        if not any(counts.values()):
            raise DatasetError(f"{self.root}: val_fraction={self.val_fraction} holds out no validation image, as every "
                               "class keeps one training image at least and each has one image only: add images, or "
                               "give train/ and val/ folders")
        return counts

    def _split(self, classes: dict[str, list[Path]], names: Sequence[str]):
        """(train, val) samples: the ``_held_out`` images of each class (stratified), drawn with ``split_seed``."""
        counts = self._held_out(classes)
        generator = torch.Generator().manual_seed(self.split_seed)
        train, val = [], []
        for label, name in enumerate(names):
            order = torch.randperm(len(classes[name]), generator=generator).tolist()
            val += [(classes[name][i], label) for i in sorted(order[:counts[name]])]
            train += [(classes[name][i], label) for i in sorted(order[counts[name]:])]
        return train, val

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
        return data_loader(self, dataset, self.batch_size, shuffle, drop_last)

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
