"""``bilevel predict`` output: a CSV of class probabilities, or one palette PNG mask per image."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from ..viz.masks import mask_palette

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict_step`` returns, batch by batch.

    {"path", "probabilities"} -> ``<output_dir>/predictions.csv`` (path, label, score, one column per class);
    {"path", "mask"} -> ``<output_dir>/masks/<image stem>.png`` (palette PNG, pixel value = class index).
    output_dir: default ``<log dir>/predictions``. With several processes each writes its own CSV
    (``predictions-rank<r>.csv``).
    """

    def __init__(self, output_dir: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.csv_path: Optional[Path] = None
        self.masks_dir: Optional[Path] = None

    def _resolve_dir(self, trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir).expanduser()
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions"

    def on_predict_start(self, trainer, pl_module) -> None:
        folder = self._resolve_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        self.csv_path, self.masks_dir = folder / name, folder / "masks"
        self._csv_started = False

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
        self.masks_dir.mkdir(parents=True, exist_ok=True)
        for path, mask in zip(paths, masks.cpu().numpy()):
            if mask.max() > 255:
                raise ValueError(f"{path}: class index {int(mask.max())} does not fit a PNG mask (at most 255)")
            picture = Image.fromarray(mask.astype(np.uint8), mode="P")
            picture.putpalette(mask_palette())
            picture.save(self.masks_dir / f"{Path(path).stem}.png")

    def on_predict_end(self, trainer, pl_module) -> None:
        written = self.csv_path if self._csv_started else self.masks_dir
        rank_zero_info(f"predictions written to {written}")
