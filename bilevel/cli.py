"""The ``bilevel`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    bilevel fit --config lightning_configs/quickstart_classification.yaml
    bilevel fit --config lightning_configs/quickstart_classification.yaml \\
        --data bilevel.data.ImageFolderDataModule --data.root /path/to/images
    bilevel predict --config lightning_configs/quickstart_classification.yaml --ckpt_path best.ckpt \\
        --data.predict_root /path/to/new/images

The model's backbone name goes to the data module (its mean/std/input size); the data's class count
and names go to the model, so the number of classes is never written twice.
"""
from __future__ import annotations

from typing import Optional

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

__all__ = ["BilevelCLI", "main"]


class BilevelCLI(LightningCLI):
    """LightningCLI with the links between data and model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``bilevel`` console script."""
    BilevelCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
               save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
