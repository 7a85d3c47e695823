"""The default planner: picks the configurations from the data and fits them to a memory budget.

Near-isotropic volumes (ATLAS T1w) get ``3d_resunet``: the residual 3D U-Net with GroupNorm and the
zoom-in&out schedule of the chronic stroke paper. Thin slabs (CT perfusion: 2–22 slices at 5 mm)
get ``2d_pspnet`` (the CTP paper's winner) and ``3d_aniso`` (its 3D comparison, no pooling along
the thick axis).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from autoseg.infer.sliding_window import sliding_window_positions
from autoseg.networks import PSPNet, ResidualUNet, Shape, on_meta
from autoseg.plan.budget import RungChoice, ScheduleLayout, choose_rung, describe_minutes, stage_shares
from autoseg.plan.cost_model import (
    CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL,
    NetworkShape,
    TrainingEstimate,
    estimate_training,
)
from autoseg.plan.fingerprint import DatasetAggregate
from autoseg.plan.topology import (
    MAX_FEATURES_3D,
    Topology,
    channel_normalization,
    fit_patch_to_budget,
    histeq_twin,
    largest_batch,
    round_to_multiple,
    target_spacing,
    unet_topology,
)
from autoseg.plans import (
    ComputeBudget,
    Configuration,
    Loss,
    Network,
    Plans,
    PostProcessing,
    Resampling,
    Sampling,
    Schedule,
    Stage,
    Symmetry,
    input_channels,
)
from autoseg.preprocess.symmetry import SLAB_ANISOTROPY, SLAB_MAX_SLICES
from autoseg.preprocess.symmetry import qualifies as symmetry_qualifies
from autoseg.train.losses import balanced_positive_weight
from planners.base import Planner

GIB = 1024**3
#: The batch may hold at most this share of all training voxels (nnU-Net's cap against overfitting).
MAX_BATCH_SHARE = 0.05
#: Bytes per stored activation in the memory estimate. Mixed precision keeps conv outputs in 2 bytes,
#: but autocast runs GroupNorm/BatchNorm in fp32, so the normalized copies take 4; 4 is the safe bound
#: until the estimate is calibrated on a GPU.
BYTES_PER_ACTIVATION = 4
#: Zoom-out (stage 2) starts after this share of the epochs (the paper: 1,200 + 150 epochs).
ZOOM_OUT_SHARE = 0.125
#: From this share of lesions below 1 cm³, lesion-forced patches choose a lesion before a voxel.
SMALL_LESION_SHARE = 0.2
#: PSPNet backbones to try, largest first: the first that fits the budget at batch 2 is planned.
PSPNET_BACKBONES = ("resnet50", "resnet34", "resnet18")
#: Network widths a compute budget chooses from, narrowest first: (first-stage features, cap).
BUDGET_WIDTHS = ((8, 128), (16, 256), (24, 320), (32, 320))
#: A compute budget may lower the resolution to this (mm per axis) when the data are finer.
BUDGET_COARSE_SPACING_MM = 2.0
#: The smallest patch edge (voxels) a compute budget tries.
BUDGET_MIN_PATCH_EDGE = 32
#: Patches per batch of every budgeted candidate but the richest (which fits its batch to memory, as without a
#: budget): two, nnU-Net's usual, so time buys iterations rather than bigger batches.
BUDGET_BATCH = 2


class DefaultPlanner(Planner):
    """Plans for a GPU with ``memory_budget_gb`` (default 8 GB) and nnU-Net-length training."""

    epochs = 1000
    iterations_per_epoch = 250
    #: U-Net features of the first stage and their cap (nnU-Net's 32 and 320).
    widths = (32, MAX_FEATURES_3D)
    pspnet_epochs = 200
    #: PSPNet backbones to try, largest first.
    pspnet_backbones = PSPNET_BACKBONES

    def plan(self) -> Plans:
        aggregate = self.fingerprint.aggregate
        spacing, spacing_reason = self.target_spacing(aggregate)
        normalization = [channel_normalization(channel) for channel in self.fingerprint.channels]
        thin, why = self.is_thin_slab(aggregate)
        if thin and self.compute is not None:
            configurations = [
                self.plan_pspnet_for_budget(spacing, spacing_reason, normalization),
                self.plan_for_budget(self.plan_aniso, spacing, spacing_reason, normalization),
            ]
        elif thin:
            configurations = [
                self.plan_pspnet(spacing, spacing_reason, normalization),
                self.plan_aniso(spacing, spacing_reason, normalization),
            ]
        elif self.compute is not None:
            configurations = [self.plan_for_budget(self.plan_resunet, spacing, spacing_reason, normalization)]
        else:
            configurations = [self.plan_resunet(spacing, spacing_reason, normalization)]
        symmetric, symmetry_reason = self.plan_symmetric(thin, spacing, spacing_reason, normalization)
        configurations += symmetric
        if self.normalization == "histeq":
            configurations += [self.histeq_variant(c) for c in configurations]
        channels = self.fingerprint.channels
        return Plans(
            dataset=self.fingerprint.dataset,
            planner=type(self).__name__,
            channels=tuple(c.name for c in channels),
            modalities=tuple(c.modality for c in channels),
            labels=dict(self.fingerprint.labels),
            default_configuration=configurations[0].name,
            configurations={c.name: c for c in configurations},
            memory_budget_gb=self.memory_budget_gb,
            reasons={"default_configuration": why, "symmetry": symmetry_reason},
            compute_budget=self.compute_budget_record(configurations),
        )

    # -- decisions shared by every configuration ------------------------------------------------

    def histeq_variant(self, configuration: Configuration) -> Configuration:
        """``NAME_histeq`` (:func:`autoseg.plan.topology.histeq_twin`), sharing the compute-budget estimate of ``NAME``."""
        twin = histeq_twin(configuration, self.fingerprint.channels)
        choices = getattr(self, "_budget_choices", {})
        if configuration.name in choices:
            self._budget_choices = {**choices, twin.name: choices[configuration.name]}
        return twin

    def target_spacing(self, aggregate: DatasetAggregate) -> tuple[tuple[float, ...], str]:
        return target_spacing(aggregate, SLAB_ANISOTROPY)

    def is_thin_slab(self, aggregate: DatasetAggregate) -> tuple[bool, str]:
        ratio = aggregate.anisotropy_ratio
        slices = aggregate.slices_along_coarse_axis
        if ratio >= SLAB_ANISOTROPY or slices["median"] <= SLAB_MAX_SLICES:
            return True, (
                f"thin slabs: out-of-plane spacing is {ratio:.1f}x the in-plane spacing and scans have "
                f"{slices['min']}–{slices['max']} slices (median {slices['median']:g}); 3D context is too thin, so "
                "the 2D PSPNet leads (CTP paper) and 3d_aniso is planned as its 3D comparison"
            )
        return False, (
            f"near-isotropic volumes (anisotropy {ratio:.2f}, median {slices['median']:g} slices): the residual 3D "
            "U-Net sees the whole lesion in context"
        )

    def median_shape(self, spacing: tuple[float, ...]) -> tuple[int, ...]:
        """Median cropped size in voxels at ``spacing``."""
        size_mm = np.array(self.fingerprint.aggregate.median_cropped_size_mm, float)
        return tuple(int(max(1, round(v))) for v in size_mm / np.array(spacing))

    def loss(self, patch_volume_mm3: float) -> tuple[Loss, str]:
        aggregate = self.fingerprint.aggregate
        small_share = aggregate.share_of_lesions_below_1cm3
        median = aggregate.lesion_component_volumes_mm3.get("median", 0.0)
        relative = median / patch_volume_mm3
        if small_share >= 0.3 or relative < 1e-3:
            return Loss(
                name="dice_bce_focal",
                dice_weight=1.0,
                bce_weight=1.0,
                focal_weight=1.0,
                focal_gamma=2.0,
                focal_alpha=0.75,
            ), (
                f"{small_share:.0%} of lesions are below 1 cm³ and the median lesion ({median:.0f} mm³) fills "
                f"{relative:.2%} of a patch: Dice + BCE plus a focal term (γ=2, α=0.75 for lesion, acute stroke paper) "
                "so the many easy background voxels do not drown the small lesions"
            )
        return Loss(name="dice_bce", dice_weight=1.0, bce_weight=1.0), (
            f"lesions are mostly large ({small_share:.0%} below 1 cm³; median {median:.0f} mm³ = {relative:.2%} of a "
            "patch): the Dice + BCE affine loss of the chronic stroke paper"
        )

    def sampling(self, patch_volume_mm3: float) -> tuple[Sampling, str]:
        aggregate = self.fingerprint.aggregate
        median_case = aggregate.case_lesion_volumes_mm3.get("median", 0.0)
        share = median_case / patch_volume_mm3
        small = aggregate.share_of_lesions_below_1cm3
        choice, why_choice = (
            (
                "lesion",
                f"; {small:.0%} of lesions are below 1 cm³, so a forced patch picks a lesion "
                "first (uniformly, then a voxel of it) and small lesions beside large ones are seen "
                "as often",
            )
            if small >= SMALL_LESION_SHARE
            else ("voxel", f"; a forced patch centres on any lesion voxel ({small:.0%} of lesions below 1 cm³)")
        )
        if share < 0.01:
            return Sampling(foreground_oversampling=0.5, max_offset_fraction=0.5, lesion_choice=choice), (
                f"the median case's lesion load ({median_case:.0f} mm³) fills {share:.2%} of a patch: half the patches "
                "are centred on lesion (balanced sampling, acute stroke paper), shifted by up to half a patch"
                + why_choice
            )
        return Sampling(foreground_oversampling=0.33, max_offset_fraction=0.5, lesion_choice=choice), (
            f"lesions fill {share:.1%} of a patch for the median case: a third of the patches are forced onto lesion "
            "(nnU-Net's ratio), shifted by up to half a patch so lesions are not always centred" + why_choice
        )

    def postprocessing(self, spacing: tuple[float, ...]) -> tuple[PostProcessing, str]:
        volumes = self.fingerprint.aggregate.lesion_component_volumes_mm3
        smallest = float(volumes.get("min", 0.0))
        voxel = float(np.prod(spacing))
        minimum = round(max(voxel, 0.5 * smallest), 2)
        return PostProcessing(threshold=0.5, min_lesion_mm3=minimum), (
            f"threshold 0.5; drop components under {minimum} mm³ (half the smallest training lesion, {smallest:.1f} mm³, "
            "and at least one voxel); both are re-tuned on cross-validation"
        )

    @staticmethod
    def sliding_window_step() -> tuple[float, str]:
        """Inference windows half a patch apart (nnU-Net); the reason says what a denser step costs."""
        return 0.5, (
            "windows at most half a patch apart, so every voxel is predicted in about 2 windows per axis and the "
            "Gaussian-weighted mean hides the seams (nnU-Net); the acute stroke paper's denser step (4x4x1 voxels on "
            "24x24x16 patches, about a sixth of a patch) needs about 27 times as many forward passes: lower this "
            "value (e.g. 0.25, 8 times as many) for denser overlap; autoseg_predict --step-size overrides it"
        )

    def resampling(self, spacing: tuple[float, ...]) -> tuple[Resampling, str]:
        ratio = max(spacing) / min(spacing)
        if ratio >= SLAB_ANISOTROPY:
            axis = int(np.argmax(spacing))
            return Resampling(image_order=3, separate_axis=axis, separate_axis_order=0), (
                f"spacing is anisotropic ({ratio:.1f}x): cubic spline in-plane, nearest along axis {axis} so thick "
                "slices are not blurred into each other"
            )
        return Resampling(
            image_order=3
        ), "near-isotropic: cubic spline for images, linear one-hot interpolation for labels"

    def common(self, spacing: tuple[float, ...], patch_mm3: float) -> tuple[dict[str, Any], dict[str, str]]:
        """Fields and reasons every configuration shares."""
        fields, reasons = {}, {}
        for name, (value, reason) in {
            "loss": self.loss(patch_mm3),
            "sampling": self.sampling(patch_mm3),
            "postprocessing": self.postprocessing(spacing),
            "resampling": self.resampling(spacing),
            "sliding_window_step": self.sliding_window_step(),
        }.items():
            fields[name], reasons[name] = value, reason
        return fields, reasons

    def batch_cap(self, patch: tuple[int, ...], spacing: tuple[float, ...]) -> int:
        """Largest batch that holds at most ``MAX_BATCH_SHARE`` of all training voxels."""
        total = np.prod(self.median_shape(spacing)) * self.fingerprint.aggregate.num_cases
        return max(2, int(MAX_BATCH_SHARE * total / np.prod(patch)))

    # -- configurations -------------------------------------------------------------------------

    def plan_symmetric(self, thin: bool, spacing, spacing_reason, normalization) -> tuple[list[Configuration], str]:
        """``3d_resunet_sym`` (volumes) or ``2d_pspnet_sym`` (thin slabs, in-plane mirror) when the fingerprint
        found a mid-sagittal plane in enough cases (``autoseg.preprocess.symmetry.qualifies``): the plain configuration with
        every channel's registered mirror appended, budgeted like it. Returns the configurations (none or one) and
        the reason either way."""
        found, in_plane, reason = symmetry_qualifies(self.fingerprint.aggregate.symmetry)
        if not found:
            return [], reason
        symmetry = Symmetry(reference_channel=0, difference=False, in_plane=in_plane)
        if thin:
            configuration = (
                self.plan_pspnet_for_budget(spacing, spacing_reason, normalization, symmetry)
                if self.compute is not None
                else self.plan_pspnet(spacing, spacing_reason, normalization, symmetry)
            )
        else:
            build = functools.partial(self.plan_resunet, symmetry=symmetry)
            configuration = (
                self.plan_for_budget(build, spacing, spacing_reason, normalization)
                if self.compute is not None
                else build(spacing, spacing_reason, normalization)
            )
        return [configuration], f"{configuration.name}: {reason}"

    def symmetry_reason(self, symmetry: Symmetry) -> str:
        """The ``reasons.symmetry`` of a symmetric configuration."""
        channels = self.fingerprint.channels
        reference = channels[symmetry.reference_channel].name
        count = input_channels(len(channels), symmetry)
        how = (
            "in-plane: rotation about the slice axis and in-plane shift, since a few thick slices cannot fix an "
            "out-of-plane tilt"
            if symmetry.in_plane
            else "rigid 3-D (Euler3D)"
        )
        _, _, found = symmetry_qualifies(self.fingerprint.aggregate.symmetry)
        return (
            f"{found}. The mirror is fitted ({how}) on channel {symmetry.reference_channel} ({reference}) after "
            f"cropping, normalization and resampling, on the arrays the network reads, and its transform reused "
            f"for the other channels (acute stroke paper); the network takes {count} channels. No difference "
            "channel: the paper appends the mirror only and the first convolution can subtract; set "
            "symmetry.difference to true for original − mirror as a third channel per input"
        )

    def unet_memory(self, deep_supervision: bool = True, symmetry: Symmetry | None = None):
        in_channels = input_channels(len(self.fingerprint.channels), symmetry)
        num_classes = len(self.fingerprint.labels) - 1

        def memory_of(patch: tuple[int, ...], topology: Topology, batch: int) -> int:
            network = on_meta(
                ResidualUNet,
                in_channels=in_channels,
                num_classes=num_classes,
                features=topology.features,
                strides=topology.strides,
                kernel_sizes=topology.kernel_sizes,
                deep_supervision=deep_supervision,
            )
            return network.training_memory_bytes(
                patch_size=patch, batch_size=batch, bytes_per_activation=BYTES_PER_ACTIVATION
            )

        return memory_of

    def fit_batch(self, patch: tuple[int, ...], topology: Topology, spacing: tuple[float, ...], memory_of) -> int:
        one, two = memory_of(patch, topology, 1), memory_of(patch, topology, 2)
        return min(largest_batch(two - one, 2 * one - two, self.memory_budget_gb * GIB), self.batch_cap(patch, spacing))

    def plan_resunet(
        self,
        spacing,
        spacing_reason,
        normalization,
        widths: tuple[int, int] | None = None,
        patch: tuple[int, ...] | None = None,
        batch: int | None = None,
        symmetry: Symmetry | None = None,
    ) -> Configuration:
        """3D residual U-Net with the zoom-in&out schedule when a half-volume patch is still sensible.

        Without ``patch``, the largest patch that fits the memory budget (up to the median volume); without
        ``batch``, as many samples as fit; ``widths`` (first-stage features, cap) default to the planner's.
        With ``symmetry``: ``3d_resunet_sym``, the same with symmetric-hemisphere channels (its own data folder)."""
        widths = widths or self.widths
        budget = self.memory_budget_gb * GIB
        full = self.median_shape(spacing)
        memory_of = self.unet_memory(symmetry=symmetry)
        given_patch = patch is not None
        if patch is None:
            patch, topology, needed = fit_patch_to_budget(full, spacing, memory_of, budget, batch_size=2, widths=widths)
        else:
            topology = unet_topology(patch, spacing, max_features=widths[1], base_features=widths[0])
            patch = round_to_multiple(patch, topology.total_stride)
            topology = unet_topology(patch, spacing, max_features=widths[1], base_features=widths[0])
            needed = memory_of(patch, topology, 2)
        given_batch = batch is not None
        batch = batch or self.fit_batch(patch, topology, spacing, memory_of)
        batch_reason = (
            (
                f"as many patches as fit the budget, at least 2 and at most {MAX_BATCH_SHARE:.0%} of all "
                f"training voxels: {batch}"
            )
            if not given_batch
            else (f"{batch} patches: a compute-budget candidate, where time buys iterations rather than larger batches")
        )
        patch_reason = (
            self.patch_reason(full, patch, topology, needed)
            if not given_patch
            else (
                f"{list(patch)}: a candidate of the compute budget (see reasons.compute_budget), covering "
                f"{float(np.prod(patch) / np.prod(full)):.0%} of the median cropped volume {list(full)}; memory estimate "
                f"{needed / GIB:.2f} GB at batch 2"
            )
        )
        reasons = {
            "target_spacing": spacing_reason,
            "patch_size": patch_reason,
            "batch_size": batch_reason,
            "network": self.topology_reason(topology, spacing, widths),
        }
        stages, schedule_reason = self.zoom_schedule(patch, batch, topology, spacing, memory_of, widths)
        reasons["schedule"] = schedule_reason
        common, common_reasons = self.common(spacing, float(np.prod(patch) * np.prod(spacing)))
        reasons.update(common_reasons)
        trainer = "ZoomInOutTrainer" if len(stages) == 2 else "ResidualUNetTrainer"
        reasons["normalization"] = "; ".join(reason for _, reason in normalization)
        reasons["mirror_axes"] = "all three axes: lesions occur in either hemisphere and at any position"
        if symmetry is not None:
            reasons["symmetry"] = self.symmetry_reason(symmetry)
        return Configuration(
            name="3d_resunet" + ("_sym" if symmetry else ""),
            dimension=3,
            target_spacing=spacing,
            median_shape=full,
            patch_size=patch,
            batch_size=batch,
            network=Network(
                architecture="ResidualUNet",
                features=topology.features,
                strides=topology.strides,
                kernel_sizes=topology.kernel_sizes,
                deep_supervision=True,
            ),
            normalization=tuple(n for n, _ in normalization),
            schedule=Schedule(
                trainer=trainer,
                epochs=self.epochs,
                iterations_per_epoch=self.iterations_per_epoch,
                stages=stages,
                restart_period_epochs=50 if len(stages) == 2 else None,
            ),
            mirror_axes=(0, 1, 2),
            estimated_memory_gb=round(memory_of(patch, topology, batch) / GIB, 3),
            data_identifier=self.resunet_identifier(spacing) + ("_sym" if symmetry else ""),
            reasons=reasons,
            symmetry=symmetry,
            **common,
        )

    def resunet_identifier(self, spacing: tuple[float, ...]) -> str:
        """``3d_resunet`` at the planned spacing; a budget that lowers the resolution gets its own data folder."""
        if self.compute is None or tuple(spacing) == self.target_spacing(self.fingerprint.aggregate)[0]:
            return "3d_resunet"
        return "3d_resunet_" + "x".join(f"{v:g}" for v in spacing) + "mm"

    def patch_reason(self, full, patch, topology: Topology, needed: int) -> str:
        coverage = float(np.prod(patch) / np.prod(full))
        estimate = f"estimated {needed / GIB:.2f} GB of {self.memory_budget_gb:g} GB at batch 2"
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

    def zoom_schedule(
        self, patch, batch, topology, spacing, memory_of, widths: tuple[int, int] | None = None
    ) -> tuple[tuple[Stage, ...], str]:
        """Stage 1 on half-volume patches at lr 1e-3, stage 2 on the full patch at 1e-4 (the paper's
        24% -> 48% sub-volumes, 128³ -> 144x172x168 mm)."""
        small = round_to_multiple(tuple(p * 0.5 ** (1 / 3) for p in patch), topology.total_stride, mode="nearest")
        sensible = all(s >= 2 * t for s, t in zip(small, topology.total_stride)) and np.prod(small) < np.prod(patch)
        if not sensible:
            return (Stage(name="full", start_epoch=0, patch_size=patch, batch_size=batch, learning_rate=1e-2),), (
                f"patch {list(patch)} is too small to halve (edges must stay >= twice the total stride): one stage, "
                "SGD with polynomial decay (nnU-Net's default)"
            )
        widths = widths or self.widths
        small_topology = unet_topology(small, spacing, max_features=widths[1], base_features=widths[0])
        small_batch = self.fit_batch(small, small_topology, spacing, memory_of)
        switch = int(round(self.epochs * (1 - ZOOM_OUT_SHARE)))
        stages = (
            Stage(name="zoom_in", start_epoch=0, patch_size=small, batch_size=small_batch, learning_rate=1e-3),
            Stage(name="zoom_out", start_epoch=switch, patch_size=patch, batch_size=batch, learning_rate=1e-4),
        )
        return stages, (
            f"zoom-in&out (chronic stroke paper): epochs 0–{switch - 1} on {list(small)} patches "
            f"({np.prod(small) / np.prod(patch):.0%} of the final volume, batch {small_batch}) at lr 1e-3, then "
            f"{self.epochs - switch} epochs on {list(patch)} at lr 1e-4 from those weights; Adam with cosine "
            "annealing and warm restarts every 50 epochs"
        )

    def topology_reason(
        self, topology: Topology, spacing: tuple[float, ...], widths: tuple[int, int] | None = None
    ) -> str:
        widths = widths or self.widths
        return (
            f"{len(topology.strides)} stages: an axis is halved while it keeps >= 4 voxels and is not coarser than "
            f"twice the finest spacing; kernels are 1 along an axis more than twice as coarse; widths "
            f"{list(topology.features)} (doubling from {widths[0]}, capped at {widths[1]}); target spacing "
            f"{list(spacing)} mm"
        )

    # -- compute budget ---------------------------------------------------------------------------

    def budget_spacings(self, spacing: tuple[float, ...], reason: str) -> list[tuple[tuple[float, ...], str]]:
        """Resolutions a compute budget may train at, coarsest first: the planned one, and 2 mm when finer."""
        coarse = tuple(max(float(s), BUDGET_COARSE_SPACING_MM) for s in spacing)
        if coarse == tuple(spacing):
            return [(spacing, reason)]
        return [
            (coarse, f"{reason}; lowered to {BUDGET_COARSE_SPACING_MM:g} mm to fit the compute budget"),
            (spacing, reason),
        ]

    def budget_widths(self) -> list[tuple[int, int]]:
        """Widths a compute budget may choose, narrowest first, ending with the planner's own."""
        return [w for w in BUDGET_WIDTHS if w[0] < self.widths[0]] + [self.widths]

    def growing_patches(self, largest: tuple[int, ...], spacing, widths) -> list[tuple[int, ...]]:
        """Patches from BUDGET_MIN_PATCH_EDGE voxels up to (not including) ``largest``, smallest first: each grows
        the axis that is furthest from its final size by one multiple of the total stride (about 1.2–1.5 times
        the voxels per step), so the ladder of candidates has small steps in cost."""
        step = unet_topology(largest, spacing, max_features=widths[1], base_features=widths[0]).total_stride
        patch = [min(edge, max(s, int(np.ceil(BUDGET_MIN_PATCH_EDGE / s)) * s)) for edge, s in zip(largest, step)]
        found = []
        while tuple(patch) != tuple(largest):
            found.append(tuple(patch))
            ratios = [p / edge if p < edge else np.inf for p, edge in zip(patch, largest)]
            axis = int(np.argmin(ratios))
            patch[axis] = min(largest[axis], patch[axis] + step[axis])
        return found

    def ladder(self, build, spacing, spacing_reason, normalization) -> list[Configuration]:
        """Candidate U-Net configurations for a compute budget, cheapest first, each at least as rich as the
        previous in resolution, width, patch and batch; the last is the plan without a budget.

        Order: at the coarsest resolution the narrowest network with growing patches, then wider networks on
        the full patch; then finer resolutions with the widest network and growing patches.

        Args:
            build: :meth:`plan_resunet` or :meth:`plan_aniso`.
        """
        options = self.budget_spacings(spacing, spacing_reason)
        candidates = []
        for index, (option, reason) in enumerate(options):
            for widths in self.budget_widths() if index == 0 else [self.widths]:
                largest = build(option, reason, normalization, widths, batch=BUDGET_BATCH)
                for patch in self.growing_patches(largest.patch_size, option, widths):
                    candidates.append(build(option, reason, normalization, widths, patch, BUDGET_BATCH))
                candidates.append(largest)
        richest = build(spacing, spacing_reason, normalization)
        ladder = []
        for candidate in candidates:
            candidate = self._fixed_stage_batches(candidate)
            if _at_least_as_rich(richest, candidate) and (not ladder or _at_least_as_rich(candidate, ladder[-1])):
                ladder.append(candidate)
        return [*ladder, richest]

    @staticmethod
    def _fixed_stage_batches(configuration: Configuration) -> Configuration:
        """Every stage of a budgeted candidate trains with the configuration's batch."""
        stages = tuple(
            dataclasses.replace(s, batch_size=configuration.batch_size) for s in configuration.schedule.stages
        )
        return dataclasses.replace(configuration, schedule=dataclasses.replace(configuration.schedule, stages=stages))

    def estimate(self, configuration: Configuration, layout: ScheduleLayout) -> TrainingEstimate:
        """Estimated wall time of one fold of ``configuration`` laid out as ``layout`` on the budget's machine."""
        in_channels = configuration.input_channels(len(self.fingerprint.channels))
        num_classes = len(self.fingerprint.labels) - 1
        network = NetworkShape(
            in_channels,
            num_classes,
            configuration.network.features,
            configuration.network.strides,
            configuration.network.kernel_sizes,
        )
        schedule = self.laid_out_schedule(configuration, layout)
        shares = stage_shares([s.start_epoch for s in schedule.stages], layout.epochs)
        stages = [(s.patch_size, s.batch_size, share) for s, share in zip(schedule.stages, shares)]
        cases = max(1, round(self.fingerprint.aggregate.num_cases / 5))
        shape = tuple(max(m, p) for m, p in zip(configuration.median_shape, configuration.patch_size))
        windows = (
            len(sliding_window_positions(shape, configuration.patch_size, configuration.sliding_window_step)) * cases
        )
        megavoxels = float(np.prod(self.fingerprint.aggregate.median_shape)) * cases / 1e6
        return estimate_training(
            self.compute.probe,
            network,
            stages,
            epochs=layout.epochs,
            iterations_per_epoch=layout.iterations_per_epoch,
            val_iterations=layout.val_iterations,
            validation_windows=windows,
            mirror_count=2 ** len(configuration.mirror_axes),
            validation_megavoxels=megavoxels,
            device_type=self.compute.device,
        )

    def laid_out_schedule(self, configuration: Configuration, layout: ScheduleLayout) -> Schedule:
        """The configuration's schedule over ``layout``: zoom-out from 7/8 of the epochs, one cosine cycle per
        stage for short runs (``layout.cycles`` in stage 1 for long ones), the layout's validation batches."""
        schedule = configuration.schedule
        stages, period = schedule.stages, None
        if len(stages) == 2:
            switch = min(layout.epochs - 1, max(1, round(layout.epochs * (1 - ZOOM_OUT_SHARE))))
            stages = (stages[0], dataclasses.replace(stages[1], start_epoch=switch))
            period = max(1, switch // layout.cycles) if layout.cycles > 1 else None
        return dataclasses.replace(
            schedule,
            epochs=layout.epochs,
            iterations_per_epoch=layout.iterations_per_epoch,
            stages=stages,
            restart_period_epochs=period,
            val_iterations_per_epoch=layout.val_iterations,
        )

    def plan_for_budget(self, build, spacing, spacing_reason, normalization) -> Configuration:
        """The richest U-Net candidate (``build``: :meth:`plan_resunet` or :meth:`plan_aniso`) that trains enough
        iterations within the compute budget."""
        ladder = self.ladder(build, spacing, spacing_reason, normalization)
        choice = choose_rung(
            len(ladder),
            lambda rung, layout: self.estimate(ladder[rung], layout),
            self.compute.minutes,
            self.epochs * self.iterations_per_epoch,
        )
        chosen = ladder[choice.index]
        schedule = self.laid_out_schedule(chosen, choice.layout)
        reasons = dict(chosen.reasons)
        reasons["compute_budget"] = self.budget_reason(ladder, choice)
        reasons["schedule"] = self.budget_schedule_reason(schedule, choice)
        configuration = dataclasses.replace(chosen, schedule=schedule, reasons=reasons)
        self._budget_choices = {**getattr(self, "_budget_choices", {}), configuration.name: choice}
        return configuration

    def plan_pspnet_for_budget(
        self, spacing, spacing_reason, normalization, symmetry: Symmetry | None = None
    ) -> Configuration:
        """The 2d_pspnet plan with its epochs fitted to the compute budget.

        The network stays the planner's (a pre-trained backbone is chosen for its weights, not its cost); its
        step is estimated from the PSPNet's multiply-accumulates (counted on the meta device) and activations
        with the probe's cost model, fitted on 3-D U-Nets, so the figure is rougher than for the U-Nets."""
        configuration = self.plan_pspnet(spacing, spacing_reason, normalization, symmetry)
        choice = choose_rung(
            1,
            lambda rung, layout: self.estimate_pspnet(configuration, layout),
            self.compute.minutes,
            self.pspnet_epochs * self.iterations_per_epoch,
        )
        layout, schedule = choice.layout, configuration.schedule
        scale = layout.epochs / schedule.epochs
        stages = (
            schedule.stages[0],
            dataclasses.replace(schedule.stages[1], start_epoch=max(1, round(layout.epochs / 10))),
        )
        schedule = dataclasses.replace(
            schedule,
            epochs=layout.epochs,
            iterations_per_epoch=layout.iterations_per_epoch,
            stages=stages,
            val_iterations_per_epoch=layout.val_iterations,
            plateau_patience_epochs=max(2, round(schedule.plateau_patience_epochs * scale)),
            early_stopping_patience_epochs=max(4, round(schedule.early_stopping_patience_epochs * scale)),
        )
        reasons = dict(configuration.reasons)
        estimate = choice.estimate
        reasons["compute_budget"] = (
            f"{configuration.network.backbone} PSPNet on {'x'.join(map(str, configuration.patch_size))} slices, "
            f"batch {configuration.batch_size}: {estimate.iterations} iterations at "
            f"{estimate.seconds_per_iteration:.2f} s plus validation: estimated "
            f"{describe_minutes(estimate.total_seconds)} of the {self.compute.minutes:g}-minute budget (step "
            "estimated from its multiply-accumulates with the cost model fitted on 3-D U-Nets)"
        )
        reasons["schedule"] = self.budget_schedule_reason(schedule, choice)
        self._budget_choices = {**getattr(self, "_budget_choices", {}), configuration.name: choice}
        return dataclasses.replace(configuration, schedule=schedule, reasons=reasons)

    def estimate_pspnet(self, configuration: Configuration, layout: ScheduleLayout) -> TrainingEstimate:
        """Estimated wall time of one fold of a 2d_pspnet configuration laid out as ``layout``."""
        from autoseg.plan.cost_model import pspnet_cost

        in_channels = configuration.input_channels(len(self.fingerprint.channels))
        gmacs, mega_activations = pspnet_cost(
            configuration.network.backbone, configuration.patch_size, configuration.batch_size, in_channels
        )
        probe = self.compute.probe
        megavoxels = configuration.batch_size * float(np.prod(configuration.patch_size)) / 1e6
        step = probe.training.seconds(gmacs, mega_activations, megavoxels)
        forward = probe.inference.seconds(gmacs, mega_activations, megavoxels) / configuration.batch_size
        augmentation = configuration.batch_size * probe.augmentation_seconds((*configuration.patch_size, 1))
        cases = max(1, round(self.fingerprint.aggregate.num_cases / 5))
        slices = configuration.median_shape[configuration.slice_axis] * cases
        return TrainingEstimate.for_steps(
            step,
            augmentation,
            forward * configuration.batch_size,
            layout.epochs,
            layout.iterations_per_epoch,
            layout.val_iterations,
            self.compute.device,
            final_validation_seconds=slices * 2 ** len(configuration.mirror_axes) * forward
            + CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL
            * float(np.prod(self.fingerprint.aggregate.median_shape))
            * cases
            / 1e6,
        )

    def budget_reason(self, ladder: list[Configuration], choice: RungChoice) -> str:
        chosen, estimate, minutes = ladder[choice.index], choice.estimate, self.compute.minutes
        text = (
            f"{_label(chosen)}: {estimate.iterations} iterations at {estimate.seconds_per_iteration:.2f} s "
            f"(network {estimate.step_seconds:.2f} s + loader {estimate.loader_seconds:.2f} s) plus validation: "
            f"estimated {describe_minutes(estimate.total_seconds)} of the {minutes:g}-minute budget; candidate "
            f"{choice.index + 1} of {len(ladder)}, the richest that trains the {choice.target} iterations this "
            "budget asks for first"
        )
        if choice.next_index is not None:
            richer = ladder[choice.next_index]
            text += (
                f". {_difference(richer, chosen)} would allow only {choice.next_iterations} iterations in "
                f"{minutes:g} minutes"
            )
        return text

    @staticmethod
    def budget_schedule_reason(schedule: Schedule, choice: RungChoice) -> str:
        layout = choice.layout
        stages = ", ".join(
            f"{s.name} from epoch {s.start_epoch} (patch {list(s.patch_size)}, lr {s.learning_rate:g})"
            for s in schedule.stages
        )
        cycles = (
            "one cosine learning-rate cycle per stage"
            if schedule.restart_period_epochs is None
            else f"cosine warm restarts every {schedule.restart_period_epochs} epochs"
        )
        return (
            f"laid out over the budget: {layout.epochs} epochs x {layout.iterations_per_epoch} iterations "
            f"(about {choice.estimate.seconds_per_iteration * layout.iterations_per_epoch:.0f} s each), "
            f"{layout.val_iterations} validation batches per epoch; {stages}; {cycles}; the trainer "
            f"{schedule.trainer} chooses the optimizer"
        )

    def compute_budget_record(self, configurations: list[Configuration]) -> ComputeBudget | None:
        """The plans' ``compute_budget`` object, describing the default (first) configuration."""
        if self.compute is None:
            return None
        choices = getattr(self, "_budget_choices", {})
        estimates = {}
        for name, choice in choices.items():
            e = choice.estimate
            estimates[name] = {
                "estimated_minutes": round(e.total_minutes, 2),
                "seconds_per_iteration": round(e.seconds_per_iteration, 4),
                "iterations": e.iterations,
                "epochs": e.epochs,
                "val_iterations_per_epoch": choice.layout.val_iterations,
                "minutes": {
                    "training": round(e.training_seconds / 60, 2),
                    "epoch_validation": round(e.epoch_validation_seconds / 60, 2),
                    "overhead": round(e.overhead_seconds / 60, 2),
                    "final_validation": round(e.final_validation_seconds / 60, 2),
                },
                "network_seconds_per_iteration": round(e.step_seconds, 4),
                "stage_seconds_per_iteration": e.notes.get("stage_seconds_per_iteration", []),
                "loader_seconds_per_iteration": round(e.loader_seconds, 4),
            }
        default = configurations[0].name
        first = estimates.get(default)
        if first is None:
            raise ValueError(f"{type(self).__name__}: the compute budget covers {sorted(estimates)}, not {default}")
        reasons = {
            name: c.reasons["compute_budget"]
            for name, c in ((c.name, c) for c in configurations)
            if "compute_budget" in c.reasons
        }
        probe = self.compute.probe
        notes = choices[default].estimate.notes
        processes, reasons["data_processes"] = notes["data_processes"], notes["data_processes_reason"]
        reasons["probe"] = (
            f"{'cached' if self.compute.probe_cached else 'new'} probe of {probe.machine['model']}, "
            f"{probe.machine['threads'] or 'GPU'} threads, torch {probe.machine['torch']}, "
            f"{probe.machine['precision']}: {len(probe.points)} networks timed on "
            f"{probe.created}; training memory format {probe.memory_format}"
        )
        return ComputeBudget(
            device=self.compute.device,
            minutes=self.compute.minutes,
            precision=self.compute.precision,
            estimated_minutes=first["estimated_minutes"],
            seconds_per_iteration=first["seconds_per_iteration"],
            iterations=first["iterations"],
            configuration=default,
            memory_format=probe.memory_format,
            data_processes=processes,
            estimates=estimates,
            probe=probe.summary(),
            reasons=reasons,
        )

    def plan_aniso(
        self,
        spacing,
        spacing_reason,
        normalization,
        widths: tuple[int, int] | None = None,
        patch: tuple[int, ...] | None = None,
        batch: int | None = None,
    ) -> Configuration:
        """3D U-Net with 2x2x1 pooling: the CTP paper's 3D comparison for thin slabs (``widths``, ``patch`` and
        ``batch`` as for :meth:`plan_resunet`)."""
        widths = widths or self.widths
        budget = self.memory_budget_gb * GIB
        full = self.median_shape(spacing)
        coarse = int(np.argmax(spacing))
        memory_of = self.unet_memory()
        if patch is None:
            patch, topology, needed = fit_patch_to_budget(
                full, spacing, memory_of, budget, 2, never_downsample=(coarse,), widths=widths
            )
        else:
            topology = unet_topology(patch, spacing, (coarse,), widths[1], widths[0])
            patch = round_to_multiple(patch, topology.total_stride)
            topology = unet_topology(patch, spacing, (coarse,), widths[1], widths[0])
            needed = memory_of(patch, topology, 2)
        batch = batch or self.fit_batch(patch, topology, spacing, memory_of)
        common, reasons = self.common(spacing, float(np.prod(patch) * np.prod(spacing)))
        in_plane = [a for a in range(3) if a != coarse]
        reasons.update(
            {
                "target_spacing": spacing_reason,
                "patch_size": f"the whole median slab {list(full)} where it fits {self.memory_budget_gb:g} GB at batch 2 "
                f"(estimated {needed / GIB:.2f} GB); slabs with fewer slices are padded",
                "batch_size": f"as many slabs as fit the budget, at least 2: {batch}",
                "network": f"pooling 2x2x1: axis {coarse} is never downsampled (the CTP paper's 3D comparison); "
                + self.topology_reason(topology, spacing, widths),
                "normalization": "; ".join(reason for _, reason in normalization),
                "mirror_axes": f"in-plane axes {in_plane} only: slabs are not symmetric along the slice axis",
                "schedule": "SGD with Nesterov momentum and polynomial decay (nnU-Net's default) from lr 1e-2",
            }
        )
        return Configuration(
            name="3d_aniso",
            dimension=3,
            target_spacing=spacing,
            median_shape=full,
            patch_size=patch,
            batch_size=batch,
            network=Network(
                architecture="ResidualUNet",
                features=topology.features,
                strides=topology.strides,
                kernel_sizes=topology.kernel_sizes,
                deep_supervision=True,
            ),
            normalization=tuple(n for n, _ in normalization),
            schedule=Schedule(
                trainer="ResidualUNetTrainer",
                epochs=self.epochs,
                iterations_per_epoch=self.iterations_per_epoch,
                stages=(Stage(name="full", start_epoch=0, patch_size=patch, batch_size=batch, learning_rate=1e-2),),
            ),
            mirror_axes=tuple(in_plane),
            estimated_memory_gb=round(memory_of(patch, topology, batch) / GIB, 3),
            data_identifier=self.slab_identifier(spacing),
            reasons=reasons,
            **common,
        )

    def plan_pspnet(self, spacing, spacing_reason, normalization, symmetry: Symmetry | None = None) -> Configuration:
        """2D PSPNet on whole slices, pre-trained backbone, two-phase fine-tuning (CTP paper); with ``symmetry``
        ``2d_pspnet_sym``, the same with symmetric-hemisphere channels (its own data folder)."""
        budget = self.memory_budget_gb * GIB
        full = self.median_shape(spacing)
        coarse = int(np.argmax(spacing))
        in_plane = tuple(full[a] for a in range(3) if a != coarse)
        patch = round_to_multiple(in_plane, (8, 8))
        in_channels = input_channels(len(self.fingerprint.channels), symmetry)
        backbone, memory_of = self.pspnet_backbone(patch, in_channels, budget)
        one, two = memory_of(1), memory_of(2)
        # Batch 2 at least: the pyramid's 1x1 bin normalizes one value per channel and slice.
        batch = max(2, min(8, largest_batch(two - one, 2 * one - two, budget)))
        phase_two = max(1, self.pspnet_epochs // 10)
        patch_mm3 = float(np.prod(patch) * np.prod([spacing[a] for a in range(3) if a != coarse]) * spacing[coarse])
        common, reasons = self.common(spacing, patch_mm3)
        fraction = float(self.fingerprint.aggregate.median_lesion_fraction_of_foreground)
        lesion_weight = round(balanced_positive_weight(fraction), 3) if 0 < fraction < 1 else 1.0
        common["loss"] = Loss(
            name="focal",
            dice_weight=0.0,
            bce_weight=0.0,
            focal_weight=1.0,
            focal_gamma=1.0,
            focal_alpha=0.75,
            positive_weight=lesion_weight,
        )
        reasons.update(
            {
                "target_spacing": spacing_reason,
                "slice_axis": f"axis {coarse} is the thick one: the network sees one whole slice at a time",
                "patch_size": f"the whole median slice {list(in_plane)} rounded up to a multiple of the output stride 8",
                "batch_size": f"{batch} slices: the CTP paper's 8 where {self.memory_budget_gb:g} GB allows "
                f"(estimated {memory_of(batch) / GIB:.2f} GB)",
                "network": f"PSPNet with a {backbone} backbone, dilated to output stride 8, pyramid bins 1, 2, 3, 6; an "
                f"initializer (BatchNorm + 1x1 conv) maps the {in_channels} channels to the backbone's 3; the "
                f"largest backbone of {list(self.pspnet_backbones)} that fits the budget at batch 2",
                "pretrained": "none: weights are never downloaded; put a local torchvision ResNet file here (or pass "
                "autoseg_train --pretrained), or make one with autoseg_pretrain; without it the PSPNet "
                "trains from scratch",
                "loss": "focal loss with γ=1 (the CTP paper's best, 0.54 vs 0.49 Dice for cross entropy); "
                f"positive_weight {lesion_weight:g} = (1 - f) / f for the median lesion fraction f = {fraction:.5f} "
                "of the brain is the lesion weight if the name is changed to weighted_ce (the trainer "
                "PSPNetCETrainer recomputes it from each fold's training cases)",
                "normalization": "; ".join(reason for _, reason in normalization),
                "mirror_axes": "both in-plane axes of the slice: lesions occur in either hemisphere",
                "schedule": f"RMSProp; epochs 0–{phase_two - 1} train only the new layers at lr 1e-2 with the backbone "
                "frozen, then everything at lr 1e-4; lr ÷10 after 20 epochs without a better validation "
                "Dice, early stop after 50 (CTP paper)",
            }
        )
        if symmetry is not None:
            reasons["symmetry"] = self.symmetry_reason(symmetry)
        return Configuration(
            name="2d_pspnet" + ("_sym" if symmetry else ""),
            dimension=2,
            target_spacing=spacing,
            median_shape=full,
            patch_size=patch,
            batch_size=batch,
            network=Network(
                architecture="PSPNet",
                deep_supervision=False,
                backbone=backbone,
                output_stride=8,
                pyramid_bins=(1, 2, 3, 6),
            ),
            normalization=tuple(n for n, _ in normalization),
            schedule=self.pspnet_schedule(patch, batch, phase_two),
            mirror_axes=(0, 1),
            estimated_memory_gb=round(memory_of(batch) / GIB, 3),
            data_identifier=self.slab_identifier(spacing) + ("_sym" if symmetry else ""),
            slice_axis=coarse,
            reasons=reasons,
            symmetry=symmetry,
            **common,
        )

    def pspnet_backbone(self, patch: Shape, in_channels: int, budget: float) -> tuple[str, Callable[[int], int]]:
        """The largest of ``pspnet_backbones`` whose training fits ``budget`` bytes at batch 2 (else the last), and
        the estimated training memory in bytes as a function of the batch size, for slices of ``patch``."""
        num_classes = len(self.fingerprint.labels) - 1
        for backbone in self.pspnet_backbones:

            def memory_of(batch: int, backbone: str = backbone) -> int:
                network = on_meta(PSPNet, in_channels=in_channels, num_classes=num_classes, backbone=backbone)
                return network.training_memory_bytes(
                    patch_size=patch, batch_size=batch, bytes_per_activation=BYTES_PER_ACTIVATION
                )

            if memory_of(2) <= budget:
                break
        return backbone, memory_of

    def pspnet_schedule(self, patch: Shape, batch: int, phase_two: int) -> Schedule:
        """The CTP paper's two phases: the new layers alone at lr 1e-2 with the backbone frozen, from epoch
        ``phase_two`` everything at lr 1e-4; lr ÷10 after a 20-epoch plateau, early stop after 50."""
        stage = {"patch_size": patch, "batch_size": batch}
        return Schedule(
            trainer="PSPNetTrainer",
            epochs=self.pspnet_epochs,
            iterations_per_epoch=self.iterations_per_epoch,
            stages=(
                Stage(name="new_layers", start_epoch=0, learning_rate=1e-2, trainable="new_layers", **stage),
                Stage(name="all_layers", start_epoch=phase_two, learning_rate=1e-4, trainable="all", **stage),
            ),
            plateau_patience_epochs=20,
            early_stopping_patience_epochs=50,
        )

    @staticmethod
    def slab_identifier(spacing: tuple[float, ...]) -> str:
        """2d_pspnet and 3d_aniso share preprocessed data: same spacing, same normalization."""
        return "slabs_" + "x".join(f"{v:.2f}" for v in spacing) + "mm"


def _at_least_as_rich(candidate: Configuration, previous: Configuration) -> bool:
    """Finer or equal spacing, wider or equal network, larger or equal patch and batch on every axis."""
    return (
        all(a <= b for a, b in zip(candidate.target_spacing, previous.target_spacing))
        and candidate.network.features[0] >= previous.network.features[0]
        and max(candidate.network.features) >= max(previous.network.features)
        and all(a >= b for a, b in zip(candidate.patch_size, previous.patch_size))
        and candidate.batch_size >= previous.batch_size
        and candidate != previous
    )


def _label(configuration: Configuration) -> str:
    """E.g. ``2 mm, features 8–128 (5 stages), patch 64x64x64, batch 2``."""
    spacing = configuration.target_spacing
    resolution = f"{spacing[0]:g} mm" if len(set(spacing)) == 1 else "x".join(f"{s:g}" for s in spacing) + " mm"
    features = configuration.network.features
    return (
        f"{resolution}, features {features[0]}–{max(features)} ({len(features)} stages), patch "
        f"{'x'.join(map(str, configuration.patch_size))}, batch {configuration.batch_size}"
    )


def _difference(richer: Configuration, chosen: Configuration) -> str:
    """What the next richer candidate changes, e.g. ``1 mm instead of 2 mm``."""
    parts = []
    if richer.target_spacing != chosen.target_spacing:
        parts.append(f"{_label(richer).split(',')[0]} instead of {_label(chosen).split(',')[0]}")
    if richer.network.features[0] != chosen.network.features[0]:
        parts.append(
            f"features {richer.network.features[0]}–{max(richer.network.features)} instead of "
            f"{chosen.network.features[0]}–{max(chosen.network.features)}"
        )
    if richer.patch_size != chosen.patch_size:
        parts.append(
            f"patch {'x'.join(map(str, richer.patch_size))} instead of {'x'.join(map(str, chosen.patch_size))}"
        )
    if richer.batch_size != chosen.batch_size:
        parts.append(f"batch {richer.batch_size} instead of {chosen.batch_size}")
    text = " and ".join(parts) or "the next candidate"
    return text[0].upper() + text[1:]
