"""The synthetic head the CT-perfusion-like slabs cut through: skull, brain, deep grey matter, ventricles, and a
stroke (infarct core inside a larger hypoperfused penumbra), defined in mm in the head's frame."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Deep grey matter of one hemisphere, (centre, semi-axes) in mm, head frame, x mirrored for the other:
# lentiform nucleus, thalamus, head of the caudate.
_DEEP_GREY = (
    ((22.0, 3.0, 2.0), (7.0, 14.0, 10.0)),
    ((10.0, -14.0, 6.0), (7.0, 11.0, 8.0)),
    ((12.0, 14.0, 12.0), (4.5, 8.0, 8.0)),
)


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
