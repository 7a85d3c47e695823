"""One-file models: ``autoseg_export`` and ``autoseg_import`` as a library.

:func:`export_model` writes the trained members of one dataset into a zip whose entries have the layout of
``AUTOSEG_RESULTS/<dataset>/``, so that installing it is a plain extraction:

``manifest.json``
    ``format`` (:data:`MANIFEST_FORMAT`), ``autoseg_version``, ``created`` (UTC, ISO 8601), ``dataset``, ``members``
    (``configuration/trainer``), ``folds`` per member, ``checkpoint`` (``final``, ``best`` or ``snapshots``),
    ``network_options`` per fold folder (``CONFIGURATION/TRAINER/fold_K``: the keyword arguments of
    ``autoseg.networks.build_network`` its network was built with, as its checkpoints record them; a model file from
    before they were recorded has none, and its trainers' built-in ones apply,
    ``autoseg.networks.factory.BUILT_IN_NETWORK_OPTIONS``) and ``files``: the SHA-256 and size in bytes of every
    other entry.
``CONFIGURATION/TRAINER/fold_K/plans.json`` and ``checkpoint_*.pth``
    each member fold's plans and the checkpoints prediction uses, re-saved weights-only: the network's state dict
    and a few plain values (trainer, configuration, fold, epoch, network options), no optimizer state, random generator states or
    training history.
``postprocessing.json``
    when ``autoseg_find_best`` tuned it for exactly the exported members; ``model_selection.json`` when the
    members came from it.
``fingerprint_summary.json``
    the dataset-wide figures the planner read from ``fingerprint.json`` (channels and intensity statistics, labels,
    the aggregate of spacings, shapes, lesions and symmetry); nothing per case: case names and per-case figures
    can identify patients.
``dataset.json``
    channel names, labels and the file ending: what a user needs to name the scans to predict.

:func:`import_model` checks a zip before anything is installed: a readable manifest of a format this autoseg reads,
every entry a file of the layout above and listed in the manifest with the right SHA-256 and size (no absolute path,
no ``..``, no link, nothing that would land outside the target folder), every member bringing its checkpoints and
every checkpoint its ``plans.json``; the sizes the zip declares against limits (:data:`MAX_JSON_BYTES`,
:data:`MAX_CHECKPOINT_BYTES`, :data:`MAX_COMPRESSION_RATIO`, the disk's free space) before anything is read; every
``plans.json`` valid (``Plans.from_json``, with its limits) and ``postprocessing.json`` too; each checkpoint's size
against the network its plans describe before it is extracted, then its tensors (read with
``torch.load(..., weights_only=True)``) against that network's names, shapes and dtypes. ``postprocessing.json``
and ``model_selection.json`` are accepted only for exactly the zip's members and never replace an installed one of
other members: a model file changes nothing of a member it does not bring. It then extracts into a locked temporary
folder beside ``AUTOSEG_RESULTS/<dataset>/`` (never more bytes than an entry declares) and renames it (or each fold
folder and file) into place, so a refused or interrupted import leaves nothing half-written; the next import removes
temporary folders a killed one left. A fold folder or file that already exists with other content is refused unless
``overwrite``; an identical install is checked as a new one would be, and reused as it is.

``autoseg_predict -m model.zip`` calls :func:`install_for_prediction`: the zip is imported into
``AUTOSEG_RESULTS`` as by ``autoseg_import`` (or an identical install found there) and predicted with its own
members, folds and checkpoints. Prediction reads nothing from ``AUTOSEG_RAW`` or ``AUTOSEG_PREPROCESSED``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from autoseg import __version__
from autoseg.errors import AutosegError, MissingFileError, UsageError
from autoseg.infer.postprocessing import MEMBER_PATTERN, read_tuned_postprocessing
from autoseg.io.checkpoints import CheckpointError, load_checkpoint, non_plain_values
from autoseg.io.files import atomic_path, check_output_file, read_json, reporting_disk_full
from autoseg.io.typed_json import to_plain
from autoseg.networks import build_network
from autoseg.networks.factory import (
    NETWORK_OPTIONS_KEY,
    WeightLayout,
    checkpoint_network_options,
    expected_weights,
    layout_bytes,
    weights_problem,
)
from autoseg.paths import (
    CHECKPOINT_CHOICES,
    FINGERPRINT_FILE,
    PLANS_FILE,
    POSTPROCESSING_FILE,
    SELECTION_FILE,
    choose_dataset,
    default_configurations,
    preprocessed_folder,
    raw_folder,
    results_folder,
    trained_member,
)
from autoseg.plan.fingerprint import Fingerprint
from autoseg.plans import Plans, PlansError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "ExportedModel",
    "InstalledModel",
    "ModelFileError",
    "export_model",
    "import_model",
    "install_for_prediction",
    "summarize_fingerprint",
]

#: The manifest's entry name, at the root of the zip.
MANIFEST_FILE = "manifest.json"
#: The manifest format this autoseg writes and the newest it reads.
MANIFEST_FORMAT = 1
FINGERPRINT_SUMMARY_FILE = "fingerprint_summary.json"
DATASET_FILE = "dataset.json"
#: Entries a model file may hold at its root, besides the manifest.
TOP_LEVEL_FILES = (POSTPROCESSING_FILE, SELECTION_FILE, FINGERPRINT_SUMMARY_FILE, DATASET_FILE)
#: ``CONFIGURATION/TRAINER/fold_K/plans.json`` or ``.../checkpoint_NAME.pth``: the only other entries.
_FOLD_ENTRY = re.compile(r"^(?P<fold>(?P<member>[\w.-]+/[\w.-]+)/fold_\w+)/(plans\.json|checkpoint_\w+\.pth)$")
_FOLDER_NAME = re.compile(r"^\w[\w.-]*$")
#: What a weights-only checkpoint keeps of a training checkpoint besides the network.
_KEPT_KEYS = ("format", "trainer", "configuration", "fold", "epoch", "stage")

# Sizes a zip may declare (``ZipInfo.file_size``), checked before any entry is read or written: a zip's sizes are
# its author's word, and a zip bomb unpacks a few kB into gigabytes.
#: A checkpoint: 1 GiB, about five times the weights of the largest network autoseg plans (a 6-stage U-Net of up to
#: 320 features holds 210 MiB in float32, a PSPNet with a ResNet-50 187 MiB). Each checkpoint is then held to the
#: size of the network its own plans describe (:data:`CHECKPOINT_OVERHEAD_BYTES` more) before it is extracted.
MAX_CHECKPOINT_BYTES = 1 << 30
#: What ``torch.save`` adds to the tensors' bytes: names, plain values and the container's records (a few hundred
#: bytes per tensor), with room to spare: 1 MiB plus 1 KiB per tensor.
CHECKPOINT_OVERHEAD_BYTES = (1 << 20, 1 << 10)
#: A JSON entry: 16 MiB (plans and post-processing take a few kB, ``model_selection.json`` tens of kB).
MAX_JSON_BYTES = 16 << 20
#: Largest ratio of declared to compressed size, for entries over 1 MiB: weights deflate about 1.1 times and JSON
#: about 10 times; only repetitive filler (a zip bomb) comes near deflate's limit of 1032.
MAX_COMPRESSION_RATIO = 100
#: An import's temporary folder beside ``AUTOSEG_RESULTS/<dataset>`` (``.<dataset>.import-<random>``) that no live
#: import holds locked and that has not changed for this long is left over from a killed import, and removed.
STALE_IMPORT_SECONDS = 60


class ModelFileError(AutosegError, ValueError):
    """A model file (zip) that cannot be installed: unreadable, of an unknown format, tampered with, unsafe, or in
    conflict with an installed model. The message names the zip and the entry."""


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_model` wrote: the zip, its manifest, and its size in bytes."""

    path: Path
    manifest: dict[str, Any]
    bytes: int


