"""What every converter shares: the cases found in a source tree, the problems found in it, BIDS file
names, mask binarisation, and writing the raw dataset.

A converter only *reads* its release's layout and returns a :class:`SourceDataset`; :func:`write_dataset`
writes every one of them the same way. Images are copied byte for byte (a ``.nii`` is gzip-compressed on
the way), so their headers, qform and sform included, stay exactly as released; masks are rewritten as
0/1 ``uint8`` with the mask's own header.

A release whose channels lie on different grids (ISLES 2022's FLAIR) is converted with ``coregister``: a channel
on another grid than channel 0 is rigidly registered to it and resampled onto its grid by the code preprocessing and
prediction use (``autoseg.data.coregistration``), written as float32 with channel 0's header; the dataset declares
``"coregister_channels": true`` (so the plans record it and prediction registers new scans the same way) and
``coregistration.json`` holds every fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoseg.data.coregistration import (
    COREGISTRATION_METHOD,
    REFERENCE_CHANNEL,
    ChannelFit,
    RegistrationError,
    coregister_channels,
)
from autoseg.data.dataset import DatasetError, channel_file_name, staged_dataset, write_dataset_json
from autoseg.errors import MissingFileError
from autoseg.io.files import write_json
from autoseg.io.geometry import canonical_geometry
from autoseg.io.images import copy_image_file, read_header, read_image, write_like
from autoseg.io.typed_json import to_plain
from autoseg.paths import COREGISTRATION_FILE

FILE_ENDING = ".nii.gz"
#: A BIDS file name: key-value entities, then a suffix, then the ending (``sub-r001s001_ses-1_T1w.nii.gz``).
_BIDS_NAME = re.compile(
    r"^(?P<entities>(?:[a-zA-Z0-9]+-[a-zA-Z0-9]+_)+)(?P<suffix>[a-zA-Z0-9]+)(?P<ending>\.nii(?:\.gz)?)$"
)


@dataclass(frozen=True)
class SourceCase:
    """One case as found in a release: its new identifier, its subject, its channel files in channel order
    and its lesion mask (``None`` for test cases)."""

    identifier: str
    subject: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class SourceDataset:
    """Everything a converter found in a release, ready to be written.

    Attributes:
        channel_names: names in channel order, e.g. ``("DWI", "ADC")``; they set the modality (see
            ``documentation/dataset_format.md``).
        training: cases with masks, for ``imagesTr``/``labelsTr``.
        test: cases without masks, for ``imagesTs``.
        description: ``dataset.json``'s ``name``, ``description`` and ``reference`` items.
        notes: what the user should know about the conversion (printed by ``autoseg_convert``).
        coregister: channels on another grid than channel 0 are registered onto it when written (module docstring).
    """

    channel_names: tuple[str, ...]
    training: tuple[SourceCase, ...]
    test: tuple[SourceCase, ...] = ()
    description: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    coregister: bool = False


class ConversionError(DatasetError):
    """A release tree is malformed; ``problems`` holds ``(file or folder, what is wrong)`` pairs, the message
    has one per line."""

    def __init__(self, source: Path, problems: list[tuple[Path, str]]):
        self.problems = problems
        lines = "\n".join(f"{path}: {message}" for path, message in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}, nothing was written:\n{lines}")


class Problems:
    """Problems collected while a tree is read, so all are reported at once."""

    def __init__(self) -> None:
        self.found: list[tuple[Path, str]] = []

    def add(self, path: Path, message: str) -> None:
        self.found.append((path, message))

    def raise_if_any(self, source: Path) -> None:
        """Raises: ConversionError listing every problem added."""
        if self.found:
            raise ConversionError(source, self.found)


def bids_entities(path: Path) -> tuple[dict[str, str], str] | None:
    """The entities and suffix of a BIDS NIfTI file name, or ``None`` for other names.

    Example:
        >>> bids_entities(Path("sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"))
        ({'sub': 'r001s001', 'ses': '1', 'space': 'MNI152NLin2009aSym'}, 'T1w')
    """
    match = _BIDS_NAME.match(path.name)
    if not match:
        return None
    pairs = (item.split("-", 1) for item in match.group("entities").rstrip("_").split("_"))
    return dict(pairs), match.group("suffix")


def check_entities(path: Path, entities: dict[str, str], problems: Problems) -> bool:
    """Whether the ``sub``/``ses`` entities of ``path``'s name agree with the ``sub-*``/``ses-*`` folders it lies
    in; a disagreement is added to ``problems``."""
    sound = True
    for key in ("sub", "ses"):
        folders = [part for part in path.parent.parts if part.startswith(f"{key}-")]
        if folders and entities.get(key) != folders[-1][len(key) + 1 :]:
            problems.add(path, f"file name says {key}-{entities.get(key)} but it lies in folder {folders[-1]}")
            sound = False
    return sound


def index_bids(
    subject_folders: Iterable[Path], roles: dict[str, Callable[[dict[str, str], str], bool]], problems: Problems
) -> dict[tuple[str, str], dict[str, Path]]:
    """The BIDS NIfTI files under ``subject_folders``, by ``(subject, session)`` and role.

    ``roles`` maps a role (e.g. ``"T1w"``, ``"mask"``) to a test of a file's entities and suffix; files of no
    role are ignored. A file whose ``sub``/``ses`` disagrees with its folders, or a second file of one role
    for the same subject and session, is added to ``problems`` and left out.
    """
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for folder in subject_folders:
        for path in sorted(folder.rglob("*.nii*")):
            parsed = bids_entities(path)
            if parsed is None:
                continue
            entities, suffix = parsed
            role = next((name for name, matches in roles.items() if matches(entities, suffix)), None)
            if role is None or not check_entities(path, entities, problems):
                continue
            files = found.setdefault((entities["sub"], entities.get("ses", "")), {})
            if role in files:
                problems.add(path, f"a second {role} file for sub-{entities['sub']} (the first is {files[role]})")
                continue
            files[role] = path
    return found


def subject_folders(folder: Path) -> list[Path]:
    """The ``sub-*`` folders anywhere under ``folder`` (directly or inside site folders), sorted."""
    return sorted(path for path in folder.rglob("sub-*") if path.is_dir())


def case_identifier(subject: str, session: str) -> str:
    """``sub-X_ses-Y`` (``sub-X`` without a session): the case name of a BIDS subject's session."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def required_folder(source: Path, name: str, hint: str) -> Path:
    """``source/name``.

    Raises:
        FileNotFoundError: ``source`` or ``source/name`` is not a folder (the message says what ``source`` holds).
    """
    if not source.is_dir():
        raise MissingFileError(f"{source}: no such folder")
    folder = source / name
    if not folder.is_dir():
        held = ", ".join(sorted(p.name for p in source.iterdir() if not p.name.startswith("."))[:8]) or "nothing"
        raise MissingFileError(f"{source} has no {name}/ folder ({hint}); it holds: {held}")
    return folder


