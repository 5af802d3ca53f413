"""Every YAML in lightning_configs/ builds its model, data and trainer through the ``bilevel`` CLI parser."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bilevel.cli import BilevelCLI
from bilevel.models import MODEL_NAMES
from lightning import LightningDataModule, LightningModule

from .conftest import CONFIGS

FAMILY_CONFIGS = sorted(path for path in CONFIGS.glob("*.yaml")
                        if path.stem.endswith(("_classification", "_segmentation")) and "quickstart" not in path.stem
                        and "demo" not in path.stem) + [CONFIGS / "multigpu_ddp.yaml"]


def _user_folder(root: Path, segmentation: bool) -> Path:
    for split in ("train", "val"):
        for item in range(2):
            if segmentation:
                (root / split / "images").mkdir(parents=True, exist_ok=True)
                (root / split / "masks").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32)).save(root / split / "images" / f"{item}.png")
                Image.fromarray(np.full((32, 32), item, dtype=np.uint8)).save(root / split / "masks" / f"{item}.png")
            else:
                for name in ("ant", "bee", "wasp"):
                    (root / split / name).mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (32, 32)).save(root / split / name / f"{item}.png")
    return root


def test_every_family_has_a_classification_and_a_segmentation_config():
    for family in ("biformer", "debiformer", "crossformer"):
        for task in ("classification", "segmentation"):
            assert (CONFIGS / f"{family}_{task}.yaml").is_file(), f"{family}_{task}.yaml"


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_config_keeps_the_best_and_the_latest_state(config):
    """A monitored checkpoint's ``save_last`` rewrites last.ckpt only when the metric improves (Lightning 2.6), so the
    latest state, to resume from, has its own unmonitored checkpoint named last (a run of it:
    test_cli_classification.py::test_last_ckpt_holds_the_final_epoch_when_the_metric_stops_improving)."""
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    checkpoints = [callback.get("init_args", {}) for callback in callbacks
                   if callback["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"]
    monitored = [arguments for arguments in checkpoints if arguments.get("monitor")]
    assert len(monitored) == 1 and not monitored[0].get("save_last")
    assert [arguments for arguments in checkpoints if not arguments.get("monitor")] == [{"filename": "last"}]


@pytest.mark.parametrize("config", FAMILY_CONFIGS, ids=lambda path: path.stem)
def test_config_instantiates_with_classes_from_the_data(config, tmp_path, monkeypatch):
    settings = yaml.safe_load(config.read_text())
    model_name = settings["model"]["init_args"]["model_name"]
    if model_name not in MODEL_NAMES:
        pytest.skip(f"{model_name} is not registered in this tree yet")
    assert settings["trainer"]["accelerator"] == "auto"
    segmentation = "Segmenter" in settings["model"]["class_path"]
    root = _user_folder(tmp_path / "data", segmentation)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bilevel"])
    overrides = ["--trainer.devices", "1", "--trainer.num_nodes", "1"] if "multigpu" in config.stem else []
    cli = BilevelCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     run=False, args=["--config", str(config), "--data.root", str(root), *overrides])
    expected = ["class_0", "class_1"] if segmentation else ["ant", "bee", "wasp"]
    assert cli.model.hparams.num_classes == len(expected) and cli.model.class_names == expected
    assert cli.datamodule.hparams.model_name == model_name
    assert cli.datamodule.data_config.image_size == (512 if segmentation else 224)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_demo_config_builds_the_architecture_of_the_committed_demo_model(task, tmp_path, monkeypatch, bilevel_cache):
    """lightning_configs/demo_<task>.yaml is what bilevel/assets/demo_<task>.ckpt was trained from."""
    from bilevel.models.loading import read_checkpoint
    from bilevel.serving import EMBEDDED_CHECKPOINT, EMBEDDED_SEGMENTATION_CHECKPOINT

    asset = {"classification": EMBEDDED_CHECKPOINT, "segmentation": EMBEDDED_SEGMENTATION_CHECKPOINT}[task]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(bilevel_cache))
    monkeypatch.setattr(sys, "argv", ["bilevel"])
    cli = BilevelCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     run=False, args=["--config", str(CONFIGS / f"demo_{task}.yaml")])
    stored = read_checkpoint(asset)
    shapes = {key: tuple(value.shape) for key, value in stored["state_dict"].items()}
    assert shapes == {key: tuple(value.shape) for key, value in cli.model.state_dict().items()}
    assert stored["hyper_parameters"]["class_names"] == list(cli.model.class_names)
    assert stored["datamodule_hyper_parameters"]["image_size"] == cli.datamodule.hparams.image_size
