"""The trained models ``autoseg_predict`` ensembles: which members (:class:`ModelChoice`), what they are
(:func:`describe_model`, without loading weights), and their networks loaded (:func:`load_model`,
:func:`load_members`), with the post-processing and QC calibration tuned for exactly those members.

A model is ``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>/`` as training leaves it: the plans the
run was trained with (``plans.json``) and its checkpoints. The members are chosen in this order: a model file's own
(``-m``, installed first: :func:`install_model_file`); else the configurations (``-c``) times trainers (``-tr``)
named; else the configuration/trainer members ``autoseg_find_best`` chose; else the only trained configuration (or
the plans' default) with its only trainer; the folds are ``-f`` or every ``fold_<k>`` with the chosen checkpoint.
Each network is rebuilt from the run folder's ``plans.json`` and the network options its checkpoint recorded
(``autoseg.networks.factory.checkpoint_network_options``; no trainer class is needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoseg.api.model_files import InstalledModel, install_for_prediction
from autoseg.errors import InvalidFileError, UsageError
from autoseg.infer.postprocessing import read_tuned_postprocessing
from autoseg.infer.quality import QCCalibration
from autoseg.io.checkpoints import load_checkpoint
from autoseg.io.files import read_json
from autoseg.networks import build_network
from autoseg.networks.factory import checkpoint_network_options, expected_weights, weights_problem
from autoseg.paths import (
    PLANS_FILE,
    POSTPROCESSING_FILE,
    QC_CALIBRATION_FILE,
    choose_dataset,
    default_configurations,
    results_folder,
    trained_member,
    trainer_folder,
)
from autoseg.plans import Plans

__all__ = [
    "Model",
    "ModelChoice",
    "ModelDescription",
    "calibration_for",
    "describe_model",
    "install_model_file",
    "load_members",
    "load_model",
    "postprocessing_for",
]


@dataclass
class Model:
    """The trained members of one configuration: plans, configuration name, trainer, checkpoint files, networks."""

    plans: Plans
    configuration: str
    trainer: str
    checkpoints: list[Path]
    networks: list[nn.Module]


def load_model(
    dataset: str,
    configuration: str,
    trainer: str | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
    device: torch.device | str = "cpu",
) -> Model:
    """Rebuild and load the networks of one configuration (every fold or ``folds``) on ``device``.

    Raises:
        ValueError: unknown checkpoint choice, no trained configuration or trainer of that name (the message
            lists what exists), a missing fold, or no fold with the chosen checkpoint.
        InvalidFileError: a checkpoint's weights do not fit the network its plans and recorded network options
            describe (names, shapes, dtypes), or its network options are malformed.
    """
    trainer, fold_folders, checkpoints = trained_member(dataset, configuration, trainer, folds, checkpoint)
    plans = Plans.from_json(fold_folders[0] / PLANS_FILE)
    networks = []
    for path in checkpoints:
        state = load_checkpoint(path, map_location="cpu")
        # e.g. the acute recipe's asymmetric U-Net from the same plan, as the run recorded it
        options = checkpoint_network_options(state, trainer, path)
        weights = state.get("network")
        problem = weights_problem(expected_weights(plans, configuration, **options), weights)
        if problem:
            raise InvalidFileError(
                f"{path}: the weights do not fit the network of {fold_folders[0] / PLANS_FILE}: {problem}"
            )
        network = build_network(plans, configuration, **options)
        network.load_state_dict(weights)
        networks.append(network.to(device).eval())
    return Model(plans, configuration, trainer, checkpoints, networks)


def tuned_members(dataset: str) -> list[tuple[str, str | None]] | None:
    """The (configuration, trainer) members ``autoseg_find_best`` chose, when they are all trained; else None."""
    path = results_folder(dataset) / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    pairs = [tuple(member.split("/", 1)) for member in read_tuned_postprocessing(path).members]
    trained = all((trainer_folder(dataset, c, t)).is_dir() for c, t in pairs)
    return pairs if trained else None


def postprocessing_for(dataset: str, models: Sequence[Model]) -> tuple[float, float, str]:
    """Threshold, minimum lesion size in mm³ and where they come from: ``postprocessing.json`` when it was tuned
    for exactly these members (configuration/trainer pairs), else the plans of the first model."""
    path = results_folder(dataset) / POSTPROCESSING_FILE
    members = sorted(f"{model.configuration}/{model.trainer}" for model in models)
    if path.is_file():
        tuned = read_tuned_postprocessing(path)
        if sorted(tuned.members) == members:
            return tuned.settings.threshold, tuned.settings.min_lesion_mm3, str(path)
    settings = models[0].plans.configuration(models[0].configuration).postprocessing
    return settings.threshold, settings.min_lesion_mm3, f"plans of {models[0].configuration}"


@dataclass(frozen=True)
class ModelChoice:
    """Which trained members :func:`autoseg.api.predict.predict` ensembles (``-d``, ``-c``, ``-tr``, ``-f``, ``-m``).

    Args:
        dataset: trained dataset (name, number or folder name); None: the only trained dataset.
        configurations: configurations to ensemble; None: the tuned choice, the only one, or the plans' default.
        trainers: trainer folder, or several to ensemble across trainers (e.g. a focal and a cross-entropy
            variant); None: the only one of each configuration.
        folds: folds to ensemble (``0``, ``"full"``); None: every cross-validation fold with the chosen
            checkpoint (``fold_full`` only when there is no other).
        model_file: a model file from ``autoseg_export``: installed into ``AUTOSEG_RESULTS`` first (or its identical
            install reused, :func:`autoseg.api.model_files.install_for_prediction`) and predicted with its own members,
            folds and checkpoints; ``dataset``, ``configurations``, ``trainers`` and ``folds`` must then be None.
    """

    dataset: str | None = None
    configurations: Sequence[str] | None = None
    trainers: str | Sequence[str] | None = None
    folds: Sequence[int | str] | None = None
    model_file: str | Path | None = None


def load_members(
    dataset: str, installed: InstalledModel | None, choice: ModelChoice, checkpoint: str, device: torch.device
) -> list[Model]:
    """The members to ensemble, loaded on ``device``: a model file's own members, folds and checkpoints; else the
    chosen configurations times trainers; else what ``autoseg_find_best`` chose; else the default configuration.

    Raises:
        UsageError: see :func:`load_model`; members that take different numbers of channels, or that were trained
            with and without channel co-registration.
    """
    members, checkpoint = _members(dataset, installed, choice, checkpoint)
    models = [load_model(dataset, c, t, folds, checkpoint, device) for c, t, folds in members]
    channels = {len(model.plans.channels) for model in models}
    if len(channels) != 1:
        names = list(dict.fromkeys(c for c, _, _ in members))
        raise UsageError(f"configurations {names} expect different numbers of channels: {sorted(channels)}")
    coregistered = sorted({f"{m.configuration}/{m.trainer}" for m in models if m.plans.coregister_channels})
    if coregistered and len(coregistered) < len({(m.configuration, m.trainer) for m in models}):
        raise UsageError(
            f"members {coregistered} were trained with channel co-registration (coregister_channels in their "
            "plans.json), the others without; choose members that read their channels alike"
        )
    return models


def _members(
    dataset: str, installed: InstalledModel | None, choice: ModelChoice, checkpoint: str
) -> tuple[list[tuple[str, str | None, Sequence[int | str] | None]], str]:
    """(configuration, trainer, folds) of each member to ensemble and the checkpoint choice: a model file's own;
    else the chosen configurations times trainers; else what ``autoseg_find_best`` chose; else the default
    configuration (a trainer or folds of None: the only trainer, every fold)."""
    configurations, trainer, folds = choice.configurations, choice.trainers, choice.folds
    pairs = tuned_members(dataset) if configurations is None and trainer is None else None
    if installed:
        pairs, checkpoint = installed.members, installed.checkpoint
    if pairs is None:
        names = list(configurations or default_configurations(dataset))
        trainers = [trainer] if trainer is None or isinstance(trainer, str) else list(trainer)
        pairs = [(c, t) for c in names for t in trainers]
    member_folds = installed.folds if installed else {}
    return [(c, t, member_folds.get((c, t), folds)) for c, t in pairs], checkpoint


@dataclass(frozen=True)
class ModelDescription:
    """What :func:`autoseg.api.predict.predict` would predict with, read from the run folders without loading any weights.

    Attributes:
        dataset: the trained dataset's folder name.
        members: ``configuration/trainer`` of each member, in ensembling order.
        folds: each member's fold folders (``fold_0``, ``fold_full``), by member.
        checkpoint: ``final``, ``best`` or ``snapshots``.
        channels: the channel names the first member's plans declare (``dataset.json``'s), in channel order.
        labels: the declared labels, name -> value (0 background).
        model_file: the model file given (``-m``), else None.
    """

    dataset: str
    members: tuple[str, ...]
    folds: dict[str, tuple[str, ...]]
    checkpoint: str
    channels: tuple[str, ...]
    labels: dict[str, int]
    model_file: str | None = None


def describe_model(choice: ModelChoice | None = None, checkpoint: str = "final") -> ModelDescription:
    """The members, folds, channels and labels :func:`autoseg.api.predict.predict` would use for ``choice``, from the plans of the run
    folders (no checkpoint is loaded); a model file is installed first, as :func:`autoseg.api.predict.predict` does.

    Raises:
        ValueError, ModelFileError: as :func:`autoseg.api.predict.predict` for the same ``choice`` (see :func:`choose_dataset`,
            :func:`autoseg.paths.trained_member`, :func:`autoseg.api.model_files.install_for_prediction`).
    """
    choice = choice or ModelChoice()
    installed = install_model_file(choice, checkpoint) if choice.model_file else None
    name = installed.dataset if installed else choose_dataset(choice.dataset)
    members, checkpoint = _members(name, installed, choice, checkpoint)
    described, folds, plans = [], {}, None
    for configuration, trainer, member_folds in members:
        trainer, fold_folders, _ = trained_member(name, configuration, trainer, member_folds, checkpoint)
        member = f"{configuration}/{trainer}"
        described.append(member)
        folds[member] = tuple(folder.name for folder in fold_folders)
        plans = plans or Plans.from_json(fold_folders[0] / PLANS_FILE)
    model_file = None if choice.model_file is None else str(choice.model_file)
    return ModelDescription(
        name, tuple(described), folds, checkpoint, tuple(plans.channels), dict(plans.labels), model_file
    )


def calibration_for(dataset: str, models: Sequence[Model]) -> QCCalibration | None:
    """The QC calibration ``autoseg_find_best`` wrote for exactly these members (configuration/trainer pairs), else
    None."""
    path = results_folder(dataset) / QC_CALIBRATION_FILE
    if not path.is_file():
        return None
    found = QCCalibration.from_json(read_json(path), str(path))
    members = sorted(f"{m.configuration}/{m.trainer}" for m in models)
    return found if sorted(found.members) == members else None


def install_model_file(choice: ModelChoice, checkpoint: str) -> InstalledModel:
    """``ModelChoice(model_file=...)``: the model file installed (:func:`autoseg.api.model_files.install_for_prediction`).

    Raises:
        ValueError: members named beside the file, or a ``checkpoint`` other than the default and the file's own.
    """
    model = choice.model_file
    named = [
        flag
        for flag, value in (
            ("-d", choice.dataset),
            ("-c", choice.configurations),
            ("-tr", choice.trainers),
            ("-f", choice.folds),
        )
        if value
    ]
    if named:
        raise UsageError(f"{model}: a model file brings its own members and folds; leave out {', '.join(named)}")
    installed = install_for_prediction(model)
    if checkpoint not in ("final", installed.checkpoint):
        raise UsageError(f"{model}: holds {installed.checkpoint} checkpoints, not {checkpoint}")
    return installed
