"""Segmentation pieces in-process: decode heads, sliding-window inference, optimiser groups, start weights,
prediction masks."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image
from torch import nn

import bilevel
from bilevel.cli import console_main
from bilevel.data import SegmentationFolderDataModule
from bilevel.models.heads import HEADS, create_head
from bilevel.tasks import PredictionWriter, SemanticSegmenter, sliding_window_logits
from bilevel.tasks.optim import parameter_groups, parameter_plan, warmup_cosine
from bilevel.tasks.writers import mask_file_names

from .conftest import CONFIGS, QUICK

SMALL = dict(model_name="biformer_tiny", num_classes=3, model_kwargs={"depth": [1, 1, 1, 1]},
             head_kwargs={"fpn_channels": 32, "head_channels": 16})


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_map_four_stages_to_stride_4_logits(name):
    channels, strides = [8, 16, 24, 32], [4, 8, 16, 32]
    features = [torch.randn(2, c, 96 // s, 80 // s) for c, s in zip(channels, strides)]
    kwargs = {"fpn": dict(fpn_channels=16, head_channels=8), "upernet": dict(channels=16)}[name]
    head = create_head(name, channels, num_classes=5, **kwargs)
    logits = head(features)
    assert logits.shape == (2, 5, 24, 20)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_unknown_head_is_named():
    with pytest.raises(ValueError, match="'segformer'"):
        create_head("segformer", [1, 2, 3, 4], 2)


def test_sliding_window_covering_the_image_equals_whole_image():
    model = SemanticSegmenter(**SMALL, inference="slide", window=96, stride=64).eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        whole = model(images)
        slide = model.infer(images)
    assert slide.shape == (2, 3, 64, 80)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


def test_sliding_window_averages_overlaps_exactly():
    """For a per-pixel predictor every overlapping window agrees, so the average is the whole-image answer."""
    pointwise = nn.Conv2d(3, 4, 1)
    images = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        slide = sliding_window_logits(pointwise, images, window=32, stride=20, num_classes=4)
        torch.testing.assert_close(slide, pointwise(images))


def test_segmenter_keeps_backbone_and_head_apart_and_trains_every_parameter():
    model = SemanticSegmenter(**SMALL)
    keys = model.state_dict().keys()
    assert all(key.startswith(("backbone.", "decode_head.")) for key in keys)
    assert not any(key.startswith("backbone.head.") for key in keys)
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (DDP would fail): {unused[:5]}"


def test_parameter_groups_exclude_norms_biases_and_decay_layers():
    model = SemanticSegmenter(**SMALL)
    plan = parameter_plan(model, weight_decay=0.05, layer_decay=0.5, backbone=model.backbone,
                          backbone_prefix="backbone.")
    groups = parameter_groups(model, plan, lr=1e-3)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)
    for group in groups:
        for param in group["params"]:
            if param.ndim <= 1:
                assert group["weight_decay"] == 0.0, names[id(param)]
            if names[id(param)].startswith("decode_head."):
                assert group["lr"] == 1e-3
    backbone_lrs = sorted({g["lr"] for g in groups if any(names[id(p)].startswith("backbone.") for p in g["params"])})
    assert len(backbone_lrs) > 2 and backbone_lrs[0] < 1e-3 * 0.5 ** 2


def test_warmup_then_cosine_schedule():
    factors = [warmup_cosine(step, 4, 20, 0.1) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 15 / 16)).item()))


def test_a_run_without_an_end_keeps_the_lr_after_warm_up():
    """max_time or early stopping alone: Lightning estimates infinitely many steps, so no cosine decay."""
    assert [warmup_cosine(step, 2, None, 0.1) for step in (0, 1, 2, 10 ** 6)] == [0.5, 1.0, 1.0, 1.0]
    task = SemanticSegmenter(**SMALL, lr=1e-3, warmup_steps=2)
    task.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.warns(UserWarning, match="no max_steps or max_epochs"):
        optimizers = task.configure_optimizers()
    schedule = optimizers["lr_scheduler"]["scheduler"]
    for _ in range(5):
        optimizers["optimizer"].step()
        schedule.step()
    assert {group["lr"] for group in optimizers["optimizer"].param_groups} == {1e-3}


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_half_precision_loss_is_computed_in_float32():
    """fp16 cross-entropy on the CPU overflows its mean beyond ~65,000 labelled pixels (here 256 x 256)."""
    task = SemanticSegmenter(**SMALL).half()
    images, labels = torch.randn(1, 3, 256, 256).half(), torch.randint(0, 3, (1, 256, 256))
    loss = task.training_step((images, labels), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def _picture(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(sum(size)).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _dataset(root: Path) -> Path:
    """A two-class segmentation folder of 64 x 64 pictures."""
    for split in ("train", "val"):
        for item in range(2):
            _picture(root / split / "images" / f"{item}.png", (64, 64))
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[:32] = 1
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / split / "masks" / f"{item}.png")
    return root


def _predict(tmp_path: Path, predict_root: Path, model: SemanticSegmenter) -> Path:
    """Run Trainer.predict with the PredictionWriter; returns the masks folder."""
    data = SegmentationFolderDataModule(str(_dataset(tmp_path / "data")), image_size=64, num_workers=0,
                                        predict_root=str(predict_root))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[PredictionWriter(str(tmp_path / "out"))])
    trainer.predict(model, datamodule=data, return_predictions=False)
    return tmp_path / "out" / "masks"


def test_masks_of_images_sharing_a_stem_do_not_overwrite_each_other(tmp_path):
    sizes = {"a/same.jpg": (64, 72), "b/same.jpg": (72, 64), "x.jpg": (80, 64), "x.png": (64, 80), "y.png": (64, 64)}
    for name, size in sizes.items():
        _picture(tmp_path / "new" / name, size)
    masks = _predict(tmp_path, tmp_path / "new", SemanticSegmenter(**{**SMALL, "num_classes": 2}).eval())
    expected = {"a/same.jpg": "a/same.png", "b/same.jpg": "b/same.png", "x.jpg": "x.jpg.png", "x.png": "x.png.png",
                "y.png": "y.png"}
    assert sorted(str(path.relative_to(masks)) for path in masks.rglob("*.png")) == sorted(expected.values())
    for image, mask in expected.items():
        assert Image.open(masks / mask).size == sizes[image], mask


def test_mask_names_keep_folders_below_the_common_root():
    names = mask_file_names(["/p/new/a/same.jpg", "/p/new/b/same.jpg", "/p/new/x.jpg", "/p/new/x.png"])
    assert names == {"/p/new/a/same.jpg": Path("a/same.png"), "/p/new/b/same.jpg": Path("b/same.png"),
                     "/p/new/x.jpg": Path("x.jpg.png"), "/p/new/x.png": Path("x.png.png")}


def test_small_prediction_images_are_padded_and_get_masks_of_their_size(tmp_path):
    _picture(tmp_path / "new" / "fine.png", (64, 64))
    _picture(tmp_path / "new" / "thumb.png", (20, 16))
    _picture(tmp_path / "new" / "wide.png", (90, 24))
    masks = _predict(tmp_path, tmp_path / "new", SemanticSegmenter(**{**SMALL, "num_classes": 2}).eval())
    assert {path.name: Image.open(path).size for path in masks.iterdir()} == {
        "fine.png": (64, 64), "thumb.png": (20, 16), "wide.png": (90, 24)}


def test_start_weights_skip_the_pruned_norm_and_classifier(tmp_path):
    start = tmp_path / "official.pth"
    model = SemanticSegmenter(**SMALL, checkpoint_path=str(start))     # the file does not exist yet
    official = bilevel.create_model(SMALL["model_name"], num_classes=1000, **SMALL["model_kwargs"]).state_dict()
    torch.save({"model": official}, start)
    model.trainer = SimpleNamespace(ckpt_path=None, datamodule=None)
    model.setup("fit")
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, official[key], msg=key)


def test_ignore_index_on_one_side_only_is_one_line_of_error_before_lightning_merges_hparams(tmp_path, monkeypatch,
                                                                                          bilevel_cache, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(bilevel_cache))
    monkeypatch.setattr(sys, "argv", ["bilevel", "fit", "--config", str(CONFIGS / "quickstart_segmentation.yaml"),
                                      "--data.ignore_index", "0", "--trainer.max_steps", "1", *QUICK])
    with pytest.raises(SystemExit) as exited:
        console_main()
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in error
    assert error.splitlines()[-1] == ("bilevel: error: --model.ignore_index is 255 but --data.ignore_index is 0: "
                                      "set both to the label of the pixels to leave out")
