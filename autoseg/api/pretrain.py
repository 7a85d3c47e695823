"""Pre-train a PSPNet's ResNet backbone on the 2-D slices of a planned 3-D dataset, and export it.

The CTP paper fine-tuned a backbone pre-trained on natural images. Where such weights cannot be had (no internet,
or a wish to start from brain images instead), ``autoseg_pretrain`` trains a whole PSPNet on the slices of
another planned dataset, e.g. the axial slices of an ATLAS-like T1w dataset, and writes its ResNet in torchvision's
layout, which ``autoseg_train --pretrained FILE`` loads into any PSPNet of the same backbone, whatever its input
channels (the initializer in front of the backbone is trained anew).

How: the dataset's 3-D configuration (default: the plans' default) lends its preprocessed data; a 2-D
configuration ``2d_pspnet_pretraining`` is derived from it (whole slices along ``slice_axis``, patch the median
slice rounded up to a multiple of 8, batch 8, every layer trainable from the start), and ``PSPNetTrainer`` trains
it on every case (fold ``full``) under ``AUTOSEG_RESULTS/<dataset>/2d_pspnet_pretraining/PSPNetTrainer/fold_full``
with the usual log, progress plot, checkpoints and ``--continue``. The backbone of the final weights is then
written to the output file atomically. The derived plans are kept in that run folder (``plans.json``); the
dataset's own plans are not touched.

Example:
    >>> path = pretrain_backbone("ATLAS2mm", "resnet18_atlas_axial.pth", epochs=10, iterations_per_epoch=50)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from autoseg.api.train import TrainingOptions
from autoseg.data.dataset import find_dataset
from autoseg.errors import ExistingOutputError, UsageError
from autoseg.io.checkpoints import save_checkpoint
from autoseg.io.files import check_output_file
from autoseg.networks.pspnet import RESNET_LAYOUTS
from autoseg.paths import PLANS_FILE, preprocessed_folder, run_folder
from autoseg.plan.topology import round_to_multiple
from autoseg.plans import Configuration, Network, Plans, Schedule, Stage
from autoseg.registry import plugin_class

CONFIGURATION = "2d_pspnet_pretraining"
#: Every layer trains from the first iteration, at RMSProp's usual rate for training from scratch.
LEARNING_RATE = 1e-3
BATCH_SIZE = 8


@dataclass(frozen=True)
class PretrainingResult:
    """Where the weights went and how they were made.

    Attributes:
        weights: the exported backbone (torchvision ResNet layout, ``fc`` absent).
        run_folder: the training run (log.txt, progress.png, checkpoints, plans.json).
        epochs: epochs trained.
        tensors: number of tensors exported.
    """

    weights: Path
    run_folder: Path
    epochs: int
    tensors: int


def slice_configuration(
    source: Configuration, *, backbone: str, slice_axis: int, epochs: int, iterations_per_epoch: int
) -> Configuration:
    """A 2-D PSPNet configuration that trains on whole slices of ``source``'s preprocessed data.

    Args:
        source: a 3-D configuration of the dataset's plans (its data, spacing, normalization, loss and sampling
            are kept).
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``.
        slice_axis: the axis of the (x, y, z) arrays the slices are perpendicular to (2: axial, since every case
            is preprocessed in the canonical RAS orientation, see ``autoseg.io.images``).
        epochs, iterations_per_epoch: the schedule's length.

    Raises:
        ValueError: ``source`` is not 3-D, an unknown backbone, or a slice axis outside 0-2.
    """
    if source.dimension != 3:
        raise UsageError(f"configuration '{source.name}' is {source.dimension}-D; pre-training slices a 3-D one")
    if backbone not in RESNET_LAYOUTS:
        raise UsageError(f"unknown backbone '{backbone}'; use one of {sorted(RESNET_LAYOUTS)}")
    if slice_axis not in (0, 1, 2):
        raise UsageError(f"slice_axis must be 0, 1 or 2 (an axis of the x, y, z array), got {slice_axis}")
    in_plane = tuple(source.median_shape[a] for a in range(3) if a != slice_axis)
    patch = round_to_multiple(in_plane, (8, 8))
    stage = Stage(
        name="all_layers",
        start_epoch=0,
        patch_size=patch,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        trainable="all",
    )
    return replace(
        source,
        name=CONFIGURATION,
        dimension=2,
        patch_size=patch,
        batch_size=BATCH_SIZE,
        network=Network(
            architecture="PSPNet", deep_supervision=False, backbone=backbone, output_stride=8, pyramid_bins=(1, 2, 3, 6)
        ),
        schedule=Schedule(
            trainer="PSPNetTrainer", epochs=epochs, iterations_per_epoch=iterations_per_epoch, stages=(stage,)
        ),
        mirror_axes=(0, 1),
        slice_axis=slice_axis,
        reasons={
            "purpose": f"pre-training a {backbone} backbone on the slices across axis {slice_axis} of "
            f"'{source.name}' (autoseg_pretrain)",
            "patch_size": f"the whole median slice {list(in_plane)} rounded up to a multiple of 8",
            "schedule": f"RMSProp at lr {LEARNING_RATE:g}, every layer trained from the start",
        },
    )


def backbone_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The PSPNet's ResNet tensors under torchvision's names (``conv1.weight``, ``layer1.0.bn1.running_mean``,
    ...), on the CPU."""
    return {name: tensor.detach().cpu().clone() for name, tensor in network.backbone.state_dict().items()}


