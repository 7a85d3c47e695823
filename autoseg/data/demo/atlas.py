"""``make_atlas_like``: chronic-stroke T1w MRI in the style of ATLAS R2.0, written as a complete nnU-Net v2 raw dataset
(see ``autoseg.data.dataset``).

The MNI152 2009 template (:mod:`autoseg.data.demo.template`), with 1-3 irregular T1-hypointense lesions
(:mod:`autoseg.data.demo.lesions`), an elastic deformation, a bias field, an intensity change and Rician noise per
case. One channel, ``T1``. Every case is drawn from its own child seed (``numpy.random.SeedSequence(seed).spawn``),
so case ``k`` does not depend on how many cases are made, and the same seed gives byte-identical files.
Arrays are in (x, y, z) order with spacing in mm in the same order, as everywhere in autoseg."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoseg.data.dataset import write_dataset_json
from autoseg.data.demo.common import FILE_ENDING, _prepare_folder
from autoseg.data.demo.lesions import _LESION_MM3, _PRIMARY_LESION_MIN_MM3, _deform, _lesion_shape, _lesion_weight
from autoseg.data.demo.template import _Anatomy, _area_sample, _mni_anatomy, _tiny_anatomy
from autoseg.errors import UsageError
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

# ATLAS-like appearance. The template's white matter lies near 0.84; scaling by 120 puts it near 100.
_T1_SCALE = 120.0
_TINY_MIN_LESION_VOXELS = 16
_TINY_MAX_LESION_MM3 = 6.0e4


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def make_atlas_like(
    folder: Path,
    num_cases: int = 20,
    seed: int = 0,
    spacing_mm: float = 1.0,
    tiny: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic ATLAS-like raw dataset (chronic stroke, T1w MRI in MNI space) into ``folder``.

    Each case is the MNI152 2009 template (brain only, zero outside) with 1-3 lesions of 10 to 1e5 mm^3
    (the first at least 300 mm^3): a CSF-dark core with an intermediate 1-2 mm rim, both labelled. The
    image and label then share a smooth elastic deformation of 2-4 mm; the image gets a +-10-20 %
    bias field, a global gain (x0.8-1.25) and offset, and Rician noise.

    Args:
        folder: the dataset folder itself, e.g. ``.../Dataset001_ATLAS``; created if missing. Case files
            from an earlier run with more cases are removed, other files are left alone.
        num_cases: number of training cases ``atlas_0001`` ... .
        seed: seed; the same seed gives byte-identical files.
        spacing_mm: isotropic output spacing in mm. 1.0 gives the template grid, 197 x 233 x 189 voxels
            (x, y, z); 2.0 gives 99 x 117 x 95 voxels (the 1 mm case resampled, same origin).
            Ignored when ``tiny`` is set.
        tiny: make small cases for tests instead: 3.5 mm voxels, cropped to the brain (42 x 52 x 45
            voxels), 1-2 lesions of at least 16 voxels each; well under a second per case.
        progress: show a progress bar over cases.

    Returns:
        ``folder``. Images are float32 (T1 intensity, white matter near 100, zero outside the brain);
        labels are uint8, 1 = lesion.
    """
    if num_cases < 1:
        raise UsageError(f"num_cases must be at least 1, got {num_cases}")
    if not tiny and spacing_mm <= 0:
        raise UsageError(f"spacing_mm must be positive, got {spacing_mm}")
    folder = Path(folder)
    identifiers = [f"atlas_{index + 1:04d}" for index in range(num_cases)]
    _prepare_folder(folder, re.compile(r"^atlas_\d{4,}"), identifiers)
    anatomy = _tiny_anatomy() if tiny else _mni_anatomy()
    if tiny:
        voxel_mm3 = anatomy.geometry.voxel_volume_mm3
        volumes = (_TINY_MIN_LESION_VOXELS * voxel_mm3, _TINY_MAX_LESION_MM3)
        primary_min, counts = volumes[0], (1, 2)
    else:
        volumes, primary_min, counts = _LESION_MM3, _PRIMARY_LESION_MIN_MM3, (1, 2, 3)
    child_seeds = np.random.SeedSequence(seed).spawn(num_cases)
    for identifier, child in tqdm(
        list(zip(identifiers, child_seeds, strict=True)), desc="ATLAS-like cases", unit="case", disable=not progress
    ):
        rng = np.random.default_rng(child)
        image, label = _atlas_case(anatomy, rng, volumes, primary_min, counts)
        geometry = anatomy.geometry
        if not tiny and not math.isclose(spacing_mm, geometry.spacing[0]):
            image, label, geometry = _resample_isotropic(image, label, geometry, spacing_mm)
        write_image(image, geometry, folder / "imagesTr" / f"{identifier}_0000{FILE_ENDING}")
        write_image(label, geometry, folder / "labelsTr" / f"{identifier}{FILE_ENDING}")
    resolution = "tiny (3.5 mm, cropped)" if tiny else f"{spacing_mm:g} mm"
    write_dataset_json(
        folder,
        ("T1",),
        num_cases,
        name="ATLAS-like",
        description=(
            "Synthetic data, not ATLAS: chronic stroke lesions painted into the MNI152 2009 template "
            f"(T1w, skull-stripped), {resolution}, made by autoseg.data.demo.atlas.make_atlas_like with seed {seed}."
        ),
    )
    return folder


