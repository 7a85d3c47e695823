"""What a predicted mask holds, lesion by lesion: the per-case lesion report ``autoseg_predict`` writes beside each
mask (``CASE_lesions.json``) and summarizes per run (``lesions.csv``, ``lesion_table.csv``).

Conventions (each stated in the report itself, :data:`CONVENTIONS`):

- **Lesions** are the 26-connected components of the non-background voxels of the written mask (any declared
  lesion label), as ``autoseg.infer.postprocessing`` and the lesion-wise metrics count them; each lesion's ``label``
  is the declared value most of its voxels carry.
- **Volumes** are in ml: voxels times the input's own voxel volume (the product of its header's spacing, mm³) / 1000,
  counted on the mask as written, on the input's grid.
- **Coordinates** are world millimetres, given both in RAS (``centroid_ras_mm``: as nibabel, FSL and MNI tables
  report them) and in LPS (``centroid_lps_mm``: as ITK and DICOM do); they differ in the sign of x and y.
- **Bounding boxes** are voxel indices of the written file, in the file's own axis order: ``start`` inclusive,
  ``stop`` exclusive.
- **Hemisphere** (patient's ``left`` or ``right``): the side of the mid-sagittal plane on which at least
  :data:`HEMISPHERE_SHARE` of the lesion's volume lies, else ``midline``. The plane is the fitted one of the symmetric
  channels when the model uses them and the fit was found (``autoseg.preprocess.symmetry``), otherwise the plane
  normal to the world left-right axis (read from the image's direction matrix) halfway between the 1st and 99th
  percentile of the head's extent along that axis (the head: voxels of channel 0 above its mean intensity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from autoseg.io.geometry import Geometry, Orientation
from autoseg.io.images import read_header

__all__ = [
    "CONVENTIONS",
    "HEMISPHERE_SHARE",
    "Lesion",
    "LesionReport",
    "Midline",
    "head_midline",
    "lesion_report",
    "symmetry_midline",
]

#: Share of a lesion's volume that must lie on one side of the mid-sagittal plane for it to count as that side's.
HEMISPHERE_SHARE = 0.9

#: The conventions every lesion report states, so that no figure in it depends on an unstated choice.
CONVENTIONS = {
    "connectivity": "26-connected components of the non-background voxels of the written mask",
    "volume": "ml = voxels x the input's voxel volume (mm3, from its header's spacing) / 1000",
    "coordinates": "world mm of the voxel-centre mean: centroid_ras_mm in RAS (nibabel, FSL, MNI), "
    "centroid_lps_mm in LPS (ITK, DICOM)",
    "bounding_box": "voxel indices of the written mask in the file's own axis order, start inclusive, stop exclusive",
    "hemisphere": f"the patient's side of the mid-sagittal plane holding at least {HEMISPHERE_SHARE:.0%} of the "
    "lesion's volume, else midline",
    "probability": "mean and maximum of the ensemble's lesion probability over the lesion's voxels",
}


@dataclass(frozen=True)
class Midline:
    """The mid-sagittal plane in world LPS coordinates: ``normal`` (unit, pointing to the patient's left, +x in LPS)
    and a ``point`` on it (mm); ``source`` says where it came from."""

    normal: tuple[float, float, float]
    point: tuple[float, float, float]
    source: str

    def signed_distances(self, world_lps: np.ndarray) -> np.ndarray:
        """(N, 3) world LPS points (mm) -> (N,) signed distances (mm), positive on the patient's left."""
        return (world_lps - np.asarray(self.point)) @ np.asarray(self.normal)

    def to_json(self) -> dict[str, Any]:
        return {"normal_lps": list(self.normal), "point_lps_mm": list(self.point), "source": self.source}


@dataclass(frozen=True)
class Lesion:
    """One lesion of a predicted mask (see the module docstring for the conventions)."""

    index: int
    label: int
    voxels: int
    volume_ml: float
    centroid_ras_mm: tuple[float, float, float]
    centroid_lps_mm: tuple[float, float, float]
    bounding_box: dict[str, list[int]]
    hemisphere: str
    left_share: float
    mean_probability: float | None
    max_probability: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "voxels": self.voxels,
            "volume_ml": self.volume_ml,
            "centroid_ras_mm": list(self.centroid_ras_mm),
            "centroid_lps_mm": list(self.centroid_lps_mm),
            "bounding_box": self.bounding_box,
            "hemisphere": self.hemisphere,
            "left_share": self.left_share,
            "mean_probability": self.mean_probability,
            "max_probability": self.max_probability,
        }


@dataclass(frozen=True)
class LesionReport:
    """The lesions of one predicted mask, largest first, with the voxel volume and midline they were measured by."""

    voxel_volume_ml: float
    lesions: tuple[Lesion, ...]
    midline: Midline | None

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)

    @property
    def total_volume_ml(self) -> float:
        return float(sum(lesion.volume_ml for lesion in self.lesions))

    def to_json(self) -> dict[str, Any]:
        return {
            "conventions": CONVENTIONS,
            "voxel_volume_ml": self.voxel_volume_ml,
            "lesion_count": self.lesion_count,
            "total_volume_ml": self.total_volume_ml,
            "midline": None if self.midline is None else self.midline.to_json(),
            "lesions": [lesion.to_json() for lesion in self.lesions],
        }