@dataclass(frozen=True)
class InstalledModel:
    """A model installed from a zip: its dataset folder, members, folds per member, checkpoint choice, and whether
    an identical install was found (nothing written)."""

    dataset: str
    folder: Path
    members: list[tuple[str, str]]
    folds: dict[tuple[str, str], list[str]]
    checkpoint: str
    reused: bool


# ---------------------------------------------------------------------------- export
def export_model(
    output: str | Path,
    dataset: str | None = None,
    configurations: Sequence[str] | None = None,
    trainers: str | Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
) -> ExportedModel:
    """Write the members of a trained dataset into one zip (see the module docstring for its entries).

    Args:
        output: the zip to write; written under a temporary name in its folder and renamed into place.
        dataset: trained dataset (name, number or folder name); None: the only trained dataset.
        configurations: configurations to export, each with every trainer of ``trainers``; None: the members in
            ``model_selection.json`` (``autoseg_find_best``), else the plans' default configuration.
        trainers: trainer folder(s); None: the only trainer of each configuration.
        folds: folds to export (``0``, ``"full"``); None: every cross-validation fold with the chosen checkpoint.
        checkpoint: ``final`` (default), ``best`` or ``snapshots``, as for ``autoseg_predict``.

    Returns:
        The zip's path, manifest and size.

    Raises:
        ValueError: see :func:`autoseg.paths.choose_dataset` and :func:`autoseg.paths.trained_member` (unknown
            configuration, trainer, fold or checkpoint; the messages list what exists).
        DiskFullError: the disk filled up; nothing is left under ``output``.
        OutputPathError: ``output`` is a folder, or its folder is a file or read-only (checked first).
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise UsageError(f"unknown checkpoint '{checkpoint}', use one of {list(CHECKPOINT_CHOICES)}")
    check_output_file(output, "model file")
    name = choose_dataset(dataset)
    folder = results_folder(name)
    pairs, selected = _export_members(name, configurations, trainers)
    files: dict[str, dict[str, Any]] = {}
    member_folds: dict[str, list[str]] = {}
    network_options: dict[str, dict[str, str | bool]] = {}
    output = Path(output)
    with (
        atomic_path(output, suffix=".zip") as temporary,
        zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive,
    ):

        def add(entry: str, data: bytes) -> None:
            archive.writestr(entry, data)
            files[entry] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

        for configuration, trainer in pairs:
            trainer, _, checkpoints = trained_member(name, configuration, trainer, folds, checkpoint)
            folds_of_member = member_folds.setdefault(f"{configuration}/{trainer}", [])
            for path in checkpoints:
                relative = path.parent.relative_to(folder).as_posix()
                if f"{relative}/plans.json" not in files:
                    add(f"{relative}/plans.json", (path.parent / PLANS_FILE).read_bytes())
                    folds_of_member.append(path.parent.name.removeprefix("fold_"))
                data, network_options[relative] = _weights_only(path, configuration, trainer)
                add(f"{relative}/{path.name}", data)
        members = list(member_folds)
        tuned = folder / POSTPROCESSING_FILE
        if tuned.is_file() and sorted(read_json(tuned).get("members", [])) == sorted(members):
            add(POSTPROCESSING_FILE, tuned.read_bytes())
        if selected:
            add(SELECTION_FILE, (folder / SELECTION_FILE).read_bytes())
        summary = _fingerprint_summary(name)
        if summary is not None:
            add(FINGERPRINT_SUMMARY_FILE, _json_bytes(summary))
        first = next(entry for entry in files if entry.endswith("/plans.json"))
        add(DATASET_FILE, _json_bytes(_dataset_description(name, Plans.from_json(folder / first))))
        manifest = {
            "format": MANIFEST_FORMAT,
            "autoseg_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": name,
            "members": members,
            "folds": member_folds,
            "checkpoint": checkpoint,
            NETWORK_OPTIONS_KEY: network_options,
            "files": dict(sorted(files.items())),
        }
        archive.writestr(MANIFEST_FILE, _json_bytes(manifest))  # last: it lists every other entry
    return ExportedModel(output, manifest, output.stat().st_size)


def _export_members(
    dataset: str, configurations: Sequence[str] | None, trainers: str | Sequence[str] | None
) -> tuple[list[tuple[str, str | None]], bool]:
    """The (configuration, trainer) pairs to export and whether they came from ``model_selection.json``."""
    chosen = results_folder(dataset) / SELECTION_FILE
    if configurations is None and trainers is None and chosen.is_file():
        members = read_json(chosen).get("chosen", {}).get("members", [])
        if members:
            return [tuple(member.split("/", 1)) for member in members], True
    names = list(configurations or default_configurations(dataset))
    trainer_names = [trainers] if trainers is None or isinstance(trainers, str) else list(trainers)
    return [(c, t) for c in names for t in trainer_names], False


def _weights_only(path: Path, configuration: str, trainer: str) -> tuple[bytes, dict[str, str | bool]]:
    """The checkpoint at ``path`` as a weights-only checkpoint's bytes (the network, its network options and
    :data:`_KEPT_KEYS`) and those options. Its weights are first loaded into the network prediction will build
    (``autoseg.networks.build_network`` with the options the checkpoint recorded, or its trainer's built-in ones
    for a run from before they were recorded), so a model that could not be predicted with is not exported."""
    state = load_checkpoint(path)
    options = checkpoint_network_options(state, trainer, path)
    network = build_network(Plans.from_json(path.parent / PLANS_FILE), configuration, **options)
    network.load_state_dict(state["network"])
    slim = {key: state[key] for key in _KEPT_KEYS if key in state}
    slim["network"] = state["network"]
    slim[NETWORK_OPTIONS_KEY] = options
    slim["exported"] = f"weights only, by autoseg {__version__} (autoseg_export): cannot continue training"
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    return buffer.getvalue(), options


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def summarize_fingerprint(fingerprint: Fingerprint) -> dict[str, Any]:
    """The dataset-wide parts of a ``fingerprint.json`` the planner uses, without anything per case.

    Kept: ``dataset``, ``channels`` (name, modality, foreground intensity statistics), ``labels`` and ``aggregate``
    (case count, median spacing and shapes, anisotropy, lesion statistics, orientations, symmetry counts). Left
    out: ``cases``, ``subjects`` and ``notes``, and the case names inside the aggregate (``lesion_free_cases``,
    ``symmetry.not_found``), which become counts.
    """
    aggregate = to_plain(fingerprint.aggregate)
    aggregate.pop("lesion_free_cases")
    if aggregate["symmetry"] is not None:
        aggregate["symmetry"]["not_found"] = len(aggregate["symmetry"].get("not_found", []))
    return {
        "dataset": fingerprint.dataset,
        "channels": to_plain(fingerprint.channels),
        "labels": dict(fingerprint.labels),
        "aggregate": aggregate,
        "left_out": "per-case figures, case and subject names and notes (they can identify patients)",
    }


def _fingerprint_summary(dataset: str) -> dict[str, Any] | None:
    """From ``AUTOSEG_PREPROCESSED/<dataset>/fingerprint.json``, else the summary an earlier import installed;
    None when neither exists (prediction does not need it)."""
    fingerprint = preprocessed_folder(dataset) / FINGERPRINT_FILE
    if fingerprint.is_file():
        return summarize_fingerprint(Fingerprint.from_json(fingerprint))
    installed = results_folder(dataset) / FINGERPRINT_SUMMARY_FILE
    return read_json(installed) if installed.is_file() else None


def _dataset_description(dataset: str, plans: Plans) -> dict[str, Any]:
    """Channel names and labels from the plans the model was trained with; the raw dataset's file ending."""
    description: dict[str, Any] = {
        "name": dataset,
        "channel_names": {str(i): c for i, c in enumerate(plans.channels)},
        "labels": plans.labels,
    }
    for source in (raw_folder(dataset) / "dataset.json", results_folder(dataset) / DATASET_FILE):
        if source.is_file():
            found = read_json(source)
            ending = found.get("file_ending") if isinstance(found, dict) else None
            if isinstance(ending, str) and ending:
                description["file_ending"] = ending
                break
    return description


