"""Segmentation pieces in-process: decode heads, sliding-window inference, optimiser groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel.models.heads import HEADS, create_head
from bilevel.tasks import SemanticSegmenter, sliding_window_logits
from bilevel.tasks.optim import parameter_groups, warmup_cosine

SMALL = dict(model_name="biformer_tiny", num_classes=3, model_kwargs={"depth": [1, 1, 1, 1]},
             head_kwargs={"fpn_channels": 32, "head_channels": 16})


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_map_four_stages_to_stride_4_logits(name):
    channels, strides = [8, 16, 24, 32], [4, 8, 16, 32]
    features = [torch.randn(2, c, 96 // s, 80 // s) for c, s in zip(channels, strides)]
    kwargs = {"fpn": dict(fpn_channels=16, head_channels=8), "upernet": dict(channels=16)}[name]
    head = create_head(name, channels, num_classes=5, **kwargs)
    logits = head(features)
    assert logits.shape == (2, 5, 24, 20)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_unknown_head_is_named():
    with pytest.raises(ValueError, match="'segformer'"):
        create_head("segformer", [1, 2, 3, 4], 2)


def test_sliding_window_covering_the_image_equals_whole_image():
    model = SemanticSegmenter(**SMALL, inference="slide", window=96, stride=64).eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        whole = model(images)
        slide = model.infer(images)
    assert slide.shape == (2, 3, 64, 80)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


def test_sliding_window_averages_overlaps_exactly():
    """For a per-pixel predictor every overlapping window agrees, so the average is the whole-image answer."""
    pointwise = nn.Conv2d(3, 4, 1)
    images = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        slide = sliding_window_logits(pointwise, images, window=32, stride=20, num_classes=4)
        torch.testing.assert_close(slide, pointwise(images))


def test_segmenter_keeps_backbone_and_head_apart_and_trains_every_parameter():
    model = SemanticSegmenter(**SMALL)
    keys = model.state_dict().keys()
    assert all(key.startswith(("backbone.", "decode_head.")) for key in keys)
    assert not any(key.startswith("backbone.head.") for key in keys)
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (DDP would fail): {unused[:5]}"


def test_parameter_groups_exclude_norms_biases_and_decay_layers():
    model = SemanticSegmenter(**SMALL)
    groups = parameter_groups(model, weight_decay=0.05, lr=1e-3, layer_decay=0.5, backbone=model.backbone,
                              backbone_prefix="backbone.")
    names = {id(p): name for name, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)
    for group in groups:
        for param in group["params"]:
            if param.ndim <= 1:
                assert group["weight_decay"] == 0.0, names[id(param)]
            if names[id(param)].startswith("decode_head."):
                assert group["lr"] == 1e-3
    backbone_lrs = sorted({g["lr"] for g in groups if any(names[id(p)].startswith("backbone.") for p in g["params"])})
    assert len(backbone_lrs) > 2 and backbone_lrs[0] < 1e-3 * 0.5 ** 2


def test_warmup_then_cosine_schedule():
    factors = [warmup_cosine(step, 4, 20, 0.1) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 15 / 16)).item()))