def _resample_isotropic(
    image: np.ndarray, label: np.ndarray, geometry: Geometry, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Resample a case to ``spacing_mm`` keeping voxel (0, 0, 0) where it is; the label by area (> 50 %)."""
    factor = spacing_mm / np.asarray(geometry.spacing)
    counts = np.floor((np.asarray(geometry.shape) - 1) / factor).astype(int) + 1
    positions = [np.arange(counts[axis]) * factor[axis] for axis in range(3)]
    new_image = _area_sample(image, factor, positions)
    new_label = (_area_sample(label.astype(np.float32), factor, positions) > 0.5) & (new_image > 0)
    new_geometry = Geometry(
        shape=tuple(int(n) for n in counts),
        spacing=(float(spacing_mm),) * 3,
        origin=geometry.origin,
        direction=geometry.direction,
    )
    return new_image, new_label.astype(np.uint8), new_geometry


def _atlas_case(
    anatomy: _Anatomy,
    rng: np.random.Generator,
    volumes_mm3: tuple[float, float],
    primary_min_mm3: float,
    counts: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """One ATLAS-like case on the anatomy's grid: (T1 image float32, label uint8), both (x, y, z)."""
    shape = anatomy.t1.shape
    spacing = np.asarray(anatomy.geometry.spacing)
    weight = np.zeros(shape, np.float32)  # 1 = fully lesion (CSF-like), 0 = untouched tissue
    level = np.zeros(shape, np.float32)  # the lesion core's intensity on the template scale
    label = np.zeros(shape, bool)
    probabilities = np.array([0.5, 0.3, 0.2][: len(counts)])
    number = int(rng.choice(counts, p=probabilities / probabilities.sum()))
    for index in range(number):
        low = primary_min_mm3 if index == 0 else volumes_mm3[0]
        volume = float(np.exp(rng.uniform(np.log(low), np.log(volumes_mm3[1]))))
        centre = np.array(np.unravel_index(anatomy.centres[rng.integers(anatomy.centres.size)], shape))
        box, lesion = _lesion_shape(anatomy, rng, centre, volume)
        if not lesion.any():
            continue
        lesion_weight = _lesion_weight(lesion, spacing, rim_mm=rng.uniform(1.0, 2.0))
        core = rng.uniform(0.17, 0.3)  # template CSF lies near 0.22-0.3
        stronger = lesion_weight > weight[box]
        weight[box] = np.where(stronger, lesion_weight, weight[box])
        level[box] = np.where(stronger, core, level[box])
        label[box] |= lesion
    image = np.where(anatomy.brain, anatomy.t1 * (1 - weight) + level * weight, 0).astype(np.float32)
    image, label, brain = _deform(anatomy, rng, image, label)
    return _scanner(rng, image, brain), label.astype(np.uint8)


def _scanner(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Bias field, gain and offset and Rician noise inside ``brain``; zero outside. Returns float32."""
    points = np.nonzero(brain)
    shape = np.asarray(image.shape, dtype=float)
    unit = [(2 * points[axis] / max(shape[axis] - 1, 1) - 1).astype(np.float32) for axis in range(3)]
    # A second-order polynomial in the log domain: smooth, positive, and bounded by construction.
    terms = [unit[0], unit[1], unit[2], unit[0] * unit[1], unit[1] * unit[2], unit[0] * unit[2]]
    terms += [u**2 - 1 / 3 for u in unit]
    log_bias = sum(rng.normal() * term for term in terms)
    log_bias *= math.log1p(rng.uniform(0.1, 0.2)) / max(float(np.abs(log_bias).max()), 1e-6)
    values = image[points] * np.exp(log_bias) * _T1_SCALE * rng.uniform(0.8, 1.25) + rng.uniform(-5.0, 5.0)
    sigma = rng.uniform(1.5, 4.0)
    real = values + sigma * rng.standard_normal(values.size, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(values.size, dtype=np.float32)
    result = np.zeros(image.shape, np.float32)
    result[points] = np.sqrt(real**2 + imaginary**2)
    return result
