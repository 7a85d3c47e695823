"""Trainers of the residual 3D U-Net (``autoseg.networks.ResidualUNet``).

``ResidualUNetTrainer``
    nnU-Net's default: SGD with Nesterov momentum 0.99, weight decay 3e-5, the stage's learning rate decayed
    polynomially (exponent 0.9) to 0 over the stage (over the whole run for a one-stage plan, as in nnU-Net).

``ZoomInOutTrainer``
    The chronic stroke paper's zoom-in&out strategy: stage 1 (``zoom_in``) on small patches, stage 2
    (``zoom_out``) from stage 1's weights on the full patch at the stage's lower learning rate; Adam with cosine
    annealing and warm restarts (restart period from the plans), and snapshots at 1/3, 2/3 and the end of the
    last stage (the paper's snapshot ensemble: the 50th, 100th and 150th zoom-out epoch of 150).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from autoseg.errors import UsageError
from autoseg.plans import Stage
from trainers.base import Trainer, TrainerSettings


class ResidualUNetTrainer(Trainer):
    """Residual U-Net, SGD (Nesterov, momentum 0.99, weight decay 3e-5), polynomial decay per stage."""

    def build_network(self) -> nn.Module:
        network = self.configuration.network
        if network.architecture != "ResidualUNet":
            raise UsageError(
                f"{type(self).__name__} trains a ResidualUNet; configuration '{self.configuration.name}' "
                f"asks for {network.architecture}"
            )
        frozen = [s.name for s in self.configuration.schedule.stages if s.trainable != "all"]
        if frozen:
            raise UsageError(
                f"{type(self).__name__} trains every layer; stages {frozen} ask to freeze a pre-trained "
                "backbone the residual U-Net does not have"
            )
        return super().build_network()

    def build_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.network.parameters(),
            lr=stage.learning_rate,
            momentum=self.settings.momentum,
            nesterov=True,
            weight_decay=self.settings.weight_decay,
        )

    def learning_rate(self, epoch: int, iteration: int) -> float:
        """``lr_stage · (1 − (epoch − start) / (end − start))^0.9``, constant within an epoch (nnU-Net)."""
        index = self.run_length.stage_at(epoch)
        start, end = self.run_length.stage_starts[index], self.run_length.stage_end(index)
        progress = (epoch - start) / (end - start)
        return self.configuration.schedule.stages[index].learning_rate * (1 - progress) ** self.settings.poly_exponent

    def schedule_description(self) -> dict[str, Any]:
        return {"name": "poly", "exponent": self.settings.poly_exponent, "optimizer": "sgd"}


class ZoomInOutTrainer(ResidualUNetTrainer):
    """Zoom-in&out: small patches, then the full patch from those weights; Adam with cosine warm restarts."""

    settings = TrainerSettings(snapshot_fractions=(1 / 3, 2 / 3, 1.0))

    def build_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.network.parameters(), lr=stage.learning_rate, weight_decay=self.settings.weight_decay
        )

    def learning_rate(self, epoch: int, iteration: int) -> float:
        """SGDR within each stage: ``lr_stage · (1 + cos(π · t / T)) / 2`` with ``t`` the epochs (fractional, per
        iteration) since the stage began or the last restart and ``T`` the restart period (the stage's length
        when the plans give none)."""
        index = self.run_length.stage_at(epoch)
        start, end = self.run_length.stage_starts[index], self.run_length.stage_end(index)
        period = self.run_length.restart_period_epochs or (end - start)
        elapsed = (epoch - start + iteration / self.run_length.iterations_at(epoch)) % period
        return self.configuration.schedule.stages[index].learning_rate * (1 + math.cos(math.pi * elapsed / period)) / 2

    def schedule_description(self) -> dict[str, Any]:
        return {
            "name": "cosine_warm_restarts",
            "restart_period_epochs": self.run_length.restart_period_epochs,
            "optimizer": "adam",
        }
