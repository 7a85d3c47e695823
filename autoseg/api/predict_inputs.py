"""The cases :func:`autoseg.api.predict.predict` reads: found and named in a folder or file (one naming rule,
:func:`autoseg.data.dataset.cases_from_files`), narrowed by a ``--list`` file, and read channel by channel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.data.coregistration import coregister_channels
from autoseg.data.dataset import CHANNEL_FILE, cases_from_files, channel_sets
from autoseg.errors import DataError, InvalidFileError, MissingFileError, UsageError
from autoseg.io.geometry import Geometry
from autoseg.io.headers import IMAGE_ENDINGS, split_ending
from autoseg.io.images import count_non_finite, read_image

__all__ = ["InputCase", "find_input_cases", "read_case", "read_case_list", "select_cases"]


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its identifier, channel files in channel order, and the ending of its output."""

    identifier: str
    images: tuple[Path, ...]
    ending: str


def find_input_cases(
    source: str | Path,
    num_channels: int,
    *,
    one_case_per_file: bool = False,
    channel_names: Sequence[str] | None = None,
) -> list[InputCase]:
    """The cases in a folder or file, sorted by identifier, by the naming rule of
    :func:`autoseg.data.dataset.cases_from_files`: for a one-channel model every file is one case (``CASE_0000.nii.gz``
    is case ``CASE``, ``sub_0001.nii.gz`` case ``sub_0001``); for C > 1 channels the files must form complete
    cases ``CASE_0000`` ... ``CASE_{C-1}``. A single ``CASE_XXXX`` file given to a multi-channel model takes its
    sibling channel files with it.

    Files of a folder that form a multi-channel set (``X_0000``, ``X_0001``, ...:
    :func:`autoseg.data.dataset.channel_sets`, e.g. the five channels of a CT perfusion case) are the channels of one
    case, so a one-channel model refuses them rather than predict each channel as a scan, unless
    ``one_case_per_file`` says they are separate scans. A single file is always one scan.

    Args:
        source: a folder of image files, or one image file.
        num_channels: C, the channels the model takes.
        one_case_per_file: every file is a scan of its own, also files named like the channels of one case
            (``--one-case-per-file``); only for a one-channel model.
        channel_names: the model's channel names, for the messages (default: their numbers).

    Raises:
        FileNotFoundError: ``source`` does not exist or holds no image files.
        ValueError: files that break the naming rule (the message lists each with the names expected); a
            multi-channel set given to a one-channel model (one line naming the set and the model's channel), or
            ``one_case_per_file`` with a multi-channel model.
    """
    source = Path(source)
    names = list(channel_names) if channel_names is not None else [str(c) for c in range(num_channels)]
    if one_case_per_file and num_channels > 1:
        raise UsageError(
            f"--one-case-per-file is for a one-channel model; this model takes {num_channels} channels "
            f"({', '.join(names)}), one file each: CASE_0000 ... CASE_{num_channels - 1:04d}"
        )
    if source.is_file():
        match = CHANNEL_FILE.match(split_ending(source)[0])
        files = [source]
        if num_channels > 1 and match:
            files = [
                p
                for p in _image_files(source.parent)
                if (m := CHANNEL_FILE.match(split_ending(p)[0])) and m.group(1) == match.group(1)
            ]
    elif source.is_dir():
        files = _image_files(source)
        if not files:
            raise MissingFileError(f"{source}: no image files ({', '.join(IMAGE_ENDINGS)})")
        if num_channels == 1 and not one_case_per_file and (sets := channel_sets(files)):
            raise UsageError(f"{source}: {_channel_sets_problem(sets, names)}")
    else:
        raise MissingFileError(f"{source}: no such file or folder")
    try:
        grouped = cases_from_files(files, num_channels)
    except UsageError as error:
        raise UsageError(f"{source}: {error}") from None
    return [InputCase(case, paths, split_ending(paths[0])[1]) for case, paths in grouped]


def _channel_sets_problem(sets: Sequence[tuple[str, tuple[Path, ...]]], channel_names: Sequence[str]) -> str:
    """One line: the first multi-channel set (its files and count), how many more there are, and the model's
    channel."""
    name, files = sets[0]
    shown = " ... ".join(p.name for p in (files if len(files) <= 2 else (files[0], files[-1])))
    more = f" (and {len(sets) - 1} more such set(s): {', '.join(n for n, _ in sets[1:4])}{', ...' if len(sets) > 4 else ''})"
    return (
        f"{shown} form one case of {len(files)} channels ({name}){more if len(sets) > 1 else ''}, but the model "
        f"takes 1 channel ({channel_names[0]}); predict them with a {len(files)}-channel model, or add "
        "--one-case-per-file if every file is a separate scan"
    )


