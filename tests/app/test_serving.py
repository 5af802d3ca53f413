"""Serving as units: reading uploads, loading checkpoints, the cached forward pass, the embedded model."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import bilevel
from bilevel.data.images import image_to_tensor, list_images, read_image, read_mask
from bilevel.data.shapes import SHAPE_CLASSES
from bilevel.serving import (EMBEDDED_CHECKPOINT, EMBEDDED_SEGMENTATION_CHECKPOINT, EMBEDDED_SEGMENTATION_MODEL,
                             MIN_IMAGE_SIDE, WORKING_IMAGE_SIDE, Predictor, ServingError, fit_picture,
                             load_served_model, read_upload)
from bilevel.tasks import SemanticSegmenter
from bilevel.viz.routing_view import routing_layers

from .conftest import encoded, write_bytes

BAD_UPLOAD_MESSAGES = {
    "not an image": "is not a readable image",
    "empty": "is empty",
    "1x1": f"1x1 pixels: it needs at least {MIN_IMAGE_SIDE}",
    "truncated jpeg": "is not a readable image",
}


@pytest.mark.parametrize("kind", sorted(BAD_UPLOAD_MESSAGES))
def test_bad_uploads_get_a_message_without_the_server_path(kind, bad_uploads):
    with pytest.raises(ServingError, match=BAD_UPLOAD_MESSAGES[kind]) as caught:
        read_upload(bad_uploads[kind])
    assert str(bad_uploads[kind].parent) not in str(caught.value)
    assert str(caught.value).startswith("the uploaded file" if kind != "1x1" else "the image is")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_any_colour_mode_arrives_as_rgb(mode, tmp_path):
    pixels = np.random.RandomState(1).randint(0, 255, (40, 50, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    path = write_bytes(tmp_path, f"picture.{fmt.lower()}", encoded(image, fmt))
    picture = read_upload(path)
    assert picture.mode == "RGB" and picture.size == (50, 40)


def test_a_phone_photo_is_turned_upright(tmp_path):
    """A JPEG stored 60x30 with EXIF orientation 6 (rotate 90° clockwise) is shown 30x60, as any viewer shows it."""
    stored = Image.new("RGB", (60, 30), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 30))                 # a red band along the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write_bytes(tmp_path, "phone.jpg", encoded(stored, "JPEG", quality=95, exif=exif))
    picture = np.asarray(read_upload(path))
    assert picture.shape == (60, 30, 3)
    top, bottom = picture[:5].reshape(-1, 3).mean(0), picture[-5:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[1] < 80 and bottom.min() > 200, "the left edge turns to the top"


def test_a_huge_image_is_shrunk_to_the_working_size(tmp_path):
    huge = Image.new("L", (10000, 10000), 90)
    path = write_bytes(tmp_path, "huge.png", encoded(huge, "PNG", compress_level=1))
    del huge
    with pytest.warns(Image.DecompressionBombWarning):
        picture = read_upload(path)
    assert picture.size == (WORKING_IMAGE_SIDE, WORKING_IMAGE_SIDE)
    wide = fit_picture(Image.new("RGB", (3000, 600)))
    assert wide.size == (WORKING_IMAGE_SIDE, round(600 * WORKING_IMAGE_SIDE / 3000))


def test_embedded_model_is_small_and_names_its_classes(embedded):
    assert EMBEDDED_CHECKPOINT.stat().st_size < 4e6
    assert embedded.class_names == tuple(sorted(bilevel.data.shapes.SHAPE_CLASSES))
    assert embedded.input_size == 64 and not embedded.model.training


def test_embedded_model_classifies_the_builtin_validation_pictures(embedded, shapes_root):
    predictor = Predictor(capacity=1)
    val = shapes_root / "classification" / "val"
    correct = total = 0
    for label in embedded.class_names:
        for path in list_images(val / label):
            top = predictor.analyse(embedded, fit_picture(read_image(path))).top(1)
            correct += next(iter(top)) == label
            total += 1
    assert total == 48 and correct / total >= 0.95


def test_embedded_segmenter_segments_the_builtin_validation_pictures(shapes_root):
    served = load_served_model(EMBEDDED_SEGMENTATION_MODEL)
    assert served.task == "segmentation" and EMBEDDED_SEGMENTATION_CHECKPOINT.stat().st_size < 4e6
    assert served.class_names == ("background", *SHAPE_CLASSES) and served.input_size == 64
    predictor = Predictor(capacity=1)
    val = shapes_root / "segmentation" / "val"
    agreement = []
    for path in list_images(val / "images"):
        analysis = predictor.analyse(served, fit_picture(read_image(path)))
        truth = read_mask(val / "masks" / path.name)
        assert analysis.mask.shape == truth.shape
        agreement.append(float((analysis.mask.numpy() == truth).mean()))
        shares = np.bincount(analysis.mask.numpy().ravel(), minlength=5) / truth.size
        assert np.allclose(analysis.probabilities.numpy(), shares)
        assert set(analysis.top(5)) == {served.class_names[i] for i in np.flatnonzero(shares)}
        assert {record.kind for record in analysis.records} == {"bra"}
    assert len(agreement) == 48 and np.mean(agreement) > 0.95, agreement


def small_segmenter(**overrides) -> SemanticSegmenter:
    settings = dict(model_name="biformer_tiny", num_classes=3, class_names=["sky", "road", "car"],
                    model_kwargs={"depth": [1, 1, 1, 1], "embed_dim": [32, 64, 128, 256], "qk_dims": [32, 64, 128, 256],
                                  "n_win": 8},
                    head_kwargs={"fpn_channels": 16, "head_channels": 16})
    return SemanticSegmenter(**{**settings, **overrides}).eval()


def test_segmentation_checkpoint_serves_its_module_and_reads_no_stored_path(tmp_path):
    module = small_segmenter()
    hyper = {**dict(module.hparams), "checkpoint_path": str(tmp_path / "server-secret.pth"), "_instantiator": "x"}
    path = tmp_path / "segmenter.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hyper,
                "datamodule_hyper_parameters": {"image_size": 64}}, path)
    served = load_served_model(checkpoint=path)
    assert (served.task, served.name, served.class_names, served.input_size) == (
        "segmentation", "biformer_tiny", ("sky", "road", "car"), 64)
    picture = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    analysis = Predictor().analyse(served, picture)
    with torch.no_grad():
        expected = module(image_to_tensor(picture)[None]).argmax(1)[0]
    assert torch.equal(analysis.mask, expected)


def test_segmentation_checkpoint_of_another_shape_gets_a_message(tmp_path):
    module = small_segmenter(head_kwargs={"fpn_channels": 32, "head_channels": 16})
    hyper = {**dict(small_segmenter().hparams)}
    path = tmp_path / "segmenter.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hyper}, path)
    with pytest.raises(ServingError, match="the uploaded checkpoint") as caught:
        load_served_model(checkpoint=path, label="the uploaded checkpoint")
    assert str(tmp_path) not in str(caught.value)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {**hyper, "head": "mask-rcnn"}}, path)
    with pytest.raises(ServingError, match="cannot build the segmentation model stored in segmenter.ckpt"):
        load_served_model(checkpoint=path)


def test_segmentation_checkpoint_with_stage_norms_serves_them(tmp_path):
    module = small_segmenter(stage_norms=True)
    for norm in module.stage_norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    path = tmp_path / "segmenter.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"image_size": 64}}, path)
    served = load_served_model(checkpoint=path)
    torch.testing.assert_close(served.model.stage_norms.state_dict(), module.stage_norms.state_dict())
    picture = Image.fromarray(np.random.RandomState(1).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = module(image_to_tensor(picture)[None]).argmax(1)[0]
    assert torch.equal(Predictor().analyse(served, picture).mask, expected)


@pytest.mark.parametrize("extra_norm", ["extra_norms.0.weight", "extra_norms.0.ln.weight", None],
                         ids=["biformer", "debiformer", "crossformer"])
def test_official_mmseg_checkpoint_is_refused_with_the_way_to_fine_tune_from_it(tmp_path, extra_norm):
    backbone = bilevel.create_model("biformer_tiny", num_classes=0, depth=(1, 1, 1, 1)).state_dict()
    state = {f"backbone.{key}": value for key, value in backbone.items()}
    if extra_norm is not None:
        state[f"backbone.{extra_norm}"] = torch.ones(64)
    state.update({"decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
                  "auxiliary_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)})
    path = tmp_path / "upernet_biformer_small_512x512_160k_ade20k.pth"
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.5)}}, "state_dict": state, "optimizer": {}}, path)
    expected = ("the uploaded checkpoint is an official mmseg segmentation checkpoint, whose heads bilevel does not "
                "rebuild: fine-tune from it with bilevel fit --config lightning_configs/<family>_segmentation.yaml "
                "--model.model_name <its variant> --model.checkpoint_path <this file> --model.stage_norms true "
                "(BiFormer, DeBiFormer) and serve that run's checkpoint")
    for name in ("biformer_tiny", None):
        with pytest.raises(ServingError) as caught:
            load_served_model(name, path, label="the uploaded checkpoint")
        assert str(caught.value) == expected


def test_one_forward_pass_per_picture_and_model(embedded, shape_pictures):
    predictor = Predictor(capacity=2)
    circle, square = (fit_picture(read_image(shape_pictures[name])) for name in ("circle", "square"))
    first = predictor.analyse(embedded, circle)
    assert predictor.analyse(embedded, circle.copy()) is first and predictor.forward_passes == 1
    predictor.analyse(embedded, square)
    assert predictor.forward_passes == 2
    top = first.top(5)
    assert list(top) == sorted(top, key=top.get, reverse=True) and abs(sum(top.values()) - 1) < 1e-5
    layers = routing_layers(first.records)
    assert layers and all(record.indices.shape[0] == 1 for record in layers.values())


def test_concurrent_requests_for_one_picture_share_one_forward_pass(embedded, shape_pictures):
    predictor = Predictor()
    picture = fit_picture(read_image(shape_pictures["cross"]))
    results = []
    threads = [threading.Thread(target=lambda: results.append(predictor.analyse(embedded, picture)))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert predictor.forward_passes == 1 and all(result is results[0] for result in results)


def test_official_layout_checkpoint_with_imagenet_names(tmp_path):
    from timm.data import ImageNetInfo

    model = bilevel.create_model("biformer_tiny", num_classes=1000, depth=(1, 1, 1, 1))
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": None}, path)
    with pytest.raises(ServingError, match="does not fit biformer_tiny"):
        load_served_model("biformer_tiny", path, label="the uploaded checkpoint")     # default depth: 2, 2, 8, 2
    torch.save({"model": bilevel.create_model("biformer_tiny").state_dict()}, path)
    served = load_served_model("biformer_tiny", path)
    assert served.class_names[0] == ImageNetInfo().label_descriptions()[0] and served.input_size == 224


@pytest.mark.parametrize("payload, message", [
    (b"", "is empty"),
    (b"PK\x03\x04 not really a zip", "is not a PyTorch checkpoint"),
    ("tensor-free", "holds no model weights"),
])
def test_non_checkpoints_get_a_message(payload, message, tmp_path):
    path = tmp_path / "weights.pth"
    if payload == "tensor-free":
        torch.save({"epoch": 3}, path)
    else:
        path.write_bytes(payload)
    with pytest.raises(ServingError, match=message) as caught:
        load_served_model("biformer_tiny", path, label="the uploaded checkpoint")
    assert str(tmp_path) not in str(caught.value)


def test_checkpoint_trained_as_another_variant_is_refused():
    with pytest.raises(ServingError, match="trained as biformer_tiny, not biformer_small"):
        load_served_model("biformer_small", EMBEDDED_CHECKPOINT)
    with pytest.raises(ServingError, match="unknown model 'resnet50'"):
        load_served_model("resnet50")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": threading.Thread}, path)
    with pytest.raises(ServingError, match="weights-only"):
        load_served_model("biformer_tiny", path)


def test_embedded_routing_favours_the_object(shapes_root, monkeypatch):
    """benchmarks/routing_on_object.py on part of the validation split: some layer routes onto the object."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "routing_on_object.py"
    spec = importlib.util.spec_from_file_location("routing_on_object", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setenv("BILEVEL_CACHE", str(shapes_root.parent))
    result = benchmark.measure(pictures=16)
    layers = result["layers"].values()
    assert result["pictures"] == 16 and all(entry["queries"] > 0 for entry in layers)
    assert max(entry["routed"] / entry["chance"] for entry in layers) > 1.5
