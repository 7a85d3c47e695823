"""``autoseg_find_best`` as a library: choose configurations and tune post-processing on the cross-validation.

Inputs are the fold-wise validation outputs training leaves behind,
``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>/validation/CASE_probabilities.npz`` (lesion
probabilities on the original grid), and the raw dataset's labels. :func:`find_best`:

1. scores every *member* (a trained configuration with one of its trainers, e.g. ``2d_pspnet`` with
   ``PSPNetTrainer`` and with ``PSPNetCETrainer``) and every ensemble of two or more members (mean of their
   probabilities) by the mean Dice over all cases validated by every member, at the plans' threshold and
   without removing small lesions; the best wins (a tie goes to the smaller ensemble);
2. for the winner, grid-searches the threshold ``T_h`` in 0.1, 0.2, ..., 0.9 and the minimum lesion size
   ``S_min`` in :data:`MIN_SIZES_VOXELS` voxels (turned into mm³ with the median voxel volume of the cases),
   maximizing the mean per-case score: the acute stroke paper's ``DSC·h / (DSC + h)`` with ``h = 1 - HD/HD_max``
   (:func:`autoseg.metrics.dice_hausdorff_score`), or the Dice with ``metric="dice"``; a tie keeps the setting
   nearer the default (0.5, no minimum);
3. writes ``AUTOSEG_RESULTS/<dataset>/model_selection.json`` (every candidate's numbers, the grid, the choice)
   and ``postprocessing.json`` (members, threshold, minimum size), which ``autoseg_predict`` applies when it
   ensembles those members, and whose members it predicts with when given neither ``-c`` nor ``-tr``.

Per-case scores: both masks empty scores 1 (Dice) or 0.5 (the combined score's maximum); exactly one empty
scores 0 (its Hausdorff distance is undefined, and an empty prediction of a lesion is a miss).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from autoseg.dataset import find_dataset
from autoseg.io import read_header, read_image, write_json
from autoseg.metrics import dice, dice_hausdorff_score, hausdorff
from autoseg.paths import results_root
from autoseg.plans import Plans
from autoseg.postprocessing import postprocess_probabilities, remove_small_components
from autoseg.predict import POSTPROCESSING_FILE, choose_dataset, trained_configurations, trainer_folders

__all__ = ["METRICS", "MIN_SIZES_VOXELS", "SELECTION_FILE", "THRESHOLDS", "case_score", "describe_members", "find_best",
           "member_name"]

METRICS = ("dice_hausdorff", "dice")
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
MIN_SIZES_VOXELS = (0, 10, 25, 50, 100, 250, 500, 1000)
SELECTION_FILE = "model_selection.json"


def case_score(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], metric: str) -> float:
    """Score of one case's (X, Y, Z) masks (see the module docstring for empty masks).

    Raises:
        ValueError: unknown metric.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}', use one of {list(METRICS)}")
    predicted, present = bool(prediction.any()), bool(reference.any())
    if metric == "dice":
        return dice(prediction, reference)
    if not predicted and not present:
        return 0.5
    if predicted != present:
        return 0.0
    return dice_hausdorff_score(dice(prediction, reference), hausdorff(prediction, reference, spacing))


Member = tuple[str, str]
"""(configuration, trainer)."""


def member_name(member: Member) -> str:
    """``configuration/trainer``, as printed and written."""
    return "/".join(member)


def _members(dataset: str, configurations: Sequence[str], trainers: Sequence[str] | None) -> list[Member]:
    """(configuration, trainer) pairs to compare: each configuration with each of ``trainers`` it was trained
    with, or with its only trainer when ``trainers`` is None.

    Raises:
        ValueError: a configuration with several trainers and no ``trainers`` given, or a given trainer that no
            configuration was trained with (the messages list what exists).
    """
    members, used = [], set()
    for configuration in configurations:
        present = trainer_folders(dataset, configuration)
        if trainers is None:
            if len(present) != 1:
                raise ValueError(f"{results_root() / dataset / configuration}: {len(present)} trainers ({', '.join(present)}); choose one or more "
                                 "with -tr")
            chosen = present
        else:
            chosen = [t for t in trainers if t in present]
        used.update(chosen)
        members += [(configuration, trainer) for trainer in chosen]
    unknown = [t for t in trainers or () if t not in used]
    if unknown:
        raise ValueError(f"{dataset}: no configuration of {list(configurations)} was trained with {unknown}")
    return members


def _validation_files(dataset: str, member: Member) -> dict[str, Path]:
    """Case -> validation probabilities of the cross-validation folds of one member."""
    configuration, trainer = member
    files: dict[str, Path] = {}
    for path in sorted((results_root() / dataset / configuration / trainer).glob(
            "fold_*/validation/*_probabilities.npz")):
        if path.parent.parent.name != "fold_full":  # trained on every case: its validation is no validation
            files.setdefault(path.name.removesuffix("_probabilities.npz"), path)
    return files


def _load(path: Path) -> np.ndarray:
    with np.load(path) as archive:
        return archive["probabilities"].astype(np.float32)


