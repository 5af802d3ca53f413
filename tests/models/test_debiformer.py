"""DeBiFormer: golden equivalence, official layout, any input size, sampling-point recording, checkpoints."""
from __future__ import annotations

import pytest
import timm
import torch

import bilevel
from bilevel.models._pyramid import InputSizeError
from bilevel.models.debiformer import Block, DeBiFormer
from bilevel.ops import record_routing
from bilevel.ops.dbra import DeBiLevelRoutingAttention
from tests.conftest import assert_model_matches_golden_case, golden_cases, state_dict_layout

MODEL_CASES = golden_cases("model", "debi")

# Parameter counts and state-dict sizes measured by running the official code (ARCHITECTURES.md §2.2).
OFFICIAL_PARAMETERS = {"debi_tiny": 21_495_598, "debi_small": 44_008_028, "debi_base": 95_501_926}
OFFICIAL_STATE_DICT_ENTRIES = {"debi_tiny": 478, "debi_small": 1055, "debi_base": 973}


def shallow_tiny(**kwargs) -> DeBiFormer:
    """debiformer_tiny with one block per stage: every code path of the variants, a third of the cost."""
    return bilevel.create_model("debiformer_tiny", depth=(1, 1, 1, 1), **kwargs)


def test_public_model_case_is_present():
    assert MODEL_CASES, "expected the public debi_tiny golden case in ../shared/reference/golden"


@pytest.mark.parametrize("path", MODEL_CASES, ids=lambda p: p.stem)
def test_debiformer_matches_official_golden_case(path, golden_fill):
    assert_model_matches_golden_case(path, golden_fill)


@pytest.mark.parametrize("name", ["debi_tiny", "debi_small", "debi_base"])
def test_variants_have_the_official_size_and_layout(name):
    with torch.device("meta"):
        official_name = bilevel.create_model(name)
        our_name = bilevel.create_model(name.replace("debi_", "debiformer_"))
    for model in (official_name, our_name):
        assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[name]
        assert len(model.state_dict()) == OFFICIAL_STATE_DICT_ENTRIES[name]
    assert state_dict_layout(official_name) == state_dict_layout(our_name)


def test_registered_with_timm_and_listed():
    for name in ("debiformer_tiny", "debiformer_small", "debiformer_base", "debi_tiny", "debi_small", "debi_base"):
        assert name in bilevel.list_models("debi") and name in timm.list_models("debi*")
    model = timm.create_model("debi_tiny", num_classes=7, depth=(1, 1, 1, 1))
    assert isinstance(model, DeBiFormer) and model.pretrained_cfg["input_size"] == (3, 224, 224)
    with pytest.raises(ValueError, match="never downloads weights"):
        timm.create_model("debiformer_tiny", pretrained=True)


@pytest.mark.parametrize("height, width, batch", [(224, 224, 1), (112, 112, 3), (336, 336, 1), (256, 320, 1)])
def test_any_input_size_runs(height, width, batch):
    model = shallow_tiny(num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, height, width))
    assert out.shape == (batch, 10) and torch.isfinite(out).all()


def test_every_dbra_block_records_sampling_points_and_routing():
    model = shallow_tiny().eval()
    dbra_names = [name for name, module in model.named_modules() if isinstance(module, DeBiLevelRoutingAttention)]
    assert dbra_names == ["stages.0.0.attn2", "stages.1.0.attn2", "stages.2.0.attn2", "stages.3.0.attn1",
                          "stages.3.0.attn2"]
    with torch.no_grad(), record_routing(model) as trace:
        model(torch.randn(2, 3, 224, 448))
    records = trace.by_kind("dbra")
    assert [record.module for record in records] == dbra_names
    for record, groups, topk in zip(records, (1, 2, 4, 8, 8), (4, 8, 16, 49, 49)):
        assert record.indices.shape == (2, 49, topk)
        points = record.extras["sampling_points"]
        assert points.shape == (2, groups, 7, 14, 2)    # deformed grid map / stride = 7x14 in every stage
        assert points.abs().max() <= 1.0
        assert record.extras["reference_points"].shape == (7, 14, 2)


@pytest.mark.parametrize("n_win, routed", [(8, 49), (7, 49), (4, 16)])
def test_last_stage_routes_to_49_regions_as_the_official_code(n_win, routed):
    """The official last-stage DBRAs take a fixed top-49: all regions at n_win 7, 49 of 64 at the segmentation
    n_win of 8; fewer regions than 49 are all routed."""
    model = shallow_tiny(n_win=n_win).eval()
    with torch.no_grad(), record_routing(model) as trace:
        model(torch.randn(1, 3, 256, 256))
    last_stage = [record for record in trace.by_kind("dbra") if record.module.startswith("stages.3.")]
    assert [record.indices.shape for record in last_stage] == [(1, n_win * n_win, routed)] * 2


def test_features_only_returns_four_nchw_maps():
    backbone = bilevel.create_model("debiformer_tiny", depth=(1, 1, 1, 1), features_only=True).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]


def test_bad_inputs_get_clear_errors():
    model = shallow_tiny()
    with pytest.raises(InputSizeError, match="3-channel images, got 1 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match="16x16 image is too small"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="topk=3 is not a DeBiFormer block setting"):
        Block(64, num_heads=2, topk=3, param_size="tiny")


def test_golden_filled_official_checkpoint_loads_strictly(tmp_path, golden_fill):
    reference = golden_fill.fill_(bilevel.create_model("debiformer_tiny")).eval()
    path = tmp_path / "debiformer_tiny.pth"
    torch.save({"model": reference.state_dict(), "epoch": 299}, path)
    loaded = bilevel.create_model("debiformer_tiny", checkpoint_path=path).eval()
    loaded_state = loaded.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded_state[key], value), key


def test_bfloat16_on_cpu_agrees_with_float32():
    model = bilevel.create_model("debiformer_tiny").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
