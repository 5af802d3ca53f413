"""The public front door: build operators and models by name."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch import nn

from .ops import BiLevelRoutingAttention, NCHWBiLevelRoutingAttention
from .ops.dbra import DeBiLevelRoutingAttention
from .ops.lsda import GroupAttention

#: official class name -> our module; the golden op cases and users' code name ops this way
OPS: dict[str, type[nn.Module]] = {
    "BiLevelRoutingAttention": BiLevelRoutingAttention,
    "nchwBRA": NCHWBiLevelRoutingAttention,
    "NCHWBiLevelRoutingAttention": NCHWBiLevelRoutingAttention,
    "DeBiLevelRoutingAttention": DeBiLevelRoutingAttention,
    # crossformer.py's class is called ``Attention``, like BiFormer's plain one: qualified to avoid the clash
    "CrossFormerAttention": GroupAttention,
}


def register_op(name: str, cls: type[nn.Module]) -> None:
    """Make ``create_op(name, ...)`` build ``cls`` (used by the op modules of each family)."""
    OPS[name] = cls


def create_op(class_name: str, **kwargs) -> nn.Module:
    """Build an attention operator from its official class name and constructor arguments.

    A drop-in for code written against the official modules, e.g.
    ``create_op("BiLevelRoutingAttention", dim=64, num_heads=2, n_win=7, topk=1)``.
    """
    try:
        cls = OPS[class_name]
    except KeyError:
        raise ValueError(f"unknown operator {class_name!r}; available: {sorted(OPS)}") from None
    return cls(**kwargs)


def list_models(pattern: str = "") -> list[str]:
    """Names of the model variants bilevel registers (optionally filtered by a substring)."""
    from .models import MODEL_NAMES
    return sorted(name for name in MODEL_NAMES if pattern in name)


def create_model(name: str, checkpoint_path: Optional[Union[str, Path]] = None, num_classes: Optional[int] = None,
                 **kwargs) -> nn.Module:
    """Build a registered variant, optionally loading a checkpoint file the user supplies.

    name: a variant of :func:`list_models`, optionally with its pretrained tag (``"biformer_tiny.in1k"``).
    checkpoint_path: an official ``.pth`` (a dict with a ``model`` key, or a bare state dict), a ``bilevel fit``
    checkpoint (the classifier's backbone, or a segmenter's without its decode head), an EMA-only file or the
    state dict of a features_only model; ``~`` is expanded. Read with ``weights_only=True``, loaded with
    ``strict=True``; with ``in_chans`` other than the file's, the input convs are adapted as timm does.
    num_classes: default the checkpoint's class count (0 for a file without a classifier). When it differs,
    everything but the classifier is loaded and a fresh head is built (and a warning says so).
    kwargs: passed to the model constructor (``drop_path_rate``, ``in_chans``, ``features_only``, ``out_indices``, ...).
    """
    from .models.loading import create_model as _create
    return _create(name, checkpoint_path=checkpoint_path, num_classes=num_classes, **kwargs)
