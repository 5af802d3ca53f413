"""Checkpoint files the user supplies: read safely, adapt official layouts, load strictly.

Files are read with ``torch.load(weights_only=True)``: no pickled code runs. Official training
scripts also save their arguments (``argparse.Namespace``, CrossFormer's yacs ``CfgNode``) and mmcv
saves numpy scalars in an mmseg checkpoint's ``meta``; those few classes are allowed as inert data so
the weights can be read, and nothing else is.
"""
from __future__ import annotations

import argparse
import pathlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import timm
import torch
from timm.models import adapt_input_conv
from timm.models._input import get_model_traits
from torch import Tensor, nn

__all__ = ["CheckpointError", "SHARDED_METADATA_FILE", "MMSEG_HEADS", "is_sharded_checkpoint", "read_checkpoint",
           "is_mmseg_checkpoint", "extract_state_dict", "read_backbone_weights", "split_stage_norms", "load_weights",
           "load_pretrained_weights", "classifier_prefixes", "create_model"]

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class _InertConfig(dict):
    """Stand-in for configuration objects pickled inside official checkpoints (never executed)."""

    def __setstate__(self, state):
        if isinstance(state, Mapping):
            self.update(state)


def _numpy_scalar_globals() -> list:
    """What pickled numpy scalars of numeric types need (mmcv's ``meta["hook_msgs"]["best_score"]``): numpy's scalar
    reconstruction, under its numpy 2 and numpy 1 module names, ``dtype`` and the dtype classes of booleans,
    integers, floats and complex numbers (not object, string or void dtypes)."""
    scalar = np.float64(0).__reduce__()[0]
    numeric = {type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *sorted(numeric, key=lambda dtype: dtype.__name__)]


# Objects official checkpoints carry besides tensors; mapped to harmless types.
_ALLOWED_GLOBALS = [
    argparse.Namespace,
    (_InertConfig, "yacs.config.CfgNode"),
    pathlib.PosixPath,
    pathlib.WindowsPath,
    *_numpy_scalar_globals(),
]


#: how the files torch.save writes begin: a zip archive (its default format), or a pickle (the legacy format,
#: protocol 2 and later)
_ZIP_MAGIC = b"PK"
_PICKLE_MAGIC = b"\x80"


#: the file that marks a folder as a torch.distributed.checkpoint (FSDP's sharded checkpoints) ...
_SHARDED_MARKER = ".metadata"
#: ... and the file of such a folder where Lightning keeps everything but the tensors
SHARDED_METADATA_FILE = "meta.pt"


