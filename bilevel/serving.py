"""What the app serves: loading a model for inference, and one cached forward pass per image and model.

    served = load_served_model()                                  # the embedded demo model
    served = load_served_model("biformer_tiny", "biformer_tiny.pth")  # official or ``bilevel fit`` checkpoint
    served = load_served_model(checkpoint="segmenter.ckpt")        # a ``bilevel fit`` segmentation checkpoint
    analysis = Predictor().analyse(served, picture)               # top-5 (or mask) + every routing record

A :class:`Predictor` keeps the last analyses (keyed by model and image content), so redrawing the
routing for another query region, stage or block never runs the network again. Every failure a user
can cause (a bad upload, a checkpoint of another architecture) raises :class:`ServingError` with a
message meant for the interface.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .data.images import ImageReadError, image_to_tensor, read_image
from .models.loading import CheckpointError, extract_state_dict, is_mmseg_checkpoint, load_weights, read_checkpoint
from .ops.recording import RoutingRecord, record_routing

__all__ = ["EMBEDDED_CHECKPOINT", "EMBEDDED_MODEL", "EMBEDDED_SEGMENTATION_CHECKPOINT", "EMBEDDED_SEGMENTATION_MODEL",
           "EMBEDDED_MODELS", "MIN_IMAGE_SIDE", "WORKING_IMAGE_SIDE", "ServingError", "ServedModel", "Analysis",
           "Predictor", "load_served_model", "read_upload", "fit_picture", "picture_digest", "export_checkpoint"]

PathLike = Union[str, Path]

#: the checkpoint of the embedded demo model (``lightning_configs/demo_classification.yaml``)
EMBEDDED_CHECKPOINT = Path(__file__).parent / "assets" / "demo_classification.ckpt"
#: how the interface names the embedded model
EMBEDDED_MODEL = "embedded demo (BiFormer on the built-in shapes)"
#: the embedded segmentation model (``lightning_configs/demo_segmentation.yaml``) and its name
EMBEDDED_SEGMENTATION_CHECKPOINT = Path(__file__).parent / "assets" / "demo_segmentation.ckpt"
EMBEDDED_SEGMENTATION_MODEL = "embedded demo segmentation (BiFormer + FPN on the built-in shapes)"
#: interface name -> checkpoint of every embedded model
EMBEDDED_MODELS = {EMBEDDED_MODEL: EMBEDDED_CHECKPOINT, EMBEDDED_SEGMENTATION_MODEL: EMBEDDED_SEGMENTATION_CHECKPOINT}
#: images with a shorter side are refused: nothing to route on
MIN_IMAGE_SIDE = 16
#: uploads are shrunk to at most this many pixels on their longer side before anything else
WORKING_IMAGE_SIDE = 1024


class ServingError(ValueError):
    """A problem the user caused or can fix (bad upload, unsuitable checkpoint); the message is for them."""


@dataclass(frozen=True)
class ServedModel:
    """A classifier or a segmenter ready for inference.

    key: identifies model + weights in caches; name: registered variant (the backbone of a segmenter);
    model: in eval mode, images (N, 3, S, S) -> logits (N, K) or, for task "segmentation", (N, K, S, S);
    class_names: one per output; input_size: side S of the input; mean/std: input normalisation.
    """

    key: str
    name: str
    model: nn.Module
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    task: str = "classification"

    @property
    def random_weights(self) -> bool:
        """True when no checkpoint was loaded: the weights are a fresh initialisation."""
        return self.key.endswith(":random")


@dataclass
class Analysis:
    """One forward pass over one picture.

    picture: the working picture (RGB, longer side <= WORKING_IMAGE_SIDE) the routing is drawn on
    probabilities: (num_classes,) softmax of a classifier, or a segmenter's share of the pixels per class
    records: the routing records, batch of one; mask: a segmenter's (S, S) class index per input pixel
    """

    model_key: str
    picture: Image.Image
    probabilities: Tensor
    class_names: tuple[str, ...]
    records: list[RoutingRecord] = field(default_factory=list)
    mask: Optional[Tensor] = None

    def top(self, k: int = 5) -> dict[str, float]:
        """The k most probable classes (largest, for a mask): {name: probability or pixel share}, best first."""
        values, indices = self.probabilities.topk(min(k, self.probabilities.numel()))
        return {self.class_names[i]: float(v) for v, i in zip(values.tolist(), indices.tolist())
                if self.mask is None or v > 0}


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------

def fit_picture(picture: Image.Image, max_side: int = WORKING_IMAGE_SIDE) -> Image.Image:
    """Check the picture's size and shrink it so that its longer side is at most ``max_side``, unless that
    would take its shorter side below :data:`MIN_IMAGE_SIDE` (a thin strip keeps that many pixels across).

    raises: ServingError when a side is shorter than :data:`MIN_IMAGE_SIDE`.
    """
    width, height = picture.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ServingError(f"the image is {width}x{height} pixels: it needs at least {MIN_IMAGE_SIDE} pixels "
                           "on each side to be split into regions")
    scale = max(max_side / max(width, height), MIN_IMAGE_SIDE / min(width, height))
    if scale < 1:
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.LANCZOS, reducing_gap=3.0)
    return picture.convert("RGB")


def read_upload(path: PathLike, label: str = "the uploaded file") -> Image.Image:
    """An uploaded file -> working picture (RGB, size checked and bounded), through ``bilevel.data.images``.

    label: how messages name the file (never the server path).
    raises: ServingError with a message for the interface.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ServingError(f"{label} is empty")
    try:
        picture = read_image(path)
    except ImageReadError as error:
        reason = str(error).split(": ", 1)[-1].replace(f" '{path}'", "").replace(str(path), label)
        raise ServingError(f"{label} is not a readable image: {reason}") from None
    return fit_picture(picture)


