"""Preprocessing: crop to the non-zero region and the label, normalize, resample to the target spacing, store.

``restore_probabilities`` and ``restore_labels`` undo cropping and resampling, giving arrays on the
original grid of the raw image as ``autoseg.io.images.read_image`` gives it, i.e. in the canonical orientation
(``properties.geometry`` is that grid); ``autoseg.io.images.write_like`` puts them back into the file's own.

The case store these steps write (files, properties, staleness) is :mod:`autoseg.preprocess.cases`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import exposure

from autoseg.data.coregistration import COREGISTRATION_METHOD, coregister_channels
from autoseg.data.dataset import LESION_LABELS, Case
from autoseg.errors import DataError
from autoseg.io.files import save_array
from autoseg.io.geometry import CANONICAL_ORIENTATION, Geometry
from autoseg.io.headers import format_mm, voxel_count_problem
from autoseg.io.images import read_image
from autoseg.labels import classes_from_values, label_classes, read_label_file
from autoseg.parallel import map_cases
from autoseg.plans import Configuration, Normalization, Resampling
from autoseg.preprocess.cases import CaseProperties, _sources, array_files, is_up_to_date
from autoseg.preprocess.symmetry import SYMMETRY_METHOD, add_mirror_channels, grid_geometry

MAX_LESION_LOCATIONS = 10_000


#: Histogram bins of ``histogram_equalization`` (scikit-image's default): the output takes at most this many levels.
HISTEQ_BINS = 256


def preprocessing_key(
    configuration: Configuration, labels: Mapping[str, int] = LESION_LABELS, coregister: bool = False
) -> str:
    """Hash of every setting that changes the preprocessed arrays (the orientation cases are read in and the
    crop rule included, so arrays made before either changed are redone); ``labels`` (``dataset.json``'s) count
    when their classes are not the values themselves (``autoseg.labels.label_classes``), channel co-registration
    (``coregister``, the plans' ``coregister_channels``) with its method when it is on."""
    settings = {
        "orientation": CANONICAL_ORIENTATION,
        "crop": "nonzero_and_label",
        "target_spacing": configuration.target_spacing,
        "normalization": [n.__dict__ for n in configuration.normalization],
        "resampling": configuration.resampling.__dict__,
    }
    if configuration.symmetry is not None:  # only then: the keys of existing data stay as they were
        settings["symmetry"] = {**configuration.symmetry.__dict__, "method": SYMMETRY_METHOD}
    classes = label_classes(labels)
    if classes != tuple(range(len(classes))):  # likewise: datasets labelled 0, 1, ... keep their keys
        settings["label_classes"] = classes
    if coregister:  # likewise
        settings["coregistration"] = COREGISTRATION_METHOD
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def preprocess_dataset(
    cases: list[Case],
    configuration: Configuration,
    folder: Path,
    num_processes: int = 1,
    progress: bool = True,
    labels: Mapping[str, int] = LESION_LABELS,
    coregister: bool = False,
) -> list[str]:
    """Preprocess every case into ``folder``; returns the identifiers that were (re)computed. ``labels`` are
    ``dataset.json``'s: label files are stored as their classes; ``coregister`` is the plans' ``coregister_channels``
    (:func:`preprocess_case`)."""
    key = preprocessing_key(configuration, labels, coregister)
    todo = [case for case in cases if not is_up_to_date(case, folder, key)]
    arguments = [(case, configuration, folder, labels, coregister) for case in todo]
    map_cases(_preprocess_star, arguments, num_processes, progress, f"preprocess {configuration.data_identifier}")
    return [case.identifier for case in todo]


def preprocess_case(
    case: Case,
    configuration: Configuration,
    folder: Path,
    labels: Mapping[str, int] = LESION_LABELS,
    coregister: bool = False,
) -> CaseProperties:
    """Preprocess one case and write it (see the module docstring); returns its properties.

    The label file's declared values (``labels``, ``dataset.json``'s) are stored as their classes: 0 background,
    ``k`` the ``k``-th non-zero value (``autoseg.labels``), which is what the network learns. With ``coregister``
    (the plans' ``coregister_channels``) a channel on another grid than channel 0 is first registered onto it
    (``autoseg.data.coregistration.coregister_channels``, as prediction does); the fits go into ``CASE.json``.

    Raises:
        LabelError: the label file holds a value that is not declared, or one far from an integer.
        RegistrationError: with ``coregister``, a channel that cannot be registered (its file and why).
    """
    channels, geometries = zip(*(read_image(path) for path in case.images))
    geometry, fits = geometries[0], None
    if coregister:
        images, fits = coregister_channels(channels, geometries, case.images)
    else:
        images = np.stack(channels)
    if case.label is None:
        label = np.zeros(geometry.shape, np.uint8)
    else:
        label = classes_from_values(read_label_file(case.label).array, labels, case.label)
    try:
        data, seg, properties = preprocess_arrays(images, label, geometry, configuration)
    except DataError as error:
        raise DataError(f"case {case.identifier} ({case.images[0]}): {error}") from None
    lesion = np.argwhere(seg > 0).astype(np.int32)
    if len(lesion) > MAX_LESION_LOCATIONS:
        rng = np.random.default_rng(1234)
        lesion = lesion[np.sort(rng.choice(len(lesion), MAX_LESION_LOCATIONS, replace=False))]
    records = {
        path.name: save_array(array, path)
        for array, path in zip((data, seg, lesion), array_files(folder, case.identifier))
    }
    properties = dataclasses.replace(
        properties,
        case=case.identifier,
        subject=case.subject,
        key=preprocessing_key(configuration, labels, coregister),
        coregistration=fits,
        sources=_sources(case),
        arrays=records,
    )
    properties.to_json(folder / f"{case.identifier}.json")
    return properties


def preprocess_arrays(
    images: np.ndarray, label: np.ndarray | None, geometry: Geometry, configuration: Configuration
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, normalize and resample in memory.

    Args:
        images: (C, X, Y, Z) raw intensities.
        label: (X, Y, Z) labels or None (prediction time).
        geometry: the raw image's geometry.

    The crop box covers the image's non-zero region and every labelled voxel (``crop_box``): lesion voxels
    where the image is zero (cut off by skull stripping) are kept. Normalization statistics come from the
    non-zero region alone; zero voxels stay at 0 after normalization.

    Returns:
        data (C, X', Y', Z') float32, labels (X', Y', Z') uint8 or None, and the properties that
        ``restore_probabilities`` needs. With ``configuration.symmetry`` the data hold the mirrored channels too
        (``configuration.input_channels(C)`` of them, ``autoseg.preprocess.symmetry``) and the properties the fit.

    Raises:
        DataError: the image resampled to the plan's target spacing would hold more voxels than this machine can
            (``autoseg.io.headers.voxel_count_problem``); found before anything is resampled.
    """
    foreground = np.any(images != 0, axis=0)
    box = crop_box(images, label)
    crop = tuple(slice(lo, hi) for lo, hi in box)
    images, foreground = images[(slice(None), *crop)], foreground[crop]
    normalized = np.stack([normalize(c, foreground, n) for c, n in zip(images, configuration.normalization)])
    target = target_shape(images.shape[1:], geometry.spacing, configuration.target_spacing)
    too_many = voxel_count_problem(target, configuration.input_channels(len(images)))
    if too_many:
        raise DataError(
            f"resampled from its voxel size {format_mm(geometry.spacing)} to the plan's {format_mm(configuration.target_spacing)} "
            f"the image would hold {too_many}"
        )
    data = resample_image(normalized, target, configuration.resampling)
    seg = resample_labels(label[crop], target) if label is not None else None
    mirror_fit = None
    if (
        configuration.symmetry is not None
    ):  # symmetric-hemisphere channels on the network's grid (autoseg.preprocess.symmetry)
        grid = grid_geometry(geometry, box, target)
        data, mirror_fit = add_mirror_channels(
            data, resample_labels(foreground.astype(np.uint8), target) > 0, grid, configuration.symmetry
        )
    properties = CaseProperties(
        geometry=geometry,
        crop_box=tuple((int(lo), int(hi)) for lo, hi in box),
        cropped_shape=tuple(int(n) for n in images.shape[1:]),
        resampled_shape=tuple(int(n) for n in target),
        target_spacing=tuple(float(s) for s in configuration.target_spacing),
        symmetry=mirror_fit,
    )
    return data, seg, properties


def normalize(channel: np.ndarray, foreground: np.ndarray, scheme: Normalization) -> np.ndarray:
    """Normalize one (X, Y, Z) channel as ``scheme`` says (see ``autoseg.plans.Normalization``)."""
    channel = channel.astype(np.float32, copy=False)
    if scheme.scheme == "histogram_equalization":
        return equalize_histogram(channel, foreground)
    if scheme.scheme == "zscore_foreground":
        values = channel[foreground]
        mean, std = (float(values.mean()), float(values.std())) if values.size else (0.0, 1.0)
        out = (channel - mean) / max(std, 1e-8)
        out[~foreground] = 0.0  # outside the brain carries no information; keep it at the mean
        return out
    low, high = scheme.clip
    return (np.clip(channel, low, high) - scheme.mean) / max(scheme.std, 1e-8)


def equalize_histogram(channel: np.ndarray, foreground: np.ndarray, bins: int = HISTEQ_BINS) -> np.ndarray:
    """Histogram equalization of one (X, Y, Z) channel within its foreground (brain) mask (Bhavnani et al., paper 002:
    it raises the contrast between lesion and the tissue around it).

    Each foreground voxel is mapped through the cumulative histogram of the foreground intensities (``bins`` bins;
    scikit-image's ``exposure.equalize_hist`` with ``mask``), so the foreground becomes close to uniformly distributed
    on [0, 1] and the order of intensities is kept (the mapping is non-decreasing). The uniform [0, 1] is then
    shifted and scaled to zero mean and unit standard deviation, ``(u - 0.5) * sqrt(12)``, i.e. onto about
    [-1.73, 1.73]: the range the network sees with the z-score schemes. Background voxels are set to 0, as the
    z-score schemes leave them.

    Args:
        channel: (X, Y, Z) intensities in any unit.
        foreground: (X, Y, Z) bool mask of the voxels to equalize.
        bins: histogram bins; the output takes at most this many values. Default 256.

    Returns:
        (X, Y, Z) float32; 0 outside ``foreground`` and everywhere when the foreground holds fewer than two distinct
        intensities (nothing to equalize).
    """
    out = np.zeros(channel.shape, np.float32)
    values = channel[foreground]
    if values.size == 0 or values.min() == values.max():
        return out
    # float64: scikit-image bins integer images per integer value and ignores ``bins`` for them.
    uniform = exposure.equalize_hist(channel.astype(np.float64), nbins=bins, mask=foreground)
    out[foreground] = (uniform[foreground] - 0.5) * np.sqrt(12.0)
    return out


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], new_spacing: tuple[float, ...]) -> tuple[int, ...]:
    """Voxels per axis after resampling ``shape`` from ``spacing`` to ``new_spacing`` (mm)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample_image(data: np.ndarray, shape: tuple[int, ...], resampling: Resampling) -> np.ndarray:
    """Resample (C, X, Y, Z) channels to ``shape``: spline of ``image_order``; along
    ``separate_axis`` (if set) with ``separate_axis_order`` instead."""
    if tuple(data.shape[1:]) == tuple(shape):
        return data.astype(np.float32, copy=False)
    return np.stack([_resample_channel(c, shape, resampling) for c in data]).astype(np.float32)


def _resample_channel(channel: np.ndarray, shape: tuple[int, ...], resampling: Resampling) -> np.ndarray:
    axis = resampling.separate_axis
    if axis is None:
        return _zoom(channel, shape, resampling.image_order)
    in_plane = tuple(shape[a] if a != axis else channel.shape[a] for a in range(channel.ndim))
    channel = _zoom(channel, in_plane, resampling.image_order, skip_axis=axis)
    return _zoom(channel, shape, resampling.separate_axis_order)


def _zoom(array: np.ndarray, shape: tuple[int, ...], order: int, skip_axis: int | None = None) -> np.ndarray:
    """Spline resampling to exactly ``shape``; voxel grids are aligned by their outer edges, so the
    physical extent is kept (edge values repeated outside). With
    ``skip_axis`` set, slices along it are resampled one by one (in-plane only)."""
    if tuple(array.shape) == tuple(shape):
        return array
    if skip_axis is not None:
        moved = np.moveaxis(array, skip_axis, 0)
        plane = tuple(s for a, s in enumerate(shape) if a != skip_axis)
        return np.moveaxis(np.stack([_zoom(s, plane, order) for s in moved]), 0, skip_axis)
    factors = [n / o for n, o in zip(shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def resample_labels(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resample an (X, Y, Z) label map: linear interpolation of each label's one-hot map, then argmax.

    When no axis gets coarser (pure upsampling, e.g. back to the input grid), nearest neighbour is
    used instead: it keeps each label's volume, whereas thresholding interpolated one-hot maps of
    a coarse mask cuts the corners of convex lesions (a few percent of their volume).
    """
    if tuple(label.shape) == tuple(shape):
        return label.astype(np.uint8, copy=False)
    if all(new >= old for new, old in zip(shape, label.shape)):
        return _zoom(label.astype(np.uint8), shape, 0)
    values = np.unique(label)
    if len(values) == 1:
        return np.full(shape, values[0], np.uint8)
    best = np.full(shape, -1.0, np.float32)
    out = np.zeros(shape, np.uint8)
    for value in values:
        weight = _zoom((label == value).astype(np.float32), shape, 1)
        better = weight > best
        out[better], best[better] = value, weight[better]
    return out


def restore_probabilities(probabilities: np.ndarray, properties: CaseProperties) -> np.ndarray:
    """Put (K, X', Y', Z') probabilities at the target spacing back on the raw image's grid:
    linear resampling to the cropped shape, then zero padding outside the crop box.

    Returns:
        (K, X, Y, Z) float32 on the grid of ``properties.geometry``.
    """
    restored = np.stack([_zoom(p.astype(np.float32), properties.cropped_shape, 1) for p in probabilities])
    out = np.zeros((len(probabilities), *properties.geometry.shape), np.float32)
    box = tuple(slice(lo, hi) for lo, hi in properties.crop_box)
    out[(slice(None), *box)] = restored
    return out


def restore_labels(seg: np.ndarray, properties: CaseProperties) -> np.ndarray:
    """Put an (X', Y', Z') label map back on the raw image's grid (one-hot linear, argmax, zero outside)."""
    out = np.zeros(properties.geometry.shape, np.uint8)
    box = tuple(slice(lo, hi) for lo, hi in properties.crop_box)
    out[box] = resample_labels(seg, properties.cropped_shape)
    return out


def _preprocess_star(argument: tuple[Case, Configuration, Path, Mapping[str, int], bool]) -> None:
    preprocess_case(*argument)


def crop_box(images: np.ndarray, label: np.ndarray | None) -> list[tuple[int, int]]:
    """The box preprocessing crops a case to: the image's non-zero region (any channel) and every labelled
    voxel together, so a lesion traced beyond a skull-stripping mask keeps all its voxels.

    Args:
        images: (C, X, Y, Z) intensities.
        label: (X, Y, Z) label map, or None (prediction: the non-zero region alone).

    Returns:
        Half-open (start, stop) voxel indices per axis (x, y, z).
    """
    keep = np.any(images != 0, axis=0)
    if label is not None:
        keep = keep | (label > 0)
    return bounding_box(keep)


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open (start, stop) per axis of the True voxels; the whole array when none is True."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, mask.shape[axis]))
    return box
