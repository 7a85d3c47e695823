"""The 3D U-Net of ``DefaultPlanner``: ``3d_resunet`` (zoom-in&out) and the U-Net pieces ``3d_aniso`` shares.

Functions, not methods: each takes the planner whose decisions (widths, epochs, memory budget, the shared
loss/sampling/... of :meth:`DefaultPlanner.common`) it reads, so a subclass's class attributes and overrides apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from autoseg.networks import ResidualUNet, on_meta
from autoseg.plan.topology import (
    PLANNED_UNET_LAYOUT,
    UNET_LAYOUT_REASONS,
    Topology,
    fit_patch_to_memory_budget,
    largest_batch,
    round_to_multiple,
    unet_topology,
)
from autoseg.plans import Configuration, Network, Schedule, Stage, Symmetry, input_channels

if TYPE_CHECKING:
    from planners.default import DefaultPlanner

GIB = 1024**3
#: The batch may hold at most this share of all training voxels (nnU-Net's cap against overfitting).
MAX_BATCH_SHARE = 0.05
#: Bytes per stored activation in the memory estimate. Mixed precision keeps conv outputs in 2 bytes,
#: but autocast runs GroupNorm/BatchNorm in fp32, so the normalized copies take 4; 4 is the safe bound
#: until the estimate is calibrated on a GPU.
BYTES_PER_ACTIVATION = 4
#: Zoom-out (stage 2) starts after this share of the epochs (the paper: 1,200 + 150 epochs).
ZOOM_OUT_SHARE = 0.125

#: Estimated training memory in bytes of a U-Net of ``topology`` on ``patch`` at ``batch``.
MemoryOf = Callable[[tuple[int, ...], Topology, int], int]


def unet_memory(planner: DefaultPlanner, deep_supervision: bool = True, symmetry: Symmetry | None = None) -> MemoryOf:
    """The training memory (bytes) of the planner's residual U-Net, asked of the network built on the meta device."""
    in_channels = input_channels(len(planner.fingerprint.channels), symmetry)
    num_classes = len(planner.fingerprint.labels) - 1

    def memory_of(patch: tuple[int, ...], topology: Topology, batch: int) -> int:
        network = on_meta(
            ResidualUNet,
            in_channels=in_channels,
            num_classes=num_classes,
            features=topology.features,
            strides=topology.strides,
            kernel_sizes=topology.kernel_sizes,
            deep_supervision=deep_supervision,
            layout=planner.unet_layout,
        )
        return network.training_memory_bytes(
            patch_size=patch, batch_size=batch, bytes_per_activation=BYTES_PER_ACTIVATION
        )

    return memory_of


def batch_cap(planner: DefaultPlanner, patch: tuple[int, ...], spacing: tuple[float, ...]) -> int:
    """Largest batch that holds at most ``MAX_BATCH_SHARE`` of all training voxels."""
    total = np.prod(planner.median_shape(spacing)) * planner.fingerprint.aggregate.num_cases
    return max(2, int(MAX_BATCH_SHARE * total / np.prod(patch)))


def fit_batch(
    planner: DefaultPlanner, patch: tuple[int, ...], topology: Topology, spacing: tuple[float, ...], memory_of: MemoryOf
) -> int:
    """As many patches as fit the memory budget, at most :func:`batch_cap`."""
    one, two = memory_of(patch, topology, 1), memory_of(patch, topology, 2)
    memory_budget = planner.memory_budget_gb * GIB
    return min(largest_batch(two - one, 2 * one - two, memory_budget), batch_cap(planner, patch, spacing))


def fit_unet_patch(
    planner: DefaultPlanner,
    full: tuple[int, ...],
    spacing: tuple[float, ...],
    memory_of: MemoryOf,
    widths: tuple[int, int],
    patch: tuple[int, ...] | None = None,
    never_downsample: tuple[int, ...] = (),
    topology: Topology | None = None,
) -> tuple[tuple[int, ...], Topology, int]:
    """The patch, its topology and its training memory (bytes) at batch 2: without ``patch`` the largest that fits
    the memory budget (up to ``full``), else ``patch`` rounded up to a multiple of its topology's total stride.
    ``topology``: the network given as it is (``autoseg_plan --like``), not derived from the patch."""
    if patch is None:
        memory_budget = planner.memory_budget_gb * GIB
        return fit_patch_to_memory_budget(
            full,
            spacing,
            memory_of,
            memory_budget,
            2,
            never_downsample=never_downsample,
            widths=widths,
            topology=topology,
        )
    given = topology
    topology = given or unet_topology(patch, spacing, never_downsample, widths[1], widths[0])
    patch = round_to_multiple(patch, topology.total_stride)
    topology = given or unet_topology(patch, spacing, never_downsample, widths[1], widths[0])
    return patch, topology, memory_of(patch, topology, 2)


