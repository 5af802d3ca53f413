"""ImageClassifier in-process: what it keeps in the checkpoint, Mixup/CutMix, layer-wise lr decay."""
from __future__ import annotations

import pytest
import torch

from bilevel.models.loading import extract_state_dict
from bilevel.tasks import ImageClassifier
from bilevel.tasks.optim import parameter_groups

SMALL = dict(model_name="biformer_tiny", num_classes=4, model_kwargs={"depth": [1, 1, 1, 1]})


def test_backbone_is_under_model_for_the_library_loader():
    task = ImageClassifier(**SMALL, class_names=["a", "b", "c", "d"])
    backbone = extract_state_dict({"state_dict": task.state_dict()})
    assert backbone.keys() == task.model.state_dict().keys()
    assert task.hparams.class_names == ["a", "b", "c", "d"] and task.hparams.model_name == "biformer_tiny"


def test_class_names_must_match_the_class_count():
    with pytest.raises(ValueError, match="3 class_names for num_classes=4"):
        ImageClassifier(**SMALL, class_names=["a", "b", "c"])


def test_mixup_trains_on_soft_targets():
    task = ImageClassifier(**SMALL, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    mixed, soft = task.mixup(images.clone(), labels)
    assert soft.shape == (4, 4) and torch.allclose(soft.sum(1), torch.ones(4))
    assert not torch.equal(mixed, images)
    loss = task.soft_loss(task(mixed), soft)
    loss.backward()
    assert torch.isfinite(loss) and task.model.head.weight.grad is not None


def test_layer_decay_gives_the_head_full_lr_and_the_stem_the_smallest():
    task = ImageClassifier(**SMALL, weight_decay=0.05)
    groups = parameter_groups(task, 0.05, 1e-3, layer_decay=0.5, backbone=task.model, backbone_prefix="model.")
    owner = {id(p): name for name, p in task.named_parameters()}
    lr_of = {owner[id(p)]: group["lr"] for group in groups for p in group["params"]}
    decay_of = {owner[id(p)]: group["weight_decay"] for group in groups for p in group["params"]}
    assert lr_of["model.head.weight"] == pytest.approx(1e-3)
    assert lr_of["model.downsample_layers.0.0.weight"] == min(lr_of.values())
    assert decay_of["model.head.bias"] == 0.0 and decay_of["model.head.weight"] == 0.05
