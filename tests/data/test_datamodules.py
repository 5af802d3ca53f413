"""Data modules on small folders: layouts, the built-in dataset, and each bad-data case with its file named."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bilevel.data import (DatasetError, ImageFolderDataModule, ImageReadError, SegmentationFolderDataModule,
                          ShapesSegmentationDataModule, builtin_shapes)
from bilevel.data.shapes import SEGMENTATION_CLASSES, render_scene


def _image(path: Path, size=(40, 40), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _mask(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    return path


def _class_tree(root: Path, classes=("cat", "dog"), per_class=3, splits=("train", "val")) -> Path:
    for split in splits:
        for index, name in enumerate(classes):
            for item in range(per_class):
                _image(root / split / name / f"{item}.png", value=40 * index + item)
    return root


def _segmentation_tree(root: Path, layout="folders", count=2, size=(40, 40), label=1) -> Path:
    folders = {"folders": [("train/images", "train/masks"), ("val/images", "val/masks")],
               "ade20k": [("images/training", "annotations/training"),
                          ("images/validation", "annotations/validation")]}[layout]
    for images, masks in folders:
        for item in range(count):
            _image(root / images / f"{item}.jpg", size)
            labels = np.zeros(size[::-1], dtype=np.uint8)
            labels[:10, :10] = label
            _mask(root / masks / f"{item}.png", labels)
    return root


def _digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file()}


def test_class_folders_give_classes_batches_and_leave_files_untouched(tmp_path):
    root = _class_tree(tmp_path / "pets")
    before = _digest(root)
    data = ImageFolderDataModule(str(root), image_size=32, batch_size=2, num_workers=0)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and labels.dtype.is_floating_point is False
    assert _digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets"]


def test_one_folder_is_split_by_a_fixed_seed(tmp_path):
    root = _class_tree(tmp_path, per_class=10, splits=(".",))
    first = ImageFolderDataModule(str(root), val_fraction=0.3, split_seed=7, num_workers=0)
    second = ImageFolderDataModule(str(root), val_fraction=0.3, split_seed=7, num_workers=0)
    assert first.val_samples == second.val_samples and len(first.val_samples) == 6
    assert not set(first.val_samples) & set(first.train_samples)


def test_missing_val_split_is_named(tmp_path):
    root = _class_tree(tmp_path, splits=("train",))
    with pytest.raises(DatasetError, match=r"val: missing split folder"):
        ImageFolderDataModule(str(root))


def test_empty_class_folder_is_named(tmp_path):
    root = _class_tree(tmp_path)
    (root / "train" / "bird").mkdir()
    with pytest.raises(DatasetError, match=r"train/bird: empty class folder"):
        ImageFolderDataModule(str(root))


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nowhere: missing dataset root"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))


def test_corrupt_image_is_named_by_the_scan_before_training(tmp_path):
    root = _class_tree(tmp_path)
    bad = root / "val" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    data = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(ImageReadError, match=str(bad)):
        data.setup("fit")


def test_segmentation_folders_give_joint_crops(tmp_path):
    root = _segmentation_tree(tmp_path, size=(48, 40))
    data = SegmentationFolderDataModule(str(root), image_size=32, batch_size=2, num_workers=0)
    assert data.class_names == ["class_0", "class_1"]
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32)
    assert set(labels.unique().tolist()) <= {0, 1}


def test_ade20k_layout_reduces_zero_label(tmp_path):
    root = _segmentation_tree(tmp_path, layout="ade20k", label=3)
    (root / "classes.txt").write_text("other\nwall\nfloor\ntree\n")
    data = SegmentationFolderDataModule(str(root), layout="ade20k", reduce_zero_label=True, image_size=40,
                                        num_workers=0)
    assert data.class_names == ["wall", "floor", "tree"]
    data.setup("fit")
    _, labels = data.val_dataset[0]
    assert labels[0, 0] == 2 and labels[-1, -1] == 255


def test_mask_of_another_size_is_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    _mask(root / "val" / "masks" / "1.png", np.zeros((20, 40)))
    data = SegmentationFolderDataModule(str(root), classes=["a", "b"], num_workers=0)
    with pytest.raises(DatasetError, match=r"val/masks/1.png: mask size 40x20 differs from its image 1.jpg \(40x40\)"):
        data.setup("fit")


def test_label_outside_the_class_range_is_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    _mask(root / "train" / "masks" / "0.png", np.full((40, 40), 7))
    data = SegmentationFolderDataModule(str(root), classes=["a", "b"], num_workers=0)
    with pytest.raises(DatasetError, match=r"train/masks/0.png: label 7 is outside the class range 0..1"):
        data.setup("fit")


def test_image_without_mask_is_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    (root / "train" / "masks" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"train/images/1.jpg: no mask with the same name"):
        SegmentationFolderDataModule(str(root))


def test_missing_segmentation_split_is_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match=r"val/images: missing image folder"):
        SegmentationFolderDataModule(str(root))


def test_builtin_dataset_is_deterministic_and_lives_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    root = builtin_shapes()
    assert root == tmp_path / "cache" / "shapes-v2"
    assert builtin_shapes() == root
    image, mask, dominant = render_scene(123)
    again = render_scene(123)
    assert np.array_equal(np.asarray(image), np.asarray(again[0])) and dominant == again[2]
    labels = np.asarray(mask)
    assert labels.max() <= len(SEGMENTATION_CLASSES) - 1 and (labels == dominant + 1).mean() > 0.05
    data = ShapesSegmentationDataModule(num_workers=0)
    assert data.class_names == list(SEGMENTATION_CLASSES)
    train = sorted((root / "classification" / "train").rglob("*.png"))
    assert len(train) == 160 and len({p.parent.name for p in train}) == 4
