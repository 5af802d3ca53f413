"""Lightning's FSDP (CPU processes over gloo, through ``tests.tasks.cpu_fsdp``): parameter groups that survive the
sharding, the FSDP config end to end, and sharded checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel.models.loading import read_checkpoint
from bilevel.tasks import ImageClassifier, SemanticSegmenter
from bilevel.tasks.optim import parameter_groups, unwrapped_name

from .conftest import CONFIGS, run_bilevel

SMALL = dict(model_name="biformer_tiny", num_classes=4, model_kwargs={"depth": [1, 1, 1, 1]})
FSDP_CONFIG = str(CONFIGS / "multigpu_fsdp.yaml")
CPU_FSDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
            "--trainer.strategy", "tests.tasks.cpu_fsdp.CPUFSDPStrategy",
            "--trainer.strategy.process_group_backend", "gloo"]


def planned_groups(task) -> list[tuple[float, float, int]]:
    """Sorted (weight decay, lr scale, parameter count) of the groups the plain task's plan makes."""
    plan = task.parameter_plan()
    return sorted((decay, scale, sum(1 for value in plan.values() if value == (decay, scale)))
                  for decay, scale in set(plan.values()))


def saved_groups(checkpoint: dict) -> list[tuple[float, float, int]]:
    """Sorted (weight decay, lr scale, parameter count) of the optimiser groups a checkpoint holds."""
    return sorted((group["weight_decay"], group["lr_scale"], len(group["params"]))
                  for group in checkpoint["optimizer_states"][0]["param_groups"])


def _groups_by_name(module: torch.nn.Module, groups: list[dict]) -> dict[str, list[float]]:
    """parameter name (as the plain model has it) -> [weight decay, lr] of the group holding it."""
    name_of = {id(param): unwrapped_name(name) for name, param in module.named_parameters()}
    return {name_of[id(param)]: [group["weight_decay"], group["lr"]] for group in groups for param in group["params"]}


def _sharded_groups(rank: int, store: str, out: str) -> None:
    """One rank: plan on the plain task, wrap each block in FSDP (+ activation checkpointing), build the groups."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from bilevel.models.biformer import Block

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    task = ImageClassifier(**SMALL, weight_decay=0.05, layer_decay=0.5)
    plan = task.parameter_plan()
    plain = _groups_by_name(task, parameter_groups(task, plan, lr=1e-3))
    FullyShardedDataParallel(task, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                             device_id=torch.device("cpu"))
    apply_activation_checkpointing(task, check_fn=lambda module: isinstance(module, Block))
    raw_names = [name for name, _ in task.named_parameters()]
    shapes = {unwrapped_name(name): list(param.shape) for name, param in task.named_parameters()}
    sharded = _groups_by_name(task, parameter_groups(task, plan, lr=1e-3))
    Path(out, f"rank{rank}.json").write_text(json.dumps(dict(plain=plain, sharded=sharded, raw_names=raw_names,
                                                             shapes=shapes)))
    dist.destroy_process_group()


def test_fsdp_shards_keep_each_parameters_planned_weight_decay_and_layer_lr(tmp_path):
    """Under FSDP every parameter is a flat 1-D shard (some empty): planned on the plain model, the groups stay."""
    mp.spawn(_sharded_groups, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert any("_checkpoint_wrapped_module" in name for name in result["raw_names"])
        assert all(len(shape) <= 1 for shape in result["shapes"].values()), "FSDP left a parameter unflattened"
        assert result["sharded"] == result["plain"]
        qkv = "model.stages.0.0.attn.qkv.qkv.weight"
        assert result["plain"][qkv][0] == 0.05 and result["plain"]["model.stages.0.0.attn.qkv.qkv.bias"][0] == 0.0
        assert result["plain"]["model.head.weight"] == [0.05, pytest.approx(1e-3)]
        assert result["plain"][qkv][1] < 1e-3 * 0.5 ** 2


def test_fsdp_config_trains_on_two_processes_serves_one_and_resumes(tmp_path, bilevel_cache):
    """lightning_configs/multigpu_fsdp.yaml (blocks wrapped and checkpointed, full state dict) on a tiny model."""
    tiny = ["--model.model_name", "biformer_tiny", "--model.model_kwargs", "{depth: [1, 1, 1, 1]}",
            "--model.head_kwargs", "{channels: 32}", "--data", "bilevel.data.ShapesSegmentationDataModule",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.precision", "32-true",
            # SyncBatchNorm needs a GPU; clipping by norm goes through FSDP's own clip_grad_norm_
            "--trainer.sync_batchnorm", "false", "--trainer.gradient_clip_val", "1.0",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    run_bilevel(["fit", "--config", FSDP_CONFIG, *tiny, *CPU_FSDP, "--trainer.max_steps", "2"], tmp_path,
                bilevel_cache, test_classes=True)
    checkpoint = tmp_path / "lightning_logs/multigpu_fsdp/version_0/checkpoints/last.ckpt"
    saved = read_checkpoint(checkpoint)
    assert saved["global_step"] == 2
    assert not [key for key in saved["state_dict"] if "wrapped" in key]

    plain = SemanticSegmenter.load_from_checkpoint(checkpoint)
    assert plain.state_dict().keys() == saved["state_dict"].keys()
    written = saved_groups(saved)
    assert written == planned_groups(plain)
    assert {decay for decay, _, _ in written} == {0.0, 0.01} and len({scale for _, scale, _ in written}) > 3

    single = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
              "--trainer.strategy", "auto"]
    run_bilevel(["validate", "--config", FSDP_CONFIG, *tiny, *single, "--ckpt_path", str(checkpoint)], tmp_path,
                bilevel_cache)
    run_bilevel(["fit", "--config", FSDP_CONFIG, *tiny, *CPU_FSDP, "--trainer.max_steps", "4",
                 "--ckpt_path", str(checkpoint)], tmp_path, bilevel_cache, test_classes=True)
    resumed = sorted((tmp_path / "lightning_logs/multigpu_fsdp").glob("version_*/checkpoints/last.ckpt"))[-1]
    assert resumed != checkpoint and read_checkpoint(resumed)["global_step"] == 4


def test_sharded_checkpoint_resumes_under_fsdp_and_one_process_is_told_to_consolidate(tmp_path, bilevel_cache):
    config = str(CONFIGS / "quickstart_classification.yaml")
    quick = [*CPU_FSDP, "--trainer.strategy.state_dict_type", "sharded", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1"]
    run_bilevel(["fit", "--config", config, *quick, "--trainer.max_epochs", "1"], tmp_path, bilevel_cache,
                test_classes=True)
    folder = tmp_path / "lightning_logs/quickstart_classification/version_0/checkpoints/last.ckpt"
    assert (folder / ".metadata").is_file()

    refused = run_bilevel(["validate", "--config", config, "--ckpt_path", str(folder)], tmp_path, bilevel_cache,
                          should_fail=True)
    assert f"python -m lightning.pytorch.utilities.consolidate_checkpoint {folder}" in refused.stderr

    run_bilevel(["fit", "--config", config, *quick, "--trainer.max_epochs", "2", "--ckpt_path", str(folder)],
                tmp_path, bilevel_cache, test_classes=True)
    resumed = tmp_path / "lightning_logs/quickstart_classification/version_1/checkpoints/last.ckpt"
    assert read_checkpoint(resumed / "meta.pt")["global_step"] == 4
