"""Thin slabs in ``DefaultPlanner``: ``3d_aniso`` (a U-Net that never pools the thick axis) and ``2d_pspnet`` (whole
slices, a pre-trained backbone; the CTP paper's winner). Both share their preprocessed data (:func:`slab_identifier`).

Functions that take the planner whose decisions they read, as in :mod:`planners.resunet`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from autoseg.networks import PSPNet, Shape, on_meta
from autoseg.plan.topology import largest_batch, round_to_multiple
from autoseg.plans import Configuration, Loss, Network, Schedule, Stage, Symmetry, input_channels
from autoseg.train.losses import balanced_positive_weight
from planners.resunet import (
    BYTES_PER_ACTIVATION,
    GIB,
    fit_batch,
    fit_unet_patch,
    topology_reason,
    unet_memory,
    unet_network,
)

if TYPE_CHECKING:
    from planners.default import DefaultPlanner

#: PSPNet backbones to try, largest first: the first that fits the memory budget at batch 2 is planned.
PSPNET_BACKBONES = ("resnet50", "resnet34", "resnet18")
#: The CTP paper's best loss: focal with γ=1 (α=0.75 for lesion); its ``positive_weight`` comes from the data.
PSPNET_LOSS = Loss(name="focal", dice_weight=0.0, bce_weight=0.0, focal_weight=1.0, focal_gamma=1.0, focal_alpha=0.75)


def plan_aniso(
    planner: DefaultPlanner,
    spacing,
    spacing_reason,
    normalization,
    widths: tuple[int, int] | None = None,
    patch: tuple[int, ...] | None = None,
    batch: int | None = None,
) -> Configuration:
    """3D U-Net with 2x2x1 pooling: the CTP paper's 3D comparison for thin slabs (``widths``, ``patch`` and
    ``batch`` as for :func:`planners.resunet.plan_resunet`)."""
    widths = widths or planner.widths
    full = planner.median_shape(spacing)
    coarse = int(np.argmax(spacing))
    memory_of = unet_memory(planner)
    patch, topology, needed = fit_unet_patch(planner, full, spacing, memory_of, widths, patch, (coarse,))
    batch = batch or fit_batch(planner, patch, topology, spacing, memory_of)
    common, reasons = planner.common(spacing, float(np.prod(patch) * np.prod(spacing)))
    in_plane = [a for a in range(3) if a != coarse]
    reasons.update(
        {
            "target_spacing": spacing_reason,
            "patch_size": f"the whole median slab {list(full)} where it fits {planner.memory_budget_gb:g} GB at batch 2 "
            f"(estimated {needed / GIB:.2f} GB); slabs with fewer slices are padded",
            "batch_size": f"as many slabs as fit the memory budget, at least 2: {batch}",
            "network": f"pooling 2x2x1: axis {coarse} is never downsampled (the CTP paper's 3D comparison); "
            + topology_reason(planner, topology, spacing, widths),
            "normalization": "; ".join(reason for _, reason in normalization),
            "mirror_axes": f"in-plane axes {in_plane} only: slabs are not symmetric along the slice axis",
            "schedule": "SGD with Nesterov momentum and polynomial decay (nnU-Net's default) from lr 1e-2",
        }
    )
    return planner.configuration(
        "3d_aniso",
        normalization,
        reasons,
        dimension=3,
        target_spacing=spacing,
        median_shape=full,
        patch_size=patch,
        batch_size=batch,
        network=unet_network(topology, planner.unet_layout),
        schedule=Schedule(
            trainer="ResidualUNetTrainer",
            epochs=planner.epochs,
            iterations_per_epoch=planner.iterations_per_epoch,
            stages=(Stage(name="full", start_epoch=0, patch_size=patch, batch_size=batch, learning_rate=1e-2),),
        ),
        mirror_axes=tuple(in_plane),
        estimated_memory_gb=round(memory_of(patch, topology, batch) / GIB, 3),
        data_identifier=slab_identifier(spacing),
        **common,
    )


def plan_pspnet(
    planner: DefaultPlanner, spacing, spacing_reason, normalization, symmetry: Symmetry | None = None
) -> Configuration:
    """2D PSPNet on whole slices, pre-trained backbone, two-phase fine-tuning (CTP paper); with ``symmetry``
    ``2d_pspnet_sym``, the same with symmetric-hemisphere channels (its own data folder)."""
    full = planner.median_shape(spacing)
    coarse = int(np.argmax(spacing))
    in_plane = tuple(full[a] for a in range(3) if a != coarse)
    patch = round_to_multiple(in_plane, (8, 8))
    in_channels = input_channels(len(planner.fingerprint.channels), symmetry)
    backbone, memory_of = pspnet_backbone(planner, patch, in_channels, planner.memory_budget_gb * GIB)
    one, two = memory_of(1), memory_of(2)
    # Batch 2 at least: the pyramid's 1x1 bin normalizes one value per channel and slice.
    batch = max(2, min(8, largest_batch(two - one, 2 * one - two, planner.memory_budget_gb * GIB)))
    phase_two = max(1, planner.pspnet_epochs // 10)
    patch_mm3 = float(np.prod(patch) * np.prod([spacing[a] for a in range(3) if a != coarse]) * spacing[coarse])
    common, reasons = planner.common(spacing, patch_mm3)
    common["loss"], loss_reason = _pspnet_loss(planner)
    reasons.update(
        {
            "target_spacing": spacing_reason,
            "slice_axis": f"axis {coarse} is the thick one: the network sees one whole slice at a time",
            "patch_size": f"the whole median slice {list(in_plane)} rounded up to a multiple of the output stride 8",
            "batch_size": f"{batch} slices: the CTP paper's 8 where {planner.memory_budget_gb:g} GB allows "
            f"(estimated {memory_of(batch) / GIB:.2f} GB)",
            **_pspnet_reasons(planner, backbone, in_channels, phase_two),
            "loss": loss_reason,
            "normalization": "; ".join(reason for _, reason in normalization),
            "mirror_axes": "both in-plane axes of the slice: lesions occur in either hemisphere",
            "schedule": f"RMSProp; epochs 0–{phase_two - 1} train only the new layers at lr 1e-2 with the backbone "
            "frozen, then everything at lr 1e-4; lr ÷10 after 20 epochs without a better validation "
            "Dice, early stop after 50 (CTP paper)",
        }
    )
    return planner.configuration(
        "2d_pspnet",
        normalization,
        reasons,
        symmetry,
        dimension=2,
        slice_axis=coarse,
        patch_size=patch,
        batch_size=batch,
        target_spacing=spacing,
        median_shape=full,
        network=Network(
            architecture="PSPNet", deep_supervision=False, backbone=backbone, output_stride=8, pyramid_bins=(1, 2, 3, 6)
        ),
        schedule=pspnet_schedule(planner, patch, batch, phase_two),
        mirror_axes=(0, 1),
        estimated_memory_gb=round(memory_of(batch) / GIB, 3),
        data_identifier=slab_identifier(spacing),
        **common,
    )


def _pspnet_loss(planner: DefaultPlanner) -> tuple[Loss, str]:
    """Focal loss with γ=1 (the CTP paper's best), with the lesion weight a weighted cross entropy would use."""
    fraction = float(planner.fingerprint.aggregate.median_lesion_fraction_of_foreground)
    lesion_weight = round(balanced_positive_weight(fraction), 3) if 0 < fraction < 1 else 1.0
    loss = dataclasses.replace(PSPNET_LOSS, positive_weight=lesion_weight)
    return loss, (
        "focal loss with γ=1 (the CTP paper's best, 0.54 vs 0.49 Dice for cross entropy); "
        f"positive_weight {lesion_weight:g} = (1 - f) / f for the median lesion fraction f = {fraction:.5f} "
        "of the brain is the lesion weight if the name is changed to weighted_ce (the trainer "
        "PSPNetCETrainer recomputes it from each fold's training cases)"
    )


def _pspnet_reasons(planner: DefaultPlanner, backbone: str, in_channels: int, phase_two: int) -> dict[str, str]:
    """The reasons for the PSPNet's network and its (absent) pre-trained weights."""
    return {
        "network": f"PSPNet with a {backbone} backbone, dilated to output stride 8, pyramid bins 1, 2, 3, 6; an "
        f"initializer (BatchNorm + 1x1 conv) maps the {in_channels} channels to the backbone's 3; the "
        f"largest backbone of {list(planner.pspnet_backbones)} that fits the memory budget at batch 2",
        "pretrained": "none: weights are never downloaded; put a local torchvision ResNet file here (or pass "
        "autoseg_train --pretrained), or make one with autoseg_pretrain; without it the PSPNet "
        "trains from scratch",
    }


def pspnet_backbone(
    planner: DefaultPlanner, patch: Shape, in_channels: int, memory_budget: float
) -> tuple[str, Callable[[int], int]]:
    """The largest of the planner's ``pspnet_backbones`` whose training fits ``memory_budget`` bytes at batch 2
    (else the last), and the estimated training memory in bytes as a function of the batch size, for slices of
    ``patch``."""
    num_classes = len(planner.fingerprint.labels) - 1
    for backbone in planner.pspnet_backbones:

        def memory_of(batch: int, backbone: str = backbone) -> int:
            network = on_meta(PSPNet, in_channels=in_channels, num_classes=num_classes, backbone=backbone)
            return network.training_memory_bytes(
                patch_size=patch, batch_size=batch, bytes_per_activation=BYTES_PER_ACTIVATION
            )

        if memory_of(2) <= memory_budget:
            break
    return backbone, memory_of


def pspnet_schedule(planner: DefaultPlanner, patch: Shape, batch: int, phase_two: int) -> Schedule:
    """The CTP paper's two phases: the new layers alone at lr 1e-2 with the backbone frozen, from epoch
    ``phase_two`` everything at lr 1e-4; lr ÷10 after a 20-epoch plateau, early stop after 50."""
    stage = {"patch_size": patch, "batch_size": batch}
    return Schedule(
        trainer="PSPNetTrainer",
        epochs=planner.pspnet_epochs,
        iterations_per_epoch=planner.iterations_per_epoch,
        stages=(
            Stage(name="new_layers", start_epoch=0, learning_rate=1e-2, trainable="new_layers", **stage),
            Stage(name="all_layers", start_epoch=phase_two, learning_rate=1e-4, trainable="all", **stage),
        ),
        plateau_patience_epochs=20,
        early_stopping_patience_epochs=50,
    )


def slab_identifier(spacing: tuple[float, ...]) -> str:
    """2d_pspnet and 3d_aniso share preprocessed data: same spacing, same normalization."""
    return "slabs_" + "x".join(f"{v:.2f}" for v in spacing) + "mm"
