"""bilevel: bi-level routing attention (BiFormer, DeBiFormer, CrossFormer) to learn, fine-tune and look inside.

    import bilevel
    model = bilevel.create_model("biformer_tiny", checkpoint_path="biformer_tiny_best.pth")
    op = bilevel.create_op("BiLevelRoutingAttention", dim=64, num_heads=2, n_win=7, topk=1)
"""
from . import models  # noqa: F401  (registers every family with timm: timm.create_model("biformer_tiny") works after import)
from ._factory import create_model, create_op, list_models

__all__ = ["create_model", "create_op", "list_models"]
__version__ = "0.1.0"
