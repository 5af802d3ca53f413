"""The one image reader: every pixel format becomes 8-bit RGB; unreadable files are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.data import (DatasetError, ImageReadError, check_image, image_to_tensor, list_images, load_image_tensor,
                          read_image, read_mask)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"picture.{'jpg' if mode == 'CMYK' else 'png'}"
    source = Image.new("RGB", (10, 6), (200, 30, 90))
    if mode == "I;16":
        Image.fromarray(np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000).save(path)
    else:
        source.convert(mode).save(path)
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (10, 6)


def test_sixteen_bit_range_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    assert np.asarray(read_image(path))[0, :, 0].tolist() == [0, 255]


def test_transparent_pixels_composite_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(path)
    assert np.asarray(read_image(path))[0, 0].tolist() == [255, 255, 255]


def test_tensor_is_normalised_with_the_given_statistics():
    image = Image.new("RGB", (3, 2), (255, 0, 51))
    tensor = image_to_tensor(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.1))
    assert tensor.shape == (3, 2, 3)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, -2.0, (0.2 - 0.5) / 0.1]))


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_are_named(tmp_path, content):
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image_tensor(path)


def test_truncated_file_is_an_error_not_a_grey_picture(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(path)


def test_palette_mask_keeps_indices_and_rgb_mask_is_refused(tmp_path):
    indices = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    palette_mask = Image.fromarray(indices, mode="P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (256 * 3 - 9))
    palette_mask.save(tmp_path / "mask.png")
    assert read_mask(tmp_path / "mask.png").tolist() == indices.tolist()
    Image.new("RGB", (2, 2)).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour.png.*single-channel"):
        read_mask(tmp_path / "colour.png")


def _exif_rotated(path, pixels: np.ndarray, orientation: int = 6, **save_args):
    """Save ``pixels`` (H, W[, 3]) stored as is, with an EXIF orientation telling viewers to turn it."""
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, **save_args)
    return path


def test_exif_orientation_turns_the_picture_upright(tmp_path):
    stored = np.zeros((20, 30, 3), dtype=np.uint8)
    stored[:, :15] = (255, 0, 0)          # left half red
    stored[:, 15:] = (0, 0, 255)          # right half blue
    path = _exif_rotated(tmp_path / "phone.jpg", stored, quality=95)
    picture = np.asarray(read_image(path)).astype(int)
    # orientation 6: viewers turn the stored picture 90 degrees clockwise, so its left half is on top
    assert picture.shape == (30, 20, 3)
    assert picture[5, 10].tolist() == pytest.approx([255, 0, 0], abs=40)
    assert picture[25, 10].tolist() == pytest.approx([0, 0, 255], abs=40)
    assert check_image(path) == (20, 30)


def test_exif_orientation_turns_the_mask_like_its_picture(tmp_path):
    stored = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = _exif_rotated(tmp_path / "mask.png", stored)
    assert read_mask(path).tolist() == np.rot90(stored, k=-1).tolist()


def test_truncated_jpeg_is_caught_by_the_quick_check(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="cut.jpg.*truncated"):
        check_image(path)


def test_image_over_the_pixel_limit_is_named_with_its_size(tmp_path, monkeypatch):
    path = tmp_path / "vast.png"
    Image.new("RGB", (30, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # PIL refuses more than twice this: 600 pixels are
    for read in (read_image, check_image):
        with pytest.raises(ImageReadError, match=r"vast.png: too large to decode safely \(Image size \(600 pixels\)"):
            read(path)


def test_listing_recurses_skips_hidden_and_names_broken_links(tmp_path):
    for name in ("b.png", "a/deep/c.jpg", ".ipynb_checkpoints/b-checkpoint.png", "a/.hidden.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    assert list_images(tmp_path) == [tmp_path / "b.png"]
    assert list_images(tmp_path, recursive=True) == [tmp_path / "a" / "deep" / "c.jpg", tmp_path / "b.png"]
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError, match=r"gone.png: broken symbolic link .*nowhere.png"):
        list_images(tmp_path)
