"""CrossFormer's SDA/LDA grouping, padding mask, position-bias tables and grouped attention."""
from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.ops.lsda import (
    PADDED_KEY_BIAS,
    DynamicPosBias,
    GroupAttention,
    group_members,
    group_tokens,
    attend_in_groups,
    padded_key_bias,
    plan_groups,
    relative_offsets,
    relative_position_index,
    token_groups,
    ungroup_tokens,
)
from bilevel.ops.recording import record_routing
from bilevel.ops.regions import region_partition

# (map size, G, I): unpadded, padded for LDA only, padded for both, non-square
LAYOUT_CASES = [((12, 12), 3, 2), ((8, 8), 2, 4), ((10, 13), 3, 2), ((9, 20), 4, 2)]


def _map(height: int, width: int, channels: int = 5, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, height, width, channels)


@pytest.mark.parametrize("size, group, interval", LAYOUT_CASES)
@pytest.mark.parametrize("long_distance", [False, True])
def test_group_ungroup_round_trip(size, group, interval, long_distance):
    layout = plan_groups(size, group, interval, long_distance)
    unit = layout.group_size * layout.interval
    assert layout.padded_size[0] % unit == 0 and layout.padded_size[1] % unit == 0
    assert layout.padded_size[0] - size[0] < unit and layout.padded_size[1] - size[1] < unit
    x = _map(*layout.padded_size)
    groups = group_tokens(x, layout)
    assert groups.shape == (2, layout.num_groups, layout.group_size ** 2, 5)
    torch.testing.assert_close(ungroup_tokens(groups, layout), x, rtol=0, atol=0)


def test_sda_groups_are_the_region_partition():
    layout = plan_groups((14, 21), 7, 4, long_distance=False)
    x = _map(14, 21)
    torch.testing.assert_close(group_tokens(x, layout), region_partition(x, layout.group_grid), rtol=0, atol=0)


def _expected_members(size, row, col, group, interval):
    """Tokens sharing (row, col)'s LDA group: same G*I block and same phase modulo I."""
    block = group * interval
    return {(r, c) for r in range(size[0]) for c in range(size[1])
            if r // block == row // block and c // block == col // block
            and r % interval == row % interval and c % interval == col % interval}


@pytest.mark.parametrize("size, group, interval", LAYOUT_CASES)
def test_group_members_follow_the_sampling_formula(size, group, interval):
    lda = plan_groups(size, group, interval, long_distance=True)
    sda = plan_groups(size, group, interval, long_distance=False)
    for row in range(size[0]):
        for col in range(size[1]):
            members = {tuple(rc) for rc in group_members(lda, row, col).tolist()}
            assert members == _expected_members(size, row, col, group, interval), (row, col)
            members = {tuple(rc) for rc in group_members(sda, row, col).tolist()}
            assert members == _expected_members(size, row, col, group, 1), (row, col)


def test_token_groups_on_a_stage_map():
    groups = token_groups((28, 28), 9, 13, group_size=7, interval=4)
    assert groups["sda"].shape == (49, 2) and groups["lda"].shape == (49, 2)
    assert set(groups["sda"][:, 0].tolist()) == set(range(7, 14))
    assert set(groups["lda"][:, 0].tolist()) == set(range(1, 28, 4))
    with pytest.raises(ValueError, match="outside"):
        token_groups((28, 28), 28, 0)


def test_small_maps_fall_back_to_one_sda_group_of_the_long_side():
    """The official segmentation backbone's rule: a map with a side <= G is one group of side max(H, W)."""
    square = plan_groups((7, 7), 7, 1, long_distance=True)
    assert (square.mode, square.group_size, square.num_groups, square.is_padded) == ("sda", 7, 1, False)
    wide = plan_groups((5, 9), 7, 2, long_distance=True)
    assert (wide.mode, wide.group_size, wide.padded_size, wide.num_groups, wide.is_padded) == (
        "sda", 9, (9, 9), 1, True)
    large = plan_groups((64, 64), 7, 8, long_distance=True)
    assert (large.mode, large.padded_size, large.num_groups) == ("lda", (112, 112), 256)
    assert plan_groups((64, 64), 7, 8, long_distance=False).padded_size == (70, 70)


@pytest.mark.parametrize("long_distance", [False, True])
def test_padded_key_bias_marks_exactly_the_padded_tokens(long_distance):
    layout = plan_groups((10, 13), 3, 2, long_distance)
    bias = padded_key_bias(layout)
    assert bias.shape == (layout.num_groups, 9)
    as_map = ungroup_tokens(bias[None, ..., None], layout)[0, ..., 0]
    rows, cols = torch.meshgrid(torch.arange(layout.padded_size[0]), torch.arange(layout.padded_size[1]),
                                indexing="ij")
    padded = (rows >= 10) | (cols >= 13)
    assert torch.equal(as_map, torch.where(padded, PADDED_KEY_BIAS, 0.0))
    assert padded_key_bias(plan_groups((12, 12), 3, 2, long_distance)) is None


