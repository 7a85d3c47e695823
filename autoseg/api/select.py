"""``autoseg_find_best`` as a library: choose configurations and tune post-processing on the cross-validation.

Inputs are the fold-wise validation outputs training leaves behind,
``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>/validation/CASE_probabilities.npz`` (lesion
probabilities on the original grid), and the raw dataset's labels. :func:`find_best`:

1. scores every *member* (a trained configuration with one of its trainers, e.g. ``2d_pspnet`` with
   ``PSPNetTrainer`` and with ``PSPNetCETrainer``; by default every trainer a configuration was trained with) and
   every ensemble of two or more members (mean of their probabilities) by the mean Dice over all cases validated by
   every member, at the plans' threshold and without removing small lesions; the best wins (a tie goes to the
   smaller ensemble);
2. for the winner, grid-searches the threshold ``T_h`` in 0.1, 0.2, ..., 0.9 and the minimum lesion size
   ``S_min`` in :data:`MIN_SIZES_VOXELS` voxels (turned into mm³ with the median voxel volume of the cases; sizes
   above ``autoseg.plans.MAX_MIN_LESION_MM3``, which prediction refuses, are left out),
   maximizing the mean per-case score: the acute stroke paper's ``DSC·h / (DSC + h)`` with ``h = 1 - HD/HD_max``
   (:func:`autoseg.evaluate.metrics.dice_hausdorff_score`), or the Dice with ``metric="dice"``; a tie keeps the setting
   nearer the default (0.5, no minimum). Under a challenge's protocol (``protocol="isles22"`` or ``"atlas2"``,
   :mod:`autoseg.evaluate.protocols`) every grid point is scored with that challenge's four metrics, and the default
   ``metric="mean_rank"`` ranks the grid points as the MICCAI 2022 challenges ranked teams
   (atlas.grand-challenge.org/Evaluation, "ISLES'22/ATLAS/MICCAI Score": "The overall rank is the mean rank across
   the metrics"): the points are ranked on the mean over cases of each
   metric (Dice and lesion F1 higher is better, volume and lesion count difference lower; ties share their mean
   rank), and the lowest mean of the four ranks wins; ``metric="dice"`` or ``"lesion_f1"`` maximizes that mean alone;
3. says what each option changed against its baseline (``autoseg.evaluate.option_effects``: ``3d_resunet_sym`` against
   ``3d_resunet``, ``NAME_histeq`` against ``NAME``, another trainer against the planned one): paired differences in
   Dice, lesion-wise F1 and HD95 on the cases both validated (under a challenge's protocol: its four metrics), with
   paired bootstrap 95% CIs, and whether it was kept or dropped and why; options not trained are listed with the
   commands that would train them;
4. calibrates the QC score (``autoseg.infer.quality``) of the chosen members on their cross-validation cases, where
   the true Dice is known: the expected Dice given the score and the review threshold that best separates cases
   with Dice below 0.5 (:func:`_calibrate_qc`);
5. writes ``AUTOSEG_RESULTS/<dataset>/model_selection.json`` (the protocol, every candidate's numbers, the options,
   the grid, the choice, the calibration), ``postprocessing.json`` (members, threshold, minimum size, metric and
   protocol), which ``autoseg_predict`` applies when it ensembles those members, and whose members it predicts with
   when given neither ``-c`` nor ``-tr``, and ``qc_calibration.json``, which it judges their predictions by; a model
   file carries both.

Member ranking (step 1) is by Dice under every protocol: the Dice of the three protocols is the same number.

Per-case scores: every case is scored by :func:`autoseg.evaluate.metrics.score_case`, the function end-of-fold validation and
``autoseg_evaluate`` score with, label by label (``prediction == k`` against ``reference == k``) and averaged over the
labels when there are several; a member's Dice at the plans' threshold (with no minimum lesion size, as planned)
is therefore the Dice its ``validation/summary.json`` gives. Both masks empty scores 1 (Dice) or 0.5 (the combined score's maximum); exactly
one empty scores 0 (its Hausdorff distance is undefined, and an empty prediction of a lesion is a miss).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from autoseg.api.input_checks import load_training_ranges
from autoseg.api.predict import training_volumes
from autoseg.data.dataset import find_dataset
from autoseg.errors import DataError, MissingFileError, UsageError
from autoseg.evaluate.metrics import mean_over_labels, score_case
from autoseg.evaluate.option_effects import BOOTSTRAP, describe_options, find_pairings, option_metrics
from autoseg.evaluate.protocols import DEFAULT_PROTOCOL, HIGHER_IS_BETTER, Protocol, get_protocol
from autoseg.infer.postprocessing import postprocess_probabilities, remove_small_components
from autoseg.infer.quality import QCCalibration, assess, pairwise_dice, predictive_entropy, qc_score
from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_header
from autoseg.labels import classes_from_values, read_label_file
from autoseg.paths import (
    PLANS_FILE,
    POSTPROCESSING_FILE,
    QC_CALIBRATION_FILE,
    SELECTION_FILE,
    choose_dataset,
    configuration_folder,
    preprocessed_folder,
    results_folder,
    trained_configurations,
    trainer_folder,
    trainer_folders,
)
from autoseg.plans import MAX_MIN_LESION_MM3, Plans, PlansError

__all__ = [
    "METRICS",
    "MIN_SIZES_VOXELS",
    "PROTOCOL_METRICS",
    "SELECTION_FILE",
    "THRESHOLDS",
    "case_score",
    "describe_members",
    "find_best",
    "member_name",
    "protocol_metric",
    "rank_grid",
]

#: The grid search's scores under the autoseg protocol; the first is the default.
METRICS = ("dice_hausdorff", "dice")
#: The grid search's scores of every protocol (the first is its default); ``mean_rank`` is lower-is-better.
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "autoseg": METRICS,
    "isles22": ("mean_rank", "dice", "lesion_f1"),
    "atlas2": ("mean_rank", "dice", "lesion_f1"),
}
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
MIN_SIZES_VOXELS = (0, 10, 25, 50, 100, 250, 500, 1000)


def protocol_metric(metric: str | None, protocol: str | Protocol = DEFAULT_PROTOCOL) -> str:
    """The grid search's score: ``metric``, or the protocol's default when None.

    Raises:
        UsageError: ``metric`` is not one of the protocol's (:data:`PROTOCOL_METRICS`); the message lists them.
        UnknownNameError: an unknown protocol.
    """
    protocol = get_protocol(protocol)
    allowed = PROTOCOL_METRICS[protocol.name]
    if metric is None:
        return allowed[0]
    if metric not in allowed:
        raise UsageError(f"metric '{metric}' is not one of the {protocol.name} protocol's: {', '.join(allowed)}")
    return metric


def case_score(scores: Mapping[int, Mapping[str, float]], metric: str) -> float:
    """The grid search's score of one case scored by :func:`autoseg.evaluate.metrics.score_case` (see the module docstring for
    empty masks): its ``dice`` or ``lesion_f1``, or its ``dice_hd_score`` with 0 where exactly one mask is empty; with
    several labels, the mean over them.

    Raises:
        ValueError: unknown metric (``mean_rank`` ranks grid points, not cases: :func:`rank_grid`).
    """
    known = ("dice_hausdorff", "dice", "lesion_f1")
    if metric not in known:
        raise UsageError(f"unknown metric '{metric}' for one case, use one of {list(known)}")
    name = "dice_hd_score" if metric == "dice_hausdorff" else metric
    # dice_hd_score is NaN only where exactly one mask is empty (no Hausdorff distance): a miss or a false alarm.
    return float(np.mean([0.0 if math.isnan(m[name]) else m[name] for m in scores.values()]))


def _labels_of(probabilities: np.ndarray) -> range:
    """The classes 1..K a (K, X, Y, Z) probability map is post-processed into (channel k is class k + 1)."""
    return range(1, len(probabilities) + 1)


def _reference_classes(path: Path, labels: Mapping[str, int]) -> tuple[np.ndarray, Geometry]:
    """A raw label file as (X, Y, Z) classes (``autoseg.labels``), what the predicted classes are scored against."""
    found = read_label_file(path)
    return classes_from_values(found.array, labels, path), found.geometry


Member = tuple[str, str]
"""(configuration, trainer)."""


def member_name(member: Member) -> str:
    """``configuration/trainer``, as printed and written."""
    return "/".join(member)


def _members(dataset: str, configurations: Sequence[str], trainers: Sequence[str] | None) -> list[Member]:
    """(configuration, trainer) pairs to compare: each configuration with each of ``trainers`` it was trained
    with, or with every trainer it was trained with when ``trainers`` is None.

    Raises:
        ValueError: a configuration without trainer runs, or a given trainer that no configuration was trained
            with (the messages list what exists).
    """
    members, used = [], set()
    for configuration in configurations:
        present = trainer_folders(dataset, configuration)
        if not present:
            raise UsageError(f"{configuration_folder(dataset, configuration)}: no trainer folder with a fold_<k> run")
        chosen = present if trainers is None else [t for t in trainers if t in present]
        used.update(chosen)
        members += [(configuration, trainer) for trainer in chosen]
    unknown = [t for t in trainers or () if t not in used]
    if unknown:
        raise UsageError(f"{dataset}: no configuration of {list(configurations)} was trained with {unknown}")
    return members


def _validation_files(dataset: str, member: Member) -> dict[str, Path]:
    """Case -> validation probabilities of the cross-validation folds of one member."""
    configuration, trainer = member
    files: dict[str, Path] = {}
    for path in sorted((trainer_folder(dataset, configuration, trainer)).glob("fold_*/validation/*_probabilities.npz")):
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
    metric: str | None = None,
    progress: bool = True,
    protocol: str | Protocol = DEFAULT_PROTOCOL,
) -> dict[str, Any]:
    """Choose members and post-processing from the validation outputs; write the two JSON files.

    Args:
        dataset: trained dataset (see ``autoseg.paths.choose_dataset``); None: the only trained one.
        configurations: candidate configurations (default every trained configuration).
        trainers: trainer folder(s); each configuration takes part with every one of them it was trained with
            (e.g. ``["PSPNetTrainer", "PSPNetCETrainer"]`` for the focal and cross-entropy PSPNets); default every
            trainer each configuration was trained with.
        metric: the grid search's score (:data:`PROTOCOL_METRICS`); None: the protocol's default, ``dice_hausdorff``
            (the acute stroke paper's score) under ``autoseg``, ``mean_rank`` under a challenge's protocol.
        progress: progress bars over cases.
        protocol: ``autoseg`` (default), ``isles22`` or ``atlas2``: the metrics of the grid and of the option
            differences (:mod:`autoseg.evaluate.protocols`).

    Returns:
        The content of ``model_selection.json``: ``protocol``, ``candidates``, ``chosen``, ``postprocessing``, ``grid``,
        and ``options`` (see :func:`autoseg.evaluate.option_effects.describe_options`) with ``option_comparison``
        (bootstrap resamples, seed, coverage, threshold).

    Raises:
        ValueError: unknown metric or one the protocol has not, no validation probabilities (train with validation
            first), no case that every member validated, or trainers that do not match (see :func:`_members`).
        UnknownNameError: an unknown protocol.
    """
    protocol = get_protocol(protocol)
    metric = protocol_metric(metric, protocol)
    name = choose_dataset(dataset)
    names = list(configurations or trained_configurations(name))
    members = _members(name, names, [trainers] if isinstance(trainers, str) else trainers)
    found, cases = _validated_cases(name, members)
    raw = find_dataset(name)
    references = {case.identifier: case.label for case in raw.cases()}
    first = members[0]
    plans = Plans.from_json(next(iter(found[first].values())).parent.parent / PLANS_FILE)
    default = plans.configuration(first[0]).postprocessing

    subsets = [combo for size in range(1, len(members) + 1) for combo in itertools.combinations(members, size)]
    dice_values, scores = _score_members(
        members, subsets, found, cases, references, default.threshold, progress, raw.labels, protocol
    )
    ranked = [{**describe_members(combo), "mean_dice": float(np.mean(dice_values[combo]))} for combo in subsets]
    best_combo = max(subsets, key=lambda combo: (float(np.mean(dice_values[combo])), -len(combo)))
    best = ranked[subsets.index(best_combo)]
    grid = _grid_search([found[m] for m in best_combo], cases, references, metric, progress, raw.labels, protocol)
    postprocessing = {**_best_postprocessing(best_combo, grid, metric), "protocol": protocol.name}
    calibration = _calibrate_qc(name, best_combo, found, cases, references, postprocessing, raw.labels, progress)
    selection = {
        "dataset": name,
        "cases": len(cases),
        "metric": metric,
        "protocol": protocol.to_json(),
        "candidates": ranked,
        "chosen": best,
        "postprocessing": postprocessing,
        "grid": grid,
        "options": _options(name, members, scores, best_combo, protocol),
        "qc_calibration": calibration.to_json() if calibration else "not calibrated: fewer than two cases with a Dice",
        "option_comparison": {
            **BOOTSTRAP,
            "threshold": default.threshold,
            "differences": "candidate - baseline, paired on the cases both validated",
        },
    }
    write_json(selection, results_folder(name) / SELECTION_FILE)
    write_json(postprocessing, results_folder(name) / POSTPROCESSING_FILE)
    if calibration:
        write_json(calibration.to_json(), results_folder(name) / QC_CALIBRATION_FILE)
    else:
        (results_folder(name) / QC_CALIBRATION_FILE).unlink(missing_ok=True)  # it would be another choice's
    return selection


def _calibrate_qc(
    dataset: str,
    members: tuple[Member, ...],
    found: dict[Member, dict[str, Path]],
    cases: Sequence[str],
    references: dict[str, Path],
    postprocessing: Mapping[str, Any],
    declared: Mapping[str, int],
    progress: bool,
) -> QCCalibration | None:
    """The QC score of every cross-validation case of the chosen ensemble, as ``autoseg_predict`` computes it (see
    ``autoseg.infer.quality``), against its true Dice at the chosen post-processing, fitted into a
    :class:`QCCalibration`. The mirrorings' agreement comes from each fold's ``validation/summary.json`` (at the
    plans' threshold; absent for validations from before it was recorded), the members' agreement from their
    validation probabilities when the ensemble has several members (each case is validated by one fold of each).
    None when fewer than two cases have a Dice (both masks empty leaves it undefined)."""
    training = training_volumes(load_training_ranges(dataset))
    threshold, min_mm3 = postprocessing["threshold"], postprocessing["min_lesion_mm3"]
    summaries: dict[Path, dict[str, Any]] = {}
    scores, dice_values = [], []
    for case in tqdm(cases, desc="calibrate QC", disable=not progress):
        reference, geometry = _reference_classes(references[case], declared)
        loaded = [_load(found[member][case]) for member in members]
        mean = np.mean(loaded, axis=0) if len(loaded) > 1 else loaded[0]
        labels = postprocess_probabilities(mean, geometry.spacing, threshold, min_mm3)
        scored = score_case(labels, reference, geometry.spacing, _labels_of(mean), overlap_only=True)
        mirroring = []
        for member in members:
            summary_file = found[member][case].parent / "summary.json"
            if summary_file not in summaries:
                summaries[summary_file] = read_json(summary_file) if summary_file.is_file() else {}
            value = summaries[summary_file].get("cases", {}).get(case, {}).get("qc", {}).get("mirroring_agreement")
            if value is not None:
                mirroring.append(float(value))
        components = assess(
            labels > 0,
            predictive_entropy(mean.max(axis=0)),
            geometry.voxel_volume_mm3 / 1000,
            training,
            pairwise_dice([p.max(axis=0) >= threshold for p in loaded]),
            float(np.mean(mirroring)) if mirroring else None,
            members=len(members),
        )
        scores.append(qc_score(components))
        dice_values.append(mean_over_labels(scored)["dice"])
    try:
        return QCCalibration.fit([member_name(m) for m in members], scores, dice_values)
    except ValueError:
        return None


def _validated_cases(dataset: str, members: Sequence[Member]) -> tuple[dict[Member, dict[str, Path]], list[str]]:
    """Each member's validation probabilities (case -> ``CASE_probabilities.npz``) and the sorted cases every member
    validated.

    Raises:
        MissingFileError: a member without validation probabilities.
        DataError: no case that every member validated.
    """
    found = {member: _validation_files(dataset, member) for member in members}
    empty = [member_name(m) for m, files in found.items() if not files]
    if empty:
        raise MissingFileError(
            f"{dataset}: no validation probabilities (validation/CASE_probabilities.npz) for {empty}; "
            "run the end-of-fold validation of every fold (autoseg_train without --no-validation)"
        )
    cases = sorted(set.intersection(*(set(files) for files in found.values())))
    if not cases:
        raise DataError(f"{dataset}: no case was validated by every member of {[member_name(m) for m in members]}")
    return found, cases


def _best_postprocessing(members: tuple[Member, ...], grid: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """``postprocessing.json`` for ``members``: the grid point with the best score, the highest or, for ``mean_rank``,
    the lowest (ties: the threshold nearest 0.5, then the smaller minimum lesion size)."""
    sign = -1.0 if metric == "mean_rank" else 1.0
    chosen = max(grid, key=lambda g: (sign * g["score"], -abs(g["threshold"] - 0.5), -g["min_lesion_voxels"]))
    return {
        **describe_members(members),
        "threshold": chosen["threshold"],
        "min_lesion_mm3": chosen["min_lesion_mm3"],
        "min_lesion_voxels": chosen["min_lesion_voxels"],
        "metric": metric,
        "score": chosen["score"],
    }


def _score_members(
    members: Sequence[Member],
    subsets: Sequence[tuple[Member, ...]],
    found: dict[Member, dict[str, Path]],
    cases: Sequence[str],
    references: dict[str, Path],
    threshold: float,
    progress: bool,
    declared: Mapping[str, int],
    protocol: Protocol,
) -> tuple[dict[tuple[Member, ...], list[float]], dict[Member, dict[str, dict[str, float]]]]:
    """The Dice of every subset (ensemble) on ``cases`` (validated by every member), and every member's
    metrics under ``protocol`` (:func:`autoseg.evaluate.metrics.score_case`, averaged over labels by
    :func:`autoseg.evaluate.metrics.mean_over_labels`, as end-of-fold validation writes them) on every case it
    validated, at ``threshold``."""
    dice_values: dict[tuple[Member, ...], list[float]] = {combo: [] for combo in subsets}
    scores: dict[Member, dict[str, dict[str, float]]] = {m: {} for m in members}
    common = set(cases)
    validated = sorted(set().union(*(found[m] for m in members)) & set(references))
    for case in tqdm(validated, desc="compare members", disable=not progress):
        reference, geometry = _reference_classes(references[case], declared)
        loaded = {m: _load(found[m][case]) for m in members if case in found[m]}
        for member, probabilities in loaded.items():
            labels = postprocess_probabilities(probabilities, geometry.spacing, threshold, 0.0)
            scores[member][case] = mean_over_labels(
                score_case(labels, reference, geometry.spacing, _labels_of(probabilities), protocol=protocol)
            )
        if case not in common:
            continue
        for combo in subsets:
            if len(combo) == 1:
                dice_values[combo].append(scores[combo[0]][case]["dice"])
                continue
            mean = np.mean([loaded[m] for m in combo], axis=0)
            labels = postprocess_probabilities(mean, geometry.spacing, threshold, 0.0)
            ensemble = score_case(labels, reference, geometry.spacing, _labels_of(mean), overlap_only=True)
            dice_values[combo].append(mean_over_labels(ensemble)["dice"])
    return dice_values, scores


def _options(
    dataset: str,
    compared: Sequence[Member],
    scores: dict[Member, dict[str, dict[str, float]]],
    chosen: Sequence[Member],
    protocol: Protocol,
) -> list[dict[str, Any]]:
    """``model_selection.json``'s ``options``: what symmetric channels, histogram equalization and each trainer
    changed against their baselines (``autoseg.evaluate.option_effects``), over every trained configuration of the dataset."""
    trained: dict[str, list[str]] = {}
    for configuration in trained_configurations(dataset):
        for trainer in trainer_folders(dataset, configuration):
            if _validation_files(dataset, (configuration, trainer)):
                trained.setdefault(configuration, []).append(trainer)
    # Every configuration of the plans; a trained one as it was trained (the run's copy of the plans wins).
    sources = [(preprocessed_folder(dataset) / PLANS_FILE, None)]
    sources += [
        (next(iter(_validation_files(dataset, (c, t)).values())).parent.parent / PLANS_FILE, c)
        for c, trainers in trained.items()
        for t in trainers
    ]
    configurations, symmetry_reason = {}, None
    for path, only in sources:
        try:
            plans = Plans.from_json(path)
        except PlansError:  # no plans (yet) or an unreadable copy: the names and the other copies still tell
            continue
        configurations.update({n: c for n, c in plans.configurations.items() if only in (None, n)})
        symmetry_reason = symmetry_reason or plans.reasons.get("symmetry")
    pairings = find_pairings(configurations, trained, symmetry_reason)
    available = [(c, t) for c, trainers in trained.items() for t in trainers]
    return describe_options(pairings, dataset, available, compared, scores, chosen, tuple(option_metrics(protocol)))


def describe_members(members: Sequence[Member]) -> dict[str, Any]:
    """How an ensemble is written in the JSON files: ``members`` (``configuration/trainer``), its
    ``configurations`` (each once, in order) and ``trainers`` per configuration."""
    configurations = list(dict.fromkeys(c for c, _ in members))
    return {
        "members": [member_name(m) for m in members],
        "configurations": configurations,
        "trainers": {c: [t for c2, t in members if c2 == c] for c in configurations},
    }


def _grid_search(
    files: Sequence[dict[str, Path]],
    cases: Sequence[str],
    references: dict[str, Path],
    metric: str,
    progress: bool,
    declared: Mapping[str, int],
    protocol: str | Protocol = DEFAULT_PROTOCOL,
) -> list[dict[str, Any]]:
    """Score every (threshold, minimum size) pair over ``cases`` for the ensemble whose members' validation
    probabilities are ``files`` (one case -> file mapping per member): the mean per-case score of ``metric``, or,
    for ``mean_rank``, the grid point's mean rank (:func:`rank_grid`). Under a challenge's protocol each point also
    holds ``means``: the mean over cases of each of the protocol's metrics."""
    protocol = get_protocol(protocol)
    # One physical size per candidate, so the choice applies alike to scans of any resolution.
    voxel = float(np.median([read_header(references[case])[0].voxel_volume_mm3 for case in cases]))
    sizes = [size for size in MIN_SIZES_VOXELS if size * voxel <= MAX_MIN_LESION_MM3]
    scores = {(t, s): [] for t in THRESHOLDS for s in sizes}
    values = {(t, s): {name: [] for name in protocol.metrics} for t in THRESHOLDS for s in sizes}
    # The challenges' metrics cost connected components only, so their grid always holds all four.
    overlap_only = metric == "dice" and not protocol.is_challenge
    for case in tqdm(cases, desc="tune post-processing", disable=not progress):
        reference, geometry = _reference_classes(references[case], declared)
        mean = np.mean([_load(member[case]) for member in files], axis=0)
        for threshold in THRESHOLDS:
            labels = postprocess_probabilities(mean, geometry.spacing, threshold, 0.0)
            for size in sizes:
                kept = remove_small_components(labels, geometry.spacing, size * voxel)
                per_label = score_case(
                    kept, reference, geometry.spacing, _labels_of(mean), overlap_only=overlap_only, protocol=protocol
                )
                if metric != "mean_rank":
                    scores[(threshold, size)].append(case_score(per_label, metric))
                if protocol.is_challenge:
                    case_means = mean_over_labels(per_label)
                    for name, found in values[(threshold, size)].items():
                        found.append(case_means[name])
    grid = [
        {"threshold": t, "min_lesion_voxels": s, "min_lesion_mm3": round(s * voxel, 4), "score": _mean(scores[(t, s)])}
        for t, s in scores
    ]
    if protocol.is_challenge:
        for point, key in zip(grid, scores):
            point["means"] = {name: float(np.mean(found)) for name, found in values[key].items()}
    if metric == "mean_rank":
        for point, rank in zip(grid, rank_grid([point["means"] for point in grid])):
            point["score"] = rank
    return grid


def rank_grid(means: Sequence[Mapping[str, float]]) -> list[float]:
    """The mean rank of each grid point over its metrics, as the MICCAI 2022 ISLES / ATLAS challenges ranked teams
    (atlas.grand-challenge.org/Evaluation: "The overall rank is the mean rank across the metrics").

    Each metric ranks the points by their mean over cases, 1 the best (:data:`autoseg.evaluate.protocols.HIGHER_IS_BETTER`
    says which way); equal means share the mean of their ranks (``scipy.stats.rankdata(method="average")``). A point's
    score is the mean of its ranks: lower is better.

    Args:
        means: per grid point, metric -> mean over cases; every point has the same metrics.

    Returns:
        The mean rank of each point, in the order given.
    """
    names = list(means[0]) if means else []
    ranks = np.zeros(len(means))
    for name in names:
        column = np.array([point[name] for point in means], np.float64)
        ranks += rankdata(-column if name in HIGHER_IS_BETTER else column, method="average")
    return [float(rank / len(names)) for rank in ranks]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else 0.0
