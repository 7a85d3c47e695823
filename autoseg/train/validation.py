"""Validation while training and at the end of a fold.

Per epoch, the pseudo-Dice of validation patches: TP, FP and FN voxels summed over all batches
(:func:`dice_counts`, :func:`global_dice`) and its moving average (:func:`moving_average`), which picks
``checkpoint_best.pth``. At the end of a fold, the sliding-window prediction of whole validation cases, scored
against the raw labels into ``validation/summary.json`` (:func:`validate_cases`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.data.dataset import LESION_LABELS
from autoseg.distributed import DistributedContext, gather_objects
from autoseg.errors import DataError
from autoseg.evaluate.metrics import mean_over_labels, score_case
from autoseg.infer.predictor import Predictor
from autoseg.infer.quality import AgreementCounter
from autoseg.io.files import atomic_path, write_json
from autoseg.io.images import write_image, write_like
from autoseg.labels import classes_from_values, label_classes, read_label_file, values_from_classes
from autoseg.preprocess.cases import load_case
from autoseg.preprocess.preprocessing import restore_probabilities
from autoseg.train.losses import one_hot_foreground

#: The metrics of :func:`autoseg.evaluate.metrics.score_case` that ``validation/summary.json`` gives per case and averages.
VALIDATION_METRICS = ("dice", "hausdorff95", "lesion_f1")


def dice_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TP, FP and FN voxels per class of a batch, the prediction being ``sigmoid(logits) > 0.5``.

    Args:
        logits: (B, K, ...) full-resolution logits.
        target: (B, 1, ...) integer labels.

    Returns:
        (3, K) int64 on the CPU: rows TP, FP, FN.
    """
    prediction = logits.detach() > 0
    reference = one_hot_foreground(target, logits.shape[1]).bool()
    axes = [0, *range(2, logits.ndim)]
    counts = [
        (prediction & reference).sum(axes),
        (prediction & ~reference).sum(axes),
        (~prediction & reference).sum(axes),
    ]
    return torch.stack(counts).long().cpu()


def global_dice(counts: torch.Tensor) -> float:
    """nnU-Net's pseudo-Dice from (3, K) summed counts: 2TP / (2TP + FP + FN) per class, averaged over the
    classes where it is defined; NaN when no class had a lesion voxel in reference or prediction."""
    tp, fp, fn = counts.double()
    denominator = 2 * tp + fp + fn
    per_class = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.nan)
    return float(per_class.nanmean()) if bool((denominator > 0).any()) else math.nan


def moving_average(previous: float, dice: float, alpha: float) -> float:
    """The moving-average pseudo-Dice once the epoch's ``dice`` joins: ``alpha·previous + (1 − alpha)·dice``;
    ``previous`` when ``dice`` is NaN (no validation), ``dice`` when ``previous`` is NaN (the first score)."""
    return previous if math.isnan(dice) else dice if math.isnan(previous) else alpha * previous + (1 - alpha) * dice


