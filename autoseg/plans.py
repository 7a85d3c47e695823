"""Plans: what the planner decided, as frozen dataclasses read from and written to ``plans.json``.

Every configuration carries ``reasons``: one short sentence per decision, keyed by field name.
A user may edit ``plans.json`` (a patch size, a batch size); ``Plans.from_json`` re-validates it and
reports every invalid edit with the field it concerns. A configuration's ``patch_size`` and ``batch_size`` must equal
its last stage's (inference reads the former, training the latter). Reading and writing is ``autoseg.io.typed_json``'s,
shared with ``fingerprint.json`` and ``CASE.json``; every dataclass takes keyword arguments only.

Shapes and spacings are in (x, y, z) order, spacing in mm. For 2-D configurations ``patch_size``
has two entries: the in-plane axes, i.e. all axes except ``slice_axis``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io.typed_json import read_typed, write_typed
from autoseg.labels import declared_label_problems

#: 2: ``schedule.optimizer`` and ``schedule.lr_schedule`` are gone (the trainer class decides both); version 1
#: plans are read with them dropped (:func:`_upgrade`).
SCHEMA_VERSION = 2
#: Fields of ``schedule`` that version 1 wrote and no code read.
RETIRED_SCHEDULE_FIELDS = ("optimizer", "lr_schedule")
NORMALIZATION_SCHEMES = ("zscore_foreground", "clip_zscore_dataset", "histogram_equalization")
#: A configuration with a histogram-equalized channel keeps its preprocessed data in a folder whose name holds this,
#: so it never overwrites the z-score data of the same configuration.
HISTEQ_IDENTIFIER_SUFFIX = "_histeq"
#: Configuration names: ``BASE[_sym][_histeq]``. The planner names a histogram-equalized configuration ``NAME_histeq``
#: (its results folder sits beside the z-score one's) and a symmetric one ``BASE_sym`` (``3d_resunet_sym``).
HISTEQ_NAME_SUFFIX = "_histeq"
SYMMETRIC_NAME_SUFFIX = "_sym"
LOSSES = ("dice_bce", "dice_bce_focal", "focal", "weighted_ce")
#: ``network.layout`` of a ResidualUNet (``autoseg.networks.residual_unet``): ``residual`` (a strided conv opens each
#: encoder stage, one residual block per decoder level; what a plan without the field was trained with) and
#: ``residual_encoder`` (the first residual block of a stage downsamples, one conv per decoder level: nnU-Net's
#: ``ResidualEncoderUNet`` layout).
UNET_LAYOUTS = ("residual", "residual_encoder")

# Limits of what a plan may ask for. They refuse nonsense (an edited or hostile ``plans.json``, a model file's plans)
# before anything is built or allocated, and lie far beyond anything a planner of autoseg plans.
#: Target spacing in mm: clinical MRI and CT voxels measure about 0.2 to 10 mm.
TARGET_SPACING_RANGE_MM = (0.01, 100.0)
#: Channels of the widest network stage: ResNet-50's last layer has 2048; the U-Net planners stop at 320 (3-D)
#: and 512 (2-D).
MAX_FEATURES = 2048
#: Largest kernel edge: the planners use 1 and 3.
MAX_KERNEL_SIZE = 7
#: Voxels of the largest patch: 2**25, e.g. 320 x 320 x 320, more than three whole brains at 1 mm (about
#: 200 x 240 x 200 each); one float32 feature map of 32 channels at this size already takes 4 GiB.
MAX_PATCH_VOXELS = 2**25
#: Largest minimum lesion size in mm³: 100 ml, the volume of a large infarct (``autoseg_find_best`` tries up to
#: 1000 voxels, 1 ml at 1 mm); a larger minimum removes nearly every real lesion.
MAX_MIN_LESION_MM3 = 1e5


def histeq_name(name: str) -> str:
    """The histogram-equalized variant's name: ``3d_resunet`` -> ``3d_resunet_histeq`` (unchanged if it is one)."""
    return name if name.endswith(HISTEQ_NAME_SUFFIX) else name + HISTEQ_NAME_SUFFIX


