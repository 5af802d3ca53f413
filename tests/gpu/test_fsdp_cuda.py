"""On a CUDA device: the strategy of ``lightning_configs/multigpu_fsdp.yaml`` (every family's block an FSDP unit
with activation checkpointing, bf16 mixed precision, synchronised batch norm) trains a small segmenter of each
family in one process; its checkpoint is one file, whose optimiser groups follow the plain model's plan, and
which loads on one device.

The CPU suite runs the same config over two gloo processes (``tests/tasks/test_fsdp.py``), without
SyncBatchNorm and bf16, which need a GPU. The device machine has Lightning but not jsonargparse, so the
strategy is built here from the YAML's values rather than through the ``bilevel`` command.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml

from bilevel.data import ShapesSegmentationDataModule
from bilevel.models.loading import read_checkpoint
from bilevel.tasks import SemanticSegmenter
from tests.tasks.test_fsdp import planned_groups, saved_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FSDP_CONFIG = Path(__file__).resolve().parents[2] / "lightning_configs" / "multigpu_fsdp.yaml"
TINY = {"biformer_tiny": {"depth": [1, 1, 1, 1]}, "debiformer_tiny": {"depth": [1, 1, 1, 1]},
        "crossformer_tiny": {"depths": [1, 1, 1, 1]}}


def _class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _config_trainer(root: Path):
    from lightning import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy

    settings = yaml.safe_load(FSDP_CONFIG.read_text())["trainer"]
    options = dict(settings["strategy"]["init_args"])
    for policy in ("auto_wrap_policy", "activation_checkpointing_policy"):
        options[policy] = {_class(path) for path in options[policy]}
    return Trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(**options), precision=settings["precision"],
                   sync_batchnorm=settings["sync_batchnorm"], max_steps=2, limit_val_batches=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                   callbacks=[ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)])


@pytest.mark.parametrize("model_name", TINY)
def test_fsdp_config_strategy_trains_each_family_on_cuda(model_name, tmp_path):
    data = ShapesSegmentationDataModule(root=str(tmp_path / "cache"), model_name=model_name, image_size=224,
                                        batch_size=2)
    task = SemanticSegmenter(model_name, num_classes=data.num_classes, class_names=data.class_names,
                             head="upernet", head_kwargs={"channels": 32}, model_kwargs=TINY[model_name],
                             weight_decay=0.01, layer_decay=0.9, inference="whole")
    _config_trainer(tmp_path).fit(task, datamodule=data)

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(checkpoint)
    assert saved["global_step"] == 2 and not [key for key in saved["state_dict"] if "wrapped" in key]
    plain = SemanticSegmenter.load_from_checkpoint(checkpoint, map_location="cuda")
    assert saved_groups(saved) == planned_groups(plain)
    with torch.no_grad():
        logits = plain.eval()(torch.randn(1, 3, 224, 224, device="cuda"))
    assert logits.shape == (1, data.num_classes, 224, 224) and torch.isfinite(logits).all()
