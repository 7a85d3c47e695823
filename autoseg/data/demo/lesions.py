"""Chronic-stroke lesions for the ATLAS-like cases: irregular shapes, their T1 hypointensity with a rim, and
the elastic deformation of a case."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autoseg.data.demo.common import _random_rotation, _smooth_noise, _upsample_linear
from autoseg.data.demo.template import _Anatomy

_LESION_MM3 = (10.0, 1.0e5)
# The first lesion of a case is never tiny, so that a 2 mm version still has a visible label.
_PRIMARY_LESION_MIN_MM3 = 300.0


def _lesion_shape(
    anatomy: _Anatomy, rng: np.random.Generator, centre: np.ndarray, volume_mm3: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """An irregular lesion of about ``volume_mm3`` around ``centre`` inside the lesion zone.

    Returns the box (slices into the volume) and the lesion mask within it.
    """
    spacing = np.asarray(anatomy.geometry.spacing)
    shape = np.asarray(anatomy.t1.shape)
    voxels = max(1, int(round(volume_mm3 / float(np.prod(spacing)))))
    radius_mm = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    half = np.ceil(2.2 * radius_mm / spacing).astype(int) + 2
    low, high = np.maximum(centre - half, 0), np.minimum(centre + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    axes = radius_mm * np.exp(np.clip(rng.normal(0.0, 0.25, 3), -0.5, 0.5))
    axes = (axes * radius_mm / np.prod(axes) ** (1 / 3)).astype(np.float32)
    rotation = _random_rotation(rng).astype(np.float32)
    # mm from the centre along each array axis, shaped to broadcast over the box
    x, y, z = (
        ((np.arange(low[axis], high[axis]) - centre[axis]) * spacing[axis])
        .astype(np.float32)
        .reshape([-1 if other == axis else 1 for other in range(3)])
        for axis in range(3)
    )
    radius = sum(((rotation[i, 0] * x + rotation[i, 1] * y + rotation[i, 2] * z) / axes[i]) ** 2 for i in range(3))
    noise = _smooth_noise(rng, tuple(high - low), sigma=max(0.35 * radius_mm / float(spacing.mean()), 0.75))
    radius = np.sqrt(radius)
    field = radius + rng.uniform(0.25, 0.5) * noise
    # Strokes follow arterial territories, which end at the midline (world x = 0 in MNI space).
    along = [float(v) for v in anatomy.geometry.direction[:3]]  # world x per mm along each array axis
    centre_x = anatomy.geometry.origin[0] + sum(along[axis] * spacing[axis] * centre[axis] for axis in range(3))
    world_x = centre_x + along[0] * x + along[1] * y + along[2] * z
    allowed = anatomy.lesion_zone[box] & (world_x * (1.0 if centre_x >= 0 else -1.0) >= 0)
    values = field[allowed]
    threshold = np.partition(values, voxels - 1)[voxels - 1] if values.size > voxels else np.inf
    # Where tissue or the midline leaves too little room the lesion stays smaller than asked, rather
    # than spreading to the edges of its box; the box holds the ellipsoid out to ``inside_box``.
    inside_box = float(np.min(half * spacing) / axes.max())
    lesion = allowed & (field <= min(threshold, 1.4)) & (radius < inside_box)
    # Thresholded noise leaves specks around the blob; a tracer would draw the blob, not the specks.
    components, count = ndimage.label(lesion)
    if count > 1:
        sizes = np.bincount(components.ravel())[1:]
        lesion = np.isin(components, 1 + np.flatnonzero(sizes >= 0.25 * sizes.max()))
    return box, lesion


def _lesion_weight(lesion: np.ndarray, spacing: np.ndarray, rim_mm: float) -> np.ndarray:
    """How lesion-like each voxel of a box looks: 1 in the core, down to 0.45 in the rim, 0 outside.

    The rim (gliosis, partial volume) is the outer ``rim_mm`` of the lesion, with intensity between
    tissue and CSF. A voxel shows the share of rim within its own extent, so the rim is a voxel or two
    wide at 1 mm and only lightens the edge voxels at 3.5 mm; a slight blur softens the outer edge.
    """
    size = float(np.prod(spacing)) ** (1 / 3)
    # The edge lies half a voxel beyond the last lesion voxel, so a voxel whose distance to the nearest
    # outside voxel centre is ``d`` spans depths ``d - size`` to ``d`` below the edge.
    distance = ndimage.distance_transform_edt(np.pad(lesion, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    rim_share = np.clip((np.minimum(distance, rim_mm) - (distance - size)) / size, 0, 1)
    weight = np.where(lesion, 1 - 0.55 * rim_share, 0).astype(np.float32)
    return np.maximum(ndimage.gaussian_filter(weight, 0.5 / spacing, mode="constant"), 0.0)


def _deform(
    anatomy: _Anatomy, rng: np.random.Generator, image: np.ndarray, label: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp image, label and brain mask with one smooth displacement field of at most 2-4 mm.

    Returns the warped image (zero outside the warped brain), label (inside the warped brain) and brain.
    """
    spacing = np.asarray(anatomy.geometry.spacing)
    shape = np.asarray(image.shape)
    control_mm = 16.0
    coarse_shape = tuple(int(n) for n in np.ceil((shape - 1) * spacing / control_mm) + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal((3, *coarse_shape)).astype(np.float32), (0, 1, 1, 1))
    coarse *= rng.uniform(2.0, 4.0) / float(np.sqrt((coarse**2).sum(axis=0)).max())
    near = anatomy.near
    # Displacement at every needed voxel: the coarse field interpolated separably over the near box.
    low, high = near.min(axis=1), near.max(axis=1) + 1
    positions = [np.arange(low[axis], high[axis]) * spacing[axis] / control_mm for axis in range(3)]
    local = tuple(near - low[:, None])
    coordinates = np.empty((3, near.shape[1]), np.float64)
    for axis in range(3):
        displacement_mm = _upsample_linear(coarse[axis], positions)
        coordinates[axis] = near[axis] + displacement_mm[local] / spacing[axis]

    def warp(volume: np.ndarray) -> np.ndarray:
        result = np.zeros(image.shape, np.float32)
        result[tuple(near)] = ndimage.map_coordinates(volume, coordinates, order=1, mode="constant", prefilter=False)
        return result

    brain = warp(anatomy.brain.astype(np.float32)) > 0.5
    warped = np.where(brain, warp(image), 0).astype(np.float32)
    warped_label = (warp(label.astype(np.float32)) > 0.5) & brain
    return warped, warped_label, brain
