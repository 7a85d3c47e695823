"""Trainer of the 2-D PSPNet (``autoseg.networks.PSPNet``): the CTP paper's two-phase fine-tuning.

``PSPNetTrainer``
    A stage whose ``trainable`` is ``new_layers`` freezes the backbone (no gradients, BatchNorm statistics fixed)
    and trains the initializer, pyramid pooling and head at the stage's learning rate (1e-2 in the plans); a stage
    with ``all`` trains everything (1e-4). RMSProp. The learning rate drops ÷10 whenever the moving-average
    validation pseudo-Dice (the one ``checkpoint_best.pth`` follows) has not improved for
    ``plateau_patience_epochs``, and training stops after ``early_stopping_patience_epochs`` without improvement.
    Both patiences scale with a shortened run (``--epochs``) like the stage starts do (``RunLength``), at least 1
    epoch, and count only once the validation pseudo-Dice has left 0; both counters restart with each stage, and are
    stored in the checkpoint so ``--continue`` resumes them (``autoseg.train.early_stopping.PlateauStopping``, a
    handler the trainer attaches to its loop as ``self.plateau``).

The network carries PSPNet's auxiliary head on ``layer3``; its loss joins the main one with weight
``auxiliary_loss_weight`` (0.4, as in PSPNet) while training, and prediction uses the main head only.

``PSPNetCETrainer``
    The same with class-weighted cross entropy instead of the plans' loss: lesion voxels weighted by
    ``(1 − f) / f`` for the lesion fraction ``f`` of the fold's training cases (the CTP paper's weighted cross
    entropy). ``autoseg_predict -tr PSPNetTrainer PSPNetCETrainer`` averages both, the paper's final ensemble.

Pre-trained weights: ``options.pretrained`` (``autoseg_train --pretrained PATH``) names a torchvision ResNet
state dict (or an autoseg PSPNet one), loaded at the start of a new run; a continued run takes its weights from the checkpoint. Without one the network trains from scratch, and a ``new_layers`` stage then
freezes a randomly initialised backbone, as the plans ask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoseg.errors import DataError, MissingFileError, UsageError
from autoseg.plans import Loss, Stage
from autoseg.preprocess.cases import lesion_fraction
from autoseg.train.early_stopping import PLATEAU_FACTOR, PlateauStopping
from autoseg.train.losses import AuxiliaryLoss, balanced_positive_weight, build_loss
from trainers.base import Trainer

TRAINABLE = ("all", "new_layers")


class PSPNetTrainer(Trainer):
    """PSPNet, RMSProp, frozen-backbone then full fine-tuning, lr ÷10 on a Dice plateau, early stopping."""

    #: Weight of the auxiliary head's loss (PSPNet: 0.4); 0 builds the network without the auxiliary head.
    auxiliary_loss_weight: float = 0.4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._weights_note = ""
        self.plateau = PlateauStopping(self.configuration.schedule)
        self.handlers.append(self.plateau)

    # ------------------------------------------------------------------ hooks
    @classmethod
    def network_options(cls) -> dict[str, Any]:
        """The auxiliary head on ``layer3`` when its loss has a weight (its weights are in the checkpoints)."""
        return {"auxiliary_head": cls.auxiliary_loss_weight > 0}

    def build_network(self) -> nn.Module:
        network = self.configuration.network
        if network.architecture != "PSPNet":
            raise UsageError(
                f"{type(self).__name__} trains a PSPNet; configuration '{self.configuration.name}' asks "
                f"for {network.architecture}"
            )
        unknown = [s.name for s in self.configuration.schedule.stages if s.trainable not in TRAINABLE]
        if unknown:
            raise UsageError(f"stages {unknown}: trainable must be one of {list(TRAINABLE)}")
        net = super().build_network()
        if self.options.continue_training:  # the weights come from a checkpoint: the pre-trained file is not read
            self._weights_note = "weights: from the checkpoint"
        elif self.options.initial_weights is not None:  # --init-from gives every weight (the line above says whose)
            self._weights_note = "backbone: no pre-trained file read (--init-from gives every weight)"
        elif path := self.pretrained_path():
            self._weights_note = str(net.load_pretrained(path))
        else:
            self._weights_note = "weights: training from scratch (no pre-trained backbone given)"
        return net

    def build_loss(self) -> nn.Module:
        """``self.loss_settings`` on the main head, plus the auxiliary head's times its weight."""
        loss = build_loss(self.loss_settings)
        return AuxiliaryLoss(loss, self.auxiliary_loss_weight) if self.auxiliary_loss_weight > 0 else loss

    def pretrained_path(self) -> str | None:
        """The weights to start from: ``--pretrained``, else the plans' ``network.pretrained`` (a relative path
        there is read from the folder of ``plans.json``), else None."""
        if self.options.pretrained:
            return self.options.pretrained
        planned = self.configuration.network.pretrained
        if not planned:
            return None
        path = self.preprocessed_folder / planned  # an absolute path stays itself
        if not path.is_file():
            raise MissingFileError(
                f"{self.preprocessed_folder / 'plans.json'}: configurations.{self.configuration.name}"
                f".network.pretrained names {planned}, which is not a file"
            )
        return str(path)

    def setup(self) -> PSPNetTrainer:
        super().setup()
        self.log(self._weights_note)
        if self.auxiliary_loss_weight > 0:
            self.log(
                f"auxiliary head on layer3: its loss joins the main one with weight {self.auxiliary_loss_weight:g} "
                "while training; prediction uses the main head"
            )
        return self

    def build_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """RMSProp over the stage's trainable parameters; a ``new_layers`` stage freezes the backbone first."""
        frozen = stage.trainable == "new_layers"
        self.network.freeze_backbone(frozen)
        parameters = self.network.new_layer_parameters() if frozen else self.network.parameters()
        return torch.optim.RMSprop(list(parameters), lr=stage.learning_rate, weight_decay=self.settings.weight_decay)

    def learning_rate(self, epoch: int, iteration: int) -> float:
        """The stage's learning rate divided by 10 per plateau reduction so far in the stage."""
        stage = self.configuration.schedule.stages[self.run_length.stage_at(epoch)]
        return stage.learning_rate * self.plateau.factor

    def schedule_description(self) -> dict[str, Any]:
        return {
            "name": "plateau",
            "optimizer": "rmsprop",
            "factor": PLATEAU_FACTOR,
            "patience_epochs": self.plateau.patience("plateau_patience_epochs", self.run_length.epochs),
            "early_stopping_epochs": self.plateau.patience("early_stopping_patience_epochs", self.run_length.epochs),
        }


class PSPNetCETrainer(PSPNetTrainer):
    """``PSPNetTrainer`` with class-weighted cross entropy: lesion voxels weighted by ``(1 − f) / f``, ``f`` the
    lesion fraction of the fold's training cases (``autoseg.train.losses.balanced_positive_weight``)."""

    def loss_spec(self) -> Loss:
        fraction = lesion_fraction(self.data_folder, self.train_cases)
        if not 0 < fraction < 1:
            raise DataError(
                f"{self.data_folder}: the training cases of fold {self.fold} have a lesion fraction of "
                f"{fraction:g}; a class-weighted cross entropy needs both lesion and background"
            )
        weight = balanced_positive_weight(fraction)
        self._weights_note += (
            f"\nloss: class-weighted cross entropy instead of the plans' {self.configuration.loss.name}"
            f"; lesion weight {weight:.3g} = (1 - f) / f for the lesion fraction f = {fraction:.5f} "
            f"of the {len(self.train_cases)} training cases"
        )
        return Loss(name="weighted_ce", positive_weight=weight)
