"""Image classification: a registered backbone (attribute ``model``) trained with cross-entropy."""
from __future__ import annotations

from typing import Any, Optional

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

import bilevel

from .base import FineTuningTask

__all__ = ["ImageClassifier"]


class ImageClassifier(FineTuningTask):
    """Fine-tune any registered backbone on class folders.

    The backbone is ``self.model`` (so a checkpoint's ``state_dict`` holds it under ``model.``, which
    :func:`bilevel.models.loading.extract_state_dict` reads back). ``hyper_parameters`` in the checkpoint
    hold ``model_name``, ``model_kwargs``, ``num_classes`` and ``class_names``: enough to rebuild it.

    model_name: a name from ``bilevel.list_models()``.
    num_classes / class_names: set from the data by the ``bilevel`` CLI.
    checkpoint_path: official ``.pth`` (or a ``bilevel fit`` checkpoint) to start from, read in ``setup``
        (see :class:`~bilevel.tasks.base.FineTuningTask`); the classifier is replaced when its class count differs.
    model_kwargs: extra constructor arguments of the backbone (e.g. a smaller ``depth`` for quick runs).
    layer_decay: layer-wise lr decay factor (e.g. 0.75), or None.
    mixup_alpha / cutmix_alpha: timm Mixup/CutMix strengths (0 = off); see :meth:`mix` for odd batches.
    """

    def __init__(self, model_name: str = "biformer_tiny", num_classes: int = 1000,
                 class_names: Optional[list[str]] = None, checkpoint_path: Optional[str] = None,
                 drop_path_rate: float = 0.1, model_kwargs: Optional[dict[str, Any]] = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 0, min_lr_ratio: float = 0.01,
                 layer_decay: Optional[float] = None, label_smoothing: float = 0.1, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mixup_prob: float = 1.0):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.model = bilevel.create_model(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                          **(model_kwargs or {}))
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)
        self.soft_loss = SoftTargetCrossEntropy()
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top_k = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) -> logits (N, num_classes)."""
        return self.model(images)

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup/CutMix: images (N, 3, H, W), labels (N,) -> mixed images (N, 3, H, W), targets (N, num_classes).

        timm mixes pairs of samples, so with an odd N the first N - 1 are mixed and the last keeps its image
        with the plain (label-smoothed) one-hot target: every sample is trained on.
        """
        paired = len(images) - len(images) % 2
        plain = mixup_target(labels[paired:], self.mixup.num_classes, lam=1.0, smoothing=self.mixup.label_smoothing)
        if paired == 0:
            return images, plain
        mixed, soft = self.mixup(images[:paired], labels[:paired])
        return torch.cat([mixed, images[paired:]]), torch.cat([soft, plain])

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        if self.mixup is not None:
            mixed, soft = self.mix(images, labels)
            logits = self(mixed).float()
            loss = self.soft_loss(logits, soft)
        else:
            logits = self(images).float()
            loss = self.loss(logits, labels)
        self.train_acc1(logits, labels)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images).float()
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{stage}/acc5", self.val_acc5)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """{"path": [str] x N, "probabilities": (N, num_classes)} for a batch of {"image", "path"}."""
        return {"path": list(batch["path"]), "probabilities": torch.softmax(self(batch["image"]).float(), dim=-1)}