def unet_network(topology: Topology, layout: str) -> Network:
    """The plans' ``network`` of a residual U-Net of ``layout`` with deep supervision."""
    return Network(
        architecture="ResidualUNet",
        features=topology.features,
        strides=topology.strides,
        kernel_sizes=topology.kernel_sizes,
        deep_supervision=True,
        layout=layout,
    )


def plan_resunet(
    planner: DefaultPlanner,
    spacing,
    spacing_reason,
    normalization,
    widths: tuple[int, int] | None = None,
    patch: tuple[int, ...] | None = None,
    batch: int | None = None,
    symmetry: Symmetry | None = None,
    topology: Topology | None = None,
) -> Configuration:
    """3D residual U-Net with the zoom-in&out schedule when a half-volume patch is still sensible.

    Without ``patch``, the largest patch that fits the memory budget (up to the median volume); without
    ``batch``, as many samples as fit; ``widths`` (first-stage features, cap) default to the planner's.
    With ``symmetry``: ``3d_resunet_sym``, the same with symmetric-hemisphere channels (its own data folder).
    With ``topology``: that network for every patch (``autoseg_plan --like``: the model's), ``widths`` unused."""
    widths = widths or planner.widths
    full = planner.median_shape(spacing)
    memory_of = unet_memory(planner, symmetry=symmetry)
    given_patch, given_batch, fixed = patch is not None, batch is not None, topology
    patch, topology, needed = fit_unet_patch(planner, full, spacing, memory_of, widths, patch, topology=fixed)
    batch = batch or fit_batch(planner, patch, topology, spacing, memory_of)
    reasons = {
        "target_spacing": spacing_reason,
        "patch_size": _patch_reason(planner, full, patch, topology, needed, given_patch),
        "batch_size": _batch_reason(batch, given_batch),
        "network": topology_reason(planner, topology, spacing, widths),
    }
    stages, reasons["schedule"] = zoom_schedule(
        planner, patch, batch, topology, spacing, memory_of, widths, fixed_topology=fixed is not None
    )
    common, common_reasons = planner.common(spacing, float(np.prod(patch) * np.prod(spacing)))
    reasons.update(common_reasons)
    trainer = "ZoomInOutTrainer" if len(stages) == 2 else "ResidualUNetTrainer"
    reasons["normalization"] = "; ".join(reason for _, reason in normalization)
    reasons["mirror_axes"] = "all three axes: lesions occur in either hemisphere and at any position"
    return planner.configuration(
        "3d_resunet",
        normalization,
        reasons,
        symmetry,
        data_identifier=resunet_identifier(planner, spacing),
        network=unet_network(topology, planner.unet_layout),
        dimension=3,
        target_spacing=spacing,
        median_shape=full,
        patch_size=patch,
        batch_size=batch,
        schedule=Schedule(
            trainer=trainer,
            epochs=planner.epochs,
            iterations_per_epoch=planner.iterations_per_epoch,
            stages=stages,
            restart_period_epochs=50 if len(stages) == 2 else None,
        ),
        mirror_axes=(0, 1, 2),
        estimated_memory_gb=round(memory_of(patch, topology, batch) / GIB, 3),
        **common,
    )


def _batch_reason(batch: int, given: bool) -> str:
    if not given:
        return (
            f"as many patches as fit the memory budget, at least 2 and at most {MAX_BATCH_SHARE:.0%} of all "
            f"training voxels: {batch}"
        )
    return f"{batch} patches: a compute-budget candidate, where time buys iterations rather than larger batches"


