"""Where everything lies: the three data roots and the layout under them. Nothing else builds these paths.

``AUTOSEG_RAW``, ``AUTOSEG_PREPROCESSED`` and ``AUTOSEG_RESULTS`` name the three roots (read here and nowhere
else). Any that is unset defaults to a sub-folder of one home folder: ``$AUTOSEG_HOME`` if set, else
``~/autoseg_data`` (``raw/``, ``preprocessed/``, ``results/``). Values are read on every call, never cached at
import, so tests and scripts can change them.

Under them::

    AUTOSEG_RAW/DatasetNNN_NAME/                      dataset.json, imagesTr/, labelsTr/   (autoseg.data.dataset)
    AUTOSEG_PREPROCESSED/DatasetNNN_NAME/             preprocessed_folder(): fingerprint.json, plans.json,
        splits_final.json, <data_identifier>/CASE.npy ...
    AUTOSEG_RESULTS/DatasetNNN_NAME/                  postprocessing.json, model_selection.json (autoseg_find_best)
        <configuration>/<trainer>/fold_<k>/           run_folder(): plans.json, log.txt, checkpoints, validation/

A dataset is named on the command line by its folder name, its short name or its number
(:func:`matches_dataset_name`); "what has been trained" is answered by :func:`trained_datasets`,
:func:`trained_configurations`, :func:`trainer_folders` and :func:`trained_member`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from autoseg.errors import UsageError
from autoseg.io.files import read_json
from autoseg.plans import Plans, PlansError

#: ``DatasetNNN_NAME``: a dataset folder's name, number and short name (nnU-Net v2's convention).
DATASET_FOLDER = re.compile(r"^Dataset(\d{3})_(.+)$")
FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"
#: The cross-validation folds, beside the plans (``autoseg.train.splits``).
SPLITS_FILE = "splits_final.json"
#: Written by ``autoseg_find_best`` beside the configuration folders of a dataset.
POSTPROCESSING_FILE = "postprocessing.json"
SELECTION_FILE = "model_selection.json"
#: Written by ``autoseg_find_best`` beside them: how the QC score relates to Dice for the chosen members
#: (``autoseg.infer.quality.QCCalibration``).
QC_CALIBRATION_FILE = "qc_calibration.json"
#: Written by ``autoseg_convert`` beside ``dataset.json`` when it co-registered channels: the fit of every channel moved.
COREGISTRATION_FILE = "coregistration.json"
#: ``--checkpoint`` values: ``checkpoint_best.pth``, ``checkpoint_final.pth``, or every snapshot plus final.
CHECKPOINT_CHOICES = ("best", "final", "snapshots")

_DEFAULT_SUBFOLDERS = {"AUTOSEG_RAW": "raw", "AUTOSEG_PREPROCESSED": "preprocessed", "AUTOSEG_RESULTS": "results"}


def autoseg_home() -> Path:
    """The folder holding every root that is not set explicitly.

    Raises:
        UsageError: ``AUTOSEG_HOME`` names a file, or a path below a file (:func:`_folder`).
    """
    return _folder("AUTOSEG_HOME", Path(os.environ.get("AUTOSEG_HOME", Path.home() / "autoseg_data")).expanduser())


def _root(variable: str) -> Path:
    value = os.environ.get(variable)
    if value:
        return _folder(variable, Path(value).expanduser())
    return _folder(variable, autoseg_home() / _DEFAULT_SUBFOLDERS[variable])


def _folder(variable: str, path: Path) -> Path:
    """``path`` when it is a folder or can become one (it, or its nearest existing parent, is a folder).

    Raises:
        UsageError: ``VARIABLE=PATH: ... is a file, not a folder`` (naming the file when it is a parent of ``path``),
            in one line, before any command reads or writes under it.
    """
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies below {existing}, which is a file"
        set_by = variable if variable in os.environ else f"{variable} (unset: a sub-folder of AUTOSEG_HOME)"
        raise UsageError(f"{set_by} = {path}: {where}, not a folder; set {variable} to a folder")
    return path


def raw_root() -> Path:
    """Folder of raw datasets (``AUTOSEG_RAW``)."""
    return _root("AUTOSEG_RAW")


def preprocessed_root() -> Path:
    """Folder of fingerprints, plans and preprocessed arrays (``AUTOSEG_PREPROCESSED``)."""
    return _root("AUTOSEG_PREPROCESSED")


def results_root() -> Path:
    """Folder of trained models and their logs (``AUTOSEG_RESULTS``)."""
    return _root("AUTOSEG_RESULTS")


def run_folder(dataset: str, configuration: str, trainer: str, fold: int | str) -> Path:
    """One training run's folder: ``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>``."""
    return trainer_folder(dataset, configuration, trainer) / f"fold_{fold}"