def zscore_name(name: str) -> str:
    """The z-score twin's name: ``3d_resunet_sym_histeq`` -> ``3d_resunet_sym`` (unchanged if it is one)."""
    return name.removesuffix(HISTEQ_NAME_SUFFIX)


def symmetric_name(name: str) -> str:
    """The symmetric variant's name: ``3d_resunet`` -> ``3d_resunet_sym``, ``3d_resunet_histeq`` ->
    ``3d_resunet_sym_histeq`` (unchanged if it is one)."""
    plain, histeq = zscore_name(name), name.endswith(HISTEQ_NAME_SUFFIX)
    symmetric = plain if plain.endswith(SYMMETRIC_NAME_SUFFIX) else plain + SYMMETRIC_NAME_SUFFIX
    return symmetric + (HISTEQ_NAME_SUFFIX if histeq else "")


def asymmetric_name(name: str) -> str:
    """The name without symmetric channels: ``3d_resunet_sym_histeq`` -> ``3d_resunet_histeq``."""
    plain, histeq = zscore_name(name), name.endswith(HISTEQ_NAME_SUFFIX)
    return plain.removesuffix(SYMMETRIC_NAME_SUFFIX) + (HISTEQ_NAME_SUFFIX if histeq else "")


class PlansError(AutosegError, ValueError):
    """``plans.json`` is missing, malformed, or asks for something invalid; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class Normalization:
    """Intensity normalization of one channel.

    ``zscore_foreground``: subtract the case's own foreground mean, divide by its std (MRI).
    ``clip_zscore_dataset``: clip to ``clip`` (dataset foreground 0.5/99.5 percentiles), then
    subtract ``mean`` and divide by ``std`` (dataset foreground statistics; CT, perfusion maps).
    ``histogram_equalization``: equalize the case's own histogram within its foreground (brain) mask, so the
    foreground becomes uniformly distributed, scaled to zero mean and unit standard deviation (Bhavnani et al.,
    paper 002; see ``autoseg.preprocess.preprocessing.equalize_histogram``).
    """

    channel: str
    scheme: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True, kw_only=True)
class Resampling:
    """How images and labels are resampled to the target spacing.

    Images use a spline of ``image_order``; with ``separate_axis`` set (strongly anisotropic data)
    that axis is interpolated separately with ``separate_axis_order`` (0 nearest, 1 linear).
    Labels: linear interpolation of each label's one-hot map, then argmax.
    """

    image_order: int = 3
    separate_axis: int | None = None
    separate_axis_order: int = 0


@dataclass(frozen=True, kw_only=True)
class Network:
    """Network architecture and its numbers.

    ``ResidualUNet``: one entry per resolution stage in ``features`` (channels), ``strides``
    (per-axis downsampling into the stage; the first is all ones) and ``kernel_sizes``; ``layout`` one of
    :data:`UNET_LAYOUTS` (``residual`` when absent: plans written before the field).
    ``PSPNet``: ResNet ``backbone`` (resnet18/34/50) with dilation for ``output_stride`` 8 and a
    pyramid pooling module with ``pyramid_bins``; ``pretrained``: a local weights file to start from
    (torchvision ResNet or autoseg PSPNet state dict), null for none; ``autoseg_train --pretrained`` wins.
    """

    architecture: str
    features: tuple[int, ...] = ()
    strides: tuple[tuple[int, ...], ...] = ()
    kernel_sizes: tuple[tuple[int, ...], ...] = ()
    deep_supervision: bool = True
    backbone: str | None = None
    output_stride: int | None = None
    pyramid_bins: tuple[int, ...] = ()
    pretrained: str | None = None
    layout: str = UNET_LAYOUTS[0]

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis: patch edges must be divisible by it."""
        if self.architecture == "PSPNet":
            return (self.output_stride or 8,) * 2
        return tuple(int(v) for v in np.prod(np.array(self.strides), axis=0))


