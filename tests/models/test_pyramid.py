"""What the three families share (bilevel.models._pyramid): timm's head, forward_intermediates and pruning."""
from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.models._manipulate import reinit_non_persistent_buffers

import bilevel
from bilevel.models.biformer import BiFormer, BiFormerSTL
from bilevel.models.crossformer import CrossFormer

_NARROW = dict(depth=(1, 1, 1, 1), embed_dim=(32, 64, 128, 256), head_dim=32, num_classes=10)

#: one small model per layout: name -> (builder taking constructor kwargs, whether the stages give NHWC maps)
FAMILIES = {
    "biformer": (lambda **kw: BiFormer(**_NARROW, qk_dims=(32, 64, 128, 256), mlp_ratios=(2, 2, 2, 2),
                                       topks=(1, 4, 16, -2), kv_per_wins=(-1, -1, -1, -1), **kw), False),
    "biformer_stl": (lambda **kw: BiFormerSTL(**_NARROW, **kw), False),
    "biformer_stl_nchw": (lambda **kw: BiFormerSTL(**_NARROW, topks=(1, 4, 16, -1), nchw=True, **kw), False),
    "debiformer": (lambda **kw: bilevel.create_model("debiformer_tiny", depth=(1, 1, 1, 1), num_classes=10, **kw),
                   False),
    "crossformer": (lambda **kw: CrossFormer(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                                             num_classes=10, **kw), True),
}
STAGE_PREFIXES = ("stages.", "downsample_layers.", "layers.")
#: timm's own models the heads are compared with: NCHW features (ConvNeXt) and NHWC features (Swin)
TIMM_NCHW, TIMM_NHWC = "convnext_atto", "swin_tiny_patch4_window7_224"
#: the pooling types of timm's SelectAdaptivePool2d
GLOBAL_POOLS = ["avg", "max", "avgmax", "catavgmax", "fast"]


def _as_nchw(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if nhwc else x


@pytest.fixture(params=sorted(FAMILIES))
def family_builder(request):
    """(builder taking constructor kwargs, whether the features are NHWC)"""
    return FAMILIES[request.param]


@pytest.fixture
def family(family_builder):
    build, nhwc = family_builder
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


@pytest.mark.parametrize("coarse", [False, True])
def test_layer_decay_groups_follow_the_order_in_which_layers_run(family, image, coarse):
    """timm's layer-wise lr decay ranks parameters by ``group_matcher``: the rank must grow along the forward
    pass, or a layer gets the learning rate of one far from it."""
    model, _ = family
    rank = {name: group for group, names in group_parameters(model, model.group_matcher(coarse)).items()
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


def _coarse_groups(model: torch.nn.Module) -> list[set[str]]:
    """The top-level module names in each of ``model``'s coarse parameter groups, in order."""
    return [{name.split(".")[0] for name in names}
            for names in group_parameters(model, model.group_matcher(coarse=True)).values()]


def test_coarse_groups_keep_each_downsampler_with_its_stage_as_timm_swin(family):
    model, _ = family
    reference = _coarse_groups(timm.create_model(TIMM_NHWC))
    groups = _coarse_groups(model)
    assert len(groups) == len(reference) == 6                  # stem, four stages, final norm + head
    assert groups[-1] == reference[-1] == {"norm", "head"}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_reset_classifier_builds_the_head_in_the_model_dtype_as_timm(family, image, dtype):
    model, _ = family
    reference = timm.create_model(TIMM_NCHW).to(dtype)
    reference.reset_classifier(7)
    model.to(dtype).reset_classifier(7)
    assert model.get_classifier().weight.dtype == reference.get_classifier().weight.dtype == dtype
    logits = model(image.to(dtype))
    assert logits.shape == (1, 7) and logits.dtype == dtype


@pytest.mark.parametrize("global_pool", [None, "max"])
def test_reset_classifier_on_the_meta_device_keeps_the_head_there_as_timm(family, global_pool):
    model = family[0].to("meta")
    reference = timm.create_model(TIMM_NCHW).to("meta")
    reference.reset_classifier(7, global_pool)
    model.reset_classifier(7, global_pool)
    assert model.get_classifier().weight.is_meta and reference.get_classifier().weight.is_meta


@functools.cache
def _timm_pooled_width_factor(global_pool: str) -> int:
    """head_hidden_size / num_features of timm's Swin with this pooling (2 for "catavgmax")."""
    reference = timm.create_model(TIMM_NHWC, global_pool=global_pool)
    return reference.head_hidden_size // reference.num_features


def _pooled(features: torch.Tensor, global_pool: str, nhwc: bool) -> torch.Tensor:
    """What each of timm's pooling types gives: (N, C, H, W) or (N, H, W, C) -> (N, C) (2C for "catavgmax")."""
    dims = (1, 2) if nhwc else (2, 3)
    mean, top = features.mean(dims), features.amax(dims)
    return {"avg": mean, "fast": mean, "max": top, "avgmax": 0.5 * (mean + top),
            "catavgmax": torch.cat([mean, top], dim=1)}[global_pool]


def _assert_pools(model: torch.nn.Module, global_pool: str, nhwc: bool, image: torch.Tensor) -> None:
    features = model.forward_features(image)
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, _pooled(features, global_pool, nhwc))
    width = features.shape[-1 if nhwc else 1]
    assert model.num_features == width
    assert model.head_hidden_size == model.get_classifier().in_features == pooled.shape[1] \
        == width * _timm_pooled_width_factor(global_pool)
    assert model(image).shape == (1, model.num_classes)


@torch.no_grad()
@pytest.mark.parametrize("global_pool", GLOBAL_POOLS)
def test_every_timm_global_pool_at_creation_and_on_reset(family_builder, image, global_pool):
    build, nhwc = family_builder
    _assert_pools(build(global_pool=global_pool).eval(), global_pool, nhwc, image)
    model = build().eval()
    model.reset_classifier(5, global_pool)
    _assert_pools(model, global_pool, nhwc, image)
    model.prune_intermediate_layers([0, 1])
    model.reset_classifier(3, global_pool)
    _assert_pools(model, global_pool, nhwc, image)


@torch.no_grad()
def test_default_pooling_is_the_official_mean(family, image):
    model, nhwc = family
    features = model.forward_features(image)
    official = features.flatten(1, 2).mean(1) if nhwc else features.flatten(2).mean(-1)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), official, rtol=0, atol=0)


