"""Raw datasets: finding one by name and listing its cases.

A raw dataset is an nnU-Net v2 raw folder, used unchanged::

    AUTOSEG_RAW/Dataset001_ATLAS/
        dataset.json          {"channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1},
                               "file_ending": ".nii.gz", "numTraining": 20,
                               "subjects": {"CASE": "SUBJECT", ...},   # optional grouping
                               "coregister_channels": true}            # optional, default false
        imagesTr/CASE_0000.nii.gz   one file per channel, channel index in 4 digits
        labelsTr/CASE.nii.gz
        imagesTs/...                optional, same naming, no labels

``-d`` accepts the folder name (``Dataset001_ATLAS``), the name after the number (``ATLAS``), the
number (``1`` or ``001``) or any plain folder name under ``AUTOSEG_RAW``.

New datasets (``autoseg_demo``, ``autoseg_convert``) are built in a hidden folder beside their final
place and renamed into it at the end (:func:`staged_dataset`), so a dataset folder is never half written.

Files to predict (:func:`cases_from_files`) follow one rule, whatever digits a plain name ends in:

- one-channel model: every file is one case, named by the file without its ending, and without a final
  ``_0000`` if it has one (``CASE_0000.nii.gz`` -> ``CASE``; ``sub_0001.nii.gz`` -> ``sub_0001``); files that form
  a multi-channel set (``X_0000``, ``X_0001``, ...: :func:`channel_sets`) are the channels of one case, not scans,
  and prediction refuses them unless told they are separate scans (``--one-case-per-file``,
  ``autoseg.api.predict_inputs.find_input_cases``);
- model with C > 1 channels: the files must form complete cases ``CASE_0000`` ... ``CASE_{C-1}``, one file
  per channel; anything else is an error listing the offending files and the names expected.
"""

from __future__ import annotations

import glob
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.errors import AutosegError, ExistingOutputError, UsageError
from autoseg.io.files import check_output_folder, read_json, write_json
from autoseg.io.headers import split_ending
from autoseg.labels import declared_label_problems
from autoseg.paths import DATASET_FOLDER, matches_dataset_name, raw_root

REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
#: The optional ``dataset.json`` key that asks for channel co-registration (``autoseg.data.coregistration``).
COREGISTER_KEY = "coregister_channels"
#: The labels of every lesion dataset autoseg makes (demo data and converted public datasets).
LESION_LABELS = {"background": 0, "lesion": 1}
_SHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: A channel file's name without its ending: ``CASE_XXXX``, channel ``XXXX`` (4 digits) of case ``CASE``.
CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")


def channel_file_name(case: str, channel: int, ending: str) -> str:
    """The file name of channel ``channel`` of ``case``: ``channel_file_name("c1", 2, ".nii.gz")`` is
    ``c1_0002.nii.gz``."""
    return f"{case}_{channel:04d}{ending}"


def cases_from_files(files: Sequence[Path], num_channels: int) -> list[tuple[str, tuple[Path, ...]]]:
    """Group image files into cases by the naming rule (module docstring), sorted by case.

    Args:
        files: image files (any ending SimpleITK reads), e.g. the contents of a folder to predict.
        num_channels: C, the channels the model takes.

    Returns:
        ``(case, files in channel order)`` per case; for one channel each file is its own case.

    Raises:
        ValueError: two files that would be the same case (one channel), or files that do not form complete
            cases (C > 1); one line per offending file, with the names expected.

    Example:
        >>> cases_from_files([Path("sub_0001.nii.gz"), Path("scan_0000.mha")], 1)
        [("scan", (Path("scan_0000.mha"),)), ("sub_0001", (Path("sub_0001.nii.gz"),))]
    """
    groups: dict[str, dict[int, list[Path]]] = {}
    problems = []
    for path in sorted(files):
        stem = split_ending(path)[0]
        match = CHANNEL_FILE.match(stem)
        if num_channels == 1:
            case, channel = (match.group(1) if match and match.group(2) == "0000" else stem), 0
        elif match is None:
            problems.append(f"{path.name}: not named CASE_XXXX (XXXX the channel, 0000-{num_channels - 1:04d})")
            continue
        else:
            case, channel = match.group(1), int(match.group(2))
            if channel >= num_channels:
                problems.append(f"{path.name}: channel {channel}, but the model's channels are 0-{num_channels - 1}")
                continue
        groups.setdefault(case, {}).setdefault(channel, []).append(path)
    cases = []
    for case, channels in sorted(groups.items()):
        ending = split_ending(next(iter(channels.values()))[0])[1]
        expected = ", ".join(channel_file_name(case, c, ending) for c in range(num_channels))
        for channel, paths in sorted(channels.items()):
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                problems.append(
                    f"{names}: the same case {case}"
                    + (f" channel {channel}" if num_channels > 1 else "")
                    + " more than once; keep one"
                )
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            problems += [
                f"{paths[0].name}: case {case} is incomplete: expected {expected}"
                for _, paths in sorted(channels.items())
            ]
        elif all(len(paths) == 1 for paths in channels.values()):
            cases.append((case, tuple(channels[c][0] for c in range(num_channels))))
    if problems:
        rule = (
            "every file is one case, named without its ending and a final _0000"
            if num_channels == 1
            else f"each case is {num_channels} files CASE_0000 ... CASE_{num_channels - 1:04d}, one per channel"
        )
        raise UsageError(
            f"{len(problems)} file(s) break the naming rule for a model with {num_channels} "
            f"channel(s) ({rule}):\n" + "\n".join(f"  {problem}" for problem in problems)
        )
    return cases


