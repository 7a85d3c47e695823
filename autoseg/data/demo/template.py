"""The brain phantom the ATLAS-like cases are drawn on: the MNI152 2009 template that nilearn ships
(skull-stripped, 197 x 233 x 189 voxels at 1 mm), or a tiny stand-in for tests."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from autoseg.data.demo.common import _upsample_linear
from autoseg.io.geometry import Geometry

# --------------------------------------------------------------------------------------------------
# ATLAS-like
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Template anatomy on one grid, arrays in (x, y, z) order.

    Attributes:
        t1: template intensity, about 0..1 (white matter ~0.84), zero outside the brain; float32.
        brain: brain mask.
        lesion_zone: where lesion voxels may lie: brain tissue (grey + white matter probability > 0.5),
            so that lesions follow the cortex and stop at the ventricles like a tracer's outline.
        centres: flat indices of voxels where a lesion may be centred (grey or white matter > 0.5).
        near: (3, N) indices of voxels within ~6 mm of the brain, the only ones a deformation can fill.
        geometry: the grid.
    """

    t1: np.ndarray
    brain: np.ndarray
    lesion_zone: np.ndarray
    centres: np.ndarray
    near: np.ndarray
    geometry: Geometry


def _geometry_from_affine(affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
    """The SimpleITK (LPS) geometry whose NIfTI file carries the RAS ``affine`` that nibabel reports."""
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    matrix = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    origin = ras_to_lps @ affine[:3, 3]
    return Geometry(
        shape=tuple(int(n) for n in shape),
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) + 0.0 for v in origin),  # + 0.0 turns -0.0 into 0.0
        direction=tuple(float(v) + 0.0 for v in direction.ravel()),
    )


def _build_anatomy(
    t1: np.ndarray, brain: np.ndarray, grey: np.ndarray, white: np.ndarray, geometry: Geometry
) -> _Anatomy:
    spacing = np.asarray(geometry.spacing)
    near = ndimage.binary_dilation(brain, iterations=int(math.ceil(6.0 / spacing.min())))
    arrays = {
        "t1": np.where(brain, t1, 0).astype(np.float32),
        "brain": brain,
        "lesion_zone": brain & (grey + white > 0.5),
        "centres": np.flatnonzero(brain & ((grey > 0.5) | (white > 0.5))),
        "near": np.stack(np.nonzero(near)).astype(np.int32),
    }
    for array in arrays.values():
        array.flags.writeable = False  # shared through the cache; a case must never change them
    return _Anatomy(geometry=geometry, **arrays)


@functools.lru_cache(maxsize=1)
def _mni_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """The MNI152 2009 template nilearn ships, 1 mm, 197 x 233 x 189: T1, brain mask, grey and white
    matter probabilities, and the geometry whose NIfTI affine is the template's."""
    from nilearn import datasets  # imported here: nilearn is slow to import and only this needs it

    template = datasets.load_mni152_template(resolution=1)
    t1 = template.get_fdata(dtype=np.float32)
    brain = (datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0) & (t1 > 0)
    grey = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    white = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    return t1, brain, grey, white, _geometry_from_affine(template.affine, t1.shape)


@functools.lru_cache(maxsize=1)
def _mni_anatomy() -> _Anatomy:
    """The template anatomy at 1 mm."""
    return _build_anatomy(*_mni_maps())


@functools.lru_cache(maxsize=1)
def _tiny_anatomy() -> _Anatomy:
    """The template resampled to 3.5 mm on a grid centred on the brain's bounding box (42 x 52 x 45)."""
    t1, brain, grey, white, full = _mni_maps()
    spacing = np.asarray(full.spacing)
    factor = _TINY_SPACING_MM / spacing
    nonzero = np.nonzero(brain)
    low = np.array([axis.min() for axis in nonzero], dtype=float)
    high = np.array([axis.max() for axis in nonzero], dtype=float)
    counts = np.ceil((high - low + 1) / factor).astype(int)
    start = (low + high) / 2 - (counts - 1) / 2 * factor
    positions = [start[axis] + np.arange(counts[axis]) * factor[axis] for axis in range(3)]

    def shrink(array: np.ndarray) -> np.ndarray:
        return _area_sample(array.astype(np.float32), factor, positions)

    direction = np.asarray(full.direction).reshape(3, 3)
    origin = np.asarray(full.origin) + direction @ (start * spacing)
    geometry = Geometry(
        shape=tuple(int(n) for n in counts),
        spacing=tuple(float(v) for v in factor * spacing),
        origin=tuple(float(v) for v in origin),
        direction=full.direction,
    )
    return _build_anatomy(shrink(np.where(brain, t1, 0)), shrink(brain) > 0.5, shrink(grey), shrink(white), geometry)


_TINY_SPACING_MM = 3.5


def _area_sample(array: np.ndarray, factor: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Resample ``array`` at voxel ``positions`` per axis, blurred first so each new voxel shows roughly
    the mean over its own extent (``factor`` old voxels per new voxel along each axis)."""
    # A box of width f has variance f^2 / 12; the old voxels already contribute 1 / 12 of it.
    sigma = np.sqrt(np.maximum(factor**2 - 1.0, 0.0) / 12.0)
    blurred = ndimage.gaussian_filter(array, sigma, mode="constant") if np.any(sigma > 0) else array
    return _upsample_linear(blurred, positions).astype(np.float32)
