"""Checkpoint files (bilevel.models.loading): layouts, fine-tuning, input channels, names, bad files."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import timm
import torch

import bilevel
from bilevel.models.biformer import BiFormer
from bilevel.models.loading import (CheckpointError, _torch_reason, extract_state_dict, load_weights,
                                    read_checkpoint)

#: every layout at one block per stage (the variants' code paths at a fraction of the cost)
SHALLOW = {
    "biformer_tiny": dict(depth=(1, 1, 1, 1)),
    "biformer_stl": dict(depth=(1, 1, 1, 1)),
    "biformer_stl_nchw": dict(depth=(1, 1, 1, 1)),
    "debiformer_tiny": dict(depth=(1, 1, 1, 1)),
    "crossformer_tiny": dict(depths=(1, 1, 1, 1)),
}
TINY = SHALLOW["biformer_tiny"]


def _image(channels: int = 3, side: int = 112) -> torch.Tensor:
    return torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny():
    """A shallow biformer_tiny (1000 classes) in eval mode."""
    return bilevel.create_model("biformer_tiny", **TINY).eval()


def _save(tmp_path, contents, name="weights.pth"):
    path = tmp_path / name
    torch.save(contents, path)
    return path


@torch.no_grad()
def _assert_same_outputs(got, want, x=None):
    x = _image() if x is None else x
    torch.testing.assert_close(got.eval()(x), want.eval()(x))


# ------------------------------------------------------------------------------------ fine-tuning


def test_checkpoint_without_classifier_gets_a_fresh_one(tmp_path):
    headless = bilevel.create_model("biformer_tiny", num_classes=0, **TINY).eval()
    path = _save(tmp_path, headless.state_dict())
    with pytest.warns(UserWarning, match="re-initialised for 10 classes"):
        model = bilevel.create_model("biformer_tiny", checkpoint_path=path, num_classes=10, **TINY)
    assert model.head.weight.shape == (10, 512)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(_image()), headless.forward_features(_image()))
    with pytest.warns(UserWarning, match="re-initialised for 10 classes"):
        through_timm = timm.create_model("biformer_tiny", pretrained=True, num_classes=10,
                                         pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert through_timm.head.weight.shape == (10, 512)
    # without num_classes: the file's (none)
    _assert_same_outputs(bilevel.create_model("biformer_tiny", checkpoint_path=path, **TINY), headless)


# ------------------------------------------------------------------------------------ input channels


@pytest.mark.parametrize("name", sorted(SHALLOW))
def test_single_channel_model_from_an_rgb_checkpoint(tmp_path, name):
    """timm's adaptation sums the input convs over the colour channels: a grey image x then gives what the
    RGB model gives for (x, x, x)."""
    rgb = bilevel.create_model(name, **SHALLOW[name]).eval()
    path = _save(tmp_path, {"model": rgb.state_dict()})
    grey = bilevel.create_model(name, checkpoint_path=path, in_chans=1, **SHALLOW[name]).eval()
    x = _image(channels=1)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_four_channel_model_through_timm(tmp_path, tiny):
    """Four channels: the RGB weights repeated (R again for the 4th) and scaled by 3/4."""
    path = _save(tmp_path, tiny.state_dict())
    model = timm.create_model("biformer_tiny", pretrained=True, in_chans=4,
                              pretrained_cfg_overlay=dict(file=str(path)), **TINY).eval()
    x = _image(channels=4)
    as_rgb = 0.75 * torch.cat([x[:, :1] + x[:, 3:], x[:, 1:3]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny(as_rgb), atol=1e-4, rtol=1e-4)


def test_unadaptable_input_channels_are_named(tiny):
    model = BiFormer(in_chans=1, **TINY)            # built directly: no pretrained_cfg names the input conv
    with pytest.raises(CheckpointError, match=r"input channel count differs \(downsample_layers.0.0.weight takes 3 "
                                              r"channels in the file, the model in_chans=1\)"):
        load_weights(model, tiny.state_dict())


# ------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2)])
def test_features_only_state_dict_loads_back(tmp_path, out_indices):
    source = bilevel.create_model("biformer_tiny", features_only=True, out_indices=out_indices, **TINY).eval()
    assert all(key.startswith("model.") for key in source.state_dict())
    path = _save(tmp_path, source.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = bilevel.create_model("biformer_tiny", features_only=True, out_indices=out_indices,
                                      checkpoint_path=path, **TINY).eval()
    with torch.no_grad():
        for got, want in zip(loaded(_image()), source(_image()), strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("key", ["model_ema", "state_dict_ema"])
def test_ema_only_checkpoint(tmp_path, tiny, key):
    path = _save(tmp_path, {key: {f"module.{k}": v for k, v in tiny.state_dict().items()}, "epoch": 3})
    _assert_same_outputs(bilevel.create_model("biformer_tiny", checkpoint_path=path, **TINY), tiny)


def test_model_weights_are_preferred_to_ema_weights(tmp_path, tiny):
    other = bilevel.create_model("biformer_tiny", **TINY)
    path = _save(tmp_path, {"model": tiny.state_dict(), "model_ema": other.state_dict(),
                            "state_dict_ema": other.state_dict()})
    _assert_same_outputs(bilevel.create_model("biformer_tiny", checkpoint_path=path, **TINY), tiny)


def _segmentation_checkpoint(backbone: torch.nn.Module) -> dict:
    """What ``bilevel fit`` saves for a segmenter: the backbone pruned of its head and final norm, a decode head."""
    backbone.prune_intermediate_layers(4, prune_norm=True, prune_head=True)
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    state.update({"decode_head.classifier.weight": torch.randn(5, 64, 1, 1),
                  "decode_head.classifier.bias": torch.zeros(5)})
    return {"state_dict": state, "epoch": 1, "hyper_parameters": {"model_name": "biformer_tiny", "num_classes": 5}}


def test_segmentation_checkpoint_gives_its_backbone(tmp_path, tiny):
    expected = tiny.forward_intermediates(_image(), intermediates_only=True)
    contents = _segmentation_checkpoint(tiny)
    path = _save(tmp_path, contents, "segmenter.ckpt")
    with pytest.warns(UserWarning, match="no final norm"):
        model = bilevel.create_model("biformer_tiny", checkpoint_path=path, **TINY).eval()
    assert model.num_classes == 0
    with torch.no_grad():
        for got, want in zip(model.forward_intermediates(_image(), intermediates_only=True), expected, strict=True):
            torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = bilevel.create_model("biformer_tiny", checkpoint_path=path, features_only=True, **TINY).eval()
    with torch.no_grad():
        for got, want in zip(features(_image()), expected, strict=True):
            torch.testing.assert_close(got, want)
    # by default the segmenter's weights stay whole (what serving rebuilds the segmenter from)
    assert set(extract_state_dict(contents)) == set(contents["state_dict"])


# ------------------------------------------------------------------------------------ paths and files


def test_directory_and_home_paths(tmp_path, monkeypatch, tiny):
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a directory"):
        bilevel.create_model("biformer_tiny", checkpoint_path=tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    _save(tmp_path, tiny.state_dict(), "home.pth")
    _assert_same_outputs(bilevel.create_model("biformer_tiny", checkpoint_path="~/home.pth", **TINY), tiny)


def test_sharded_fsdp_folder_gets_the_consolidation_command(tmp_path):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"\x80")
    command = f"python -m lightning.pytorch.utilities.consolidate_checkpoint {folder} (it writes {folder}.consolidated)"
    with pytest.raises(CheckpointError, match=re.escape(command)):
        bilevel.create_model("biformer_tiny", checkpoint_path=folder)


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html><body>Sign in</body></html>", PNG_HEADER],
                         ids=["html", "png"])
def test_files_of_other_kinds_are_named(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path} is not a PyTorch checkpoint file"):
        bilevel.create_model("biformer_tiny", checkpoint_path=path)


def test_refused_and_damaged_files_get_torch_reason_in_one_plain_sentence(tmp_path):
    """No terminal escapes, no torch advice about weights_only=False, no sentence cut mid-word."""
    pickled = _save(tmp_path, torch.nn.Linear(2, 2), "module.pt")
    whole = _save(tmp_path, {"weight": torch.zeros(256, 256)}, "whole.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    reasons = {}
    for path in (pickled, truncated):
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(path)
        reasons[path.name] = str(caught.value)
    assert reasons["module.pt"] == (
        f"{pickled} holds Python objects that a weights-only load refuses (Unsupported global: GLOBAL "
        "torch.nn.modules.linear.Linear was not an allowed global by default); bilevel loads weights only: save the "
        "state dict (torch.save(model.state_dict(), path))")
    assert reasons["truncated.pt"] == (f"{truncated} is not a PyTorch checkpoint (RuntimeError: PytorchStreamReader "
                                       "failed reading zip archive: failed finding central directory)")
    long = _torch_reason(RuntimeError("overlong " * 40 + "end. More."))
    assert long.endswith("overlong...") and len(long) < 210


def test_numpy_scalars_of_an_mmseg_meta_are_read(tmp_path, tiny):
    """mmcv stores numpy scalars in ``meta["hook_msgs"]``; files written under numpy 1 name their reconstruction
    ``numpy.core.multiarray.scalar``, under numpy 2 ``numpy._core.multiarray.scalar``. Arrays stay refused."""
    meta = {"hook_msgs": {"best_score": np.float64(0.498), "best_iter": np.int64(160000)}, "CLASSES": ("wall",)}
    contents = {"meta": meta, "state_dict": {f"backbone.{key}": value for key, value in tiny.state_dict().items()}}
    numpy2 = _save(tmp_path, contents, "numpy2.pth")
    torch.save(contents, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    numpy1 = tmp_path / "numpy1.pth"
    legacy = (tmp_path / "legacy.pth").read_bytes()
    assert legacy.count(b"numpy._core.multiarray\nscalar") == 1      # the pickle names it once
    numpy1.write_bytes(legacy.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    for path in (numpy2, numpy1):
        hook_msgs = read_checkpoint(path)["meta"]["hook_msgs"]
        assert hook_msgs == meta["hook_msgs"]
        assert type(hook_msgs["best_score"]) is np.float64 and type(hook_msgs["best_iter"]) is np.int64
        _assert_same_outputs(bilevel.create_model("biformer_tiny", checkpoint_path=path, num_classes=1000, **TINY),
                             tiny)
    with pytest.raises(CheckpointError, match="weights-only load refuses"):
        read_checkpoint(_save(tmp_path, {"meta": {"scores": np.zeros(3)}, "state_dict": tiny.state_dict()}))


# ------------------------------------------------------------------------------------ names


def test_name_with_pretrained_tag():
    model = bilevel.create_model("biformer_tiny.in1k", num_classes=3, **TINY)
    assert model.pretrained_cfg["tag"] == "in1k" and model.pretrained_cfg["architecture"] == "biformer_tiny"
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'ft22k' of biformer_tiny; available: "
                                         r"\['biformer_tiny.in1k'\]"):
        bilevel.create_model("biformer_tiny.ft22k")
    with pytest.raises(ValueError, match="unknown model 'biformer_huge.in1k'"):
        bilevel.create_model("biformer_huge.in1k")
