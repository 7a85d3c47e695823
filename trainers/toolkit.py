"""What the trainers share besides the loop in :mod:`trainers.base`: the training length after ``--epochs`` and
``--iters-per-epoch`` (:class:`Budget`), the fold's cases, the pseudo-Dice of validation patches, the algorithm
settings of a run, and the sliding-window validation of whole cases at the end of a fold (:func:`validate_cases`).

The run flags (``TrainingOptions``) and the fold (``Fold``, ``parse_fold``) are the library's
(:mod:`autoseg.train.options`): ``autoseg.api.train`` passes them to a trainer it never imports.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.data.dataset import LESION_LABELS
from autoseg.distributed import DistributedContext, gather_objects
from autoseg.errors import DataError, MissingFileError, UsageError
from autoseg.evaluate.metrics import mean_over_labels, score_case
from autoseg.infer.predictor import Predictor
from autoseg.io.files import atomic_path, write_json
from autoseg.io.images import write_image, write_like
from autoseg.labels import classes_from_values, label_classes, read_label_file, values_from_classes
from autoseg.plans import Schedule
from autoseg.preprocess.cases import load_case
from autoseg.preprocess.preprocessing import restore_probabilities
from autoseg.train.loading import case_identifiers
from autoseg.train.losses import one_hot_foreground
from autoseg.train.options import Fold
from autoseg.train.splits import SPLITS_FILE, load_or_create_splits, read_subjects

__all__ = [
    "Budget",
    "deterministic_algorithms",
    "dice_counts",
    "fold_cases",
    "global_dice",
    "validate_cases",
]

#: The metrics of :func:`autoseg.evaluate.metrics.score_case` that ``validation/summary.json`` gives per case and averages.
VALIDATION_METRICS = ("dice", "hausdorff95", "lesion_f1")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _default_val_iterations(schedule: Schedule, iterations_per_epoch: int) -> int:
    """The plans' validation batches per epoch when set and the iterations per epoch are the plans', else a fifth
    of the iterations per epoch (nnU-Net's 50 for 250)."""
    if schedule.val_iterations_per_epoch is not None and iterations_per_epoch == schedule.iterations_per_epoch:
        return schedule.val_iterations_per_epoch
    return max(1, _round_half_up(iterations_per_epoch / 5))


@dataclass(frozen=True)
class Budget:
    """How long a run trains: the plans' schedule, possibly shortened with ``--epochs``/``--iters-per-epoch``.

    With ``epochs`` other than the plans', every stage start epoch becomes ``start · epochs / plan_epochs``
    rounded (half up) and kept below ``epochs``, and the warm-restart period scales the same way (at least 1
    epoch). A stage squeezed to no epochs is skipped (the later stage starting at the same epoch wins).

    Attributes:
        epochs: epochs of the run.
        iterations_per_epoch: training iterations per epoch.
        val_iterations: validation batches per epoch (0: none).
        stage_starts: first epoch (0-based) of each stage of ``schedule.stages``.
        restart_period_epochs: cosine warm-restart period in epochs, if the plans give one.
    """

    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    stage_starts: tuple[int, ...]
    restart_period_epochs: int | None = None

    @classmethod
    def from_schedule(
        cls,
        schedule: Schedule,
        epochs: int | None = None,
        iterations_per_epoch: int | None = None,
        val_iterations: int | None = None,
    ) -> Budget:
        """The budget of ``schedule`` with the given overrides (None keeps the plans' value).

        Example:
            >>> Budget.from_schedule(schedule, epochs=4).stage_starts  # plans: 1000 epochs, stages at 0 and 875
            (0, 3)
        """
        new = epochs or schedule.epochs
        scale = new / schedule.epochs
        starts = tuple(min(_round_half_up(stage.start_epoch * scale), new - 1) for stage in schedule.stages)
        period = schedule.restart_period_epochs
        iterations = iterations_per_epoch or schedule.iterations_per_epoch
        return cls(
            epochs=new,
            iterations_per_epoch=iterations,
            val_iterations=_default_val_iterations(schedule, iterations) if val_iterations is None else val_iterations,
            stage_starts=starts,
            restart_period_epochs=None if period is None else max(1, _round_half_up(period * scale)),
        )

    def stage_at(self, epoch: int) -> int:
        """Index of the stage that trains ``epoch`` (0-based): the last one starting at or before it."""
        return max(index for index, start in enumerate(self.stage_starts) if start <= epoch)

    def stage_end(self, index: int) -> int:
        """The epoch after the last one of stage ``index`` (the next stage's start, or ``epochs``)."""
        later = [start for start in self.stage_starts[index + 1 :] if start > self.stage_starts[index]]
        return min(later, default=self.epochs)

    def to_plain(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "iterations_per_epoch": self.iterations_per_epoch,
            "val_iterations": self.val_iterations,
            "stage_starts": list(self.stage_starts),
            "restart_period_epochs": self.restart_period_epochs,
        }

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> Budget:
        return cls(**{**plain, "stage_starts": tuple(plain["stage_starts"])})


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, cudnn_benchmark: bool = False) -> Iterator[None]:
    """Within the block: ``torch.use_deterministic_algorithms(True, warn_only=True)`` when ``enabled``, and cuDNN's
    autotuner (``cudnn.benchmark``) on when ``cudnn_benchmark`` and not ``enabled``; the previous settings come
    back afterwards, so a run leaves the process as it found it."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cudnn_benchmark and not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


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


def fold_cases(
    preprocessed_dataset_folder: Path, data_folder: Path, fold: Fold, raw_cases: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Training and validation cases of ``fold``; ``full`` trains and validates on every case.

    The 5-fold split is made once, subject-grouped, and kept in ``splits_final.json`` (``autoseg.train.splits``). It
    must hold the preprocessed cases, no more and no fewer; so must the raw dataset (``raw_cases``, when given):
    a dataset that changed since it was preprocessed or split is refused here, before any training, rather than
    when the fold's validation meets a case that is gone.

    Raises:
        MissingFileError: no preprocessed cases.
        DataError: the preprocessed cases differ from ``raw_cases`` (the message names them and says to re-run
            ``autoseg_plan``).
        SplitsError: ``splits_final.json`` is malformed, or names a case that is not preprocessed or leaves one
            out (the message says how to re-split: ``autoseg_plan --resplit keep`` or ``fresh``).
        UsageError: too few cases for 5 folds (new splits), or a fold out of range.
    """
    identifiers = case_identifiers(data_folder)
    if not identifiers:
        raise MissingFileError(
            f"{data_folder}: no preprocessed cases; run autoseg_plan (or autoseg_plan --preprocess-only) "
            "for this dataset and configuration first"
        )
    if raw_cases is not None and set(raw_cases) != set(identifiers):
        added, removed = sorted(set(raw_cases) - set(identifiers)), sorted(set(identifiers) - set(raw_cases))
        raise DataError(
            f"{data_folder}: the raw dataset changed since it was preprocessed ("
            + ", ".join(
                [
                    *([f"new, not preprocessed: {added[:5]}"] if added else []),
                    *([f"preprocessed, no longer in the raw dataset: {removed[:5]}"] if removed else []),
                ]
            )
            + f"); re-run autoseg_plan -d {preprocessed_dataset_folder.name} first"
        )
    if fold == "full":
        return identifiers, identifiers
    path = preprocessed_dataset_folder / SPLITS_FILE
    try:
        splits = load_or_create_splits(
            preprocessed_dataset_folder, identifiers, read_subjects(data_folder, identifiers)
        )
    except ValueError as error:
        if path.is_file():  # an existing file's problems: its message says what to do
            raise
        raise UsageError(f"{error}; or write {path} by hand, or train with -f full") from None
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise UsageError(
            f"fold {fold} is out of range: {path} has {len(splits)} folds (0-{len(splits) - 1}); "
            "or use -f all / -f full"
        )
    return splits[fold]["train"], splits[fold]["val"]


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
        The summary: ``cases`` (case -> ``dice``, ``hausdorff95`` in mm, ``lesion_f1``, ``reference_voxels`` and
        ``predicted_voxels``; with several labels the metrics are the mean over labels (NaN left out), the counts
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
        # Rounded as CASE_probabilities.npz stores them, so autoseg_find_best remakes these labels exactly.
        probabilities = restore_probabilities(predictor.predict_preprocessed(data), properties)
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