# ---------------------------------------------------------------------------- import
@dataclass(frozen=True)
class _ModelFile:
    """A checked zip: its path, manifest, and the entries (file names) to install."""

    path: Path
    manifest: dict[str, Any]
    entries: list[str]

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])


def _check(path: Path) -> _ModelFile:
    """Read and check a model file without writing anything: manifest, entry names, links, checksums."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such model file")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _read_manifest(path, archive)
            infos = [info for info in archive.infolist() if info.filename != MANIFEST_FILE]
            names = [info.filename for info in infos]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ModelFileError(f"{path}: {twice[0]}: more than one entry of that name; refused")
            for info in infos:
                _check_entry(path, info, manifest)
                _check_size(path, info, manifest)
            files = [info.filename for info in infos if not info.is_dir()]
            missing = sorted(set(manifest["files"]) - set(files))
            if missing:
                raise ModelFileError(f"{path}: {missing[0]}: listed in the manifest but not in the zip")
            _check_layout(path, manifest, files)
            for name in files:
                _check_checksum(path, archive, name, manifest["files"][name])
    except zipfile.BadZipFile as error:
        raise ModelFileError(f"{path}: not a readable zip file ({error})") from None
    return _ModelFile(path, manifest, files)


def _read_manifest(path: Path, archive: zipfile.ZipFile) -> dict[str, Any]:
    try:
        manifest = json.loads(archive.read(MANIFEST_FILE))
    except KeyError:
        raise ModelFileError(f"{path}: no {MANIFEST_FILE}: not a model file written by autoseg_export") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: not readable JSON ({error})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: no readable format version (found {version!r})")
    if version > MANIFEST_FORMAT:
        raise ModelFileError(
            f"{path}: manifest format {version} is newer than this autoseg reads ({MANIFEST_FORMAT}); "
            f"written by autoseg {manifest.get('autoseg_version', 'unknown')}, this is {__version__}"
        )
    problems = [
        key
        for key, kind in (("dataset", str), ("members", list), ("folds", dict), ("checkpoint", str), ("files", dict))
        if not isinstance(manifest.get(key), kind)
    ]
    if not isinstance(manifest.get(NETWORK_OPTIONS_KEY, {}), dict):  # absent from model files before it was recorded
        problems.append(NETWORK_OPTIONS_KEY)
    if problems:
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: missing or malformed {', '.join(problems)}")
    odd = [m for m in manifest["members"] if not isinstance(m, str) or not MEMBER_PATTERN.match(m)]
    if odd or not manifest["members"]:
        raise ModelFileError(
            f"{path}: {MANIFEST_FILE}: members must be configuration/trainer names, found {odd or 'none'}"
        )
    if not _FOLDER_NAME.match(manifest["dataset"]):
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: dataset '{manifest['dataset']}' is not a plain folder name")
    if manifest["checkpoint"] not in CHECKPOINT_CHOICES:
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: unknown checkpoint '{manifest['checkpoint']}'")
    return manifest


def _check_entry(path: Path, info: zipfile.ZipInfo, manifest: dict[str, Any]) -> None:
    """Refuse an entry that is a link, could land outside the target folder, or is not part of an autoseg model."""
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise ModelFileError(f"{path}: {name}: absolute or Windows path; refused")
    if ".." in parts:
        raise ModelFileError(f"{path}: {name}: path escapes the target folder ('..'); refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ModelFileError(f"{path}: {name}: a symbolic link; refused")
    target = Path("/target")
    if not (target / name).resolve().is_relative_to(target):
        raise ModelFileError(f"{path}: {name}: path escapes the target folder; refused")
    if info.is_dir():
        return
    match = _FOLD_ENTRY.match(name)
    if name not in TOP_LEVEL_FILES and not match:
        raise ModelFileError(
            f"{path}: {name}: not part of an autoseg model (plans, checkpoints and the files "
            f"{', '.join(TOP_LEVEL_FILES)}); refused"
        )
    if match and match.group("member") not in manifest["members"]:
        raise ModelFileError(f"{path}: {name}: not in a member the manifest lists ({', '.join(manifest['members'])})")
    if name not in manifest["files"]:
        raise ModelFileError(f"{path}: {name}: not listed in the manifest; refused")


def _check_size(path: Path, info: zipfile.ZipInfo, manifest: dict[str, Any]) -> None:
    """Refuse an entry whose declared size exceeds its kind's limit (:data:`MAX_CHECKPOINT_BYTES`,
    :data:`MAX_JSON_BYTES`), differs from the manifest's, or that would unpack more than
    :data:`MAX_COMPRESSION_RATIO` times its compressed size; nothing is decompressed for this."""
    if info.is_dir():
        return
    name, declared = info.filename, info.file_size
    checkpoint = name.endswith(".pth")
    limit = MAX_CHECKPOINT_BYTES if checkpoint else MAX_JSON_BYTES
    if declared > limit:
        what = "a checkpoint (5 times the largest network autoseg plans)" if checkpoint else "a JSON entry"
        raise ModelFileError(
            f"{path}: {name}: unpacks to {declared:,} bytes, more than {what} may ({limit:,}); refused"
        )
    listed = manifest["files"][name]
    if not isinstance(listed, dict) or listed.get("bytes") != declared:
        raise ModelFileError(
            f"{path}: {name}: the zip declares {declared:,} bytes, the manifest "
            f"{listed.get('bytes') if isinstance(listed, dict) else None}; refused"
        )
    if declared > 1 << 20 and declared > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise ModelFileError(
            f"{path}: {name}: {info.compress_size:,} compressed bytes unpack to {declared:,}, more than "
            f"{MAX_COMPRESSION_RATIO} times (weights compress about 1.1 times): a zip bomb; refused"
        )


def _check_layout(path: Path, manifest: dict[str, Any], files: Sequence[str]) -> None:
    """Every member the manifest names brings at least one checkpoint, every fold with a checkpoint its
    ``plans.json``, and the manifest's folds are those in the zip: so a model file cannot claim a member (and
    with it post-processing or a model selection) whose weights it does not bring."""
    folds: dict[str, set[str]] = {}
    planned = set()
    for name in files:
        if match := _FOLD_ENTRY.match(name):
            if name.endswith(".pth"):
                fold = match.group("fold").rsplit("/", 1)[-1].removeprefix("fold_")
                folds.setdefault(match.group("member"), set()).add(fold)
            else:
                planned.add(match.group("fold"))
    for member in manifest["members"]:
        if member not in folds:
            raise ModelFileError(f"{path}: {MANIFEST_FILE}: member {member} has no checkpoint in the zip; refused")
        listed = manifest["folds"].get(member)
        if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(folds[member]):
            raise ModelFileError(
                f"{path}: {MANIFEST_FILE}: folds of {member} are listed as {listed}, the zip holds "
                f"{sorted(folds[member])}; refused"
            )
        unplanned = sorted(f"{member}/fold_{fold}" for fold in folds[member] if f"{member}/fold_{fold}" not in planned)
        if unplanned:
            raise ModelFileError(f"{path}: {unplanned[0]}: a checkpoint without its plans.json; refused")
    weightless = sorted(planned - {f"{m}/fold_{fold}" for m, found in folds.items() for fold in found})
    if weightless:
        raise ModelFileError(f"{path}: {weightless[0]}/{PLANS_FILE}: a plans.json without a checkpoint; refused")


def _check_checksum(path: Path, archive: zipfile.ZipFile, name: str, expected: Any) -> None:
    digest, size = hashlib.sha256(), 0
    with archive.open(name) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    if not isinstance(expected, dict) or digest.hexdigest() != expected.get("sha256") or size != expected.get("bytes"):
        raise ModelFileError(
            f"{path}: {name}: SHA-256 or size differs from the manifest: the file was changed or is damaged; refused"
        )


def import_model(archive: str | Path, overwrite: bool = False) -> InstalledModel:
    """Check a model file and install it into ``AUTOSEG_RESULTS/<dataset>/`` (see the module docstring).

    Before anything is written, the zip's declared sizes and compression ratios are checked against limits
    (:data:`MAX_CHECKPOINT_BYTES`, :data:`MAX_JSON_BYTES`, :data:`MAX_COMPRESSION_RATIO`) and the free space of the
    destination; entries are then extracted with a hard cap at their declared size, plans and post-processing
    validated, each checkpoint's size held to the network its plans describe and its tensors' names, shapes and
    dtypes compared with that network's (built on the meta device: nothing allocated). ``postprocessing.json`` and
    ``model_selection.json`` must concern exactly the zip's members and may not replace an installed one of other
    members. Temporary folders that killed imports left beside the dataset folder are removed first.

    Args:
        archive: the zip written by :func:`export_model`.
        overwrite: replace fold folders and files that exist with other content (a whole fold folder is
            replaced, with its logs and validation outputs). Default False: refuse.

    Returns:
        What was installed, or the identical install found (``reused``; it is checked as a new one would be).

    Raises:
        FileNotFoundError: no file at ``archive``.
        ModelFileError: nothing was written, because the zip is unreadable, has no manifest or one of a newer
            format, has an entry that is a link, absolute, holds ``..`` or is not part of a model, is not listed in
            the manifest or has another SHA-256 or size, declares more bytes than its limit or the disk's free
            space; a checkpoint holds pickled objects, no network, or weights that do not fit the network its plans
            describe; a ``plans.json`` or ``postprocessing.json`` is invalid; a post-processing or model selection
            concerns other members; ``AUTOSEG_RESULTS`` is not a writable folder; or an installed fold folder or
            file differs and ``overwrite`` is False. The message names the zip and the entry.
        DiskFullError: the disk filled up while extracting; nothing is left behind.
    """
    model = _check(Path(archive))
    target = results_folder(model.dataset)
    _prepare_destination(model, target.parent)
    different = [entry for entry in model.entries if not _same_file(target / entry, model.manifest["files"][entry])]
    if not different:
        _check_contents(model, target, target, extract=None)  # the same bytes as the zip's
        return _installed(model, target, reused=True)
    conflicts = _conflicts(model, target, different)
    if conflicts and not overwrite:
        raise ModelFileError(
            f"{model.path}: already installed in {target} with other content: "
            f"{', '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''} "
            f"({len(conflicts)} conflict(s)); replace them with autoseg_import --overwrite, or, where "
            "the trained model is already here, predict with it (-d) instead of -m"
        )
    _check_free_space(model, target.parent)
    with _staging_folder(model, target.parent) as staging, reporting_disk_full(target):
        _check_contents(model, staging, target, extract=lambda entries: _extract(model, staging, entries))
        _move_into_place(model, staging, target)
    return _installed(model, target, reused=False)


def install_for_prediction(archive: str | Path) -> InstalledModel:
    """``autoseg_predict -m``: install the model file into ``AUTOSEG_RESULTS`` like :func:`import_model` (without
    ``overwrite``), or find the identical install there, and say what to predict with.

    Raises:
        FileNotFoundError, ModelFileError: see :func:`import_model`.
    """
    return import_model(archive, overwrite=False)


def _same_file(path: Path, expected: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != expected["bytes"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == expected["sha256"]


def _conflicts(model: _ModelFile, target: Path, different: Sequence[str]) -> list[str]:
    """Installed fold folders and top-level files that the import would replace with other content."""
    conflicts = []
    for entry in different:
        match = _FOLD_ENTRY.match(entry)
        existing = target / (match.group("fold") if match else entry)
        name = existing.relative_to(target).as_posix()
        if existing.exists() and name not in conflicts:
            conflicts.append(name)
    return conflicts


def _prepare_destination(model: _ModelFile, root: Path) -> None:
    """Make ``AUTOSEG_RESULTS`` (``root``) if needed, refuse it when it is not a writable folder, and remove the
    temporary folders killed imports left there."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as error:
        raise ModelFileError(
            f"{model.path}: cannot install into AUTOSEG_RESULTS={root}: not a writable folder "
            f"({error.strerror or error}); set AUTOSEG_RESULTS (or AUTOSEG_HOME) to one"
        ) from None
    _remove_stale_imports(root)


