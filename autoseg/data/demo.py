"""Synthetic demonstration datasets, so the pipeline can be run end to end without downloading data.

Two generators write complete nnU-Net v2 raw datasets (see ``autoseg.data.dataset``):

``make_atlas_like``
    Chronic-stroke T1w MRI in the style of ATLAS R2.0: the MNI152 2009 template that nilearn ships
    (skull-stripped, zero outside the brain, 197 x 233 x 189 voxels at 1 mm), with 1-3 irregular
    T1-hypointense lesions, an elastic deformation, a bias field, an intensity change and Rician noise
    per case. One channel, ``T1``.

``make_ctp_like``
    Acute-stroke CT perfusion in the style of ISLES 2018: thin axial slabs (256 x 256 in plane,
    2-22 slices of 5 mm) through a synthetic head, five channels ``CT``, ``CBF``, ``CBV``, ``MTT`` and
    ``Tmax``, an infarct core (labelled) inside a larger hypoperfused penumbra (not labelled). About a
    third of the subjects have two slabs, grouped by ``subjects`` in ``dataset.json``.

Every case is drawn from its own child seed (``numpy.random.SeedSequence(seed).spawn``), so case
``k`` does not depend on how many cases are made, and the same seed gives byte-identical files.
Arrays are in (x, y, z) order with spacing in mm in the same order, as everywhere in autoseg.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from autoseg.data.dataset import write_dataset_json
from autoseg.errors import UsageError
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

FILE_ENDING = ".nii.gz"
CTP_CHANNELS = ("CT", "CBF", "CBV", "MTT", "Tmax")

# ATLAS-like appearance. The template's white matter lies near 0.84; scaling by 120 puts it near 100.
_T1_SCALE = 120.0
_LESION_MM3 = (10.0, 1.0e5)
# The first lesion of a case is never tiny, so that a 2 mm version still has a visible label.
_PRIMARY_LESION_MIN_MM3 = 300.0
_TINY_SPACING_MM = 3.5
_TINY_MIN_LESION_VOXELS = 16
_TINY_MAX_LESION_MM3 = 6.0e4

# CTP-like slab layout.
_SLICE_MM = 5.0
_SLAB_Z_RANGE_MM = (-40.0, 75.0)
_SUBSLICES = 3  # points per slice along z, averaged to give thick slices their partial-volume look
# Deep grey matter of one hemisphere, (centre, semi-axes) in mm, head frame, x mirrored for the other:
# lentiform nucleus, thalamus, head of the caudate.
_DEEP_GREY = (
    ((22.0, 3.0, 2.0), (7.0, 14.0, 10.0)),
    ((10.0, -14.0, 6.0), (7.0, 11.0, 8.0)),
    ((12.0, 14.0, 12.0), (4.5, 8.0, 8.0)),
)


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
            f"(T1w, skull-stripped), {resolution}, made by autoseg.data.demo.make_atlas_like with seed {seed}."
        ),
    )
    return folder


def make_ctp_like(
    folder: Path,
    num_subjects: int = 20,
    seed: int = 0,
    tiny: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic ISLES-2018-like raw dataset (acute stroke CT perfusion) into ``folder``.

    Each subject is a synthetic head (scalp, skull, CSF, cortex with sulci, white matter, ventricles,
    deep grey matter) with 1-2 infarct cores in one hemisphere inside a larger penumbra. A scan is an
    axial slab of 2-22 slices of 5 mm (in-plane 256 x 256 voxels of 0.8-1.0 mm) with five channels:
    CT (HU: air -1000, brain 25-40, bone ~700-1600), CBF (ml/100 g/min, ~50 in healthy grey matter),
    CBV (ml/100 g, ~4 in grey matter), MTT (s, ~4-6) and Tmax (s, 0-2 when healthy). The perfusion maps
    are zero outside the skull's inner surface. In the core CBF and CBV are low and MTT and Tmax high
    (Tmax > 6 s); in the penumbra Tmax is raised and CBF mildly lowered; CT shows at most a few HU of
    hypodensity. Only the core is labelled. Every third subject (the 2nd, 5th, ...) has a second slab
    at a different z range through the same head and lesion.

    Args:
        folder: the dataset folder itself, e.g. ``.../Dataset002_CTP``; created if missing. Case files
            from an earlier run with more subjects are removed, other files are left alone.
        num_subjects: number of subjects ``S001`` ...; cases are ``ctp_S001_A`` (and ``ctp_S002_B``...).
        seed: seed; the same seed gives byte-identical files.
        tiny: make small cases for tests instead: 64 x 64 in plane (3.5-4 mm), 2-6 slices.
        progress: show a progress bar over subjects.

    Returns:
        ``folder``. All channels are float32, labels uint8; spacing is (s, s, 5.0) mm in (x, y, z) order.
    """
    if num_subjects < 1:
        raise UsageError(f"num_subjects must be at least 1, got {num_subjects}")
    folder = Path(folder)
    subjects: dict[str, str] = {}
    for index in range(num_subjects):
        subject = f"S{index + 1:03d}"
        for slab in _slab_names(index):
            subjects[f"ctp_{subject}_{slab}"] = subject
    _prepare_folder(folder, re.compile(r"^ctp_S\d{3,}_[A-Z]"), list(subjects))
    child_seeds = np.random.SeedSequence(seed).spawn(num_subjects)
    for index, child in tqdm(
        list(enumerate(child_seeds)), desc="CTP-like subjects", unit="subject", disable=not progress
    ):
        rng = np.random.default_rng(child)
        subject = f"S{index + 1:03d}"
        slabs = _slab_names(index)
        for slab, (maps, label, geometry) in zip(slabs, _ctp_subject(rng, len(slabs), tiny), strict=True):
            identifier = f"ctp_{subject}_{slab}"
            for channel, name in enumerate(CTP_CHANNELS):
                write_image(maps[name], geometry, folder / "imagesTr" / f"{identifier}_{channel:04d}{FILE_ENDING}")
            write_image(label, geometry, folder / "labelsTr" / f"{identifier}{FILE_ENDING}")
    resolution = "tiny (64 x 64 in plane)" if tiny else "256 x 256 in plane"
    write_dataset_json(
        folder,
        CTP_CHANNELS,
        len(subjects),
        subjects=subjects,
        name="CTP-like",
        description=(
            "Synthetic data, not ISLES: acute stroke CT perfusion slabs through a synthetic head, "
            f"{resolution}, 5 mm slices, infarct core labelled, made by autoseg.data.demo.make_ctp_like "
            f"with seed {seed}."
        ),
    )
    return folder


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


