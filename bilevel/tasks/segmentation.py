"""Semantic segmentation: backbone stage maps (attribute ``backbone``) into a decode head (``decode_head``)."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

import bilevel

from ..models._pyramid import InputSizeError
from ..models.biformer import BiFormer, BiFormerSTL
from ..models.crossformer import CrossFormer
from ..models.debiformer import DeBiFormer
from ..models.heads import create_head
from ..models.loading import (CheckpointError, classifier_prefixes, load_pretrained_weights, load_weights,
                              read_backbone_weights, split_stage_norms)
from .base import FineTuningTask, SettingsMismatchError

__all__ = ["STAGE_NORM_EPS", "SemanticSegmenter", "sliding_window_logits"]

#: eps of the per-stage norms (``stage_norms=True``), by backbone class: those of the official segmentation
#: backbones' extra norms (BiFormer: timm's LayerNorm2d, 1e-6; DeBiFormer: nn.LayerNorm, 1e-5); CrossFormer's
#: official one has none, so its own LayerNorms' default
STAGE_NORM_EPS = {BiFormer: 1e-6, BiFormerSTL: 1e-6, DeBiFormer: 1e-5, CrossFormer: 1e-5}


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``window`` covering [0, length), the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def sliding_window_logits(predict, images: Tensor, window: int, stride: int, num_classes: int) -> Tensor:
    """Average the logits of overlapping windows: images (N, 3, H, W) -> logits (N, K, H, W).

    predict: maps (N, 3, h, w) to logits (N, K, h, w). A window larger than the image is clamped to the
    image side, so one window covering the image gives exactly the whole-image logits.
    """
    height, width = images.shape[-2:]
    win_h, win_w = min(window, height), min(window, width)
    total = images.new_zeros(images.shape[0], num_classes, height, width)
    counts = images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, win_h, stride):
        for left in _window_starts(width, win_w, stride):
            crop = images[..., top:top + win_h, left:left + win_w]
            total[..., top:top + win_h, left:left + win_w] += predict(crop)
            counts[..., top:top + win_h, left:left + win_w] += 1
    return total / counts


class SemanticSegmenter(FineTuningTask):
    """Fine-tune a registered backbone with a Semantic FPN or UPerNet head.

    ``self.backbone``: the backbone without classifier or final norm, giving its four NCHW stage maps
    (timm's ``forward_intermediates``); ``self.stage_norms``: one module per stage map (a LayerNorm over
    channels, or identities); ``self.decode_head``: the head. A checkpoint's ``state_dict`` holds them under
    ``backbone.``, ``stage_norms.`` and ``decode_head.``; ``hyper_parameters`` hold ``model_name``,
    ``model_kwargs``, ``stage_norms``, ``head``, ``num_classes`` and ``class_names``.

    head: "fpn" (Semantic FPN) or "upernet". head_kwargs: channel widths etc. of the head.
    checkpoint_path: official ``.pth`` (classification, or an mmseg segmentation file) or a ``bilevel fit``
        checkpoint whose backbone to start from, read in ``setup`` (see :meth:`load_start_weights`).
    stage_norms: normalise each stage map over its channels before the decode head, as the official BiFormer and
        DeBiFormer segmentation backbones do (their ``extra_norms``; eps from :data:`STAGE_NORM_EPS`). Their
        parameters get no weight decay and the decode head's learning rate (no layer decay).
    ignore_index: the label of pixels left out of loss and metrics; must equal the data module's.
    inference: "whole" or "slide" (windows of ``window`` px every ``stride`` px) for validation/prediction.
    """

    backbone_attribute = "backbone"

    def __init__(self, model_name: str = "biformer_tiny", num_classes: int = 150,
                 class_names: Optional[list[str]] = None, head: str = "fpn",
                 head_kwargs: Optional[dict[str, Any]] = None, checkpoint_path: Optional[str] = None,
                 drop_path_rate: float = 0.1, model_kwargs: Optional[dict[str, Any]] = None,
                 ignore_index: int = 255, lr: float = 2e-4, weight_decay: float = 1e-4, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.01, layer_decay: Optional[float] = None, inference: str = "whole",
                 window: int = 512, stride: int = 341, stage_norms: bool = False):
        super().__init__()
        if inference not in ("whole", "slide"):
            raise ValueError(f"inference={inference!r} must be 'whole' or 'slide'")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.backbone = bilevel.create_model(model_name, num_classes=0, drop_path_rate=drop_path_rate,
                                             **(model_kwargs or {}))
        unpruned_keys = set(self.backbone.state_dict())
        self.backbone.prune_intermediate_layers(indices=len(self.backbone.feature_info), prune_norm=True,
                                                prune_head=True)
        pruned = {key.split(".")[0] for key in unpruned_keys - set(self.backbone.state_dict())}
        #: top-level names of what classification start weights hold and this backbone lacks: the final norm (pruned)
        #: and the classifier (never built)
        self.start_weights_left_out = frozenset(pruned | classifier_prefixes(self.backbone))
        channels = [info["num_chs"] for info in self.backbone.feature_info]
        eps = STAGE_NORM_EPS[type(self.backbone)]
        self.stage_norms = nn.ModuleList(LayerNorm2d(width, eps=eps) if stage_norms else nn.Identity()
                                         for width in channels)
        self.decode_head = create_head(head, channels, num_classes, **(head_kwargs or {}))
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        metric_args = dict(num_classes=num_classes, ignore_index=ignore_index)
        self.val_miou = MulticlassJaccardIndex(average="macro", **metric_args)
        self.val_pixel_acc = MulticlassAccuracy(average="micro", **metric_args)

    def setup(self, stage: str) -> None:
        """Refuse an ignore index other than the data module's, then load the start weights."""
        data_ignore_index = getattr(self.trainer.datamodule, "ignore_index", None)
        if data_ignore_index is not None and data_ignore_index != self.hparams.ignore_index:
            raise SettingsMismatchError(f"--model.ignore_index is {self.hparams.ignore_index} but --data.ignore_index "
                                        f"is {data_ignore_index}: set both to the label of the pixels to leave out")
        super().setup(stage)

    def load_start_weights(self, path: str) -> None:
        """Load ``path``'s backbone (as :class:`~bilevel.tasks.base.FineTuningTask` does) and its per-stage norms.

        The classifier and final norm of a classification checkpoint are left out, with a warning naming them. A
        segmentation file's per-stage norms (the official ``extra_norms``, or a ``bilevel fit`` segmenter's
        ``stage_norms``) go into ``stage_norms``; an mmseg file's heads are not used (a warning says so).
        raises: CheckpointError naming the file when it has per-stage norms and this model has none.
        """
        norms, state = split_stage_norms(read_backbone_weights(path))
        if norms and not self.hparams.stage_norms:
            raise CheckpointError(f"{path} holds per-stage norms (extra_norms.*, as the official BiFormer and "
                                  "DeBiFormer segmentation backbones have), but this model has none: add "
                                  "--model.stage_norms true (SemanticSegmenter(stage_norms=True)) to use them")
        kept = {key: value for key, value in state.items() if key.split(".")[0] not in self.start_weights_left_out}
        left_out = sorted({f"{key.split('.')[0]}.*" for key in state.keys() - kept.keys()})
        if left_out:
            rank_zero_warn(f"{path}: left out {', '.join(left_out)}: a segmentation backbone has no classifier and "
                           "no final norm (the decode head takes its stage maps)")
        load_pretrained_weights(self.backbone, kept, source=str(path))
        if norms:
            load_weights(self.stage_norms, norms, source=f"{path} (its per-stage norms)")

    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) -> logits (N, num_classes, H, W) (whole image)."""
        maps = self.backbone.forward_intermediates(images, intermediates_only=True)
        features = [norm(stage_map) for norm, stage_map in zip(self.stage_norms, maps, strict=True)]
        logits = self.decode_head(features)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def infer(self, images: Tensor) -> Tensor:
        """Logits (N, K, H, W) by the configured inference mode (whole image or sliding window)."""
        if self.hparams.inference == "whole":
            return self(images)
        return sliding_window_logits(self, images, self.hparams.window, self.hparams.stride,
                                     self.hparams.num_classes)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images).float(), labels, ignore_index=self.hparams.ignore_index)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self.infer(images).float()
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels, ignore_index=self.hparams.ignore_index),
                 prog_bar=True, sync_dist=True)
        predictions = logits.argmax(dim=1)
        self.val_miou(predictions, labels)
        self.val_pixel_acc(predictions, labels)
        self.log(f"{stage}/miou", self.val_miou, prog_bar=True)
        self.log(f"{stage}/pixel_acc", self.val_pixel_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """{"path": [str] x N, "mask": (N, H, W) int64 class map at the input resolution}.

        An image with a side below the backbone's ``min_input_size`` is predicted padded (bottom/right, with the
        mean colour, as the backbones pad to their window sizes), and its mask cropped back to the image.
        raises: InputSizeError naming the image file(s) when the network cannot take them.
        """
        images = batch["image"]
        height, width = images.shape[-2:]
        try:
            logits = self.infer(self.pad_to_min_size(images))
        except InputSizeError as error:
            raise InputSizeError(f"{', '.join(batch['path'])}: {error}") from None
        return {"path": list(batch["path"]), "mask": logits[..., :height, :width].argmax(dim=1)}

    def pad_to_min_size(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) zero-padded bottom/right (the mean colour, once normalised) to the backbone's
        smallest input side; unchanged when they are that large."""
        side = self.backbone.min_input_size
        height, width = images.shape[-2:]
        return F.pad(images, (0, max(side - width, 0), 0, max(side - height, 0)))
