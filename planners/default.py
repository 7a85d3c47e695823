"""The default planner: picks the configurations from the data and fits them to a memory budget.

Near-isotropic volumes (ATLAS T1w) get ``3d_resunet``: the residual 3D U-Net with GroupNorm and the
zoom-in&out schedule of the chronic stroke paper. Thin slabs (CT perfusion: 2–22 slices at 5 mm)
get ``2d_pspnet`` (the CTP paper's winner) and ``3d_aniso`` (its 3D comparison, no pooling along
the thick axis).

This module keeps ``plan()`` and the decisions every configuration shares; the 3D U-Net lives in
:mod:`planners.resunet`, the thin-slab configurations in :mod:`planners.slabs` and the compute-budget ladder in
:mod:`planners.compute_ladder`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from autoseg.plan.fingerprint import DatasetAggregate
from autoseg.plan.topology import MAX_FEATURES_3D, Topology, channel_normalization, histeq_twin, target_spacing
from autoseg.plans import (
    Configuration,
    Loss,
    Plans,
    PostProcessing,
    Resampling,
    Sampling,
    Symmetry,
    input_channels,
)
from autoseg.preprocess.symmetry import SLAB_ANISOTROPY, SLAB_MAX_SLICES
from autoseg.preprocess.symmetry import qualifies as symmetry_qualifies
from planners import like, resunet, slabs
from planners.base import Planner
from planners.compute_ladder import ComputeLadder
from planners.slabs import PSPNET_BACKBONES

#: From this share of lesions below 1 cm³, lesion-forced patches choose a lesion before a voxel.
SMALL_LESION_SHARE = 0.2


class DefaultPlanner(Planner):
    """Plans for a GPU with ``memory_budget_gb`` (default 8 GB) and nnU-Net-length training."""

    epochs = 1000
    iterations_per_epoch = 250
    #: U-Net features of the first stage and their cap (nnU-Net's 32 and 320).
    widths = (32, MAX_FEATURES_3D)
    pspnet_epochs = 200
    #: PSPNet backbones to try, largest first.
    pspnet_backbones = PSPNET_BACKBONES
    #: The compute-budget ladder of the planning pass under way (None: no compute budget, plan for memory only).
    _ladder: ComputeLadder | None = None

    def plan(self) -> Plans:
        self._ladder = ComputeLadder(self, self.compute) if self.compute is not None else None
        if self.like is not None:  # one configuration, the model's network planned for this dataset
            configuration, reasons = like.plan_like(self, self.like)
            configurations = [configuration]
        else:
            configurations, reasons = self.plan_configurations()
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
            reasons=reasons,
            compute_budget=self._ladder.record(configurations) if self._ladder is not None else None,
        )

    def plan_configurations(self) -> tuple[list[Configuration], dict[str, str]]:
        """The configurations the data call for, the default first, and the plans' reasons for the choice."""
        aggregate = self.fingerprint.aggregate
        spacing, spacing_reason = self.target_spacing(aggregate)
        normalization = [channel_normalization(channel) for channel in self.fingerprint.channels]
        thin, why = self.is_thin_slab(aggregate)
        if thin:
            configurations = [
                self.plan_pspnet_within_compute(spacing, spacing_reason, normalization),
                self.plan_unet_within_compute(self.plan_aniso, spacing, spacing_reason, normalization),
            ]
        else:
            configurations = [self.plan_unet_within_compute(self.plan_resunet, spacing, spacing_reason, normalization)]
        symmetric, symmetry_reason = self.plan_symmetric(thin, spacing, spacing_reason, normalization)
        configurations += symmetric
        if self.normalization == "histeq":
            configurations += [self.histeq_variant(c) for c in configurations]
        return configurations, {"default_configuration": why, "symmetry": symmetry_reason}

    # -- configurations: each in its module, fitted to the compute budget when there is one ---------

    def plan_resunet(self, spacing, spacing_reason, normalization, *args, **kwargs) -> Configuration:
        """``3d_resunet`` (:func:`planners.resunet.plan_resunet`)."""
        return resunet.plan_resunet(self, spacing, spacing_reason, normalization, *args, **kwargs)

    def plan_aniso(self, spacing, spacing_reason, normalization, *args, **kwargs) -> Configuration:
        """``3d_aniso`` (:func:`planners.slabs.plan_aniso`)."""
        return slabs.plan_aniso(self, spacing, spacing_reason, normalization, *args, **kwargs)

    def plan_pspnet(self, spacing, spacing_reason, normalization, symmetry: Symmetry | None = None) -> Configuration:
        """``2d_pspnet`` or ``2d_pspnet_sym`` (:func:`planners.slabs.plan_pspnet`)."""
        return slabs.plan_pspnet(self, spacing, spacing_reason, normalization, symmetry)

    def configuration(
        self, name: str, normalization, reasons: dict[str, str], symmetry: Symmetry | None = None, **fields: Any
    ) -> Configuration:
        """The configuration ``name`` normalized by the schemes of ``normalization`` ((scheme, reason) per channel),
        with ``fields``; with ``symmetry`` ``NAME_sym``, its data in a folder of its own (``data_identifier`` +
        ``_sym``) and ``reasons.symmetry`` added."""
        suffix = "_sym" if symmetry else ""
        if symmetry is not None:
            reasons["symmetry"] = self.symmetry_reason(symmetry)
        identifier = fields.pop("data_identifier") + suffix
        normalization = tuple(n for n, _ in normalization)
        return Configuration(
            name=name + suffix,
            normalization=normalization,
            data_identifier=identifier,
            reasons=reasons,
            symmetry=symmetry,
            **fields,
        )

    def plan_unet_within_compute(
        self, build, spacing, spacing_reason, normalization, inherited: Topology | None = None
    ) -> Configuration:
        """``build`` (:meth:`plan_resunet` or :meth:`plan_aniso`), fitted to the compute budget when there is one
        (:meth:`planners.compute_ladder.ComputeLadder.plan_unet`; ``inherited``: the network ``build`` keeps for
        every candidate, ``autoseg_plan --like``)."""
        if self._ladder is None:
            return build(spacing, spacing_reason, normalization)
        return self._ladder.plan_unet(build, spacing, spacing_reason, normalization, inherited)

    def plan_pspnet_within_compute(
        self, spacing, spacing_reason, normalization, symmetry: Symmetry | None = None
    ) -> Configuration:
        """:meth:`plan_pspnet`, its epochs fitted to the compute budget when there is one."""
        if self._ladder is None:
            return self.plan_pspnet(spacing, spacing_reason, normalization, symmetry)
        return self._ladder.plan_pspnet(spacing, spacing_reason, normalization, symmetry)

    # -- decisions shared by every configuration ------------------------------------------------

    def histeq_variant(self, configuration: Configuration) -> Configuration:
        """``NAME_histeq`` (:func:`autoseg.plan.topology.histeq_twin`), sharing the compute-budget estimate of ``NAME``."""
        twin = histeq_twin(configuration, self.fingerprint.channels)
        if self._ladder is not None:
            self._ladder.share(configuration.name, twin.name)
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
            configuration = self.plan_pspnet_within_compute(spacing, spacing_reason, normalization, symmetry)
        else:
            build = functools.partial(self.plan_resunet, symmetry=symmetry)
            configuration = self.plan_unet_within_compute(build, spacing, spacing_reason, normalization)
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