def head_midline(image: np.ndarray, geometry: Geometry, max_points: int = 200_000) -> Midline | None:
    """The mid-sagittal plane from the head's extent along the world left-right axis (see the module docstring).

    Args:
        image: (X, Y, Z) channel 0 on the grid of ``geometry`` (any orientation: world positions come from it).
        geometry: that grid.
        max_points: the head's voxels are subsampled evenly to at most about this many.

    Returns:
        The plane normal to world x (LPS) through the midpoint of the 1st and 99th percentile of the head's world x;
        None when no voxel lies above the mean (a constant image).
    """
    head = image > float(image.mean())
    indices = np.argwhere(head)
    if len(indices) == 0:
        return None
    step = max(1, len(indices) // max_points)
    world = _world(indices[::step].astype(np.float64), geometry)
    low, high = np.percentile(world[:, 0], [1, 99])
    middle = (float(low) + float(high)) / 2
    centre = world.mean(axis=0)
    return Midline((1.0, 0.0, 0.0), (middle, float(centre[1]), float(centre[2])), "head extent along world x")


def symmetry_midline(fit: Mapping[str, Any] | None) -> Midline | None:
    """The fitted mid-sagittal plane of a found mirror fit (``autoseg.preprocess.symmetry.MirrorFit.to_json``, as
    preprocessing records it; world LPS), its normal turned to the patient's left; None for no fit or a fit that was
    not found."""
    if not fit or not fit.get("found"):
        return None
    normal = np.asarray(fit["plane_normal"], dtype=np.float64)
    normal = normal if normal[0] >= 0 else -normal
    return Midline(tuple(float(v) for v in normal), tuple(float(v) for v in fit["plane_point"]), "symmetry fit")


def lesion_report(
    classes: np.ndarray,
    geometry: Geometry,
    source: str | Path,
    labels: Mapping[str, int] | Sequence[int],
    probability: np.ndarray | None = None,
    midline: Midline | None = None,
) -> LesionReport:
    """The lesions of a predicted label map, measured on the written file's own grid.

    Args:
        classes: (X, Y, Z) integer classes (0 background, k the k-th declared lesion label) on the canonical grid of
            ``source`` (as ``autoseg.io.images.read_image`` gives it), i.e. what is written with ``write_like``.
        geometry: that canonical grid.
        source: the image the mask is written like (channel 0): its stored orientation and header give the file's
            axis order and world coordinates.
        labels: the declared labels (``dataset.json``'s ``labels``, background first) or their values in class order:
            each lesion's ``label`` is reported as its declared value.
        probability: (X, Y, Z) lesion probability on the same canonical grid, or None.
        midline: the mid-sagittal plane to assign hemispheres by; None: every lesion's hemisphere is ``unknown``.

    Returns:
        The report; lesions sorted by volume, largest first (ties: by position in the file).

    Raises:
        ValueError: ``classes`` (or ``probability``) is not on ``geometry``'s grid.
    """
    if tuple(classes.shape) != tuple(geometry.shape):
        raise ValueError(f"classes {list(classes.shape)} are not on the grid {list(geometry.shape)}")
    if probability is not None and probability.shape != classes.shape:
        raise ValueError(f"probability {list(probability.shape)} is not on the grid {list(classes.shape)}")
    stored, _, _ = read_header(source)
    orientation = Orientation.of(stored.direction)
    stored_classes = np.ascontiguousarray(orientation.from_canonical(classes))
    stored_probability = None if probability is None else orientation.from_canonical(probability)
    values = list(labels.values()) if isinstance(labels, Mapping) else list(labels)
    voxel_volume_ml = stored.voxel_volume_mm3 / 1000.0
    components = cc3d.connected_components(stored_classes > 0, connectivity=26)
    count = int(components.max())
    if count == 0:
        return LesionReport(voxel_volume_ml, (), midline)
    statistics = cc3d.statistics(components)
    lesions = []
    for index in range(1, count + 1):
        box = statistics["bounding_boxes"][index]
        region = components[box] == index
        indices = np.argwhere(region) + np.array([s.start for s in box])
        voxels = len(indices)
        world = _world(indices.astype(np.float64), stored)
        centre = world.mean(axis=0)
        lesion_classes = stored_classes[box][region]
        label_class = int(np.bincount(lesion_classes).argmax())
        side, left_share = _hemisphere(world, midline)
        inside = None if stored_probability is None else stored_probability[box][region]
        lesions.append(
            Lesion(
                index=0,
                label=int(values[label_class]) if label_class < len(values) else label_class,
                voxels=voxels,
                volume_ml=voxels * voxel_volume_ml,
                centroid_ras_mm=(-float(centre[0]), -float(centre[1]), float(centre[2])),
                centroid_lps_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                bounding_box={"start": [int(s.start) for s in box], "stop": [int(s.stop) for s in box]},
                hemisphere=side,
                left_share=left_share,
                mean_probability=None if inside is None else float(inside.mean()),
                max_probability=None if inside is None else float(inside.max()),
            )
        )
    lesions.sort(key=lambda lesion: (-lesion.voxels, lesion.bounding_box["start"]))
    numbered = tuple(_renumbered(lesion, number) for number, lesion in enumerate(lesions, start=1))
    return LesionReport(voxel_volume_ml, numbered, midline)


def _renumbered(lesion: Lesion, index: int) -> Lesion:
    return Lesion(**{**lesion.__dict__, "index": index})


def _world(indices: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, 3) voxel indices (x, y, z order of ``geometry``) -> (N, 3) world LPS positions in mm."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    scaled = indices * np.asarray(geometry.spacing, dtype=np.float64)
    return np.asarray(geometry.origin, dtype=np.float64) + scaled @ direction.T


def _hemisphere(world: np.ndarray, midline: Midline | None) -> tuple[str, float | None]:
    """(side, share of the voxels on the patient's left) of a lesion's (N, 3) world LPS voxel centres."""
    if midline is None:
        return "unknown", None
    left = float(np.mean(midline.signed_distances(world) > 0))
    if left >= HEMISPHERE_SHARE:
        return "left", left
    if 1 - left >= HEMISPHERE_SHARE:
        return "right", left
    return "midline", left
