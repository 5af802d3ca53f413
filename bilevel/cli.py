"""The ``bilevel`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    bilevel fit --config lightning_configs/quickstart_classification.yaml
    bilevel fit --config lightning_configs/quickstart_classification.yaml \\
        --data bilevel.data.ImageFolderDataModule --data.root /path/to/images
    bilevel predict --config lightning_configs/quickstart_classification.yaml --ckpt_path best.ckpt \\
        --data.predict_root /path/to/new/images

The model's backbone name goes to the data module (its mean/std/input size); the data's class count
and names go to the model, so the number of classes is never written twice. ``--ckpt_path`` takes a
checkpoint written by ``bilevel fit``; official weights go to ``--model.checkpoint_path``.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional, Union

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from .data.images import DatasetError, ImageReadError
from .data.scan import first_few
from .models._pyramid import InputSizeError
from .models.loading import SHARDED_METADATA_FILE, CheckpointError, is_sharded_checkpoint, read_checkpoint
from .runtime import retain_freed_memory
from .tasks.base import SettingsMismatchError
from .tasks.writers import PredictionWriter

__all__ = ["BilevelCLI", "INPUT_ERRORS", "console_main", "main", "require_lightning_checkpoint", "require_same_task",
           "require_same_classes"]

#: ``--ckpt_path`` values Lightning resolves itself rather than reading a file of that name
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc")
#: errors whose message names the bad file or argument: a checkpoint that cannot be used, a dataset problem
#: found by the scan, an image that cannot be read (with the scan off), an image the model cannot take, two
#: settings that contradict each other
INPUT_ERRORS = (CheckpointError, DatasetError, ImageReadError, InputSizeError, SettingsMismatchError)
#: how a DataLoader worker's error message ends: the worker's traceback, whose last line is the original error
_WORKER_TRACEBACK = "Original Traceback"


def require_lightning_checkpoint(path: Union[str, Path], sharded_ok: bool = False,
                                 resume: bool = False) -> dict[str, Any]:
    """Check (reading weights-only) that ``path`` is a Lightning checkpoint, as ``--ckpt_path`` needs.

    sharded_ok: a sharded FSDP checkpoint folder is accepted (the run uses FSDP); its Lightning metadata
        file (``meta.pt``) is what gets checked.
    resume: the run resumes from it (``fit``), so it must hold the training state, which a file exported for
        serving (``python -m bilevel.serving export``) leaves out.
    returns: the checkpoint's hyperparameters (empty when it saved none).
    raises: FileNotFoundError, or CheckpointError naming the file and pointing official weights to
        ``--model.checkpoint_path`` and a sharded checkpoint, outside FSDP, to its consolidation.
    """
    if sharded_ok and is_sharded_checkpoint(path):
        path = Path(path).expanduser() / SHARDED_METADATA_FILE
    checkpoint = read_checkpoint(path)
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by `bilevel fit` (it holds model weights only, "
                              "like the official .pth files): --ckpt_path resumes or reuses a Lightning checkpoint. "
                              f"To start from these weights, pass --model.checkpoint_path {path}")
    if resume and "optimizer_states" not in checkpoint:
        raise CheckpointError(f"{path} holds a model's weights without the training state (saved weights-only, or "
                              "exported for serving): `bilevel fit --ckpt_path` resumes a run from where it stopped. "
                              f"To start a new run from these weights, pass --model.checkpoint_path {path}")
    return dict(checkpoint.get("hyper_parameters") or {})


def _import_class(class_path: str) -> Optional[type]:
    """The class a ``class_path`` names (None when it cannot be imported, or is not a class)."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def _describe_checkpoint(hparams: dict[str, Any]) -> str:
    """'a checkpoint of SemanticSegmenter with 3 classes (a, b, c)', from the checkpoint's hyperparameters."""
    task = hparams.get("_class_path", "a model").rpartition(".")[2]
    return f"a checkpoint of {task} with {_classes(hparams.get('num_classes'), hparams.get('class_names'))}"