@pytest.mark.parametrize("group", [1, 3, 7])
def test_relative_position_index_selects_the_offset_of_each_pair(group):
    offsets, index = relative_offsets(group), relative_position_index(group)
    assert offsets.shape == ((2 * group - 1) ** 2, 2) and index.shape == (group ** 2, group ** 2)
    ys, xs = torch.meshgrid(torch.arange(group), torch.arange(group), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    torch.testing.assert_close(offsets[index], coords[:, None] - coords[None, :], rtol=0, atol=0)


def test_dynamic_position_bias_layout():
    attention = GroupAttention(dim=64, num_heads=2, group_size=7)
    shapes = {key: tuple(value.shape) for key, value in attention.pos.state_dict().items()}
    assert shapes == {
        "pos_proj.weight": (4, 2), "pos_proj.bias": (4,),
        "pos1.0.weight": (4,), "pos1.0.bias": (4,), "pos1.2.weight": (4, 4), "pos1.2.bias": (4,),
        "pos2.0.weight": (4,), "pos2.0.bias": (4,), "pos2.2.weight": (4, 4), "pos2.2.bias": (4,),
        "pos3.0.weight": (4,), "pos3.0.bias": (4,), "pos3.2.weight": (2, 4), "pos3.2.bias": (2,),
    }
    assert set(attention.state_dict()) == {f"pos.{key}" for key in shapes} | {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    with pytest.raises(ValueError, match="pos_dim"):
        DynamicPosBias(3, 2)


def _naive_attention(attention: GroupAttention, groups, group_size, key_bias):
    """Softmax(q * scale @ k^T + DPB + mask) @ v, head by head, as the official module computes it
    (without the DPB term when the module was built with position_bias=False)."""
    n, num_groups, tokens, channels = groups.shape
    heads, head_dim = attention.num_heads, channels // attention.num_heads
    q, k, v = attention.qkv(groups).split(channels, dim=-1)
    offsets = relative_offsets(group_size)
    table = attention.pos(offsets) if attention.pos is not None else None
    index = relative_position_index(group_size)
    outputs = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        logits = (q[..., part] * attention.scale) @ k[..., part].transpose(-1, -2)
        if table is not None:
            logits = logits + table[index, h]
        if key_bias is not None:
            logits = logits + key_bias[:, None, :]
        outputs.append(logits.softmax(-1) @ v[..., part])
    return attention.proj(torch.cat(outputs, dim=-1))


@pytest.mark.parametrize("long_distance", [False, True])
def test_group_attention_matches_the_naive_computation(long_distance):
    attention = GroupAttention(dim=32, num_heads=2, group_size=3).eval()
    layout = plan_groups((10, 13), 3, 2, long_distance)
    groups = group_tokens(_map(*layout.padded_size, channels=32), layout)
    key_bias = padded_key_bias(layout)
    with torch.no_grad():
        out = attention(groups, 3, key_bias)
        expected = _naive_attention(attention, groups, 3, key_bias)
    assert torch.isfinite(out).all()
    # groups made only of padding are cropped away; their logits (-1e6 + small) are all rounding noise
    real = (key_bias == 0).any(dim=1) if key_bias is not None else slice(None)
    torch.testing.assert_close(out[:, real], expected[:, real], rtol=1e-5, atol=1e-5)


def test_group_attention_other_group_size_computes_its_tables():
    attention = GroupAttention(dim=32, num_heads=2, group_size=7).eval()
    groups = torch.randn(1, 1, 25, 32)
    with torch.no_grad():
        torch.testing.assert_close(attention(groups, 5), _naive_attention(attention, groups, 5, None),
                                   rtol=1e-5, atol=1e-5)


def test_a_small_non_square_map_attends_in_one_masked_group():
    """7x10 (CrossFormer's stage 4 of a 224x320 image): every token attends to all 70 real tokens, with the
    position bias of a 10x10 group and the padded row keys masked."""
    attention = GroupAttention(dim=32, num_heads=2, group_size=7).eval()
    x = _map(7, 10, channels=32)
    layout = plan_groups((7, 10), 7, 1, long_distance=True)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 3))
    key_bias = torch.where(torch.arange(100) >= 70, PADDED_KEY_BIAS, 0.0)[None]
    with torch.no_grad():
        out = attend_in_groups(x, attention, layout)
        expected = _naive_attention(attention, padded.reshape(2, 1, 100, 32), 10, key_bias)
    torch.testing.assert_close(out, expected.reshape(2, 10, 10, 32)[:, :7], rtol=1e-5, atol=1e-5)


