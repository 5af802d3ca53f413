"""DBRA operator: golden equivalence with the official code, padding, sampling points, gradients, compile."""
from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.ops import record_routing
from bilevel.ops.dbra import DeBiLevelRoutingAttention
from tests.conftest import golden_cases, load_case, state_dict_layout

DBRA_CASES = golden_cases("op", "op_dbra")


def small_dbra(**kwargs) -> DeBiLevelRoutingAttention:
    """debi_tiny stage-2 settings (dim 128, 4 heads, 2 offset groups, stride 4), routing to 8 regions."""
    args = dict(dim=128, num_heads=4, n_win=7, topk=8, side_dwconv=5, auto_pad=True, param_size="tiny")
    return DeBiLevelRoutingAttention(**dict(args, **kwargs))


def test_public_dbra_cases_are_present():
    assert len(DBRA_CASES) >= 2, "expected the public DBRA golden cases in ../shared/reference/golden"


@pytest.mark.parametrize("path", DBRA_CASES, ids=lambda p: p.stem)
def test_dbra_matches_official_golden_case(path, golden_fill):
    case = load_case(path)
    op = bilevel.create_op(case["op"]["class"], **case["op"]["kwargs"])
    assert isinstance(op, DeBiLevelRoutingAttention)
    assert sorted(map(str, state_dict_layout(op))) == sorted(map(str, case["state_dict"]))
    assert sum(p.numel() for p in op.parameters()) == case["param_count"]
    golden_fill.fill_(op)
    op.eval()
    x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with torch.no_grad():
        with record_routing(op) as trace:
            out = op(x)
        official_tuple = op(x, ret_attn_mask=True)
    expected = golden_fill.decode_tensor(case["output"])
    tolerance = dict(atol=case["tolerance"]["atol"], rtol=case["tolerance"]["rtol"])
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(official_tuple[0], expected, **tolerance)
    recorded = [record.indices for record in trace.by_kind("dbra")]
    assert len(recorded) == len(case["routing_indices"])
    for got, want in zip(recorded, case["routing_indices"]):
        assert torch.equal(got, golden_fill.decode_tensor(want))
        assert torch.equal(official_tuple[2], got)