def picture_digest(picture: Image.Image) -> str:
    """Content hash of a picture (size and pixels)."""
    digest = hashlib.sha256(f"{picture.size}{picture.mode}".encode())
    digest.update(picture.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def _imagenet_names() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_descriptions())


def _class_names(count: int, names: Optional[list[str]]) -> tuple[str, ...]:
    if names is not None and len(names) == count:
        return tuple(str(name) for name in names)
    if count == 1000:
        return _imagenet_names()
    return tuple(f"class {index}" for index in range(count))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _build_segmenter(hyper: Mapping[str, Any], label: str) -> nn.Module:
    """The ``SemanticSegmenter`` a ``bilevel fit`` segmentation checkpoint was written from (random weights).

    Only the constructor's own arguments are taken from the checkpoint, and never a path: the backbone's
    ``checkpoint_path`` is dropped, as the checkpoint holds the trained weights.
    """
    from .tasks.segmentation import SemanticSegmenter

    accepted = set(inspect.signature(SemanticSegmenter).parameters) - {"checkpoint_path"}
    try:
        return SemanticSegmenter(**{key: value for key, value in hyper.items() if key in accepted})
    except (TypeError, ValueError, KeyError) as error:
        raise ServingError(f"cannot build the segmentation model stored in {label}: {error}") from None


def load_served_model(name: Optional[str] = None, checkpoint: Optional[PathLike] = None,
                      label: Optional[str] = None) -> ServedModel:
    """Build a registered classifier, or the segmenter of a ``bilevel fit`` checkpoint, for inference.

    name: a registered variant (``bilevel.list_models()``) or the name of an embedded model
        (:data:`EMBEDDED_MODELS`); None with no checkpoint: the embedded demo classifier; None with a
        ``bilevel fit`` checkpoint: the variant the checkpoint was trained as.
    checkpoint: an official classification ``.pth`` or a ``bilevel fit`` ``.ckpt`` (read weights-only) of a
        classifier or of a segmenter (backbone, stage norms, decode head); None with a name gives random
        weights (ImageNet-sized head), useful only to look at the routing machinery.
    label: how messages name the checkpoint (default: its file name).
    raises: ServingError for an unknown name, a file that is not a checkpoint or one that does not fit, and an
        official mmseg segmentation file (its heads are not rebuilt: the message says how to fine-tune from it).
    """
    from . import list_models

    if name is None and checkpoint is None:
        name = EMBEDDED_MODEL
    if name in EMBEDDED_MODELS:
        if checkpoint is not None:
            raise ServingError("an embedded model takes no checkpoint: choose a model variant for yours")
        name, checkpoint = None, EMBEDDED_MODELS[name]
    label = label or (Path(checkpoint).name if checkpoint is not None else "")
    contents: Mapping[str, Any] = {}
    if checkpoint is not None:
        try:
            contents = read_checkpoint(checkpoint)
            state = extract_state_dict(contents, source=label)
        except (CheckpointError, FileNotFoundError) as error:
            raise ServingError(str(error).replace(str(checkpoint), label)) from None
        if is_mmseg_checkpoint(contents):
            raise ServingError(f"{label} is an official mmseg segmentation checkpoint, whose heads bilevel does not "
                               "rebuild: fine-tune from it with bilevel fit --config "
                               "lightning_configs/<family>_segmentation.yaml --model.model_name <its variant> "
                               "--model.checkpoint_path <this file> "
                               "--model.stage_norms true (BiFormer, DeBiFormer) and serve that run's checkpoint")
    hyper = dict(contents.get("hyper_parameters") or {})
    trained_as = hyper.get("model_name")
    name = name or trained_as
    if name is None:
        raise ServingError(f"{label} does not say which model it belongs to: choose a model variant")
    if name not in list_models():
        raise ServingError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if trained_as is not None and trained_as != name:
        raise ServingError(f"{label} was trained as {trained_as}, not {name}: choose {trained_as}")
    segmenter = any(key.startswith("decode_head.") for key in state) if checkpoint is not None else False
    if segmenter:
        model = _build_segmenter({**hyper, "model_name": name}, label)
        num_classes = int(model.hparams.num_classes)
    else:
        num_classes = int(state["head.weight"].shape[0]) if checkpoint is not None and "head.weight" in state else 1000
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                      **(hyper.get("model_kwargs") or {}))
        except (TypeError, ValueError) as error:
            raise ServingError(f"cannot build {name} with the settings stored in {label}: {error}") from None
    if checkpoint is not None:
        try:
            load_weights(model, state, source=label)
        except CheckpointError as error:
            raise ServingError(str(error)) from None
    model.eval()
    cfg = dict((model.backbone if segmenter else model).pretrained_cfg)
    data_hyper = contents.get("datamodule_hyper_parameters") or {}
    input_size = int(data_hyper.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1])
    key = f"{name}:{_file_digest(Path(checkpoint)) if checkpoint is not None else 'random'}"
    return ServedModel(key=key, name=name, model=model, class_names=_class_names(num_classes, hyper.get("class_names")),
                       input_size=input_size, mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                       std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
                       task="segmentation" if segmenter else "classification")


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------

