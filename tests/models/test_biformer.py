"""BiFormer: golden equivalence, official layout, any input size, timm conventions, checkpoints."""
from __future__ import annotations

import argparse
import pickle

import pytest
import timm
import torch

import bilevel
from bilevel.models._pyramid import InputSizeError
from bilevel.models.biformer import BiFormer
from bilevel.models.loading import CheckpointError
from tests.conftest import assert_model_matches_golden_case, golden_cases

MODEL_CASES = golden_cases("model", "biformer")

# Parameter counts measured by running the official code (ARCHITECTURES.md §1.1 and §1.7).
OFFICIAL_PARAMETERS = {
    "biformer_tiny": 13_142_760,
    "biformer_small": 25_536_232,
    "biformer_base": 56_804_968,
    "biformer_stl": 28_372_552,
    "biformer_stl_nchw": 28_372_552,
}
OFFICIAL_STATE_DICT_ENTRIES = {"biformer_tiny": 264, "biformer_small": 518, "biformer_base": 518,
                               "biformer_stl": 201, "biformer_stl_nchw": 201}


def small_biformer(**kwargs) -> BiFormer:
    """A two-block-per-stage-or-less BiFormer for fast tests (same code path as the variants)."""
    args = dict(depth=(1, 1, 2, 1), embed_dim=(32, 64, 128, 256), qk_dims=(32, 64, 128, 256), head_dim=32,
                mlp_ratios=(2, 2, 2, 2), topks=(1, 4, 16, -2), kv_per_wins=(-1, -1, -1, -1), num_classes=10)
    return BiFormer(**dict(args, **kwargs))


@pytest.mark.parametrize("path", MODEL_CASES, ids=lambda p: p.stem)
def test_biformer_matches_official_golden_case(path, golden_fill):
    assert_model_matches_golden_case(path, golden_fill)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMETERS))
def test_variants_have_the_official_size_and_layout(name):
    with torch.device("meta"):
        model = bilevel.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[name]
    assert len(model.state_dict()) == OFFICIAL_STATE_DICT_ENTRIES[name]


def test_registered_with_timm_and_listed():
    assert set(OFFICIAL_PARAMETERS) <= set(bilevel.list_models("biformer"))
    model = timm.create_model("biformer_tiny", num_classes=7)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.num_classes == 7
    assert model.default_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    with pytest.raises(ValueError, match="never downloads"):
        timm.create_model("biformer_tiny", pretrained=True)


@pytest.mark.parametrize("size", [(64, 64), (112, 336), (97, 130), (256, 256), (33, 200)])
@pytest.mark.parametrize("batch", [1, 3])
def test_any_input_size_runs_in_eval_and_train_mode(size, batch):
    model = small_biformer(drop_path_rate=0.1)
    x = torch.randn(batch, 3, *size)
    model.train()
    train_out = model(x)
    train_out.sum().backward()
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert train_out.shape == eval_out.shape == (batch, 10)
    assert torch.isfinite(eval_out).all()


def test_padding_is_a_no_op_at_official_sizes():
    padded = small_biformer(auto_pad=True).eval()
    strict = small_biformer(auto_pad=False).eval()
    strict.load_state_dict(padded.state_dict())
    x = torch.randn(1, 3, 112, 224)
    torch.testing.assert_close(padded(x), strict(x))
    with pytest.raises(InputSizeError, match=r"a 252x252 image does not fit BiFormer built with auto_pad=False: "
                                             r"each side must be a multiple of 112"):
        strict(torch.randn(1, 3, 252, 252))   # a multiple of 7, still not of 112 (stage 3 is 1/16)


def test_stl_nchw_runs_on_non_multiples_and_refuses_tiny_inputs():
    model = bilevel.create_model("biformer_stl_nchw", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 120, 136)).shape == (1, 3)
    with pytest.raises(InputSizeError, match="at least 112"):
        model(torch.randn(1, 3, 100, 200))


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl"])
@torch.no_grad()
def test_maps_run_in_channels_last_memory(name):
    """An NCHW-contiguous image is turned to channels-last once, so every block's NHWC view of its map is contiguous
    and its depthwise convs get their fast layout; the stage maps handed out stay NCHW-contiguous."""
    model = timm.create_model(name, depth=[1, 1, 1, 1]).eval()
    inputs = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            module.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    maps = model.forward_intermediates(torch.randn(1, 3, 224, 224), intermediates_only=True)
    assert inputs and all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
    assert all(stage_map.is_contiguous() for stage_map in maps)


