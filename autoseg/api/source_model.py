"""The trained model a plan or a training starts from (``autoseg_plan --like MODEL``, ``autoseg_train --init-from
MODEL``): :func:`find_source_model`.

``MODEL`` is a model file written by ``autoseg_export`` (installed into ``AUTOSEG_RESULTS`` first, or its identical
install reused, exactly as ``autoseg_predict -m`` does: :func:`autoseg.api.model_files.install_for_prediction`, with
every check of ``autoseg_import``), or the name of a dataset trained under ``AUTOSEG_RESULTS`` (``ATLAS``, ``1`` or
``Dataset001_ATLAS``). Its member (configuration/trainer) is the only one it has; with several, the one of the
configuration asked for (``autoseg_train --init-from`` asks for the configuration it trains) when exactly one member
has it; otherwise the message lists them and says how to export the one to start from. Each fold's weights are its
``checkpoint_final.pth``, else ``checkpoint_best.pth``, else its last snapshot.
"""

from __future__ import annotations

from pathlib import Path

from autoseg.api.model_files import install_for_prediction
from autoseg.errors import UsageError
from autoseg.io.checkpoints import load_checkpoint
from autoseg.networks.factory import checkpoint_network_options
from autoseg.paths import (
    PLANS_FILE,
    choose_dataset,
    trained_configurations,
    trainer_folder,
    trainer_folders,
)
from autoseg.plans import Plans
from autoseg.train.transfer import SourceModel

__all__ = ["SourceModel", "find_source_model"]

#: The checkpoint of a fold whose weights a run starts from, in order of preference (then the last snapshot).
CHECKPOINT_PREFERENCE = ("checkpoint_final.pth", "checkpoint_best.pth")


def find_source_model(model: str | Path, configuration: str | None = None) -> SourceModel:
    """The member of ``model`` (a model file or a trained dataset's name; see the module docstring) to start from.

    Args:
        model: the model file's path (``.zip``), or the trained dataset's name, number or folder name.
        configuration: prefer the member of this configuration when the model has several.

    Raises:
        MissingFileError, ModelFileError: a model file that does not exist or that ``autoseg_import`` refuses.
        UsageError: neither a model file nor a trained dataset (one line, naming both readings), several members to
            choose from, or a member with no fold holding weights.
    """
    model = str(model)
    if model.endswith(".zip") or Path(model).is_file():
        installed = install_for_prediction(model)
        dataset, members = installed.dataset, list(installed.members)
        folds = {member: [f"fold_{fold}" for fold in found] for member, found in installed.folds.items()}
    else:
        try:
            dataset = choose_dataset(model)
        except UsageError as error:
            raise UsageError(
                f"{model}: neither a model file (autoseg_export writes one, a .zip) nor a trained dataset ({error})"
            ) from None
        members = [
            (c, t)
            for c in trained_configurations(dataset)
            for t in trainer_folders(dataset, c)
            if any(trainer_folder(dataset, c, t).glob("fold_*/checkpoint_*.pth"))
        ]
        folds = {}
    chosen = _choose_member(model, dataset, members, configuration)
    folder = trainer_folder(dataset, *chosen)
    names = folds.get(chosen) or sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
    checkpoints = {name.removeprefix("fold_"): path for name in names if (path := _weights_of(folder / name))}
    if not checkpoints:
        raise UsageError(f"{model}: {folder} has no fold with a checkpoint ({', '.join(CHECKPOINT_PREFERENCE)})")
    fold, path = next(iter(checkpoints.items()))
    plans = Plans.from_json(folder / f"fold_{fold}" / PLANS_FILE)
    options = checkpoint_network_options(load_checkpoint(path), chosen[1], path)
    return SourceModel(model, dataset, chosen[0], chosen[1], plans, checkpoints, options)


def _choose_member(
    model: str, dataset: str, members: list[tuple[str, str]], configuration: str | None
) -> tuple[str, str]:
    """The only member, else the only one of ``configuration``; else an error listing them."""
    if not members:
        raise UsageError(f"{model}: {dataset} has no trained member (configuration/trainer with a checkpoint)")
    same = [member for member in members if member[0] == configuration]
    candidates = same if same else members
    if len(candidates) == 1:
        return candidates[0]
    listing = ", ".join(f"{c}/{t}" for c, t in candidates)
    raise UsageError(
        f"{model}: {dataset} has several members ({listing}) and weights start from one; export the one to start "
        f"from into a file of its own (autoseg_export -d {dataset} -c CONFIGURATION -tr TRAINER -o model.zip) and "
        "name that file"
    )


def _weights_of(fold: Path) -> Path | None:
    """The checkpoint of ``fold`` that holds the weights to start from (:data:`CHECKPOINT_PREFERENCE`, then the last
    snapshot), or None."""
    for name in CHECKPOINT_PREFERENCE:
        if (fold / name).is_file():
            return fold / name
    snapshots = sorted(
        fold.glob("checkpoint_snapshot_*.pth"),
        key=lambda p: int(p.stem.rsplit("_", 1)[1]) if p.stem.rsplit("_", 1)[1].isdigit() else -1,
    )
    return snapshots[-1] if snapshots else None