def binarize(mask: np.ndarray) -> np.ndarray:
    """A lesion mask as 0/1 ``uint8``. Any non-zero value is lesion (0/1, 0/255, 0/1.0 masks alike); in a mask
    with fractional values (resampled or soft masks) a voxel is lesion from half the largest value on.
    NaN counts as background."""
    values = np.nan_to_num(np.asarray(mask, dtype=np.float64), nan=0.0)
    largest = float(values.max(initial=0.0))
    if largest <= 0:
        return np.zeros(values.shape, np.uint8)
    fractional = bool(np.any(values != np.round(values)))
    return (values >= 0.5 * largest if fractional else values > 0).astype(np.uint8)


def write_dataset(
    source: SourceDataset, target: Path, overwrite: bool = False, progress: bool = True, release: Path | None = None
) -> dict[str, tuple[ChannelFit, ...]]:
    """Write ``source`` as the raw dataset ``target`` (``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json``
    with ``subjects``; with ``source.coregister`` also ``coregistration.json``), built in a hidden folder and renamed
    into place at the end.

    Returns:
        With ``source.coregister``: case -> the fit of each channel moved onto channel 0's grid; else empty.

    Raises:
        ValueError: two cases share an identifier, or a training case lacks a mask.
        FileExistsError: ``target`` exists and ``overwrite`` is not set.
        ConversionError: with ``source.coregister``, every channel whose registration failed (its file and why;
            ``release`` is the folder the message names); nothing is written.
    """
    identifiers = [case.identifier for case in (*source.training, *source.test)]
    repeated = sorted({name for name in identifiers if identifiers.count(name) > 1})
    if repeated:
        raise ConversionError(
            release or target, [(release or target, f"case identifier(s) {', '.join(repeated)} found more than once")]
        )
    fits: dict[str, tuple[ChannelFit, ...]] = {}
    problems = Problems()
    with staged_dataset(target, overwrite) as folder:
        cases = [(case, "Tr") for case in source.training] + [(case, "Ts") for case in source.test]
        for case, split in tqdm(cases, desc="convert", unit="case", disable=not progress):
            files = [
                folder / f"images{split}" / channel_file_name(case.identifier, c, FILE_ENDING)
                for c in range(len(case.images))
            ]
            if source.coregister:
                try:
                    fits[case.identifier] = _write_coregistered(case.images, files)
                except RegistrationError as error:
                    problems.add(Path(error.file), f"registration onto {case.images[0].name} failed: {error.reason}")
            else:
                for image, file in zip(case.images, files):
                    copy_image_file(image, file)
            if split == "Tr":
                if case.label is None:
                    raise ConversionError(
                        release or target, [(case.images[0], f"training case {case.identifier} has no lesion mask")]
                    )
                mask, geometry = read_image(case.label, dtype=np.float64)
                write_like(
                    binarize(mask), geometry, folder / "labelsTr" / f"{case.identifier}{FILE_ENDING}", case.label
                )
        problems.raise_if_any(release or target)
        (folder / "imagesTr").mkdir(exist_ok=True)
        write_dataset_json(
            folder,
            source.channel_names,
            len(source.training),
            file_ending=FILE_ENDING,
            subjects={case.identifier: case.subject for case in source.training},
            coregister_channels=source.coregister,
            **source.description,
        )
        if source.coregister:
            write_json(_coregistration_record(source.channel_names, fits), folder / COREGISTRATION_FILE)
    return fits