def is_sharded_checkpoint(path: PathLike) -> bool:
    """True for a folder written by torch.distributed.checkpoint: FSDP's ``state_dict_type="sharded"``."""
    return (Path(path).expanduser() / _SHARDED_MARKER).is_file()


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint file without executing pickled code (``~`` is expanded).

    returns: the object stored in the file, as a dict (a bare state dict is a dict too).
    raises: FileNotFoundError, or CheckpointError naming the file when it is a directory (a sharded FSDP
        checkpoint gets the command that consolidates it) or not a checkpoint.
    """
    path = Path(path).expanduser()
    if is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is a sharded checkpoint (a folder FSDP writes with state_dict_type "
                              "'sharded'), which only FSDP reads back. For one file that a single device reads, "
                              f"run: python -m lightning.pytorch.utilities.consolidate_checkpoint {path} "
                              f"(it writes {path}.consolidated)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file: pass the .pth file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with path.open("rb") as file:
        head = file.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file: it is neither a zip archive (what torch.save "
                              f"writes) nor a pickle; it starts with {head[:8]!r}")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses ({_torch_reason(error)}); "
            "bilevel loads weights only: save the state dict (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as error:  # the unpickler fails in many ways on damaged files
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: "
                              f"{_torch_reason(error)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return dict(obj)


#: terminal escape codes (torch's messages embolden words with them)
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: where torch's weights-only refusal gives its reason, after advice about weights_only=False
_UNPICKLER_REASON = "WeightsUnpickler error:"
#: the longest reason quoted from torch
_REASON_LENGTH = 200


def _torch_reason(error: BaseException) -> str:
    """torch's reason for ``error`` as a message quotes it: without escape codes or advice, its first sentence,
    shortened at a word (with "...") when it is long."""
    text = _TERMINAL_ESCAPE.sub("", str(error))
    text = text.split(_UNPICKLER_REASON, 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    sentence = re.split(r"(?<=[.!?])\s", lines[0], maxsplit=1)[0].rstrip(".")
    if len(sentence) <= _REASON_LENGTH:
        return sentence
    return sentence[:_REASON_LENGTH].rsplit(" ", 1)[0].rstrip(",;:") + "..."


#: where a checkpoint dictionary keeps the weights, by preference: official files and ``bilevel fit`` checkpoints,
#: then EMA weights, used only when a file holds nothing else (timm's own reader prefers them)
_WEIGHT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
#: prefixes every key carries when a wrapper was saved: DistributedDataParallel, then a features_only model
_WRAPPER_PREFIXES = ("module.", "model.")
#: the final norm of the three families (``PyramidBackbone.norm``), which pruned backbones drop
_FINAL_NORM = "norm"
#: the heads of an official (mmseg) segmentation checkpoint, beside its ``backbone.``; bilevel rebuilds neither
MMSEG_HEADS = ("decode_head.", "auxiliary_head.")
#: the classifier every mmseg decode head has (``BaseDecodeHead.conv_seg``); bilevel's heads name theirs otherwise
_MMSEG_CLASSIFIER = "decode_head.conv_seg.weight"
#: the per-stage norms of a segmentation backbone, as the official BiFormer (``extra_norms.<i>.weight``, timm's
#: LayerNorm2d) and DeBiFormer (``extra_norms.<i>.ln.weight``, an nn.LayerNorm in a wrapper) files hold them
_STAGE_NORM_KEY = re.compile(r"extra_norms\.(\d+)\.(?:ln\.)?(weight|bias)")
#: where a ``bilevel fit`` segmenter keeps its per-stage norms (``SemanticSegmenter.stage_norms``)
_SEGMENTER_STAGE_NORMS = "stage_norms."


def _with_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def is_mmseg_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a checkpoint dictionary is an official (mmseg) segmentation file: ``backbone.*`` weights and an mmseg
    decode head (its ``conv_seg`` classifier) under ``"state_dict"``, and none of what Lightning writes
    (``hyper_parameters``, ``pytorch-lightning_version``), which a ``bilevel fit`` segmentation checkpoint has."""
    state = checkpoint.get("state_dict")
    return (isinstance(state, Mapping) and "hyper_parameters" not in checkpoint
            and "pytorch-lightning_version" not in checkpoint
            and any(key.startswith("backbone.") for key in state) and _MMSEG_CLASSIFIER in state)


def extract_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint",
                       backbone: bool = False) -> dict[str, Tensor]:
    """Find the model weights in a checkpoint dictionary.

    Accepts the official layout (weights under ``"model"``), ``"state_dict"``, EMA-only files
    (``"model_ema"`` / ``"state_dict_ema"``, read only when neither of the others is there) and a bare state
    dict. A ``module.`` (DistributedDataParallel) or ``model.`` prefix (a features_only model) on every key is
    removed. From a ``bilevel fit`` checkpoint the backbone of a classifier (keys ``model.*``) is returned.
    backbone: a segmentation checkpoint (``backbone.*`` and ``decode_head.*``) gives its backbone's weights,
        without the heads (a warning names the heads of an official mmseg file, which nothing loads), and with a
        ``bilevel fit`` segmenter's per-stage norms (``stage_norms.<i>.*``) as the official files name them
        (``extra_norms.<i>.*``); otherwise its weights are returned whole, as the segmenter holds them.
    """
    weights_key = next((key for key in _WEIGHT_KEYS if isinstance(checkpoint.get(key), Mapping)), None)
    state = checkpoint[weights_key] if weights_key is not None else checkpoint
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no model weights (keys: {sorted(checkpoint)[:10]})")
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in tensors):
            tensors = _with_prefix(tensors, prefix)
    task_model = _with_prefix(tensors, "model.") or (_segmentation_backbone(tensors) if backbone else {})
    if backbone and is_mmseg_checkpoint(checkpoint):
        heads = [f"{prefix}*" for prefix in MMSEG_HEADS if any(key.startswith(prefix) for key in tensors)]
        warnings.warn(f"{source} is an official mmseg segmentation checkpoint: its backbone is loaded, not its "
                      f"heads ({', '.join(heads)}), which bilevel does not rebuild; a bilevel decode head starts fresh",
                      stacklevel=2)
    return task_model or tensors


