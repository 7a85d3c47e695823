"""Dataset verification, run before anything is fingerprinted or written.

Every problem becomes one line naming the case, the file and what is wrong. All cases are checked
and all problems are reported together, so a user fixes a dataset in one pass.

Notes are lines of the same form about things that are not errors but change what autoseg does or
what a user sees: lesion voxels where the image is zero (kept: the crop covers them, see
``autoseg.preprocess.preprocessing.crop_box``) and NIfTI files whose qform and sform disagree
(``autoseg.io.headers.qform_sform_note``).

Files are read in the canonical orientation (``autoseg.io.images``): an image and its label stored in
different axis orders of the same grid agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.data.coregistration import ChannelFit, RegistrationError, coregister_channels
from autoseg.data.dataset import Case, DatasetError, RawDataset
from autoseg.io.geometry import Geometry, GeometryWarning, Orientation
from autoseg.io.headers import ImageReadError, check_header, qform_sform_note
from autoseg.io.images import count_non_finite, read_header, read_image
from autoseg.labels import LabelError, classes_from_values, read_label_file
from autoseg.parallel import map_cases


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of one case."""

    case: str
    file: Path | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" if self.file is not None else "(case)"
        return f"case {self.case}: {where}: {self.message}"


class VerificationError(DatasetError):
    """Raised with every problem found; ``problems`` holds them, the message has one per line, followed by the
    notes (``notes``) found on the way, since a note can explain a problem (a moved sform, say, explains a label
    whose origin disagrees with its image)."""

    def __init__(self, problems: list[Problem], notes: Sequence[Problem] = ()):
        self.problems, self.notes = problems, list(notes)
        message = f"{len(problems)} problem(s) found:\n" + "\n".join(str(p) for p in problems)
        if self.notes:
            message += f"\nand {len(self.notes)} note(s):\n" + "\n".join(str(n) for n in self.notes)
        super().__init__(message)


@dataclass(frozen=True)
class VerificationReport:
    """A sound dataset's cases and the notes about them (see the module docstring)."""

    cases: list[Case]
    notes: list[Problem]


def verify_dataset(dataset: RawDataset, num_processes: int = 1, progress: bool = True) -> list[Case]:
    """Check every training case; return the cases when all are sound (see :func:`check_dataset`).

    Raises:
        VerificationError: listing every problem found.
    """
    return check_dataset(dataset, num_processes, progress).cases


def check_dataset(dataset: RawDataset, num_processes: int = 1, progress: bool = True) -> VerificationReport:
    """Check every training case; return the cases and the notes when all are sound.

    Checks: readable and complete files, every channel present, 3-D images, image/label agreement
    in shape, spacing, origin and direction, label values among ``dataset.json``'s labels, finite
    intensities, a non-empty dataset, and at least one case with a lesion (:func:`lesion_free_problems`).
    Channels must share channel 0's grid, unless ``dataset.json`` declares ``coregister_channels``: then a channel
    on another grid must register onto channel 0 (``autoseg.data.coregistration``: enough overlap, convergence).
    Notes: lesion voxels where the image is zero, per case; qform/sform disagreements, per file.

    Raises:
        VerificationError: listing every problem found.
    """
    cases = training_cases(dataset)
    arguments = [(case, dataset.labels, dataset.coregister_channels) for case in cases]
    results = map_cases(_verify_case_star, arguments, num_processes, progress, "verify")
    problems = [problem for found, _, _ in results for problem in found] + unmatched_label_files(dataset, cases)
    if not problems:
        lesion_free = [case.identifier for case, (_, _, lesion) in zip(cases, results) if not lesion]
        problems = lesion_free_problems(dataset, lesion_free, len(cases))
    notes = [note for _, found, _ in results for note in found]
    if problems:
        raise VerificationError(problems, notes)
    return VerificationReport(cases, notes)


