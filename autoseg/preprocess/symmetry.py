"""Symmetric-hemisphere channels: each channel's mirror across the mid-sagittal plane, registered back onto it.

The brain is nearly symmetric about its mid-sagittal plane; a lesion is not. Showing the network, beside every
channel, the same channel mirrored so that each voxel sees its contralateral counterpart lets a small patch compare
the hemispheres (Clèrigues et al., acute and sub-acute stroke, ``papers/001``: "symmetric modality augmentation",
the flipped image registered to the original with FLIRT, the other modalities moved with the same transform;
Bhavnani et al., ``papers/002``: the mirrored context of each cube appended as features).

How (:func:`fit_mirror`):

1. flip the reference channel along the array axis that runs left-right in world space
   (``autoseg.io.geometry.left_right_axis``, the axis ``--tta lr`` flips); the flip is a reflection about the plane
   through the image centre, normal to that axis;
2. rigidly register the flipped image onto the original with SimpleITK (Euler3DTransform started from the centres
   of mass of the two foreground masks; correlation metric within the foreground mask; regular-step gradient
   descent on three levels of about 8, 4 and 2 mm, never finer than the voxels; a fixed random sample of at most
   ``MAX_SAMPLES`` foreground points per level with a fixed seed, so the result is the same on every run);
   for thin slabs (``in_plane``) only the rotation about the slice axis and the in-plane shift are free;
3. resample every flipped channel through the fitted transform onto the original grid (linear).

The mirror ``M(x) = I(S(x))`` samples the image at ``S = flip ∘ T``, an improper rigid map: when the head is
symmetric about a plane P, ``S`` is the reflection about P. :class:`MirrorFit` keeps the Euler parameters and the
plane read off ``S`` (normal, a point on it, its tilt from the image's left-right axis), which the case properties
(``CASE.json``) and the fingerprint store so the fit can be inspected.

Where: after cropping, normalization and resampling (:func:`add_mirror_channels`, called by
``autoseg.preprocess.preprocessing.preprocess_arrays``), on exactly the arrays the network reads, so (a) a mirror channel is
interpolated once (registration resampling) rather than twice, (b) its intensities are those of its source channel
after normalization, so the plans' one normalization entry per image channel covers the mirror and the
difference too, and (c) the registration runs at the target spacing (2 mm for CPU plans). Training data are
computed once in preprocessing and stored in ``CASE.npy``; ``autoseg_predict`` runs the same function on new
scans. The fingerprint fits the reference channel of the raw (cropped) scan to decide whether a plane can be
found (:func:`assess_case`).

Arrays are (C, X, Y, Z) or (X, Y, Z) in the axis order of ``Geometry``; distances in mm, angles in degrees.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from autoseg.data.coregistration import (
    LEVELS_MM,
    REGISTRATION_THREADS,
    SAMPLING_SEED,
    euler_of,
    euler_transform,
    multiresolution_method,
    one_itk_thread,
)
from autoseg.errors import DataError
from autoseg.io.geometry import Geometry, left_right_axis
from autoseg.io.images import array_from_image, image_from_array
from autoseg.plans import PlansError, Symmetry

#: A mid-sagittal plane is found when the registered mirror correlates with the original at least this much
#: (Pearson, within the foreground; in the fingerprint the labelled lesions and their mirror images are left out,
#: since an 80 ml chronic lesion alone pulls a symmetric brain from 0.93 to 0.6). The ATLAS-like demo reaches
#: 0.9-0.98 at 1, 2 and 3.5 mm, its CT heads about 0.8-0.9; asymmetric volumes stay far below.
MIN_CORRELATION = 0.6
#: The planner adds a symmetric configuration when the plane is found in at least this share of the cases.
MIN_SHARE_FOUND = 0.9
#: Foreground points the metric samples per level at most (a fixed random subset; cost stays flat at 1 mm). The
#: pyramid (``LEVELS_MM``), the sample's seed, the steps and the one thread are channel co-registration's
#: (``autoseg.data.coregistration.multiresolution_method``): one thread gives the same fit on every machine (ITK sums
#: the metric per thread; cases run in parallel with ``-np`` instead).
MAX_SAMPLES = 10_000
#: Gradient descent: iterations per level at most, and the step's factor when the gradient turns.
ITERATIONS = 200
RELAXATION = 0.5
#: Fewest voxels along an axis the registration works with (ITK's Gaussian smoothing); thinner slabs are padded.
MIN_REGISTRATION_VOXELS = 4
#: What the fit depends on besides the settings in the plans; part of the preprocessing key, so stored mirrors are
#: recomputed when it changes.
SYMMETRY_METHOD = (
    f"euler3d correlation levels {'/'.join(f'{v:g}' for v in LEVELS_MM)} mm, {MAX_SAMPLES} samples, "
    f"seed {SAMPLING_SEED}, {ITERATIONS} iterations, linear"
)


#: A dataset is a stack of thin slabs when its out-of-plane spacing is this many times the in-plane one...
SLAB_ANISOTROPY = 3.0

#: ...or when its scans have at most this many slices along the coarsest axis.
SLAB_MAX_SLICES = 24


@dataclass(frozen=True)
class MirrorFit:
    """A fitted mirror transform and how well it fits.

    Attributes:
        flip_axis: array axis flipped (the left-right one).
        in_plane: only the in-plane rotation and shift were free (thin slabs); ``slice_axis`` then says which.
        slice_axis: the array axis held fixed with ``in_plane``; None otherwise.
        center: world point (mm) the Euler rotation turns about.
        angles: Euler3D rotation angles about world x, y, z, radians.
        translation: Euler3D shift, mm (world x, y, z).
        image_center: world centre of the grid (mm): the flip is a reflection about the plane through it.
        plane_normal: unit normal of the fitted mid-sagittal plane (world), pointing along ``flip_axis``.
        plane_point: the image centre projected onto that plane (mm).
        tilt_degrees: angle between the plane's normal and the grid's left-right axis.
        shift_mm: signed distance from the image centre to the plane along ``plane_normal``.
        correlation: Pearson correlation of original and registered mirror within the foreground.
        converged: the optimizer stopped on its step-size criterion before the iteration limit at the finest level.
        stop_condition: SimpleITK's description of why it stopped.
        seconds: wall time of the registration.
    """

    flip_axis: int
    in_plane: bool
    slice_axis: int | None
    center: tuple[float, float, float]
    angles: tuple[float, float, float]
    translation: tuple[float, float, float]
    image_center: tuple[float, float, float]
    plane_normal: tuple[float, float, float]
    plane_point: tuple[float, float, float]
    tilt_degrees: float
    shift_mm: float
    correlation: float
    converged: bool
    stop_condition: str
    seconds: float

    @property
    def found(self) -> bool:
        """The plane counts as found: converged and correlation of at least ``MIN_CORRELATION``."""
        return self.converged and self.correlation >= MIN_CORRELATION

    def to_json(self) -> dict[str, Any]:
        plain = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        return {**plain, "found": self.found, "min_correlation": MIN_CORRELATION}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MirrorFit:
        names = cls.__dataclass_fields__
        values = {
            key: tuple(value) if isinstance(value, list) else value for key, value in data.items() if key in names
        }
        return cls(**values)

    def transform(self) -> sitk.Euler3DTransform:
        """The Euler transform T: the mirror samples the flipped image at ``T(x)``."""
        return euler_transform(self.center, self.angles, self.translation)


def fit_mirror(
    image: np.ndarray,
    mask: np.ndarray,
    geometry: Geometry,
    *,
    slice_axis: int | None = None,
    ignore: np.ndarray | None = None,
) -> MirrorFit:
    """Fit the mirror transform of one (X, Y, Z) image (steps 1 and 2 of the module docstring).

    Args:
        image: (X, Y, Z) intensities (raw or normalized).
        mask: (X, Y, Z) bool foreground (the brain); the metric and the correlation are taken inside it.
        geometry: where the grid lies (spacing in mm, direction).
        slice_axis: register in-plane only, with this array axis held fixed (thin slabs); None: full rigid 3-D.
        ignore: (X, Y, Z) bool voxels left out of the correlation together with their mirror images (known lesions,
            so that the plane is judged on healthy tissue); the registration itself uses the whole ``mask``.

    Returns:
        The fit, with its correlation, convergence and time.

    Raises:
        ValueError: an empty mask, shapes that disagree, or ``slice_axis`` equal to the left-right axis.
    """
    if image.shape != mask.shape or tuple(image.shape) != tuple(geometry.shape):
        raise ValueError(f"image {image.shape}, mask {mask.shape} and geometry {geometry.shape} must agree")
    if not mask.any():
        raise ValueError("the foreground mask is empty: there is nothing to register")
    axis = left_right_axis(geometry.direction)
    if slice_axis is not None and slice_axis == axis:
        raise ValueError(f"slice axis {slice_axis} is the left-right axis: there is no in-plane mirror")
    start = time.perf_counter()
    padded, padded_mask, padded_geometry = _padded(image, mask, geometry)
    fixed = image_from_array(padded.astype(np.float32, copy=False), padded_geometry)
    moving = image_from_array(np.flip(padded, axis).astype(np.float32), padded_geometry)
    fixed_mask = image_from_array(padded_mask.astype(np.uint8), padded_geometry)
    moving_mask = image_from_array(np.flip(padded_mask, axis).astype(np.uint8), padded_geometry)
    initializer = sitk.CenteredTransformInitializerFilter()
    initializer.MomentsOn()
    initializer.SetNumberOfThreads(REGISTRATION_THREADS)
    method = _registration_method(geometry, int(mask.sum()), slice_axis)
    method.SetMetricFixedMask(fixed_mask)
    with one_itk_thread():  # the same fit on every machine, whatever ITK's default thread count
        method.SetInitialTransform(initializer.Execute(fixed_mask, moving_mask, sitk.Euler3DTransform()), inPlace=False)
        euler = euler_of(method.Execute(fixed, moving))
    stop = method.GetOptimizerStopConditionDescription()
    converged = "maximum number of iterations" not in stop.lower()
    mirror = _mirror(image, geometry, axis, euler, 0.0)
    judged = mask
    if ignore is not None and ignore.any():
        judged = mask & ~ignore & (_mirror(ignore, geometry, axis, euler, 0.0) < 0.01)
    correlation = _correlation(image, mirror, judged)
    plane = _plane(euler, geometry, axis)
    return MirrorFit(
        flip_axis=axis,
        in_plane=slice_axis is not None,
        slice_axis=slice_axis,
        center=tuple(euler.GetCenter()),
        angles=(euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()),
        translation=tuple(euler.GetTranslation()),
        correlation=correlation,
        converged=converged,
        stop_condition=stop,
        seconds=time.perf_counter() - start,
        **plane,
    )


def apply_mirror(
    channels: np.ndarray, geometry: Geometry, fit: MirrorFit, background: Sequence[float] | None = None
) -> np.ndarray:
    """Every channel's registered mirror on its own grid (step 3 of the module docstring).

    Args:
        channels: (C, X, Y, Z) intensities on ``geometry``'s grid.
        fit: from :func:`fit_mirror` on one of these channels (or on the same grid).
        background: per channel, the value put where the mirror falls outside the image; default 0.

    Returns:
        (C, X, Y, Z) float32 mirrors.
    """
    transform = fit.transform()
    out = np.empty(channels.shape, np.float32)
    for index, channel in enumerate(channels):
        out[index] = _mirror(
            channel, geometry, fit.flip_axis, transform, 0.0 if background is None else background[index]
        )
    return out


def add_mirror_channels(
    data: np.ndarray, foreground: np.ndarray, geometry: Geometry, symmetry: Symmetry
) -> tuple[np.ndarray, dict[str, Any]]:
    """The network's input with the symmetric-hemisphere channels appended (what ``preprocess_arrays`` stores).

    Args:
        data: (C, X, Y, Z) preprocessed channels (cropped, normalized, resampled).
        foreground: (X, Y, Z) bool non-zero region on the same grid.
        geometry: world placement of that grid (:func:`grid_geometry`).
        symmetry: the configuration's settings.

    Returns:
        (C·k, X, Y, Z) float32: the C channels, their C mirrors, and with ``symmetry.difference`` the C
        differences original − mirror (k = ``symmetry.channels_per_input``); and the fit as JSON (case properties).

    Raises:
        ValueError: ``symmetry.reference_channel`` is not a channel of ``data``, an image that is zero everywhere,
            or see :func:`fit_mirror`.
    """
    if not 0 <= symmetry.reference_channel < len(data):
        raise PlansError(
            f"symmetry.reference_channel {symmetry.reference_channel} is not one of the {len(data)} channels"
        )
    slice_axis = thin_axis(geometry.shape, geometry.spacing) if symmetry.in_plane else None
    if symmetry.in_plane and slice_axis is None:
        slice_axis = int(np.argmax(geometry.spacing))
    if not foreground.any():
        raise DataError("the image is zero everywhere: there is no brain to mirror")
    fit = fit_mirror(data[symmetry.reference_channel], foreground, geometry, slice_axis=slice_axis)
    background = [float(np.median(c[~foreground])) if not foreground.all() else 0.0 for c in data]
    mirror = apply_mirror(data, geometry, fit, background)
    parts = [data.astype(np.float32, copy=False), mirror]
    if symmetry.difference:
        parts.append(data - mirror)
    return np.concatenate(parts), fit.to_json()


def grid_geometry(geometry: Geometry, box: Sequence[Sequence[int]], shape: Sequence[int]) -> Geometry:
    """World placement of a crop ``box`` of ``geometry``'s grid resampled to ``shape``.

    Preprocessing resamples with the grids' outer edges aligned (``autoseg.preprocess.preprocessing._zoom``), so voxel ``i``
    of the new grid is centred at ``lo·s − s/2 + (i + 1/2)·s'`` mm along its axis from voxel 0 of the original, with
    ``s`` the old and ``s'`` the new spacing.
    """
    spacing = np.asarray(geometry.spacing, float)
    low = np.asarray([lo for lo, _ in box], float)
    size = np.asarray([hi - lo for lo, hi in box], float)
    new = size * spacing / np.asarray(shape, float)
    offset = low * spacing - spacing / 2 + new / 2
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    origin = np.asarray(geometry.origin, float) + direction @ offset
    return Geometry(
        tuple(int(v) for v in shape), tuple(float(v) for v in new), tuple(float(v) for v in origin), geometry.direction
    )


def thin_axis(shape: Sequence[int], spacing: Sequence[float]) -> int | None:
    """The slice axis of a thin slab (by the planner's rule: the coarsest axis is at least ``SLAB_ANISOTROPY``
    times the finest, or has at most ``SLAB_MAX_SLICES`` slices), where only an in-plane mirror is fitted; else
    None."""
    coarse = int(np.argmax(spacing))
    if max(spacing) / min(spacing) >= SLAB_ANISOTROPY or shape[coarse] <= SLAB_MAX_SLICES:
        return coarse
    return None


def assess_case(
    images: np.ndarray,
    foreground: np.ndarray,
    geometry: Geometry,
    box: Sequence[Sequence[int]],
    label: np.ndarray | None = None,
    reference_channel: int = 0,
) -> dict[str, Any]:
    """The fingerprint's record of one case: can a mid-sagittal plane be found? (in-plane for thin slabs).

    Args:
        images: (C, X, Y, Z) raw intensities; ``foreground``: (X, Y, Z) bool non-zero region; ``box``: its
            bounding box, to which the fit is cropped.
        label: (X, Y, Z) lesion labels or None; lesions, grown by one voxel, and their mirror images are left out
            of the correlation (``ignore`` of :func:`fit_mirror`).

    Returns:
        :meth:`MirrorFit.to_json`, or ``{"found": False, "reason": ...}`` when the case has no foreground.
    """
    if not foreground.any():
        return {"found": False, "reason": "no non-zero voxels"}
    crop = tuple(slice(lo, hi) for lo, hi in box)
    cropped = grid_geometry(geometry, box, [hi - lo for lo, hi in box])
    slice_axis = thin_axis(cropped.shape, cropped.spacing)
    if slice_axis == left_right_axis(geometry.direction):
        return {"found": False, "reason": f"the slices are stacked along the left-right axis {slice_axis}"}
    ignore = ndimage.binary_dilation(label[crop] > 0) if label is not None else None
    fit = fit_mirror(images[reference_channel][crop], foreground[crop], cropped, slice_axis=slice_axis, ignore=ignore)
    record = fit.to_json()
    record.pop("seconds", None)  # the fingerprint depends on the data only (same data, same file)
    return record


def summarize(per_case: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fingerprint's aggregate: how many cases have a plane, with which correlations, fitted how."""
    records = [r for r in per_case.values() if r is not None]
    found = [r for r in records if r.get("found")]
    correlations = [r["correlation"] for r in records if "correlation" in r]
    return {
        "cases": len(records),
        "found": len(found),
        "share_found": round(len(found) / len(records), 4) if records else 0.0,
        "min_correlation": MIN_CORRELATION,
        "median_correlation": round(float(np.median(correlations)), 4) if correlations else None,
        "lowest_correlation": round(float(np.min(correlations)), 4) if correlations else None,
        "in_plane": sum(1 for r in records if r.get("in_plane")),
        "not_found": sorted(case for case, r in per_case.items() if r is not None and not r.get("found")),
    }


