"""Dataset fingerprint: what the planner needs to know about the data, computed in one pass.

Each case is read once; the same pass verifies it (``autoseg.data.verify``), so a dataset with problems
is reported in full and no ``fingerprint.json`` is written.

Intensity statistics are taken over the *foreground*: the non-zero region of the case (the brain in
skull-stripped MRI, the head in CT, the perfused brain in perfusion maps). Lesion statistics use
26-connected components, as autoseg's metrics and the ISLES 2022 evaluation count lesions (the ATLAS R2.0 code counts
6-connected ones, ``autoseg.evaluate.protocols``).

``fingerprint.json`` is a :class:`Fingerprint`, read and written by ``autoseg.io.typed_json`` like the plans: an
unknown field or a wrong type is named, and a file of another ``schema_version`` is refused (re-run autoseg_plan).
Every field is described in ``documentation/plans_format.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.data.coregistration import ChannelFit
from autoseg.data.dataset import Case, RawDataset
from autoseg.data.verify import (
    Problem,
    VerificationError,
    lesion_free_problems,
    read_checked_case,
    training_cases,
    unmatched_label_files,
)
from autoseg.errors import AutosegError
from autoseg.io.geometry import CANONICAL_ORIENTATION, obliqueness_degrees
from autoseg.io.typed_json import from_plain, read_typed, to_plain, write_typed
from autoseg.parallel import map_cases
from autoseg.preprocess.preprocessing import bounding_box, crop_box
from autoseg.preprocess.symmetry import assess_case
from autoseg.preprocess.symmetry import summarize as summarize_symmetry

#: Foreground voxels sampled per case and channel for dataset-wide percentiles (as nnU-Net does).
SAMPLES_PER_CASE = 10_000
_PERFUSION_NAMES = ("cbf", "cbv", "mtt", "tmax", "ttp", "perfusion", "rcbf", "rcbv")
#: ``schema_version`` of ``fingerprint.json``; a file without one (written before it existed) is read as version 1.
FINGERPRINT_VERSION = 1
_RE_RUN = "; re-run autoseg_plan for this dataset to fingerprint it again"


class FingerprintError(AutosegError, ValueError):
    """``fingerprint.json`` is missing, malformed or of another version; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class IntensityStatistics:
    """Intensities of the non-zero (foreground) voxels of one channel: mean, std and 0.5/50/99.5 percentiles."""

    mean: float
    std: float
    p00_5: float
    p50: float
    p99_5: float


@dataclass(frozen=True, kw_only=True)
class ChannelFingerprint:
    """One channel: its name, its modality (``MRI``, ``CT``, ``perfusion``, :func:`modality_of`) and the dataset-wide
    foreground statistics (``SAMPLES_PER_CASE`` voxels sampled per case)."""

    name: str
    modality: str
    foreground: IntensityStatistics