def find_best(
    dataset: str | None = None,
    configurations: Sequence[str] | None = None,
    trainers: str | Sequence[str] | None = None,
    metric: str = "dice_hausdorff",
    progress: bool = True,
) -> dict[str, Any]:
    """Choose members and post-processing from the validation outputs; write the two JSON files.

    Args:
        dataset: trained dataset (see ``autoseg.predict.choose_dataset``); None: the only trained one.
        configurations: candidate configurations (default every trained configuration).
        trainers: trainer folder(s); each configuration takes part with every one of them it was trained with
            (e.g. ``["PSPNetTrainer", "PSPNetCETrainer"]`` for the focal and cross-entropy PSPNets); default the
            only one of each configuration.
        metric: ``dice_hausdorff`` (default, the acute stroke paper's score) or ``dice`` for the grid search.
        progress: progress bars over cases.

    Returns:
        The content of ``model_selection.json``.

    Raises:
        ValueError: unknown metric, no validation probabilities (train with validation first), no case that
            every member validated, or trainers that do not match (see :func:`_members`).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}', use one of {list(METRICS)}")
    name = choose_dataset(dataset)
    names = list(configurations or trained_configurations(name))
    members = _members(name, names, [trainers] if isinstance(trainers, str) else trainers)
    found = {member: _validation_files(name, member) for member in members}
    empty = [member_name(m) for m, files in found.items() if not files]
    if empty:
        raise ValueError(f"{name}: no validation probabilities (validation/CASE_probabilities.npz) for {empty}; "
                         "run the end-of-fold validation of every fold (autoseg_train without --no-validation)")
    cases = sorted(set.intersection(*(set(files) for files in found.values())))
    if not cases:
        raise ValueError(f"{name}: no case was validated by every member of {[member_name(m) for m in members]}")
    references = {case.identifier: case.label for case in find_dataset(name).cases()}
    first = members[0]
    plans = Plans.from_json(next(iter(found[first].values())).parent.parent / "plans.json")
    default = plans.configuration(first[0]).postprocessing

    subsets = [combo for size in range(1, len(members) + 1) for combo in itertools.combinations(members, size)]
    dice_values: dict[tuple[Member, ...], list[float]] = {combo: [] for combo in subsets}
    for case in tqdm(cases, desc="compare members", disable=not progress):
        reference, geometry = read_image(references[case], np.uint8)
        loaded = {m: _load(found[m][case]) for m in members}
        for combo in subsets:
            mean = np.mean([loaded[m] for m in combo], axis=0)
            labels = postprocess_probabilities(mean, geometry.spacing, default.threshold, 0.0)
            dice_values[combo].append(dice(labels > 0, reference > 0))
    ranked = [{**describe_members(combo), "mean_dice": float(np.mean(dice_values[combo]))} for combo in subsets]
    best_combo = max(subsets, key=lambda combo: (float(np.mean(dice_values[combo])), -len(combo)))
    best = ranked[subsets.index(best_combo)]
    grid = _grid_search([found[m] for m in best_combo], cases, references, metric, progress)
    chosen = max(grid, key=lambda g: (g["score"], -abs(g["threshold"] - 0.5), -g["min_lesion_voxels"]))
    postprocessing = {**describe_members(best_combo), "threshold": chosen["threshold"],
                      "min_lesion_mm3": chosen["min_lesion_mm3"], "min_lesion_voxels": chosen["min_lesion_voxels"],
                      "metric": metric, "score": chosen["score"]}
    selection = {"dataset": name, "cases": len(cases), "metric": metric, "candidates": ranked,
                 "chosen": best, "postprocessing": postprocessing, "grid": grid}
    write_json(selection, results_root() / name / SELECTION_FILE)
    write_json(postprocessing, results_root() / name / POSTPROCESSING_FILE)
    return selection


def describe_members(members: Sequence[Member]) -> dict[str, Any]:
    """How an ensemble is written in the JSON files: ``members`` (``configuration/trainer``), its
    ``configurations`` (each once, in order) and ``trainers`` per configuration."""
    configurations = list(dict.fromkeys(c for c, _ in members))
    return {"members": [member_name(m) for m in members], "configurations": configurations,
            "trainers": {c: [t for c2, t in members if c2 == c] for c in configurations}}


def _grid_search(files: Sequence[dict[str, Path]], cases: Sequence[str], references: dict[str, Path],
                 metric: str, progress: bool) -> list[dict[str, float]]:
    """Mean score of every (threshold, minimum size) pair over ``cases`` for the ensemble whose members'
    validation probabilities are ``files`` (one case -> file mapping per member)."""
    scores = {(t, s): [] for t in THRESHOLDS for s in MIN_SIZES_VOXELS}
    # One physical size per candidate, so the choice applies alike to scans of any resolution.
    voxel = float(np.median([read_header(references[case])[0].voxel_volume_mm3 for case in cases]))
    for case in tqdm(cases, desc="tune post-processing", disable=not progress):
        reference, geometry = read_image(references[case], np.uint8)
        mean = np.mean([_load(member[case]) for member in files], axis=0)
        for threshold in THRESHOLDS:
            labels = postprocess_probabilities(mean, geometry.spacing, threshold, 0.0)
            for size in MIN_SIZES_VOXELS:
                kept = remove_small_components(labels, geometry.spacing, size * voxel)
                scores[(threshold, size)].append(case_score(kept > 0, reference > 0, geometry.spacing, metric))
    return [{"threshold": t, "min_lesion_voxels": s, "min_lesion_mm3": round(s * voxel, 4),
             "score": _mean(values)} for (t, s), values in scores.items()]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else 0.0
