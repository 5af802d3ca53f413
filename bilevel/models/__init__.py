"""Backbones, one file per family, registered with timm on import.

    import bilevel            # then timm.create_model("biformer_tiny") works too
    bilevel.list_models()
"""
from . import biformer, crossformer, debiformer

FAMILIES = (biformer, debiformer, crossformer)

#: every variant bilevel registers with timm
MODEL_NAMES: tuple[str, ...] = tuple(sorted(name for family in FAMILIES for name in family.default_cfgs))
#: every variant with its pretrained tag (``biformer_tiny.in1k``), as timm names them
MODEL_TAGS: tuple[str, ...] = tuple(sorted(f"{name}.{tag}" for family in FAMILIES
                                           for name, cfg in family.default_cfgs.items() for tag in cfg.tags))

__all__ = ["MODEL_NAMES", "MODEL_TAGS", "FAMILIES"]
