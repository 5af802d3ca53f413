"""What both tasks optimise with: AdamW parameter groups (weight decay, layer-wise lr decay) and warm-up + cosine."""
from __future__ import annotations

import math
from typing import Optional

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

__all__ = ["NO_DECAY_KEYWORDS", "parameter_groups", "warmup_cosine", "build_optimizer"]

#: parameter-name fragments of position tables, which get no weight decay (as the papers' recipes)
NO_DECAY_KEYWORDS = ("pos_embed", "relative_position_bias_table", "rpb", "pos_bias", "absolute_pos")


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases (1-D) and position tables."""
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_KEYWORDS)


def parameter_groups(module: nn.Module, weight_decay: float, lr: float, layer_decay: Optional[float] = None,
                     backbone: Optional[nn.Module] = None, backbone_prefix: str = "") -> list[dict]:
    """AdamW groups: decay / no decay and, with ``layer_decay`` < 1, the backbone's lr scaled by depth.

    No decay: 1-D parameters (norms, biases), position tables and the backbone's ``no_weight_decay()``.
    Depth comes from the backbone's timm ``group_matcher`` (stem, blocks in order, final norm), through
    timm's ``param_groups_layer_decay``: group ``i`` of ``L`` trains at ``lr * layer_decay ** (L - i)``.
    backbone: the sub-module ``module.<backbone_prefix>``; parameters outside it (heads) train at ``lr``.
    """
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    own = getattr(backbone, "no_weight_decay", None)
    skip = {f"{backbone_prefix}{name}" for name in (own() if own is not None else ())}
    skip |= {name for name, p in named if _no_weight_decay(name, p)}
    groups: list[dict] = []
    in_layer_groups: set[int] = set()
    if layer_decay is not None and layer_decay < 1.0:
        if backbone is None or not hasattr(backbone, "group_matcher"):
            raise ValueError(f"layer_decay={layer_decay} needs a backbone with timm's group_matcher() "
                             f"({type(backbone).__name__} has none); set layer_decay to null")
        inner = tuple(name[len(backbone_prefix):] for name in skip if name.startswith(backbone_prefix))
        for group in param_groups_layer_decay(backbone, weight_decay=weight_decay, no_weight_decay_list=inner,
                                              layer_decay=layer_decay):
            groups.append(dict(group, lr=lr * group["lr_scale"]))
            in_layer_groups.update(id(p) for p in group["params"])
    rest = [(name, p) for name, p in named if id(p) not in in_layer_groups]
    for no_decay in (False, True):
        params = [p for name, p in rest if (name in skip) == no_decay]
        if params:
            groups.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr,
                           "lr_scale": 1.0})
    return groups


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warm-up to 1, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, total_steps: int, lr: float, weight_decay: float, warmup_steps: int,
                    min_lr_ratio: float, layer_decay: Optional[float], backbone: nn.Module, backbone_prefix: str):
    """AdamW + per-step LambdaLR (warm-up then cosine), in Lightning's ``configure_optimizers`` format."""
    groups = parameter_groups(module, weight_decay, lr, layer_decay, backbone, backbone_prefix)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    warmup = min(warmup_steps, max(0, total_steps - 1))

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup, total_steps, min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
