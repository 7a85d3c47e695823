"""The run flags of a training (:class:`TrainingOptions`) and the fold it trains (:data:`Fold`,
:func:`parse_fold`): what the library (``autoseg.api.train``, ``autoseg.api.pretrain``) and every trainer share.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoseg.errors import UsageError
from autoseg.machine import PRECISIONS
from autoseg.train.transfer import InitialWeights

__all__ = ["Fold", "TrainingOptions", "parse_fold"]

Fold = int | str
"""A fold index 0..n-1 of ``splits_final.json``, or ``"full"`` (train and validate on every case: a final model
after cross-validation). ``-f all`` on the command line means every fold in turn (:func:`autoseg.api.train.cross_validate`)."""


@dataclass(frozen=True)
class TrainingOptions:
    """How to run a training (flags, never written into the plans).

    Args:
        epochs: override the plans' number of epochs (stage start epochs scale with it, ``autoseg.train.run_length.RunLength``).
        iterations_per_epoch: override the plans' training iterations per epoch.
        val_iterations: validation batches per epoch for the pseudo-Dice; default a fifth of the training
            iterations (50 for nnU-Net's 250); 0 switches the per-epoch validation (and checkpoint_best) off.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (see :func:`autoseg.machine.choose_precision`), ``fp32``, ``bf16`` or ``fp16``.
        seed: fixes the network initialization and every batch (with ``num_processes``).
        num_processes: background processes that make the training batches (0: in the training process); None:
            the plans' compute-budget choice when the run is on the device it was planned for, else 2.
        continue_training: resume from ``checkpoint_latest.pth`` (``--continue``); without one (no epoch
            completed) the run starts afresh and its log says so.
        pretrained: torchvision-layout ResNet (or autoseg PSPNet) state dict the PSPNet starts from
            (``--pretrained``); read with ``weights_only=True``; ignored when continuing.
        init_from: a trained model to start the network from (``--init-from MODEL``: a model file from
            ``autoseg_export`` or a trained dataset's name; ``autoseg.train.transfer``); ignored when continuing.
        init_fold: the model's fold that starts every fold (``--init-fold K``); None: fold k from the model's fold
            k, else its ``fold_full``, else its first fold (:func:`autoseg.train.transfer.choose_initial_weights`).
        initial_weights: ``init_from`` found, for this run's fold (set by ``autoseg.api.train.prepare_run``; the
            trainer loads it).
        validation: predict the fold's validation cases with sliding-window inference at the end.
        compile: run the network through ``torch.compile``.
        deterministic: ``torch.use_deterministic_algorithms`` (and no cuDNN benchmarking) during the run, and on the
            CPU a fixed thread count (no ``autoseg.train.threads`` check).
        echo: print the log lines as well as writing them to ``log.txt``.
    """

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations: int | None = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    num_processes: int | None = None
    pretrained: str | None = None
    init_from: str | None = None
    init_fold: str | None = None
    initial_weights: InitialWeights | None = None
    continue_training: bool = False
    validation: bool = True
    compile: bool = False
    deterministic: bool = False
    echo: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.val_iterations is not None and self.val_iterations < 0:
            raise UsageError(f"val_iterations must be >= 0, got {self.val_iterations}")
        if self.num_processes is not None and self.num_processes < 0:
            raise UsageError(f"the number of data processes must be >= 0, got {self.num_processes}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{self.precision}', use one of {list(PRECISIONS)}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"unknown device '{self.device}', use auto, cpu, cuda or cuda:N")
        if self.init_from is not None and self.pretrained is not None:
            raise UsageError("--init-from and --pretrained both start the network from weights; give one")
        if self.init_fold is not None and self.init_from is None:
            raise UsageError("--init-fold chooses a fold of the model --init-from names; give --init-from too")


def parse_fold(fold: Fold) -> Fold:
    """``0``, ``"3"`` -> int; ``"full"`` stays; anything else is a ValueError."""
    if isinstance(fold, str) and fold != "full":
        if not fold.lstrip("-").isdigit():
            raise UsageError(f"fold must be a number, 'all' or 'full', got '{fold}'")
        fold = int(fold)
    return fold
