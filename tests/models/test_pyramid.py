"""What the three families share (bilevel.models._pyramid): timm's forward_intermediates and pruning."""
from __future__ import annotations

import pytest
import torch

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