def _classes(count: Optional[int], names: Optional[list[str]]) -> str:
    """'3 classes (a, b, c)', naming a few of them."""
    return f"{count} classes" + (f" ({first_few(names)})" if names else "")


def require_same_task(path: Union[str, Path], hparams: dict[str, Any], class_path: Optional[str]) -> None:
    """A CheckpointError naming ``path`` when its model class (its ``_class_path``) is not ``class_path``, the run's,
    nor a subclass or base class of it.

    Checkpoints that do not record an importable class (saved outside the ``bilevel`` command) are not checked.
    """
    saved, run = (_import_class(name) if name else None for name in (hparams.get("_class_path"), class_path))
    if saved is None or run is None or issubclass(saved, run) or issubclass(run, saved):
        return
    raise CheckpointError(f"{path} is {_describe_checkpoint(hparams)}, but this run's model is "
                          f"{class_path.rpartition('.')[2]}: pass a checkpoint of the same task, or the config the "
                          "checkpoint was trained with")


def require_same_classes(path: Union[str, Path], hparams: dict[str, Any], datamodule: LightningDataModule) -> None:
    """A CheckpointError naming ``path`` when its class count differs from the data's (its weights cannot load)."""
    saved, given = hparams.get("num_classes"), getattr(datamodule, "num_classes", None)
    if saved is None or given is None or saved == given:
        return
    data = _classes(given, getattr(datamodule, "class_names", None))
    raise CheckpointError(f"{path} is {_describe_checkpoint(hparams)}, but the data gives {data}: use the data it was "
                          "trained on (the same class folders, or classes.txt), or a checkpoint trained on this data")


def _last_checkpoint_of_earlier_runs(trainer) -> Optional[Path]:
    """What ``--ckpt_path last`` means when each run logs into its own ``version_<n>`` folder: the newest
    ``version_<n>/checkpoints/last.ckpt`` under the logger's folder. None when checkpoints go elsewhere (a set
    ``dirpath``, which Lightning searches itself, or no logger folder).
    raises: CheckpointError naming the folder when no earlier run saved a ``last.ckpt``.
    """
    callback, root = trainer.checkpoint_callback, getattr(trainer.logger, "root_dir", None)
    if callback is None or callback.dirpath is not None or root is None:
        return None

    def version(path: Path) -> int:
        number = path.parents[1].name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    saved = sorted(Path(root).glob("version_*/checkpoints/last.ckpt"), key=version)
    if not saved:
        raise CheckpointError(f"--ckpt_path last: no earlier run under {root} saved a last.ckpt "
                              "(version_<n>/checkpoints/last.ckpt), so there is nothing to resume")
    return saved[-1]


def _names_a_local_file(ckpt_path: str) -> bool:
    """False for the ``--ckpt_path`` values Lightning resolves itself: best/last/hpc, registry[:name], URLs."""
    return (ckpt_path not in LIGHTNING_CKPT_KEYWORDS and not ckpt_path.lower().startswith("registry")
            and "://" not in ckpt_path)


