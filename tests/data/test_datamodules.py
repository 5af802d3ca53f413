"""Data modules on small folders: layouts, the built-in dataset, and each bad-data case with its file named."""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from PIL import Image

from bilevel.data import (DatasetError, ImageFolderDataModule, SegmentationFolderDataModule,
                          ShapesSegmentationDataModule, builtin_shapes, classification, scan)
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


def test_every_corrupt_image_is_named_by_the_scan_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scan, "PROGRESS_DELAY_S", 0.0)      # the bar shows at once (normally after a second)
    root = _class_tree(tmp_path)
    bad = [root / "val" / "dog" / "1.png", root / "train" / "cat" / "2.png"]
    for path in bad:
        path.write_bytes(path.read_bytes()[:40])
    data = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(DatasetError, match="2 problems") as raised:
        data.setup("fit")
    assert all(f"{path}: cannot read this image" in str(raised.value) for path in bad)
    assert "checking images" in capsys.readouterr().err   # the scan's progress bar


def test_truncated_jpeg_is_caught_before_training(tmp_path):
    root = _class_tree(tmp_path)
    cut = root / "train" / "dog" / "cut.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    data = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(DatasetError, match=f"{cut}: cannot read this image.*truncated"):
        data.setup("fit")


def test_validation_without_a_training_class_is_fine(tmp_path):
    root = _class_tree(tmp_path, classes=("cat", "dog", "emu"), splits=("train",))
    _class_tree(root, classes=("cat", "emu"), splits=("val",))
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["cat", "dog", "emu"]
    assert sorted({label for _, label in data.val_samples}) == [0, 2] and len(data.val_samples) == 6