def validate_cases(
    predictor: Predictor,
    data_folder: Path,
    cases: Sequence[str],
    references: dict[str, Path],
    output_folder: Path,
    about: dict[str, Any] | None = None,
    images: dict[str, Path] | None = None,
    context: DistributedContext | None = None,
    labels: Mapping[str, int] = LESION_LABELS,
) -> dict[str, Any]:
    """Predict whole preprocessed cases, restore them to the original grid, post-process, write them as NIfTI and
    score them against the raw labels with :func:`autoseg.evaluate.metrics.score_case`, as ``autoseg_evaluate`` and
    ``autoseg_find_best`` do: class ``k`` (channel ``k - 1``, the ``k``-th declared non-zero label value,
    ``autoseg.labels``) on ``prediction == k`` against ``reference == k``, the reference read as classes.
    The probabilities are rounded to float16 before post-processing, as ``CASE_probabilities.npz`` keeps them, so
    ``autoseg_find_best`` at the same post-processing makes the same labels and scores.

    Preprocessed cases, their restored probabilities and the references are all in the canonical orientation
    (``autoseg.io.images.read_image``), so they are compared voxel for voxel; ``CASE_probabilities.npz`` stays in it.

    Args:
        predictor: the trained network(s) and configuration (sliding window, mirroring, post-processing).
        data_folder: the preprocessed cases (``CASE.npy`` and ``CASE.json`` with the original geometry).
        cases: identifiers to predict.
        references: case -> raw label file.
        output_folder: where ``CASE.nii.gz`` and ``summary.json`` go.
        about: written at the top of the summary (e.g. trainer, configuration, fold, epochs).
        images: case -> raw channel-0 image: ``CASE.nii.gz`` is written in its orientation with its header
            (``autoseg.io.images.write_like``); None or a case not listed: written on the canonical grid as it is.
        context: in a distributed run, rank r predicts cases r, r + W, ... and the metrics of every rank are
            gathered; rank 0 writes ``summary.json`` and every rank returns the whole summary.
        labels: the dataset's declared labels (``dataset.json``, the plans' ``labels``): ``CASE.nii.gz`` holds these
            values, and the per-label scores are keyed by them.

    Returns:
        The summary: ``cases`` (case -> ``dice``, ``hausdorff95`` in mm, ``lesion_f1``, ``reference_voxels``,
        ``predicted_voxels`` and ``qc``, the agreement between the networks' mirrorings and between the networks at
        the plans' threshold (``autoseg.infer.quality``), which ``autoseg_find_best`` calibrates the QC score with; with several labels the metrics are the mean over labels (NaN left out), the counts
        the sums, and each label's own under ``labels``), ``mean`` of each metric over cases (NaN values left out)
        and ``nan_count``. NaN is written as null.

    Raises:
        ValueError: a case without a reference, or a reference on another grid than the prediction.
    """
    context = context or DistributedContext()
    values = label_classes(labels)
    per_case = {}
    for case in list(cases)[context.rank :: context.world_size]:
        if case not in references or references[case] is None:
            raise DataError(f"validation case {case} has no label file in the raw dataset")
        data, _, properties = load_case(data_folder, case, mmap=True)
        geometry = properties.geometry
        agreement = AgreementCounter(predictor.configuration.postprocessing.threshold)
        # Rounded as CASE_probabilities.npz stores them, so autoseg_find_best remakes these labels exactly.
        probabilities = restore_probabilities(predictor.predict_preprocessed(data, agreement=agreement), properties)
        probabilities = probabilities.astype(np.float16).astype(np.float32)
        classes = predictor.postprocess(probabilities, geometry.spacing)
        written = values_from_classes(classes, labels)
        if images is not None and images.get(case) is not None:
            write_like(written, geometry, output_folder / f"{case}.nii.gz", images[case])
        else:
            write_image(written, geometry, output_folder / f"{case}.nii.gz")
        _save_probabilities(probabilities, output_folder / f"{case}_probabilities.npz")
        found = read_label_file(references[case])
        differences = geometry.differences(found.geometry)
        if differences:
            raise DataError(f"{references[case]}: the label's grid differs from the image's: {'; '.join(differences)}")
        reference = classes_from_values(found.array, labels, references[case])
        scores = score_case(classes, reference, found.geometry.spacing, range(1, len(probabilities) + 1))
        per_case[case] = _summary_entry({values[k]: metrics for k, metrics in scores.items()})
        # what only the prediction itself can measure, for autoseg_find_best's QC calibration
        per_case[case]["qc"] = {
            "mirroring_agreement": agreement.mirroring_agreement(),
            "member_agreement": agreement.member_agreement(),
            "mirrorings": agreement.mirrorings,
            "members": agreement.members,
            "threshold": agreement.threshold,
        }
    if context.enabled:
        gathered = {case: metrics for part in gather_objects(per_case) for case, metrics in part.items()}
        per_case = {case: gathered[case] for case in cases}
    summary = {**(about or {}), "cases": per_case, **_means(per_case)}
    if context.is_main:
        write_json(_nan_to_none(summary), output_folder / "summary.json")
    return summary


def _save_probabilities(probabilities: np.ndarray, path: Path) -> None:
    """Write (K, X, Y, Z) probabilities on the original grid as ``probabilities`` (float16) in a compressed
    ``.npz``, atomically; ``autoseg_find_best`` tunes ensembles and post-processing on them."""
    with atomic_path(path, suffix=".npz") as temporary:
        with open(temporary, "wb") as handle:
            np.savez_compressed(handle, probabilities=probabilities.astype(np.float16))


def _summary_entry(scores: dict[int, dict[str, float]]) -> dict[str, Any]:
    """A case of ``summary.json`` from :func:`autoseg.evaluate.metrics.score_case`: :data:`VALIDATION_METRICS` (the mean over
    labels when there are several, each label's under ``labels``) and the voxel counts (summed over labels)."""

    def entry(metrics: dict[str, float]) -> dict[str, Any]:
        return {
            **{name: metrics[name] for name in VALIDATION_METRICS},
            "reference_voxels": int(metrics["tp_voxels"] + metrics["fn_voxels"]),
            "predicted_voxels": int(metrics["tp_voxels"] + metrics["fp_voxels"]),
        }

    result = entry(
        {
            **mean_over_labels(scores),
            **{name: sum(m[name] for m in scores.values()) for name in ("tp_voxels", "fp_voxels", "fn_voxels")},
        }
    )
    if len(scores) > 1:
        result["labels"] = {str(label): entry(metrics) for label, metrics in scores.items()}
    return result


def _means(per_case: dict[str, dict]) -> dict[str, dict[str, float]]:
    means, nans = {}, {}
    for metric in VALIDATION_METRICS:
        values = np.array([case[metric] for case in per_case.values()], dtype=float)
        finite = values[np.isfinite(values)]
        means[metric] = float(finite.mean()) if finite.size else math.nan
        nans[metric] = int(values.size - finite.size)
    return {"mean": means, "nan_count": nans}


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