def qualifies(summary: dict[str, Any] | None) -> tuple[bool, bool, str]:
    """Whether a planner may add a symmetric configuration, from the fingerprint's ``symmetry`` aggregate.

    Returns:
        (qualifies, in_plane, reason): ``in_plane`` when the cases were fitted in-plane (thin slabs).
    """
    if not summary or not summary.get("cases"):
        return (
            False,
            False,
            "no symmetry record in the fingerprint (made before symmetric channels existed): re-run "
            "autoseg_plan to fingerprint again",
        )
    share, threshold = summary["share_found"], MIN_SHARE_FOUND
    in_plane = summary["in_plane"] * 2 > summary["cases"]
    how = (
        "an in-plane mirror (rotation about the slice axis and in-plane shift; thin slabs)"
        if in_plane
        else "a rigid 3-D mirror"
    )
    figures = (
        f"{how} registers onto the original with correlation >= {summary['min_correlation']:g} in "
        f"{summary['found']} of {summary['cases']} cases ({share:.0%}; median correlation "
        f"{summary['median_correlation']}, lowest {summary['lowest_correlation']})"
    )
    if share >= threshold:
        return (
            True,
            in_plane,
            (
                f"a mid-sagittal plane is found: {figures}; each channel's registered mirror is appended (acute stroke "
                "paper's symmetric modality augmentation), so every patch sees the contralateral hemisphere"
            ),
        )
    missing = ", ".join(summary["not_found"][:5]) + (" ..." if len(summary["not_found"]) > 5 else "")
    return (
        False,
        in_plane,
        (
            f"no symmetric configuration: {figures}, below the {threshold:.0%} needed (not found: {missing}); the data "
            "do not look like whole brains with a mid-sagittal plane"
        ),
    )


