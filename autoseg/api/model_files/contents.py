"""The checks of what a model file installs, as it lies extracted: every ``plans.json`` and the network it describes,
each checkpoint's size and tensors against that network, and ``postprocessing.json`` and ``model_selection.json``
against the zip's members and what is installed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from autoseg.api.model_files.layout import FOLD_ENTRY, MANIFEST_FILE, ModelFile, ModelFileError, same_file
from autoseg.errors import AutosegError
from autoseg.infer.postprocessing import read_tuned_postprocessing
from autoseg.infer.quality import QCCalibration
from autoseg.io.checkpoints import CheckpointError, load_checkpoint, non_plain_values
from autoseg.io.files import read_json
from autoseg.networks.factory import (
    NETWORK_OPTIONS_KEY,
    WeightLayout,
    checkpoint_network_options,
    expected_weights,
    layout_bytes,
    weights_problem,
)
from autoseg.paths import PLANS_FILE, POSTPROCESSING_FILE, QC_CALIBRATION_FILE, SELECTION_FILE
from autoseg.plans import Plans, PlansError

__all__ = ["CHECKPOINT_OVERHEAD_BYTES", "check_contents"]


#: What ``torch.save`` adds to the tensors' bytes: names, plain values and the container's records (a few hundred
#: bytes per tensor), with room to spare: 1 MiB plus 1 KiB per tensor.
CHECKPOINT_OVERHEAD_BYTES = (1 << 20, 1 << 10)


def check_contents(model: ModelFile, folder: Path, target: Path, extract: Callable[[list[str]], None] | None) -> None:
    """Check what the zip installs, as it lies in ``folder`` (the staging folder; or, for an identical install, the
    dataset folder): plans, post-processing and model selection first, then every checkpoint's declared size
    against the network its plans describe, before it is extracted (``extract``, None when the entries are in
    ``folder`` already), then its tensors."""
    checkpoints = [entry for entry in model.entries if entry.endswith(".pth")]
    if extract is not None:
        extract([entry for entry in model.entries if entry not in checkpoints])
    if Path(folder) != Path(target):  # an identical install is checked where it lies
        _check_members_not_extended(model, target)
    _check_dataset_files(model, folder, target)
    layouts = {}
    for entry in checkpoints:
        fold = FOLD_ENTRY.match(entry).group("fold")
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
        _check_checkpoint(model.path, entry, folder / entry, *layouts[FOLD_ENTRY.match(entry).group("fold")])


def _network_layout(model: ModelFile, folder: Path, fold: str) -> tuple[dict[str, str | bool], WeightLayout]:
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


def _check_members_not_extended(model: ModelFile, target: Path) -> None:
    """A zip's member (configuration/trainer) already under ``target`` (the dataset's results folder) with folds the
    zip does not bring would be extended by the zip's folds, and ``autoseg_predict`` would ensemble them with the
    user's own: refused, naming the member and its folds. The same folds may be replaced (``--overwrite``)."""
    brought: dict[str, set[str]] = {}
    for entry in model.entries:
        if match := FOLD_ENTRY.match(entry):
            brought.setdefault(match.group("member"), set()).add(match.group("fold").rsplit("/", 1)[1])
    for member, folds in sorted(brought.items()):
        installed = {fold.name for fold in (target / member).glob("fold_*") if any(fold.glob("checkpoint_*.pth"))}
        own = sorted(installed - folds)
        if own:
            raise ModelFileError(
                f"{model.path}: would add {', '.join(sorted(folds))} to {member} of {target.name}, which has "
                f"{', '.join(own)} of its own; refused: a model file does not extend a member trained or installed "
                "here (import into another AUTOSEG_RESULTS, or export all of the member's folds in one file)"
            )


def _check_dataset_files(model: ModelFile, folder: Path, target: Path) -> None:
    """``postprocessing.json``, ``qc_calibration.json`` and ``model_selection.json`` may come only for exactly the zip's members (the
    manifest's, each of which brings its checkpoints), and may not replace an installed one that concerns other
    members, nor, where there is none, make the zip's members the dataset's default beside members already trained
    there (``autoseg_predict -d`` predicts with the members these files name): a model file changes nothing of
    another member."""
    members = sorted(model.manifest["members"])
    others = [member for member in _trained_members(target) if member not in members]
    for name in (POSTPROCESSING_FILE, QC_CALIBRATION_FILE, SELECTION_FILE):
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
        if installed.is_file() and not same_file(installed, model.manifest["files"][name]):
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


def _members_of(model: ModelFile, path: Path, name: str) -> list[str]:
    """The sorted members a ``postprocessing.json``, ``qc_calibration.json`` or ``model_selection.json`` concerns (for
    the last its chosen members, which must be those of its own post-processing)."""
    try:
        if name == POSTPROCESSING_FILE:
            return sorted(read_tuned_postprocessing(path).members)
        if name == QC_CALIBRATION_FILE:
            return sorted(QCCalibration.from_json(read_json(path), str(path)).members)
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
