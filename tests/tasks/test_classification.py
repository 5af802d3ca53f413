"""ImageClassifier in-process: checkpoint contents, start weights, Mixup/CutMix, layer-wise lr decay."""
from __future__ import annotations

from types import SimpleNamespace

import lightning
import pytest
import torch

import bilevel
from bilevel.models.loading import extract_state_dict
from bilevel.tasks import ImageClassifier
from bilevel.tasks.optim import parameter_groups, parameter_plan

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
    plan = parameter_plan(task, 0.05, layer_decay=0.5, backbone=task.model, backbone_prefix="model.")
    groups = parameter_groups(task, plan, lr=1e-3)
    owner = {id(p): name for name, p in task.named_parameters()}
    lr_of = {owner[id(p)]: group["lr"] for group in groups for p in group["params"]}
    decay_of = {owner[id(p)]: group["weight_decay"] for group in groups for p in group["params"]}
    assert lr_of["model.head.weight"] == pytest.approx(1e-3)
    assert lr_of["model.downsample_layers.0.0.weight"] == min(lr_of.values())
    assert decay_of["model.head.bias"] == 0.0 and decay_of["model.head.weight"] == 0.05


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_odd_batch_mixes_all_but_the_last_sample_which_keeps_its_smoothed_label():
    task = ImageClassifier(**SMALL, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, labels = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 3])
    mixed, soft = task.mix(images.clone(), labels)
    assert mixed.shape == images.shape and torch.equal(mixed[2], images[2])
    assert torch.allclose(soft[2], torch.tensor([0.025, 0.025, 0.025, 0.925]))   # 0.1 / 4 off, 1 - 0.1 + 0.1 / 4 on
    assert torch.allclose(soft.sum(1), torch.ones(3))
    loss = task.training_step((images, labels), 0)
    loss.backward()
    assert torch.isfinite(loss)


def _official_weights(path, num_classes=1000):
    """An official-layout .pth ({"model": state dict}) of the small backbone, with random weights."""
    model = bilevel.create_model(SMALL["model_name"], num_classes=num_classes, **SMALL["model_kwargs"])
    torch.save({"model": model.state_dict()}, path)
    return model.state_dict()


def test_start_weights_are_read_in_setup_not_in_init(tmp_path):
    start = tmp_path / "official.pth"
    task = ImageClassifier(**SMALL, checkpoint_path=str(start))        # the file does not exist yet
    official = _official_weights(start)
    parameters = dict(task.named_parameters())
    task.trainer = SimpleNamespace(ckpt_path=None)
    with pytest.warns(UserWarning, match="loaded everything but the classifier"):
        task.setup("fit")
    assert all(p is parameters[name] for name, p in task.named_parameters())   # loaded in place: the optimiser's
    for key, value in task.model.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, official[key], msg=key)
    assert task.model.head.weight.shape == (4, task.model.num_features)
    start.unlink()
    task.setup("validate")                                              # read once


def test_a_restored_checkpoint_never_reads_the_start_weights(tmp_path):
    start = tmp_path / "moved_away.pth"
    task = ImageClassifier(**SMALL, checkpoint_path=str(start))
    task.trainer = SimpleNamespace(ckpt_path=str(tmp_path / "last.ckpt"))
    task.setup("fit")
    saved = tmp_path / "saved.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": lightning.__version__}, saved)
    restored = ImageClassifier.load_from_checkpoint(saved)
    restored.trainer = SimpleNamespace(ckpt_path=None)
    restored.setup("predict")
    torch.testing.assert_close(restored.state_dict(), task.state_dict())


def test_checkpoint_class_names_win_over_the_data():
    task = ImageClassifier(**SMALL, class_names=["ant", "bee", "cow", "doe"])
    expected = r"trained with the classes \['w', 'x', 'y', 'z'\], but the data gives \['ant', 'bee', 'cow', 'doe'\]"
    with pytest.warns(UserWarning, match=expected):
        task.on_load_checkpoint({"hyper_parameters": {"class_names": ["w", "x", "y", "z"]}})
    assert task.class_names == ["w", "x", "y", "z"] and task.hparams.class_names == ["w", "x", "y", "z"]
