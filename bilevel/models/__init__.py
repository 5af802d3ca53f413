"""Backbones, one file per family, registered with timm on import.

    import bilevel            # then timm.create_model("biformer_tiny") works too
    bilevel.list_models()
"""
from . import biformer, crossformer, debiformer

FAMILIES = (biformer, debiformer, crossformer)

#: every variant bilevel registers with timm
MODEL_NAMES: tuple[str, ...] = tuple(sorted({tag.split(".")[0] for family in FAMILIES for tag in family.default_cfgs}))

__all__ = ["MODEL_NAMES", "FAMILIES"]