def test_v1_tables_are_dropped_on_load():
    attention = GroupAttention(dim=32, num_heads=2, group_size=7)
    state = attention.state_dict()
    v1_state = dict(state, biases=relative_offsets(7), relative_position_index=relative_position_index(7))
    fresh = GroupAttention(dim=32, num_heads=2, group_size=7)
    fresh.load_state_dict(v1_state, strict=True)
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in state.items())
    assert torch.equal(fresh.relative_position_index, relative_position_index(7))


def test_attend_in_groups_crops_padding_and_records_the_grouping():
    attention = GroupAttention(dim=32, num_heads=2, group_size=3).eval()
    x = _map(10, 13, channels=32)
    layout = plan_groups((10, 13), 3, 2, long_distance=True)
    with torch.no_grad(), record_routing(attention) as trace:
        out = attend_in_groups(x, attention, layout)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (record,) = trace
    assert record.kind == "lsda" and record.map_size == (10, 13)
    assert record.region_grid == layout.group_grid and record.region_size == (3, 3)
    assert record.extras == dict(mode="lda", group_size=3, interval=2, padded_size=(12, 18))
    # a real token's output ignores what the padded keys would have held
    grown = torch.nn.functional.pad(x, (0, 0, 0, 5, 0, 2), value=3.0)
    with torch.no_grad():
        again = attend_in_groups(grown, attention, plan_groups((12, 18), 3, 2, long_distance=True),
                     key_bias=padded_key_bias(layout))
    torch.testing.assert_close(again[:, :10, :13], out, rtol=1e-5, atol=1e-5)


def test_biased_attention_matches_the_fused_kernel_values_and_gradients():
    """The CPU path (explicit product) computes what scaled_dot_product_attention with the bias computes."""
    import torch.nn.functional as F

    from bilevel.ops.lsda import biased_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 49, 8, generator=generator, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 49, 49, generator=generator)
    ours = biased_attention(q, k, v, bias, 0.35)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.35)
    torch.testing.assert_close(ours, fused, atol=1e-5, rtol=1e-5)
    grad = torch.randn(ours.shape, generator=generator)
    for expected, actual in zip(torch.autograd.grad(fused, (q, k, v), grad), torch.autograd.grad(ours, (q, k, v), grad)):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_group_attention_takes_the_official_argument_order():
    # crossformer.py: Attention(dim, group_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, position_bias)
    attention = GroupAttention(56, 7, 8, False, 0.5, 0.0, 0.0, True)
    assert (attention.group_size, attention.num_heads, attention.scale) == (7, 8, 0.5)
    assert attention.qkv.bias is None and attention.pos.pos3[2].out_features == 8
    assert attention.relative_position_index.shape == (49, 49)
    assert attention.extra_repr() == "dim=56, group_size=7, num_heads=8, position_bias=True"


def test_group_attention_accepts_the_official_square_group_size_pair():
    assert GroupAttention(32, (5, 5), 2).group_size == 5
    with pytest.raises(ValueError, match=r"group_size must be an int G or a square pair \(G, G\), got \(5, 7\)"):
        GroupAttention(32, (5, 7), 2)


def test_crossformer_attention_is_created_by_its_qualified_official_name():
    attention = bilevel.create_op("CrossFormerAttention", dim=64, group_size=(7, 7), num_heads=2)
    assert isinstance(attention, GroupAttention) and (attention.group_size, attention.num_heads) == (7, 2)
    with pytest.raises(ValueError, match="unknown operator 'Attention'"):
        bilevel.create_op("Attention", dim=64, group_size=7, num_heads=2)


@pytest.mark.parametrize("map_size", [(9, 12), (10, 13)])
def test_group_attention_without_position_bias_adds_no_bias(map_size):
    attention = GroupAttention(dim=32, group_size=3, num_heads=2, position_bias=False).eval()
    assert set(attention.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert dict(attention.named_buffers()) == {} and attention.position_bias(3) is None
    layout = plan_groups(map_size, 3, 2, long_distance=True)
    groups = group_tokens(_map(*layout.padded_size, channels=32), layout)
    key_bias = padded_key_bias(layout)
    with torch.no_grad():
        out = attention(groups, 3, key_bias)
        expected = _naive_attention(attention, groups, 3, key_bias)
    real = (key_bias == 0).any(dim=1) if key_bias is not None else slice(None)
    torch.testing.assert_close(out[:, real], expected[:, real], rtol=1e-5, atol=1e-5)