def pretrain_backbone(
    dataset: str,
    output: str | Path,
    *,
    backbone: str = "resnet18",
    configuration: str | None = None,
    slice_axis: int = 2,
    epochs: int = 10,
    iterations_per_epoch: int = 50,
    options: TrainingOptions | None = None,
) -> PretrainingResult:
    """Train a PSPNet on the slices of a planned dataset and write its backbone to ``output``.

    Args:
        dataset: name, number or folder of a raw dataset planned and preprocessed with ``autoseg_plan``.
        output: the weights file to write (torchvision ResNet layout; for ``autoseg_train --pretrained``).
        backbone: ``resnet18`` (default), ``resnet34`` or ``resnet50``; the PSPNet to fine-tune later must
            use the same.
        configuration: the 3-D configuration whose preprocessed data is sliced (default: the plans' default).
        slice_axis: see :func:`slice_configuration` (default 2, axial).
        epochs, iterations_per_epoch: length of the training (``options`` may not override them).
        options: seed, device, data processes, ``continue_training``, ... (``val_iterations`` defaults to 0:
            every case is a training case here, so there is nothing held out to validate on).

    Returns:
        :class:`PretrainingResult`.

    Raises:
        DatasetError, PlansError: no such dataset, or not planned.
        ValueError: see :func:`slice_configuration`; ``output`` exists and the run is not continued.
    """
    output = Path(output)
    options = options or TrainingOptions()
    options = replace(
        options,
        epochs=None,
        iterations_per_epoch=None,
        validation=False,
        val_iterations=0 if options.val_iterations is None else options.val_iterations,
    )
    if output.exists() and not options.continue_training:
        raise ExistingOutputError(f"{output} exists; choose another output file or delete it")
    check_output_file(output, "backbone file")  # before the training, not after it
    raw = find_dataset(dataset)
    preprocessed = preprocessed_folder(raw.name)
    plans = Plans.from_json(preprocessed / PLANS_FILE)
    derived = slice_configuration(
        plans.configuration(configuration),
        backbone=backbone,
        slice_axis=slice_axis,
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
    )
    problems = derived.problems(len(plans.channels))
    if problems:
        raise UsageError("the derived pre-training configuration is invalid: " + "; ".join(problems))
    slice_plans = replace(
        plans,
        configurations={CONFIGURATION: derived},
        default_configuration=CONFIGURATION,
        reasons={"default_configuration": derived.reasons["purpose"]},
    )
    trainer_class = plugin_class("trainer", "PSPNetTrainer")
    folder = run_folder(raw.name, CONFIGURATION, trainer_class.__name__, "full")
    trainer = trainer_class(
        slice_plans,
        CONFIGURATION,
        "full",
        preprocessed_folder=preprocessed,
        output_folder=folder,
        options=options,
        raw_dataset=raw,
    )
    trainer.setup()
    trainer.fit()
    state = backbone_state(trainer.network)
    save_checkpoint(state, output)
    trainer.log(f"backbone ({backbone}, {len(state)} tensors, torchvision layout) written to {output}")
    return PretrainingResult(output, folder, trainer.epoch, len(state))