@dataclass(frozen=True, kw_only=True)
class Loss:
    """Loss terms and weights: ``dice_bce`` = dice_weight·soft Dice + bce_weight·BCE, plus
    focal_weight·focal(γ, α) for ``dice_bce_focal``; ``focal`` alone; ``weighted_ce`` with
    ``positive_weight`` on lesion voxels; any of them plus lesion_dice_weight·lesion-wise Dice (every lesion
    counted equally, see ``autoseg.train.losses.LesionWiseDiceLoss``)."""

    name: str
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    focal_weight: float = 0.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    positive_weight: float = 1.0
    lesion_dice_weight: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Patch sampling: share of patches forced to contain lesion, and how far (as a fraction of
    the patch edge) a lesion-centred patch may be shifted so lesions are not always centred."""

    foreground_oversampling: float = 0.33
    max_offset_fraction: float = 0.5
    #: how a lesion-forced patch picks its lesion voxel: ``voxel`` (any lesion voxel, so large lesions dominate)
    #: or ``lesion`` (a connected lesion first, uniformly, then a voxel of it: small lesions are seen as often).
    lesion_choice: str = "voxel"


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage: from ``start_epoch`` on, train with this patch, batch and learning rate.

    ``trainable``: ``all`` or ``new_layers`` (pre-trained backbone frozen)."""

    name: str
    start_epoch: int
    patch_size: tuple[int, ...]
    batch_size: int
    learning_rate: float
    trainable: str = "all"


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Training length and stages; ``stages`` in order of ``start_epoch`` (the first starts at 0).

    The optimizer and the learning-rate curve are the ``trainer`` class's (``Trainer.build_optimizer``,
    ``Trainer.learning_rate``); plans of schema version 1 also named them (``optimizer``, ``lr_schedule``), which no
    code read: they are dropped when such plans are read (see ``RETIRED_SCHEDULE_FIELDS``).
    """

    trainer: str
    epochs: int
    iterations_per_epoch: int
    stages: tuple[Stage, ...]
    restart_period_epochs: int | None = None
    plateau_patience_epochs: int | None = None
    early_stopping_patience_epochs: int | None = None
    #: validation batches per epoch for the pseudo-Dice; None: a fifth of ``iterations_per_epoch``.
    val_iterations_per_epoch: int | None = None


@dataclass(frozen=True, kw_only=True)
class Symmetry:
    """Symmetric-hemisphere channels (``autoseg.preprocess.symmetry``; the acute stroke paper's symmetric modality
    augmentation): after preprocessing, every channel is flipped across the mid-sagittal plane, the flip rigidly
    registered onto the original and appended; the network sees ``channels_per_input`` times the plans' channels.

    Attributes:
        reference_channel: the channel the mirror transform is fitted on; the other channels reuse it (the paper
            registers one modality and applies its transform to the rest).
        difference: also append original − mirror per channel (three channels per input channel instead of two).
        in_plane: fit only a rotation about the slice axis and an in-plane shift (thin slabs, where a few thick
            slices cannot pin down out-of-plane tilt).
    """

    reference_channel: int = 0
    difference: bool = False
    in_plane: bool = False

    @property
    def channels_per_input(self) -> int:
        """2 (original, mirror) or 3 (original, mirror, original − mirror)."""
        return 3 if self.difference else 2


def _dataset_statistics_valid(normalization: Normalization) -> bool:
    """Whether a ``clip_zscore_dataset`` normalization has finite clip bounds in order, a finite mean and a
    positive finite std."""
    clip, mean, std = normalization.clip, normalization.mean, normalization.std
    if clip is None or mean is None or std is None:
        return False
    return bool(np.isfinite([*clip, mean, std]).all()) and clip[0] <= clip[1] and std > 0


def input_channels(num_channels: int, symmetry: Symmetry | None) -> int:
    """Network input channels for ``num_channels`` image channels: times 2 or 3 with symmetric channels."""
    return num_channels * (symmetry.channels_per_input if symmetry is not None else 1)


@dataclass(frozen=True, kw_only=True)
class PostProcessing:
    """Binarize lesion probability at ``threshold``; drop components below ``min_lesion_mm3``."""

    threshold: float = 0.5
    min_lesion_mm3: float = 0.0

    def problems(self, prefix: str = "") -> list[str]:
        """Every value out of range, as ``PREFIXfield: what is wrong``: ``threshold`` in (0, 1) (a probability
        that some voxels reach and not all), ``min_lesion_mm3`` in [0, :data:`MAX_MIN_LESION_MM3`]."""
        found = []
        if not 0 < self.threshold < 1:
            found.append(f"{prefix}threshold: must lie in (0, 1), got {self.threshold}")
        if not 0 <= self.min_lesion_mm3 <= MAX_MIN_LESION_MM3:
            found.append(
                f"{prefix}min_lesion_mm3: must lie in [0, {MAX_MIN_LESION_MM3:g}] mm³ (100 ml, a large infarct; a "
                f"larger minimum removes nearly every lesion), got {self.min_lesion_mm3}"
            )
        return found


@dataclass(frozen=True, kw_only=True)
class Configuration:
    """One way to train on the dataset (``3d_resunet``, ``2d_pspnet``, ``3d_aniso``, ...)."""

    name: str
    dimension: int
    target_spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    network: Network
    normalization: tuple[Normalization, ...]
    resampling: Resampling
    loss: Loss
    sampling: Sampling
    schedule: Schedule
    postprocessing: PostProcessing
    mirror_axes: tuple[int, ...]
    estimated_memory_gb: float
    data_identifier: str
    slice_axis: int | None = None
    #: largest distance between neighbouring sliding windows at inference, as a fraction of the patch edge, in (0, 1].
    sliding_window_step: float = 0.5
    reasons: dict[str, str] = field(default_factory=dict)
    #: symmetric-hemisphere channels (``3d_resunet_sym``, ``2d_pspnet_sym``); None: the channels as they are.
    symmetry: Symmetry | None = None

    def input_channels(self, num_channels: int) -> int:
        """Channels the network takes for ``num_channels`` image channels (more with ``symmetry``)."""
        return input_channels(num_channels, self.symmetry)

    def problems(self, num_channels: int) -> list[str]:
        """Every inconsistency, as ``configuration.field: what is wrong``."""
        where = f"configurations.{self.name}"
        found = []
        if self.dimension not in (2, 3):
            found.append(f"{where}.dimension: must be 2 or 3, got {self.dimension}")
        low, high = TARGET_SPACING_RANGE_MM
        if len(self.target_spacing) != 3 or not all(low <= s <= high for s in self.target_spacing):
            found.append(
                f"{where}.target_spacing: needs 3 values in [{low:g}, {high:g}] mm, got {list(self.target_spacing)}"
            )
        if len(self.median_shape) != 3 or min(self.median_shape) < 1:
            found.append(f"{where}.median_shape: needs 3 positive voxel counts, got {list(self.median_shape)}")
        found += self._channel_problems(where, num_channels)
        if self.loss.name not in LOSSES:
            found.append(f"{where}.loss.name: unknown loss '{self.loss.name}', use one of {list(LOSSES)}")
        if not 0 < self.sliding_window_step <= 1:
            found.append(
                f"{where}.sliding_window_step: must lie in (0, 1] (a fraction of the patch), got "
                f"{self.sliding_window_step}"
            )
        found += self.postprocessing.problems(f"{where}.postprocessing.")
        found += self._axis_problems(where)
        if not 0 <= self.sampling.foreground_oversampling <= 1:
            found.append(f"{where}.sampling.foreground_oversampling: must lie in [0, 1]")
        if self.sampling.lesion_choice not in ("voxel", "lesion"):
            found.append(f"{where}.sampling.lesion_choice: use voxel or lesion, got '{self.sampling.lesion_choice}'")
        network = self._network_problems(where)
        found += network
        found += self._patch_problems(where, "patch_size", self.patch_size, self.batch_size, not network)
        for index, stage in enumerate(self.schedule.stages):
            found += self._patch_problems(
                where, f"schedule.stages[{index}].patch_size", stage.patch_size, stage.batch_size, not network
            )
        found += self._last_stage_problems(where)
        starts = [stage.start_epoch for stage in self.schedule.stages]
        if not starts or starts[0] != 0 or starts != sorted(starts) or starts[-1] >= self.schedule.epochs:
            found.append(
                f"{where}.schedule.stages: start epochs {starts} must begin at 0, increase, and stay below "
                f"epochs={self.schedule.epochs}"
            )
        return found

    def _axis_problems(self, where: str) -> list[str]:
        """Mirror axes (spatial axes of the network's input: 0..dimension-1, each once), the 2-D slice axis and the
        resampling's axis and spline orders (scipy's 0..5)."""
        found = []
        axes = list(self.mirror_axes)
        if len(set(axes)) != len(axes) or not all(0 <= a < self.dimension for a in axes):
            found.append(
                f"{where}.mirror_axes: each of 0..{self.dimension - 1} at most once (the network's spatial axes), "
                f"got {axes}"
            )
        if self.slice_axis is not None and not 0 <= self.slice_axis <= 2:
            found.append(f"{where}.slice_axis: must be 0, 1 or 2, got {self.slice_axis}")
        resampling = self.resampling
        if resampling.separate_axis is not None and not 0 <= resampling.separate_axis <= 2:
            found.append(f"{where}.resampling.separate_axis: must be 0, 1, 2 or null, got {resampling.separate_axis}")
        for name in ("image_order", "separate_axis_order"):
            if not 0 <= getattr(resampling, name) <= 5:
                found.append(f"{where}.resampling.{name}: a spline order in 0..5, got {getattr(resampling, name)}")
        return found

    def _last_stage_problems(self, where: str) -> list[str]:
        """The configuration's ``patch_size`` and ``batch_size`` are the last stage's: inference and the memory
        estimate read the former, training the latter, so the two must agree."""
        if not self.schedule.stages:
            return []
        last, index = self.schedule.stages[-1], len(self.schedule.stages) - 1
        return [
            f"{where}.{name}: {list(mine) if isinstance(mine, tuple) else mine} differs from "
            f"schedule.stages[{index}].{name} {list(theirs) if isinstance(theirs, tuple) else theirs}: the last "
            "stage trains with what inference uses; make the two agree"
            for name, mine, theirs in (
                ("patch_size", self.patch_size, last.patch_size),
                ("batch_size", self.batch_size, last.batch_size),
            )
            if mine != theirs
        ]

    def _channel_problems(self, where: str, num_channels: int) -> list[str]:
        """Normalization entries, their schemes and data folder, and the symmetry's reference channel."""
        found = []
        if len(self.normalization) != num_channels:
            found.append(f"{where}.normalization: {len(self.normalization)} entries for {num_channels} channels")
        found += [
            f"{where}.normalization[{n.channel}]: unknown scheme '{n.scheme}', use one of {list(NORMALIZATION_SCHEMES)}"
            for n in self.normalization
            if n.scheme not in NORMALIZATION_SCHEMES
        ]
        found += [
            f"{where}.normalization[{n.channel}]: clip_zscore_dataset needs clip [low, high] (low <= high), mean "
            f"and a positive std, all finite; got clip={n.clip}, mean={n.mean}, std={n.std}"
            for n in self.normalization
            if n.scheme == "clip_zscore_dataset" and not _dataset_statistics_valid(n)
        ]
        histeq = any(n.scheme == "histogram_equalization" for n in self.normalization)
        if histeq and HISTEQ_IDENTIFIER_SUFFIX not in self.data_identifier:
            found.append(
                f"{where}.data_identifier: '{self.data_identifier}' is the folder of z-score data; a histogram-"
                f"equalized configuration needs its own, e.g. '{self.data_identifier}{HISTEQ_IDENTIFIER_SUFFIX}'"
            )
        if histeq and not self.name.endswith(HISTEQ_NAME_SUFFIX):
            found.append(
                f"{where}.name: a histogram-equalized configuration needs a name of its own, e.g. "
                f"'{histeq_name(self.name)}' (key and name), so its results do not land in the z-score "
                "run's folder"
            )
        if self.symmetry is not None and not 0 <= self.symmetry.reference_channel < num_channels:
            found.append(
                f"{where}.symmetry.reference_channel: must name one of the {num_channels} channels (0.."
                f"{num_channels - 1}), got {self.symmetry.reference_channel}"
            )
        return found

    def _network_problems(self, where: str) -> list[str]:
        net = self.network
        if net.architecture == "PSPNet":
            found = []
            if net.backbone not in ("resnet18", "resnet34", "resnet50"):
                found.append(f"{where}.network.backbone: use resnet18, resnet34 or resnet50, got {net.backbone}")
            if net.output_stride not in (None, 8, 16, 32):
                found.append(f"{where}.network.output_stride: use 8, 16 or 32, got {net.output_stride}")
            if not all(1 <= b <= 64 for b in net.pyramid_bins):
                found.append(
                    f"{where}.network.pyramid_bins: grid sizes in 1..64 (PSPNet's are 1, 2, 3, 6), got "
                    f"{list(net.pyramid_bins)}"
                )
            return found
        if net.architecture != "ResidualUNet":
            return [f"{where}.network.architecture: unknown '{net.architecture}', use ResidualUNet or PSPNet"]
        if net.layout not in UNET_LAYOUTS:
            return [f"{where}.network.layout: unknown '{net.layout}', use {' or '.join(UNET_LAYOUTS)}"]
        lengths = {len(net.features), len(net.strides), len(net.kernel_sizes)}
        if len(net.features) < 2:
            return [f"{where}.network.features: a U-Net needs at least 2 stages, got {list(net.features)}"]
        if len(lengths) != 1:
            return [
                f"{where}.network: features, strides and kernel_sizes need one entry per stage, got lengths "
                f"{len(net.features)}, {len(net.strides)}, {len(net.kernel_sizes)}"
            ]
        wrong = [s for s in (*net.strides, *net.kernel_sizes) if len(s) != self.dimension]
        if wrong:
            return [f"{where}.network: every stride and kernel needs {self.dimension} entries, found {list(wrong[0])}"]
        found = [
            f"{where}.network.features[{i}]: must lie in 1..{MAX_FEATURES} channels (ResNet-50's widest layer), "
            f"got {width}"
            for i, width in enumerate(net.features)
            if not 1 <= width <= MAX_FEATURES
        ]
        found += [
            f"{where}.network.strides[{i}]: must be positive, got {list(stride)}"
            for i, stride in enumerate(net.strides)
            if min(stride) < 1
        ]
        found += [
            f"{where}.network.kernel_sizes[{i}]: each edge in 1..{MAX_KERNEL_SIZE}, got {list(kernel)}"
            for i, kernel in enumerate(net.kernel_sizes)
            if not all(1 <= k <= MAX_KERNEL_SIZE for k in kernel)
        ]
        return found

    def _patch_problems(
        self, where: str, name: str, patch: tuple[int, ...], batch: int, network_valid: bool
    ) -> list[str]:
        found = []
        if len(patch) != self.dimension:
            return [f"{where}.{name}: needs {self.dimension} entries, got {list(patch)}"]
        if batch < 1:
            found.append(f"{where}: batch size must be at least 1, got {batch}")
        elif batch < 2 and self.network.architecture == "PSPNet":
            found.append(
                f"{where}: a PSPNet trains with batches of 2 or more (its pyramid's 1x1 bin normalizes one "
                f"value per channel and sample), got {batch}"
            )
        if min(patch) < 1 or int(np.prod(patch, dtype=np.float64)) > MAX_PATCH_VOXELS:
            return [
                *found,
                f"{where}.{name}: {list(patch)} must be positive and hold at most {MAX_PATCH_VOXELS:,} voxels "
                "(e.g. 320 x 320 x 320, more than three whole brains at 1 mm)",
            ]
        if not network_valid:  # no total stride to divide by
            return found
        divisor = self.network.total_stride
        if len(divisor) == len(patch) and any(p % d for p, d in zip(patch, divisor)):
            found.append(
                f"{where}.{name}: {list(patch)} must be positive and divisible by the network's total "
                f"stride {list(divisor)}"
            )
        return found


