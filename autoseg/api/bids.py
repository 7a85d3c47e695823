"""``autoseg_predict --bids``: BIDS datasets in, a BIDS derivatives dataset out (pybids).

A BIDS dataset is read with pybids (``bids.BIDSLayout``, validated: files whose names are not valid BIDS are left
out, as every BIDS App does, unless ``validate`` is False). Its images are grouped into cases by subject and session
(:func:`find_bids_cases`), staged under the names :func:`autoseg.api.predict.predict` reads (symbolic links
``CASE_0000.nii.gz`` ... in a hidden folder of the output), predicted, and written as a BIDS derivatives dataset
(:func:`predict_bids`)::

    OUT/dataset_description.json                      DatasetType "derivative", GeneratedBy autoseg and the model
    OUT/sub-01[/ses-1]/anat/sub-01[_ses-1]_space-orig_desc-lesion_mask.nii.gz    binary: 1 lesion, 0 background
    OUT/sub-01[/ses-1]/anat/sub-01[_ses-1]_space-orig_desc-lesion_mask.json      Sources, model, volume, QC
    OUT/sub-01[/ses-1]/anat/sub-01[_ses-1]_space-orig_label-L_probseg.nii.gz     with save_probabilities
    OUT/lesions.tsv, lesions.json                     one row per mask (+ the columns' descriptions)
    OUT/lesion_table.tsv, lesion_table.json           one row per lesion (+ the columns' descriptions)
    OUT/prediction_summary.json                       what this run wrote, skipped, and why a subject was not predicted

Channels: each of the model's channels is found by its BIDS suffix (:func:`channel_suffixes`: ``T1``/``T1w`` ->
``T1w``, ``FLAIR`` -> ``FLAIR``, ``DWI`` -> ``dwi``, ``ADC`` -> ``ADC``, ...; any other name is taken as the suffix
itself), and a filter file can set any entity per channel (:func:`read_filter_file`).

Names follow the BIDS derivatives conventions for masks (BIDS 1.10, "Imaging data types: Masks"):
``<source_entities>_space-orig_desc-lesion_mask.nii.gz``, where the source entities are those of the channel
files (all channels alike) that come before ``space`` in the BIDS entity order (``sub``, ``ses``, ``acq``, ``ce``,
``rec``, ``run``, ...), ``space-orig`` because the mask lies on the grid of its source image (no transformation),
in the first channel's datatype folder (``anat``, ``dwi``). Masks and probability maps keep the first channel's
exact header (``autoseg.io.images.write_like``). The probability map of the lesion is a probabilistic segmentation
with ``label-L`` (BIDS's common label for lesion).

A subject (or session) that cannot be predicted, because a channel's image is missing, several images match one
channel of a multi-channel model, or its files are not valid BIDS, gets one line naming it and the problem; the
others are predicted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import autoseg
from autoseg.api.predict import ModelChoice, ModelDescription, PredictionOptions, describe_model, predict
from autoseg.api.predict_inputs import InputCase
from autoseg.api.predict_outputs import CaseFailure, count_and_names, output_files, report_rows
from autoseg.errors import AutosegError, ExistingOutputError, InvalidFileError, MissingFileError, UsageError
from autoseg.io.files import atomic_path, check_output_folder, read_json, write_json
from autoseg.io.headers import split_ending
from autoseg.io.images import read_image, write_like

__all__ = [
    "BIDS_VERSION",
    "CHANNEL_SUFFIXES",
    "BidsCase",
    "BidsDatasetError",
    "BidsSelection",
    "BidsSummary",
    "NotPredicted",
    "bids_layout",
    "channel_suffixes",
    "find_bids_cases",
    "parse_filter",
    "participant_labels",
    "predict_bids",
    "read_filter_file",
]

#: The BIDS version whose derivatives conventions the output follows (``dataset_description.json``).
BIDS_VERSION = "1.10.0"
#: Model channel names, compared case-insensitively, and the BIDS suffixes that hold that contrast, tried in order
#: (the first suffix with an image wins); any other channel name is taken as a suffix itself (``CBF`` -> ``CBF``).
#: ``adc`` is ISLES 2022's spelling, which is not valid BIDS: it is only read with validation skipped.
CHANNEL_SUFFIXES: dict[str, tuple[str, ...]] = {
    "t1": ("T1w",),
    "t1w": ("T1w",),
    "mprage": ("T1w",),
    "t2": ("T2w",),
    "t2w": ("T2w",),
    "flair": ("FLAIR",),
    "t2flair": ("FLAIR",),
    "pd": ("PDw", "PD"),
    "pdw": ("PDw",),
    "t2star": ("T2starw", "T2star"),
    "t2starw": ("T2starw",),
    "dwi": ("dwi",),
    "adc": ("ADC", "adc"),
}
#: The image files read: NIfTI, as BIDS stores MRI.
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: The name under which the source dataset is linked (``DatasetLinks``) and named in BIDS URIs: ``bids:raw:PATH``.
SOURCE_LINK = "raw"
#: Entities of every mask and of every probability map (``space-orig``: on the source image's own grid).
MASK_ENTITIES = "space-orig_desc-lesion_mask"
PROBSEG_ENTITIES = "space-orig_label-L_probseg"
#: BIDS has no suffix for an uncertainty map: it keeps the entities of its mask, and ``.bidsignore`` lists it.
UNCERTAINTY_ENTITIES = "space-orig_desc-lesion_uncertainty"
#: Run-level files of the derivatives dataset (besides ``dataset_description.json``).
CASE_TABLE, LESION_TABLE, SUMMARY_FILE = "lesions.tsv", "lesion_table.tsv", "prediction_summary.json"
#: Hidden folder of the output where the inputs are staged and ``predict`` writes; removed after a run that ends
#: normally, kept after an interrupted one so that the same command continues where it stopped.
STAGING = ".autoseg_staging"
#: Entities kept from the source name: those before ``space`` in the BIDS entity order (BIDS appendix "Entity
#: table"); ``space`` and the derivative entities after it (``res``, ``den``, ``label``, ``desc``, ...) describe the
#: source, not the mask.
SOURCE_ENTITIES = tuple(
    "sub tpl ses cohort sample task tracksys acq nuc voi ce trc stain rec dir run mod echo flip inv mt part proc hemi".split()
)


class BidsDatasetError(AutosegError, ValueError):
    """The folder given to ``--bids`` is not a BIDS dataset pybids reads; the message names it and says why."""


def channel_suffixes(channel: str) -> tuple[str, ...]:
    """The BIDS suffixes tried, in order, for a model channel named ``channel`` (:data:`CHANNEL_SUFFIXES`)."""
    return CHANNEL_SUFFIXES.get(channel.lower(), (channel,))


def participant_labels(labels: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--participant-label`` values as BIDS Apps take them: ``01`` or ``sub-01`` both mean subject ``01``.

    Raises:
        UsageError: a label that is not a BIDS label (letters and digits only).
    """
    if labels is None:
        return None
    found = []
    for label in labels:
        bare = label.removeprefix("sub-")
        if not re.fullmatch(r"[A-Za-z0-9]+", bare):
            raise UsageError(f"--participant-label {label}: not a BIDS subject label (letters and digits only)")
        found.append(bare)
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class BidsSelection:
    """Which images of a BIDS dataset :func:`predict_bids` predicts.

    Args:
        participants: subject labels without ``sub-`` (:func:`participant_labels`); None: every subject.
        filters: entity -> value for every channel's query (``--bids-filter``, :func:`parse_filter`; pybids names
            such as ``session``, ``acquisition``, ``run`` or BIDS keys such as ``ses``, ``acq``); a value of None
            means the entity must be absent, ``"*"`` that it must be present.
        channel_filters: channel name -> its own entity filters, over ``filters``; a ``suffix`` here replaces
            :func:`channel_suffixes`.
        filter_file: a ``--bids-filter-file`` (:func:`read_filter_file`): its filters for every channel come under
            ``filters``, its filters per channel under ``channel_filters``.
        validate: leave out files whose names are not valid BIDS (pybids' validation, as BIDS Apps do). False:
            read every file whose name pybids can parse (``--skip-bids-validation``).
    """

    participants: tuple[str, ...] | None = None
    filters: Mapping[str, Any] = field(default_factory=dict)
    channel_filters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    filter_file: str | Path | None = None
    validate: bool = True

    def channel_queries(self, channels: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(filters for every channel, filters per channel) from the filter file, ``filters`` and
        ``channel_filters``, the later over the earlier.

        Raises:
            MissingFileError, InvalidFileError: see :func:`read_filter_file`.
        """
        common, per_channel = read_filter_file(self.filter_file, channels) if self.filter_file else ({}, {})
        common = {**common, **self.filters}
        for channel, own in self.channel_filters.items():
            per_channel[channel] = {**per_channel.get(channel, {}), **own}
        return common, per_channel


def parse_filter(text: str) -> tuple[str, str | None]:
    """``--bids-filter KEY=VALUE``: (KEY, VALUE); ``KEY=`` (nothing after ``=``) means the entity must be absent
    (None) and ``KEY=*`` that it must be present.

    Raises:
        UsageError: no ``=`` or no key.
    """
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise UsageError(f"--bids-filter {text}: expected KEY=VALUE, e.g. session=1 or acq=mprage")
    return key.strip(), value.strip() or None


def read_filter_file(path: str | Path, channels: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A ``--bids-filter-file``: a JSON object whose keys are entities (applied to every channel) or the model's
    channel names (an object of entity filters for that channel's images, e.g. ``{"DWI": {"suffix": "dwi",
    "acquisition": "tra"}}``, as the BIDS Apps' filter files name their queries). Values: a string or number, a
    list of them (any of), null (the entity must be absent) or ``"*"`` (present).

    Returns:
        (filters for every channel, filters per channel).

    Raises:
        MissingFileError: no such file.
        InvalidFileError: not JSON, not an object, a channel's value that is not an object, or a value of another
            kind; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such filter file (--bids-filter-file)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise InvalidFileError(f'{path}: must hold a JSON object of entity filters, e.g. {{"session": "1"}}')
    common, per_channel = {}, {}
    for key, value in data.items():
        if key in channels:
            if not isinstance(value, dict):
                raise InvalidFileError(f'{path}: {key}: a channel\'s filters must be an object, e.g. {{"run": 1}}')
            per_channel[key] = {entity: _filter_value(path, f"{key}.{entity}", v) for entity, v in value.items()}
        else:
            common[key] = _filter_value(path, key, value)
    return common, per_channel


def _filter_value(path: Path, key: str, value: Any) -> Any:
    """A filter value as read from a filter file: str, int, None, or a list of str/int.

    Raises:
        InvalidFileError: any other kind, naming the file and key.
    """
    scalar = (str, int)
    if value is None or (isinstance(value, scalar) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, scalar) and not isinstance(v, bool) for v in value):
        return value
    raise InvalidFileError(f"{path}: {key}: expected a string, a number, a list of them or null, got {value!r}")


@dataclass(frozen=True)
class BidsCase:
    """One case found in a BIDS dataset: the model's channels of one subject and session.

    Attributes:
        subject: subject label (without ``sub-``).
        session: session label (without ``ses-``), or None.
        identifier: the source entities as a name, ``sub-01_ses-1_run-2`` (the mask's name before
            :data:`MASK_ENTITIES`).
        datatype: the first channel's datatype folder (``anat``, ``dwi``).
        sources: the channel files, in the model's channel order.
        relative: the same files relative to the BIDS root (POSIX), for BIDS URIs.
    """

    subject: str
    session: str | None
    identifier: str
    datatype: str
    sources: tuple[Path, ...]
    relative: tuple[str, ...]

    def folder(self, output: Path) -> Path:
        """``OUTPUT/sub-X[/ses-Y]/DATATYPE``, where this case's derivatives go."""
        folder = output / f"sub-{self.subject}"
        return (folder / f"ses-{self.session}" if self.session else folder) / self.datatype

    def mask(self, output: Path) -> Path:
        """The mask's path in ``output``."""
        return self.folder(output) / f"{self.identifier}_{MASK_ENTITIES}.nii.gz"

    def sidecar(self, output: Path) -> Path:
        """The mask's JSON sidecar in ``output``."""
        return self.folder(output) / f"{self.identifier}_{MASK_ENTITIES}.json"

    def probseg(self, output: Path) -> Path:
        """The lesion probability map's path in ``output``."""
        return self.folder(output) / f"{self.identifier}_{PROBSEG_ENTITIES}.nii.gz"

    def uncertainty(self, output: Path) -> Path:
        """The uncertainty map's path in ``output`` (:data:`UNCERTAINTY_ENTITIES`)."""
        return self.folder(output) / f"{self.identifier}_{UNCERTAINTY_ENTITIES}.nii.gz"


@dataclass(frozen=True)
class NotPredicted:
    """A subject, or one session of it, that is not predicted, and why (one line)."""

    subject: str
    session: str | None
    problem: str

    def line(self) -> str:
        """``sub-X[_ses-Y]: not predicted: PROBLEM``."""
        session = f"_ses-{self.session}" if self.session else ""
        return f"sub-{self.subject}{session}: not predicted: {self.problem}"


def find_bids_cases(
    root: str | Path, channels: Sequence[str], selection: BidsSelection | None = None, *, layout: Any = None
) -> tuple[list[BidsCase], list[NotPredicted]]:
    """The cases of a BIDS dataset for a model with ``channels``, and the subjects (sessions) that give none.

    Per subject (``selection.participants``, else every ``sub-*`` of the dataset) and session (also "no session"):
    each channel's images (NIfTI, matching the channel's suffixes and the filters). A one-channel model predicts
    every matching image as its own case (``sub-01_run-1``, ``sub-01_run-2``); a model of several channels needs
    exactly one image per channel. A session with NIfTI images but no image of a channel is reported, naming the
    channel, the suffixes looked for and the files left out as not valid BIDS; a subject with no image at all, or
    not in the dataset, is reported too.

    Args:
        root: the BIDS dataset.
        channels: the model's channel names, in channel order.
        selection: subjects, filters, validation; None: every subject, no filter, validated.
        layout: pybids' index of ``root`` when already made (:func:`bids_layout`); None: made here.

    Raises:
        BidsDatasetError: ``root`` is not a BIDS dataset (no or invalid ``dataset_description.json``).
        MissingFileError: ``root`` does not exist.
        UsageError: a filter names an entity pybids does not know (the message lists those it knows).
    """
    selection = selection or BidsSelection()
    root = Path(root)
    layout = layout if layout is not None else bids_layout(root, selection.validate)
    root = Path(layout.root)  # absolute, as pybids gives the files' paths
    aliases = _entity_names(layout)
    common, own = selection.channel_queries(channels)
    common = _resolve_filters(common, aliases, "--bids-filter")
    per_channel = {
        channel: _resolve_filters(own.get(channel, {}), aliases, f"filter of channel {channel}") for channel in channels
    }
    subjects = _subjects(root, layout)
    chosen = selection.participants if selection.participants is not None else tuple(sorted(subjects))
    cases: list[BidsCase] = []
    problems: list[NotPredicted] = []
    for subject in chosen:
        if subject not in subjects:
            known = ", ".join(sorted(subjects)[:10]) or "none"
            problems.append(NotPredicted(subject, None, f"no folder sub-{subject} in {root} (subjects: {known})"))
            continue
        found, missing = _subject_cases(root, layout, subject, channels, common, per_channel)
        cases += found
        problems += missing
    return _unique_names(cases, problems)


def bids_layout(root: str | Path, validate: bool = True) -> Any:
    """pybids' index of the BIDS dataset ``root`` (``bids.BIDSLayout``; with ``validate``, files whose names are
    not valid BIDS are left out).

    Raises:
        MissingFileError: ``root`` does not exist.
        BidsDatasetError: no ``dataset_description.json``, or one pybids refuses (not JSON, no ``BIDSVersion``);
            one line naming ``root``.
    """
    root = Path(root)
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError

    if not root.is_dir():
        raise MissingFileError(f"--bids {root}: no such folder")
    if not (root / "dataset_description.json").is_file():
        raise BidsDatasetError(
            f"--bids {root}: not a BIDS dataset: no dataset_description.json (a BIDS dataset holds it beside its "
            "sub-* folders; for a folder of scans use -i)"
        )
    try:
        return BIDSLayout(root, validate=validate)
    except BIDSValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise BidsDatasetError(f"--bids {root}: not a valid BIDS dataset: {first}") from None


def _entity_names(layout: Any) -> dict[str, str]:
    """Every name a filter may use -> pybids' entity name: pybids' own (``acquisition``) and the BIDS key in file
    names (``acq``), read from each entity's pattern."""
    names = {}
    for name, entity in layout.get_entities().items():
        names[name] = name
        key = re.search(r"([A-Za-z]+)-\(", entity.pattern or "")
        if key:
            names.setdefault(key.group(1), name)
    return names


def _resolve_filters(filters: Mapping[str, Any], names: Mapping[str, str], where: str) -> dict[str, Any]:
    """``filters`` with pybids' entity names and pybids' queries (None: absent, ``"*"``: present).

    Raises:
        UsageError: an unknown entity, naming ``where`` and the known ones.
    """
    from bids.layout import Query

    resolved = {}
    for key, value in filters.items():
        if names.get(key) == "subject":
            raise UsageError(f"{where}: select subjects with --participant-label, not a filter on '{key}'")
        if key not in names:
            known = ", ".join(sorted(k for k, v in names.items() if v not in ("subject", "extension", "scans", "fmap")))
            raise UsageError(f"{where}: unknown BIDS entity '{key}'; known: {known}")
        resolved[names[key]] = Query.NONE if value is None else Query.ANY if value == "*" else value
    return resolved


def _subjects(root: Path, layout: Any) -> set[str]:
    """Subjects pybids indexed and ``sub-*`` folders on disk (a folder of files that are not valid BIDS is not in
    the index, yet it is a subject the user will ask about)."""
    on_disk = {p.name.removeprefix("sub-") for p in root.glob("sub-*") if p.is_dir()}
    return set(layout.get_subjects()) | on_disk


def _subject_cases(
    root: Path,
    layout: Any,
    subject: str,
    channels: Sequence[str],
    common: Mapping[str, Any],
    per_channel: Mapping[str, Mapping[str, Any]],
) -> tuple[list[BidsCase], list[NotPredicted]]:
    """The cases of one subject, session by session, and the sessions that give none (see :func:`find_bids_cases`)."""
    from bids.layout import Query

    images = layout.get(subject=subject, extension=list(NIFTI_EXTENSIONS), **common)
    sessions = sorted({image.get_entities().get("session") for image in images}, key=lambda s: s or "")
    if not images:
        left_out = _not_valid_bids(root, layout, subject)  # only looked for when a line will name them
        hint = f"; left out as not valid BIDS: {', '.join(left_out)}" if left_out else ""
        return [], [NotPredicted(subject, None, f"no NIfTI image{' matches the filters' if common else ''}{hint}")]
    cases, problems = [], []
    for session in sessions:
        query = {**common, "subject": subject, "session": session or Query.NONE}
        found: dict[str, list[Any]] = {}
        for channel in channels:
            found[channel] = _channel_images(layout, channel, query, per_channel.get(channel, {}))
        absent = [channel for channel in channels if not found[channel]]
        if absent:
            here = [image for image in images if image.get_entities().get("session") == session]
            line = _missing_line(absent, per_channel, here, _not_valid_bids(root, layout, subject))
            problems.append(NotPredicted(subject, session, line))
        elif len(channels) == 1:
            cases += [_case(root, subject, session, (image,)) for image in found[channels[0]]]
        elif any(len(found[channel]) > 1 for channel in channels):
            channel = next(channel for channel in channels if len(found[channel]) > 1)
            names = ", ".join(Path(image.path).name for image in found[channel])
            problems.append(
                NotPredicted(
                    subject,
                    session,
                    f"{len(found[channel])} images match channel {channel} ({names}); choose one with --bids-filter "
                    "(e.g. run=1) or per channel with --bids-filter-file",
                )
            )
        else:
            cases.append(_case(root, subject, session, tuple(found[channel][0] for channel in channels)))
    return cases, problems


def _channel_images(layout: Any, channel: str, query: Mapping[str, Any], own: Mapping[str, Any]) -> list[Any]:
    """The NIfTI images of one channel for ``query``: those of the first of its suffixes that has any, sorted."""
    suffixes = (own["suffix"],) if "suffix" in own else channel_suffixes(channel)
    for suffix in suffixes:
        images = layout.get(**{**query, **own, "suffix": suffix, "extension": list(NIFTI_EXTENSIONS)})
        if images:
            return sorted(images, key=lambda image: image.path)
    return []


def _missing_line(
    absent: Sequence[str], per_channel: Mapping[str, Mapping[str, Any]], images: Sequence[Any], left_out: list[str]
) -> str:
    """Why a session gives no case: the channels without an image, the suffixes looked for, the suffixes of the
    session's ``images``, and the subject's files that were left out as not valid BIDS."""
    wanted = []
    for channel in absent:
        suffixes = per_channel.get(channel, {}).get("suffix") or channel_suffixes(channel)
        suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
        wanted.append(f"{channel} ({' or '.join(f'*_{s}.nii[.gz]' for s in suffixes)})")
    has = sorted({image.get_entities().get("suffix", "?") for image in images})
    line = f"no image for channel {', '.join(wanted)}; there: {', '.join(has)}"
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        line += f"; left out as not valid BIDS: {shown} (--skip-bids-validation reads them)"
    return line


def _not_valid_bids(root: Path, layout: Any, subject: str) -> list[str]:
    """NIfTI files under ``sub-SUBJECT/`` that pybids left out of its index (names that are not valid BIDS),
    relative to ``root``."""
    folder = root / f"sub-{subject}"
    indexed = {os.path.realpath(path) for path in layout.get(subject=subject, return_type="filename")}
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and split_ending(path)[1] in NIFTI_EXTENSIONS and os.path.realpath(path) not in indexed:
            found.append(path.relative_to(root).as_posix())
    return found


def _case(root: Path, subject: str, session: str | None, images: Sequence[Any]) -> BidsCase:
    """A case from its channel images (pybids ``BIDSFile``): named by the source entities all channels share."""
    pairs = [_name_entities(Path(image.path)) for image in images]
    shared = [pair for pair in pairs[0] if all(pair in other for other in pairs[1:])]
    identifier = "_".join(f"{key}-{value}" for key, value in shared)
    datatype = images[0].get_entities().get("datatype") or "anat"
    sources = tuple(Path(image.path) for image in images)
    relative = tuple(path.relative_to(root).as_posix() for path in sources)
    return BidsCase(subject, session, identifier, datatype, sources, relative)


def _name_entities(path: Path) -> list[tuple[str, str]]:
    """The ``key-value`` pairs of a BIDS file name among :data:`SOURCE_ENTITIES`, in the name's order."""
    parts = split_ending(path)[0].split("_")[:-1]  # the last part is the suffix
    pairs = [tuple(part.split("-", 1)) for part in parts if "-" in part]
    return [(key, value) for key, value in pairs if key in SOURCE_ENTITIES]


def _unique_names(cases: list[BidsCase], problems: list[NotPredicted]) -> tuple[list[BidsCase], list[NotPredicted]]:
    """Cases whose masks would have the same name (images that differ only in ``space``, ``desc``, ...) are
    reported instead of predicted."""
    by_name: dict[str, list[BidsCase]] = {}
    for case in cases:
        by_name.setdefault(case.identifier, []).append(case)
    unique = []
    for name, group in by_name.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        files = ", ".join(case.relative[0] for case in group)
        problems.append(
            NotPredicted(
                group[0].subject,
                group[0].session,
                f"{len(group)} images would give the same mask {name}_{MASK_ENTITIES} ({files}); choose one with "
                "--bids-filter",
            )
        )
    return unique, problems


@dataclass
class BidsSummary:
    """What :func:`predict_bids` did.

    Attributes:
        written: masks written by this run.
        skipped: masks that were complete already (mask and sidecar exist; see ``overwrite``).
        failed: the cases that could not be read or predicted, naming their BIDS files.
        not_predicted: the subjects (sessions) that gave no case, and why.
        per_case: written and skipped cases (their mask's name before ``_space-orig...``) -> ``review`` and
            ``input_warnings``, from their sidecars.
        path: the summary file (``OUTPUT/prediction_summary.json``).
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[CaseFailure] = field(default_factory=list)
    not_predicted: list[NotPredicted] = field(default_factory=list)
    per_case: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def nothing_predicted(self) -> bool:
        """No mask was written or found complete: the run predicted nothing (exit code 1)."""
        return not self.written and not self.skipped

    def note(self, case: BidsCase, sidecar: Mapping[str, Any]) -> None:
        """Record a written or skipped case's review flag and input warnings from its mask's sidecar."""
        qc = sidecar.get("QC") or {}
        self.per_case[case.identifier] = {
            "review": bool(qc.get("review")),
            "input_warnings": list(sidecar.get("InputWarnings", [])),
        }

    def line(self, shown: int = 10) -> str:
        """One line: masks written, skipped, failed, with input warnings, flagged for review, and subjects (sessions)
        not predicted, naming up to ``shown`` of each, and where the summary is."""
        flagged = [case for case, entry in self.per_case.items() if entry["review"]]
        warned = [case for case, entry in self.per_case.items() if entry["input_warnings"]]
        missing = [problem.line().split(":", 1)[0] for problem in self.not_predicted]
        text = f"wrote {len(self.written)} mask(s), skipped {len(self.skipped)} already done"
        text += f", {count_and_names([failure.identifier for failure in self.failed], 'failed', shown)}"
        if warned:
            text += f", {count_and_names(warned, 'with input warnings', shown)}"
        text += f"; {count_and_names(flagged, 'flagged for review', shown)}"
        text += f"; {count_and_names(missing, 'subject(s)/session(s) not predicted', shown)}"
        return f"{text}; summary: {self.path}" if self.path else text


def predict_bids(
    root: str | Path,
    output: str | Path,
    choice: ModelChoice | None = None,
    options: PredictionOptions | None = None,
    selection: BidsSelection | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> BidsSummary:
    """Predict the cases of the BIDS dataset ``root`` into the BIDS derivatives dataset ``output`` (module docstring).

    Args:
        root: the BIDS dataset (the folder holding ``dataset_description.json`` and ``sub-*``).
        output: the derivatives dataset (created if needed; e.g. ``root/derivatives/autoseg``); not ``root``.
        choice: the model (:class:`autoseg.api.predict.ModelChoice`).
        options: how to predict (:class:`autoseg.api.predict.PredictionOptions`); ``case_list`` and parts are not
            used (select with ``selection``). ``overwrite`` predicts complete cases again and replaces a
            ``dataset_description.json`` of another model.
        selection: subjects, filters and validation (:class:`BidsSelection`).
        log: receives each line about a subject not predicted, and :func:`predict`'s lines (a failed case, input
            checks) with the staged names replaced by the BIDS files; None: printed to stderr.

    Returns:
        What was written, skipped, failed and not predicted; also in ``OUTPUT/prediction_summary.json``.

    Raises:
        BidsDatasetError, MissingFileError, UsageError: see :func:`find_bids_cases`; ``output`` is ``root``; the
            options ask for a ``--list`` or parts.
        ExistingOutputError: ``output`` holds a dataset of another model or not of autoseg (see
            :func:`_check_description`).
        OutputPathError, DiskFullError, ValueError: see :func:`autoseg.api.predict.predict`.
    """
    options = options or PredictionOptions()
    log = log or _print_to_stderr
    root, output = Path(root), Path(output)
    if options.case_list is not None or options.num_parts != 1:
        raise UsageError("--bids selects cases with --participant-label and --bids-filter, not --list or parts")
    check_output_folder(output)
    if output.resolve() == root.resolve():
        raise UsageError(
            f"-o {output}: is the BIDS dataset itself; write the derivatives elsewhere, e.g. "
            f"{root / 'derivatives' / 'autoseg'}"
        )
    selection = selection or BidsSelection()
    layout = bids_layout(root, selection.validate)  # before the model is installed: a wrong folder fails at once
    model = describe_model(choice, options.checkpoint)
    cases, not_predicted = find_bids_cases(root, model.channels, selection, layout=layout)
    description = _description(root, model)
    model_json = _model_json(model)
    _check_description(output / "dataset_description.json", description, options.overwrite)
    summary = BidsSummary(not_predicted=not_predicted)
    for problem in not_predicted:
        log(problem.line())
    to_predict = []
    for case in cases:
        if options.overwrite or not _complete(case, output, options):
            to_predict.append(case)
        else:
            summary.skipped.append(case.mask(output))
            summary.note(case, read_json(case.sidecar(output)))
    write_json(description, output / "dataset_description.json")
    if to_predict:
        _predict_staged(to_predict, output, choice, options, model_json, summary, log)
    _write_tables(output)
    _write_bidsignore(output)
    summary.path = output / SUMMARY_FILE
    write_json(_summary_json(root, selection, model_json, summary), summary.path)
    return summary


def _complete(case: BidsCase, output: Path, options: PredictionOptions) -> bool:
    """Whether a case's derivatives exist: the sidecar is written last, so with it the mask (and maps) are whole."""
    needed = [case.mask(output), case.sidecar(output)]
    needed += [case.probseg(output)] if options.save_probabilities else []
    needed += [case.uncertainty(output)] if options.save_uncertainty else []
    return all(path.is_file() for path in needed)