def _area_sample(array: np.ndarray, factor: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Resample ``array`` at voxel ``positions`` per axis, blurred first so each new voxel shows roughly
    the mean over its own extent (``factor`` old voxels per new voxel along each axis)."""
    # A box of width f has variance f^2 / 12; the old voxels already contribute 1 / 12 of it.
    sigma = np.sqrt(np.maximum(factor**2 - 1.0, 0.0) / 12.0)
    blurred = ndimage.gaussian_filter(array, sigma, mode="constant") if np.any(sigma > 0) else array
    return _upsample_linear(blurred, positions).astype(np.float32)


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


# --------------------------------------------------------------------------------------------------
# CTP-like
# --------------------------------------------------------------------------------------------------


def _slab_names(subject_index: int) -> list[str]:
    """Slab letters for a subject: two slabs for every third subject, fixed so that case names do not
    depend on the seed and a dataset of two or more subjects always has a two-slab subject."""
    return ["A", "B"] if subject_index % 3 == 1 else ["A"]


class _Waves:
    """A smooth random field in 3-D space: a sum of cosines with random wave vectors, unit variance.

    Defined in mm in the head's frame, so every slab through a head sees the same field.
    """

    def __init__(self, rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]):
        directions = rng.standard_normal((count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        lengths = rng.uniform(*wavelength_mm, count)
        self.vectors = (directions * (2 * np.pi / lengths)[:, None]).astype(np.float32)
        self.phases = rng.uniform(0, 2 * np.pi, count).astype(np.float32)
        self.amplitude = np.float32(np.sqrt(2.0 / count))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The field at points given by broadcastable float32 arrays of head coordinates in mm.

        For a slab, ``x`` and ``y`` of shape (nx, ny, 1) and ``z`` of shape (1, 1, nz), the sum over waves
        is done as one matrix product, using cos(a + b) = cos a cos b - sin a sin b.
        """
        planar = self.vectors[:, 0] * x[..., None] + self.vectors[:, 1] * y[..., None]
        axial = self.vectors[:, 2] * z[..., None] + self.phases
        if x.ndim == 3 and x.shape[2] == 1 and y.shape[2] == 1 and z.shape[:2] == (1, 1):
            left = np.concatenate([np.cos(planar), -np.sin(planar)], axis=-1)
            right = np.concatenate([np.cos(axial), np.sin(axial)], axis=-1)
            rows, count = left.shape[0] * left.shape[1], left.shape[-1]
            product = left.reshape(rows, count) @ right.reshape(-1, count).T
            return product.reshape(left.shape[0], left.shape[1], -1) * self.amplitude
        return np.cos(planar + axial).sum(axis=-1, dtype=np.float32) * self.amplitude


@dataclass
class _Head:
    """A synthetic head in its own frame (mm; x left-right, y posterior-anterior, z inferior-superior)."""

    semi_axes: np.ndarray  # head outline (x, y, z-up, z-down) in mm
    exponent: float  # in-plane superellipse exponent; > 2 gives the flatter sides of a real skull
    outline: _Waves
    scalp_mm: float
    skull_mm: float
    skull_waves: _Waves
    csf_mm: float
    ribbon_mm: float
    sulcus_depth_mm: float
    sulci: _Waves
    ventricle_scale: float
    hu: dict[str, float]
    cbf: dict[str, float]
    cbv: dict[str, float]
    tmax_base: float
    tmax_waves: _Waves
    shift_mm: np.ndarray  # head centre in world (x, y)
    angle: float  # in-plane rotation of the head frame against the world, radians

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Head:
        grey_cbf = rng.uniform(45.0, 60.0)
        grey_cbv = rng.uniform(3.6, 4.6)
        return cls(
            semi_axes=np.array([rng.uniform(66, 76), rng.uniform(86, 98), rng.uniform(85, 95), 140.0]),
            exponent=rng.uniform(2.1, 2.6),
            outline=_Waves(rng, 6, (80.0, 200.0)),
            scalp_mm=rng.uniform(3.0, 6.0),
            skull_mm=rng.uniform(5.0, 8.0),
            skull_waves=_Waves(rng, 4, (40.0, 120.0)),
            csf_mm=rng.uniform(1.0, 3.0),
            ribbon_mm=rng.uniform(2.5, 3.5),
            sulcus_depth_mm=rng.uniform(12.0, 20.0),
            sulci=_Waves(rng, 24, (18.0, 34.0)),
            ventricle_scale=rng.uniform(0.8, 1.5),
            hu={
                "air": -1000.0,
                "scalp": rng.uniform(20.0, 40.0),
                "csf": rng.uniform(2.0, 8.0),
                "grey": rng.uniform(35.0, 42.0),
                "white": rng.uniform(24.0, 30.0),
                "deep": rng.uniform(32.0, 38.0),
            },
            cbf={"grey": grey_cbf, "white": grey_cbf * rng.uniform(0.38, 0.48), "deep": grey_cbf * 0.85, "csf": 2.0},
            cbv={"grey": grey_cbv, "white": grey_cbv * rng.uniform(0.45, 0.55), "deep": grey_cbv * 0.85, "csf": 0.12},
            tmax_base=rng.uniform(0.0, 0.8),
            tmax_waves=_Waves(rng, 4, (60.0, 150.0)),
            shift_mm=rng.uniform(-8.0, 8.0, 2),
            angle=rng.uniform(-0.12, 0.12),
        )


@dataclass
class _Stroke:
    """Infarct cores (labelled) with their penumbra, in head coordinates (mm)."""

    side: float  # +1: lesion in the x > 0 hemisphere, -1: in x < 0
    centres: list[np.ndarray]
    semi_axes: list[np.ndarray]
    angles: list[float]
    waves: list[_Waves]
    penumbra: list[float]  # penumbra extent as a multiple of the core's normalised radius
    core_cbf: float
    core_cbv: float
    core_tmax: float
    penumbra_tmax: float
    ct_drop_hu: float


def _draw_stroke(rng: np.random.Generator, head: _Head) -> _Stroke:
    side = float(rng.choice([-1.0, 1.0]))
    centres, semi_axes, angles, waves, penumbra = [], [], [], [], []
    for index in range(1 if rng.random() < 0.65 else 2):
        for _ in range(50):  # rejection: the centre must lie in brain tissue, not in CSF
            if index == 0:
                centre = np.array([side * rng.uniform(25, 50), rng.uniform(-35, 35), rng.uniform(-5, 40)])
            else:
                offset = rng.standard_normal(3)
                centre = centres[0] + offset / np.linalg.norm(offset) * rng.uniform(15, 30)
                centre[0] = side * abs(centre[0])
            tissue = _head_tissue(head, *(np.array([v], np.float32) for v in centre))[0]
            if tissue[0] in (4, 5, 6):
                break
        centres.append(centre)
        scale = 1.0 if index == 0 else 0.6
        semi_axes.append(scale * np.array([rng.uniform(8, 28), rng.uniform(8, 28), rng.uniform(7, 22)]))
        angles.append(rng.uniform(0, np.pi))
        waves.append(_Waves(rng, 8, (15.0, 40.0)))
        penumbra.append(rng.uniform(1.5, 2.2))
    return _Stroke(
        side=side,
        centres=centres,
        semi_axes=semi_axes,
        angles=angles,
        waves=waves,
        penumbra=penumbra,
        core_cbf=rng.uniform(0.1, 0.3),
        core_cbv=rng.uniform(0.3, 0.6),
        core_tmax=rng.uniform(10.0, 16.0),
        penumbra_tmax=rng.uniform(5.5, 8.0),
        ct_drop_hu=rng.uniform(1.0, 4.0),
    )


def _head_tissue(head: _Head, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue codes at head coordinates (broadcastable arrays, mm) and the depth inside the skull.

    Codes: 0 air, 1 scalp, 2 bone, 3 CSF, 4 grey matter, 5 white matter, 6 deep grey matter.
    Returns (codes uint8, fraction of the way through the skull (0 outer, 1 inner) where bone, else 0).
    """
    ax, ay, az_up, az_down = (float(v) for v in head.semi_axes)  # Python floats keep arrays float32
    az = np.where(z >= 0, np.float32(az_up), np.float32(az_down))
    in_plane = (np.abs(x / ax) ** head.exponent + np.abs(y / ay) ** head.exponent) ** (1 / head.exponent)
    radius = np.sqrt(in_plane**2 + (z / az) ** 2) / (1 + 0.02 * head.outline(x, y, z))
    distance = np.sqrt(x**2 + y**2 + z**2)
    depth = (1 - radius) * distance / np.maximum(radius, 1e-3)  # mm from the scalp surface along the ray
    skull = head.skull_mm * (1 + 0.15 * head.skull_waves(x, y, z))
    inner = head.scalp_mm + skull
    brain_depth = depth - inner - head.csf_mm
    codes = np.full(depth.shape, 5, np.uint8)
    sulcal = head.sulci(x, y, z)
    # Grey matter lines the surface and both banks of every sulcus; the sulcus itself holds CSF.
    lining = (np.abs(sulcal) < 0.85) & (brain_depth < head.sulcus_depth_mm + head.ribbon_mm)
    cortex = (brain_depth < head.ribbon_mm) | lining
    codes[cortex] = 4
    codes[(np.abs(sulcal) < 0.15) & (brain_depth < head.sulcus_depth_mm)] = 3
    # The interhemispheric fissure, above the corpus callosum and in front of and behind it.
    fissure = (np.abs(x) < 1.2) & ((z > 25) | (np.abs(y) > 35) | (brain_depth < 20))
    codes[(np.abs(x) < 4.0) & ((z > 22) | (np.abs(y) > 32))] = 4
    codes[fissure] = 3
    for side in (-1.0, 1.0):
        for (cx, cy, cz), (sx, sy, sz) in _DEEP_GREY:
            codes[((x - side * cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2 < 1] = 6
        # Lateral ventricles: a body slanting outwards, and the frontal horn.
        width = 4.0 * head.ventricle_scale
        ventricle = ((x - side * (6 + 0.12 * (z - 15))) / width) ** 2 + ((y + 2) / 26) ** 2 + ((z - 16) / 9) ** 2 < 1
        ventricle |= ((x - side * 9) / (width * 1.1)) ** 2 + ((y - 20) / 9) ** 2 + ((z - 12) / 8) ** 2 < 1
        codes[ventricle] = 3
    codes[brain_depth < 0] = 3
    codes[depth < inner] = 2
    codes[depth < head.scalp_mm] = 1
    codes[depth < 0] = 0
    through_skull = np.where(codes == 2, np.clip((depth - head.scalp_mm) / skull, 0, 1), 0).astype(np.float32)
    return codes, through_skull


def _stroke_fields(stroke: _Stroke, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Core mask and penumbra severity (0 healthy, 1 over most of the penumbra) at head coordinates (mm)."""
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    core = np.zeros(shape, bool)
    severity = np.zeros(shape, np.float32)
    regions = zip(stroke.centres, stroke.semi_axes, stroke.angles, stroke.waves, stroke.penumbra, strict=True)
    for centre, axes, angle, waves, extent in regions:
        (cx, cy, cz), (sx, sy, sz) = (float(v) for v in centre), (float(v) for v in axes)
        dx, dy, dz = x - cx, y - cy, z - cz
        cosine, sine = math.cos(angle), math.sin(angle)
        u = cosine * dx + sine * dy
        v = -sine * dx + cosine * dy
        radius = np.sqrt((u / sx) ** 2 + (v / sy) ** 2 + (dz / sz) ** 2) + 0.25 * waves(x, y, z)
        core |= radius < 1
        # Severity is flat over the inner two thirds of the penumbra and fades over the outer third.
        severity = np.maximum(severity, np.clip(3 * (extent - radius) / (extent - 1), 0, 1))
    hemisphere = stroke.side * x > 0
    return core & hemisphere, np.where(hemisphere, severity, 0).astype(np.float32)


def _ctp_subject(
    rng: np.random.Generator, slabs: int, tiny: bool
) -> list[tuple[dict[str, np.ndarray], np.ndarray, Geometry]]:
    """All slabs of one subject: (maps by channel name, label, geometry) per slab, arrays (x, y, z)."""
    head = _Head.draw(rng)
    stroke = _draw_stroke(rng, head)
    in_plane = 64 if tiny else 256
    pixel_mm = rng.uniform(3.5, 4.0) if tiny else rng.uniform(0.8, 1.0)
    lesion_z, lesion_height = float(stroke.centres[0][2]), float(stroke.semi_axes[0][2])
    first_start = None
    results = []
    for slab in range(slabs):
        count = int(rng.integers(2, 7)) if tiny else int(np.clip(2 + np.round(rng.beta(1.3, 1.8) * 20), 2, 22))
        span = (count - 1) * _SLICE_MM
        highest = max(_SLAB_Z_RANGE_MM[1] - span, _SLAB_Z_RANGE_MM[0])
        # The first slab passes through the lesion's centre, the second through another part of it.
        target = lesion_z
        if slab > 0:
            target += rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.6) * lesion_height
        start = float(np.clip(target - rng.uniform(0.15, 0.85) * span, _SLAB_Z_RANGE_MM[0], highest))
        if first_start is not None and abs(start - first_start) < _SLICE_MM:
            start = first_start + _SLICE_MM if first_start + _SLICE_MM <= highest else first_start - _SLICE_MM
        first_start = start if first_start is None else first_start
        results.append(_ctp_scan(rng, head, stroke, in_plane, pixel_mm, start, count))
    return results


def _ctp_scan(
    rng: np.random.Generator, head: _Head, stroke: _Stroke, in_plane: int, pixel_mm: float, z_start: float, count: int
) -> tuple[dict[str, np.ndarray], np.ndarray, Geometry]:
    """One slab of ``count`` 5 mm slices from ``z_start`` (mm), ``in_plane`` x ``in_plane`` pixels."""
    origin_xy = -(in_plane - 1) / 2 * pixel_mm
    world = (origin_xy + np.arange(in_plane) * pixel_mm).astype(np.float32)
    wx, wy = world[:, None] - float(head.shift_mm[0]), world[None, :] - float(head.shift_mm[1])
    cosine, sine = math.cos(head.angle), math.sin(head.angle)
    x = (cosine * wx + sine * wy)[:, :, None]
    y = (-sine * wx + cosine * wy)[:, :, None]
    offsets = (np.arange(_SUBSLICES) - (_SUBSLICES - 1) / 2) * _SLICE_MM / _SUBSLICES
    z = (z_start + np.arange(count)[:, None] * _SLICE_MM + offsets[None, :]).ravel().astype(np.float32)[None, None, :]

    codes, through_skull = _head_tissue(head, x, y, z)
    core, severity = _stroke_fields(stroke, x, y, z)
    brain = codes >= 3
    core &= codes >= 4
    severity = np.where(codes >= 4, severity, 0)

    hu = np.zeros(codes.shape, np.float32)
    cbf = np.zeros(codes.shape, np.float32)
    cbv = np.zeros(codes.shape, np.float32)
    for code, name in ((0, "air"), (1, "scalp"), (3, "csf"), (4, "grey"), (5, "white"), (6, "deep")):
        where = codes == code
        hu[where] = head.hu[name]
        if code >= 3:
            cbf[where] = head.cbf[name]
            cbv[where] = head.cbv[name]
    bone = codes == 2
    hu[bone] = 1600 - 900 * np.sin(np.pi * through_skull[bone])  # dense tables, lighter diploe between
    tmax = np.where(brain, head.tmax_base + 0.4 * (1 + head.tmax_waves(x, y, z)) + 0.4 * (codes == 5), 0)
    # Penumbra: CBF mildly down, CBV kept up by autoregulation, Tmax delayed; the core: all collapsed.
    cbf *= 1 - 0.35 * severity
    cbv *= 1 + 0.1 * severity
    tmax = tmax + severity * stroke.penumbra_tmax
    cbf = np.where(core, cbf * stroke.core_cbf, cbf)
    cbv = np.where(core, cbv * stroke.core_cbv, cbv)
    tmax = np.where(core, stroke.core_tmax, tmax)
    hu -= core * stroke.ct_drop_hu

    def thick(volume: np.ndarray) -> np.ndarray:
        return volume.reshape(in_plane, in_plane, count, _SUBSLICES).mean(axis=3, dtype=np.float32)

    brain_fraction = thick(brain.astype(np.float32))
    inside = brain_fraction > 0.5
    label = (thick(core.astype(np.float32)) >= 0.5) & inside
    cbf, cbv, tmax, hu = thick(cbf), thick(cbv), thick(tmax), thick(hu)
    mtt = np.where(inside, 60.0 * cbv / np.maximum(cbf, 1.0), 0)  # central volume theorem: MTT = CBV / CBF

    blur = (0.6 / pixel_mm, 0.6 / pixel_mm, 0)  # scanner point spread, in plane only: slices are thick
    noise_hu = rng.uniform(3.0, 6.0)
    ct = (
        ndimage.gaussian_filter(hu, blur)
        + noise_hu * ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0.7, 0.7, 0)) * 1.6
    )
    maps = {"CT": np.maximum(ct, -1024.0).astype(np.float32)}
    gain = rng.uniform(0.85, 1.15)  # arterial-input and deconvolution differences between scans
    smoothing = rng.uniform(0.6, 1.2) / pixel_mm
    for name, values, relative, absolute, upper in (
        ("CBF", cbf * gain, 0.12, 1.0, 150.0),
        ("CBV", cbv, 0.12, 0.1, 12.0),
        ("MTT", np.minimum(mtt, 20.0), 0.1, 0.3, 24.0),
        ("Tmax", tmax, 0.1, 0.4, 30.0),
    ):
        noisy = values * np.exp(relative * rng.standard_normal(values.shape, dtype=np.float32))
        noisy = noisy + absolute * rng.standard_normal(values.shape, dtype=np.float32)
        noisy = ndimage.gaussian_filter(noisy, (smoothing, smoothing, 0))
        # Inside the brain a map never reads exactly zero, so "nonzero" marks the brain as in real maps.
        maps[name] = np.where(inside, np.clip(noisy, 0.01, upper), 0).astype(np.float32)
    geometry = Geometry(
        shape=(in_plane, in_plane, count),
        spacing=(float(pixel_mm), float(pixel_mm), _SLICE_MM),
        origin=(float(origin_xy), float(origin_xy), float(z_start)),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    return maps, label.astype(np.uint8), geometry
