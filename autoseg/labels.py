"""Label values: what ``dataset.json`` declares, what the network learns, what label files hold.

A dataset declares its labels as names and integer values, e.g. ``{"background": 0, "lesion": 255}``. The network
learns consecutive *classes*: class 0 is background and class ``k`` (``k = 1 .. K``) the ``k``-th non-zero declared
value in increasing order (:func:`label_classes`). Preprocessing stores label maps as classes (uint8), training and
validation compare classes, and every label map autoseg writes for a user (``autoseg_predict``, the end-of-fold
``validation/`` files) holds the declared values again (:func:`values_from_classes`), in the smallest integer type
that holds every one of them (:func:`label_dtype`): uint8 when all lie in 0..255, else uint16, int16 or int32.

Label files are read by :func:`read_label_file`: as float64, so that no value wraps around on the way (a uint8 read
turns 300 into 44), with values within :data:`INTEGER_TOLERANCE` of an integer rounded to it (float masks written by
resampling tools hold 0.99999994 for 1) and any other non-integer value an error naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image

__all__ = [
    "INTEGER_TOLERANCE",
    "LabelError",
    "LabelFile",
    "LabelValueWarning",
    "classes_from_values",
    "declared_label_problems",
    "distinct_values",
    "format_values",
    "label_classes",
    "label_dtype",
    "read_label_file",
    "values_from_classes",
]

#: Largest distance from an integer at which a label value is rounded to it rather than refused.
INTEGER_TOLERANCE = 1e-3
#: Most non-zero labels a dataset may declare: classes are stored as uint8.
MAX_CLASSES = 255
#: Integer types a written label map may take, smallest first.
_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)
_SHOWN_VALUES = 10


class LabelValueWarning(UserWarning):
    """Label values were rounded to integers (see :func:`read_label_file`); the message names the file."""


class LabelError(AutosegError, ValueError):
    """A label file holds values that are not labels (far from integers, or not declared); the message names the
    file and the values."""


@dataclass(frozen=True)
class LabelFile:
    """A label file read by :func:`read_label_file`.

    Attributes:
        array: (X, Y, Z) int64 label values, in the canonical orientation.
        geometry: its grid.
        values: its distinct values, sorted.
        note: one line naming the file when values were rounded to integers, else None.
    """

    array: np.ndarray
    geometry: Geometry
    values: tuple[int, ...]
    note: str | None = None


def declared_label_problems(labels: Mapping[str, object]) -> list[str]:
    """What keeps ``dataset.json``'s ``labels`` from being used, one phrase each; empty when they can be.

    Labels must map names to integers (not booleans), with background 0, at least one other label, no value twice,
    at most :data:`MAX_CLASSES` non-zero values, and every value from 0 to the int32 maximum (the widest type a label
    map is written in; negative values are refused, as nnU-Net refuses them).
    """
    values = list(labels.values())
    wrong = [f"{name!r}: {value!r}" for name, value in labels.items() if type(value) is not int]
    if wrong:
        return [f"label values must be integers (region labels are not supported), found {', '.join(wrong)}"]
    problems = []
    if 0 not in values or len(values) < 2:
        problems.append("'labels' must map names to integers, with background 0 and at least one more label")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        problems.append(f"label value(s) {repeated} declared under more than one name")
    info = np.iinfo(np.int32)
    outside = [value for value in values if not 0 <= value <= info.max]
    if outside:
        problems.append(f"label value(s) {outside} outside 0..{info.max} (label values are never negative)")
    if len(set(values) - {0}) > MAX_CLASSES:
        problems.append(f"{len(set(values) - {0})} non-zero labels; at most {MAX_CLASSES} are supported")
    return problems


def label_classes(labels: Mapping[str, int]) -> tuple[int, ...]:
    """The declared values in class order: background 0 first, then the non-zero values increasing; class ``k`` is
    value ``label_classes(labels)[k]``.

    Example:
        >>> label_classes({"background": 0, "core": 2, "penumbra": 1})
        (0, 1, 2)
        >>> label_classes({"background": 0, "lesion": 255})
        (0, 255)
    """
    return (0, *sorted(set(labels.values()) - {0}))


def label_dtype(labels: Mapping[str, int] | Sequence[int]) -> np.dtype:
    """The smallest integer type of uint8, uint16, int16, int32 that holds every declared value.

    Example:
        >>> label_dtype({"background": 0, "lesion": 300})
        dtype('uint16')
    """
    values = list(labels.values()) if isinstance(labels, Mapping) else list(labels)
    low, high = min(values), max(values)
    for dtype in _DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise LabelError(f"label values {low}..{high} do not fit a 32-bit integer")


def classes_from_values(array: np.ndarray, labels: Mapping[str, int], path: str | Path) -> np.ndarray:
    """Map an (X, Y, Z) map of declared label values to classes (see the module docstring).

    Args:
        array: integer label values, e.g. :attr:`LabelFile.array`.
        labels: ``dataset.json``'s labels.
        path: the file the values come from, for the message.

    Returns:
        (X, Y, Z) uint8 classes 0..K.

    Raises:
        LabelError: a value that is not declared, naming the file and the values.
    """
    declared = np.asarray(label_classes(labels), dtype=np.int64)
    array = np.asarray(array)
    index = np.searchsorted(declared, array)
    found = (index < len(declared)) & (declared[np.minimum(index, len(declared) - 1)] == array)
    if not found.all():
        unknown = np.unique(array[~found])
        raise LabelError(
            f"{path}: label values {format_values(unknown)} not in dataset.json labels {list(declared.tolist())}"
        )
    return index.astype(np.uint8)


def values_from_classes(classes: np.ndarray, labels: Mapping[str, int]) -> np.ndarray:
    """Map an (X, Y, Z) class map (0..K) back to the declared values, in :func:`label_dtype`'s type.

    Example:
        >>> values_from_classes(np.array([0, 1, 1], np.uint8), {"background": 0, "lesion": 255})
        array([  0, 255, 255], dtype=uint8)
    """
    table = np.asarray(label_classes(labels), dtype=label_dtype(labels))
    classes = np.asarray(classes)
    if classes.size and int(classes.max()) >= len(table):
        raise ValueError(f"class {int(classes.max())} but only {len(table) - 1} declared non-zero labels")
    return table[classes]


def read_label_file(path: str | Path) -> LabelFile:
    """Read a label file as integers, rounding values that are almost integers (see the module docstring).

    Raises:
        ImageReadError: unreadable, or not a 3-D single-channel image.
        LabelError: values further than :data:`INTEGER_TOLERANCE` from every integer, or NaN/Inf; the message names
            the file and up to 10 such values.
    """
    array, geometry = read_image(path, np.float64)
    values = distinct_values(array)
    rounded = np.round(values)
    off = ~np.isfinite(values) | (np.abs(values - rounded) > INTEGER_TOLERANCE)
    if off.any():
        raise LabelError(f"{path}: label values {format_values(values[off])} are not integers")
    note = None
    if not np.array_equal(values, rounded):
        inexact = values[values != rounded]
        note = (
            f"{path}: label values {format_values(inexact, precision=9)} rounded to the nearest integers "
            "(a float mask, e.g. from a resampling tool)"
        )
        np.round(array, out=array)
    distinct = tuple(int(v) for v in np.unique(rounded))
    return LabelFile(array.astype(np.int64), geometry, distinct, note)


def distinct_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a bincount for small non-negative integers, much faster than ``np.unique``."""
    low, high = float(array.min()), float(array.max())  # NaN in either fails both tests below
    if low >= 0 and high < 256 and np.array_equal(array, np.round(array)):
        counts = np.bincount(array.astype(np.int64, copy=False).ravel(), minlength=1)
        return np.flatnonzero(counts).astype(np.float64)
    return np.unique(array)


def format_values(values: Sequence[float] | np.ndarray, precision: int = 6, shown: int = _SHOWN_VALUES) -> str:
    """Up to ``shown`` values as ``0, 255`` (``%g`` with ``precision`` digits), then how many more there are."""
    values = list(np.asarray(values, dtype=np.float64).ravel())
    text = ", ".join(f"{value:.{precision}g}" for value in values[:shown])
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")