def _predict_staged(
    cases: Sequence[BidsCase],
    output: Path,
    choice: ModelChoice | None,
    options: PredictionOptions,
    model: Mapping[str, Any],
    summary: BidsSummary,
    log: Callable[[str], None],
) -> None:
    """Link the cases' channel files under the names :func:`predict` reads (``CASE_0000.nii.gz``, ...), predict them
    into the staging folder (where an interrupted run's predictions are found again and skipped), and write each
    predicted case's derivatives."""
    staging = output / STAGING
    inputs, predictions = staging / "inputs", staging / "predictions"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    staged: dict[str, str] = {}
    for case in cases:
        for channel, source in enumerate(case.sources):
            link = inputs / f"{case.identifier}_{channel:04d}{split_ending(source)[1]}"
            link.symlink_to(os.path.abspath(source))
            staged[str(link)] = str(source)

    def source_names(line: str) -> str:
        for link, source in staged.items():
            line = line.replace(link, source)
        return line

    predict_options = dataclasses.replace(options, case_list=None, num_parts=1, part_id=0)
    result = predict(inputs, predictions, choice, predict_options, log=lambda line: log(source_names(line)))
    summary.failed += [
        CaseFailure(f.identifier, tuple(source_names(file) for file in f.files), source_names(f.problem))
        for f in result.failed
    ]
    # predicted now, or by an interrupted run whose predictions were found complete in the staging folder
    predicted = {split_ending(path)[0] for path in result.written} | set(result.skipped)
    for case in cases:
        if case.identifier in predicted:
            summary.note(case, _write_derivatives(case, predictions, output, model, options))
            summary.written.append(case.mask(output))
    shutil.rmtree(staging)