def _segmentation_backbone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A segmentation checkpoint's ``backbone.*`` weights, with a ``bilevel fit`` segmenter's per-stage norms named as
    the official segmentation backbones name theirs (``stage_norms.<i>.*`` -> ``extra_norms.<i>.*``); empty when
    there is no ``backbone.``."""
    state = _with_prefix(tensors, "backbone.")
    if state:
        norms = _with_prefix(tensors, _SEGMENTER_STAGE_NORMS)
        state.update({f"extra_norms.{key}": value for key, value in norms.items()})
    return state


def read_backbone_weights(path: PathLike) -> dict[str, Tensor]:
    """The backbone weights of a checkpoint file, as every start-weights reader takes them: :func:`read_checkpoint`
    then :func:`extract_state_dict` with ``backbone=True`` (messages name the file as given)."""
    return extract_state_dict(read_checkpoint(path), source=str(path), backbone=True)


def split_stage_norms(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a backbone's weights into its per-stage norms and the rest.

    The norms' keys ``extra_norms.<i>.weight`` (BiFormer) and ``extra_norms.<i>.ln.weight`` (DeBiFormer), and
    their biases, become ``<i>.weight`` / ``<i>.bias``: the keys of a ModuleList of one LayerNorm per stage.
    returns: (per-stage norms, the other weights); the first is empty when the file has none.
    """
    norms, rest = {}, {}
    for key, value in state.items():
        match = _STAGE_NORM_KEY.fullmatch(key)
        if match:
            norms[f"{match[1]}.{match[2]}"] = value
        else:
            rest[key] = value
    return norms, rest


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint",
                 allow_new_classifier: bool = False) -> list[str]:
    """Load ``state_dict`` into ``model`` strictly, adapting the input convs to the model's ``in_chans``.

    allow_new_classifier: initialise fresh (instead of failing on) a classifier of another size or one the
        file does not have, and a final norm the file does not have (a backbone saved pruned, as segmentation
        and features_only models are).
    returns: the keys left at their fresh initialisation.
    raises: CheckpointError naming the missing, unexpected and mis-shaped keys.
    """
    adapt = getattr(model, "adapt_state_dict", None)
    state = dict(adapt(state_dict) if adapt is not None else state_dict)
    own = model.state_dict()
    _adapt_input_convs(model, state, own)
    fresh = []
    if allow_new_classifier:
        classifier = classifier_prefixes(model)
        for key in [key for key in state if key.split(".")[0] in classifier
                    and (key not in own or state[key].shape != own[key].shape)]:
            del state[key]
        replaceable = set(classifier)
        if not any(key.split(".")[0] == _FINAL_NORM for key in state):
            replaceable.add(_FINAL_NORM)
        fresh = [key for key in own if key.split(".")[0] in replaceable and key not in state]
    missing = [key for key in own if key not in state and key not in fresh]
    unexpected = [key for key in state if key not in own]
    mis_shaped = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                  for key in state if key in own and state[key].shape != own[key].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not fit {_model_name(model)}:"]
        if missing:
            parts.append(f"missing keys {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_describe(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches {_describe(mis_shaped, 4)}")
        in_chans = getattr(model, "in_chans", None)
        unadapted = [key for key in state if key in own and own[key].ndim == 4 and own[key].shape[1] == in_chans
                     and _differs_in_input_channels(state[key], own[key])]
        if unadapted:
            parts.append(f"- the input channel count differs ({unadapted[0]} takes {state[unadapted[0]].shape[1]} "
                         f"channels in the file, the model in_chans={in_chans}), and it is not an input conv "
                         "(first_conv) of the model's pretrained_cfg, which loading would adapt")
        else:
            parts.append("(is it a checkpoint of another architecture or variant?)")
        raise CheckpointError(" ".join(parts))
    model.load_state_dict({**state, **{key: own[key] for key in fresh}}, strict=True)
    return fresh


def _model_name(model: nn.Module) -> str:
    return getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)