def lesion_free_problems(dataset: RawDataset, lesion_free: list[str], num_cases: int) -> list[Problem]:
    """The dataset-wide problem "no training case contains a lesion" when every one of the ``num_cases`` sound
    cases is in ``lesion_free``; nothing when at least one case has a lesion (lesion-free cases are fine then:
    the fingerprint lists them)."""
    if num_cases == 0 or len(lesion_free) < num_cases:
        return []
    message = (
        f"dataset {dataset.name}: none of its {num_cases} training case(s) contains a lesion (every label "
        "file holds only background 0); autoseg learns lesions from traced examples: add cases whose label "
        "files mark lesions, or check that labelsTr/ holds the lesion tracings"
    )
    return [Problem("-", dataset.folder / "labelsTr", message)]


def training_cases(dataset: RawDataset) -> list[Case]:
    """The training cases of ``dataset``.

    Raises:
        VerificationError: there are none.
    """
    cases = dataset.cases("Tr")
    if not cases:
        folder = dataset.folder / "imagesTr"
        message = "no training cases found" + ("" if folder.is_dir() else " (imagesTr/ is missing)")
        raise VerificationError(
            [Problem("-", folder, f"{message}; expected files like CASE_0000{dataset.file_ending}")]
        )
    return cases


@dataclass
class CheckedCase:
    """A case read once and checked: its problems, and its voxels when it has none.

    Attributes:
        problems: everything wrong with the case; empty when it is sound.
        notes: what is not wrong but worth saying (see the module docstring).
        images: (C, X, Y, Z) float32 channels, or None when the case has problems.
        label: (X, Y, Z) uint8 classes (``autoseg.labels``: 0 background, k the k-th declared non-zero value), or
            None (no label, or problems).
        geometry: geometry of channel 0, shared by all files of the case (canonical orientation).
        stored_orientation: the orientation code channel 0 is stored in (``autoseg.io.geometry.Orientation``).
        coregistration: with ``coregister``, the fit of each channel that was moved onto channel 0's grid.
    """

    problems: list[Problem]
    notes: list[Problem] = field(default_factory=list)
    images: np.ndarray | None = None
    label: np.ndarray | None = None
    geometry: Geometry | None = None
    stored_orientation: str | None = None
    coregistration: tuple[ChannelFit, ...] = ()


def verify_case(case: Case, labels: Mapping[str, int], coregister: bool = False) -> tuple[list[Problem], list[Problem]]:
    """All problems of one case (empty when it is sound) and its notes; ``labels`` and ``coregister`` as in
    ``dataset.json``."""
    checked = read_checked_case(case, labels, coregister)
    return checked.problems, checked.notes


def read_checked_case(case: Case, labels: Mapping[str, int], coregister: bool = False) -> CheckedCase:
    """Read every file of ``case`` once and check it (see ``verify_dataset``); the label file's values must be
    among the declared ``labels`` (``dataset.json``), and it is returned as classes (``autoseg.labels``).

    With ``coregister`` (``dataset.json``'s ``coregister_channels``) a channel on another grid than channel 0 is
    registered to it and resampled onto its grid (``autoseg.data.coregistration``) instead of being a problem; one
    whose registration fails is a problem naming its file and why (too little overlap, no convergence)."""
    problems = [Problem(case.identifier, path, "channel file is missing") for path in case.images if not path.is_file()]
    if case.label is not None and not case.label.is_file():
        problems.append(Problem(case.identifier, case.label, "label file is missing"))
    if problems:
        return CheckedCase(problems)
    channels, geometries, notes = [], [], []
    for path in case.images:
        array, geometry, found, _ = _check_image(case, path, must_be_finite=True)
        problems += found
        notes += _header_notes(case, path)
        channels.append(array)
        geometries.append(geometry)
    reference = geometries[0]
    if not coregister:
        problems += [
            Problem(case.identifier, path, f"disagrees with channel 0 (channel 0 vs this file): {text}")
            for path, geometry in zip(case.images[1:], geometries[1:])
            if geometry is not None and reference is not None
            for text in reference.differences(geometry)
        ]
    label = None
    if case.label is not None:
        label, geometry, found, rounded = _check_image(case, case.label, labels=labels)
        problems += found
        notes += _header_notes(case, case.label) + rounded
        if geometry is not None and reference is not None:
            problems += [
                Problem(case.identifier, case.label, f"label disagrees with image (image vs label): {text}")
                for text in reference.differences(geometry)
            ]
    if problems:
        return CheckedCase(problems, notes)
    fits: tuple[ChannelFit, ...] = ()
    if coregister:
        try:
            images, fits = coregister_channels(channels, geometries, case.images)
        except RegistrationError as error:
            message = f"registration onto channel 0 ({case.images[0].name}) failed: {error.reason}"
            return CheckedCase([Problem(case.identifier, Path(error.file), message)], notes)
    else:
        images = np.stack(channels)
    if label is not None:
        outside = int(np.count_nonzero((label > 0) & ~np.any(images != 0, axis=0)))
        if outside:
            notes.append(
                Problem(
                    case.identifier,
                    case.label,
                    f"note: {outside} lesion voxel(s) lie where the image is "
                    "zero (outside its non-zero region, e.g. removed by skull stripping); preprocessing "
                    "keeps them",
                )
            )
    stored = Orientation.of(read_header(case.images[0])[0].direction).stored
    return CheckedCase([], notes, images, label, reference, stored, fits)


