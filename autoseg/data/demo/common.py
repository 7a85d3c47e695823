"""What both demo generators share: the dataset folder, smooth random fields and random rotations.

Arrays are in (x, y, z) order with spacing in mm in the same order, as everywhere in autoseg."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage

FILE_ENDING = ".nii.gz"


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _prepare_folder(folder: Path, generated: re.Pattern, identifiers: list[str]) -> None:
    """Create the folders; delete case files a generator made earlier that this run will not rewrite,
    so ``imagesTr`` never lists more cases than ``numTraining``."""
    wanted = set(identifiers)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for path in (folder / sub).iterdir():
            name = path.name
            if not name.endswith(FILE_ENDING) or not generated.match(name):
                continue
            stem = name[: -len(FILE_ENDING)]
            identifier = re.sub(r"_\d{4}$", "", stem) if sub == "imagesTr" else stem
            if identifier not in wanted:
                path.unlink()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise smoothed with ``sigma`` voxels, unit standard deviation, float32, ``shape``.

    The noise is drawn and smoothed on a grid ``sigma / 2`` times coarser and interpolated back, which
    is as smooth to the eye and much cheaper for large ``sigma``.
    """
    step = max(1, int(sigma // 2))
    coarse = rng.standard_normal(tuple(-(-n // step) + 1 for n in shape), dtype=np.float32)
    field = ndimage.gaussian_filter(coarse, sigma / step, mode="wrap")
    if step > 1:
        field = _upsample_linear(field, [np.arange(n) / step for n in shape])
    field = field[tuple(slice(0, n) for n in shape)]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _upsample_linear(array: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Separable linear interpolation of ``array`` at ``positions[axis]`` (voxel coordinates) per axis."""
    for axis, where in enumerate(positions):
        size = array.shape[axis]
        where = np.clip(where, 0, size - 1)
        lower = np.clip(np.floor(where).astype(np.intp), 0, max(size - 2, 0))
        fraction = (where - lower).astype(np.float32)
        if not fraction.any():  # positions on the grid, as when downsampling by a whole factor
            array = np.take(array, lower, axis=axis)
            continue
        upper = np.minimum(lower + 1, array.shape[axis] - 1)
        shape = [1] * array.ndim
        shape[axis] = -1
        fraction = fraction.reshape(shape)
        array = np.take(array, lower, axis=axis) * (1 - fraction) + np.take(array, upper, axis=axis) * fraction
    return array


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