def raw_folder(dataset: str) -> Path:
    """``AUTOSEG_RAW/<dataset>``: a raw dataset folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``)."""
    return raw_root() / dataset


def results_folder(dataset: str) -> Path:
    """``AUTOSEG_RESULTS/<dataset>``: its trained configurations, ``postprocessing.json``, ``model_selection.json``."""
    return results_root() / dataset


def configuration_folder(dataset: str, configuration: str) -> Path:
    """``AUTOSEG_RESULTS/<dataset>/<configuration>``: one folder per trainer trained on it."""
    return results_folder(dataset) / configuration


def trainer_folder(dataset: str, configuration: str, trainer: str) -> Path:
    """``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>``: one ``fold_<k>`` folder per run."""
    return configuration_folder(dataset, configuration) / trainer


def preprocessed_folder(dataset: str) -> Path:
    """``AUTOSEG_PREPROCESSED/<dataset>``: fingerprint, plans, splits and preprocessed data of a dataset folder name."""
    return preprocessed_root() / dataset


def trained_datasets() -> list[str]:
    """Sorted dataset folders under ``AUTOSEG_RESULTS`` with at least one checkpoint in a fold folder."""
    root = results_root()
    if not root.is_dir():
        return []
    return sorted(
        folder.name
        for folder in root.iterdir()  # hidden: an import's temporary folder
        if folder.is_dir() and not folder.name.startswith(".") and any(folder.glob("*/*/fold_*/checkpoint_*.pth"))
    )


def choose_dataset(dataset: str | None) -> str:
    """The trained dataset's folder name for ``-d`` (``ATLAS``, ``1``, ``001`` or ``Dataset001_ATLAS``).

    Raises:
        ValueError: no trained dataset matches, ``dataset`` is None and there is not exactly one, or the name is
            ambiguous; the message lists the trained datasets.
    """
    trained = trained_datasets()
    listing = ", ".join(trained) or "none"
    if dataset is None:
        if len(trained) == 1:
            return trained[0]
        raise UsageError(
            f"name the dataset with -d: {len(trained)} trained datasets in {results_root()} "
            f"(AUTOSEG_RESULTS): {listing}"
        )
    matches = [name for name in trained if matches_dataset_name(name, dataset)]
    if len(matches) != 1:
        problem = "no trained dataset" if not matches else "more than one trained dataset"
        raise UsageError(f"{problem} matches '{dataset}' in {results_root()} (AUTOSEG_RESULTS); trained: {listing}")
    return matches[0]


def matches_dataset_name(folder: str, name: str) -> bool:
    """Whether ``name`` (``ATLAS``, ``1``, ``001`` or ``Dataset001_ATLAS``) names the dataset folder ``folder``."""
    if folder == name:
        return True
    match = DATASET_FOLDER.match(folder)
    return bool(match) and (match.group(2) == name or (name.isdigit() and int(name) == int(match.group(1))))


