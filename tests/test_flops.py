"""The analytic FLOP counter against hand counts and the BiFormer paper's published figures."""
from __future__ import annotations

import pytest
import torch
from torch import nn

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


@pytest.mark.parametrize("name, paper_gflops", [("biformer_tiny", 2.2)])
def test_biformer_matches_the_paper(name, paper_gflops):
    # BiFormer paper (Zhu et al., CVPR 2023), Table 1: FLOPs at 224x224
    model = bilevel.create_model(name).eval()
    assert round(count_flops(model, torch.randn(1, 3, 224, 224)).total / 1e9, 1) == paper_gflops
