"""Attention operators: bi-level routing attention and its relatives, as small reusable pieces.

regions   - cut a map into S×S regions and back, padding
routing   - region descriptors → region affinity → top-k routing
gather    - collect the routed key/value regions (the readable reference)
attention - token-to-token attention over routed regions, with interchangeable backends
bra       - the BRA modules (NHWC legacy and NCHW)
dbra      - DeBiFormer's deformable bi-level routing attention
lsda      - CrossFormer's short/long distance groups and dynamic position bias
recording - capture routing decisions from one forward pass, for visualization
"""
from .attention import ATTENTION_BACKENDS, routed_attention
from .bra import BiLevelRoutingAttention, NCHWBiLevelRoutingAttention
from .dbra import DeBiLevelRoutingAttention
from .gather import gather_regions
from .lsda import DynamicPosBias, GroupAttention, plan_groups, token_groups
from .recording import RoutingRecord, RoutingTrace, record_routing
from .regions import pad_to_multiple, region_merge, region_partition
from .routing import Routing, TopkRouter, region_affinity, topk_routing

__all__ = [
    "ATTENTION_BACKENDS", "routed_attention", "BiLevelRoutingAttention", "NCHWBiLevelRoutingAttention",
    "DeBiLevelRoutingAttention", "DynamicPosBias", "GroupAttention", "plan_groups", "token_groups",
    "gather_regions", "RoutingRecord", "RoutingTrace", "record_routing", "pad_to_multiple", "region_merge",
    "region_partition", "Routing", "TopkRouter", "region_affinity", "topk_routing",
]
