"""The acute stroke paper's training recipe (Clèrigues et al., paper 001, sections 3.2–3.5) as a trainer.

``AcuteStrokeTrainer``
    Trains on a U-Net configuration of the plans (``3d_resunet``; ``autoseg_train -tr AcuteStrokeTrainer``) with:

    - the network: :class:`~autoseg.networks.AsymmetricResidualUNet` (about 75% of the parameters in the encoder,
      PReLU, max-pooling concatenated with a strided convolution for downsampling), built by this trainer from the
      plans' numbers: ``network.features`` (widths), ``network.strides`` and ``network.kernel_sizes`` per stage, the
      plans' channels and labels. The plans' ``network.architecture`` stays ``ResidualUNet``: the network choice
      lives in the trainer, so one configuration (one preprocessed copy of the data, one patch and batch) serves
      this recipe and the residual U-Net trainers alike, and cross-validation can compare them trainer against
      trainer. No deep supervision (the paper has none; ``network.deep_supervision`` is ignored).
    - focal loss with γ = 2 and α from the plans' ``loss.focal_alpha`` (the weight of the lesion class), instead
      of the plans' loss;
    - Adadelta (ρ = 0.9, ε = 1e-6, rate 1, no weight decay): the paper chose it so that no learning rate needs
      tuning, so the plans' stage learning rates are not used; stages still change patch and batch;
    - balanced sampling: half of every batch centred on a lesion voxel (``sampling.foreground_oversampling`` 0.5),
      shifted by up to ``sampling.max_offset_fraction`` of the patch (the plans'; half a patch as planned), the
      other half placed at random (mostly healthy tissue, as the paper's healthy-centred half);
    - early stopping: training ends after ``schedule.early_stopping_patience_epochs`` epochs without a better
      moving-average validation pseudo-Dice (scaled with ``--epochs``); where the plans give none, a tenth of the
      run's epochs, at least the paper's 8 (its epochs were passes over some 10,000 patches per case, far longer
      than autoseg's); counted by ``autoseg.train.early_stopping.PlateauStopping``, a handler attached to the loop (its
      counters stored in checkpoints);
    - dense-overlap inference: the end-of-fold validation and ``autoseg_predict`` use the plans'
      ``sliding_window_step`` (the paper steps 4x4x1 voxels on 24x24x16 patches, about a sixth of a patch; lower
      the plans' value for that density).

    The plans' compute-budget time estimate describes the residual U-Net the plan was fitted with, not this
    network, so the trainer skips the time check (``TrainerSettings.time_check``) and logs that it does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from autoseg.errors import UsageError
from autoseg.plans import Loss, Sampling, Stage
from autoseg.train.early_stopping import PlateauStopping
from autoseg.train.losses import describe_loss
from trainers.base import Trainer, TrainerSettings

#: Adadelta's rate: a scale on its own adaptive step, 1 as Zeiler proposed (no rate to tune, the paper's reason).
ADADELTA_LR = 1.0
ADADELTA_RHO = 0.9
ADADELTA_EPS = 1e-6
#: Focal loss exponent γ (the paper, after Lin et al.).
FOCAL_GAMMA = 2.0
#: Share of lesion-centred patches per batch: balanced 50/50 sampling.
BALANCED_SHARE = 0.5
#: Early-stopping patience where the plans give none: this share of the run's epochs...
PATIENCE_SHARE = 0.1
#: ...and at least the paper's 8 epochs.
PAPER_PATIENCE_EPOCHS = 8


def paper_patience(epochs: int) -> int:
    """Early-stopping patience of a run of ``epochs`` where the plans set none: a tenth of the epochs, at least the
    paper's 8."""
    return max(PAPER_PATIENCE_EPOCHS, round(PATIENCE_SHARE * epochs))