def channel_sets(files: Sequence[Path]) -> list[tuple[str, tuple[Path, ...]]]:
    """The multi-channel sets among ``files``: every name ``X`` for which both ``X_0000`` and ``X_0001`` are there
    (channels 0 … k, k ≥ 1, as a multi-channel case is named), with all of its ``X_XXXX`` files in channel order;
    sorted by ``X``. A lone ``X_0000`` or ``sub_0001`` is no set.

    Example:
        >>> channel_sets([Path("ctp_0000.nii.gz"), Path("ctp_0001.nii.gz"), Path("sub_0001.nii.gz")])
        [("ctp", (Path("ctp_0000.nii.gz"), Path("ctp_0001.nii.gz")))]
    """
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(files):
        match = CHANNEL_FILE.match(split_ending(path)[0])
        if match:
            groups.setdefault(match.group(1), []).append((int(match.group(2)), path))
    return [
        (name, tuple(path for _, path in sorted(members)))
        for name, members in sorted(groups.items())
        if {0, 1} <= {channel for channel, _ in members}
    ]


class DatasetError(AutosegError, RuntimeError):
    """A dataset cannot be found or is malformed; the message lists every problem found."""


@dataclass(frozen=True)
class Case:
    """One training case: its identifier, subject, channel files (in channel order) and label file."""

    identifier: str
    subject: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class RawDataset:
    """A raw dataset folder and its ``dataset.json``.

    Attributes:
        name: folder name, e.g. ``Dataset001_ATLAS``.
        folder: the folder itself.
        channel_names: channel names in channel order, e.g. ``("CT", "CBF", "CBV", "MTT", "Tmax")``.
        labels: label name -> integer value, background included.
        file_ending: e.g. ``.nii.gz``.
        subjects: case -> subject; cases not listed are their own subject.
        coregister_channels: ``dataset.json``'s ``"coregister_channels"`` (default false): a channel on another grid
            than channel 0 is rigidly registered to it and resampled onto its grid (``autoseg.data.coregistration``)
            wherever a case is read; without it channels on different grids are an error.
    """

    name: str
    folder: Path
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    subjects: dict[str, str] = field(default_factory=dict)
    coregister_channels: bool = False

    @property
    def short_name(self) -> str:
        """``ATLAS`` for ``Dataset001_ATLAS``; the folder name otherwise."""
        match = DATASET_FOLDER.match(self.name)
        return match.group(2) if match else self.name

    def cases(self, split: str = "Tr") -> list[Case]:
        """Cases in ``images{split}``, sorted by identifier. Channel files that are missing are kept
        as paths that do not exist, so verification can name them."""
        images_folder = self.folder / f"images{split}"
        if not images_folder.is_dir():
            return []
        identifiers = sorted(
            {
                match.group(1)
                for path in images_folder.iterdir()
                if path.name.endswith(self.file_ending)
                and (match := CHANNEL_FILE.match(path.name.removesuffix(self.file_ending)))
            }
        )
        labels_folder = self.folder / f"labels{split}"
        cases = []
        for identifier in identifiers:
            images = tuple(
                images_folder / channel_file_name(identifier, channel, self.file_ending)
                for channel in range(len(self.channel_names))
            )
            label = labels_folder / f"{identifier}{self.file_ending}" if split == "Tr" else None
            cases.append(Case(identifier, self.subjects.get(identifier, identifier), images, label))
        return cases


