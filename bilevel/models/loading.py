"""Checkpoint files the user supplies: read safely, adapt official layouts, load strictly.

Files are read with ``torch.load(weights_only=True)``: no pickled code runs. Official training
scripts also save their arguments (``argparse.Namespace``, CrossFormer's yacs ``CfgNode``); those
few classes are allowed as inert stand-ins so the weights can be read, and nothing else is.
"""
from __future__ import annotations

import argparse
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import timm
import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "read_checkpoint", "extract_state_dict", "load_weights", "load_pretrained_weights",
           "create_model"]

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class _InertConfig(dict):
    """Stand-in for configuration objects pickled inside official checkpoints (never executed)."""

    def __setstate__(self, state):
        if isinstance(state, Mapping):
            self.update(state)


# Objects official checkpoints carry besides tensors; mapped to harmless types.
_ALLOWED_GLOBALS = [
    argparse.Namespace,
    (_InertConfig, "yacs.config.CfgNode"),
    pathlib.PosixPath,
    pathlib.WindowsPath,
]


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint file without executing pickled code.

    returns: the object stored in the file, as a dict (a bare state dict is a dict too).
    raises: FileNotFoundError, or CheckpointError naming the file when it is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses ({_first_line(error)}); "
            "bilevel loads weights only: save the state dict (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as error:  # the unpickler fails in many ways on files that are not checkpoints
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: "
                              f"{_first_line(error)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return dict(obj)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def extract_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Tensor]:
    """Find the model weights in a checkpoint dictionary.

    Accepts the official layout (weights under ``"model"``), a Lightning checkpoint written by
    ``bilevel fit`` (``"state_dict"`` with the backbone under ``model.``), and a bare state dict.
    A ``module.`` prefix (DistributedDataParallel) is removed.
    """
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = checkpoint["model"]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        state = checkpoint["state_dict"]
        backbone = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        state = backbone or state
    else:
        state = checkpoint
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no model weights (keys: {sorted(checkpoint)[:10]})")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return tensors


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint",
                 allow_new_classifier: bool = False) -> list[str]:
    """Load ``state_dict`` into ``model`` strictly; optionally skip a classifier of another size.

    returns: the keys left at their fresh initialisation (the classifier, when replaced).
    raises: CheckpointError naming the missing, unexpected and mis-shaped keys.
    """
    adapt = getattr(model, "adapt_state_dict", None)
    state = dict(adapt(state_dict) if adapt is not None else state_dict)
    own = model.state_dict()
    classifier = _classifier_prefixes(model)
    dropped = []
    if allow_new_classifier:
        dropped = [key for key in state if key.split(".")[0] in classifier
                   and (key not in own or state[key].shape != own[key].shape)]
        for key in dropped:
            del state[key]
    skipped = [key for key in own if key.split(".")[0] in classifier and key not in state and dropped]
    missing = [key for key in own if key not in state and key not in skipped]
    unexpected = [key for key in state if key not in own]
    mis_shaped = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                  for key in state if key in own and state[key].shape != own[key].shape]
    if missing or unexpected or mis_shaped:
        name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        parts = [f"{source} does not fit {name}:"]
        if missing:
            parts.append(f"missing keys {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_describe(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches {_describe(mis_shaped, 4)}")
        parts.append("(is it a checkpoint of another architecture or variant?)")
        raise CheckpointError(" ".join(parts))
    model.load_state_dict({**state, **{key: own[key] for key in skipped}}, strict=True)
    return skipped


def load_pretrained_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """:func:`load_weights` for fine-tuning: a classifier of another size is re-initialised, with a warning."""
    replaced = load_weights(model, state_dict, source=source, allow_new_classifier=True)
    if replaced:
        warnings.warn(f"{source}: loaded everything but the classifier ({', '.join(replaced)}), "
                      f"which was re-initialised for {model.num_classes} classes", stacklevel=3)


def _classifier_prefixes(model: nn.Module) -> set[str]:
    classifier = getattr(model, "default_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return {name.split(".")[0] for name in names}


def create_model(name: str, checkpoint_path: Optional[PathLike] = None, num_classes: Optional[int] = None,
                 features_only: bool = False, out_indices=(0, 1, 2, 3), **kwargs) -> nn.Module:
    """See :func:`bilevel.create_model`."""
    from . import MODEL_NAMES  # registers the families with timm

    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_NAMES)}")
    if kwargs.pop("pretrained", False):
        raise ValueError("bilevel never downloads weights: pass checkpoint_path= with the official .pth file")
    state = None
    if checkpoint_path is not None:
        state = extract_state_dict(read_checkpoint(checkpoint_path), source=str(checkpoint_path))
        if num_classes is None:
            num_classes = _checkpoint_classes(state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=False, **kwargs)
    if state is not None:
        load_pretrained_weights(model, state, source=str(checkpoint_path))
    if features_only:
        from timm.models._features import FeatureGetterNet
        model = FeatureGetterNet(model, out_indices=out_indices)
    return model


def _checkpoint_classes(state: Mapping[str, Tensor]) -> Optional[int]:
    """Number of classes of the checkpoint's classifier (``head.weight``), if it has one."""
    weight = state.get("head.weight")
    return int(weight.shape[0]) if weight is not None else None
