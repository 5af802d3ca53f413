"""Official segmentation checkpoints (mmseg layout) and the per-stage norms of the official segmentation backbones.

The files are synthetic: the project's own backbones, filled by the golden fill rule, saved as mmseg saves a
segmentation model (``backbone.*`` with BiFormer's ``extra_norms.<i>.weight`` or DeBiFormer's
``extra_norms.<i>.ln.weight``, ``decode_head.*``, ``auxiliary_head.*``, a ``meta`` holding numpy scalars).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule
from PIL import Image

import bilevel
from bilevel.cli import BilevelCLI
from bilevel.models.loading import CheckpointError, is_mmseg_checkpoint, read_checkpoint
from bilevel.serving import EMBEDDED_SEGMENTATION_CHECKPOINT, EMBEDDED_SEGMENTATION_MODEL, load_served_model
from bilevel.tasks import SemanticSegmenter
from bilevel.tasks.optim import parameter_groups, parameter_plan

from .conftest import CONFIGS, run_bilevel

#: one block per stage, 8x8 regions as the official segmentation backbones
SHALLOW = {
    "biformer_tiny": {"depth": [1, 1, 1, 1], "n_win": 8},
    "debiformer_tiny": {"depth": [1, 1, 1, 1], "n_win": 8},
    "crossformer_tiny": {"depths": [1, 1, 1, 1]},
}
#: how each family's official segmentation backbone names its per-stage norms (CrossFormer's has none)
EXTRA_NORM_KEY = {"biformer_tiny": "extra_norms.{stage}.{leaf}", "debiformer_tiny": "extra_norms.{stage}.ln.{leaf}"}
#: the eps of the official extra norms: timm LayerNorm2d (BiFormer), nn.LayerNorm (DeBiFormer)
OFFICIAL_EPS = {"biformer_tiny": 1e-6, "debiformer_tiny": 1e-5}
HEAD = {"fpn_channels": 16, "head_channels": 8}


def segmenter(name: str, **overrides) -> SemanticSegmenter:
    """A small segmenter of the family (one block per stage, 3 classes, narrow FPN head)."""
    return SemanticSegmenter(**{"model_name": name, "num_classes": 3, "model_kwargs": SHALLOW[name],
                                "head_kwargs": HEAD, **overrides})


def official_backbone_state(name: str, golden_fill) -> dict[str, torch.Tensor]:
    """The state dict of the family's official segmentation backbone, filled: the trunk (no classifier, no final
    norm) and, for BiFormer and DeBiFormer, one extra norm per stage in the family's naming."""
    trunk = segmenter(name).backbone
    state = dict(trunk.state_dict())
    if name in EXTRA_NORM_KEY:
        for stage, info in enumerate(trunk.feature_info):
            for leaf in ("weight", "bias"):
                state[EXTRA_NORM_KEY[name].format(stage=stage, leaf=leaf)] = torch.zeros(info["num_chs"])
    golden_fill.fill_(state)
    return state


def save_mmseg_checkpoint(path: Path, backbone_state: dict[str, torch.Tensor]) -> Path:
    """``backbone_state`` as mmcv saves an mmseg segmenter (heads as UPerHead / FCNHead name them)."""
    state = {f"backbone.{key}": value for key, value in backbone_state.items()}
    state.update({"decode_head.conv_seg.weight": torch.randn(150, 512, 1, 1),
                  "decode_head.conv_seg.bias": torch.zeros(150),
                  "decode_head.bottleneck.conv.weight": torch.randn(512, 64, 3, 3),
                  "auxiliary_head.conv_seg.weight": torch.randn(150, 256, 1, 1)})
    meta = {"mmseg_version": "0.20.2", "CLASSES": ("wall", "building"), "PALETTE": [[120, 120, 120], [180, 120, 120]],
            "iter": 160000, "hook_msgs": {"best_score": np.float64(0.498), "best_iter": np.int64(160000),
                                          "best_ckpt": "/work_dirs/best_mIoU_iter_160000.pth"}}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture(params=sorted(SHALLOW))
def official(request, tmp_path, golden_fill):
    """(model name, backbone state of the file, path of the mmseg file) for each family."""
    state = official_backbone_state(request.param, golden_fill)
    return request.param, state, save_mmseg_checkpoint(tmp_path / f"upernet_{request.param}.pth", state)