def load_dataset(folder: Path) -> RawDataset:
    """Read ``folder/dataset.json``.

    Raises:
        DatasetError: missing ``dataset.json``, not UTF-8 text, invalid JSON, not a JSON object, or missing or
            invalid keys: one line naming the file and every problem found.
    """
    description_path = folder / "dataset.json"
    if not description_path.is_file():
        raise DatasetError(f"{description_path}: dataset.json is missing")
    try:
        description = read_json(description_path)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    if not isinstance(description, dict):
        raise DatasetError(
            f"{description_path}: must be a JSON object with keys {', '.join(REQUIRED_KEYS)}, found "
            f"{_json_kind(description)}"
        )
    problems = [f"missing key '{key}'" for key in REQUIRED_KEYS if key not in description]
    problems += _description_problems(description)
    if problems:
        raise DatasetError(f"{description_path}: {'; '.join(problems)}")
    channels = description["channel_names"]
    order = sorted(channels, key=int)
    return RawDataset(
        name=folder.name,
        folder=folder,
        channel_names=tuple(channels[key] for key in order),
        labels=dict(description["labels"]),
        file_ending=description["file_ending"],
        subjects=dict(description.get("subjects", {})),
        coregister_channels=description.get(COREGISTER_KEY, False),
    )


def _description_problems(description: dict) -> list[str]:
    """What is wrong with the keys of a ``dataset.json`` object that are present, one phrase each."""
    problems = []
    channels = description.get("channel_names", {"0": "-"})
    if not isinstance(channels, dict) or not channels or not all(isinstance(v, str) for v in channels.values()):
        problems.append(
            f'\'channel_names\' must map channel index to name, e.g. {{"0": "T1"}}, found {_json_kind(channels)}'
        )
    elif not all(key.isdigit() for key in channels):
        problems.append("'channel_names' keys must be channel indices 0, 1, ...")
    elif sorted(int(key) for key in channels) != list(range(len(channels))):
        problems.append(f"channel indices must be 0..{len(channels) - 1}, found {sorted(channels, key=int)}")
    labels = description.get("labels", {"background": 0, "lesion": 1})
    if not isinstance(labels, dict):
        problems.append(
            f'\'labels\' must map names to integers, e.g. {{"background": 0, "lesion": 1}}, found {_json_kind(labels)}'
        )
    else:
        problems += declared_label_problems(labels)
    ending = description.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
        problems.append(f"'file_ending' must be a file ending such as \".nii.gz\", found {ending!r}")
    subjects = description.get("subjects", {})
    if not isinstance(subjects, dict) or not all(isinstance(v, str) for v in subjects.values()):
        problems.append(
            f'\'subjects\' must map case to subject, e.g. {{"case_001": "sub_01"}}, found {_json_kind(subjects)}'
        )
    coregister = description.get(COREGISTER_KEY, False)
    if not isinstance(coregister, bool):
        problems.append(f"'{COREGISTER_KEY}' must be true or false, found {_json_kind(coregister)}")
    return problems


def _json_kind(value: object) -> str:
    """How a JSON value is called in a message: ``a list``, ``a string``, ``an object``, ..."""
    if isinstance(value, dict):
        wrong = [v for v in value.values() if not isinstance(v, str)]
        return f"an object with the value {wrong[0]!r}" if wrong else "an empty object" if not value else "an object"
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def find_dataset(name: str) -> RawDataset:
    """Resolve ``-d NAME`` under ``AUTOSEG_RAW`` (see the module docstring for the accepted forms).

    Raises:
        DatasetError: nothing or more than one folder matches; the message lists what is there.
    """
    root = raw_root()
    direct = Path(name).expanduser()
    if direct.is_dir() and (direct / "dataset.json").exists():
        return load_dataset(direct.resolve())
    folders = sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    matches = [folder for folder in folders if matches_dataset_name(folder.name, name)]
    if len(matches) == 1:
        return load_dataset(matches[0])
    available = ", ".join(folder.name for folder in folders) or "none"
    if not matches:
        raise DatasetError(f"no dataset '{name}' in {root} (AUTOSEG_RAW); available: {available}")
    raise DatasetError(f"'{name}' is ambiguous in {root}: {', '.join(m.name for m in matches)}")