def _adapt_input_convs(model: nn.Module, state: dict[str, Tensor], own: Mapping[str, Tensor]) -> None:
    """Adapt the file's input convs (``first_conv`` of the model's cfg) to the model's input channels, in place.

    As timm's ``load_pretrained``: ``adapt_input_conv`` sums the channels for in_chans=1 and repeats them
    (rescaled) otherwise.
    """
    names = get_model_traits(model).get("first_conv", getattr(model, "pretrained_cfg", {}).get("first_conv"))
    for name in (names,) if isinstance(names, str) else names or ():
        key = f"{name}.weight"
        if key in state and key in own and _differs_in_input_channels(state[key], own[key]):
            state[key] = adapt_input_conv(own[key].shape[1], state[key], base_chans=state[key].shape[1])


def _differs_in_input_channels(file_weight: Tensor, model_weight: Tensor) -> bool:
    """Whether two conv weights (O, I, kH, kW) differ in their input channels I only."""
    return (file_weight.ndim == model_weight.ndim == 4 and file_weight.shape[1] != model_weight.shape[1]
            and file_weight.shape[:1] + file_weight.shape[2:] == model_weight.shape[:1] + model_weight.shape[2:])


def load_pretrained_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """:func:`load_weights` for fine-tuning: a classifier of another size (or none in the file) and a final norm
    the file lacks are initialised fresh, with a warning; the per-stage norms of a segmentation backbone (see
    :func:`split_stage_norms`), which a backbone has no place for, are left out, with a warning."""
    stage_norms, state_dict = split_stage_norms(state_dict)
    if stage_norms:
        warnings.warn(f"{source}: the per-stage norms of its segmentation backbone (extra_norms.*) are left out, as "
                      f"{_model_name(model)} has none; SemanticSegmenter(stage_norms=True) (bilevel fit "
                      "--model.stage_norms true) uses them", stacklevel=3)
    fresh = load_weights(model, state_dict, source=source, allow_new_classifier=True)
    classifier = [key for key in fresh if key.split(".")[0] in classifier_prefixes(model)]
    norm = [key for key in fresh if key not in classifier]
    if classifier:
        warnings.warn(f"{source}: loaded everything but the classifier ({', '.join(classifier)}), "
                      f"which was re-initialised for {model.num_classes} classes", stacklevel=3)
    if norm:
        warnings.warn(f"{source} has no final norm (a backbone saved without it): {', '.join(norm)} "
                      "initialised fresh", stacklevel=3)


def classifier_prefixes(model: nn.Module) -> set[str]:
    """Top-level names of ``model``'s classifier modules, from its pretrained config (``head`` by default)."""
    classifier = getattr(model, "default_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return {name.split(".")[0] for name in names}


def create_model(name: str, checkpoint_path: Optional[PathLike] = None, num_classes: Optional[int] = None,
                 features_only: bool = False, out_indices=(0, 1, 2, 3), **kwargs) -> nn.Module:
    """See :func:`bilevel.create_model`."""
    _check_model_name(name)
    if kwargs.pop("pretrained", False):
        raise ValueError("bilevel never downloads weights: pass checkpoint_path= with the official .pth file")
    state = None
    if checkpoint_path is not None:
        state = read_backbone_weights(checkpoint_path)
        if num_classes is None:
            num_classes = _checkpoint_classes(state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = network = timm.create_model(name, pretrained=False, **kwargs)
    if features_only:
        from timm.models._features import FeatureGetterNet
        full_keys = set(network.state_dict())
        model = FeatureGetterNet(network, out_indices=out_indices)          # prunes head, final norm, later stages
        if state is not None:
            pruned = full_keys - set(network.state_dict())
            state = {key: value for key, value in state.items() if key not in pruned}
    if state is not None:
        load_pretrained_weights(network, state, source=str(checkpoint_path))
    return model


def _check_model_name(name: str) -> None:
    """Accept a registered variant, optionally with its pretrained tag (``biformer_tiny.in1k``), as timm does."""
    from . import MODEL_NAMES, MODEL_TAGS  # registers the families with timm

    base, _, tag = name.partition(".")
    if base not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_NAMES)}")
    if tag and name not in MODEL_TAGS:
        known = sorted(full for full in MODEL_TAGS if full.partition(".")[0] == base)
        raise ValueError(f"unknown pretrained tag {tag!r} of {base}; available: {known}")


def _checkpoint_classes(state: Mapping[str, Tensor]) -> int:
    """Number of classes of the checkpoint's classifier (``head.weight``); 0 when it has none."""
    weight = state.get("head.weight")
    return int(weight.shape[0]) if weight is not None else 0