def start(model: SemanticSegmenter) -> list[str]:
    """Run the model's ``setup`` as ``bilevel fit`` does with no ``--ckpt_path``; returns the warnings' texts."""
    model.trainer = SimpleNamespace(ckpt_path=None, datamodule=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.setup("fit")
    return [str(warning.message) for warning in caught]


# ------------------------------------------------------------------------------------ the segmenter's start weights


def test_official_segmentation_file_starts_the_backbone_and_its_stage_norms(official):
    name, state, path = official
    model = segmenter(name, stage_norms=name in EXTRA_NORM_KEY, checkpoint_path=str(path))
    messages = start(model)
    heads = [message for message in messages if "mmseg" in message]
    assert heads == [f"{path} is an official mmseg segmentation checkpoint: its backbone is loaded, not its heads "
                     "(decode_head.*, auxiliary_head.*), which bilevel does not rebuild; a bilevel decode head starts "
                     "fresh"]
    assert len(messages) == 1, messages
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    if name in EXTRA_NORM_KEY:
        for stage, norm in enumerate(model.stage_norms):
            assert norm.eps == OFFICIAL_EPS[name]
            for leaf in ("weight", "bias"):
                file_tensor = state[EXTRA_NORM_KEY[name].format(stage=stage, leaf=leaf)]
                torch.testing.assert_close(getattr(norm, leaf).detach(), file_tensor, rtol=0, atol=0)


def test_only_files_with_an_mmseg_decode_head_count_as_mmseg_files(official):
    """A segmenter's weights saved by hand (no Lightning metadata, bilevel's own head) are not an mmseg file."""
    _, _, path = official
    assert is_mmseg_checkpoint(read_checkpoint(path))
    by_hand = segmenter("biformer_tiny", stage_norms=True)
    assert not is_mmseg_checkpoint({"state_dict": by_hand.state_dict()})


@pytest.mark.parametrize("name", sorted(EXTRA_NORM_KEY))
def test_stage_norms_in_the_file_need_a_model_with_stage_norms(name, tmp_path, golden_fill):
    path = save_mmseg_checkpoint(tmp_path / "upernet.pth", official_backbone_state(name, golden_fill))
    model = segmenter(name, checkpoint_path=str(path))
    with pytest.raises(CheckpointError, match=f"{path} holds per-stage norms .* add --model.stage_norms true"):
        start(model)


def test_classification_checkpoint_names_the_parts_left_out(tmp_path):
    path = tmp_path / "biformer_tiny_best.pth"
    official = bilevel.create_model("biformer_tiny", **SHALLOW["biformer_tiny"])
    torch.save({"model": official.state_dict()}, path)
    model = segmenter("biformer_tiny", stage_norms=True, checkpoint_path=str(path))
    assert start(model) == [f"{path}: left out head.*, norm.*: a segmentation backbone has no classifier and no "
                            "final norm (the decode head takes its stage maps)"]
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, official.state_dict()[key], rtol=0, atol=0, msg=key)