def _first_image(record: RoutingRecord) -> RoutingRecord:
    """The record of a batch of one, kept on the CPU (tensors keep their leading batch dimension)."""
    def cpu(value):
        return value.cpu() if isinstance(value, Tensor) else value

    return RoutingRecord(module=record.module, kind=record.kind, map_size=record.map_size,
                         region_grid=record.region_grid, region_size=record.region_size,
                         indices=cpu(record.indices), logits=cpu(record.logits),
                         extras={key: cpu(value) for key, value in record.extras.items()})


class Predictor:
    """Runs a served model on pictures, remembering the last ``capacity`` analyses.

    ``forward_passes`` counts the network runs (a cache hit does not run it). Thread-safe: concurrent
    requests for the same picture and model wait for one forward pass.
    """

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self.forward_passes = 0
        self._cache: OrderedDict[tuple[str, str], Analysis] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], threading.Lock] = {}

    def analyse(self, served: ServedModel, picture: Image.Image) -> Analysis:
        """Top classes and routing records of ``picture`` (a working picture, see :func:`fit_picture`)."""
        key = (served.key, picture_digest(picture))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            pending = self._pending.setdefault(key, threading.Lock())
        with pending:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            analysis = self._run(served, picture)
            with self._lock:
                self._cache[key] = analysis
                self._pending.pop(key, None)
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return analysis

    def _run(self, served: ServedModel, picture: Image.Image) -> Analysis:
        side = served.input_size
        batch = image_to_tensor(picture.resize((side, side), Image.Resampling.BICUBIC), served.mean, served.std)[None]
        with torch.inference_mode(), record_routing(served.model) as trace:
            logits = served.model(batch)
        with self._lock:
            self.forward_passes += 1
        records = [_first_image(record) for record in trace]
        if served.task == "segmentation":
            mask = logits[0].argmax(dim=0)
            shares = torch.bincount(mask.flatten(), minlength=logits.shape[1]).float() / mask.numel()
            return Analysis(model_key=served.key, picture=picture, probabilities=shares,
                            class_names=served.class_names, records=records, mask=mask)
        return Analysis(model_key=served.key, picture=picture, probabilities=torch.softmax(logits[0].float(), dim=-1),
                        class_names=served.class_names, records=records)


# ----------------------------------------------------------------------------------------------
# Exporting a training checkpoint for serving
# ----------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Hyper-parameters as plain Python containers (what a weights-only load accepts)."""
    if isinstance(value, Mapping) or isinstance(value, argparse.Namespace):
        items = vars(value).items() if isinstance(value, argparse.Namespace) else value.items()
        return {str(key): _plain(item) for key, item in items}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def export_checkpoint(source: PathLike, target: PathLike, half: bool = True) -> Path:
    """Keep what serving needs of a ``bilevel fit`` checkpoint: the model weights and the hyper-parameters.

    The result still loads with Lightning (``load_from_checkpoint``, ``bilevel validate/predict --ckpt_path``).
    Drops the optimizer state and stores floating-point weights in half precision (``half``), which
    makes the file about a sixth of the training checkpoint. The weights keep the task's names (``model.``
    for a classifier, ``backbone.`` and ``decode_head.`` for a segmenter). returns: the target path.
    """
    contents = read_checkpoint(source)
    if not isinstance(contents.get("state_dict"), Mapping):
        raise CheckpointError(f"{source} is not a bilevel fit checkpoint (it has no 'state_dict')")
    state = {key: value for key, value in contents["state_dict"].items() if isinstance(value, Tensor)}
    if half:
        state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    exported = {"state_dict": state,
                "hyper_parameters": _plain(contents.get("hyper_parameters") or {}),
                "datamodule_hyper_parameters": _plain(contents.get("datamodule_hyper_parameters") or {})}
    if "pytorch-lightning_version" in contents:
        exported["pytorch-lightning_version"] = str(contents["pytorch-lightning_version"])
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(exported, target)
    return target


def main(args: Optional[list[str]] = None) -> None:
    """``python -m bilevel.serving export SOURCE.ckpt TARGET.ckpt``"""
    parser = argparse.ArgumentParser(prog="python -m bilevel.serving")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="shrink a bilevel fit checkpoint for serving")
    export.add_argument("source")
    export.add_argument("target")
    export.add_argument("--full-precision", action="store_true", help="keep float32 weights")
    options = parser.parse_args(args)
    path = export_checkpoint(options.source, options.target, half=not options.full_precision)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