def _write_coregistered(images: Sequence[Path], files: Sequence[Path]) -> tuple[ChannelFit, ...]:
    """Write a case's channels ``images`` to ``files``: each on channel 0's grid copied byte for byte, each on another
    grid registered onto channel 0 and resampled onto its grid (``autoseg.data.coregistration.coregister_channels``),
    float32 with channel 0's header. Returns the fits of the channels moved.

    Raises:
        RegistrationError: a channel that cannot be registered, naming its source file.
    """
    grids = [canonical_geometry(read_header(image)[0]) for image in images]
    fits: tuple[ChannelFit, ...] = ()
    if any(grids[REFERENCE_CHANNEL].differences(grid) for grid in grids):
        arrays, geometries = zip(*(read_image(image) for image in images))
        resampled, fits = coregister_channels(arrays, geometries, images)
    moved = {fit.channel for fit in fits}
    for channel, (image, file) in enumerate(zip(images, files)):
        if channel in moved:
            write_like(resampled[channel], grids[REFERENCE_CHANNEL], file, images[REFERENCE_CHANNEL])
        else:
            copy_image_file(image, file)
    return fits


def _coregistration_record(channel_names: Sequence[str], fits: dict[str, tuple[ChannelFit, ...]]) -> dict:
    """``coregistration.json``: the reference channel, the method and every case's fits (``ChannelFit`` fields)."""
    return {
        "reference_channel": REFERENCE_CHANNEL,
        "channel_names": {str(index): name for index, name in enumerate(channel_names)},
        "method": COREGISTRATION_METHOD,
        "cases": {case: to_plain(case_fits) for case, case_fits in sorted(fits.items())},
    }


def coregistration_note(channel_names: Sequence[str], fits: dict[str, tuple[ChannelFit, ...]]) -> str | None:
    """One line on what co-registration did in a conversion (cases moved, median and largest rotation and shift), or
    None when no channel was moved."""
    moved = [fit for case_fits in fits.values() for fit in case_fits]
    if not moved:
        return None
    names = ", ".join(dict.fromkeys(channel_names[fit.channel] for fit in moved))
    cases = sum(1 for case_fits in fits.values() if case_fits)
    angles, shifts = [fit.rotation_degrees for fit in moved], [fit.shift_mm for fit in moved]
    return (
        f"{names} registered rigidly onto {channel_names[REFERENCE_CHANNEL]} and resampled onto its grid in {cases} of "
        f"{len(fits)} case(s): rotation median {np.median(angles):.1f}° (largest {max(angles):.1f}°), shift median "
        f"{np.median(shifts):.1f} mm (largest {max(shifts):.1f} mm); every fit in {COREGISTRATION_FILE}"
    )


def sorted_naturally(paths: Iterable[Path]) -> list[Path]:
    """Paths sorted with their numbers compared as numbers (``case_2`` before ``case_10``)."""
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