def test_a_bilevel_segmenter_with_stage_norms_starts_another(tmp_path):
    trained = segmenter("debiformer_tiny", stage_norms=True)
    for norm in trained.stage_norms:
        torch.nn.init.normal_(norm.weight)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    model = segmenter("debiformer_tiny", num_classes=5, stage_norms=True, checkpoint_path=str(path))
    assert start(model) == []
    torch.testing.assert_close(model.stage_norms.state_dict(), trained.stage_norms.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.state_dict(), trained.backbone.state_dict(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ other entry points


def test_backbones_leave_the_stage_norms_and_the_heads_out_with_warnings(official):
    name, state, path = official
    trunk = segmenter(name).backbone.eval()
    trunk.load_state_dict({key: value for key, value in state.items() if not key.startswith("extra_norms.")})
    expected = trunk.forward_intermediates(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
                                           intermediates_only=True)
    heads, norms = "official mmseg segmentation checkpoint", "per-stage norms of its segmentation backbone"
    builders = {"create_model": lambda: bilevel.create_model(name, checkpoint_path=path, **SHALLOW[name]),
                "features_only": lambda: bilevel.create_model(name, checkpoint_path=path, features_only=True,
                                                              **SHALLOW[name]),
                "timm": lambda: timm.create_model(name, pretrained=True, num_classes=0, **SHALLOW[name],
                                                  pretrained_cfg_overlay=dict(file=str(path)))}
    for entry, build in builders.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build().eval()
        messages = [str(warning.message) for warning in caught]
        assert sum(heads in message for message in messages) == 1, (entry, messages)
        stage_norm_warnings = [message for message in messages if norms in message]
        if name in EXTRA_NORM_KEY:
            assert stage_norm_warnings == [f"{path}: the per-stage norms of its segmentation backbone (extra_norms.*) "
                                           f"are left out, as {name} has none; SemanticSegmenter(stage_norms=True) "
                                           "(bilevel fit --model.stage_norms true) uses them"], entry
        else:
            assert not stage_norm_warnings, entry
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = model(x) if entry == "features_only" else model.forward_intermediates(x, intermediates_only=True)
        for got_map, want_map in zip(got, expected, strict=True):
            torch.testing.assert_close(got_map, want_map, msg=entry)


# ------------------------------------------------------------------------------------ the stage norms themselves


@pytest.mark.parametrize("name", sorted(EXTRA_NORM_KEY))
def test_decode_head_takes_each_stage_map_normalised_over_its_channels(name):
    model = segmenter(name, stage_norms=True).eval()
    for norm in model.stage_norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    taken = []
    model.decode_head.register_forward_pre_hook(lambda module, args: taken.append(args[0]))
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(images)
        maps = model.backbone.forward_intermediates(images, intermediates_only=True)
    for stage_map, norm, got in zip(maps, model.stage_norms, taken[0], strict=True):
        channels_last = stage_map.permute(0, 2, 3, 1)
        expected = F.layer_norm(channels_last, (stage_map.shape[1],), norm.weight, norm.bias, OFFICIAL_EPS[name])
        torch.testing.assert_close(got, expected.permute(0, 3, 1, 2))


def test_stage_norms_get_no_weight_decay_and_the_decode_head_lr():
    model = segmenter("biformer_tiny", stage_norms=True)
    plan = parameter_plan(model, weight_decay=0.05, layer_decay=0.5, backbone=model.backbone,
                          backbone_prefix="backbone.")
    stage_norm_names = [name for name, _ in model.named_parameters() if name.startswith("stage_norms.")]
    assert len(stage_norm_names) == 8
    assert {plan[name] for name in stage_norm_names} == {(0.0, 1.0)}
    groups = parameter_groups(model, plan, lr=1e-3)
    norm_parameters = {id(parameter) for parameter in model.stage_norms.parameters()}
    for group in groups:
        if norm_parameters & {id(parameter) for parameter in group["params"]}:
            assert group["weight_decay"] == 0.0 and group["lr"] == 1e-3


def test_checkpoints_without_stage_norms_still_load():
    """The embedded demo segmenter (saved before stage norms existed) loads strictly, with identities, and serves."""
    stored = read_checkpoint(EMBEDDED_SEGMENTATION_CHECKPOINT)
    assert "stage_norms" not in stored["hyper_parameters"]
    model = SemanticSegmenter(**{key: value for key, value in stored["hyper_parameters"].items()
                                 if not key.startswith("_")})
    model.load_state_dict(stored["state_dict"], strict=True)
    assert model.hparams.stage_norms is False
    assert all(isinstance(norm, torch.nn.Identity) for norm in model.stage_norms)
    served = load_served_model(EMBEDDED_SEGMENTATION_MODEL).model
    assert all(isinstance(norm, torch.nn.Identity) for norm in served.stage_norms)


# ------------------------------------------------------------------------------------ the command


def masks_folder(root: Path) -> Path:
    """{train,val}/{images,masks}/{0,1}.png: 64 px pictures, a square of class 1 on class 0."""
    for split in ("train", "val"):
        for item in range(2):
            for folder in ("images", "masks"):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (40 * item, 90, 160)).save(root / split / "images" / f"{item}.png")
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[16:48, 16:48] = 1
            Image.fromarray(mask).save(root / split / "masks" / f"{item}.png")
    return root


@pytest.mark.parametrize("family", ["biformer", "debiformer"])
def test_segmentation_configs_build_the_official_segmentation_backbone(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bilevel"])
    cli = BilevelCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     args=["--config", str(CONFIGS / f"{family}_segmentation.yaml"),
                           "--data.root", str(masks_folder(tmp_path / "data"))])
    assert cli.model.hparams.model_kwargs == {"n_win": 8} and cli.model.hparams.stage_norms is True
    assert cli.datamodule.hparams.image_size == 512
    assert [norm.eps for norm in cli.model.stage_norms] == [OFFICIAL_EPS[f"{family}_tiny"]] * 4


def test_segmentation_config_starts_from_an_official_segmentation_file(tmp_path, golden_fill, bilevel_cache):
    """biformer_segmentation.yaml (n_win 8, stage norms) takes an mmseg file; without stage norms it names the fix."""
    root = masks_folder(tmp_path / "data")
    state = official_backbone_state("biformer_tiny", golden_fill)
    path = save_mmseg_checkpoint(tmp_path / "upernet_biformer.pth", state)
    args = ["fit", "--config", str(CONFIGS / "biformer_segmentation.yaml"), "--data.root", str(root),
            "--model.model_kwargs", '{"n_win": 8, "depth": [1, 1, 1, 1]}', "--model.head_kwargs",
            '{"fpn_channels": 16, "head_channels": 8}', "--model.checkpoint_path", str(path),
            "--data.image_size", "64", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"]
    run_bilevel(args, tmp_path, bilevel_cache)
    refused = run_bilevel(args + ["--model.stage_norms", "false"], tmp_path, bilevel_cache, should_fail=True)
    assert f"bilevel: error: {path} holds per-stage norms" in refused.stderr
    assert "add --model.stage_norms true" in refused.stderr