def _write_derivatives(
    case: BidsCase, predictions: Path, output: Path, model: Mapping[str, Any], options: PredictionOptions
) -> dict[str, Any]:
    """Write one case's mask (binary, the first channel's header), probability and uncertainty maps and sidecar
    (last) from what :func:`predict` wrote under ``predictions`` (:func:`autoseg.api.predict_outputs.output_files`);
    returns the sidecar."""
    staged = InputCase(case.identifier, case.sources, split_ending(case.sources[0])[1])
    predicted = output_files(predictions, staged, options.save_probabilities, options.save_uncertainty)
    labels, geometry = read_image(predicted.labels)
    write_like((labels != 0).astype(np.uint8), geometry, case.mask(output), case.sources[0])  # 0: background
    # the maps are written by predict with the first channel's header already
    if predicted.probabilities is not None:
        os.replace(predicted.probabilities, case.probseg(output))
    if predicted.uncertainty is not None:
        os.replace(predicted.uncertainty, case.uncertainty(output))
    sidecar = _sidecar(case, model, read_json(predicted.report))
    if predicted.uncertainty is not None:
        sidecar["UncertaintyMap"] = case.uncertainty(output).name
    write_json(sidecar, case.sidecar(output))
    return sidecar


def _uri(relative: str) -> str:
    """The BIDS URI of a file of the source dataset: ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``."""
    return f"bids:{SOURCE_LINK}:{relative}"


