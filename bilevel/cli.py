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

import sys
from pathlib import Path
from typing import Optional, Union

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy

from .data.images import DatasetError
from .models._pyramid import InputSizeError
from .models.loading import SHARDED_METADATA_FILE, CheckpointError, is_sharded_checkpoint, read_checkpoint

__all__ = ["BilevelCLI", "INPUT_ERRORS", "console_main", "main", "require_lightning_checkpoint"]

#: ``--ckpt_path`` values Lightning resolves itself rather than reading a file of that name
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc")
#: errors whose message names the bad file or argument: a checkpoint that cannot be used, a dataset problem
#: found by the scan, an image the model cannot take
INPUT_ERRORS = (CheckpointError, DatasetError, InputSizeError)


def require_lightning_checkpoint(path: Union[str, Path], sharded_ok: bool = False) -> None:
    """Check (reading weights-only) that ``path`` is a Lightning checkpoint, as ``--ckpt_path`` needs.

    sharded_ok: a sharded FSDP checkpoint folder is accepted (the run uses FSDP); its Lightning metadata
        file (``meta.pt``) is what gets checked.
    raises: FileNotFoundError, or CheckpointError naming the file and pointing official weights to
        ``--model.checkpoint_path`` and a sharded checkpoint, outside FSDP, to its consolidation.
    """
    if sharded_ok and is_sharded_checkpoint(path):
        path = Path(path).expanduser() / SHARDED_METADATA_FILE
    if "pytorch-lightning_version" not in read_checkpoint(path):
        raise CheckpointError(f"{path} is not a checkpoint written by `bilevel fit` (it holds model weights only, "
                              "like the official .pth files): --ckpt_path resumes or reuses a Lightning checkpoint. "
                              f"To start from these weights, pass --model.checkpoint_path {path}")


def _names_a_local_file(ckpt_path: str) -> bool:
    """False for the ``--ckpt_path`` values Lightning resolves itself: best/last/hpc, registry[:name], URLs."""
    return (ckpt_path not in LIGHTNING_CKPT_KEYWORDS and not ckpt_path.lower().startswith("registry")
            and "://" not in ckpt_path)


class BilevelCLI(LightningCLI):
    """LightningCLI with the links between data and model, and a checked ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _restore_from_ckpt_path(self, subcommand: str) -> None:
        """Check ``--ckpt_path`` and hand it to the trainer before the run starts.

        Set as ``trainer.ckpt_path``, it is known when the model's ``setup`` runs, so the model skips its
        ``checkpoint_path`` start weights (restoring happens after ``setup``).
        """
        config = self.config_init[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None or not _names_a_local_file(str(ckpt_path)):
            return
        require_lightning_checkpoint(ckpt_path, sharded_ok=isinstance(self.trainer.strategy, FSDPStrategy))
        self.trainer.ckpt_path = ckpt_path
        config["ckpt_path"] = None

    def before_fit(self) -> None:
        self._restore_from_ckpt_path("fit")

    def before_validate(self) -> None:
        self._restore_from_ckpt_path("validate")

    def before_test(self) -> None:
        self._restore_from_ckpt_path("test")

    def before_predict(self) -> None:
        """Check ``--ckpt_path``; predictions go to the PredictionWriter's files, so the trainer keeps none in
        memory unless ``--return_predictions true`` asks for them."""
        self._restore_from_ckpt_path("predict")
        config = self.config_init["predict"]
        if config.get("return_predictions") is None:
            config["return_predictions"] = False


def main(args: Optional[list[str]] = None) -> None:
    """Run the ``bilevel`` command line in this process (errors propagate)."""
    BilevelCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
               save_config_kwargs={"overwrite": True}, args=args)


def console_main() -> None:
    """The ``bilevel`` console script: :func:`main`, with bad input (:data:`INPUT_ERRORS`) reported as one line on
    stderr and exit status 2, as argparse reports a bad option, instead of a traceback."""
    try:
        main()
    except INPUT_ERRORS as error:
        print(f"bilevel: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    console_main()
