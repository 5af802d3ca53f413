"""BRA operators: golden equivalence with the official code, routing by construction, gradients, options."""
from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.ops import (BiLevelRoutingAttention, NCHWBiLevelRoutingAttention, TopkRouter, gather_regions,
                         record_routing, region_merge, region_partition, topk_routing)
from bilevel.ops.regions import ceil_region_means, pad_to_multiple
from tests.conftest import golden_cases, load_case, state_dict_layout

BRA_CASES = golden_cases("op", "op_bra")


def test_public_bra_cases_are_present():
    assert len(BRA_CASES) >= 4, "expected the public BRA golden cases in ../shared/reference/golden"


@pytest.mark.parametrize("path", BRA_CASES, ids=lambda p: p.stem)
def test_bra_matches_official_golden_case(path, golden_fill):
    case = load_case(path)
    op = bilevel.create_op(case["op"]["class"], **case["op"]["kwargs"])
    assert sorted(map(str, state_dict_layout(op))) == sorted(map(str, case["state_dict"]))
    assert sum(p.numel() for p in op.parameters()) == case["param_count"]
    golden_fill.fill_(op)
    op.eval()
    x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with record_routing(op) as trace, torch.no_grad():
        out = op(x)
    expected = golden_fill.decode_tensor(case["output"])
    torch.testing.assert_close(out, expected, atol=case["tolerance"]["atol"], rtol=case["tolerance"]["rtol"])
    recorded = [record.indices for record in trace]
    assert len(recorded) == len(case["routing_indices"])
    for got, want in zip(recorded, case["routing_indices"]):
        assert torch.equal(got, golden_fill.decode_tensor(want))


@pytest.mark.parametrize("size", [(14, 14), (21, 35), (7, 49)])
def test_region_partition_and_merge_are_inverse(size):
    x = torch.randn(2, *size, 5)
    grid = (7, 7)
    regions = region_partition(x, grid)
    region_size = (size[0] // 7, size[1] // 7)
    assert regions.shape == (2, 49, region_size[0] * region_size[1], 5)
    # region p = r * 7 + c holds rows r*h..(r+1)*h and columns c*w..(c+1)*w, row-major inside
    r, c = 3, 5
    block = x[:, r * region_size[0]:(r + 1) * region_size[0], c * region_size[1]:(c + 1) * region_size[1]]
    torch.testing.assert_close(regions[:, r * 7 + c], block.reshape(2, -1, 5))
    torch.testing.assert_close(region_merge(regions, grid, region_size), x)


def test_region_partition_rejects_indivisible_map():
    with pytest.raises(ValueError, match="does not split"):
        region_partition(torch.randn(1, 15, 14, 3), (7, 7))


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    x = torch.ones(1, 15, 17, 2)
    padded = pad_to_multiple(x, (7, 7))
    assert padded.shape == (1, 21, 21, 2)
    assert padded[:, :15, :17].eq(1).all() and padded[:, 15:].eq(0).all() and padded[:, :, 17:].eq(0).all()


def test_ceil_region_means_average_only_real_pixels():
    x = torch.arange(5 * 5, dtype=torch.float32).reshape(1, 1, 5, 5)
    means = ceil_region_means(x, (2, 2))          # 3x3 regions, the last row/column partial
    assert means.shape == (1, 9, 1)
    assert means[0, 8, 0] == x[0, 0, 4, 4]        # the corner region holds one real pixel
    assert means[0, 2, 0] == x[0, 0, 0:2, 4].mean()


def test_topk_routing_picks_largest_affinities_sorted():
    logits = torch.tensor([[[0.1, 0.9, 0.5, 0.3], [2.0, -1.0, 0.0, 1.0]]])
    routing = topk_routing(logits, 2)
    assert routing.indices.tolist() == [[[1, 2], [0, 3]]]
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="topk=5"):
        topk_routing(logits, 5)


def test_gather_regions_copies_the_routed_regions():
    regions = torch.randn(2, 6, 4, 3)
    indices = torch.tensor([[[5, 0]] * 6, [[2, 2]] * 6])
    gathered = gather_regions(regions, indices)
    assert gathered.shape == (2, 6, 2, 4, 3)
    assert torch.equal(gathered[0, 3, 0], regions[0, 5]) and torch.equal(gathered[1, 1, 1], regions[1, 2])


