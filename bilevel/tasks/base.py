"""What both tasks share: start weights read in ``setup`` (never in ``__init__``), class names kept from checkpoints,
and the optimiser (AdamW groups planned on the plain model, warm-up + cosine)."""
from __future__ import annotations

import math
from typing import Any

from lightning import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from ..models.loading import load_pretrained_weights, read_backbone_weights
from .optim import ParameterPlan, build_optimizer, parameter_plan

__all__ = ["FineTuningTask", "SettingsMismatchError"]


class SettingsMismatchError(ValueError):
    """Two settings of a run contradict each other; the message names both command-line options."""


class FineTuningTask(LightningModule):
    """Base of the tasks: a backbone started from the ``checkpoint_path`` hyperparameter, when one is given.

    The start weights (an official ``.pth`` or a ``bilevel fit`` checkpoint) are read in :meth:`setup`, on
    every process, before the optimiser is built and before DDP/FSDP wrap the model; and only when the
    trainer restores no Lightning checkpoint (``trainer.ckpt_path`` is None). Lightning records a
    ``fit(ckpt_path=...)`` argument there only after ``setup``, so the ``bilevel`` command sets
    ``trainer.ckpt_path`` before the run (in Python, do the same). So ``load_from_checkpoint`` and
    ``--ckpt_path`` never read that file again (it may have moved). A restored checkpoint also brings back
    the class names the model was trained with.

    The optimiser's groups (weight decay, layer-wise lr decay) are planned by parameter name in ``setup``
    too, on the plain model, and applied in ``configure_optimizers`` to whatever the strategy made of it
    (FSDP's flat shards, activation-checkpoint wrappers): see :mod:`bilevel.tasks.optim`.

    Subclasses save ``checkpoint_path``, ``class_names`` and the optimiser hyperparameters (``lr``,
    ``weight_decay``, ``warmup_steps``, ``min_lr_ratio``, ``layer_decay``), set ``self.class_names`` and
    name the attribute holding the backbone in ``backbone_attribute``; one that keeps start weights outside
    its backbone, or leaves some out, overrides :meth:`load_start_weights`.
    """

    #: the attribute holding the backbone: start weights load into it, layer-wise lr decay follows its depth
    backbone_attribute = "model"

    def __init__(self) -> None:
        super().__init__()
        # True once the weights are final: start weights loaded, or a Lightning checkpoint restored
        self._weights_settled = False
        self._parameter_plan: ParameterPlan | None = None

    def load_start_weights(self, path: str) -> None:
        """Load ``path`` into the backbone, as :func:`bilevel.create_model` reads it (a ``bilevel fit`` checkpoint
        gives its backbone); a classifier of another class count is re-initialised, with a warning."""
        load_pretrained_weights(getattr(self, self.backbone_attribute), read_backbone_weights(path), source=str(path))

    def setup(self, stage: str) -> None:
        """Load the ``checkpoint_path`` start weights once, unless a Lightning checkpoint is being restored;
        plan the optimiser's groups while the model is still plain."""
        path = self.hparams.get("checkpoint_path")
        if path is not None and not self._weights_settled and self.trainer.ckpt_path is None:
            self.load_start_weights(path)
        self._weights_settled = True
        self._parameter_plan = self.parameter_plan()

    def parameter_plan(self) -> ParameterPlan:
        """Each parameter's (weight decay, lr scale) by name: see :func:`bilevel.tasks.optim.parameter_plan`."""
        hp = self.hparams
        return parameter_plan(self, hp.weight_decay, hp.layer_decay, getattr(self, self.backbone_attribute),
                              f"{self.backbone_attribute}.")

    def configure_optimizers(self):
        """AdamW over the groups planned in ``setup`` (planned now when no ``setup`` ran), warm-up, then cosine
        to the run's last step; a constant lr after the warm-up when the run has no step or epoch limit
        (``max_time``, early stopping)."""
        hp = self.hparams
        plan = self._parameter_plan if self._parameter_plan is not None else self.parameter_plan()
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total):
            rank_zero_warn("the run sets no max_steps or max_epochs, so the cosine schedule has no end: the learning "
                           f"rate stays at lr={hp.lr} after the warm-up (set trainer.max_steps or max_epochs to "
                           "decay it)")
        return build_optimizer(self, plan, None if math.isinf(total) else int(total), hp.lr, hp.warmup_steps,
                               hp.min_lr_ratio)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping; by norm under FSDP through the sharded model's own ``clip_grad_norm_`` (the norm
        over all shards), which Lightning's FSDP precision plugin leaves to the module."""
        if (gradient_clip_val and gradient_clip_algorithm in (None, "norm")
                and isinstance(self.trainer.strategy, FSDPStrategy)):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's class names (warning when the data gave others); its weights are final."""
        self._weights_settled = True
        saved = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        if saved is None or list(saved) == self.class_names:
            return
        if self.hparams.get("class_names") is not None:
            rank_zero_warn(f"the checkpoint was trained with the classes {list(saved)}, but the data gives "
                           f"{self.class_names}: the checkpoint's class names are used")
        self.class_names = list(saved)
        self.hparams["class_names"] = list(saved)
