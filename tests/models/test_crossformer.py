"""CrossFormer: equivalence with the official code (golden cases), checkpoints, input sizes, feature API."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import bilevel
import bilevel.models.crossformer  # noqa: F401  (registers the variants with timm)
from bilevel.models._pyramid import InputSizeError
from bilevel.models.crossformer import CrossFormer
from bilevel.ops.lsda import relative_offsets, relative_position_index
from bilevel.ops.recording import record_routing
from tests.conftest import assert_model_matches_golden_case, golden_cases

GOLDEN = golden_cases("model", "crossformer")

#: measured on the official code (ARCHITECTURES.md §3.1)
OFFICIAL_PARAM_COUNTS = {
    "crossformer_tiny": 27_776_794,
    "crossformer_small": 30_657_394,
    "crossformer_base": 51_971_554,
    "crossformer_large": 91_971_184,
}

#: a CrossFormer small enough for shape sweeps, gradients and compilation
SMALL = dict(embed_dim=32, depths=(1, 2, 1, 2), num_heads=(1, 2, 4, 8), num_classes=10)


def _small(**kwargs) -> CrossFormer:
    return CrossFormer(**dict(SMALL, **kwargs)).eval()


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_case(path, golden_fill):
    assert_model_matches_golden_case(path, golden_fill)


def test_golden_cases_exist():
    assert GOLDEN, "no CrossFormer golden case found in the manifest"


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_variant_parameter_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAM_COUNTS[name]
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    # every conv that reads the image is an input conv, adapted when in_chans differs
    image_convs = [name for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3]
    assert image_convs == [f"patch_embed.projs.{i}" for i in range(4)]
    assert list(model.pretrained_cfg["first_conv"]) == image_convs


def _v1_state_dict(model: CrossFormer) -> dict[str, torch.Tensor]:
    """The model's state dict in the released-checkpoint layout: plus two tables per attention."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            state[f"{name}.biases"] = relative_offsets(module.group_size)
            state[f"{name}.relative_position_index"] = relative_position_index(module.group_size)
    return state


def test_v1_checkpoint_loads_strictly(tmp_path):
    source = bilevel.models.crossformer.crossformer_tiny(**SMALL)
    v1_state = _v1_state_dict(source)
    assert len(v1_state) == len(source.state_dict()) + 2 * sum(SMALL["depths"])
    path = tmp_path / "crossformer_v1.pth"
    torch.save({"model": v1_state, "epoch": 3}, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
        loaded = bilevel.create_model("crossformer_tiny", checkpoint_path=path, **SMALL).eval()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        direct = _small()
        direct.load_state_dict(v1_state, strict=True)
        torch.testing.assert_close(direct(x), expected, rtol=0, atol=0)
        for timm_way in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))),
                         dict(checkpoint_path=str(path))):
            through_timm = timm.create_model("crossformer_tiny", **timm_way, **SMALL).eval()
            torch.testing.assert_close(through_timm(x), expected, rtol=0, atol=0)


def test_own_state_dict_round_trips(tmp_path):
    source = _small()
    path = tmp_path / "own.pth"
    torch.save(source.state_dict(), path)
    target = _small()
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_gradients_reach_the_position_bias():
    model = _small().train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    dpb = {name: p.grad for name, p in model.named_parameters() if ".attn.pos." in name}
    assert len(dpb) == 14 * sum(SMALL["depths"])
    missing = [name for name, grad in dpb.items() if grad is None or grad.abs().sum() == 0]
    assert not missing, missing


def _ceil_chain(size: int) -> list[int]:
    sides = [size // 4]
    for _ in range(3):
        sides.append(math.ceil(sides[-1] / 2))
    return sides


@pytest.mark.parametrize("height, width, batch", [(224, 224, 1), (256, 320, 3), (200, 300, 1), (97, 75, 2),
                                                  (32, 32, 1)])
def test_any_input_size(height, width, batch):
    model = _small()
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        final, features = model.forward_intermediates(x)
        logits = model(x)
    assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(batch, 32 * 2 ** i, h, w) for i, (h, w) in enumerate(zip(_ceil_chain(height),
                                                                                _ceil_chain(width)))]
    if batch > 1:  # padding, masks and groups never mix the images of a batch
        with torch.no_grad():
            torch.testing.assert_close(model(x[1:2]), logits[1:2], rtol=1e-5, atol=1e-5)


def test_float64_follows_float32():
    """Every table (including those made on the fly for non-nominal group sizes) follows the model dtype."""
    model = _small()
    x = torch.randn(1, 3, 97, 75)
    with torch.no_grad():
        single = model(x)
        double = model.double()(x.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-5)