def _permutation_bra(permutation: list[int]) -> BiLevelRoutingAttention:
    """A BRA whose q projection is the identity and whose k projection permutes one-hot channels.

    With region r filled with the one-hot vector e_r, region i's query descriptor is e_i and region
    j's key descriptor is e_{permutation[j]}, so region i must route to j = permutation⁻¹(i).
    """
    dim = 4
    op = BiLevelRoutingAttention(dim, num_heads=1, n_win=2, topk=1, side_dwconv=0)
    weight = torch.zeros(3 * dim, dim)
    weight[:dim] = torch.eye(dim)
    for j, target in enumerate(permutation):
        weight[dim + target, j] = 1.0
    weight[2 * dim:] = torch.eye(dim)
    with torch.no_grad():
        op.qkv.qkv.weight.copy_(weight)
        op.qkv.qkv.bias.zero_()
    return op


def test_routing_follows_a_hand_built_affinity():
    permutation = [2, 0, 3, 1]
    op = _permutation_bra(permutation)
    x = torch.zeros(1, 4, 4, 4)
    for region in range(4):                       # 2x2 grid of 2x2-pixel regions
        row, col = divmod(region, 2)
        x[0, 2 * row:2 * row + 2, 2 * col:2 * col + 2, region] = 1.0
    _, _, indices, _ = op(x, ret_attn_mask=True)
    expected = [permutation.index(i) for i in range(4)]
    assert indices[0, :, 0].tolist() == expected


