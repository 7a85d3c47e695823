"""Channel co-registration: a channel on another grid than the reference channel is rigidly registered to it and
resampled onto its grid.

The sequences of one MRI session need not share a grid: ISLES 2022's FLAIR has another voxel size, field of view
and often orientation than its DWI and ADC, and the patient may have moved between them. A dataset whose
``dataset.json`` declares ``"coregister_channels": true`` has every channel whose grid (shape, spacing, origin or
direction, ``autoseg.io.geometry.Geometry.differences``) differs from the reference channel's (channel 0,
:data:`REFERENCE_CHANNEL`) brought onto that grid, with this module's code at every stage: ``autoseg_convert isles22``
(FLAIR onto DWI, :mod:`autoseg.data.converters.common`), verification and fingerprint (:mod:`autoseg.data.verify`),
preprocessing (:mod:`autoseg.preprocess.preprocessing`) and prediction (``autoseg.api.predict_inputs.read_case``, for
plans that record ``coregister_channels``). Channels already on the reference grid are taken as they are.

How (:func:`register_channel`), with SimpleITK:

1. **Start from the headers.** The transform starts as the identity in world coordinates (the scanner's frame both
   headers give), turning about the centroid of the reference channel's non-zero region. Not from aligned image
   centres (``CenteredTransformInitializer``): the fields of view of two sequences differ (a FLAIR reaching down to
   the neck has its centre centimetres lower than a DWI of the brain), while the patient rarely moves more than a
   few millimetres and degrees within a session.
2. **Check the overlap** (:func:`field_of_view_overlap`): at least :data:`MIN_OVERLAP` of the reference channel's
   non-zero voxels must fall inside the other channel's field of view, before and after the fit; otherwise the two
   files do not show the same head and the registration fails (:class:`RegistrationError`).
3. **Fit a rigid transform** (``Euler3DTransform``: three angles, three shifts) maximizing Mattes mutual information
   (:data:`HISTOGRAM_BINS` bins; the contrasts differ, so no intensity relation is assumed) between the reference
   channel (fixed, within its non-zero region) and the other channel (moving, linear interpolation): regular-step
   gradient descent from :data:`LEARNING_RATE_MM` mm down to :data:`MIN_STEP_MM` mm (relaxation :data:`RELAXATION`),
   at most :data:`ITERATIONS` per level, on a pyramid of :data:`LEVELS_MM` mm voxels (never finer than the
   reference's finest voxel), scales from the physical shift each parameter causes.
4. **Resample** the moving channel through the fitted transform onto the reference grid (:func:`resample_channel`;
   linear interpolation, 0 outside its field of view).

**Deterministic on every machine.** The metric is taken at a fixed random sample of at most :data:`MAX_SAMPLES`
reference voxels per level drawn with the fixed seed :data:`SAMPLING_SEED` (ITK's own generator, the same sample on
every platform), and the registration runs on one thread (:data:`REGISTRATION_THREADS`): ITK's Mattes metric sums
one joint histogram per thread, so another thread count changes the sums' order and the fit in its last digits. With
the same SimpleITK build the same files give the same fit, bit for bit, on any machine and any ``-np``.

**Recorded per case** (:class:`ChannelFit`): the Euler parameters (centre, angles, shift), the rotation angle and
the shift of the centre they amount to, the final metric value, the iterations at the finest level, the overlap,
the optimizer's stop condition and :data:`COREGISTRATION_METHOD`; in ``CASE.json`` (``coregistration``) and, for a
converted release, in the dataset's ``coregistration.json``.

**Fails** (:class:`RegistrationError`, one line naming the reason) when the overlap is below :data:`MIN_OVERLAP`,
the optimizer stops at its iteration limit on the finest level instead of on its step size (no convergence), ITK
refuses (e.g. every sample maps outside the moving image), or an image holds NaN/Inf voxels.

Arrays are (X, Y, Z) in the axis order of ``Geometry`` (canonical orientation, ``autoseg.io.images``); world points
in mm in SimpleITK's LPS frame; angles in radians unless a name says degrees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import DataError
from autoseg.io.geometry import Geometry
from autoseg.io.images import array_from_image, image_from_array

#: The channel every other channel is registered to and resampled onto (DWI in ISLES 2022: the masks' grid).
REFERENCE_CHANNEL = 0
#: Share of the reference channel's non-zero voxels that must lie inside the other channel's field of view, by
#: the headers before the fit and through the fitted transform after it.
MIN_OVERLAP = 0.5
#: Registration pyramid: voxel size (mm) per level, coarse to fine; a level never goes finer than the reference.
#: This and the settings below down to ``REGISTRATION_THREADS`` are shared with the mirror fit
#: (``autoseg.preprocess.symmetry``, :func:`multiresolution_method`).
LEVELS_MM = (8.0, 4.0, 2.0)
#: Reference voxels at which the metric is taken per level at most (a fixed random subset of the non-zero region).
MAX_SAMPLES = 20_000
#: Seed of that sample: the same points on every run and machine.
SAMPLING_SEED = 12_345
#: Joint histogram bins of Mattes mutual information.
HISTOGRAM_BINS = 32
#: Gradient descent: iterations per level at most, first step and smallest step (mm of the largest shift a parameter
#: step causes, ``SetOptimizerScalesFromPhysicalShift``); reaching the limit at the finest level is no convergence.
ITERATIONS = 200
LEARNING_RATE_MM = 2.0
MIN_STEP_MM = 1e-3
#: The step's factor each time the gradient turns (0.5 stopped short of rotations of a few degrees on the test
#: phantoms, up to 4 mm off; 0.8 came within 0.4 mm).
RELAXATION = 0.8
#: Voxels of the reference's non-zero region the overlap is counted on at most (every k-th one).
MAX_OVERLAP_POINTS = 100_000
#: One thread: the same sums in the same order on every machine (see the module docstring).
REGISTRATION_THREADS = 1
#: What a fit depends on besides the images; recorded with every fit and part of the preprocessing key, so stored
#: arrays are remade when it changes.
COREGISTRATION_METHOD = (
    f"euler3d mattes {HISTOGRAM_BINS} bins, levels {'/'.join(f'{v:g}' for v in LEVELS_MM)} mm, {MAX_SAMPLES} "
    f"samples, seed {SAMPLING_SEED}, {ITERATIONS} iterations, steps {LEARNING_RATE_MM:g}-{MIN_STEP_MM:g} mm, "
    f"relaxation {RELAXATION:g}, from the headers, linear"
)


class RegistrationError(DataError):
    """A channel cannot be registered to the reference channel: too little overlap, no convergence, NaN/Inf voxels
    or ITK refused; the message says which, in one line.

    Attributes:
        file: the channel's file when the caller named it (:func:`coregister_channels`), else None.
        reason: the message without the file: what went wrong.
    """

    def __init__(self, reason: str, file: str | Path | None = None, reference: str | None = None):
        self.file, self.reason = file, reason
        where = "" if file is None else f"{file}: registration onto {reference or 'channel 0'} failed: "
        super().__init__(where + reason)


@dataclass(frozen=True, kw_only=True)
class ChannelFit:
    """The rigid transform that brings one channel onto the reference channel's grid, and how it was found.

    The transform ``T`` maps a world point ``x`` of the reference grid to the point of the moving channel shown
    there: ``T(x) = R (x - center) + center + translation``, with ``R`` the Euler rotation of ``angles`` (SimpleITK's
    ``Euler3DTransform``, angles about world x, y, z); the resampled channel at ``x`` is the channel's value at
    ``T(x)``.

    Attributes:
        channel: the channel moved (its index in the dataset).
        reference_channel: the channel it was registered to (:data:`REFERENCE_CHANNEL`).
        center: centre of rotation (mm, world): the centroid of the reference channel's non-zero region.
        angles: Euler angles about world x, y, z (radians).
        translation: shift (mm, world x, y, z).
        rotation_degrees: the angle of ``R`` about its axis (degrees).
        shift_mm: how far ``T`` moves ``center`` (mm): the length of ``translation``.
        metric: Mattes mutual information at the end (ITK's sign: lower is better, about -0.1 to -1.5).
        iterations: optimizer iterations at the finest level.
        overlap: share of the reference channel's non-zero voxels inside the moving channel's field of view
            through ``T``.
        converged: the optimizer stopped on its step size before :data:`ITERATIONS` at the finest level.
        stop_condition: SimpleITK's description of why it stopped.
        method: :data:`COREGISTRATION_METHOD`.
    """

    channel: int
    reference_channel: int = REFERENCE_CHANNEL
    center: tuple[float, float, float]
    angles: tuple[float, float, float]
    translation: tuple[float, float, float]
    rotation_degrees: float
    shift_mm: float
    metric: float
    iterations: int
    overlap: float
    converged: bool
    stop_condition: str
    method: str = COREGISTRATION_METHOD

    def transform(self) -> sitk.Euler3DTransform:
        """``T`` as a SimpleITK transform (fixed, reference points -> moving points)."""
        return euler_transform(self.center, self.angles, self.translation)

    def summary(self) -> str:
        """One line: ``rotation 3.1°, shift 4.2 mm, mutual information -0.62, 37 iterations, overlap 100%``."""
        return (
            f"rotation {self.rotation_degrees:.1f}°, shift {self.shift_mm:.1f} mm, mutual information "
            f"{self.metric:.3f}, {self.iterations} iterations, overlap {self.overlap:.0%}"
        )


def register_channel(
    reference: np.ndarray,
    reference_geometry: Geometry,
    moving: np.ndarray,
    moving_geometry: Geometry,
    channel: int,
    *,
    iterations: int = ITERATIONS,
) -> ChannelFit:
    """Fit the rigid transform that brings ``moving`` onto ``reference`` (steps 1-3 of the module docstring).

    Args:
        reference: (X, Y, Z) intensities of the reference channel; its non-zero voxels are where the metric is taken.
        reference_geometry: the reference grid (canonical orientation, ``autoseg.io.images.read_image``).
        moving: (X', Y', Z') intensities of the channel to move, on ``moving_geometry``'s grid.
        channel: the moving channel's index (recorded in the fit).
        iterations: iteration limit per level; default :data:`ITERATIONS`.

    Returns:
        The fit.

    Raises:
        RegistrationError: NaN/Inf voxels, a reference that is zero everywhere, too little overlap before or after
            the fit (:data:`MIN_OVERLAP`), no convergence, or ITK refused; one line saying which.
    """
    for name, array in (("channel 0", reference), (f"channel {channel}", moving)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise RegistrationError(f"{name} has {bad} NaN/Inf voxel(s): nothing to register")
    mask = reference != 0
    if not mask.any():
        raise RegistrationError(f"channel {REFERENCE_CHANNEL} is zero everywhere: nothing to register to")
    center = _world(reference_geometry, np.argwhere(mask).mean(axis=0))
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(float(v) for v in center))
    before = field_of_view_overlap(mask, reference_geometry, moving_geometry, start)
    if before < MIN_OVERLAP:
        raise RegistrationError(
            f"too little overlap: by the headers its field of view covers {before:.0%} of channel "
            f"{REFERENCE_CHANNEL}'s non-zero region (at least {MIN_OVERLAP:.0%} needed); do both files show the same "
            "head from the same session?"
        )
    fixed = image_from_array(reference.astype(np.float32, copy=False), reference_geometry)
    method = _registration_method(reference_geometry, int(mask.sum()), iterations)
    method.SetMetricFixedMask(image_from_array(mask.astype(np.uint8), reference_geometry))
    method.SetInitialTransform(start, inPlace=False)
    try:
        with one_itk_thread():
            fitted = euler_of(method.Execute(fixed, image_from_array(moving.astype(np.float32), moving_geometry)))
    except RuntimeError as error:
        raise RegistrationError(f"ITK could not register it: {_itk_reason(error)}") from None
    stop = method.GetOptimizerStopConditionDescription()
    metric = float(method.GetMetricValue())
    converged = "maximum number of iterations" not in stop.lower() and np.isfinite(metric)
    if not converged:
        raise RegistrationError(
            f"no convergence: the optimizer reached its limit of {iterations} iterations at the finest level "
            f"(mutual information {metric:.3f}; {stop.strip()})"
        )
    after = field_of_view_overlap(mask, reference_geometry, moving_geometry, fitted)
    if after < MIN_OVERLAP:
        raise RegistrationError(
            f"too little overlap after the fit: its field of view covers {after:.0%} of channel "
            f"{REFERENCE_CHANNEL}'s non-zero region (at least {MIN_OVERLAP:.0%} needed)"
        )
    rotation = np.asarray(fitted.GetMatrix(), float).reshape(3, 3)
    translation = tuple(float(v) for v in fitted.GetTranslation())
    return ChannelFit(
        channel=channel,
        center=tuple(float(v) for v in fitted.GetCenter()),
        angles=(fitted.GetAngleX(), fitted.GetAngleY(), fitted.GetAngleZ()),
        translation=translation,
        rotation_degrees=float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0)))),
        shift_mm=float(np.linalg.norm(translation)),
        metric=metric,
        iterations=int(method.GetOptimizerIteration()),
        overlap=after,
        converged=True,
        stop_condition=stop.strip(),
    )


def resample_channel(
    moving: np.ndarray, moving_geometry: Geometry, fit: ChannelFit, reference_geometry: Geometry
) -> np.ndarray:
    """``moving`` on the reference grid through ``fit`` (step 4 of the module docstring).

    Returns:
        (X, Y, Z) float32 on ``reference_geometry``'s grid: linear interpolation, 0 outside ``moving``'s field of view.
    """
    grid = image_from_array(np.zeros(reference_geometry.shape, np.uint8), reference_geometry)
    image = image_from_array(moving.astype(np.float32), moving_geometry)
    return array_from_image(sitk.Resample(image, grid, fit.transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def coregister_channels(
    channels: Sequence[np.ndarray], geometries: Sequence[Geometry], files: Sequence[str | Path] | None = None
) -> tuple[np.ndarray, tuple[ChannelFit, ...]]:
    """Every channel on the reference channel's grid: those on another grid registered and resampled, the others
    as they are.

    Args:
        channels: per channel an (X, Y, Z) array on its own grid, in channel order.
        geometries: per channel its grid (canonical orientation).
        files: per channel its file, named in errors; default ``channel N``.

    Returns:
        (C, X, Y, Z) float32 on ``geometries[0]``'s grid, and the fit of each channel that was moved, in channel order.

    Raises:
        RegistrationError: a channel cannot be registered; the message names its file (or channel) and the reason.
    """
    reference, grid = channels[REFERENCE_CHANNEL], geometries[REFERENCE_CHANNEL]
    out, fits = [], []
    for index, (array, geometry) in enumerate(zip(channels, geometries)):
        if index == REFERENCE_CHANNEL or not grid.differences(geometry):
            out.append(np.asarray(array, np.float32))
            continue
        try:
            fit = register_channel(reference, grid, array, geometry, index)
        except RegistrationError as error:
            name = files[index] if files is not None else f"channel {index}"
            reference_name = Path(files[REFERENCE_CHANNEL]).name if files is not None else None
            raise RegistrationError(error.reason, name, reference_name) from None
        out.append(resample_channel(array, geometry, fit, grid))
        fits.append(fit)
    return np.stack(out), tuple(fits)


def field_of_view_overlap(
    mask: np.ndarray, mask_geometry: Geometry, other: Geometry, transform: sitk.Euler3DTransform
) -> float:
    """Share of the voxels of ``mask`` (X, Y, Z bool on ``mask_geometry``'s grid) whose centres ``transform`` maps
    inside ``other``'s field of view (its voxels' outer edges); 0 for an empty mask. Counted on every k-th voxel of
    the mask, at most :data:`MAX_OVERLAP_POINTS` of them."""
    indices = np.argwhere(mask)
    if not len(indices):
        return 0.0
    points = _world(mask_geometry, indices[:: -(-len(indices) // MAX_OVERLAP_POINTS)])
    matrix = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), float)
    mapped = (points - center) @ matrix.T + center + np.asarray(transform.GetTranslation(), float)
    direction = np.asarray(other.direction, float).reshape(3, 3)
    continuous = (mapped - np.asarray(other.origin, float)) @ np.linalg.inv(direction).T / np.asarray(other.spacing)
    inside = np.all((continuous >= -0.5) & (continuous <= np.asarray(other.shape) - 0.5), axis=1)
    return float(inside.mean())


def euler_transform(
    center: Sequence[float], angles: Sequence[float], translation: Sequence[float]
) -> sitk.Euler3DTransform:
    """The ``Euler3DTransform`` turning by ``angles`` (radians, about world x, y, z) about ``center`` (mm) and
    shifting by ``translation`` (mm), as a fit records it."""
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(float(v) for v in center))
    euler.SetRotation(*(float(v) for v in angles))
    euler.SetTranslation(tuple(float(v) for v in translation))
    return euler


def euler_of(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """A registration's result as one ``Euler3DTransform`` (SimpleITK returns it wrapped in a composite)."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        transform = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    return sitk.Euler3DTransform(transform)


def _registration_method(geometry: Geometry, foreground_voxels: int, iterations: int) -> sitk.ImageRegistrationMethod:
    method = multiresolution_method(
        float(min(geometry.spacing)),
        foreground_voxels,
        3,
        max_samples=MAX_SAMPLES,
        iterations=iterations,
        relaxation=RELAXATION,
    )
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    return method


def multiresolution_method(
    finest_mm: float, foreground_voxels: int, shrunk_axes: int, *, max_samples: int, iterations: int, relaxation: float
) -> sitk.ImageRegistrationMethod:
    """SimpleITK's registration method as autoseg's rigid registrations use it (this module's and the mirror fit of
    ``autoseg.preprocess.symmetry``), all but the metric: a pyramid of :data:`LEVELS_MM` mm (shrink factors from
    ``finest_mm``, never below 1; Gaussian smoothing of half a level's voxel), metric gradients at the sampled points
    only (3x faster at 1 mm than filtered gradient images of every level), a fixed random sample of at most
    ``max_samples`` of the ``foreground_voxels`` per level drawn with :data:`SAMPLING_SEED` (``shrunk_axes``: how many
    axes a level shrinks, 2 for a thin slab whose thick axis keeps its slices), linear interpolation, regular-step
    gradient descent from :data:`LEARNING_RATE_MM` to :data:`MIN_STEP_MM` (``relaxation``: the step's factor when the
    gradient turns; at most ``iterations`` per level) with scales from the physical shift, on
    :data:`REGISTRATION_THREADS` threads (with :func:`one_itk_thread` around ``Execute``)."""
    shrinks = sorted({max(1, int(round(level / finest_mm))) for level in LEVELS_MM}, reverse=True)
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(REGISTRATION_THREADS)
    method.MetricUseFixedImageGradientFilterOff()
    method.MetricUseMovingImageGradientFilterOff()
    method.SetMetricSamplingStrategy(method.RANDOM)
    percentages = [min(1.0, max_samples / max(1.0, foreground_voxels / shrink**shrunk_axes)) for shrink in shrinks]
    method.SetMetricSamplingPercentagePerLevel(percentages, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=LEARNING_RATE_MM,
        minStep=MIN_STEP_MM,
        numberOfIterations=iterations,
        relaxationFactor=relaxation,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel([0.5 * finest_mm * shrink if shrink > 1 else 0.0 for shrink in shrinks])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


@contextmanager
def one_itk_thread() -> Iterator[None]:
    """ITK's default thread count at :data:`REGISTRATION_THREADS` while it lasts, for a registration that must give
    the same fit on every machine: the registration method's own ``SetNumberOfThreads`` does not reach everything it
    builds (a fit changed in its 9th digit with 2 or 8 default threads)."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(REGISTRATION_THREADS)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _world(geometry: Geometry, indices: np.ndarray) -> np.ndarray:
    """World points (mm) of voxel indices (N, 3) or (3,) of ``geometry``'s grid."""
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    return (
        np.asarray(geometry.origin, float) + (np.asarray(indices, float) * np.asarray(geometry.spacing)) @ direction.T
    )


def _itk_reason(error: RuntimeError) -> str:
    """What an ITK exception says went wrong: its description (the last non-empty line, or the ``Description:``
    line), without the file, the filter's name and address."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    description = next((line for line in lines if line.startswith("Description")), None)
    text = description.partition(":")[2] if description else (lines[-1] if lines else "unknown error")
    return re.sub(r"^(ITK ERROR: )?\w+\(0x[0-9a-f]+\): ", "", text.strip()).rstrip(".")