def trained_member(
    dataset: str,
    configuration: str,
    trainer: str | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
) -> tuple[str, list[Path], list[Path]]:
    """One trained member: its trainer folder, fold folders and checkpoint files (``--checkpoint`` ``final``,
    ``best``, or ``snapshots``: every snapshot plus final), for ``folds`` or every fold with that checkpoint.

    Raises:
        UsageError: unknown checkpoint choice, no trained configuration or trainer of that name (the message lists
            what exists), a missing fold, or no fold with the chosen checkpoint.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise UsageError(f"unknown checkpoint '{checkpoint}', use one of {list(CHECKPOINT_CHOICES)}")
    folder = results_root() / dataset / configuration
    trainers = trainer_folders(dataset, configuration)
    if not trainers:
        raise UsageError(
            f"configuration '{configuration}' of {dataset} is not trained; trained: "
            f"{', '.join(trained_configurations(dataset)) or 'none'}"
        )
    if trainer is None and len(trainers) > 1:
        raise UsageError(f"{folder}: several trainers ({', '.join(trainers)}); choose one with -tr")
    trainer = trainer or trainers[0]
    if trainer not in trainers:
        raise UsageError(f"{folder}: no trainer '{trainer}'; trained: {', '.join(trainers)}")
    fold_folders = _fold_folders(folder / trainer, folds, checkpoint)
    return trainer, fold_folders, [path for fold in fold_folders for path in _checkpoint_files(fold, checkpoint)]


def trainer_folders(dataset: str, configuration: str) -> list[str]:
    """Sorted trainer folders of one configuration that hold at least one ``fold_*`` run."""
    folder = results_root() / dataset / configuration
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("fold_*"))) if folder.is_dir() else []


def trained_configurations(dataset: str) -> list[str]:
    """Configurations of ``dataset`` with at least one checkpoint."""
    folder = results_root() / dataset
    return (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*/fold_*/checkpoint_*.pth")))
        if folder.is_dir()
        else []
    )


def _fold_folders(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    if folds:
        chosen = [folder / f"fold_{fold}" for fold in folds]
        missing = [p.name for p in chosen if not _checkpoint_files(p, checkpoint)]
        if missing:
            raise UsageError(f"{folder}: {', '.join(missing)} has no {checkpoint} checkpoint")
        return chosen
    chosen = sorted((p for p in folder.glob("fold_*") if _checkpoint_files(p, checkpoint)), key=_fold_key)
    # A model trained on every case (fold_full) joins only when asked for, or when it is the only one.
    cross_validation = [p for p in chosen if p.name.removeprefix("fold_").isdigit()]
    chosen = cross_validation or chosen
    if not chosen:
        raise UsageError(f"{folder}: no fold_<k> folder has a {checkpoint} checkpoint (try --checkpoint final)")
    return chosen


def _fold_key(path: Path) -> tuple[int, str]:
    suffix = path.name.removeprefix("fold_")
    return (0, f"{int(suffix):09d}") if suffix.isdigit() else (1, suffix)


def _checkpoint_files(fold: Path, checkpoint: str) -> list[Path]:
    if checkpoint == "snapshots":
        snapshots = sorted(
            fold.glob("checkpoint_snapshot_*.pth"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]) if p.stem.rsplit("_", 1)[1].isdigit() else 0,
        )
        final = fold / "checkpoint_final.pth"
        # The last snapshot is taken at the end of training: the final checkpoint holds the same weights.
        return snapshots or ([final] if final.is_file() else [])
    path = fold / f"checkpoint_{checkpoint}.pth"
    return [path] if path.is_file() else []


def default_configurations(dataset: str) -> list[str]:
    """The configurations to predict with when none is named: those ``postprocessing.json`` was tuned for, else the
    only trained one, else the plans' default.

    Raises:
        PlansError: none of these applies; the message lists the trained configurations.
    """
    trained = trained_configurations(dataset)
    path = results_root() / dataset / POSTPROCESSING_FILE
    if path.is_file():
        chosen = list(read_json(path).get("configurations", []))
        if chosen and set(chosen) <= set(trained):
            return chosen
    if len(trained) == 1:
        return trained
    plans_files = sorted((results_root() / dataset).glob("*/*/fold_*/plans.json"))
    if plans_files:
        default = Plans.from_json(plans_files[0]).default_configuration
        if default in trained:
            return [default]
    raise PlansError(f"{dataset}: choose configurations with -c; trained: {', '.join(trained) or 'none'}")
