"""What every four-stage pyramid backbone here shares: timm's feature API and input checks.

A family's model class inherits :class:`PyramidBackbone`, implements ``run_stage(i, x)`` (the
i-th stage, from the previous stage's output in the family's own layout) and ``stage_containers()``
(the ModuleLists indexed by stage, pruned together), sets ``feature_fmt`` (and ``stage_to_nchw``) when
its features are not NCHW, and calls ``init_classifier`` at the end of its constructor. This class
supplies the head (timm's selectable global pooling, then a linear classifier), ``forward_features``,
``forward_intermediates`` and ``prune_intermediate_layers`` as timm expects them, and the input-size check.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["PyramidBackbone", "build_pyramid", "imagenet_cfg", "InputSizeError"]


class InputSizeError(ValueError):
    """An input the network cannot take (wrong channel count, too small)."""


class PyramidBackbone(nn.Module):
    """Base class: stages 0..3, each reducing resolution; ``self.norm`` is the final norm."""

    num_stages = 4
    #: smallest input side the network accepts (its total stride, unless the family says otherwise)
    min_input_size = 32
    in_chans = 3
    #: layout of the final features, as timm's pooling layers name it: "NCHW" maps or "NHWC" tokens
    feature_fmt = "NCHW"
    grad_checkpointing = False

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for ``pretrained=True`` with a local file (``pretrained_cfg_overlay=dict(file=path)``).

        Reads the file with ``weights_only=True``, accepts the same layouts, adapts the input convs to
        ``in_chans`` and initialises a classifier of another size (or none in the file) fresh, with a warning,
        as :func:`bilevel.create_model` does.
        """
        from .loading import extract_state_dict, load_pretrained_weights, read_checkpoint

        state = extract_state_dict(read_checkpoint(checkpoint_path), source=str(checkpoint_path), backbone=True)
        load_pretrained_weights(self, state, source=str(checkpoint_path))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names timm's optimisers keep out of weight decay beyond 1-D parameters: none, as in the official code
        (whose ``pos_embed``/``cls_token`` match no parameter of these models)."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage during backward instead of keeping its activations (less memory, more time)."""
        self.grad_checkpointing = enable

    def _run_stage(self, index: int, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.run_stage, index, x, use_reentrant=False)
        return self.run_stage(index, x)

    def init_classifier(self, num_features: int, num_classes: int, drop_rate: float, global_pool: str,
                        feature_info: list[dict]) -> None:
        """Build the head (see :meth:`reset_classifier`) and timm's metadata, then initialise the weights."""
        self.num_features = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = feature_info
        self.reset_classifier(num_classes, global_pool)
        self.apply(_init_transformer_weights)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Final features -> logits (N, num_classes), or the pooled (N, head_hidden_size) with pre_logits.

        Unpooled (global_pool=''), the classifier acts at each position and keeps the features' layout:
        (N, num_classes, H, W) from NCHW maps, as timm's ConvNeXt; (N, H, W, num_classes) from NHWC tokens,
        as timm's Swin. pre_logits then gives the unpooled features.
        """
        x = self.head_drop(self.head_pool(x))
        if pre_logits:
            return x
        if self.head_pool.is_identity() and self.feature_fmt == "NCHW":
            return self.head(x.movedim(1, -1)).movedim(-1, 1)
        return self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none) on the model's device and dtype, as in timm's models.

        global_pool: any pooling of timm's ``SelectAdaptivePool2d`` ("avg", "max", "avgmax", "catavgmax",
        "fast", ..., or "" for none); None keeps the current one. "catavgmax" doubles ``head_hidden_size``
        (the classifier's input), while ``num_features`` stays the width of the features, as in timm's Swin.
        """
        pool_type = self.global_pool if global_pool is None else global_pool
        self.head_pool, self.head = create_classifier(self.num_features, num_classes, pool_type,
                                                      input_fmt=self.feature_fmt, **get_device_dtype(self))
        self.num_classes = num_classes
        self.global_pool = pool_type
        self.head_hidden_size = self.num_features * self.head_pool.feat_mult()

    def stage_to_nchw(self, index: int, x: Tensor) -> Tensor:
        """The stage output as (N, C, H, W); families whose stages keep NCHW need not override."""
        return x

    def prepare_input(self, x: Tensor) -> Tensor:
        """Validate the image batch (N, in_chans, H, W) and return what stage 0 expects."""
        if x.ndim != 4:
            raise InputSizeError(f"{type(self).__name__} expects a batch of images (N, C, H, W), got shape "
                                 f"{tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise InputSizeError(f"{type(self).__name__} expects {self.in_chans}-channel images, got "
                                 f"{x.shape[1]} channels (input shape {tuple(x.shape)})")
        if min(x.shape[-2:]) < self.min_input_size:
            raise InputSizeError(f"a {x.shape[-2]}x{x.shape[-1]} image is too small for {type(self).__name__}: "
                                 f"each side must be at least {self.min_input_size} pixels")
        return x

    def finish_features(self, x: Tensor) -> Tensor:
        """The last stage's output -> the normalised features ``forward_head`` takes."""
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.prepare_input(x)
        for index in range(self.num_stages):
            x = self._run_stage(index, x)
        return self.finish_features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, list[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the NCHW outputs of the chosen stages (and the final features).

        returns: list of (N, C_i, H_i, W_i), or (final features, that list) unless intermediates_only. With
        ``stop_early`` the final features are the last stage run, un-normalised unless it is the last stage
        (the final norm is sized for the last stage only), as in timm's Swin and ConvNeXt.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; only 'NCHW'")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        intermediates = []
        x = self.prepare_input(x)
        last = max_index if (stop_early or intermediates_only) else self.num_stages - 1
        for index in range(last + 1):
            x = self._run_stage(index, x)
            if index in take_indices:
                feature = x
                if norm and index == self.num_stages - 1:
                    feature = self.finish_features(x)
                intermediates.append(self.stage_to_nchw(index, feature))
        if intermediates_only:
            return intermediates
        if last == self.num_stages - 1:
            x = self.finish_features(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last wanted one, as timm's Swin does.

        The final norm goes with prune_norm or when the last stage goes (it is sized for that stage only);
        then ``num_features`` becomes the last kept stage's width and the head goes too (as with prune_head).
        returns: the kept feature indices.
        """
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.truncate_stages(max_index + 1)
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def truncate_stages(self, count: int) -> None:
        """Keep stages 0..count-1 only (the modules of later stages are deleted)."""
        for container in self.stage_containers():
            del container[count:]
        self.num_stages = count


def _init_transformer_weights(module: nn.Module) -> None:
    """The official initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def imagenet_cfg(first_conv: Union[str, tuple[str, ...]], **kwargs) -> dict:
    """timm ``pretrained_cfg`` of an ImageNet-1K variant at 224 px (no download address: files are user-supplied).

    first_conv: the conv(s) taking the image, which loading adapts to another ``in_chans``.
    """
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv, "classifier": "head", "license": "mit", **kwargs,
    }


def _local_weights(kwargs: dict) -> bool:
    """Whether timm's ``pretrained_cfg``/``pretrained_cfg_overlay`` arguments name a file or a state dict."""
    sources = [kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")]
    return any(isinstance(cfg, dict) and (cfg.get("file") or cfg.get("state_dict") is not None) for cfg in sources)


def build_pyramid(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """Build a registered variant the timm way (``pretrained_cfg``, ``features_only``).

    ``pretrained=True`` needs a local source, the timm way: ``pretrained_cfg_overlay=dict(file=path)``
    (or ``state_dict=...``); nothing is ever downloaded. A file is read by the model's own
    :meth:`PyramidBackbone.load_pretrained` (timm's ``custom_load``), as ``bilevel.create_model`` reads it.
    """
    if pretrained and not _local_weights(kwargs):
        raise ValueError(f"{variant}: bilevel never downloads weights; pass the official .pth file, with "
                         "bilevel.create_model(name, checkpoint_path=...) or timm.create_model(name, "
                         "pretrained=True, pretrained_cfg_overlay=dict(file=...))")
    overlay = kwargs.get("pretrained_cfg_overlay")
    if pretrained and isinstance(overlay, dict) and overlay.get("file"):
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(model_cls, variant, pretrained=pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)
