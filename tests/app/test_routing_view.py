"""The routing view: query region under a click, routed regions, affinity heat map, DBRA points, LSDA groups."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel.ops.dbra import DeBiLevelRoutingAttention
from bilevel.ops.lsda import group_tokens, plan_groups
from bilevel.ops.recording import RoutingRecord, record_routing
from bilevel.viz.regions import region_boxes
from bilevel.viz.routing_view import (draw_lsda_group, draw_routing, layer_position, lsda_group, region_at,
                                      routed_regions, routing_layers, token_at)


def bra_record(module: str = "stages.0.0.attn", map_size=(8, 12), grid=(2, 3), topk: int = 2) -> RoutingRecord:
    """A routing record of a batch of one with affinity = key region number (so every query routes to the last)."""
    regions = grid[0] * grid[1]
    logits = torch.arange(regions, dtype=torch.float32).repeat(regions, 1)[None]      # (1, R, R)
    return RoutingRecord(module=module, kind="bra", map_size=map_size, region_grid=grid,
                         region_size=(map_size[0] // grid[0], map_size[1] // grid[1]),
                         indices=logits.topk(topk, dim=-1).indices, logits=logits)


def test_layers_are_keyed_by_stage_and_attention_layer_and_skip_other_kinds():
    records = [bra_record("stages.1.0.attn"), bra_record("stages.0.1.attn"), bra_record("stages.0.0.attn"),
               RoutingRecord(module="stages.2.0.attn", kind="global", map_size=(2, 2))]
    assert {key: record.module for key, record in routing_layers(records).items()} == {
        (0, 0): "stages.0.0.attn", (0, 1): "stages.0.1.attn", (1, 0): "stages.1.0.attn"}
    two_per_block = [bra_record("stages.3.0.attn2"), bra_record("stages.3.0.attn1"), bra_record("stages.3.1.attn1")]
    assert [record.module for record in routing_layers(two_per_block).values()] == [
        "stages.3.0.attn1", "stages.3.0.attn2", "stages.3.1.attn1"]
    assert layer_position("layers.2.blocks.3.attn") == (2, 3)
    bare = [bra_record("BiLevelRoutingAttention"), bra_record("BiLevelRoutingAttention")]
    assert list(routing_layers(bare)) == [(0, 0), (0, 1)]


def test_a_point_selects_the_region_beneath_it():
    record = bra_record(map_size=(8, 12), grid=(2, 3))
    assert region_at((0.0, 0.0), record) == 0
    assert region_at((0.99, 0.0), record) == 2
    assert region_at((0.5, 0.75), record) == 4           # row 1, column 1
    assert region_at((1.0, 1.0), record) == 5            # the far edge belongs to the last region
    assert token_at((0.5, 0.5), (8, 12)) == (4, 6)


def test_points_on_a_padded_map_select_regions_of_the_padded_grid():
    # a 10-token map cut into 3 regions of 4 tokens (padded to 12): token 9 lies in region 2
    record = bra_record(map_size=(10, 10), grid=(3, 3))
    record.region_size = (4, 4)
    assert region_at((0.95, 0.95), record) == 8
    assert region_at((0.35, 0.05), record) == 0          # token 3 is still in the first region


def test_routing_drawing_marks_the_query_and_only_its_routed_regions():
    record = bra_record(topk=2)
    image = np.full((80, 120, 3), 128, np.uint8)
    routes, heat = draw_routing(image, record, region=0)
    assert routed_regions(record, 0) == [5, 4]
    boxes = region_boxes(image.shape[:2], record.map_size, record.region_grid, record.region_size)
    centre = [((top + bottom) // 2, (left + right) // 2) for top, left, bottom, right in boxes]
    changed = [not np.array_equal(routes[y, x], image[y, x]) for y, x in centre]
    assert changed == [True, False, False, False, True, True]
    # heat: the affinity grows with the key region number, so region 5 is brighter than region 0 (magma)
    assert heat[centre[5]].astype(int).sum() > heat[centre[1]].astype(int).sum()
    assert routes.shape == heat.shape == image.shape
    with pytest.raises(ValueError, match="out of range"):
        routed_regions(record, 6)


def test_lsda_groups_match_the_operator_grouping():
    for mode, group_size, interval, size in [("sda", 2, 1, (6, 5)), ("lda", 2, 3, (6, 7))]:
        layout = plan_groups(size, group_size, interval, long_distance=mode == "lda")
        padded = layout.padded_size
        numbers = torch.arange(padded[0] * padded[1], dtype=torch.float32).reshape(1, *padded, 1)
        groups = group_tokens(numbers, layout)[0, ..., 0].long()          # (num_groups, G*G) token numbers
        record = RoutingRecord(module="layers.0.blocks.0.attn", kind="lsda", map_size=size,
                               extras={"mode": layout.mode, "group_size": layout.group_size,
                                       "interval": layout.interval})
        for row in range(size[0]):
            for col in range(size[1]):
                token = row * padded[1] + col
                (group,) = [g for g in groups.tolist() if token in g]
                expected = sorted(divmod(t, padded[1])[0] * size[1] + divmod(t, padded[1])[1] for t in group
                                  if divmod(t, padded[1])[0] < size[0] and divmod(t, padded[1])[1] < size[1])
                assert sorted(lsda_group(record, (row, col))) == expected, (mode, row, col)
        drawn = draw_lsda_group(np.zeros((60, 70, 3), np.uint8), record, (0.5, 0.5))
        assert drawn.any()


def test_dbra_sampling_points_of_the_query_region_are_dotted():
    op = DeBiLevelRoutingAttention(dim=128, num_heads=4, n_win=7, topk=4, side_dwconv=5, auto_pad=True,
                                   param_size="tiny").eval()
    torch.manual_seed(0)
    with torch.no_grad(), record_routing(op) as trace:
        op(torch.randn(1, 28, 28, 128))
    (record,) = routing_layers(trace).values()
    image = np.zeros((112, 112, 3), np.uint8)
    plain_record = RoutingRecord(**{**record.__dict__, "kind": "bra"})
    routes, _ = draw_routing(image, record, region=24)
    plain, _ = draw_routing(image, plain_record, region=24)
    dots = np.all(routes == (230, 30, 200), axis=-1)
    assert dots.any() and not np.all(plain == (230, 30, 200), axis=-1).any()