def test_an_unknown_global_pool_is_refused_as_timm_and_leaves_the_head(family):
    model, _ = family
    head = model.get_classifier()
    for network in (model, timm.create_model(TIMM_NCHW)):
        with pytest.raises(AssertionError, match="Invalid pool type: token"):
            network.reset_classifier(3, "token")
    assert model.get_classifier() is head and model.global_pool == "avg"


def _per_position_logits(model: torch.nn.Module, features: torch.Tensor, class_dim: int) -> torch.Tensor:
    """The classifier applied at each position of the features, its classes on ``class_dim``."""
    head = model.get_classifier()
    return torch.nn.functional.linear(features.movedim(class_dim, -1), head.weight, head.bias).movedim(-1, class_dim)


@torch.no_grad()
def test_unpooled_features_give_per_position_logits_as_timm(family_builder, image):
    """global_pool='': (N, classes, H, W) from NCHW maps as timm's ConvNeXt, (N, H, W, classes) as its Swin;
    so pruning (which leaves the model unpooled) then reset_classifier(n) gives per-position logits too."""
    build, nhwc = family_builder
    class_dim = 3 if nhwc else 1
    reference = timm.create_model(TIMM_NHWC if nhwc else TIMM_NCHW, global_pool="", num_classes=10).eval()
    assert reference(torch.randn(1, 3, 224, 224)).shape[class_dim] == 10
    model = build(global_pool="").eval()
    features = model.forward_features(image)
    torch.testing.assert_close(model(image), _per_position_logits(model, features, class_dim))
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features)

    stage_outputs = model.forward_intermediates(image, intermediates_only=True)
    model.prune_intermediate_layers([0, 1])
    model.reset_classifier(4)
    logits = model(image)
    assert _as_nchw(logits, nhwc).shape == (1, 4, *stage_outputs[1].shape[2:])
    torch.testing.assert_close(logits, _per_position_logits(model, model.forward_features(image), class_dim))