def test_padding_is_a_no_op_when_map_and_deformed_grid_divide():
    x = torch.randn(2, 28, 28, 128)                    # deformed grid 7x7 (stride 4)
    padded, unpadded = small_dbra(auto_pad=True).eval(), small_dbra(auto_pad=False).eval()
    unpadded.load_state_dict(padded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(padded(x), unpadded(x), atol=0, rtol=0)


def test_official_misspelt_keyword_is_accepted():
    assert small_dbra(auto_pad=False, uto_pad=True).auto_pad is True
    assert small_dbra(auto_pad=True, uto_pad=False).auto_pad is False


@pytest.mark.parametrize("size", [(28, 28), (15, 22), (5, 9), (29, 57)])
def test_any_map_size_runs_with_auto_pad(size):
    op = small_dbra().eval()
    x = torch.randn(1, *size, 128)
    with torch.no_grad(), record_routing(op) as trace:
        out = op(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (record,) = trace
    hk, wk = -(-record.extras["padded_map_size"][0] // 4), -(-record.extras["padded_map_size"][1] // 4)
    assert record.extras["sampling_points"].shape == (1, 2, hk, wk, 2)
    assert record.extras["deformed_grid"] == (-(-hk // 7) * 7, -(-wk // 7) * 7)


def test_unpadded_op_names_the_size_problem():
    with pytest.raises(ValueError, match="15x22 map does not divide into 7x7 regions"):
        small_dbra(auto_pad=False)(torch.randn(1, 15, 22, 128))
    with pytest.raises(ValueError, match="deformed grid: a 4x4 map"):
        small_dbra(auto_pad=False)(torch.randn(1, 14, 14, 128))


def test_settings_are_chosen_by_param_size_and_dim():
    assert small_dbra().conv_offset_q[0].weight.shape == (64, 1, 7, 7)
    assert small_dbra().rpe_table.shape == (4, 55, 55)
    assert DeBiLevelRoutingAttention(512, num_heads=16, param_size="small").mlp.linear1[0].out_channels == 512
    assert DeBiLevelRoutingAttention(512, num_heads=16, param_size="tiny").mlp.linear1[0].out_channels == 1536
    with pytest.raises(ValueError, match="param_size='tiny' and dim=96"):
        DeBiLevelRoutingAttention(96, num_heads=3, param_size="tiny")
    with pytest.raises(ValueError, match="qk_dim == dim"):
        small_dbra(qk_dim=64)
    with pytest.raises(ValueError, match="kv_downsample_mode='avgpool'"):
        small_dbra(kv_downsample_mode="avgpool")


def test_sampling_points_start_at_pixel_centres_and_stay_in_range():
    op = small_dbra().eval()
    x = torch.randn(1, 28, 28, 128)
    with torch.no_grad():
        op.conv_offset_q[3].weight.zero_()                 # no offset: sample at the reference points
        with record_routing(op) as trace:
            op(x)
    centres = (torch.arange(7) + 0.5) / 7 * 2 - 1
    points = trace[0].extras["sampling_points"]
    torch.testing.assert_close(points[0, 1, :, 0, 0], centres)   # y of column 0
    torch.testing.assert_close(points[0, 0, 3, :, 1], centres)   # x of row 3
    torch.testing.assert_close(trace[0].extras["reference_points"], points[0, 0])
    with torch.no_grad():
        op.conv_offset_q[3].weight.fill_(10.0)             # huge offsets are clamped to the map
        with record_routing(op) as trace:
            op(x)
    assert trace[0].extras["sampling_points"].abs().max() <= 1.0


def test_gradients_reach_the_offset_network_and_the_position_bias():
    op = small_dbra()
    op(torch.randn(2, 28, 28, 128)).square().mean().backward()
    for name in ("conv_offset_q.0.weight", "conv_offset_q.1.norm.weight", "conv_offset_q.3.weight", "rpe_table",
                 "proj_q.weight", "proj_k.weight", "mlp.dwc.weight"):
        grad = op.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_torch_compile_captures_one_graph_and_matches_eager():
    # fullgraph: DBRA traces without graph breaks. aot_eager keeps the test inside the time budget
    # (a cold inductor build of this graph takes over a minute on two cores).
    op = small_dbra().eval()
    x = torch.randn(1, 28, 28, 128)
    with torch.no_grad():
        expected = op(x)
        compiled = torch.compile(op, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_on_cpu_agrees_with_float32(dtype):
    """One offset group (stage 1): the sampled map is the channels-last view of the NHWC input, which the CPU
    grid_sample misreads in bfloat16/float16 unless it is made contiguous."""
    op = DeBiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4, side_dwconv=5, auto_pad=True,
                                   param_size="tiny").eval()
    assert op.settings.groups == 1
    x = torch.randn(2, 56, 56, 64)
    with torch.no_grad():
        expected = op(x)
        got = op.to(dtype)(x.to(dtype)).float()
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("shape, message", [
    ((1, 28, 28, 64), r"got \(1, 28, 28, 64\)$"),
    ((1, 128, 28, 28), r"got \(1, 128, 28, 28\), which looks like NCHW"),
    ((28, 28, 128), r"got \(28, 28, 128\)$"),
])
def test_dbra_names_the_expected_layout_for_wrong_inputs(shape, message):
    with pytest.raises(ValueError, match=r"^DeBiLevelRoutingAttention: x must be \(N, H, W, C=128\) \(NHWC\); "
                                         + message):
        small_dbra()(torch.randn(*shape))


def test_dbra_refuses_bad_n_win_and_unknown_backends_at_construction():
    with pytest.raises(ValueError, match="^DeBiLevelRoutingAttention: n_win must be at least 1.*n_win=0"):
        small_dbra(n_win=0)
    with pytest.raises(ValueError, match="^DeBiLevelRoutingAttention: unknown backend='spda'; choose 'auto'"):
        small_dbra(backend="spda")