def write_dataset_json(
    folder: Path,
    channel_names: Sequence[str],
    num_training: int,
    labels: Mapping[str, int] = LESION_LABELS,
    file_ending: str = ".nii.gz",
    subjects: Mapping[str, str] | None = None,
    coregister_channels: bool = False,
    **extra: str,
) -> None:
    """Write ``folder/dataset.json``: ``extra`` items (e.g. ``name``, ``description``, ``reference``) first,
    then the keys :func:`load_dataset` reads; ``subjects`` (case -> subject) only when given,
    ``"coregister_channels": true`` only when asked for."""
    description: dict = dict(extra)
    description.update(
        channel_names={str(index): name for index, name in enumerate(channel_names)},
        labels=dict(labels),
        numTraining=num_training,
        file_ending=file_ending,
    )
    if subjects:
        description["subjects"] = dict(subjects)
    if coregister_channels:
        description[COREGISTER_KEY] = True
    write_json(description, folder / "dataset.json")


def new_dataset_folder(name: str, number: int | None = None, overwrite: bool = False) -> Path:
    """The folder ``AUTOSEG_RAW/DatasetNNN_NAME`` for a new dataset called ``name``.

    ``number`` defaults to the one an existing ``DatasetNNN_NAME`` has (``overwrite`` must then be set), or
    else the lowest number no dataset under ``AUTOSEG_RAW`` uses.

    Raises:
        ValueError: ``name`` is not a plain name (letters, digits, ``_``, ``-``, ``.``; no ``DatasetNNN_``
            prefix), or ``number`` is outside 1..999.
        FileExistsError: the folder exists and ``overwrite`` is not set, another dataset already has that
            number, or a dataset of that name exists under another number (``-d NAME`` would be ambiguous).
    """
    if not _SHORT_NAME.match(name) or DATASET_FOLDER.match(name):
        raise UsageError(
            f"dataset name '{name}' must be a plain name such as ATLAS (letters, digits, _ - .); "
            "the DatasetNNN_ prefix is added (choose the number with --id)"
        )
    root = raw_root()
    existing = {
        int(match.group(1)): path
        for path in (sorted(root.iterdir()) if root.is_dir() else [])
        if path.is_dir() and (match := DATASET_FOLDER.match(path.name))
    }
    same_name = [n for n, path in existing.items() if DATASET_FOLDER.match(path.name).group(2) == name]
    if number is None:
        number = same_name[0] if same_name else next(n for n in range(1, 1001) if n not in existing)
    if not 1 <= number <= 999:
        raise UsageError(f"dataset number must be between 1 and 999, got {number}")
    target = root / f"Dataset{number:03d}_{name}"
    if number in existing and existing[number] != target:
        raise ExistingOutputError(f"{existing[number]} already has number {number}; choose another with --id")
    others = [existing[n] for n in same_name if n != number]
    if others:
        raise ExistingOutputError(f"{others[0]} already holds a dataset named {name}; choose another name or remove it")
    if target.exists() and not overwrite:
        raise ExistingOutputError(f"{target} exists; pass --overwrite to replace it")
    return target


#: A staging folder unchanged for this long was left by a killed run (a live one writes cases every few seconds).
STALE_STAGE_SECONDS = 60.0


def _remove_stale_stages(target: Path) -> None:
    """Delete the staging folders (``.NAME.XXXXXXXX`` beside ``target``) that killed runs left, unchanged for
    :data:`STALE_STAGE_SECONDS`."""
    now = time.time()
    for stage in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if stage.is_dir() and not stage.is_symlink() and now - stage.stat().st_mtime > STALE_STAGE_SECONDS:
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_dataset(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target`` to build a dataset in; on success it replaces
    ``target``, on an error it is deleted and ``target`` is left as it was.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is not set (checked before and after building).
        OutputPathError: ``target``'s folder is a file or read-only (checked first).
    """
    if target.exists() and not overwrite:
        raise ExistingOutputError(f"{target} exists; pass --overwrite to replace it")
    check_output_folder(target.parent, "dataset folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(target)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
        folder = Path(scratch) / target.name
        folder.mkdir()
        yield folder
        if target.exists():
            if not overwrite:
                raise ExistingOutputError(f"{target} appeared while it was being written; nothing was replaced")
            # Move the old dataset aside first, so the final name always holds a complete dataset.
            target.rename(Path(scratch) / "replaced")
        folder.rename(target)
