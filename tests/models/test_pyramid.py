"""What the three families share (bilevel.models._pyramid): timm's forward_intermediates and pruning."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.models._manipulate import reinit_non_persistent_buffers

import bilevel
from bilevel.models.biformer import BiFormer, BiFormerSTL
from bilevel.models.crossformer import CrossFormer

_NARROW = dict(depth=(1, 1, 1, 1), embed_dim=(32, 64, 128, 256), head_dim=32, num_classes=10)

#: one small model per layout: name -> (builder, whether the stages give NHWC maps)
FAMILIES = {
    "biformer": (lambda: BiFormer(**_NARROW, qk_dims=(32, 64, 128, 256), mlp_ratios=(2, 2, 2, 2),
                                  topks=(1, 4, 16, -2), kv_per_wins=(-1, -1, -1, -1)), False),
    "biformer_stl": (lambda: BiFormerSTL(**_NARROW), False),
    "biformer_stl_nchw": (lambda: BiFormerSTL(**_NARROW, topks=(1, 4, 16, -1), nchw=True), False),
    "debiformer": (lambda: bilevel.create_model("debiformer_tiny", depth=(1, 1, 1, 1), num_classes=10), False),
    "crossformer": (lambda: CrossFormer(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=10),
                    True),
}
STAGE_PREFIXES = ("stages.", "downsample_layers.", "layers.")


def _as_nchw(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if nhwc else x


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    build, nhwc = FAMILIES[request.param]
    return build().eval(), nhwc


@pytest.fixture
def image():
    return torch.randn(1, 3, 112, 112)


@torch.no_grad()
def test_stop_early_gives_the_last_stage_run_without_the_final_norm(family, image):
    model, nhwc = family
    stage_outputs = model.forward_intermediates(image, intermediates_only=True)
    final, intermediates = model.forward_intermediates(image, indices=[1], stop_early=True)
    torch.testing.assert_close(intermediates[0], stage_outputs[1])
    torch.testing.assert_close(_as_nchw(final, nhwc), stage_outputs[1])
    final, _ = model.forward_intermediates(image, indices=[-1], stop_early=True)
    torch.testing.assert_close(final, model.forward_features(image))


@torch.no_grad()
@pytest.mark.parametrize("prune_norm", [False, True])
def test_pruned_model_runs_every_forward(family, image, prune_norm):
    model, nhwc = family
    stage_outputs = model.forward_intermediates(image, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1], prune_norm=prune_norm) == [0, 1]
    assert model.num_features == model.head_hidden_size == stage_outputs[1].shape[1]
    assert not any(name.startswith(tuple(f"{p}{i}" for p in STAGE_PREFIXES for i in (2, 3)))
                   for name in model.state_dict())
    features = model.forward_features(image)
    torch.testing.assert_close(_as_nchw(features, nhwc), stage_outputs[1])
    torch.testing.assert_close(model(image), features)
    final, intermediates = model.forward_intermediates(image, indices=[0, 1])
    torch.testing.assert_close(final, features)
    for got, want in zip(intermediates, stage_outputs[:2], strict=True):
        torch.testing.assert_close(got, want)


@torch.no_grad()
def test_pruning_nothing_keeps_the_classifier_unless_asked(family, image):
    model, nhwc = family
    logits = model(image)
    stage_outputs = model.forward_intermediates(image, intermediates_only=True)
    assert model.prune_intermediate_layers(4, prune_head=False) == [0, 1, 2, 3]
    torch.testing.assert_close(model(image), logits)
    model.prune_intermediate_layers(4, prune_norm=True)
    torch.testing.assert_close(_as_nchw(model(image), nhwc), stage_outputs[3])


@torch.no_grad()
def test_intermediates_are_contiguous_nchw_maps(family, image):
    model, _ = family
    for stage_map in model.forward_intermediates(image, intermediates_only=True):
        assert stage_map.is_contiguous()
        stage_map.view(len(stage_map), -1)          # as FPN necks and flattening heads use them


@torch.no_grad()
def test_feature_info_names_modules_whose_outputs_are_the_stage_maps(family, image):
    """timm's hook-based feature extraction hooks ``feature_info[i]['module']``: it must run, once per stage."""
    model, nhwc = family
    expected = model.forward_intermediates(image, intermediates_only=True)
    modules = dict(model.named_modules())
    hooked = []
    for info in model.feature_info:
        modules[info["module"]].register_forward_hook(lambda module, args, output: hooked.append(output))
    model(image)
    assert len(hooked) == len(expected)
    for got, want in zip(hooked, expected, strict=True):
        torch.testing.assert_close(_as_nchw(got, nhwc), want)


def test_layer_decay_groups_follow_the_order_in_which_layers_run(family, image):
    """timm's layer-wise lr decay ranks parameters by ``group_matcher``: the rank must grow along the forward
    pass, or a layer gets the learning rate of one far from it."""
    model, _ = family
    rank = {name: group for group, names in group_parameters(model, model.group_matcher()).items()
            for name in names}
    executed = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(lambda module, args, name=name: executed.append(name))
    model(image)
    ranks = [rank[f"{name}.{parameter}" if name else parameter]
             for name in dict.fromkeys(executed) for parameter, _ in model.get_submodule(name).named_parameters(
                 recurse=False)]
    assert ranks == sorted(ranks), [name for name in dict.fromkeys(executed)]


@torch.no_grad()
@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw", "debiformer_tiny", "crossformer_tiny"])
def test_a_model_built_on_the_meta_device_loads_and_matches(name):
    """Deferred initialisation (FSDP, large models): build on meta, ``to_empty``, load, rebuild the tables
    checkpoints do not hold with timm's ``reinit_non_persistent_buffers``."""
    built = timm.create_model(name, depth=(1, 1, 1, 1)) if "crossformer" not in name else \
        timm.create_model(name, depths=(1, 1, 1, 1))
    with torch.device("meta"):
        deferred = timm.create_model(name, depth=(1, 1, 1, 1)) if "crossformer" not in name else \
            timm.create_model(name, depths=(1, 1, 1, 1))
    deferred = deferred.to_empty(device="cpu")
    deferred.load_state_dict(built.state_dict())
    reinit_non_persistent_buffers(deferred)
    for (key, want), got in zip(built.named_buffers(), deferred.buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=key)
    image = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(deferred.eval()(image), built.eval()(image))
