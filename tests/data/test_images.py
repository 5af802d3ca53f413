"""The one image reader: every pixel format becomes 8-bit RGB; unreadable files are named."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.data import (DatasetError, ImageReadError, check_image, image_to_tensor, list_images, load_image_tensor,
                          read_image, read_mask)
from bilevel.data.images import folder_files


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


@pytest.mark.parametrize("image_format, name", [("BMP", "cut.bmp"), ("TIFF", "cut.tif"), ("GIF", "cut.gif"),
                                                ("PPM", "cut.ppm"), ("MPO", "cut.jpg")])
def test_truncated_file_of_any_format_is_caught_by_the_quick_check(tmp_path, image_format, name):
    picture = Image.fromarray(np.random.RandomState(0).randint(0, 255, (80, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    extra = dict(save_all=True, append_images=[picture]) if image_format == "MPO" else {}
    picture.save(buffer, format=image_format, **extra)
    path = tmp_path / name
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 10])
    with pytest.raises(ImageReadError, match=f"{name}: cannot read this image"):
        check_image(path)


def test_every_file_pillow_reads_is_listed_and_the_others_are_returned(tmp_path):
    for name, image_format in [("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.tga", "TGA"), ("d.ico", "ICO"),
                               ("e.PNM", "PPM"), ("IMG_0001", "PNG")]:
        Image.new("RGB", (16, 16)).save(tmp_path / name, format=image_format)
    for name in ("notes.txt", "Thumbs.db", ".DS_Store"):
        (tmp_path / name).write_text("not a picture")
    files = folder_files(tmp_path)
    assert [path.name for path in files.images] == ["a.jfif", "b.jpe", "c.tga", "d.ico", "e.PNM"]
    assert [path.name for path in files.others] == ["IMG_0001", "notes.txt"]
    assert all(read_image(path).size == (16, 16) for path in files.images)


def test_nan_pixels_of_a_float_image_become_black_and_the_rest_keeps_its_range(tmp_path):
    values = np.array([[np.nan, 0.0], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "nodata.tif")
    assert np.asarray(read_image(tmp_path / "nodata.tif"))[..., 0].tolist() == [[0, 0], [128, 255]]


def test_corrupt_exif_leaves_the_picture_as_stored_with_a_warning(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (60, 40)).save(path, exif=b"Exif\x00\x00" + b"\xff" * 40)
    for read, size in ((check_image, lambda result: result), (read_image, lambda result: result.size)):
        with pytest.warns(UserWarning, match=f"{path}: its EXIF metadata cannot be read .* used as stored"):
            assert size(read(path)) == (60, 40)


def test_links_to_folders_are_followed_once(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "class").mkdir()
    (tmp_path / "class" / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "class")
    assert list_images(tmp_path / "class", recursive=True) == [tmp_path / "class" / "more" / "x.png"]


def test_a_gray_mask_saved_as_rgb_is_refused_with_the_conversion(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((4, 4), 2, dtype=np.uint8)).convert("RGB").save(gray)
    with pytest.raises(ImageReadError, match=r"mode 'RGB'; its three channels are equal, so save it as one channel: "
                                             r"Image.open\(p\).convert\(\"L\"\).save\(p\)"):
        read_mask(gray)
    colour = tmp_path / "colour.png"
    Image.new("RGB", (4, 4), (128, 0, 0)).save(colour)
    with pytest.raises(ImageReadError, match="mode 'RGB'$"):
        read_mask(colour)