def test_gradients_reach_projections_and_lepe_but_not_routing():
    op = BiLevelRoutingAttention(32, num_heads=2, n_win=7, topk=3, side_dwconv=5)
    x = torch.randn(2, 14, 14, 32, requires_grad=True)
    with record_routing(op) as trace:
        out = op(x)
    out.square().mean().backward()
    for name in ("qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "lepe.weight"):
        grad = dict(op.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not trace[0].logits.requires_grad and trace[0].indices.dtype == torch.int64
    router = TopkRouter(8, topk=2, scale=1.0)
    q_regions = torch.randn(1, 5, 8, requires_grad=True)
    routing = router(q_regions, torch.randn(1, 5, 8))
    assert routing.logits.grad_fn is None and routing.weights.grad_fn is None


def test_differentiable_soft_routing_sends_gradient_through_routing():
    op = bilevel.create_op("BiLevelRoutingAttention", dim=16, num_heads=2, n_win=2, topk=2, param_routing=True,
                           diff_routing=True, soft_routing=True)
    out = op(torch.randn(1, 4, 4, 16))
    out.sum().backward()
    assert op.router.emb.weight.grad is not None and op.router.emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["avgpool", "maxpool", "ada_avgpool", "ada_maxpool"])
def test_key_value_downsampling_modes_run(mode):
    op = bilevel.create_op("BiLevelRoutingAttention", dim=16, num_heads=2, n_win=2, topk=2, kv_per_win=1,
                           kv_downsample_ratio=2, kv_downsample_mode=mode)
    assert op(torch.randn(2, 8, 8, 16)).shape == (2, 8, 8, 16)


@pytest.mark.parametrize("options, message", [
    (dict(kv_downsample_mode="fracpool"), "kv_downsample_mode='fracpool'"),
    (dict(kv_downsample_mode="conv"), "kv_downsample_mode='conv'"),
    (dict(diff_routing=True), "diff_routing"),
    (dict(param_routing=True), "param_routing"),
    (dict(param_attention="none"), "param_attention"),
])
def test_unsupported_options_are_rejected_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        bilevel.create_op("BiLevelRoutingAttention", dim=16, num_heads=2, **options)


def test_create_op_names_unknown_operators():
    with pytest.raises(ValueError, match="NoSuchAttention"):
        bilevel.create_op("NoSuchAttention", dim=8)


def test_legacy_bra_without_padding_rejects_indivisible_maps():
    op = BiLevelRoutingAttention(16, num_heads=2, n_win=7, topk=2)
    with pytest.raises(ValueError, match="auto_pad=True"):
        op(torch.randn(1, 15, 14, 16))


@pytest.mark.parametrize("size", [(15, 17), (8, 30), (7, 7), (29, 13)])
def test_padded_bra_runs_on_any_size_and_matches_manual_padding(size):
    op = BiLevelRoutingAttention(16, num_heads=2, n_win=7, topk=3, auto_pad=True).eval()
    x = torch.randn(2, *size, 16)
    out = op(x)
    assert out.shape == x.shape
    # same numbers as padding by hand and running the unpadded operator (the official auto_pad semantics)
    unpadded = BiLevelRoutingAttention(16, num_heads=2, n_win=7, topk=3).eval()
    unpadded.load_state_dict(op.state_dict())
    reference = unpadded(pad_to_multiple(x, (7, 7)))[:, :size[0], :size[1]]
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("size", [(15, 17), (14, 14), (23, 40)])
def test_nchw_bra_handles_partial_regions(size):
    op = NCHWBiLevelRoutingAttention(24, num_heads=3, n_win=7, topk=2, side_dwconv=5)
    with record_routing(op) as trace:
        out = op(torch.randn(2, 24, *size))
    assert out.shape == (2, 24, *size)
    region = (size[0] // 7, size[1] // 7)
    grid = (-(-size[0] // region[0]), -(-size[1] // region[1]))
    assert trace[0].region_grid == grid and trace[0].indices.shape == (2, grid[0] * grid[1], 2)


def test_nchw_bra_rejects_maps_smaller_than_the_grid():
    op = NCHWBiLevelRoutingAttention(8, num_heads=1, n_win=7, topk=1)
    with pytest.raises(ValueError, match="smaller than the 7x7 region grid"):
        op(torch.randn(1, 8, 6, 20))


def test_recording_is_off_by_default_and_scoped():
    op = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=1)
    with record_routing(op) as trace:
        op(torch.randn(1, 4, 4, 16))
    op(torch.randn(1, 4, 4, 16))
    assert len(trace) == 1 and trace[0].kind == "bra" and trace[0].map_size == (4, 4)


def test_inductor_compiled_bra_matches_eager():
    op = BiLevelRoutingAttention(32, num_heads=2, n_win=7, topk=4, side_dwconv=5, auto_pad=True).eval()
    x = torch.randn(2, 15, 20, 32)
    with torch.no_grad():
        expected = op(x)
        compiled = torch.compile(op, backend="inductor")(x)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def _official_nchw_bra(op: NCHWBiLevelRoutingAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``nchwBRA.forward(x, ret_attn_mask=True)`` (ops/bra_nchw.py + ops/torch/rrsda.py,
    re-typed) with ``op``'s weights: (out, attn (N, heads, R, rh * rw, topk * rh * rw))."""
    import torch.nn.functional as F
    heads, (height, width) = op.num_heads, x.shape[2:]
    rs = (height // op.n_win, width // op.n_win)
    q, k, v = op.qkv_linear(x).chunk(3, dim=1)
    q_r = F.avg_pool2d(q.detach(), kernel_size=rs, ceil_mode=True, count_include_pad=False)
    k_r = F.avg_pool2d(k.detach(), kernel_size=rs, ceil_mode=True, count_include_pad=False)
    _, idx = torch.topk(q_r.permute(0, 2, 3, 1).flatten(1, 2) @ k_r.flatten(2, 3), k=op.topk, dim=-1)
    idx = idx.unsqueeze(1).expand(-1, heads, -1, -1)
    pb, pr = (-height) % rs[0], (-width) % rs[1]
    q, k, v = (F.pad(t, (0, pr, 0, pb)) for t in (q, k, v))

    def grid2seq(t):
        b, c, h, w = t.shape
        t = t.view(b, heads, c // heads, h // rs[0], rs[0], w // rs[1], rs[1])
        return torch.einsum("bmdhpwq->bmhwpqd", t).flatten(2, 3).flatten(-3, -2)

    query, key, value = grid2seq(q), grid2seq(k), grid2seq(v)
    bs, _, regions, kvs, hd = key.shape
    g = idx.reshape(bs, heads, regions, op.topk, 1, 1).expand(-1, -1, -1, -1, kvs, hd)
    key_g = torch.gather(key.unsqueeze(2).expand(-1, -1, regions, -1, -1, -1), dim=3, index=g)
    value_g = torch.gather(value.unsqueeze(2).expand(-1, -1, regions, -1, -1, -1), dim=3, index=g)
    attn = torch.softmax((query * op.scale) @ key_g.flatten(-3, -2).transpose(-1, -2), dim=-1)
    out = attn @ value_g.flatten(-3, -2)                   # (N, heads, R, rh * rw, hd)
    rh, rw = (height + pb) // rs[0], (width + pr) // rs[1]
    out = torch.einsum("bmhwpqd->bmdhpwq", out.view(bs, heads, rh, rw, rs[0], rs[1], hd))
    out = out.reshape(bs, heads * hd, rh * rs[0], rw * rs[1])[:, :, :height, :width]
    return op.output_linear(out + op.lepe(v[:, :, :height, :width])), attn


@pytest.mark.parametrize("size", [(14, 14), (15, 17)])
def test_nchw_bra_ret_attn_mask_returns_the_official_out_and_attention(size):
    torch.manual_seed(0)
    op = bilevel.create_op("nchwBRA", dim=12, num_heads=3, n_win=7, topk=2, side_dwconv=5).eval()
    x = torch.randn(2, 12, *size)
    with torch.no_grad():
        out, attn = op(x, ret_attn_mask=True)
        expected_out, expected_attn = _official_nchw_bra(op, x)
        plain = op(x)
    assert attn.shape == expected_attn.shape
    torch.testing.assert_close(attn, expected_attn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_nchw_bra_records_its_own_kind():
    op = NCHWBiLevelRoutingAttention(8, num_heads=1, n_win=2, topk=1)
    with record_routing(op) as trace:
        op(torch.randn(1, 8, 4, 4))
    assert [record.kind for record in trace] == ["nchw_bra"]


@pytest.mark.parametrize("shape, message", [
    ((1, 14, 14, 32), r"got \(1, 14, 14, 32\)$"),
    ((1, 64, 14, 14), r"got \(1, 64, 14, 14\), which looks like NCHW"),
    ((14, 14, 64), r"got \(14, 14, 64\)$"),
])
@pytest.mark.parametrize("auto_pad", [False, True])
def test_nhwc_bra_names_the_expected_layout_for_wrong_inputs(shape, message, auto_pad):
    op = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4, auto_pad=auto_pad)
    with pytest.raises(ValueError, match=r"^BiLevelRoutingAttention: x must be \(N, H, W, C=64\) \(NHWC\); "
                                         + message):
        op(torch.randn(*shape))


@pytest.mark.parametrize("shape, message", [
    ((1, 14, 14, 12), r"got \(1, 14, 14, 12\), which looks like NHWC"),
    ((1, 8, 14, 14), r"got \(1, 8, 14, 14\)$"),
    ((12, 14, 14), r"got \(12, 14, 14\)$"),
])
def test_nchw_bra_names_the_expected_layout_for_wrong_inputs(shape, message):
    op = NCHWBiLevelRoutingAttention(12, num_heads=3, n_win=7, topk=2)
    with pytest.raises(ValueError, match=r"^NCHWBiLevelRoutingAttention: x must be \(N, C=12, H, W\) \(NCHW\); "
                                         + message):
        op(torch.randn(*shape))


@pytest.mark.parametrize("cls", [BiLevelRoutingAttention, NCHWBiLevelRoutingAttention])
def test_bra_refuses_bad_n_win_and_unknown_backends_at_construction(cls):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: n_win must be at least 1.*n_win=0"):
        cls(64, num_heads=2, n_win=0)
    with pytest.raises(ValueError, match=f"^{cls.__name__}: unknown backend='spda'; choose 'auto' or one of") as error:
        cls(64, num_heads=2, backend="spda")
    assert all(repr(name) in str(error.value) for name in bilevel.ops.ATTENTION_BACKENDS)
    for name in ("auto", *bilevel.ops.ATTENTION_BACKENDS):
        cls(64, num_heads=2, backend=name)


def test_nchw_bra_accepts_only_the_official_torch_attn_backend():
    NCHWBiLevelRoutingAttention(12, num_heads=3, attn_backend="torch")
    with pytest.raises(ValueError, match="^NCHWBiLevelRoutingAttention: attn_backend='triton' .* only 'torch'"):
        NCHWBiLevelRoutingAttention(12, num_heads=3, attn_backend="triton")