class AcuteStrokeTrainer(Trainer):
    """Asymmetric residual U-Net, focal loss, Adadelta, balanced sampling, early stopping (see the module docstring).

    Raises (from :meth:`build_network`):
        ValueError: a configuration whose network is not a U-Net (e.g. ``2d_pspnet``), or whose stages ask to freeze a
            pre-trained backbone.
    """

    settings = TrainerSettings(weight_decay=0.0, time_check=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plateau = PlateauStopping(self.configuration.schedule, default_stop_patience=paper_patience)
        self.handlers.append(self.plateau)

    # ------------------------------------------------------------------ hooks
    @classmethod
    def network_options(cls) -> dict[str, Any]:
        """The asymmetric residual U-Net, built from a ``ResidualUNet`` plan's numbers."""
        return {"network_class": "AsymmetricResidualUNet"}

    def build_network(self) -> nn.Module:
        """The asymmetric residual U-Net from the plans' per-stage numbers (features, strides, kernel sizes)."""
        network = self.configuration.network
        if network.architecture != "ResidualUNet":
            raise UsageError(
                f"{type(self).__name__} builds its U-Net from a ResidualUNet configuration's numbers; "
                f"configuration '{self.configuration.name}' plans a {network.architecture}"
            )
        frozen = [s.name for s in self.configuration.schedule.stages if s.trainable != "all"]
        if frozen:
            raise UsageError(f"{type(self).__name__} trains every layer; stages {frozen} ask to freeze a backbone")
        return super().build_network()

    @property
    def deep_supervision_levels(self) -> int:
        return 1

    def loss_spec(self) -> Loss:
        """Focal loss alone, γ = 2, α = the plans' ``loss.focal_alpha``."""
        return Loss(
            name="focal",
            dice_weight=0.0,
            bce_weight=0.0,
            focal_weight=1.0,
            focal_gamma=FOCAL_GAMMA,
            focal_alpha=self.configuration.loss.focal_alpha,
        )

    def sampling_spec(self) -> Sampling:
        """The plans' sampling with half of every batch lesion-centred."""
        return dataclasses.replace(self.configuration.sampling, foreground_oversampling=BALANCED_SHARE)

    def build_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        return torch.optim.Adadelta(
            self.network.parameters(),
            lr=ADADELTA_LR,
            rho=ADADELTA_RHO,
            eps=ADADELTA_EPS,
            weight_decay=self.settings.weight_decay,
        )

    def learning_rate(self, epoch: int, iteration: int) -> float:
        """Adadelta's rate 1 in every stage (÷10 per plateau reduction where the plans set a plateau patience)."""
        return ADADELTA_LR * self.plateau.factor

    def schedule_description(self) -> dict[str, Any]:
        return {
            "name": "adadelta",
            "optimizer": "adadelta",
            "learning_rate": ADADELTA_LR,
            "rho": ADADELTA_RHO,
            "early_stopping_epochs": self.plateau.patience("early_stopping_patience_epochs", self.run_length.epochs),
        }

    def setup(self) -> AcuteStrokeTrainer:
        super().setup()
        split = self.network.parameter_split()
        self.log(
            f"acute stroke recipe: AsymmetricResidualUNet built from the plans' numbers ({split[0]:,} encoder + "
            f"{split[1]:,} decoder parameters, {split[0] / sum(split):.0%} in the encoder); loss "
            f"{describe_loss(self.loss_settings)}; Adadelta; {BALANCED_SHARE:.0%} of each batch lesion-centred "
            f"(offset up to {self.sampling_spec().max_offset_fraction:g} of a patch); early stopping after "
            f"{self.plateau.patience('early_stopping_patience_epochs', self.run_length.epochs)} epochs without gain; "
            "inference windows at most "
            f"{self.configuration.sliding_window_step:g} of a patch apart (plans' sliding_window_step)"
        )
        budget = self.plans.compute_budget
        if budget is not None and self.configuration.name in budget.estimates:
            self.log(
                "time check skipped: the plans' compute-budget estimate describes the residual U-Net the plan "
                "was fitted with, not this network"
            )
        return self