def _check_free_space(model: _ModelFile, root: Path) -> None:
    """Refuse a zip that declares more bytes than the disk of ``root`` has free."""
    needed = sum(int(model.manifest["files"][entry]["bytes"]) for entry in model.entries)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise ModelFileError(
            f"{model.path}: unpacks to {needed:,} bytes, but only {free:,} are free under {root}; nothing was written"
        )


def _remove_stale_imports(root: Path) -> list[Path]:
    """Remove the temporary folders (``.<dataset>.import-*``) of killed imports under ``root``: those no live import
    holds locked (:func:`_staging_folder`) and in which nothing changed for :data:`STALE_IMPORT_SECONDS` (an import
    of an older autoseg held no lock). Returns them."""
    removed = []
    for folder in sorted(root.glob(".*.import-*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            newest = max([folder.lstat().st_mtime, *(p.lstat().st_mtime for p in folder.rglob("*"))])
            if time.time() - newest < STALE_IMPORT_SECONDS:
                continue
            with _locked(folder, blocking=False):
                shutil.rmtree(folder)
        except OSError:  # a live import holds it, another import removed it meanwhile, or it cannot be removed
            continue
        removed.append(folder)
    return removed


@contextmanager
def _locked(folder: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (released when the process ends, however it ends).

    Raises:
        BlockingIOError: ``blocking`` is False and another process holds the lock.
    """
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield
    finally:
        os.close(handle)


@contextmanager
def _staging_folder(model: _ModelFile, root: Path) -> Iterator[Path]:
    """A locked temporary folder ``.<dataset>.import-<random>`` in ``root``, removed afterwards (what was moved
    into place out of it stays)."""
    with reporting_disk_full(root / model.dataset):
        staging = Path(tempfile.mkdtemp(prefix=f".{model.dataset}.import-", dir=root))
    try:
        with _locked(staging):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(model: _ModelFile, staging: Path, entries: Sequence[str]) -> None:
    """Extract ``entries`` into ``staging``, never more bytes than each declares, and check their checksums again
    as written."""
    with zipfile.ZipFile(model.path) as archive:
        for entry in entries:
            expected = model.manifest["files"][entry]
            destination = staging / entry
            destination.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(entry) as source, open(destination, "wb") as handle:
                while chunk := source.read(min(1 << 20, expected["bytes"] - written + 1)):
                    written += len(chunk)
                    if written > expected["bytes"]:
                        raise ModelFileError(f"{model.path}: {entry}: unpacks to more than it declares; refused")
                    handle.write(chunk)
            if not _same_file(destination, expected):
                raise ModelFileError(f"{model.path}: {entry}: changed while it was read; refused")


def _check_contents(model: _ModelFile, folder: Path, target: Path, extract: Callable[[list[str]], None] | None) -> None:
    """Check what the zip installs, as it lies in ``folder`` (the staging folder; or, for an identical install, the
    dataset folder): plans, post-processing and model selection first, then every checkpoint's declared size
    against the network its plans describe, before it is extracted (``extract``, None when the entries are in
    ``folder`` already), then its tensors."""
    checkpoints = [entry for entry in model.entries if entry.endswith(".pth")]
    if extract is not None:
        extract([entry for entry in model.entries if entry not in checkpoints])
    _check_dataset_files(model, folder, target)
    layouts = {}
    for entry in checkpoints:
        fold = _FOLD_ENTRY.match(entry).group("fold")
        if fold not in layouts:
            layouts[fold] = _network_layout(model, folder, fold)
        layout = layouts[fold][1]
        base, per_tensor = CHECKPOINT_OVERHEAD_BYTES
        limit = layout_bytes(layout) + base + per_tensor * len(layout)
        declared = model.manifest["files"][entry]["bytes"]
        if declared > limit:
            raise ModelFileError(
                f"{model.path}: {entry}: {declared:,} bytes, more than the network its plans describe can hold "
                f"({limit:,} with the checkpoint's own records); refused"
            )
    if extract is not None:
        extract(checkpoints)
    for entry in checkpoints:
        _check_checkpoint(model.path, entry, folder / entry, *layouts[_FOLD_ENTRY.match(entry).group("fold")])


def _network_layout(model: _ModelFile, folder: Path, fold: str) -> tuple[dict[str, str | bool], WeightLayout]:
    """The network options of ``fold`` (the manifest's record; for a model file from before it recorded them, the
    trainer's built-in ones, ``autoseg.networks.factory.checkpoint_network_options``) and the weights the network
    they and ``fold``'s plans describe holds (names, shapes, dtypes), built on the meta device; refuses invalid
    plans or options and a network that cannot be built from them."""
    entry = f"{fold}/{PLANS_FILE}"
    configuration, trainer = fold.split("/")[:2]
    try:
        plans = Plans.from_json(folder / entry)
    except (PlansError, ValueError) as error:
        raise ModelFileError(
            f"{model.path}: {entry}: invalid plans ({_one_line(error, folder / entry)}); refused"
        ) from None
    recorded = model.manifest.get(NETWORK_OPTIONS_KEY, {})
    try:
        record = {NETWORK_OPTIONS_KEY: recorded[fold]} if fold in recorded else {}
        options = checkpoint_network_options(record, trainer, MANIFEST_FILE)
        return options, expected_weights(plans, configuration, **options)
    except (AutosegError, ValueError, KeyError) as error:
        raise ModelFileError(
            f"{model.path}: {entry}: no network can be built for {configuration} with {trainer} "
            f"({_one_line(error, folder / entry)}); refused"
        ) from None


def _check_dataset_files(model: _ModelFile, folder: Path, target: Path) -> None:
    """``postprocessing.json`` and ``model_selection.json`` may come only for exactly the zip's members (the
    manifest's, each of which brings its checkpoints), and may not replace an installed one that concerns other
    members, nor, where there is none, make the zip's members the dataset's default beside members already trained
    there (``autoseg_predict -d`` predicts with the members these files name): a model file changes nothing of
    another member."""
    members = sorted(model.manifest["members"])
    others = [member for member in _trained_members(target) if member not in members]
    for name in (POSTPROCESSING_FILE, SELECTION_FILE):
        if name not in model.entries:
            continue
        theirs = _members_of(model, folder / name, name)
        if theirs != members:
            raise ModelFileError(
                f"{model.path}: {name}: concerns {theirs}, not the members this file brings ({members}); refused: a "
                "model file may bring post-processing and model selection only for its own members"
            )
        installed = target / name
        if not installed.exists() and others:
            raise ModelFileError(
                f"{model.path}: {name}: would make {members} the default members of {target.name}, beside its own "
                f"trained members {others}; refused: import into another AUTOSEG_RESULTS, or run autoseg_find_best "
                "there first"
            )
        if installed.is_file() and not _same_file(installed, model.manifest["files"][name]):
            try:
                others = _members_of(model, installed, name)
            except ModelFileError:
                others = None
            if others != members:
                raise ModelFileError(
                    f"{model.path}: {name}: would replace {installed}, which concerns {others or 'unreadable'} "
                    "(not this file's members); refused: import into another AUTOSEG_RESULTS, or move that file away"
                )


def _trained_members(folder: Path) -> list[str]:
    """The ``configuration/trainer`` members with at least one checkpoint under a dataset's results ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(
        f"{configuration.name}/{trainer.name}"
        for configuration in folder.iterdir()
        if configuration.is_dir()
        for trainer in configuration.iterdir()
        if trainer.is_dir() and any(trainer.glob("fold_*/checkpoint_*.pth"))
    )


def _members_of(model: _ModelFile, path: Path, name: str) -> list[str]:
    """The sorted members a ``postprocessing.json`` or ``model_selection.json`` concerns (for the latter its chosen
    members, which must be those of its own post-processing)."""
    try:
        if name == POSTPROCESSING_FILE:
            return sorted(read_tuned_postprocessing(path).members)
        selection = read_json(path)
        chosen = selection.get("chosen", {}).get("members") if isinstance(selection, dict) else None
        tuned = selection.get("postprocessing", {}).get("members") if isinstance(selection, dict) else None
    except (AutosegError, ValueError, AttributeError) as error:
        raise ModelFileError(f"{model.path}: {name}: {_one_line(error, path)}; refused") from None
    if not isinstance(chosen, list) or not all(isinstance(m, str) for m in chosen) or tuned != chosen:
        raise ModelFileError(
            f"{model.path}: {name}: chosen.members and postprocessing.members must be the same list of "
            f"configuration/trainer names, got {chosen!r} and {tuned!r}; refused"
        )
    return sorted(chosen)


def _check_checkpoint(
    path: Path, entry: str, extracted: Path, options: dict[str, str | bool], layout: WeightLayout
) -> None:
    """Refuse a checkpoint that holds pickled objects (read with ``weights_only=True``), no network weights, network
    options other than the manifest's ``options`` (prediction builds the network from the checkpoint's), or weights
    that do not fit the network its plans describe (``layout``: names, shapes, dtypes)."""
    try:
        state = load_checkpoint(extracted)
    except CheckpointError as error:
        raise ModelFileError(f"{path}: {entry}: {_without_path(error, extracted)}") from None
    network = state.get("network") if isinstance(state, dict) else None
    if not isinstance(network, dict) or not network or non_plain_values(network):
        raise ModelFileError(f"{path}: {entry}: no network weights (a dict of tensors under 'network'); refused")
    try:
        own = checkpoint_network_options(state, entry.split("/")[1], entry)
    except AutosegError as error:
        raise ModelFileError(f"{path}: {error}; refused") from None
    if own != options:
        raise ModelFileError(f"{path}: {entry}: builds its network with {own}, the manifest with {options}; refused")
    problem = weights_problem(layout, network)
    if problem:
        raise ModelFileError(
            f"{path}: {entry}: the weights do not fit the network its plans describe: {problem}; refused"
        )


def _one_line(error: Exception, path: Path) -> str:
    """The error's message without the leading ``path: ``, its lines joined with ``; ``."""
    lines = [line.strip() for line in _without_path(error, path).splitlines() if line.strip()]
    return "; ".join(lines[1:] if lines[:1] == ["invalid plans:"] else lines)


def _without_path(error: Exception, path: Path) -> str:
    return str(error).removeprefix(f"{path}: ")


def _move_into_place(model: _ModelFile, staging: Path, target: Path) -> None:
    """Rename the staged dataset folder into place, or, when it exists, each fold folder and top-level file."""
    if not target.exists():
        os.replace(staging, target)
        return
    folds = sorted({m.group("fold") for entry in model.entries if (m := _FOLD_ENTRY.match(entry))})
    for fold in folds:
        destination = target / fold
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            old = staging / ".replaced" / fold
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(destination, old)  # removed with the staging folder
        os.replace(staging / fold, destination)
    for entry in model.entries:
        if entry in TOP_LEVEL_FILES:
            os.replace(staging / entry, target / entry)


def _installed(model: _ModelFile, target: Path, reused: bool) -> InstalledModel:
    members = [tuple(member.split("/", 1)) for member in model.manifest["members"]]
    folds = {pair: [str(f) for f in model.manifest["folds"].get("/".join(pair), [])] for pair in members}
    return InstalledModel(model.dataset, target, members, folds, model.manifest["checkpoint"], reused)
