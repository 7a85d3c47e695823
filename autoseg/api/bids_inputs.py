"""Finding the cases of a BIDS dataset for ``autoseg_predict --bids`` (pybids), and where each case's derivatives go.

A BIDS dataset is read with pybids (``bids.BIDSLayout``, validated: files whose names are not valid BIDS are left
out, as every BIDS App does, unless ``validate`` is False). Its images are grouped into cases by subject and session
(:func:`find_bids_cases`). Each of the model's channels is found by its BIDS suffix (:func:`channel_suffixes`:
``T1``/``T1w`` -> ``T1w``, ``FLAIR`` -> ``FLAIR``, ``DWI`` -> ``dwi``, ``ADC`` -> ``ADC``, ...; any other name is
taken as the suffix itself), and a filter file can set any entity per channel (:func:`read_filter_file`).

A case's derivatives are named after its source entities (:class:`BidsCase`): those of the channel files (all
channels alike) that come before ``space`` in the BIDS entity order (``sub``, ``ses``, ``acq``, ``ce``, ``rec``,
``run``, ...), followed by :data:`MASK_ENTITIES` (BIDS 1.10, "Imaging data types: Masks"), in the first channel's
datatype folder (``anat``, ``dwi``).

A subject (or session) that cannot be predicted, because a channel's image is missing, several images match one
channel of a multi-channel model, or its files are not valid BIDS, gets one line naming it and the problem
(:class:`NotPredicted`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import AutosegError, InvalidFileError, MissingFileError, UsageError
from autoseg.io.files import read_json
from autoseg.io.headers import split_ending

__all__ = [
    "CHANNEL_SUFFIXES",
    "MASK_ENTITIES",
    "PROBSEG_ENTITIES",
    "UNCERTAINTY_ENTITIES",
    "BidsCase",
    "BidsDatasetError",
    "BidsSelection",
    "NotPredicted",
    "bids_layout",
    "channel_suffixes",
    "find_bids_cases",
    "parse_filter",
    "participant_labels",
    "read_filter_file",
]

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
#: Entities of every mask and of every probability map (``space-orig``: on the source image's own grid).
MASK_ENTITIES = "space-orig_desc-lesion_mask"
PROBSEG_ENTITIES = "space-orig_label-L_probseg"
#: BIDS has no suffix for an uncertainty map: it keeps the entities of its mask, and ``.bidsignore`` lists it.
UNCERTAINTY_ENTITIES = "space-orig_desc-lesion_uncertainty"
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