def _image_files(folder: Path) -> list[Path]:
    """The visible image files of ``folder`` (endings in ``IMAGE_ENDINGS``), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and split_ending(p)[1].lower() in IMAGE_ENDINGS
    )


def read_case_list(path: str | Path) -> list[tuple[int, str]]:
    """The case identifiers a ``--list`` file names, with their line numbers (1-based), in file order.

    One identifier per line; surrounding spaces, blank lines and ``#`` comments (whole lines or the rest of a line)
    are ignored. A line may also hold a file name of the case (``CASE_0000.nii.gz``), as ``ls`` prints it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not text (UTF-8); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such case list (--list)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidFileError(
            f"{path}: not a text file of case names ({error.reason} at byte {error.start})"
        ) from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if name:
            entries.append((number, name))
    return entries


def select_cases(cases: Sequence[InputCase], case_list: str | Path) -> list[InputCase]:
    """The ``cases`` (in their order) that the ``--list`` file ``case_list`` names (:func:`read_case_list`) by
    identifier or by one of their file names; a case listed twice is predicted once.

    Raises:
        ValueError: the list names a case that is not among ``cases`` (each such line as ``FILE:LINE: NAME``, with a
            few of the cases there are), or names none at all.
    """
    by_name: dict[str, InputCase] = {}
    for case in cases:
        by_name.update({path.name: case for path in case.images})
    by_name.update({case.identifier: case for case in cases})
    entries = read_case_list(case_list)
    unknown = [f"  {case_list}:{number}: {name}" for number, name in entries if name not in by_name]
    if unknown:
        examples = ", ".join(case.identifier for case in cases[:3]) + (", ..." if len(cases) > 3 else "")
        shown = unknown[:10] + ([f"  ... and {len(unknown) - 10} more"] if len(unknown) > 10 else [])
        raise UsageError(
            "\n".join(
                [
                    f"{case_list}: {len(unknown)} listed case(s) not among the {len(cases)} input "
                    f"case(s) ({examples}):",
                    *shown,
                ]
            )
        )
    if not entries:
        raise UsageError(f"{case_list}: names no case (one identifier per line; # starts a comment)")
    chosen = {by_name[name].identifier for _, name in entries}
    return [case for case in cases if case.identifier in chosen]


def read_case(case: InputCase, coregister: bool = False) -> tuple[np.ndarray, Geometry]:
    """(C, X, Y, Z) float32 channels and their geometry (channel 0's), in the canonical orientation
    (``autoseg.io.images``); channels stored in different orientations of the same grid agree.

    With ``coregister`` (the model's plans record ``coregister_channels``) a channel on another grid than channel 0
    is rigidly registered to it and resampled onto its grid with the code its training cases went through
    (``autoseg.data.coregistration.coregister_channels``); without it such a channel is an error.

    Raises:
        ImageReadError: a file cannot be read or is not a 3-D single-channel image, or (``ImageHeaderError``)
            its header declares what autoseg does not read (``autoseg.io.headers.check_header``), before its voxels are read.
        ValueError: channels on different grids (without ``coregister``), or NaN/Inf voxels (the message names the
            file and the problem).
        RegistrationError: with ``coregister``, a channel that cannot be registered (its file and why).
    """
    arrays, geometries = [], []
    for path in case.images:
        array, this = read_image(path)
        if geometries and not coregister and geometries[0].differences(this):
            raise DataError(
                f"case {case.identifier}: {path.name} lies on another grid than {case.images[0].name}: "
                f"{'; '.join(geometries[0].differences(this))} (the model was trained without channel "
                "co-registration: dataset.json's coregister_channels)"
            )
        non_finite = count_non_finite(array)
        if non_finite:
            raise DataError(f"{path}: {non_finite} NaN/Inf voxel(s)")
        arrays.append(array)
        geometries.append(this)
    if coregister:
        return coregister_channels(arrays, geometries, case.images)[0], geometries[0]
    return np.stack(arrays), geometries[0]
