"""Building blocks the planners compose: network topology from a patch and spacing, fitting a patch
and batch to a memory budget, target spacing, normalization per channel.

All shapes and spacings are in (x, y, z) order; spacing in mm, shapes in voxels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from autoseg.errors import UsageError
from autoseg.plans import (
    HISTEQ_IDENTIFIER_SUFFIX,
    NORMALIZATION_SCHEMES,
    Configuration,
    Normalization,
    histeq_name,
)

if TYPE_CHECKING:  # autoseg.plan.fingerprint imports autoseg.preprocess.symmetry, which imports this module
    from autoseg.plan.fingerprint import ChannelFingerprint, DatasetAggregate

#: An axis is only downsampled while it keeps at least this many voxels.
MIN_EDGE_VOXELS = 4
#: Features double per stage from ``BASE_FEATURES`` up to the cap (nnU-Net's widths).
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
MAX_FEATURES_2D = 512
MAX_STAGES = 6
#: The residual U-Net layout new plans get (``autoseg.plans.UNET_LAYOUTS``; ``autoseg_plan --unet-layout`` chooses
#: another): nnU-Net's residual-encoder layout, about 3/4 of the ``residual`` layout's multiply-accumulates at equal
#: widths (``documentation/benchmarks.md``, "A faster CPU step"). The compute probe times networks of this layout.
PLANNED_UNET_LAYOUT = "residual_encoder"
#: Why each layout, for the plan's ``network`` reason.
UNET_LAYOUT_REASONS = {
    "residual_encoder": "layout residual_encoder (nnU-Net's residual encoder: the first residual block of each "
    "stage downsamples, one conv per decoder level; about 3/4 of the residual layout's operations at these widths)",
    "residual": "layout residual (a strided conv opens each stage, one residual block per decoder level)",
}
#: ``autoseg_plan --normalization``: each modality's z-score scheme (default) or histogram equalization.
NORMALIZATION_OPTIONS = ("zscore", "histeq")


@dataclass(frozen=True)
class Topology:
    """Per-stage numbers of a U-Net: strides into each stage, kernel sizes, feature widths."""

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.prod(np.array(self.strides), axis=0))


def unet_topology(
    patch_size: tuple[int, ...],
    spacing: tuple[float, ...],
    never_downsample: tuple[int, ...] = (),
    max_features: int = MAX_FEATURES_3D,
    base_features: int = BASE_FEATURES,
) -> Topology:
    """Strides and kernels for a patch, nnU-Net style.

    At each stage an axis is downsampled by 2 when it keeps at least ``MIN_EDGE_VOXELS`` voxels and
    its spacing is at most twice the finest spacing at that stage (so a coarse axis waits until
    the others have caught up). A kernel is 1 along an axis whose spacing is more than twice the
    finest (e.g. 1x3x3 for 5 mm slices at 0.9 mm in-plane), else 3. Axes in ``never_downsample``
    keep stride 1 throughout (the CTP paper's 2x2x1 pooling).
    """
    size = np.array(patch_size, float)
    current = np.array(spacing, float)
    strides, kernels = [tuple([1] * len(patch_size))], []
    for _ in range(MAX_STAGES):
        finest = current.min()
        kernels.append(tuple(3 if s <= 2 * finest else 1 for s in current))
        if len(strides) == MAX_STAGES:
            break
        stride = tuple(
            2
            if (axis not in never_downsample and size[axis] / 2 >= MIN_EDGE_VOXELS and current[axis] <= 2 * finest)
            else 1
            for axis in range(len(patch_size))
        )
        if max(stride) == 1:
            break
        strides.append(stride)
        size, current = size / np.array(stride), current * np.array(stride)
    kernels = kernels[: len(strides)]
    features = tuple(min(base_features * 2**i, max_features) for i in range(len(strides)))
    return Topology(tuple(strides), tuple(kernels), features)


def round_to_multiple(patch: tuple[float, ...], divisor: tuple[int, ...], mode: str = "up") -> tuple[int, ...]:
    """Each edge rounded ``up`` or to the ``nearest`` multiple of ``divisor``, never below one multiple."""
    rounding = np.ceil if mode == "up" else np.round
    return tuple(int(max(step, rounding(edge / step) * step)) for edge, step in zip(patch, divisor))


def fit_patch_to_memory_budget(
    start: tuple[int, ...],
    spacing: tuple[float, ...],
    memory_of: Callable[[tuple[int, ...], Topology, int], int],
    memory_budget_bytes: float,
    batch_size: int = 2,
    never_downsample: tuple[int, ...] = (),
    widths: tuple[int, int] = (BASE_FEATURES, MAX_FEATURES_3D),
    topology: Topology | None = None,
) -> tuple[tuple[int, ...], Topology, int]:
    """Shrink ``start`` until the training memory of ``batch_size`` patches fits ``memory_budget_bytes`` (the memory budget).

    Each step shortens the edge that is longest in mm (keeping the patch close to isotropic in
    world space) by that axis's total stride, then re-derives the topology and rounds every edge up
    to a multiple of the total stride (a patch a few voxels larger than the volume is padded).

    ``widths``: (features of the first stage, cap); features double per stage. ``topology``: a network given as it
    is (``autoseg_plan --like``: the model's), kept for every patch instead of being derived from it; ``widths`` and
    ``never_downsample`` are then unused.

    Returns:
        (patch size in voxels, topology, estimated bytes at ``batch_size``).

    Raises:
        UsageError: the memory budget is too small for a U-Net of two resolution stages (one line, with the fix).
    """
    patch, given = tuple(int(v) for v in start), topology
    for _ in range(10_000):
        topology = given or unet_topology(patch, spacing, never_downsample, widths[1], widths[0])
        patch = round_to_multiple(patch, topology.total_stride)
        topology = given or unet_topology(patch, spacing, never_downsample, widths[1], widths[0])
        if len(topology.features) < 2:
            raise UsageError(
                f"a memory budget of {memory_budget_bytes / 2**30:g} GB cannot hold {batch_size} patches of even the "
                f"smallest U-Net autoseg plans (two resolution stages, patch {'x'.join(map(str, patch))} shrunk "
                "below); give more memory (--gpu-memory-gb)"
            )
        needed = memory_of(patch, topology, batch_size)
        if needed <= memory_budget_bytes or all(p <= s for p, s in zip(patch, topology.total_stride)):
            return patch, topology, needed
        extent = np.array(patch) * np.array(spacing)
        extent[[a for a in range(len(patch)) if patch[a] <= topology.total_stride[a]]] = -1
        axis = int(np.argmax(extent))
        patch = tuple(p - topology.total_stride[axis] if a == axis else p for a, p in enumerate(patch))
    raise RuntimeError("patch fitting did not converge")


def largest_batch(
    per_sample_bytes: float, fixed_bytes: float, memory_budget_bytes: float, minimum: int = 2, maximum: int = 64
) -> int:
    """Most samples that fit ``memory_budget_bytes`` given the per-sample and fixed costs, within [minimum, maximum]."""
    fits = int((memory_budget_bytes - fixed_bytes) // max(per_sample_bytes, 1.0))
    return int(min(maximum, max(minimum, fits)))


def target_spacing(aggregate: DatasetAggregate, anisotropy_threshold: float = 3.0) -> tuple[tuple[float, ...], str]:
    """Median spacing; for strongly anisotropic data the coarse axis takes the 10th percentile of
    its spacings instead (nnU-Net's rule: fewer interpolated slices for the thick-slice cases).

    Returns:
        (spacing in mm (x, y, z), reason).
    """
    median = np.array(aggregate.median_spacing, float)
    ratio = float(aggregate.anisotropy_ratio)
    if ratio < anisotropy_threshold:
        return tuple(round(float(v), 4) for v in median), (
            f"median spacing of the training cases; anisotropy {ratio:.2f} < {anisotropy_threshold} so no axis is special"
        )
    coarse = int(aggregate.coarse_axis)
    low = float(aggregate.spacing_percentile_10[coarse])
    others = max(float(v) for i, v in enumerate(median) if i != coarse)
    median[coarse] = max(low, others)
    return tuple(round(float(v), 4) for v in median), (
        f"median in-plane spacing; the coarse axis {coarse} ({float(aggregate.median_spacing[coarse]):.2f} mm median, "
        f"anisotropy {ratio:.1f}) takes its 10th percentile {low:.2f} mm so thick-slice scans are not over-interpolated"
    )


def channel_normalization(channel: ChannelFingerprint, option: str = "zscore") -> tuple[Normalization, str]:
    """Normalization of one fingerprinted channel, with the reason.

    Args:
        channel: the channel's entry of the fingerprint.
        option: ``zscore`` (default): the z-score scheme of the channel's modality; ``histeq``: histogram
            equalization within the foreground mask, whatever the modality (``autoseg_plan --normalization histeq``).

    Raises:
        ValueError: an option not in ``NORMALIZATION_OPTIONS``.
    """
    name, modality = channel.name, channel.modality
    if option not in NORMALIZATION_OPTIONS:
        raise UsageError(f"unknown normalization option '{option}', use one of {list(NORMALIZATION_OPTIONS)}")
    if option == "histeq":
        return scheme_normalization(channel, "histogram_equalization"), (
            f"{name}: histogram equalization within the non-zero (brain) region, as asked (--normalization histeq): "
            "each case's foreground is mapped through its own cumulative histogram to a uniform distribution, "
            "scaled to zero mean and unit std, which raises the contrast between lesion and neighbouring tissue "
            "(Bhavnani et al., paper 002: with symmetric context, Dice 0.389 -> 0.499 on ATLAS)"
            + ("" if modality == "MRI" else f"; note that {name}'s physical units ({modality}) are given up")
        )
    if modality == "MRI":
        return scheme_normalization(channel, "zscore_foreground"), (
            f"{name} is MRI: arbitrary units that vary by scanner, so z-score each case within its non-zero region"
        )
    normalization = scheme_normalization(channel, "clip_zscore_dataset")
    what = (
        "CT: Hounsfield units are comparable across scans"
        if modality == "CT"
        else (f"a perfusion map: its physical units (e.g. {name}) carry the lesion contrast")
    )
    return normalization, (
        f"{name} is {what}, so clip to the dataset foreground 0.5–99.5 percentiles {list(normalization.clip)} and "
        f"z-score with the dataset mean {normalization.mean} and std {normalization.std}"
    )


def scheme_normalization(channel: ChannelFingerprint, scheme: str) -> Normalization:
    """``channel`` normalized by ``scheme`` (one of ``autoseg.plans.NORMALIZATION_SCHEMES``); the statistics
    ``clip_zscore_dataset`` needs (foreground 0.5/99.5 percentiles, mean, std) are the fingerprinted channel's.

    Raises:
        UsageError: an unknown scheme.
    """
    if scheme not in NORMALIZATION_SCHEMES:
        raise UsageError(f"unknown normalization scheme '{scheme}', use one of {list(NORMALIZATION_SCHEMES)}")
    if scheme != "clip_zscore_dataset":
        return Normalization(channel=channel.name, scheme=scheme)
    stats = channel.foreground
    return Normalization(
        channel=channel.name,
        scheme=scheme,
        clip=(round(stats.p00_5, 4), round(stats.p99_5, 4)),
        mean=round(stats.mean, 4),
        std=round(max(stats.std, 1e-8), 4),
    )


def histeq_twin(configuration: Configuration, channels: Sequence[ChannelFingerprint]) -> Configuration:
    """``NAME_histeq``: the z-score configuration ``NAME`` with every channel histogram-equalized
    (``autoseg_plan --normalization histeq``), everything else unchanged (normalization changes neither memory nor
    time), so cross-validation compares the normalization alone. Its own name keeps its results apart from the
    z-score run's (``AUTOSEG_RESULTS/<dataset>/NAME_histeq/``), its own data folder its preprocessed data.

    Args:
        configuration: a z-score configuration.
        channels: the fingerprint's ``channels`` (name and modality of each).
    """
    name = histeq_name(configuration.name)
    normalization = [channel_normalization(channel, "histeq") for channel in channels]
    identifier = configuration.data_identifier + HISTEQ_IDENTIFIER_SUFFIX
    reasons = {
        **configuration.reasons,
        "normalization": "; ".join(reason for _, reason in normalization),
        "name": f"{name}: {configuration.name} with histogram equalization, under a name of its own so its "
        "results sit beside the z-score run's and cross-validation can compare the two",
        "data_identifier": f"{identifier}: histogram-equalized data get their own folder beside the z-score one",
    }
    return dataclasses.replace(
        configuration,
        name=name,
        normalization=tuple(n for n, _ in normalization),
        data_identifier=identifier,
        reasons=reasons,
    )
