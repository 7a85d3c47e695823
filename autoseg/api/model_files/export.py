"""``autoseg_export``: the trained members of one dataset into one zip (:func:`export_model`; the entries:
:mod:`autoseg.api.model_files`)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from autoseg import __version__
from autoseg.api.model_files.layout import (
    DATASET_FILE,
    FINGERPRINT_SUMMARY_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    ExportedModel,
    json_bytes,
)
from autoseg.errors import UsageError
from autoseg.io.checkpoints import load_checkpoint
from autoseg.io.files import atomic_path, check_output_file, read_json
from autoseg.io.images import remove_stale_temporaries
from autoseg.io.typed_json import to_plain
from autoseg.networks import build_network
from autoseg.networks.factory import NETWORK_OPTIONS_KEY, checkpoint_network_options
from autoseg.paths import (
    CHECKPOINT_CHOICES,
    FINGERPRINT_FILE,
    PLANS_FILE,
    POSTPROCESSING_FILE,
    QC_CALIBRATION_FILE,
    SELECTION_FILE,
    choose_dataset,
    default_configurations,
    preprocessed_folder,
    raw_folder,
    results_folder,
    trained_member,
)
from autoseg.plan.fingerprint import Fingerprint, training_ranges
from autoseg.plans import Plans

__all__ = ["ExportedModel", "export_model", "summarize_fingerprint"]


#: What a weights-only checkpoint keeps of a training checkpoint besides the network.
_KEPT_KEYS = ("format", "trainer", "configuration", "fold", "epoch", "stage")


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
    pairs, selected = _export_members(name, configurations, trainers)
    output = Path(output)
    remove_stale_temporaries(output)  # what a killed export of this file left beside it
    with (
        atomic_path(output, suffix=".zip") as temporary,
        zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive,
    ):
        entries = _Entries(archive)
        member_folds, network_options = _add_members(entries, name, pairs, folds, checkpoint)
        _add_dataset_files(entries, name, list(member_folds), selected)
        manifest = {
            "format": MANIFEST_FORMAT,
            "autoseg_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": name,
            "members": list(member_folds),
            "folds": member_folds,
            "checkpoint": checkpoint,
            NETWORK_OPTIONS_KEY: network_options,
            "files": dict(sorted(entries.files.items())),
        }
        archive.writestr(MANIFEST_FILE, json_bytes(manifest))  # last: it lists every other entry
    return ExportedModel(output, manifest, output.stat().st_size)


class _Entries:
    """The entries written to the zip so far, each with the SHA-256 and size in bytes the manifest lists."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        self.files: dict[str, dict[str, Any]] = {}

    def add(self, entry: str, data: bytes) -> None:
        self.archive.writestr(entry, data)
        self.files[entry] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _add_members(
    entries: _Entries,
    dataset: str,
    pairs: Sequence[tuple[str, str | None]],
    folds: Sequence[int | str] | None,
    checkpoint: str,
) -> tuple[dict[str, list[str]], dict[str, dict[str, str | bool]]]:
    """Add each member's fold folders: ``plans.json`` and the chosen checkpoints, weights only. Returns the folds
    per ``configuration/trainer`` member and the network options per fold folder."""
    folder = results_folder(dataset)
    member_folds: dict[str, list[str]] = {}
    network_options: dict[str, dict[str, str | bool]] = {}
    for configuration, trainer in pairs:
        trainer, _, checkpoints = trained_member(dataset, configuration, trainer, folds, checkpoint)
        folds_of_member = member_folds.setdefault(f"{configuration}/{trainer}", [])
        for path in checkpoints:
            relative = path.parent.relative_to(folder).as_posix()
            if f"{relative}/plans.json" not in entries.files:
                entries.add(f"{relative}/plans.json", (path.parent / PLANS_FILE).read_bytes())
                folds_of_member.append(path.parent.name.removeprefix("fold_"))
            data, network_options[relative] = _weights_only(path, configuration, trainer)
            entries.add(f"{relative}/{path.name}", data)
    return member_folds, network_options


def _add_dataset_files(entries: _Entries, dataset: str, members: list[str], selected: bool) -> None:
    """Add the top-level files: the post-processing and the QC calibration tuned for exactly ``members``, the model
    selection when the members came from it, the fingerprint summary when there is one, and ``dataset.json``."""
    folder = results_folder(dataset)
    for name in (POSTPROCESSING_FILE, QC_CALIBRATION_FILE):
        tuned = folder / name
        if tuned.is_file() and sorted(read_json(tuned).get("members", [])) == sorted(members):
            entries.add(name, tuned.read_bytes())
    if selected:
        entries.add(SELECTION_FILE, (folder / SELECTION_FILE).read_bytes())
    summary = _fingerprint_summary(dataset)
    if summary is not None:
        entries.add(FINGERPRINT_SUMMARY_FILE, json_bytes(summary))
    first = next(entry for entry in entries.files if entry.endswith("/plans.json"))
    entries.add(DATASET_FILE, json_bytes(_dataset_description(dataset, Plans.from_json(folder / first))))


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


def summarize_fingerprint(fingerprint: Fingerprint) -> dict[str, Any]:
    """The dataset-wide parts of a ``fingerprint.json`` the planner uses, without anything per case.

    Kept: ``dataset``, ``channels`` (name, modality, foreground intensity statistics), ``labels`` and ``aggregate``
    (case count, median spacing and shapes, anisotropy, lesion statistics, orientations, symmetry counts). Added:
    ``training_ranges``, the (min, max) over the training cases of spacing, shape, obliqueness, foreground
    intensity percentiles per channel, lesion count and lesion volume (``autoseg.plan.fingerprint.training_ranges``),
    which ``autoseg_predict`` compares each new case with (``autoseg.api.input_checks``). Left out: ``cases``,
    ``subjects`` and ``notes``, and the case names inside the aggregate (``lesion_free_cases``,
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
        "training_ranges": to_plain(training_ranges(fingerprint)),
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
