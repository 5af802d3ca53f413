"""FusedLinear: the same function as nn.Linear (+ GELU), through oneDNN's fused kernel in CPU inference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bilevel.ops.linear import FusedLinear, fused_linear_available

INPUTS = {
    "tokens NHWC": lambda: torch.randn(2, 5, 7, 24),
    "channel slice": lambda: torch.randn(2, 5, 7, 48)[..., 8:32],
    "permuted NCHW": lambda: torch.randn(2, 24, 5, 7).permute(0, 2, 3, 1),
    "rows": lambda: torch.randn(9, 24),
    "no rows": lambda: torch.randn(0, 3, 24),
}


def ran_fused_kernel(function) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        function()
    return any("_linear_pointwise" in event.name for event in trace.events())


def expected(layer: FusedLinear, x: torch.Tensor) -> torch.Tensor:
    out = F.linear(x, layer.weight, layer.bias)
    return F.gelu(out) if layer.activation == "gelu" else out


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("make_input", INPUTS.values(), ids=INPUTS)
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_inference_takes_the_fused_kernel_and_matches_linear(activation, make_input, no_grad):
    torch.manual_seed(0)
    layer, x = FusedLinear(24, 40, activation=activation), make_input()
    with no_grad():
        assert ran_fused_kernel(lambda: layer(x)) == fused_linear_available()
        out = layer(x)
        assert out.shape == (*x.shape[:-1], 40)
        torch.testing.assert_close(out, expected(layer, x), rtol=1e-5, atol=1e-6)


def test_this_build_has_the_fused_kernel():
    # the standard x86 wheels ship oneDNN; without it the speed-up silently disappears
    assert fused_linear_available()


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_training_uses_linear_and_gives_its_gradients(activation):
    torch.manual_seed(0)
    layer = FusedLinear(24, 40, activation=activation)
    plain = nn.Linear(24, 40)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 24, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    assert not ran_fused_kernel(lambda: layer(x))
    out = layer(x)
    expected_out = plain(x_plain) if activation is None else F.gelu(plain(x_plain))
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    out.square().sum().backward()
    expected_out.square().sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["bfloat16", "no bias", "autocast"])
def test_other_cases_stay_with_linear(case):
    torch.manual_seed(0)
    layer = FusedLinear(24, 40, bias=case != "no bias", activation="gelu")
    x = torch.randn(3, 24)
    if case == "bfloat16":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not ran_fused_kernel(lambda: layer(x))
        out = layer(x)
        torch.testing.assert_close(out, expected(layer, x), rtol=0, atol=0)
    if case == "autocast":
        assert out.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_traces_exports_and_flop_counters_see_a_plain_linear():
    from torch.utils.flop_counter import FlopCounterMode

    layer, x = FusedLinear(24, 40, activation="gelu").eval(), torch.randn(3, 24)
    with torch.no_grad():
        traced = str(torch.jit.trace(layer, x).graph)            # what the TorchScript ONNX exporter reads
        exported = str(torch.export.export(layer, (x,)).graph)
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert "aten::linear" in traced and "mkldnn" not in traced
    assert "aten.linear" in exported and "mkldnn" not in exported
    assert counter.get_total_flops() == 2 * 3 * 24 * 40


def test_is_a_linear_with_its_keys_and_names_its_activation():
    layer = FusedLinear(4, 6, activation="gelu")
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert "activation=gelu" in repr(layer)
    with pytest.raises(ValueError, match="activation='relu'"):
        FusedLinear(4, 6, activation="relu")