def test_grouping_follows_the_run_time_size():
    """img_size only fixes the v1 table shapes: built for 224 or 256, a 256 input gives the same output."""
    at_224, at_256 = _small(img_size=224), _small(img_size=256)
    at_256.load_state_dict(at_224.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(at_256(x), at_224(x), rtol=0, atol=0)
    with record_routing(at_256) as trace:
        at_256(x)
    first = trace.by_module("layers.0.blocks.0.attn")
    assert (first.map_size, first.extras["mode"], first.extras["padded_size"]) == ((64, 64), "sda", (70, 70))
    lda = trace.by_module("layers.1.blocks.1.attn")
    assert (lda.map_size, lda.extras["mode"], lda.extras["interval"], lda.extras["padded_size"]) == (
        (32, 32), "lda", 4, (56, 56))


def test_tiny_built_for_256_describes_its_size():
    with torch.device("meta"):
        model = timm.create_model("crossformer_tiny", img_size=256)
    assert model.pretrained_cfg["input_size"] == (3, 256, 256)
    # the v1 tables follow the official construction: 8x8 stage-4 maps keep G = 7
    assert model.layers[3].blocks[0].attn.relative_position_index.shape == (49, 49)


def test_stage_four_at_224_is_global_sda():
    model = _small()
    with torch.no_grad(), record_routing(model) as trace:
        model(torch.randn(1, 3, 224, 224))
    assert len(trace.by_kind("lsda")) == sum(SMALL["depths"])
    modes = [(record.module, record.extras["mode"], record.extras["group_size"]) for record in trace]
    assert modes == [("layers.0.blocks.0.attn", "sda", 7), ("layers.1.blocks.0.attn", "sda", 7),
                     ("layers.1.blocks.1.attn", "lda", 7), ("layers.2.blocks.0.attn", "sda", 7),
                     ("layers.3.blocks.0.attn", "sda", 7), ("layers.3.blocks.1.attn", "sda", 7)]
    assert all(record.region_grid == (1, 1) for record in trace if record.module.startswith("layers.3"))


def test_torch_compile_matches_eager():
    model = _small()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_features_only_gives_the_pyramid():
    model = timm.create_model("crossformer_tiny", features_only=True, **SMALL).eval()
    assert model.feature_info.channels() == [32, 64, 128, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 128, 160))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 32, 40), (1, 64, 16, 20), (1, 128, 8, 10), (1, 256, 4, 5)]


def test_head_and_classifier():
    model = _small()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2, 2, 256)
        assert model.forward_head(features, pre_logits=True).shape == (2, 256)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(3, global_pool="")        # NHWC features: per-position logits, like timm's Swin
        assert model(x).shape == (2, 2, 2, 3)


def test_bad_inputs_are_refused():
    model = _small()
    with pytest.raises(InputSizeError, match="3-channel"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match="too small"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="img_size"):
        CrossFormer(img_size=16)


def test_img_size_stays_in_the_pretrained_cfg_under_an_overlay(tmp_path):
    path = tmp_path / "crossformer.pth"
    torch.save(_small().state_dict(), path)
    small = dict(SMALL, img_size=256)
    with torch.device("meta"):
        plain = timm.create_model("crossformer_tiny", pretrained_cfg_overlay=dict(crop_pct=1.0), **small)
    loaded = timm.create_model("crossformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               **small)
    for model in (plain, loaded):
        assert model.pretrained_cfg["input_size"] == (3, 256, 256) and model.pretrained_cfg["pool_size"] == (8, 8)
    assert plain.pretrained_cfg["crop_pct"] == 1.0
    with torch.device("meta"):                           # the caller's own input_size wins
        told = timm.create_model("crossformer_tiny", pretrained_cfg_overlay=dict(input_size=(3, 288, 288)), **small)
    assert told.pretrained_cfg["input_size"] == (3, 288, 288)


def test_img_size_may_be_a_pair():
    square = _small(img_size=224)
    pair = _small(img_size=(224, 224))
    pair.load_state_dict(square.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(pair(x), square(x), rtol=0, atol=0)
    with torch.device("meta"):
        wide = timm.create_model("crossformer_tiny", img_size=(224, 320), **SMALL)
    # stage maps 56x80, 28x40, 14x20, 7x10
    assert wide.pretrained_cfg["input_size"] == (3, 224, 320) and wide.pretrained_cfg["pool_size"] == (7, 10)
    for bad in ((224,), (224, 224, 3), "224", (224.0, 224)):
        with pytest.raises(ValueError, match="img_size must be an int or \\(height, width\\)"):
            CrossFormer(img_size=bad)
