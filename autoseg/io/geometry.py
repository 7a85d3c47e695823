"""Where an image lies in space: :class:`Geometry` (shape, spacing, origin, direction in SimpleITK's (x, y, z)
order) and :class:`Orientation`, the one place that knows how stored and canonical (RAS) axes relate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: The orientation every image is read into (SimpleITK ``DICOMOrient`` code: axes point to the patient's
#: Right, Anterior, Superior). Chosen because most NIfTI files (MNI templates, ATLAS, dcm2niix output)
#: are already stored so: for them reading changes nothing.
CANONICAL_ORIENTATION = "RAS"


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in space, all in (x, y, z) order.

    Attributes:
        shape: voxels per axis (x, y, z).
        spacing: voxel size in mm per axis (x, y, z).
        origin: world position in mm of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major, as SimpleITK gives them.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def to_json(self) -> dict[str, list]:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, data: dict[str, list]) -> Geometry:
        return cls(
            shape=tuple(int(v) for v in data["shape"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    def differences(self, other: Geometry, tolerance: float = 1e-4) -> list[str]:
        """Names and values of the fields in which ``other`` disagrees with this geometry."""
        found = []
        if self.shape != other.shape:
            found.append(f"shape {list(self.shape)} vs {list(other.shape)}")
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = 1.0 if name == "direction" else max(1.0, float(np.abs(mine).max(initial=0.0)))
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=tolerance * scale):
                found.append(f"{name} {_round(mine)} vs {_round(theirs)}")
        return found

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]


class GeometryWarning(UserWarning):
    """A header that contradicts itself (a NIfTI file whose qform and sform disagree); the message names the file."""


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass(frozen=True)
class Orientation:
    """How a stored image's axes map onto the canonical orientation (``CANONICAL_ORIENTATION``).

    Reorienting only permutes and flips whole axes (as SimpleITK's ``DICOMOrient`` does, which the tests
    check): no voxel is interpolated, so going there and back restores the stored array exactly. An
    oblique image is reoriented to the closest axis-aligned orientation and stays oblique.

    Attributes:
        stored: the file's orientation code in SimpleITK's ``DICOMOrient`` convention (``LPS`` for the
            identity direction, ``RAS`` for NIfTI's RAS+, ``ASL`` for a sagittal stack, ...).
        permutation: canonical axis ``c`` is stored axis ``permutation[c]``.
        flips: canonical axis ``c`` runs opposite to stored axis ``permutation[c]``.
    """

    stored: str
    permutation: tuple[int, ...]
    flips: tuple[bool, ...]

    @classmethod
    def of(cls, direction: Sequence[float]) -> Orientation:
        """The orientation of an image with this 3x3 direction matrix (row-major, as SimpleITK gives it).

        Raises:
            ValueError: the matrix names no distinct axis for each of right-left, front-back, top-bottom.
        """
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction])
        permutation, flips = [], []
        for letter in CANONICAL_ORIENTATION:
            axes = [axis for axis, stored in enumerate(code) if stored in (letter, _OPPOSITE[letter])]
            if len(axes) != 1:
                raise ValueError(f"direction {_round(np.asarray(direction))} has no single {letter} axis ('{code}')")
            permutation.append(axes[0])
            flips.append(code[axes[0]] != letter)
        return cls(code, tuple(permutation), tuple(flips))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) in stored order -> (..., X, Y, Z) in canonical order (a view, not a copy)."""
        lead = array.ndim - 3
        array = np.transpose(array, (*range(lead), *(lead + axis for axis in self.permutation)))
        flipped = tuple(lead + c for c in range(3) if self.flips[c])
        return np.flip(array, flipped) if flipped else array

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) in canonical order -> (..., X, Y, Z) in stored order (a view; inverse of ``to_canonical``)."""
        lead = array.ndim - 3
        flipped = tuple(lead + c for c in range(3) if self.flips[c])
        array = np.flip(array, flipped) if flipped else array
        inverse = np.argsort(self.permutation)
        return np.transpose(array, (*range(lead), *(lead + int(c) for c in inverse)))

    def canonical_geometry(self, geometry: Geometry) -> Geometry:
        """The geometry of the canonical array: the same voxels at the same world positions."""
        matrix = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
        origin = np.asarray(geometry.origin, dtype=np.float64)
        columns = []
        for axis, flip in zip(self.permutation, self.flips):
            column = matrix[:, axis]
            if flip:  # the stored axis' last voxel becomes voxel 0
                origin = origin + column * geometry.spacing[axis] * (geometry.shape[axis] - 1)
                column = -column
            columns.append(column)
        direction = np.stack(columns, axis=1)
        return Geometry(
            shape=tuple(int(geometry.shape[axis]) for axis in self.permutation),
            spacing=tuple(float(geometry.spacing[axis]) for axis in self.permutation),
            origin=tuple(float(v) + 0.0 for v in origin),  # + 0.0 turns -0.0 into 0.0
            direction=tuple(float(v) + 0.0 for v in direction.ravel()),
        )


def left_right_axis(direction: Sequence[float]) -> int:
    """The array axis (0, 1 or 2) that runs along the patient's left-right axis.

    ``direction`` is the 3x3 direction matrix, row-major as SimpleITK gives it: column ``j`` is the world direction
    of array axis ``j``. World x is the left-right axis in both LPS and RAS (they differ only in its sign), so the
    answer is the axis whose direction cosine with world x is largest in magnitude; preprocessing keeps the axis
    order, so the answer holds for the preprocessed array too. ``--tta lr`` flips it, and the symmetric channels
    (``autoseg.preprocess.symmetry``) mirror across it.

    Example:
        >>> left_right_axis((0, 1, 0, 0, 0, 1, 1, 0, 0))  # axes stored as (z, x, y): x runs along array axis 1
        1
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return int(np.argmax(np.abs(matrix[0])))


def obliqueness_degrees(direction: Sequence[float]) -> float:
    """How oblique a grid is: the largest angle, in degrees, between an array axis and the world axis nearest to it.

    ``direction`` is the 3x3 direction matrix, row-major as SimpleITK gives it (column ``j``: the world direction of
    array axis ``j``). 0 for a grid whose axes run along the scanner's (any permutation or flip: reorienting does not
    change it); a slab tilted by 20° about one axis gives 20.

    Example:
        >>> obliqueness_degrees((1, 0, 0, 0, 1, 0, 0, 0, 1))
        0.0
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    nearest = np.abs(matrix).max(axis=0)  # per array axis: its cosine with the nearest world axis
    return float(np.degrees(np.arccos(np.clip(nearest.min(), 0.0, 1.0))))


def canonical_geometry(geometry: Geometry) -> Geometry:
    """``geometry`` (as stored) brought to ``CANONICAL_ORIENTATION``: what :func:`read_image` returns for it."""
    return Orientation.of(geometry.direction).canonical_geometry(geometry)
