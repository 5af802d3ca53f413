"""``bilevel predict`` output: a CSV of class probabilities, or one palette PNG mask per image."""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from ..viz.masks import mask_palette

__all__ = ["PredictionWriter", "mask_file_names"]


def mask_file_names(paths: Iterable[str]) -> dict[str, Path]:
    """Predicted image path -> its mask file, relative to the masks folder: one distinct file per image.

    Each image keeps its folder relative to the prediction root (the common folder of all the paths) and
    is named ``<stem>.png``; images of one folder sharing a stem (``x.jpg``, ``x.png``) are named by their
    full name instead (``x.jpg.png``, ``x.png.png``).
    raises: ValueError naming two images that would still share a mask file.
    """
    originals = list(dict.fromkeys(str(path) for path in paths))
    images = [Path(path).absolute() for path in originals]
    if not images:
        return {}
    root = Path(os.path.commonpath([image.parent for image in images]))
    stems = Counter((image.parent, image.stem) for image in images)
    names: dict[str, Path] = {}
    owners: dict[Path, Path] = {}
    for original, image in zip(originals, images):
        name = image.name if stems[image.parent, image.stem] > 1 else image.stem
        target = image.parent.relative_to(root) / f"{name}.png"
        if target in owners:
            raise ValueError(f"{owners[target]} and {image} would both write the mask {target}: rename one")
        owners[target] = image
        names[original] = target
    return names


def _dataset_paths(dataloaders) -> Optional[list[str]]:
    """Every image path of the prediction dataloader(s), or None when a dataset does not list its ``paths``."""
    if dataloaders is None:
        return None
    if isinstance(dataloaders, dict):
        loaders = list(dataloaders.values())
    elif isinstance(dataloaders, (list, tuple)):
        loaders = list(dataloaders)
    else:
        loaders = [dataloaders]
    listed = [getattr(loader.dataset, "paths", None) for loader in loaders]
    if any(paths is None for paths in listed):
        return None
    return [str(path) for paths in listed for path in paths]


def _rank_table(folder: Path, rank: int, world_size: int) -> Path:
    """The CSV one process writes: ``predictions.csv`` alone, ``predictions-rank<r>.csv`` among several."""
    return folder / ("predictions.csv" if world_size == 1 else f"predictions-rank{rank}.csv")


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict_step`` returns, batch by batch.

    {"path", "probabilities"} -> ``<output_dir>/predictions.csv`` (path, label, score, one column per class);
    {"path", "mask"} -> ``<output_dir>/masks/<sub-folders>/<image stem>.png`` (palette PNG, pixel value = class
    index). The sub-folders are the image's own, relative to the prediction root (the common folder of all
    predicted images), so ``a/same.jpg`` and ``b/same.jpg`` give ``masks/a/same.png`` and ``masks/b/same.png``;
    images of one folder sharing a stem are named by their full name (``x.jpg`` -> ``masks/x.jpg.png``,
    ``x.png`` -> ``masks/x.png.png``); see :func:`mask_file_names`. No mask overwrites another.
    output_dir: default ``<log dir>/predictions``. With several processes each writes its own CSV
    (``predictions-rank<r>.csv``) and, once all are done, the first merges them into ``predictions.csv`` in the
    dataset's order (as one process writes it).
    """

    def __init__(self, output_dir: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.csv_path: Optional[Path] = None
        self.masks_dir: Optional[Path] = None
        self.mask_names: Optional[dict[str, Path]] = None
        self.paths: Optional[list[str]] = None

    def _resolve_dir(self, trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir).expanduser()
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions"

    def on_predict_start(self, trainer, pl_module) -> None:
        folder = self._resolve_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.masks_dir = _rank_table(folder, trainer.global_rank, trainer.world_size), folder / "masks"
        self._csv_started = False
        self.paths = _dataset_paths(trainer.predict_dataloaders)
        self.mask_names = mask_file_names(self.paths) if self.paths is not None else None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if "probabilities" in prediction:
            self._write_rows(pl_module.class_names, prediction["path"], prediction["probabilities"])
        else:
            self._write_masks(prediction["path"], prediction["mask"])

    def _write_rows(self, class_names, paths, probabilities) -> None:
        with open(self.csv_path, "w" if not self._csv_started else "a", newline="") as handle:
            writer = csv.writer(handle)
            if not self._csv_started:
                writer.writerow(["path", "label", "score"] + list(class_names))
                self._csv_started = True
            for path, probs in zip(paths, probabilities.cpu().tolist()):
                best = int(np.argmax(probs))
                writer.writerow([path, class_names[best], f"{probs[best]:.6f}"] + [f"{p:.6f}" for p in probs])

    def _write_masks(self, paths, masks) -> None:
        for path, mask in zip(paths, masks.cpu().numpy()):
            if self.mask_names is None or path not in self.mask_names:
                raise ValueError(f"{path}: not among the prediction dataset's paths; PredictionWriter names masks "
                                 "from the `paths` list of the dataset (as bilevel.data.UnlabelledImages has)")
            if mask.max() > 255:
                raise ValueError(f"{path}: class index {int(mask.max())} does not fit a PNG mask (at most 255)")
            picture = Image.fromarray(mask.astype(np.uint8), mode="P")
            picture.putpalette(mask_palette())
            target = self.masks_dir / self.mask_names[path]
            target.parent.mkdir(parents=True, exist_ok=True)
            picture.save(target)

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            trainer.strategy.barrier("predictions written")
            if trainer.is_global_zero and self._csv_started:
                self.csv_path = self._merge_tables(trainer.world_size)
        written = self.csv_path if self._csv_started else self.masks_dir
        rank_zero_info(f"predictions written to {written}")

    def _merge_tables(self, world_size: int) -> Path:
        """Every process's CSV -> one ``predictions.csv``, rows in the dataset's order; the parts are removed."""
        folder = self.csv_path.parent
        parts = [_rank_table(folder, rank, world_size) for rank in range(world_size)]
        header, rows = None, []
        for part in parts:
            if part.is_file():
                with open(part, newline="") as handle:
                    lines = list(csv.reader(handle))
                header = lines[0]
                rows.extend(lines[1:])
        if self.paths is not None:
            order = {path: index for index, path in enumerate(self.paths)}
            rows.sort(key=lambda row: order.get(row[0], len(order)))
        merged = folder / "predictions.csv"
        with open(merged, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
        for part in parts:
            part.unlink(missing_ok=True)
        return merged