@dataclass(frozen=True, kw_only=True)
class CaseFingerprint:
    """One case, measured in the canonical orientation: raw grid (x, y, z), non-zero box, crop, intensities per
    channel and lesion statistics (:func:`lesion_statistics`); ``symmetry``: ``autoseg.preprocess.symmetry.assess_case``'s
    record (None in fingerprints made before symmetric channels existed); ``coregistration``: for a dataset that
    declares ``coregister_channels``, the fit of each channel moved onto channel 0's grid (none when all share it),
    else None."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    nonzero_bbox: tuple[tuple[int, int], ...]
    cropped_shape: tuple[int, ...]
    intensity: tuple[IntensityStatistics, ...]
    lesion_volume_mm3: float | None
    lesion_components: int
    component_volumes_mm3: tuple[float, ...]
    lesion_fraction_of_foreground: float | None = None
    lesion_voxels_outside_nonzero: int
    hemisphere: str
    symmetry: dict[str, Any] | None = None
    coregistration: tuple[ChannelFit, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class DatasetAggregate:
    """The dataset-wide figures the planner decides from (``documentation/plans_format.md``, ``aggregate.*``).

    Distributions (``lesion_component_volumes_mm3``, ``case_lesion_volumes_mm3``) hold ``count`` and, when it is not
    0, ``min``, ``q25``, ``median``, ``q75``, ``max``; ``slices_along_coarse_axis`` ``min``, ``median``, ``max``.
    ``symmetry`` (``autoseg.preprocess.symmetry.summarize``), ``canonical_orientation`` and ``stored_orientations`` are None
    or empty in fingerprints made before they existed.
    """

    num_cases: int
    median_spacing: tuple[float, ...]
    spacing_percentile_10: tuple[float, ...]
    median_shape: tuple[float, ...]
    median_cropped_shape: tuple[float, ...]
    median_cropped_size_mm: tuple[float, ...]
    anisotropy_ratio: float
    coarse_axis: int
    slices_along_coarse_axis: dict[str, int | float]
    lesion_component_volumes_mm3: dict[str, int | float]
    share_of_lesions_below_1cm3: float
    case_lesion_volumes_mm3: dict[str, int | float]
    median_lesion_fraction_of_foreground: float
    cases_without_lesion: int
    lesion_free_cases: tuple[str, ...]
    hemispheres: dict[str, int]
    symmetry: dict[str, Any] | None = None
    canonical_orientation: str | None = None
    stored_orientations: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    """``fingerprint.json``: what the planner knows about a dataset (the planner reads nothing else).

    Attributes:
        dataset: the dataset folder's name.
        channels: one entry per image channel, in channel order.
        labels: label name -> value, from ``dataset.json``.
        aggregate: the dataset-wide figures.
        subjects: case -> subject.
        cases: case -> its own figures.
        notes: the verification notes, one line each.
    """

    schema_version: int = FINGERPRINT_VERSION
    dataset: str
    channels: tuple[ChannelFingerprint, ...]
    labels: dict[str, int]
    aggregate: DatasetAggregate
    subjects: dict[str, str]
    cases: dict[str, CaseFingerprint]
    notes: tuple[str, ...] = ()

    def to_json(self, path: str | Path) -> None:
        """Write ``fingerprint.json`` atomically."""
        write_typed(self, path)

    @classmethod
    def from_json(cls, path: str | Path) -> Fingerprint:
        """Read and check ``fingerprint.json``.

        Raises:
            FingerprintError: no file, unknown or missing fields, wrong types (each named), another schema version.
        """
        return read_typed(
            cls, path, FingerprintError, f"no fingerprint found{_RE_RUN}", hint=_RE_RUN, version=FINGERPRINT_VERSION
        )


@dataclass(frozen=True, kw_only=True)
class ChannelRange:
    """One channel's foreground intensities over the training cases (each case's non-zero region, as in
    ``cases.<case>.intensity``): ``(min, max)`` over the cases of each case's 0.5th, 50th and 99.5th percentile, and
    ``typical_width``, the median over the cases of their 99.5th minus 0.5th percentile (the intensity units of the
    files)."""

    name: str
    p00_5: tuple[float, float]
    p50: tuple[float, float]
    p99_5: tuple[float, float]
    typical_width: float


@dataclass(frozen=True, kw_only=True)
class TrainingRanges:
    """What the training cases spanned, as ``(min, max)`` over the cases, measured in the canonical orientation as
    the fingerprint measures them; ranges only, no case's own figures beyond the extremes, no case names (a model
    file carries them in ``fingerprint_summary.json``, ``training_ranges``).

    Attributes:
        num_cases: training cases the ranges are taken over.
        spacing_mm: per axis (x, y, z), voxel size in mm.
        shape: per axis (x, y, z), voxels.
        obliqueness_degrees: the largest angle between an image axis and the nearest scanner axis
            (``autoseg.io.geometry.obliqueness_degrees``); 0 for a grid along the scanner's axes.
        channels: per channel, in channel order, its foreground intensity percentiles (:class:`ChannelRange`).
        lesion_count: 26-connected lesions per case (cases without a lesion count as 0).
        lesion_volume_ml: total lesion volume per case in ml (voxels × voxel volume in mm³ / 1000; 0 without a
            lesion).
    """

    num_cases: int
    spacing_mm: tuple[tuple[float, float], ...]
    shape: tuple[tuple[int, int], ...]
    obliqueness_degrees: tuple[float, float]
    channels: tuple[ChannelRange, ...]
    lesion_count: tuple[int, int]
    lesion_volume_ml: tuple[float, float]


def training_ranges(fingerprint: Fingerprint) -> TrainingRanges:
    """The :class:`TrainingRanges` of a fingerprint's cases, from their per-case figures (``cases``).

    Example:
        >>> training_ranges(Fingerprint.from_json("fingerprint.json")).spacing_mm
        ((1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
    """
    cases = list(fingerprint.cases.values())
    spacings = np.array([case.spacing for case in cases], dtype=np.float64)
    shapes = np.array([case.shape for case in cases], dtype=np.int64)
    oblique = [obliqueness_degrees(case.direction) for case in cases]
    channels = []
    for index, channel in enumerate(fingerprint.channels):
        statistics = [case.intensity[index] for case in cases]
        percentiles = {key: [getattr(s, key) for s in statistics] for key in ("p00_5", "p50", "p99_5")}
        channels.append(
            ChannelRange(
                name=channel.name,
                **{key: (float(min(values)), float(max(values))) for key, values in percentiles.items()},
                typical_width=float(np.median([s.p99_5 - s.p00_5 for s in statistics])),
            )
        )
    counts = [case.lesion_components for case in cases]
    volumes = [(case.lesion_volume_mm3 or 0.0) / 1000.0 for case in cases]
    return TrainingRanges(
        num_cases=len(cases),
        spacing_mm=tuple((float(lo), float(hi)) for lo, hi in zip(spacings.min(axis=0), spacings.max(axis=0))),
        shape=tuple((int(lo), int(hi)) for lo, hi in zip(shapes.min(axis=0), shapes.max(axis=0))),
        obliqueness_degrees=(min(oblique), max(oblique)),
        channels=tuple(channels),
        lesion_count=(min(counts), max(counts)),
        lesion_volume_ml=(min(volumes), max(volumes)),
    )


def modality_of(channel_name: str) -> str:
    """``"CT"``, ``"perfusion"`` or ``"MRI"`` from a channel name such as ``CT``, ``Tmax`` or ``T1``."""
    name = channel_name.strip().lower().replace("-", "").replace("_", "")
    if name in ("ct", "ncct", "cta") or name.startswith("ct"):
        return "CT"
    if any(name.startswith(key) for key in _PERFUSION_NAMES):
        return "perfusion"
    return "MRI"


@dataclass
class _CaseResult:
    identifier: str
    problems: list[Problem]
    notes: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    samples: list[np.ndarray] | None = None
    stored_orientation: str | None = None


def compute_fingerprint(dataset: RawDataset, num_processes: int = 1, progress: bool = True) -> Fingerprint:
    """Verify and fingerprint every training case of ``dataset``.

    Every case is measured in the canonical orientation (``autoseg.io.images.read_image``), so the same scan stored
    with its axes permuted or flipped gives the same summary; ``aggregate.stored_orientations`` counts the
    orientations the files were stored in.

    Returns:
        The :class:`Fingerprint`: ``dataset``, ``channels``, ``labels``, ``aggregate``, ``subjects``, ``cases`` (per
        case) and ``notes`` (the verification notes, one line each); see ``documentation/plans_format.md`` for every
        field.

    Raises:
        VerificationError: listing every problem of every case, or saying that no case contains a lesion (nothing
            is returned or written).
    """
    cases = training_cases(dataset)
    arguments = [(case, dataset.labels, index, dataset.coregister_channels) for index, case in enumerate(cases)]
    results = map_cases(_fingerprint_case_star, arguments, num_processes, progress, "fingerprint")
    problems = [problem for result in results for problem in result.problems] + unmatched_label_files(dataset, cases)
    per_case = {result.identifier: result.summary for result in results}
    if not problems:
        problems = lesion_free_problems(dataset, _lesion_free(per_case), len(cases))
    if problems:
        raise VerificationError(problems, [note for result in results for note in result.notes])
    channels = [
        {"name": name, "modality": modality_of(name), **_global_intensities([r.samples[c] for r in results])}
        for c, name in enumerate(dataset.channel_names)
    ]
    plain = {
        "dataset": dataset.name,
        "channels": channels,
        "labels": dataset.labels,
        "aggregate": {**_aggregate(per_case), **_orientations([r.stored_orientation for r in results])},
        "subjects": {case.identifier: case.subject for case in cases},
        "cases": per_case,
        "notes": [str(note) for result in results for note in result.notes],
    }
    return from_plain(Fingerprint, to_plain(plain), "")  # the checks and types of fingerprint.json


def fingerprint_case(case: Case, labels: Mapping[str, int], seed: int = 0, coregister: bool = False) -> _CaseResult:
    """Read, verify and summarize one case (see the module docstring); with ``coregister`` (``dataset.json``'s
    ``coregister_channels``) its channels are measured on channel 0's grid, each moved one registered
    (``autoseg.data.coregistration``), and the fits recorded in ``coregistration``."""
    checked = read_checked_case(case, labels, coregister)
    if checked.problems:
        return _CaseResult(case.identifier, checked.problems, checked.notes)
    images, label, geometry = checked.images, checked.label, checked.geometry
    foreground = foreground_mask(images)
    bbox = bounding_box(foreground)
    crop = crop_box(images, label)
    rng = np.random.default_rng(seed)
    samples, intensity = [], []
    for channel in images:
        values = channel[foreground]
        intensity.append(intensity_statistics(values))
        take = min(SAMPLES_PER_CASE, values.size)
        samples.append(rng.choice(values, take, replace=False) if take else values)
    summary = {
        "shape": list(geometry.shape),
        "spacing": list(geometry.spacing),
        "direction": list(geometry.direction),
        "nonzero_bbox": [list(pair) for pair in bbox],
        "cropped_shape": [hi - lo for lo, hi in crop],
        "intensity": intensity,
        **lesion_statistics(label, foreground, geometry.spacing, geometry.direction),
        "symmetry": assess_case(images, foreground, geometry, bbox, label),  # can a mid-sagittal plane be found?
        "coregistration": checked.coregistration if coregister else None,
    }
    return _CaseResult(case.identifier, [], checked.notes, summary, samples, checked.stored_orientation)


def lesion_statistics(
    label: np.ndarray | None, foreground: np.ndarray, spacing: tuple[float, ...], direction: tuple[float, ...]
) -> dict[str, Any]:
    """Lesion volume (mm³), 26-connected components and their volumes, lesion fraction of the
    foreground, lesion voxels where the image is zero (e.g. cut off by skull stripping), and hemisphere
    (``left``, ``right``, ``bilateral`` or ``none``).

    Args:
        label: (X, Y, Z) label map; every non-zero value counts as lesion.
        foreground: (X, Y, Z) non-zero region of the image (the brain).
        spacing: voxel size in mm, (x, y, z).
        direction: 3x3 direction cosines (SimpleITK, LPS world), used to find the left-right axis.
    """
    if label is None:
        return {
            "lesion_volume_mm3": None,
            "lesion_components": 0,
            "component_volumes_mm3": [],
            "hemisphere": "none",
            "lesion_voxels_outside_nonzero": 0,
        }
    voxel = float(np.prod(spacing))
    lesion = label > 0
    components, count = ndimage.label(lesion, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel())[1:] if count else np.zeros(0, int)
    return {
        "lesion_volume_mm3": float(lesion.sum() * voxel),
        "lesion_components": int(count),
        "component_volumes_mm3": sorted((float(s * voxel) for s in sizes), reverse=True),
        "lesion_fraction_of_foreground": float(lesion.sum() / max(1, foreground.sum())),
        "lesion_voxels_outside_nonzero": int(np.count_nonzero(lesion & ~foreground)),
        "hemisphere": _hemisphere(components, count, foreground, direction),
    }


def _hemisphere(components: np.ndarray, count: int, foreground: np.ndarray, direction: tuple[float, ...]) -> str:
    """Side of each component's centroid relative to the middle of the foreground along the
    left-right axis. In LPS world coordinates +x points to the patient's left."""
    if count == 0:
        return "none"
    matrix = np.asarray(direction, float).reshape(3, 3)
    axis = int(np.argmax(np.abs(matrix[0])))  # array axis most aligned with world x (right -> left)
    sign = np.sign(matrix[0, axis])
    lo, hi = bounding_box(foreground)[axis]
    middle = (lo + hi - 1) / 2
    # Centroid along the left-right axis only, per component: two bincounts over the lesion voxels.
    voxels = np.nonzero(components)
    labels = components[voxels]
    centroids = np.bincount(labels, weights=voxels[axis], minlength=count + 1)[1:] / np.bincount(labels)[1:]
    sides = {"left" if (c - middle) * sign > 0 else "right" for c in centroids}
    return sides.pop() if len(sides) == 1 else "bilateral"


def foreground_mask(images: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the foreground of (C, X, Y, Z) ``images``, the voxels where any channel is non-zero (the
    region whose intensities the fingerprint describes)."""
    return np.any(images != 0, axis=0)


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """``mean``, ``std`` and the 0.5/50/99.5 percentiles (``p00_5``, ``p50``, ``p99_5``) of ``values`` (any shape;
    the foreground voxels of one channel); all 0 when there are none."""
    if values.size == 0:
        return {"mean": 0.0, "std": 0.0, "p00_5": 0.0, "p50": 0.0, "p99_5": 0.0}
    low, median, high = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p00_5": float(low),
        "p50": float(median),
        "p99_5": float(high),
    }


def _global_intensities(samples: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Dataset-wide foreground statistics of one channel from the per-case samples."""
    return {"foreground": intensity_statistics(np.concatenate(samples))}


def _aggregate(per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summaries = list(per_case.values())
    spacings = np.array([s["spacing"] for s in summaries])
    shapes = np.array([s["shape"] for s in summaries])
    cropped = np.array([s["cropped_shape"] for s in summaries])
    median_spacing = np.median(spacings, axis=0)
    coarse = int(np.argmax(median_spacing))
    volumes = [v for s in summaries for v in s["component_volumes_mm3"]]
    hemispheres = [s["hemisphere"] for s in summaries]
    return {
        "num_cases": len(summaries),
        "median_spacing": median_spacing.tolist(),
        "spacing_percentile_10": np.percentile(spacings, 10, axis=0).tolist(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "median_cropped_shape": np.median(cropped, axis=0).tolist(),
        "median_cropped_size_mm": np.median(cropped * spacings, axis=0).tolist(),
        "anisotropy_ratio": float(median_spacing.max() / median_spacing.min()),
        "coarse_axis": coarse,
        "slices_along_coarse_axis": {
            "min": int(shapes[:, coarse].min()),
            "median": float(np.median(shapes[:, coarse])),
            "max": int(shapes[:, coarse].max()),
        },
        "lesion_component_volumes_mm3": _distribution(volumes),
        "share_of_lesions_below_1cm3": float(np.mean(np.array(volumes) < 1000.0)) if volumes else 0.0,
        "case_lesion_volumes_mm3": _distribution([s["lesion_volume_mm3"] or 0.0 for s in summaries]),
        "median_lesion_fraction_of_foreground": float(
            np.median([s.get("lesion_fraction_of_foreground", 0.0) for s in summaries])
        ),
        "cases_without_lesion": len(_lesion_free(per_case)),
        "lesion_free_cases": _lesion_free(per_case),
        "hemispheres": {side: hemispheres.count(side) for side in ("left", "right", "bilateral", "none")},
        "symmetry": summarize_symmetry({case: s.get("symmetry") for case, s in per_case.items()}),
    }


def _lesion_free(per_case: dict[str, dict[str, Any]]) -> list[str]:
    """Sorted identifiers of the cases whose label marks no lesion voxel."""
    return sorted(case for case, summary in per_case.items() if summary["lesion_components"] == 0)


def _orientations(stored: list[str]) -> dict[str, Any]:
    """The canonical orientation every case was read in, and how many cases were stored in each orientation."""
    return {
        "canonical_orientation": CANONICAL_ORIENTATION,
        "stored_orientations": {code: stored.count(code) for code in sorted(set(stored))},
    }


def _distribution(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {"count": len(values), "min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4]}


def _fingerprint_case_star(argument: tuple[Case, Mapping[str, int], int, bool]) -> _CaseResult:
    return fingerprint_case(*argument)
