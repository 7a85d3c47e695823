"""The preprocessed case store: what one case is on disk, reading it back, and finding what is stale or damaged.

Per case and configuration (``AUTOSEG_PREPROCESSED/<dataset>/<data_identifier>/``)::

    CASE.npy           (C, X, Y, Z) float32 normalized channels at the target spacing
    CASE_seg.npy       (X, Y, Z) uint8 label classes at the target spacing (0 background, k the k-th declared
                       non-zero label value: ``autoseg.labels``)
    CASE_lesion.npy    (N, 3) int32 voxel indices of up to 10,000 lesion voxels (for lesion-centred sampling)
    CASE.json          properties (:class:`CaseProperties`): original geometry, crop box, shapes, what the case
                       was built from, and ``arrays``: each array file's size in bytes and CRC-32, recorded as it
                       was written

``CASE.json`` is written last, so a case without it is incomplete and is redone. A case is skipped only
when its sources and preprocessing settings are unchanged and each of its arrays is sound: its size agrees
with its ``.npy`` header and with the recorded size, and its bytes with the recorded CRC-32 (reading every
byte: about 20 ms for a 1 mm ATLAS-like case, 20 MB, from the page cache on one 2-core VM;
writing with the checksum adds about 25 ms to the 2.6 s it takes to preprocess that case). A damaged case (e.g. a ``.npy`` cut short
when the disk filled up, or by a copy that was interrupted) is preprocessed again.

``CASE.json`` is read and written by ``autoseg.io.typed_json`` like the plans: unknown fields and wrong types are named.
A ``CASE.json`` that cannot be read as this version's :class:`CaseProperties` makes its case out of date, so
``autoseg_plan`` preprocesses it again; one without ``schema_version`` (written before it existed) is version 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.data.coregistration import ChannelFit
from autoseg.data.dataset import Case
from autoseg.errors import AutosegError, DataError
from autoseg.io.files import DamagedArrayError, array_damage, load_array
from autoseg.io.geometry import Geometry
from autoseg.io.typed_json import read_typed, write_typed

#: ``schema_version`` of ``CASE.json``.
CASE_PROPERTIES_VERSION = 1
_RE_RUN = "; re-run autoseg_plan for this dataset to preprocess it again"


class CasePropertiesError(AutosegError, ValueError):
    """A ``CASE.json`` that is missing, malformed or of another version; the message names the file and field."""


@dataclass(frozen=True, kw_only=True)
class CaseProperties:
    """What preprocessing did to one case (``CASE.json``), so that :func:`restore_probabilities` can undo it.

    Attributes:
        geometry: the raw image's grid, in the canonical orientation.
        crop_box: half-open (start, stop) voxel indices per axis (x, y, z) of the crop (:func:`autoseg.preprocess.preprocessing.crop_box`).
        cropped_shape: voxels per axis of the crop, before resampling.
        resampled_shape: voxels per axis at ``target_spacing`` (the arrays' shape).
        target_spacing: mm per axis.
        symmetry: the mirror fit (``autoseg.preprocess.symmetry.MirrorFit.to_json``) of a configuration with symmetric
            channels, else None.
        coregistration: with the plans' ``coregister_channels``, the fit of each channel that was moved onto channel
            0's grid (``autoseg.data.coregistration.ChannelFit``; empty when all share it); None without.
        case, subject: the case's identifier and subject; None for a scan preprocessed for prediction.
        key: :func:`preprocessing_key` of the settings it was made with; None for a scan preprocessed for
            prediction.
        sources: ``(path, size in bytes, mtime in ns)`` of each file it was made from (images, then the label).
        arrays: array file name -> its size in bytes (``bytes``) and CRC-32 (``crc32``) as written.
    """

    schema_version: int = CASE_PROPERTIES_VERSION
    geometry: Geometry
    crop_box: tuple[tuple[int, int], ...]
    cropped_shape: tuple[int, ...]
    resampled_shape: tuple[int, ...]
    target_spacing: tuple[float, ...]
    symmetry: dict[str, Any] | None = None
    coregistration: tuple[ChannelFit, ...] | None = None
    case: str | None = None
    subject: str | None = None
    key: str | None = None
    sources: tuple[tuple[str, int, int], ...] = ()
    arrays: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        """Write ``CASE.json`` atomically."""
        write_typed(self, path)

    @classmethod
    def from_json(cls, path: str | Path) -> CaseProperties:
        """Read and check ``CASE.json``.

        Raises:
            CasePropertiesError: no file, invalid JSON, unknown or missing fields, wrong types (each named), another
                schema version.
        """
        return read_typed(
            cls,
            path,
            CasePropertiesError,
            f"no case properties found{_RE_RUN}",
            hint=_RE_RUN,
            version=CASE_PROPERTIES_VERSION,
        )


#: The array files of a preprocessed case: ``CASE.npy``, ``CASE_seg.npy``, ``CASE_lesion.npy``.
ARRAY_SUFFIXES = ("", "_seg", "_lesion")


def array_files(folder: Path, identifier: str) -> list[Path]:
    """The array files of case ``identifier`` in ``folder``, in :data:`ARRAY_SUFFIXES` order."""
    return [Path(folder) / f"{identifier}{suffix}.npy" for suffix in ARRAY_SUFFIXES]


def is_up_to_date(case: Case, folder: Path, key: str) -> bool:
    """True when ``case`` was preprocessed with ``key`` from the same source files and every array it wrote is
    intact (size and CRC-32 as recorded in ``CASE.json``; see the module docstring)."""
    try:
        properties = CaseProperties.from_json(folder / f"{case.identifier}.json")
    except CasePropertiesError:  # none, unreadable, or made by another version: preprocess again
        return False
    if properties.key != key or properties.sources != _sources(case):
        return False
    records = properties.arrays
    return all(
        path.name in records and array_damage(path, records[path.name]) is None
        for path in array_files(folder, case.identifier)
    )


def remove_stale_cases(folder: Path, identifiers: Sequence[str]) -> list[str]:
    """Delete the preprocessed cases in ``folder`` that are not among ``identifiers`` (cases removed from the raw
    dataset): each one's ``CASE.json`` and array files (:func:`array_files`). Only cases whose ``CASE.json``
    autoseg wrote for a training case of that name are touched; any other file is left alone.

    Returns:
        The identifiers removed, sorted.
    """
    folder, keep, removed = Path(folder), set(identifiers), []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.stem in keep:
            continue
        try:
            properties = CaseProperties.from_json(path)
        except CasePropertiesError:  # not a case autoseg wrote as it writes them now: not ours to delete
            continue
        if properties.case != path.stem:
            continue
        path.unlink()  # first: a case without CASE.json is incomplete, whatever happens to its arrays
        for array in array_files(folder, path.stem):
            if array.stem not in keep:  # ``a_seg.npy`` of a removed case ``a`` may be case ``a_seg``'s data
                array.unlink(missing_ok=True)
        removed.append(path.stem)
    return removed


def check_arrays(folder: Path, identifiers: Sequence[str]) -> None:
    """Check that the arrays of the preprocessed cases ``identifiers`` are not cut short (sizes against their
    ``.npy`` headers: one small read per file, no checksums), e.g. before a training loader starts.

    Raises:
        DamagedArrayError: naming every damaged file and saying to re-run ``autoseg_plan``.
    """
    damaged = [
        f"{path}: {problem}"
        for identifier in identifiers
        for path in array_files(folder, identifier)
        if (problem := array_damage(path)) is not None
    ]
    if damaged:
        raise DamagedArrayError(
            f"damaged preprocessed array(s): {'; '.join(damaged)}; re-run autoseg_plan for "
            f"this dataset (it redoes damaged cases)"
        )


def load_case(folder: Path, identifier: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, CaseProperties]:
    """A preprocessed case: data (C, X, Y, Z), labels (X, Y, Z) and properties.

    Raises:
        CasePropertiesError: its ``CASE.json`` is missing, unreadable or of another version.
    """
    data = load_array(folder / f"{identifier}.npy", mmap)
    seg = load_array(folder / f"{identifier}_seg.npy", mmap)
    return data, seg, CaseProperties.from_json(folder / f"{identifier}.json")


def lesion_fraction(folder: Path, identifiers: Sequence[str]) -> float:
    """Share of voxels labelled lesion (any label > 0) over the preprocessed cases ``identifiers`` in ``folder``,
    counted on their cropped, resampled grids (``CASE_seg.npy``, read through memory maps)."""
    lesion = total = 0
    for identifier in identifiers:
        seg = load_array(Path(folder) / f"{identifier}_seg.npy", mmap=True)
        lesion += int(np.count_nonzero(seg))
        total += seg.size
    if total == 0:
        raise DataError(f"{folder}: no voxels in the cases {list(identifiers)[:3]}")
    return lesion / total


def _sources(case: Case) -> tuple[tuple[str, int, int], ...]:
    paths = [*case.images, *([case.label] if case.label is not None else [])]
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
