"""Transforms: timm's for classification, joint image+mask geometry for segmentation."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["ModelDataConfig", "model_data_config", "smallest_input_size", "train_labels", "SegmentationTransform"]


def train_labels(mask: np.ndarray, ignore_index: int = 255, reduce_zero_label: bool = False) -> np.ndarray:
    """Class indices as stored in a mask file -> training labels (same shape, int64).

    ``reduce_zero_label`` (ADE20K): 0 ('other') becomes the ignore index, every other label drops by one,
    and pixels already at the ignore index stay there.
    """
    labels = mask.astype(np.int64)
    if not reduce_zero_label:
        return labels
    return np.where((labels == 0) | (labels == ignore_index), ignore_index, labels - 1)


@dataclass(frozen=True)
class ModelDataConfig:
    """What a backbone expects of its input: normalisation and the side of its training images."""

    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    image_size: int = 224
    crop_pct: float = 0.875


def _require_registered(model_name: str) -> None:
    """A ValueError naming the available models unless ``model_name`` is one (importing them registers them)."""
    from ..models import MODEL_NAMES

    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; available: {sorted(MODEL_NAMES)}")


def model_data_config(model_name: Optional[str], image_size: Optional[int] = None) -> ModelDataConfig:
    """Mean/std/input size from the registered model's ``pretrained_cfg``; ``image_size`` overrides the size."""
    if model_name is None:
        config = ModelDataConfig()
    else:
        from timm.models import get_pretrained_cfg

        _require_registered(model_name)
        cfg = get_pretrained_cfg(model_name)
        cfg = cfg.to_dict() if cfg is not None else {}
        config = ModelDataConfig(mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                                 std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
                                 image_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                                 crop_pct=float(cfg.get("crop_pct", 0.875)))
    if image_size is not None:
        config = ModelDataConfig(config.mean, config.std, int(image_size), config.crop_pct)
    return config


@lru_cache(maxsize=None)
def smallest_input_size(model_name: str) -> int:
    """The smallest image side the registered model ``model_name`` accepts, whatever its arguments: its class's
    (the total stride of its stages). Arguments may ask for more (BiFormer-STL NCHW's region grid), which the model
    checks at its first forward. The model is built on the meta device: no memory, no weights."""
    import timm

    _require_registered(model_name)
    with torch.device("meta"):
        return type(timm.create_model(model_name)).min_input_size


class SegmentationTransform:
    """Image (PIL RGB) + mask (H, W) int array -> normalised image (3, S, S) and label map (S, S) int64.

    Training: random scale/crop of image and mask together (the mask by nearest neighbour), horizontal
    flip. Evaluation: both resized to S x S. ``reduce_zero_label`` maps 0 to the ignore index and
    shifts the other labels down by one (ADE20K, where 0 means 'other').
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], training: bool,
                 scale: Sequence[float] = (0.5, 1.0), hflip: float = 0.5, ignore_index: int = 255,
                 reduce_zero_label: bool = False):
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        if training:
            geometry = [v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True),
                        v2.RandomHorizontalFlip(hflip)]
        else:
            geometry = [v2.Resize((image_size, image_size), antialias=True)]
        self.geometry = v2.Compose(geometry)
        self.to_tensor = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        picture = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        labels = tv_tensors.Mask(torch.from_numpy(train_labels(mask, self.ignore_index, self.reduce_zero_label)))
        picture, labels = self.geometry(picture, labels)
        return self.to_tensor(picture), labels.as_subclass(Tensor).long()