def _padded(image: np.ndarray, mask: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Image and mask with edge slices repeated on both sides of any axis under ``MIN_REGISTRATION_VOXELS`` (a slab
    of 2-3 slices: ITK's pyramid smoothing needs 4); the centre, and so the flip, stay where they were."""
    pad = [max(0, -(-(MIN_REGISTRATION_VOXELS - n) // 2)) for n in image.shape]
    if not any(pad):
        return image, mask, geometry
    widths = [(p, p) for p in pad]
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    origin = np.asarray(geometry.origin, float) - direction @ (np.asarray(pad) * np.asarray(geometry.spacing))
    shape = tuple(n + 2 * p for n, p in zip(image.shape, pad))
    return (
        np.pad(image, widths, mode="edge"),
        np.pad(mask, widths, mode="edge"),
        Geometry(shape, geometry.spacing, tuple(float(v) for v in origin), geometry.direction),
    )


def _registration_method(
    geometry: Geometry, foreground_voxels: int, slice_axis: int | None
) -> sitk.ImageRegistrationMethod:
    spacing = np.asarray(geometry.spacing, float)
    in_plane = [a for a in range(3) if a != slice_axis]
    # Voxels a shrunk level keeps: the thick axis of a slab is not shrunk below its slices (ITK keeps >= 1).
    method = multiresolution_method(
        float(spacing[in_plane].min()),
        foreground_voxels,
        len(in_plane),
        max_samples=MAX_SAMPLES,
        iterations=ITERATIONS,
        relaxation=RELAXATION,
    )
    method.SetMetricAsCorrelation()
    if slice_axis is not None:
        direction = np.asarray(geometry.direction, float).reshape(3, 3)
        world = int(np.argmax(np.abs(direction[:, slice_axis])))  # world axis the slices are stacked along
        method.SetOptimizerWeights([float(a == world) for a in range(3)] + [float(a != world) for a in range(3)])
    return method


def _mirror(array: np.ndarray, geometry: Geometry, axis: int, transform: sitk.Transform, fill: float) -> np.ndarray:
    """(X, Y, Z) float32: ``array`` flipped along ``axis`` and sampled at ``transform(x)`` on its own grid (linear;
    ``fill`` outside)."""
    flipped = image_from_array(np.flip(array, axis).astype(np.float32), geometry)
    return array_from_image(sitk.Resample(flipped, flipped, transform, sitk.sitkLinear, float(fill), sitk.sitkFloat32))


def _correlation(image: np.ndarray, mirror: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``image`` and ``mirror`` within ``mask`` (0 when either is constant there)."""
    if not mask.any():
        return 0.0
    a, b = image[mask].astype(np.float64), mirror[mask].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def _plane(euler: sitk.Euler3DTransform, geometry: Geometry, axis: int) -> dict[str, Any]:
    """The mid-sagittal plane of ``S = flip ∘ T`` (see the module docstring), in world coordinates.

    ``S(x) = A x + b`` with ``A`` an improper rotation; for a reflection about the plane ``n·x = d``,
    ``A = I − 2 n nᵀ`` and ``b = 2 d n``: ``n`` is the eigenvector of ``A`` (symmetrized) with the eigenvalue
    nearest −1 and ``d = n·b / 2``.
    """
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    spacing = np.asarray(geometry.spacing, float)
    flip_normal = direction[:, axis]
    middle = np.asarray(geometry.origin, float) + direction @ ((np.asarray(geometry.shape) - 1) / 2 * spacing)
    reflect = np.eye(3) - 2 * np.outer(flip_normal, flip_normal)
    rotation = np.asarray(euler.GetMatrix(), float).reshape(3, 3)
    center, shift = np.asarray(euler.GetCenter(), float), np.asarray(euler.GetTranslation(), float)
    linear = reflect @ rotation
    offset = reflect @ (center + shift - rotation @ center - middle) + middle
    values, vectors = np.linalg.eigh((linear + linear.T) / 2)
    normal = vectors[:, int(np.argmin(values))]
    normal = normal if normal @ flip_normal >= 0 else -normal
    distance = float(normal @ offset) / 2
    shift_mm = distance - float(normal @ middle)
    tilt = float(np.degrees(np.arccos(np.clip(abs(normal @ flip_normal), 0.0, 1.0))))
    return {
        "image_center": tuple(float(v) for v in middle),
        "plane_normal": tuple(float(v) for v in normal),
        "plane_point": tuple(float(v) for v in middle + shift_mm * normal),
        "tilt_degrees": tilt,
        "shift_mm": shift_mm,
    }