def _patch_reason(planner: DefaultPlanner, full, patch, topology: Topology, needed: int, given: bool) -> str:
    coverage = float(np.prod(patch) / np.prod(full))
    if given:
        return (
            f"{list(patch)}: a candidate of the compute budget (see reasons.compute_budget), covering "
            f"{coverage:.0%} of the median cropped volume {list(full)}; memory estimate "
            f"{needed / GIB:.2f} GB at batch 2"
        )
    estimate = f"estimated {needed / GIB:.2f} GB of {planner.memory_budget_gb:g} GB at batch 2"
    if coverage >= 1:
        return (
            f"the whole median cropped volume {list(full)} fits ({estimate}); edges rounded up to multiples "
            f"of the total stride {list(topology.total_stride)}, the rest is padding"
        )
    return (
        f"the largest patch that fits ({estimate}), shrunk from the median cropped volume {list(full)} "
        f"along its longest edge in mm: it covers {coverage:.0%} of it; edges are multiples of the total "
        f"stride {list(topology.total_stride)}"
    )


def resunet_identifier(planner: DefaultPlanner, spacing: tuple[float, ...]) -> str:
    """``3d_resunet`` at the planned spacing; a compute budget that lowers the resolution gets its own data folder."""
    if planner.compute is None or tuple(spacing) == planner.target_spacing(planner.fingerprint.aggregate)[0]:
        return "3d_resunet"
    return "3d_resunet_" + "x".join(f"{v:g}" for v in spacing) + "mm"


def zoom_schedule(
    planner: DefaultPlanner,
    patch,
    batch,
    topology,
    spacing,
    memory_of: MemoryOf,
    widths: tuple[int, int] | None = None,
    fixed_topology: bool = False,
) -> tuple[tuple[Stage, ...], str]:
    """Stage 1 on half-volume patches at lr 1e-3, stage 2 on the full patch at 1e-4 (the paper's
    24% -> 48% sub-volumes, 128³ -> 144x172x168 mm). ``fixed_topology``: ``topology`` is given (not derived from
    the patch), so the small patch's batch is fitted with it too."""
    small = round_to_multiple(tuple(p * 0.5 ** (1 / 3) for p in patch), topology.total_stride, mode="nearest")
    sensible = all(s >= 2 * t for s, t in zip(small, topology.total_stride)) and np.prod(small) < np.prod(patch)
    if not sensible:
        return (Stage(name="full", start_epoch=0, patch_size=patch, batch_size=batch, learning_rate=1e-2),), (
            f"patch {list(patch)} is too small to halve (edges must stay >= twice the total stride): one stage, "
            "SGD with polynomial decay (nnU-Net's default)"
        )
    widths = widths or planner.widths
    small_topology = (
        topology if fixed_topology else unet_topology(small, spacing, max_features=widths[1], base_features=widths[0])
    )
    small_batch = fit_batch(planner, small, small_topology, spacing, memory_of)
    switch = int(round(planner.epochs * (1 - ZOOM_OUT_SHARE)))
    stages = (
        Stage(name="zoom_in", start_epoch=0, patch_size=small, batch_size=small_batch, learning_rate=1e-3),
        Stage(name="zoom_out", start_epoch=switch, patch_size=patch, batch_size=batch, learning_rate=1e-4),
    )
    return stages, (
        f"zoom-in&out (chronic stroke paper): epochs 0–{switch - 1} on {list(small)} patches "
        f"({np.prod(small) / np.prod(patch):.0%} of the final volume, batch {small_batch}) at lr 1e-3, then "
        f"{planner.epochs - switch} epochs on {list(patch)} at lr 1e-4 from those weights; Adam with cosine "
        "annealing and warm restarts every 50 epochs"
    )


def topology_reason(
    planner: DefaultPlanner, topology: Topology, spacing: tuple[float, ...], widths: tuple[int, int] | None = None
) -> str:
    """Why the U-Net has its stages, kernels, widths and layout."""
    widths = widths or planner.widths
    layout = UNET_LAYOUT_REASONS[planner.unet_layout]
    asked = "" if planner.unet_layout == PLANNED_UNET_LAYOUT else ", as asked (--unet-layout)"
    return (
        f"{len(topology.strides)} stages: an axis is halved while it keeps >= 4 voxels and is not coarser than "
        f"twice the finest spacing; kernels are 1 along an axis more than twice as coarse; widths "
        f"{list(topology.features)} (doubling from {widths[0]}, capped at {widths[1]}); target spacing "
        f"{list(spacing)} mm; {layout}{asked}"
    )