def _header_notes(case: Case, path: Path) -> list[Problem]:
    """A note when ``path`` is a NIfTI file whose qform and sform disagree by more than a voxel."""
    try:
        geometry = read_header(path)[0]
        check_header(path, geometry)
    except ImageReadError:
        return []  # reported as a problem by _check_image
    note = qform_sform_note(path, geometry)
    return [] if note is None else [Problem(case.identifier, path, "note: " + note.removeprefix(f"{path}: "))]


def _check_image(
    case: Case, path: Path, must_be_finite: bool = False, labels: Mapping[str, int] | None = None
) -> tuple[np.ndarray | None, Geometry | None, list[Problem], list[Problem]]:
    """Read one file and check it; returns (array (X, Y, Z), geometry, problems, notes).

    With ``labels`` (``dataset.json``'s) the file is a label file: read by ``autoseg.labels.read_label_file`` (values
    that are almost integers rounded, with a note), its values checked against the declared ones and returned as
    uint8 classes (``autoseg.labels.classes_from_values``).
    """
    try:
        geometry, dimension, _ = read_header(path)
    except ImageReadError as error:
        return None, None, [Problem(case.identifier, path, str(error).removeprefix(f"{path}: "))], []
    if dimension != 3:
        message = f"expected a 3-D image, found {dimension}-D of size {list(geometry.shape)}"
        return None, None, [Problem(case.identifier, path, message)], []
    notes = []
    try:
        with warnings.catch_warnings():  # a qform/sform disagreement becomes a note of this report instead
            warnings.simplefilter("ignore", GeometryWarning)
            if labels is None:
                array, geometry = read_image(path, dtype=np.float32)
            else:
                found = read_label_file(path)
                array, geometry = classes_from_values(found.array, labels, path), found.geometry
                notes = (
                    []
                    if found.note is None
                    else [Problem(case.identifier, path, "note: " + found.note.removeprefix(f"{path}: "))]
                )
    except (ImageReadError, LabelError) as error:
        return None, None, [Problem(case.identifier, path, str(error).removeprefix(f"{path}: "))], []
    problems = []
    count = count_non_finite(array) if must_be_finite else 0
    if count:
        problems.append(Problem(case.identifier, path, f"{count} NaN/Inf intensities"))
    return array, geometry, problems, notes


def _verify_case_star(argument: tuple[Case, Mapping[str, int], bool]) -> tuple[list[Problem], list[Problem], bool]:
    """The case's problems, its notes, and whether its label marks any lesion voxel."""
    checked = read_checked_case(*argument)
    return checked.problems, checked.notes, checked.label is not None and bool(checked.label.any())


def unmatched_label_files(dataset: RawDataset, cases: list[Case]) -> list[Problem]:
    """Label files whose case has no images: usually a misnamed image file."""
    folder = dataset.folder / "labelsTr"
    if not folder.is_dir():
        return []
    known = {case.label.name for case in cases if case.label is not None}
    return [
        Problem(path.name.removesuffix(dataset.file_ending), path, "label file has no matching image files")
        for path in sorted(folder.iterdir())
        if path.name.endswith(dataset.file_ending) and path.name not in known
    ]