def test_class_folders_include_nested_images_but_not_hidden_ones(tmp_path):
    root = _class_tree(tmp_path)
    _image(root / "train" / "cat" / "more" / "deeper" / "x.png")
    _image(root / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    _image(root / "train" / "emu" / "sub" / "only.png")
    _image(root / "val" / "emu" / "e.png")
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["cat", "dog", "emu"]
    train = {(str(path.relative_to(root / "train")), label) for path, label in data.train_samples}
    assert ("cat/more/deeper/x.png", 0) in train and ("emu/sub/only.png", 2) in train
    assert len(train) == 3 + 1 + 3 + 1


def test_broken_link_in_a_class_folder_is_named(tmp_path):
    root = _class_tree(tmp_path)
    link = root / "train" / "dog" / "moved.png"
    link.symlink_to(tmp_path / "elsewhere" / "moved.png")
    with pytest.raises(DatasetError, match=f"{link}: broken symbolic link"):
        ImageFolderDataModule(str(root))


def test_one_class_is_named_before_the_metrics_fail(tmp_path):
    root = _class_tree(tmp_path / "cats", classes=("cat",))
    with pytest.raises(DatasetError, match=f"{root}: only one class folder \\(cat\\)"):
        ImageFolderDataModule(str(root))


def test_validate_and_test_scan_the_validation_images(tmp_path):
    root = _class_tree(tmp_path)
    bad = root / "val" / "cat" / "0.png"
    bad.write_bytes(b"not an image")
    for stage in ("validate", "test"):
        with pytest.raises(DatasetError, match=f"{bad}: cannot read this image"):
            ImageFolderDataModule(str(root), num_workers=0).setup(stage)


def test_predict_lists_every_unreadable_image_and_skips_hidden_folders(tmp_path):
    root = _class_tree(tmp_path / "data")
    new = tmp_path / "new"
    _image(new / "good.png")
    _image(new / "sub" / "fine.png")
    _image(new / ".ipynb_checkpoints" / "good-checkpoint.png")
    broken = [new / "a.png", new / "sub" / "b.jpg"]
    for path in broken:
        path.write_bytes(b"garbage")
    data = ImageFolderDataModule(str(root), num_workers=0, predict_root=str(new))
    with pytest.raises(DatasetError, match="2 problems") as raised:
        data.setup("predict")
    assert all(str(path) in str(raised.value) for path in broken)
    for path in broken:
        path.unlink()
    data.setup("predict")
    assert data.predict_dataset.paths == [new / "good.png", new / "sub" / "fine.png"]


def test_fewer_images_to_predict_than_processes_is_named(tmp_path):
    new = tmp_path / "new"
    _image(new / "only.png")
    classification = ImageFolderDataModule(str(_class_tree(tmp_path / "c")), num_workers=0, predict_root=str(new))
    segmentation = SegmentationFolderDataModule(str(_segmentation_tree(tmp_path / "s")), num_workers=0,
                                                predict_root=str(new))
    for data in (classification, segmentation):
        data.trainer = SimpleNamespace(world_size=2, accelerator=CPUAccelerator())
        with pytest.raises(DatasetError, match=f"1 image\\(s\\) to predict in {new} for 2 processes: .*"
                                               "--trainer.devices 1"):
            data.setup("predict")
        data.trainer = SimpleNamespace(world_size=1, accelerator=CPUAccelerator())
        data.setup("predict")


@pytest.mark.parametrize("world_size, drop_last", [(1, True), (16, False)])
def test_last_partial_batch_is_dropped_only_when_every_process_keeps_a_batch(tmp_path, world_size, drop_last):
    """1000 samples in batches of 64: one process has 15 full batches; 16 processes have 63 samples each."""
    classification = ImageFolderDataModule(str(_class_tree(tmp_path / "c")), batch_size=64, num_workers=0)
    segmentation = SegmentationFolderDataModule(str(_segmentation_tree(tmp_path / "s")), batch_size=64, num_workers=0)
    for data in (classification, segmentation):
        data.trainer = SimpleNamespace(world_size=world_size, accelerator=CPUAccelerator())
        data.train_dataset = list(range(1000))
        assert data.train_dataloader().drop_last is drop_last


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
    labels = np.full((40, 40), 2, dtype=np.uint8)
    labels[:10, :10], labels[20:] = 3, 1
    _mask(root / "annotations" / "training" / "1.png", labels)
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


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validation_masks_are_scanned_before_validate_and_test(tmp_path, stage):
    root = _segmentation_tree(tmp_path)
    _mask(root / "val" / "masks" / "0.png", np.zeros((20, 40)))
    _mask(root / "val" / "masks" / "1.png", np.full((40, 40), 7))
    data = SegmentationFolderDataModule(str(root), classes=["a", "b"], num_workers=0)
    with pytest.raises(DatasetError, match="2 problems") as raised:
        data.setup(stage)
    assert "val/masks/0.png: mask size 40x20 differs from its image 0.jpg (40x40)" in str(raised.value)
    assert "val/masks/1.png: label 7 is outside the class range 0..1" in str(raised.value)


def test_segmentation_predict_scans_the_images_first(tmp_path):
    root = _segmentation_tree(tmp_path / "data")
    broken = _image(tmp_path / "new" / "photo.jpg")
    broken.write_bytes(broken.read_bytes()[:100])
    data = SegmentationFolderDataModule(str(root), num_workers=0, predict_root=str(tmp_path / "new"))
    with pytest.raises(DatasetError, match=f"{broken}: cannot read this image"):
        data.setup("predict")


def _antialiased(labels: np.ndarray) -> np.ndarray:
    """0/255 labels with a few in-between values along the object's edges (a soft brush, a resize)."""
    labels = labels.copy()
    labels[:10, 10], labels[10, :10] = 128, 64
    return labels


@pytest.mark.parametrize("case", ["binary", "anti-aliased", "with classes.txt"])
def test_binary_masks_of_0_and_255_say_that_255_is_ignored_and_how_to_rewrite_them(tmp_path, case):
    root = _segmentation_tree(tmp_path, label=255)
    if case == "anti-aliased":
        for mask in root.glob("*/masks/*.png"):
            _mask(mask, _antialiased(np.asarray(Image.open(mask))))
    if case == "with classes.txt":
        (root / "classes.txt").write_text("background\nobject\n")
    with pytest.raises(DatasetError, match=f"{root / 'train' / 'masks'}: (the training masks hold a single class|"
                                           ".* never occur)") as raised:
        SegmentationFolderDataModule(str(root), num_workers=0).setup("fit")
    message = str(raised.value)
    assert "255 is the ignore index" in message and "2 mask(s) hold it (0.png, 1.png)" in message
    assert "write the objects as 1 instead (numpy: (mask > 127).astype(np.uint8)" in message


def test_a_class_no_training_mask_holds_is_named_in_a_warning(tmp_path):
    root = _segmentation_tree(tmp_path)
    (root / "classes.txt").write_text("background\nroad\ncar\nbus\n")
    data = SegmentationFolderDataModule(str(root), num_workers=0)
    with pytest.warns(UserWarning, match=f"{root / 'train' / 'masks'}: 2 of the 4 classes never occur in the training "
                                         r"masks \(car, bus\), so the model cannot learn them"):
        data.setup("fit")


def test_named_classes_with_void_borders_wider_than_the_objects_are_trusted(tmp_path):
    """VOC draws the ignore index around objects: around small ones it covers more pixels than they do. With the
    classes named, that is no sign of 0/255 masks; a class absent from training is only warned about."""
    root = _segmentation_tree(tmp_path, label=255)
    for mask in root.glob("*/masks/*.png"):
        labels = np.asarray(Image.open(mask)).copy()
        labels[3:7, 3:7] = 1                                  # a 4x4 car inside a 10x10 void border
        _mask(mask, labels)
    (root / "classes.txt").write_text("background\ncar\nperson\n")
    data = SegmentationFolderDataModule(str(root), num_workers=0)
    with pytest.warns(UserWarning, match=r"1 of the 3 classes never occur in the training masks \(person\)"):
        data.setup("fit")
    assert data.class_names == ["background", "car", "person"]


def test_masks_holding_only_the_ignore_index_are_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    for mask in root.glob("*/masks/*.png"):
        _mask(mask, np.full((40, 40), 255))
    with pytest.raises(DatasetError, match=f"{root / 'train' / 'masks'}, {root / 'val' / 'masks'}: every mask holds "
                                           "only the ignore index 255"):
        SegmentationFolderDataModule(str(root))


def test_a_single_segmentation_class_is_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    with pytest.raises(DatasetError, match=f"{root}: one class \\(object\\)"):
        SegmentationFolderDataModule(str(root), classes=["object"])


def test_images_sharing_a_stem_are_named(tmp_path):
    root = _segmentation_tree(tmp_path)
    _image(root / "train" / "images" / "1.png")
    with pytest.raises(DatasetError, match=r"train/images: files differing only in extension .*1.jpg and 1.png"):
        SegmentationFolderDataModule(str(root))


def test_jpeg_masks_are_refused(tmp_path):
    root = _segmentation_tree(tmp_path)
    (root / "val" / "masks" / "1.png").unlink()
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(root / "val" / "masks" / "1.jpg")
    with pytest.raises(DatasetError, match=r"val/masks/1.jpg: masks must be lossless"):
        SegmentationFolderDataModule(str(root))


def test_mask_drawn_on_the_upright_phone_photo_fits(tmp_path):
    """The photo is stored 40 wide and 30 high with EXIF orientation 6: shown 30 wide and 40 high, top half red."""
    root = _segmentation_tree(tmp_path, size=(30, 40))
    stored = np.zeros((30, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(root / "val" / "images" / "0.jpg", exif=exif, quality=95)
    labels = np.zeros((40, 30), dtype=np.uint8)
    labels[:20] = 1                                   # the red half, as the user sees it
    _mask(root / "val" / "masks" / "0.png", labels)
    data = SegmentationFolderDataModule(str(root), image_size=32, num_workers=0)
    data.setup("fit")
    image, target = data.val_dataset[0]
    red = image[0] > image[2]
    assert (red == (target == 1)).float().mean() > 0.95


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


def test_a_jpeg_thinner_than_the_check_scale_is_checked(tmp_path):
    """The scan decodes JPEGs at 1/8 of their size: a side under 8 pixels must not become 0."""
    root = _class_tree(tmp_path)
    Image.new("RGB", (600, 4), (90, 90, 90)).save(root / "train" / "cat" / "banner.jpg")
    data = ImageFolderDataModule(str(root), image_size=32, num_workers=0)
    data.setup("fit")
    assert root / "train" / "cat" / "banner.jpg" in [path for path, _ in data.train_samples]


def test_truncated_images_of_other_formats_are_listed_before_training(tmp_path):
    root = _class_tree(tmp_path)
    cut = [root / "train" / "cat" / "scan.bmp", root / "val" / "dog" / "scan.tif"]
    for path in cut:
        _image(path, size=(64, 64))
        path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DatasetError, match="2 problems") as raised:
        ImageFolderDataModule(str(root), num_workers=0).setup("fit")
    assert all(f"{path}: cannot read this image" in str(raised.value) for path in cut)


def test_images_of_any_extension_pillow_reads_are_used_and_other_files_named(tmp_path):
    root = _class_tree(tmp_path)
    for split in ("train", "val"):
        for item in range(2):
            _image(root / split / "fox" / f"{item}.jpg").rename(root / split / "fox" / f"{item}.jfif")
    Image.new("RGB", (40, 40)).save(root / "train" / "cat" / "IMG_0001", format="PNG")
    with pytest.warns(UserWarning, match=f"1 file\\(s\\) left out, as their names do not end like an image file's "
                                         f".*: {root / 'train' / 'cat' / 'IMG_0001'}"):
        data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["cat", "dog", "fox"] and [label for _, label in data.train_samples].count(2) == 2


def test_files_left_out_of_the_prediction_folder_are_named(tmp_path):
    new = tmp_path / "new"
    _image(new / "a.png")
    Image.new("RGB", (40, 40)).save(new / "b.jfif", format="JPEG")
    (new / "c.svg").write_text("<svg/>")
    data = ImageFolderDataModule(str(_class_tree(tmp_path / "data")), num_workers=0, predict_root=str(new))
    with pytest.warns(UserWarning, match=f"1 file\\(s\\) left out, .*: {new / 'c.svg'}"):
        data.setup("predict")
    assert data.predict_dataset.paths == [new / "a.png", new / "b.jfif"]


def test_linked_sub_folders_are_followed_and_images_outside_class_folders_named(tmp_path):
    root = _class_tree(tmp_path / "pets")
    more = [_image(tmp_path / "elsewhere" / f"{item}.png") for item in range(2)]
    (root / "train" / "cat" / "more").symlink_to(tmp_path / "elsewhere")
    stray = _image(root / "train" / "stray.png")
    with pytest.warns(UserWarning, match=f"1 file\\(s\\) left out, as they lie in {root / 'train'} itself, outside "
                                         f"the class folders; move them into their class folder: {stray}"):
        data = ImageFolderDataModule(str(root), num_workers=0)
    cats = [path for path, label in data.train_samples if label == 0]
    assert len(cats) == 5 and [root / "train" / "cat" / "more" / path.name for path in more] == cats[-2:]


def test_segmentation_images_in_sub_folders_pair_with_masks_in_the_same_sub_folders(tmp_path):
    root = _segmentation_tree(tmp_path)
    for city in ("aachen", "bremen"):
        _image(root / "train" / "images" / city / "0.png")
        _mask(root / "train" / "masks" / city / "0.png", np.ones((40, 40)))
    data = SegmentationFolderDataModule(str(root), num_workers=0)
    pairs = {(str(image.relative_to(root)), str(mask.relative_to(root))) for image, mask in data.train_pairs}
    assert ("train/images/aachen/0.png", "train/masks/aachen/0.png") in pairs and len(pairs) == 4
    (root / "train" / "masks" / "bremen" / "0.png").unlink()
    with pytest.raises(DatasetError, match=f"images/bremen/0.png: no mask with the same name in "
                                           f"{root}/train/masks/bremen"):
        SegmentationFolderDataModule(str(root), num_workers=0)


def test_a_class_called_train_in_one_folder_of_classes_is_a_class(tmp_path):
    root = _class_tree(tmp_path, classes=("bus", "car", "train"), per_class=5, splits=(".",))
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["bus", "car", "train"] and len(data.val_samples) == 3


def test_mask_drawn_on_the_stored_pixels_of_a_turned_photo_is_explained(tmp_path):
    root = _segmentation_tree(tmp_path, size=(60, 40))
    photo = Image.open(root / "train" / "images" / "0.jpg")
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(root / "train" / "images" / "0.jpg", exif=exif)
    with pytest.raises(DatasetError, match=r"masks/0.png: mask size 60x40 differs from its image 0.jpg \(40x60\): "
                                           r"0.jpg is stored as 60x40, but its EXIF orientation 6 displays it as "
                                           r"40x60; masks must match the picture as displayed"):
        SegmentationFolderDataModule(str(root), num_workers=0)


def test_classes_txt_saved_with_a_byte_order_mark(tmp_path):
    root = _segmentation_tree(tmp_path)
    (root / "classes.txt").write_bytes("background\r\nroad\r\n".encode("utf-8-sig"))
    assert SegmentationFolderDataModule(str(root), num_workers=0).class_names == ["background", "road"]


@pytest.mark.parametrize("module, arguments, message", [
    (ImageFolderDataModule, dict(image_size=0), "image_size=0: must be a side of 1 pixel or more"),
    (SegmentationFolderDataModule, dict(scale=(1.0, 0.5)), r"scale=\(1.0, 0.5\): must be \(smallest, largest\)"),
    (SegmentationFolderDataModule, dict(batch_size=0), "batch_size=0: must be 1 or more"),
    (ImageFolderDataModule, dict(hflip=2), r"hflip=2: must be a probability in \[0, 1\]"),
    (ImageFolderDataModule, dict(auto_augment="randaug"), "auto_augment='randaug': not a timm augmentation policy"),
    (SegmentationFolderDataModule, dict(layout="coco"), r"layout='coco': must be one of \['ade20k', 'folders'\]"),
])
def test_arguments_out_of_range_are_named_when_the_module_is_made(tmp_path, module, arguments, message):
    root = _class_tree(tmp_path) if module is ImageFolderDataModule else _segmentation_tree(tmp_path)
    with pytest.raises(DatasetError, match=message):
        module(str(root), num_workers=0, **arguments)


def test_one_folder_split_holds_out_each_class_in_proportion(tmp_path):
    root = _class_tree(tmp_path, classes=("a", "b"), per_class=1, splits=(".",))
    _class_tree(root, classes=("c",), per_class=10, splits=(".",))
    data = ImageFolderDataModule(str(root), val_fraction=0.5, num_workers=0)
    assert sorted(label for _, label in data.train_samples) == [0, 1] + [2] * 5
    assert sorted(label for _, label in data.val_samples) == [2] * 5
    small = ImageFolderDataModule(str(_class_tree(tmp_path / "small", per_class=2, splits=(".",))), num_workers=0)
    assert len(small.val_samples) == 1 and sorted(label for _, label in small.train_samples) == [0, 1, 1]
    tiny = _class_tree(tmp_path / "tiny", per_class=1, splits=(".",))
    with pytest.raises(DatasetError, match=f"{tiny}: val_fraction=0.2 holds out no validation image"):
        ImageFolderDataModule(str(tiny), num_workers=0)


def test_class_folder_names_written_decomposed_match(tmp_path):
    root = _class_tree(tmp_path, classes=("caf\u00e9", "dog"), splits=("train",))
    _class_tree(root, classes=("cafe\u0301",), splits=("val",))
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["caf\u00e9", "dog"]
    assert {(path.parent.name, label) for path, label in data.val_samples} == {("cafe\u0301", 0)}


@pytest.mark.parametrize("splits", [("Train", "Val"), ("training", "validation", "test")])
def test_split_folders_named_otherwise_are_refused_not_taken_as_classes(tmp_path, splits):
    root = _class_tree(tmp_path, splits=splits)
    with pytest.raises(DatasetError, match=f"{root}: the folders {', '.join(sorted(splits))} look like split folders "
                                           r"\(.*: cat, dog\).* exactly .*/train/<class> and .*/val/<class>"):
        ImageFolderDataModule(str(root), num_workers=0)


def test_classes_sorted_into_sub_folders_of_the_same_names_stay_classes(tmp_path):
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        _class_tree(root / name, classes=("indoor", "outdoor"), splits=(".",))
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["cat", "dog"] and len(data.train_samples) + len(data.val_samples) == 12


def _unscanned_item_error(root: Path, split: str, **arguments) -> str:
    data = SegmentationFolderDataModule(str(root), image_size=32, num_workers=0, scan=False, **arguments)
    data.setup("fit")
    dataset = data.train_dataset if split == "train" else data.val_dataset
    with pytest.raises(DatasetError) as raised:
        for index in range(len(dataset)):
            dataset[index]
    return str(raised.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_without_the_scan_a_mask_of_another_size_is_named_when_read(tmp_path, split):
    root = _segmentation_tree(tmp_path)
    bad = _mask(root / split / "masks" / "1.png", np.zeros((30, 40)))
    message = _unscanned_item_error(root, split, classes=["a", "b"])
    assert message == f"{bad}: mask size 40x30 differs from its image 1.jpg (40x40)"


def test_without_the_scan_a_label_outside_the_class_range_is_named_when_read(tmp_path):
    root = _segmentation_tree(tmp_path)
    bad = _mask(root / "val" / "masks" / "0.png", np.full((40, 40), 7))
    message = _unscanned_item_error(root, "val", classes=["a", "b"])
    assert message == f"{bad}: label 7 is outside the class range 0..1 (and is not the ignore index 255)"


def test_under_reduce_zero_label_an_out_of_range_label_quotes_the_stored_value(tmp_path):
    root = _segmentation_tree(tmp_path, layout="ade20k", label=3)
    (root / "classes.txt").write_text("other\nwall\nfloor\n")
    data = SegmentationFolderDataModule(str(root), layout="ade20k", reduce_zero_label=True, num_workers=0)
    with pytest.raises(DatasetError, match=r"0.png: label 2 \(stored value 3, lowered by one by reduce_zero_label\) "
                                           r"is outside the class range 0..1"):
        data.setup("fit")


def test_reduce_zero_label_says_which_name_of_classes_txt_it_drops(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    root = _segmentation_tree(tmp_path, layout="ade20k", label=2)
    (root / "classes.txt").write_text("bg\nroad\ncar\n")
    with caplog.at_level(logging.INFO):
        data = SegmentationFolderDataModule(str(root), layout="ade20k", reduce_zero_label=True, num_workers=0)
    assert data.class_names == ["road", "car"]
    assert "so the first name, 'bg', is dropped as the name of value 0; the classes are road, car" in caplog.text


def test_reduce_zero_label_with_a_single_name_in_classes_txt_is_named(tmp_path):
    root = _segmentation_tree(tmp_path, layout="ade20k", label=2)
    (root / "classes.txt").write_text("road\n")
    with pytest.raises(DatasetError, match="classes.txt: reduce_zero_label .* 'road', is dropped .*no class is left"):
        SegmentationFolderDataModule(str(root), layout="ade20k", reduce_zero_label=True, num_workers=0)


@pytest.mark.parametrize("values, outliers, holding", [((0, 1, 2, 200), "200", "1 mask(s) (1.png)"),
                                                       ((0, 85, 170), "85, 170", "2 mask(s) (0.png, 1.png)")])
def test_implied_classes_mostly_absent_are_refused_with_the_values_and_masks(tmp_path, values, outliers, holding):
    """A stray value, or classes scaled for visibility: without class names, the largest value implies the count."""
    root = _segmentation_tree(tmp_path)
    for item in range(2):
        labels = np.zeros((40, 40), dtype=np.uint8)
        for row, value in enumerate(values[1:-1] if item == 0 else values[1:]):
            labels[row * 10:row * 10 + 4] = value
        _mask(root / "train" / "masks" / f"{item}.png", labels)
    with pytest.raises(DatasetError, match=f"the training masks hold the values {', '.join(map(str, values))} .*"
                                           f"implies {values[-1] + 1} classes.*the values {outliers} are in "
                                           f"{re.escape(holding)}.*root/classes.txt or --data.classes"):
        SegmentationFolderDataModule(str(root), num_workers=0)


def test_counting_the_classes_reports_training_and_validation_problems_at_once(tmp_path):
    root = _segmentation_tree(tmp_path)
    cut = root / "train" / "images" / "0.jpg"
    cut.write_bytes(cut.read_bytes()[:100])
    (root / "val" / "masks" / "1.png").write_bytes(b"")
    beyond = _mask(root / "val" / "masks" / "0.png", np.full((40, 40), 3))
    with pytest.raises(DatasetError, match="3 problems") as raised:
        SegmentationFolderDataModule(str(root), num_workers=0)
    message = str(raised.value)
    assert f"{cut}: cannot read this image" in message and f"{root / 'val' / 'masks' / '1.png'}: cannot read" in message
    assert (f"{beyond}: label 3 is outside the class range 0..1 that the training masks' largest label implies "
            "(root/classes.txt or --data.classes can name more classes)") in message


def test_masks_without_an_image_are_named_in_a_warning(tmp_path):
    root = _segmentation_tree(tmp_path)
    orphan = _mask(root / "val" / "masks" / "deleted.png", np.zeros((40, 40)))
    with pytest.warns(UserWarning, match=f"1 file\\(s\\) left out, as no image in {root / 'val' / 'images'} has the "
                                         f"same name .*: {orphan}"):
        data = SegmentationFolderDataModule(str(root), num_workers=0)
    assert len(data.val_pairs) == 2


@pytest.mark.parametrize("module, model_name, image_size, smallest", [
    (ImageFolderDataModule, "biformer_tiny", 16, 32), (SegmentationFolderDataModule, "debiformer_tiny", 24, 32),
    (ImageFolderDataModule, "biformer_stl_nchw", 31, 32)])
def test_an_image_size_below_the_models_smallest_input_is_named(tmp_path, module, model_name, image_size, smallest):
    """The smallest side whatever the model's arguments: the 32 px stride of the four stages. (BiFormer-STL NCHW's
    default 7x7 region grid needs 112 px, but a smaller ``n_wins`` takes less: its model checks that.)"""
    root = _class_tree(tmp_path) if module is ImageFolderDataModule else _segmentation_tree(tmp_path)
    with pytest.raises(DatasetError, match=f"image_size={image_size}: must be at least {smallest} for {model_name}"):
        module(str(root), model_name=model_name, image_size=image_size, num_workers=0)
    data = module(str(root), model_name=model_name, image_size=smallest, num_workers=0)
    assert data.data_config.image_size == smallest


def test_macos_zip_folders_are_skipped(tmp_path):
    root = _class_tree(tmp_path)
    (root / "train" / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "train" / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\0")
    (root / "train" / "dog" / "__MACOSX").mkdir()
    (root / "train" / "dog" / "__MACOSX" / "notes.txt").write_text("resource fork")
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["cat", "dog"]


def test_a_prediction_root_that_is_a_file_is_named_as_such(tmp_path):
    photo = _image(tmp_path / "photo.png")
    data = ImageFolderDataModule(str(_class_tree(tmp_path / "data")), num_workers=0, predict_root=str(photo))
    with pytest.raises(DatasetError, match=f"{photo}: the prediction folder is a file, not a folder"):
        data.setup("predict")


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_workers_are_capped_at_the_usable_cpus_with_a_message(tmp_path, monkeypatch, caplog, kind):
    """A config's num_workers: 8 on a 2-CPU machine loads with 2 workers (and says so); 1 stays 1."""
    monkeypatch.setattr(classification, "usable_cpus", lambda: 2)
    if kind == "classification":
        build = lambda workers: ImageFolderDataModule(str(_class_tree(tmp_path / "c")), image_size=32,  # noqa: E731
                                                      batch_size=2, num_workers=workers)
    else:
        build = lambda workers: SegmentationFolderDataModule(str(_segmentation_tree(tmp_path / "s")),  # noqa: E731
                                                             image_size=32, batch_size=2, num_workers=workers)
    with caplog.at_level(logging.INFO):
        data = build(8)
        data.setup("fit")
        loaders = (data.train_dataloader(), data.val_dataloader())
    assert [loader.num_workers for loader in loaders] == [2, 2]
    assert all(loader.persistent_workers for loader in loaders)
    assert "num_workers=8: this process may use 2 CPUs" in caplog.text
    assert not any(loader.pin_memory for loader in loaders)          # no trainer here: nothing to copy to a GPU
    data = build(1)
    data.setup("fit")
    assert data.train_dataloader().num_workers == 1


def test_batches_for_a_cuda_trainer_come_in_page_locked_memory(tmp_path, monkeypatch):
    data = ImageFolderDataModule(str(_class_tree(tmp_path)), image_size=32, batch_size=2, num_workers=0)
    data.setup("fit")
    cuda_trainer = SimpleNamespace(accelerator=CUDAAccelerator(), world_size=1)
    cpu_trainer = SimpleNamespace(accelerator=CPUAccelerator(), world_size=1)
    monkeypatch.setattr(data, "trainer", cuda_trainer)
    assert data.train_dataloader().pin_memory and data.val_dataloader().pin_memory
    monkeypatch.setattr(data, "trainer", cpu_trainer)
    assert not data.train_dataloader().pin_memory
