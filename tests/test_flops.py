"""The analytic FLOP counter against hand counts, PyTorch's FlopCounterMode and the papers' published figures."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bilevel
from bilevel.flops import count_flops
from bilevel.ops import BiLevelRoutingAttention, NCHWBiLevelRoutingAttention


def test_legacy_bra_hand_count():
    # dim 8, 2 heads, 2x2 regions of 2x2 tokens on a 1x4x4x8 map, topk 2, 3x3 LePE
    op = BiLevelRoutingAttention(dim=8, num_heads=2, n_win=2, topk=2, side_dwconv=3)
    count = count_flops(op, torch.randn(1, 4, 4, 8))
    qkv = 16 * 8 * 24           # 16 tokens, 8 -> 8 (q) + 8 (k) + 8 (v)
    wo = 16 * 8 * 8
    lepe = 16 * 8 * 9           # depth-wise 3x3 over 8 channels
    means = 2 * 16 * 8          # q and k averaged per region
    affinity = 4 * 4 * 8        # 4 query regions x 4 key regions x 8 channels
    topk = 4 * 4                # one comparison per candidate region
    attention = 4 * 4 * 2 * 4 * (8 + 8)   # 4 regions x 4 queries x (2 regions x 4 keys) x (q·k 8 + p·v 8)
    assert count.by_category == {"linear": qkv + wo, "conv": lepe, "routing": means + affinity + topk,
                                 "attention": attention}
    assert count.total == qkv + wo + lepe + means + affinity + topk + attention
    assert count.gather_elements == 4 * 2 * 4 * (8 + 8)


def test_nchw_bra_hand_count_with_partial_regions():
    # 5x5 map, n_win 2: regions of 2x2, a 3x3 grid whose last row/column are partial (padded)
    op = NCHWBiLevelRoutingAttention(dim=4, num_heads=1, n_win=2, topk=3, side_dwconv=0)
    count = count_flops(op, torch.randn(1, 4, 5, 5))
    convs = 25 * 4 * 12 + 25 * 4 * 4          # 1x1 qkv (4 -> 12) and output (4 -> 4)
    routing = 2 * 25 * 4 + 9 * 9 * (4 + 1)    # means over real pixels, affinity + top-k comparisons
    attention = 9 * 4 * 3 * 4 * (4 + 4)       # 9 regions x 4 queries x (3 regions x 4 keys) x 8
    assert count.by_category == {"conv": convs, "routing": routing, "attention": attention}


def test_modules_outside_attention_are_counted_once():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    assert count_flops(model, torch.randn(2, 4, 6)).total == 2 * 4 * (6 * 5 + 5 * 3)


@pytest.mark.parametrize("name, paper_gflops", [("biformer_tiny", 2.2), ("debiformer_tiny", 2.6),
                                               ("crossformer_tiny", 2.9)])
def test_models_match_the_papers(name, paper_gflops):
    # FLOPs at 224x224: BiFormer (Zhu et al., CVPR 2023) Table 1, DeBiFormer's official README,
    # CrossFormer (Wang et al., ICLR 2022) Table 2
    model = bilevel.create_model(name).eval()
    assert round(count_flops(model, torch.randn(1, 3, 224, 224)).total / 1e9, 1) == paper_gflops


SHALLOW = {"biformer_tiny": {"depth": [1, 1, 1, 1], "attn_backend": "reference"},
           "biformer_stl_nchw": {"depth": [1, 1, 1, 1], "attn_backend": "reference"},
           "debiformer_tiny": {"depth": [1, 1, 1, 1], "attn_backend": "reference"},
           "crossformer_tiny": {"depths": [1, 1, 1, 1]}}


@pytest.mark.parametrize("size", [224, 256])
@pytest.mark.parametrize("name", SHALLOW)
def test_every_family_agrees_with_flop_counter_mode(name, size):
    """Every matmul and convolution PyTorch runs, counted by FlopCounterMode (2 FLOPs per multiply-add;
    SDPA's math kernel, which it can see): the analytic count equals it up to the routing's region means
    and top-k comparisons, which are not matmuls (256 px: padded maps and partial groups)."""
    options = dict(SHALLOW[name], img_size=size) if name.startswith("crossformer") else SHALLOW[name]
    model = bilevel.create_model(name, **options).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        count = count_flops(model, x)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    matmul_adds = counter.get_total_flops() // 2
    assert matmul_adds <= count.total <= matmul_adds * 1.002, (count.total, matmul_adds)
