"""What both tasks optimise with: AdamW parameter groups (weight decay, layer-wise lr decay) and warm-up + cosine.

The groups are planned by parameter name on the plain model (:func:`parameter_plan`), before any strategy
wraps it, and applied to the parameters the optimiser is built on (:func:`parameter_groups`). Under FSDP
(``use_orig_params=True``, Lightning's default) each rank's parameters are flat 1-D shards, some empty, and
their names carry the wrappers' segments: a plan made from them would exempt every weight from decay.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from timm.models import group_parameters
from torch import nn

__all__ = ["NO_DECAY_KEYWORDS", "ParameterPlan", "parameter_plan", "parameter_groups", "unwrapped_name",
           "warmup_cosine", "build_optimizer"]

#: parameter-name fragments of position tables, which get no weight decay (as the papers' recipes)
NO_DECAY_KEYWORDS = ("pos_embed", "relative_position_bias_table", "rpb", "pos_bias", "absolute_pos")
#: name segments that wrappers insert: FSDP, activation checkpointing, torch.compile
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: parameter name -> (weight decay, lr scale)
ParameterPlan = dict[str, tuple[float, float]]


def unwrapped_name(name: str) -> str:
    """A parameter's name as the plain model has it (the wrappers' segments removed)."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases (1-D) and position tables."""
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_KEYWORDS)


def parameter_plan(module: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                   backbone: Optional[nn.Module] = None, backbone_prefix: str = "") -> ParameterPlan:
    """Every parameter's (weight decay, lr scale), by name, decided on the plain (unwrapped) module.

    No decay: 1-D parameters (norms, biases), position tables and the backbone's ``no_weight_decay()``.
    With ``layer_decay`` < 1, depth comes from the backbone's timm ``group_matcher`` (stem, blocks in order,
    final norm), as in timm's ``param_groups_layer_decay``: layer ``i`` of ``L`` gets the lr scale
    ``layer_decay ** (L - 1 - i)``. backbone: the sub-module ``module.<backbone_prefix>``; parameters outside
    it (heads) get scale 1. Frozen parameters are planned too, so unfreezing them later finds an entry.
    """
    own = getattr(backbone, "no_weight_decay", None)
    skip = {f"{backbone_prefix}{name}" for name in (own() if own is not None else ())}
    depth_scale: dict[str, float] = {}
    if layer_decay is not None and layer_decay < 1.0:
        if backbone is None or not hasattr(backbone, "group_matcher"):
            raise ValueError(f"layer_decay={layer_decay} needs a backbone with timm's group_matcher() "
                             f"({type(backbone).__name__} has none); set layer_decay to null")
        layer_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        last = max(layer_of.values())
        depth_scale = {f"{backbone_prefix}{name}": layer_decay ** (last - layer_of.get(name, last))
                       for name, _ in backbone.named_parameters()}
    return {name: (0.0 if name in skip or _no_weight_decay(name, param) else weight_decay,
                   depth_scale.get(name, 1.0))
            for name, param in module.named_parameters()}


def parameter_groups(module: nn.Module, plan: ParameterPlan, lr: float) -> list[dict]:
    """AdamW groups of ``module``'s trainable parameters, one per (weight decay, lr scale) of ``plan``.

    module may be wrapped (FSDP, activation checkpointing, ``torch.compile``): names are read through the
    wrappers. Raises ValueError naming a parameter the plan does not know.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        try:
            decay, scale = plan[unwrapped_name(name)]
        except KeyError:
            raise ValueError(f"parameter {unwrapped_name(name)!r} was not in the model when the optimiser groups "
                             "were planned (in the task's setup); add parameters in __init__") from None
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr": lr * scale,
                                                   "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def warmup_cosine(step: int, warmup_steps: int, total_steps: Optional[int], min_lr_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warm-up to 1, then cosine down to ``min_lr_ratio`` at
    ``total_steps`` (None: no end, the factor stays 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, plan: ParameterPlan, total_steps: Optional[int], lr: float,
                    warmup_steps: int, min_lr_ratio: float):
    """AdamW over ``plan``'s groups + per-step LambdaLR (:func:`warmup_cosine`; ``total_steps`` None: no end),
    in Lightning's ``configure_optimizers`` format."""
    optimizer = torch.optim.AdamW(parameter_groups(module, plan, lr), lr=lr)
    warmup = warmup_steps if total_steps is None else min(warmup_steps, max(0, total_steps - 1))

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup, total_steps, min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