@dataclass(frozen=True, kw_only=True)
class ComputeBudget:
    """What a compute budget (``autoseg_plan --budget-minutes M --device D``) made of the plans.

    Attributes:
        device: ``cpu`` or ``cuda``: where training is planned to run.
        minutes: the budget for training one fold, the end-of-fold validation included.
        precision: the precision the estimate was measured under (``fp32``, ``bf16``, ``fp16``).
        estimated_minutes: estimated wall time of one fold of ``configuration``.
        seconds_per_iteration: estimated seconds per training iteration (network step and the loader's share).
        iterations: training iterations planned (epochs x iterations per epoch).
        configuration: the configuration these figures describe (the default one).
        memory_format: ``channels_last_3d`` or ``contiguous``, whichever trained faster in the probe.
        data_processes: background augmentation processes for training (0: batches made in the training process,
            between steps, which on a few CPU cores beats processes competing with the network for them).
        estimates: per configuration: ``estimated_minutes``, ``seconds_per_iteration``, ``iterations`` and the
            parts of the estimate in minutes (training, per-epoch validation, overhead, final validation).
        probe: the timed probe the estimate comes from (machine, date, probed networks; cached under
            ``AUTOSEG_HOME/compute_probes``).
        reasons: why each trade-off was made (resolution, width, patch, iterations).
    """

    device: str
    minutes: float
    precision: str
    estimated_minutes: float
    seconds_per_iteration: float
    iterations: int
    configuration: str
    memory_format: str = "contiguous"
    data_processes: int = 2
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Plans:
    """Everything the planner decided for one dataset.

    ``coregister_channels`` is ``dataset.json``'s declaration, recorded so that every stage that reads a case for
    these plans (preprocessing, prediction, also from a model file) registers a channel on another grid than channel
    0 onto it the same way (``autoseg.data.coregistration``); ``reasons.coregister_channels`` says so when it is set.
    """

    dataset: str
    planner: str
    channels: tuple[str, ...]
    modalities: tuple[str, ...]
    labels: dict[str, int]
    default_configuration: str
    configurations: dict[str, Configuration]
    schema_version: int = SCHEMA_VERSION
    memory_budget_gb: float = 8.0
    reasons: dict[str, str] = field(default_factory=dict)
    #: set when the plans were fitted to a compute budget (``--budget-minutes``); None: planned for memory only.
    compute_budget: ComputeBudget | None = None
    #: channels on another grid than channel 0 are registered onto it (``dataset.json``'s ``coregister_channels``).
    coregister_channels: bool = False

    def configuration(self, name: str | None = None) -> Configuration:
        """The named configuration (default: ``default_configuration``).

        Raises:
            PlansError: unknown name; the message lists the configurations in the plan.
        """
        name = name or self.default_configuration
        if name not in self.configurations:
            raise PlansError(f"configuration '{name}' is not in the plans; available: {sorted(self.configurations)}")
        return self.configurations[name]

    def problems(self) -> list[str]:
        found = []
        if self.schema_version != SCHEMA_VERSION:
            found.append(
                f"schema_version: this autoseg reads version {SCHEMA_VERSION}, the file has {self.schema_version}"
            )
        if self.default_configuration not in self.configurations:
            found.append(
                f"default_configuration: '{self.default_configuration}' is not among {sorted(self.configurations)}"
            )
        found += [f"labels: {problem}" for problem in declared_label_problems(self.labels)]
        for name, configuration in self.configurations.items():
            if configuration.name != name:
                found.append(f"configurations.{name}.name: says '{configuration.name}'")
            found += configuration.problems(len(self.channels))
        return found

    def to_json(self, path: str | Path) -> None:
        """Write ``plans.json`` atomically."""
        write_typed(self, path)

    @classmethod
    def from_json(cls, path: str | Path) -> Plans:
        """Read and validate ``plans.json``.

        Raises:
            PlansError: missing file, unknown or missing fields, wrong types, invalid values — all listed.
        """
        plans = read_typed(cls, path, PlansError, "no plans found; run autoseg_plan first", upgrade=_upgrade)
        problems = plans.problems()
        if problems:
            raise PlansError(f"{path}: invalid plans:\n" + "\n".join(f"  {p}" for p in problems))
        return plans


def _upgrade(plain: Any) -> Any:
    """Version 1 plans as version 2: ``schedule.optimizer`` and ``schedule.lr_schedule`` dropped (never read; the
    trainer class decides both). Anything else, other versions included, is left for validation to judge."""
    if not isinstance(plain, dict) or plain.get("schema_version") != 1:
        return plain
    configurations = plain.get("configurations")
    for configuration in configurations.values() if isinstance(configurations, dict) else ():
        schedule = configuration.get("schedule") if isinstance(configuration, dict) else None
        for name in RETIRED_SCHEDULE_FIELDS if isinstance(schedule, dict) else ():
            schedule.pop(name, None)
    return {**plain, "schema_version": SCHEMA_VERSION}