#: The keys of a lesion report (``CASE_lesions.json``, ``autoseg.infer.lesions``) kept in each mask's sidecar, and
#: their names there; its file names (``case``, ``files``, ``mask``, ...) name the staged files and are left out.
REPORT_KEYS = {
    "lesion_count": "LesionCount",
    "total_volume_ml": "LesionVolumeMl",
    "voxel_volume_ml": "VoxelVolumeMl",
    "qc": "QC",
    "input_warnings": "InputWarnings",
    "midline": "Midline",
    "conventions": "Conventions",
    "lesions": "Lesions",
}


def _sidecar(case: BidsCase, model: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """The mask's JSON sidecar: BIDS's mask fields (``Type``, ``Sources``, ``SpatialReference``), the model, and
    the lesion report of :func:`predict` (:data:`REPORT_KEYS`: volume in ml, lesions, QC)."""
    return {
        "Type": "Lesion",
        "Description": "Lesion mask predicted by autoseg: 1 inside a lesion (any non-background label of the "
        "model), 0 outside, on the grid and with the header of its first source image.",
        "Sources": [_uri(relative) for relative in case.relative],
        "SpatialReference": _uri(case.relative[0]),
        "Manual": False,
        "Model": {**model, "Channels": {name: _uri(path) for name, path in zip(model["Channels"], case.relative)}},
        **{name: report[key] for key, name in REPORT_KEYS.items() if key in report},
    }


def _model_json(model: ModelDescription) -> dict[str, Any]:
    """The model as the sidecars and the summary name it (a model file with its SHA-256)."""
    described: dict[str, Any] = {
        "Dataset": model.dataset,
        "Members": list(model.members),
        "Folds": {member: list(folds) for member, folds in model.folds.items()},
        "Checkpoint": model.checkpoint,
        "Channels": list(model.channels),
    }
    if model.model_file is not None:
        described["ModelFile"] = {"Path": str(Path(model.model_file).resolve()), "SHA256": _sha256(model.model_file)}
    return described


def _sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hexadecimal)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _description(root: Path, model: ModelDescription) -> dict[str, Any]:
    """``dataset_description.json`` of the derivatives dataset: derivative, generated by autoseg (version and
    model), the source dataset linked for the sidecars' BIDS URIs."""
    source_name = None
    try:
        source_name = read_json(root / "dataset_description.json").get("Name")
    except (AutosegError, AttributeError):
        pass
    members = ", ".join(f"{m} ({', '.join(model.folds[m])})" for m in model.members)
    origin = f"model file {Path(model.model_file).name}, " if model.model_file else ""
    return {
        "Name": f"autoseg lesion masks{f' of {source_name}' if source_name else ''}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "autoseg",
                "Version": autoseg.__version__,
                "Description": f"autoseg_predict, {origin}dataset {model.dataset}, members {members}, "
                f"{model.checkpoint} checkpoint(s); channels {', '.join(model.channels)}",
            }
        ],
        "SourceDatasets": [{"URL": root.resolve().as_uri()}],
        "DatasetLinks": {SOURCE_LINK: root.resolve().as_uri()},
    }