def test_bad_inputs_get_clear_errors():
    model = small_biformer().eval()
    with pytest.raises(InputSizeError, match="3-channel images, got 1 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match="16x16 image is too small"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(InputSizeError, match=r"\(N, C, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_timm_feature_api():
    model = small_biformer().eval()
    x = torch.randn(2, 3, 112, 160)
    features = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in features] == [(2, 32, 28, 40), (2, 64, 14, 20), (2, 128, 7, 10), (2, 256, 4, 5)]
    final, intermediates = model.forward_intermediates(x, indices=[1, 3])
    assert len(intermediates) == 2
    torch.testing.assert_close(model.forward_head(final), model(x))
    assert model.forward_head(final, pre_logits=True).shape == (2, 256)
    backbone = bilevel.create_model("biformer_tiny", features_only=True, out_indices=(1, 2, 3))
    maps = backbone(torch.randn(1, 3, 224, 224))
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels() == [128, 256, 512]
    assert backbone.feature_info.reduction() == [8, 16, 32]


def test_reset_classifier():
    model = small_biformer()
    model.reset_classifier(4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256, 2, 2)


@torch.no_grad()
@pytest.mark.parametrize("name", ["biformer_tiny", "debiformer_tiny"])
def test_unpooled_nchw_features_give_per_position_logits_as_timm_convnext(name):
    x = torch.randn(1, 3, 64, 64)
    reference = timm.create_model("convnext_atto", global_pool="").eval()
    model = timm.create_model(name, global_pool="", depth=(1, 1, 1, 1)).eval()
    assert model(x).shape == reference(x).shape == (1, 1000, 2, 2)
    for network in (model, reference):
        network.prune_intermediate_layers([2])
        network.reset_classifier(10)
    assert model(x).shape == reference(x).shape == (1, 10, 4, 4)


def test_torch_compile_captures_the_whole_model_and_matches_eager():
    model = small_biformer(depth=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- checkpoints

@pytest.fixture
def filled_tiny(golden_fill):
    model = bilevel.create_model("biformer_tiny").eval()
    golden_fill.fill_(model)
    return model


def _outputs(model, seed=0):
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("layout", ["official", "bare", "lightning", "ddp"])
def test_checkpoint_round_trip(filled_tiny, tmp_path, layout):
    state = filled_tiny.state_dict()
    stored = {
        "official": {"model": state, "epoch": 299, "args": argparse.Namespace(model="biformer_tiny", lr=1e-3),
                     "max_accuracy": 81.4},
        "bare": state,
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
        "ddp": {"model": {f"module.{k}": v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "weights.pth"
    torch.save(stored, path)
    loaded = bilevel.create_model("biformer_tiny", checkpoint_path=path)
    torch.testing.assert_close(_outputs(loaded), _outputs(filled_tiny))


def test_head_is_replaced_when_class_count_differs(filled_tiny, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": filled_tiny.state_dict()}, path)
    with pytest.warns(UserWarning, match="re-initialised for 5 classes"):
        model = bilevel.create_model("biformer_tiny", checkpoint_path=path, num_classes=5)
    assert model.head.weight.shape == (5, 512)
    torch.testing.assert_close(model.stages[2][3].attn.qkv.qkv.weight, filled_tiny.stages[2][3].attn.qkv.qkv.weight)
    features = bilevel.create_model("biformer_tiny", checkpoint_path=path, features_only=True)
    assert len(features(torch.randn(1, 3, 112, 112))) == 4


def test_timm_pretrained_with_a_local_file(filled_tiny, tmp_path):
    """timm's way to load a local file: pretrained=True plus pretrained_cfg_overlay=dict(file=...).

    The official layout pickles an argparse Namespace, which a plain weights-only load refuses: the file
    goes through bilevel's reader, as with bilevel.create_model.
    """
    path = tmp_path / "official.pth"
    torch.save({"model": filled_tiny.state_dict(), "args": argparse.Namespace(model="biformer_tiny")}, path)
    loaded = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(_outputs(loaded), _outputs(filled_tiny))
    with pytest.warns(UserWarning, match="re-initialised for 5 classes"):
        five = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 num_classes=5)
    assert five.head.weight.shape == (5, 512)
    features = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 features_only=True, out_indices=(2, 3))
    x = torch.ones(1, 3, 112, 112)
    with torch.no_grad():
        expected = filled_tiny.forward_intermediates(x, indices=(2, 3), intermediates_only=True)
        for got, want in zip(features.eval()(x), expected, strict=True):
            torch.testing.assert_close(got, want)
    with pytest.raises(CheckpointError, match="does not fit biformer_small"):
        timm.create_model("biformer_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match="never downloads weights"):
        timm.create_model("biformer_tiny", pretrained=True)


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    with torch.device("meta"):
        other = bilevel.create_model("biformer_stl")
    path = tmp_path / "stl.pth"
    torch.save({"model": {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in other.state_dict().items()}}, path)
    with pytest.raises(CheckpointError,
                       match=r"does not fit biformer_tiny: missing keys \d+ \(downsample_layers.*unexpected keys"):
        bilevel.create_model("biformer_tiny", checkpoint_path=path)


def test_wrong_variant_reports_shape_mismatches(tmp_path):
    with torch.device("meta"):
        base = bilevel.create_model("biformer_base")
    path = tmp_path / "base.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in base.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        bilevel.create_model("biformer_small", checkpoint_path=path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"this is a text file, not weights\n", "bogus.pth is not a PyTorch checkpoint file"),
    (pickle.dumps(_Exploit()), "weights-only load refuses"),
])
def test_files_that_are_not_checkpoints_are_refused(tmp_path, content, message):
    path = tmp_path / "bogus.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        bilevel.create_model("biformer_tiny", checkpoint_path=path)


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "exploit.pth"
    torch.save({"model": {}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="weights-only load refuses"):
        bilevel.create_model("biformer_tiny", checkpoint_path=path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_checkpoint_file_and_unknown_model_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        bilevel.create_model("biformer_tiny", checkpoint_path=tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="unknown model 'biformer_huge'"):
        bilevel.create_model("biformer_huge")


def test_importing_bilevel_registers_every_family_with_timm():
    import subprocess
    import sys
    code = ("import bilevel, timm; names = timm.list_models('biformer_*') + timm.list_models('debi*') + "
            "timm.list_models('crossformer_*'); print(sorted(names) == sorted(bilevel.list_models()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = small_biformer().train()
    checkpointed = small_biformer().train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    plain(x).square().mean().backward()
    checkpointed(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