class BilevelCLI(LightningCLI):
    """LightningCLI with the links between data and model, and a checked ``--ckpt_path``."""

    #: the hyperparameters of the ``--ckpt_path`` file, once read and checked
    _checkpoint_hparams: Optional[dict[str, Any]] = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` of another task, before Lightning takes its hyperparameters (its model class among
        them) for the run's model."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and _names_a_local_file(str(ckpt_path)) and not Path(ckpt_path).expanduser().exists():
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file or folder")
        if ckpt_path is not None and Path(ckpt_path).expanduser().is_file():
            self._check_checkpoint_file(subcommand, ckpt_path)
        super()._parse_ckpt_path()

    def _check_checkpoint_file(self, subcommand: str, ckpt_path: Union[str, Path]) -> None:
        """Read and check a ``--ckpt_path`` file: a Lightning checkpoint (holding the training state for ``fit``) of
        the run's task; keep its hyperparameters."""
        self._checkpoint_hparams = require_lightning_checkpoint(ckpt_path, resume=subcommand == "fit")
        require_same_task(ckpt_path, self._checkpoint_hparams,
                          self.config[subcommand].get("model", {}).get("class_path"))

    def _restore_from_ckpt_path(self, subcommand: str) -> None:
        """Check ``--ckpt_path`` (a Lightning checkpoint of the data's class count; ``last``: the newest earlier run's
        ``last.ckpt``) and hand it to the trainer before the run starts.

        Set as ``trainer.ckpt_path``, it is known when the model's ``setup`` runs, so the model skips its
        ``checkpoint_path`` start weights (restoring happens after ``setup``).
        """
        config = self.config_init[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" and (last := _last_checkpoint_of_earlier_runs(self.trainer)) is not None:
            rank_zero_info(f"--ckpt_path last: {last}")
            ckpt_path = str(last)
            if last.is_file():      # a sharded FSDP folder is checked below
                self._check_checkpoint_file(subcommand, ckpt_path)
        if ckpt_path is None or not _names_a_local_file(str(ckpt_path)):
            return
        hparams = self._checkpoint_hparams
        if hparams is None:   # a sharded checkpoint folder, which only FSDP reads
            sharded_ok = isinstance(self.trainer.strategy, FSDPStrategy)
            hparams = require_lightning_checkpoint(ckpt_path, sharded_ok=sharded_ok)
        require_same_classes(ckpt_path, hparams, self.datamodule)
        self.trainer.ckpt_path = ckpt_path
        config["ckpt_path"] = None

    def before_fit(self) -> None:
        self._restore_from_ckpt_path("fit")

    def before_validate(self) -> None:
        self._restore_from_ckpt_path("validate")

    def before_test(self) -> None:
        self._restore_from_ckpt_path("test")

    def before_predict(self) -> None:
        """Check ``--ckpt_path``; predictions go to a prediction writer's files (a :class:`PredictionWriter` is added
        when the config names none), so the trainer keeps none in memory unless ``--return_predictions true``
        asks for them."""
        self._restore_from_ckpt_path("predict")
        config = self.config_init["predict"]
        if config.get("return_predictions") is None:
            config["return_predictions"] = False
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())


def main(args: Optional[list[str]] = None) -> None:
    """Run the ``bilevel`` command line in this process (errors propagate); freed memory stays in the heap
    (:func:`~bilevel.runtime.retain_freed_memory`: faster CPU evaluation and prediction)."""
    retain_freed_memory()
    BilevelCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
               save_config_kwargs={"overwrite": True}, args=args)


def console_main() -> None:
    """The ``bilevel`` console script: :func:`main`, with bad input (:data:`INPUT_ERRORS`) reported as one line on
    stderr and exit status 2, as argparse reports a bad option, instead of a traceback."""
    try:
        main()
    except Exception as error:
        bad_input = _input_error_behind(error)
        if bad_input is None:
            raise
        print(f"bilevel: error: {_input_error_message(bad_input)}", file=sys.stderr)
        raise SystemExit(2) from None


def _input_error_behind(error: BaseException) -> Optional[BaseException]:
    """``error``, or the error it was raised from, that is bad input (:data:`INPUT_ERRORS`); None if there is none.

    jsonargparse re-raises an error of a data module's or model's constructor as a ValueError about "Union
    subtypes", with the original as its cause.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, INPUT_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _input_error_message(error: Exception) -> str:
    """The error's message; for one re-raised from a DataLoader worker, the original message without the worker's
    traceback (its last line, after the error's type)."""
    message = str(error)
    if _WORKER_TRACEBACK not in message:
        return message
    return message.rstrip().splitlines()[-1].partition(": ")[2]


if __name__ == "__main__":
    console_main()
