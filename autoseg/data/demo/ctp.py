"""``make_ctp_like``: acute-stroke CT perfusion in the style of ISLES 2018, written as a complete nnU-Net v2 raw
dataset (see ``autoseg.data.dataset``).

Thin axial slabs (256 x 256 in plane, 2-22 slices of 5 mm) through a synthetic head (:mod:`autoseg.data.demo.head`),
five channels ``CT``, ``CBF``, ``CBV``, ``MTT`` and ``Tmax``, an infarct core (labelled) inside a larger hypoperfused
penumbra (not labelled). About a third of the subjects have two slabs, grouped by ``subjects`` in ``dataset.json``.
Every case is drawn from its own child seed, so case ``k`` does not depend on how many cases are made, and the same
seed gives byte-identical files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from autoseg.data.dataset import write_dataset_json
from autoseg.data.demo.common import FILE_ENDING, _prepare_folder
from autoseg.data.demo.head import _draw_stroke, _Head, _head_tissue, _Stroke, _stroke_fields
from autoseg.errors import UsageError
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

CTP_CHANNELS = ("CT", "CBF", "CBV", "MTT", "Tmax")

# CTP-like slab layout.
_SLICE_MM = 5.0
_SLAB_Z_RANGE_MM = (-40.0, 75.0)
_SUBSLICES = 3  # points per slice along z, averaged to give thick slices their partial-volume look


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
            f"{resolution}, 5 mm slices, infarct core labelled, made by autoseg.data.demo.ctp.make_ctp_like "
            f"with seed {seed}."
        ),
    )
    return folder


# --------------------------------------------------------------------------------------------------
# CTP-like
# --------------------------------------------------------------------------------------------------


def _slab_names(subject_index: int) -> list[str]:
    """Slab letters for a subject: two slabs for every third subject, fixed so that case names do not
    depend on the seed and a dataset of two or more subjects always has a two-slab subject."""
    return ["A", "B"] if subject_index % 3 == 1 else ["A"]


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
    x, y, z = _slab_coordinates(head, in_plane, pixel_mm, origin_xy, z_start, count)
    codes, through_skull = _head_tissue(head, x, y, z)
    core, severity = _stroke_fields(stroke, x, y, z)
    brain = codes >= 3
    core &= codes >= 4
    severity = np.where(codes >= 4, severity, 0)
    hu, cbf, cbv, tmax = _tissue_values(head, stroke, (x, y, z), codes, through_skull, core, severity)

    def thick(volume: np.ndarray) -> np.ndarray:
        return volume.reshape(in_plane, in_plane, count, _SUBSLICES).mean(axis=3, dtype=np.float32)

    brain_fraction = thick(brain.astype(np.float32))
    inside = brain_fraction > 0.5
    label = (thick(core.astype(np.float32)) >= 0.5) & inside
    cbf, cbv, tmax, hu = thick(cbf), thick(cbv), thick(tmax), thick(hu)
    mtt = np.where(inside, 60.0 * cbv / np.maximum(cbf, 1.0), 0)  # central volume theorem: MTT = CBV / CBF
    maps = _scanner_maps(rng, pixel_mm, inside, hu, {"CBF": cbf, "CBV": cbv, "MTT": mtt, "Tmax": tmax})
    geometry = Geometry(
        shape=(in_plane, in_plane, count),
        spacing=(float(pixel_mm), float(pixel_mm), _SLICE_MM),
        origin=(float(origin_xy), float(origin_xy), float(z_start)),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    return maps, label.astype(np.uint8), geometry


def _slab_coordinates(
    head: _Head, in_plane: int, pixel_mm: float, origin_xy: float, z_start: float, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head coordinates (mm) of every pixel and sub-slice of the slab: x and y (in_plane, in_plane, 1), turned by
    the head's angle about its shifted centre; z (1, 1, count * sub-slices), each 5 mm slice sampled thin."""
    world = (origin_xy + np.arange(in_plane) * pixel_mm).astype(np.float32)
    wx, wy = world[:, None] - float(head.shift_mm[0]), world[None, :] - float(head.shift_mm[1])
    cosine, sine = math.cos(head.angle), math.sin(head.angle)
    x = (cosine * wx + sine * wy)[:, :, None]
    y = (-sine * wx + cosine * wy)[:, :, None]
    offsets = (np.arange(_SUBSLICES) - (_SUBSLICES - 1) / 2) * _SLICE_MM / _SUBSLICES
    z = (z_start + np.arange(count)[:, None] * _SLICE_MM + offsets[None, :]).ravel().astype(np.float32)[None, None, :]
    return x, y, z


def _tissue_values(
    head: _Head,
    stroke: _Stroke,
    xyz: tuple[np.ndarray, np.ndarray, np.ndarray],
    codes: np.ndarray,
    through_skull: np.ndarray,
    core: np.ndarray,
    severity: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free CT (HU), CBF, CBV and Tmax on the thin sub-slices, from the tissue ``codes`` and the stroke's
    core and penumbra ``severity``."""
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
    tmax = np.where(codes >= 3, head.tmax_base + 0.4 * (1 + head.tmax_waves(*xyz)) + 0.4 * (codes == 5), 0)
    # Penumbra: CBF mildly down, CBV kept up by autoregulation, Tmax delayed; the core: all collapsed.
    cbf *= 1 - 0.35 * severity
    cbv *= 1 + 0.1 * severity
    tmax = tmax + severity * stroke.penumbra_tmax
    cbf = np.where(core, cbf * stroke.core_cbf, cbf)
    cbv = np.where(core, cbv * stroke.core_cbv, cbv)
    tmax = np.where(core, stroke.core_tmax, tmax)
    hu -= core * stroke.ct_drop_hu
    return hu, cbf, cbv, tmax


def _scanner_maps(
    rng: np.random.Generator, pixel_mm: float, inside: np.ndarray, hu: np.ndarray, perfusion: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The five float32 channels as a scanner would give them: CT blurred with noise, and each perfusion map
    (``CBF``, ``CBV``, ``MTT``, ``Tmax`` of the 5 mm slices) with this scan's gain, noise and smoothing, zero
    outside the brain (``inside``)."""
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
        ("CBF", perfusion["CBF"] * gain, 0.12, 1.0, 150.0),
        ("CBV", perfusion["CBV"], 0.12, 0.1, 12.0),
        ("MTT", np.minimum(perfusion["MTT"], 20.0), 0.1, 0.3, 24.0),
        ("Tmax", perfusion["Tmax"], 0.1, 0.4, 30.0),
    ):
        noisy = values * np.exp(relative * rng.standard_normal(values.shape, dtype=np.float32))
        noisy = noisy + absolute * rng.standard_normal(values.shape, dtype=np.float32)
        noisy = ndimage.gaussian_filter(noisy, (smoothing, smoothing, 0))
        # Inside the brain a map never reads exactly zero, so "nonzero" marks the brain as in real maps.
        maps[name] = np.where(inside, np.clip(noisy, 0.01, upper), 0).astype(np.float32)
    return maps