def _check_description(path: Path, description: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse an output that holds another dataset: one not generated by autoseg always, one of another model or
    source (another ``GeneratedBy`` or ``DatasetLinks``) unless ``overwrite``.

    Raises:
        ExistingOutputError: one line naming the file and what differs.
    """
    if not path.is_file():
        return
    existing = read_json(path)
    generated = existing.get("GeneratedBy") if isinstance(existing, dict) else None
    if not (isinstance(generated, list) and generated and generated[0].get("Name") == "autoseg"):
        raise ExistingOutputError(f"{path}: another dataset, not autoseg's derivatives; write to another folder (-o)")
    for key in ("GeneratedBy", "DatasetLinks"):
        if existing.get(key) != description[key] and not overwrite:
            raise ExistingOutputError(
                f"{path}: written by another {'model or autoseg version' if key == 'GeneratedBy' else 'source'} "
                f"({existing.get(key)}); write to another folder (-o), or --overwrite to predict every selected case "
                "again with this one"
            )


#: What locates a row of the BIDS tables, before the columns of ``lesions.csv`` and ``lesion_table.csv``
#: (:data:`autoseg.api.predict_outputs.CASE_COLUMNS`, ``LESION_COLUMNS``, without ``case``).
_ROW_KEYS = {
    "participant_id": {"Description": "Subject label, sub-<label>."},
    "session_id": {"Description": "Session label, ses-<label>; n/a without sessions."},
    "mask": {"Description": "The lesion mask, relative to this dataset."},
}
#: The columns of ``lesions.tsv`` (one row per mask) and their descriptions (``lesions.json``).
CASE_TABLE_COLUMNS = {
    **_ROW_KEYS,
    "lesion_count": {"Description": "Number of lesions: 26-connected components of the mask."},
    "total_volume_ml": {"Description": "Volume of the mask: voxels x the source's voxel volume.", "Units": "mL"},
    "qc_score": {
        "Description": "Quality-control score of the prediction, 0-1, higher is more reliable "
        "(documentation/quality_control.md)."
    },
    "review": {
        "Description": "Whether the case is flagged for review.",
        "Levels": {"True": "check the mask", "False": "not flagged"},
    },
    "review_reasons": {"Description": "Why the case is flagged, '; '-separated."},
    "input_warnings": {"Description": "Input checks against the training data that warned, '; '-separated."},
}
#: The columns of ``lesion_table.tsv`` (one row per lesion) and their descriptions (``lesion_table.json``).
LESION_TABLE_COLUMNS = {
    **_ROW_KEYS,
    "lesion": {"Description": "Lesion index in the mask, 1 the largest."},
    "label": {"Description": "The model's declared label value most of the lesion's voxels carry."},
    "voxels": {"Description": "Voxels of the lesion."},
    "volume_ml": {"Description": "Volume of the lesion: voxels x the source's voxel volume.", "Units": "mL"},
    "hemisphere": {
        "Description": "The patient's side of the mid-sagittal plane holding at least 90% of the lesion.",
        "Levels": {"left": "left", "right": "right", "midline": "across the midline", "unknown": "no midline found"},
    },
    **{
        f"centroid_ras_{axis}_mm": {
            "Description": f"Centroid, world {axis} (RAS: x left to right, y posterior to "
            "anterior, z inferior to superior).",
            "Units": "mm",
        }
        for axis in "xyz"
    },
    "bbox_start": {"Description": "Bounding box start, voxel indices i j k of the mask (inclusive)."},
    "bbox_stop": {"Description": "Bounding box stop, voxel indices i j k of the mask (exclusive)."},
    "mean_probability": {"Description": "Mean lesion probability inside the lesion."},
    "max_probability": {"Description": "Largest lesion probability inside the lesion."},
}


def _write_tables(output: Path) -> None:
    """``lesions.tsv`` (one row per mask) and ``lesion_table.tsv`` (one row per lesion) of every mask sidecar in
    ``output`` (the rows of ``lesions.csv`` and ``lesion_table.csv``, :func:`autoseg.api.predict_outputs.report_rows`,
    located by subject, session and mask), with their JSON column descriptions; ``n/a`` where a value is missing
    (BIDS tabular files)."""
    from bids.layout import parse_file_entities

    cases, lesions = [], []
    for sidecar in sorted(output.glob(f"sub-*/**/*_{MASK_ENTITIES}.json")):
        data = read_json(sidecar)
        entities = parse_file_entities(sidecar.as_posix())
        keys = {
            "participant_id": f"sub-{entities['subject']}",
            "session_id": f"ses-{entities['session']}" if "session" in entities else None,
            "mask": sidecar.relative_to(output).as_posix().removesuffix(".json") + ".nii.gz",
        }
        report = {key: data[name] for key, name in REPORT_KEYS.items() if name in data}
        case, rows = report_rows({**report, "case": None})
        cases.append({**keys, **case})
        lesions += [{**keys, **row} for row in rows]
    for name, rows, columns in (
        (CASE_TABLE, cases, CASE_TABLE_COLUMNS),
        (LESION_TABLE, lesions, LESION_TABLE_COLUMNS),
    ):
        with atomic_path(output / name, suffix=".tsv") as temporary:
            pd.DataFrame(rows, columns=list(columns)).to_csv(temporary, sep="\t", index=False, na_rep="n/a")
        write_json(columns, output / name.replace(".tsv", ".json"))


def _write_bidsignore(output: Path) -> None:
    """``.bidsignore``: the run's summary, the staging folder and the uncertainty maps, which are no BIDS files, for
    the BIDS validator."""
    path = output / ".bidsignore"
    with atomic_path(path, suffix=".txt") as temporary:
        temporary.write_text(f"{SUMMARY_FILE}\n{STAGING}/\n*_{UNCERTAINTY_ENTITIES}.nii.gz\n", encoding="utf-8")


def _summary_json(
    root: Path, selection: BidsSelection, model: Mapping[str, Any], summary: BidsSummary
) -> dict[str, Any]:
    """``prediction_summary.json`` of a BIDS run: the dataset, selection and model, then what happened."""
    output = summary.path.parent if summary.path else Path()
    return {
        "bids": str(root),
        "participants": None if selection.participants is None else list(selection.participants),
        "filters": {key: value for key, value in selection.filters.items()},
        "channel_filters": {key: dict(value) for key, value in selection.channel_filters.items()},
        "filter_file": None if selection.filter_file is None else str(selection.filter_file),
        "validate": selection.validate,
        "model": model,
        "counts": {
            "written": len(summary.written),
            "skipped": len(summary.skipped),
            "failed": len(summary.failed),
            "not_predicted": len(summary.not_predicted),
            "input_warnings": sum(bool(entry["input_warnings"]) for entry in summary.per_case.values()),
            "review": sum(entry["review"] for entry in summary.per_case.values()),
        },
        "written": [path.relative_to(output).as_posix() for path in summary.written],
        "skipped": [path.relative_to(output).as_posix() for path in summary.skipped],
        "failed": [{"case": f.identifier, "files": list(f.files), "problem": f.problem} for f in summary.failed],
        "not_predicted": [
            {
                "participant_id": f"sub-{p.subject}",
                "session_id": f"ses-{p.session}" if p.session else None,
                "problem": p.problem,
            }
            for p in summary.not_predicted
        ],
        "per_case": summary.per_case,
    }


def _print_to_stderr(line: str) -> None:
    """Print one line to stderr."""
    print(line, file=sys.stderr)
