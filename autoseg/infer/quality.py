"""How far a prediction can be trusted: the per-case quality-control (QC) score, the review flag, the voxelwise
uncertainty map and the calibration of the score on the cross-validation.

**Agreement** (:class:`AgreementCounter`): every network of the ensemble (folds, checkpoints; configurations) is a
*member*, every test-time mirroring of a member a *view* (``autoseg.infer.sliding_window``'s ``views``). Each
member's and each view's mask is its lesion probability at the post-processing threshold. ``member_agreement`` is
the mean pairwise Dice between the members' masks, ``mirroring_agreement`` the mean over members of the mean pairwise
Dice between a member's views. Two empty masks agree (Dice 1). The mean pairwise Dice between ensemble members is
the baseline the failure-detection literature sets for a QC score (Zenk et al., "Comparative benchmarking of failure
detection methods in medical image segmentation", Medical Image Analysis 2025).

**Uncertainty** (:func:`predictive_entropy`): the binary entropy, in bits (0 certain ... 1 at p = 0.5), of the
ensemble's mean lesion probability, i.e. of the mean over members and mirrorings: the predictive entropy of deep
ensembles (Lakshminarayanan et al., NeurIPS 2017; for segmentation Mehrtash et al., IEEE TMI 2020). It is high where
the members or mirrorings disagree and where all of them hesitate; it needs nothing beyond the mean that prediction
computes anyway, so it is written on the input's grid at no extra cost.

**QC score** (:func:`qc_score`), in [0, 1], higher is better: the mean of the agreement and confidence components
that are available (``member_agreement``; ``mirroring_agreement``; ``confidence`` = 1 − the mean predictive entropy
over the predicted lesion's voxels), times ``volume_plausibility``: 1 when the total predicted volume lies within
the training cases' range (``lesion_volume_ml`` of the training ranges, ``autoseg.api.input_checks``), else the ratio of the
volume to the nearest end of that range (below 1, e.g. 0.1 for a tenth of the smallest training volume); an empty
prediction scores 0 when every training case had a lesion and 1 otherwise. Without a training range the factor is
left out.

**Review flag**: a case is flagged when its score is below the review threshold: the one ``autoseg_find_best``
calibrated (:class:`QCCalibration`, ``qc_calibration.json`` beside ``postprocessing.json``, carried by a one-file
model), else :data:`DEFAULT_REVIEW_THRESHOLD`; and when its input lies outside the training range (the input checks).

**Calibration** (:meth:`QCCalibration.fit`): on the cross-validation cases, where the true Dice is known, the
expected Dice given the score is the isotonic (non-decreasing) regression of Dice on score, and the threshold the one
that best separates cases with Dice below :data:`FAILURE_DICE` (0.5) from the others (Youden's J). In the
cross-validation each case is predicted by one fold, so ``member_agreement`` there exists only between
configurations; with several folds at prediction time it also compares folds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from scipy.optimize import isotonic_regression

from autoseg.errors import InvalidFileError

__all__ = [
    "DEFAULT_REVIEW_THRESHOLD",
    "FAILURE_DICE",
    "AgreementCounter",
    "QCCalibration",
    "QualityComponents",
    "TrainingVolumes",
    "assess",
    "auroc",
    "pairwise_dice",
    "predictive_entropy",
    "qc_score",
    "volume_plausibility",
]

#: Review threshold on the QC score when no calibration exists for the members predicted.
DEFAULT_REVIEW_THRESHOLD = 0.5

#: A case with a true Dice below this counts as a failure, for calibration and the benchmark.
FAILURE_DICE = 0.5


def pairwise_dice(masks: Sequence[np.ndarray | torch.Tensor]) -> float | None:
    """Mean Dice over every pair of same-shaped boolean masks (two empty masks: 1); None for fewer than two.

    Example:
        >>> a, b = np.zeros(4, bool), np.zeros(4, bool)
        >>> a[:2], b[1:3] = True, True
        >>> pairwise_dice([a, b, a])  # (0.5 + 1 + 0.5) / 3
        0.6666666666666666
    """
    if len(masks) < 2:
        return None
    arrays = [m.numpy() if isinstance(m, torch.Tensor) else np.asarray(m) for m in masks]
    arrays = _crop_to_union(arrays)
    sizes = [int(a.sum()) for a in arrays]
    values = []
    for (i, a), (j, b) in itertools.combinations(enumerate(arrays), 2):
        total = sizes[i] + sizes[j]
        values.append(1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total)
    return float(np.mean(values))


def _crop_to_union(masks: list[np.ndarray]) -> list[np.ndarray]:
    """The masks cropped to the bounding box of their union (all of them empty: one voxel of each)."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return [m.reshape(-1)[:1] for m in masks]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    return [m[box] for m in masks]


def predictive_entropy(probability: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of a lesion probability map (any shape), float32 in [0, 1].

    Example:
        >>> predictive_entropy(np.array([0.0, 0.5, 1.0])).tolist()
        [0.0, 1.0, 0.0]
    """
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-12, 1 - 1e-12)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.where((probability <= 0) | (probability >= 1), 0.0, entropy).astype(np.float32)


class AgreementCounter:
    """Collects members' and views' masks of one case and reports their mean pairwise Dice.

    Members of one configuration share its preprocessed grid and are compared there (:meth:`add_member`);
    configurations on different grids are compared on the input grid (:meth:`add_configuration`). Only boolean
    masks are kept: one per member and configuration, never a view's.

    Args:
        threshold: lesion probability at which a voxel belongs to a mask (the post-processing threshold).
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._members: list[np.ndarray] = []
        self._member_pairs: list[float] = []
        self._mirroring: list[float] = []
        self._configurations: list[np.ndarray] = []
        self.members = 0
        self.mirrorings = 0

    def add_member(self, views: torch.Tensor | np.ndarray) -> None:
        """One member of the current configuration: its (F, *S) views' lesion probabilities on the configuration's
        grid; its own mask is their mean at the threshold."""
        views = torch.as_tensor(views)
        self.members += 1
        self.mirrorings = int(views.shape[0])
        masks = [(view >= self.threshold).numpy() for view in views]
        if len(masks) > 1:
            self._mirroring.append(pairwise_dice(masks))
        self._members.append((views.mean(dim=0) >= self.threshold).numpy())

    def end_configuration(self, lesion_probability: np.ndarray | None = None) -> None:
        """Close the current configuration: pair its members; ``lesion_probability`` (its mean on the input grid)
        joins the comparison between configurations."""
        if len(self._members) > 1:
            pairs = len(self._members) * (len(self._members) - 1) // 2
            self._member_pairs.extend([pairwise_dice(self._members)] * pairs)
        self._members = []
        if lesion_probability is not None:
            self._configurations.append(lesion_probability >= self.threshold)

    def member_agreement(self) -> float | None:
        """Mean pairwise Dice over every pair of members compared (within and between configurations)."""
        pairs = list(self._member_pairs)
        if len(self._configurations) > 1:
            count = len(self._configurations) * (len(self._configurations) - 1) // 2
            pairs.extend([pairwise_dice(self._configurations)] * count)
        return float(np.mean(pairs)) if pairs else None

    def mirroring_agreement(self) -> float | None:
        """Mean over members of the mean pairwise Dice between its mirrorings; None without mirroring."""
        return float(np.mean(self._mirroring)) if self._mirroring else None


@dataclass(frozen=True)
class TrainingVolumes:
    """The range of the training cases' total lesion volumes (ml, per case) and whether a training case had none."""

    min_ml: float
    max_ml: float
    lesion_free_cases: bool

    @classmethod
    def from_ranges(cls, lesion_count: Sequence[int], lesion_volume_ml: Sequence[float]) -> TrainingVolumes:
        """From the (min, max) lesion count and total lesion volume (ml) per training case
        (``autoseg.plan.fingerprint.TrainingRanges``); a minimum count of 0 means a training case had no lesion."""
        return cls(float(lesion_volume_ml[0]), float(lesion_volume_ml[1]), int(lesion_count[0]) == 0)

    def describe(self) -> str:
        return f"{self.min_ml:.3g}-{self.max_ml:.3g} ml"


def volume_plausibility(total_ml: float, training: TrainingVolumes) -> float:
    """1 inside the training range, else the ratio of ``total_ml`` to the nearest end of it (see the module
    docstring); an empty prediction: 1 when a training case had no lesion, else 0."""
    if total_ml <= 0:
        return 1.0 if training.lesion_free_cases else 0.0
    if total_ml < training.min_ml:  # min_ml > 0 here: with a lesion-free training case it is 0
        return total_ml / training.min_ml
    if total_ml > training.max_ml:
        return training.max_ml / total_ml
    return 1.0


@dataclass(frozen=True)
class QualityComponents:
    """What the QC score is made of; None where it is not available (see the module docstring)."""

    member_agreement: float | None
    mirroring_agreement: float | None
    confidence: float | None
    volume_plausibility: float | None
    members: int = 1
    mirrorings: int = 1

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def assess(
    mask: np.ndarray,
    entropy: np.ndarray,
    voxel_volume_ml: float,
    training: TrainingVolumes | None,
    member_agreement: float | None = None,
    mirroring_agreement: float | None = None,
    members: int = 1,
    mirrorings: int = 1,
) -> QualityComponents:
    """The QC components of one case from its final lesion mask and the entropy of its mean lesion probability.

    Args:
        mask: (X, Y, Z) boolean lesion mask as written (after post-processing), on the input grid.
        entropy: (X, Y, Z) :func:`predictive_entropy` of the mean lesion probability, same grid.
        voxel_volume_ml: the grid's voxel volume in ml.
        training: the training cases' lesion volumes, or None when unknown.
        member_agreement, mirroring_agreement, members, mirrorings: from an :class:`AgreementCounter`.
    """
    inside = np.count_nonzero(mask)
    return QualityComponents(
        member_agreement=member_agreement,
        mirroring_agreement=mirroring_agreement,
        confidence=float(1.0 - entropy[mask].mean()) if inside else None,
        volume_plausibility=None if training is None else volume_plausibility(inside * voxel_volume_ml, training),
        members=members,
        mirrorings=mirrorings,
    )


def qc_score(components: QualityComponents) -> float:
    """The QC score in [0, 1] (see the module docstring): the mean of the available agreement and confidence
    components (1 when none is available) times the volume plausibility when known."""
    parts = [
        value
        for value in (components.member_agreement, components.mirroring_agreement, components.confidence)
        if value is not None
    ]
    score = float(np.mean(parts)) if parts else 1.0
    if components.volume_plausibility is not None:
        score *= components.volume_plausibility
    return float(min(1.0, max(0.0, score)))


def auroc(scores: Sequence[float], failed: Sequence[bool]) -> float:
    """Area under the ROC curve of flagging by a low score: the probability that a failed case scores lower than a
    successful one (ties count half; Mann-Whitney U); NaN without both kinds of cases."""
    scores, failed = np.asarray(scores, float), np.asarray(failed, bool)
    bad, good = scores[failed], scores[~failed]
    if len(bad) == 0 or len(good) == 0:
        return math.nan
    lower = (bad[:, None] < good[None, :]).sum() + 0.5 * (bad[:, None] == good[None, :]).sum()
    return float(lower / (len(bad) * len(good)))


@dataclass
class QCCalibration:
    """How the QC score relates to Dice for a set of members, fitted on their cross-validation cases.

    Attributes:
        members: the ``configuration/trainer`` members it was fitted for (prediction uses it only for exactly these).
        threshold: a case scoring below it is flagged for review.
        scores, expected_dice: knots of the isotonic fit (scores ascending); :meth:`expected` interpolates.
        cases, failures: cross-validation cases fitted and how many had Dice below :data:`FAILURE_DICE`.
        spearman, auroc: on those cases (NaN where undefined).
        rule: how the threshold was chosen.
    """

    members: list[str]
    threshold: float
    scores: list[float]
    expected_dice: list[float]
    cases: int
    failures: int
    spearman: float
    auroc: float
    rule: str
    failure_dice: float = FAILURE_DICE
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, members: Sequence[str], scores: Sequence[float], dice: Sequence[float]) -> QCCalibration:
        """Fit on per-case QC scores and true Dice (NaN Dice, e.g. empty reference and prediction, left out).

        Raises:
            ValueError: fewer than two cases with a Dice.
        """
        pairs = sorted((float(s), float(d)) for s, d in zip(scores, dice) if math.isfinite(d) and math.isfinite(s))
        if len(pairs) < 2:
            raise ValueError("calibrating the QC score needs at least two cases with a Dice")
        x = np.array([p[0] for p in pairs])
        y = np.array([p[1] for p in pairs])
        fitted = isotonic_regression(y, increasing=True).x
        knots_x, knots_y = [], []
        for value in np.unique(x):
            knots_x.append(float(value))
            knots_y.append(float(np.mean(fitted[x == value])))
        failed = y < FAILURE_DICE
        threshold, rule = _youden_threshold(x, failed)
        rho = float(stats.spearmanr(x, y).statistic) if len(np.unique(x)) > 1 and len(np.unique(y)) > 1 else math.nan
        return cls(
            members=sorted(members),
            threshold=threshold,
            scores=knots_x,
            expected_dice=knots_y,
            cases=len(pairs),
            failures=int(failed.sum()),
            spearman=rho,
            auroc=auroc(x, failed),
            rule=rule,
        )

    def expected(self, score: float) -> float:
        """Expected Dice at ``score`` (the isotonic fit, flat beyond its ends)."""
        return float(np.interp(score, self.scores, self.expected_dice))

    def to_json(self) -> dict[str, Any]:
        plain = dict(self.__dict__)
        for key in ("spearman", "auroc"):
            plain[key] = None if math.isnan(plain[key]) else plain[key]
        return plain

    @classmethod
    def from_json(cls, data: Any, source: str = "qc_calibration.json") -> QCCalibration:
        """Read what :meth:`to_json` wrote.

        Raises:
            InvalidFileError: a field is missing or of the wrong type, or the knots disagree in length.
        """
        try:
            calibration = cls(
                members=[str(m) for m in data["members"]],
                threshold=float(data["threshold"]),
                scores=[float(v) for v in data["scores"]],
                expected_dice=[float(v) for v in data["expected_dice"]],
                cases=int(data["cases"]),
                failures=int(data["failures"]),
                spearman=math.nan if data["spearman"] is None else float(data["spearman"]),
                auroc=math.nan if data["auroc"] is None else float(data["auroc"]),
                rule=str(data["rule"]),
                failure_dice=float(data.get("failure_dice", FAILURE_DICE)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidFileError(f"{source}: not a QC calibration ({type(error).__name__}: {error})") from None
        if len(calibration.scores) != len(calibration.expected_dice) or not calibration.scores:
            raise InvalidFileError(f"{source}: scores and expected_dice must be non-empty lists of the same length")
        if not 0.0 <= calibration.threshold <= 1.0:
            raise InvalidFileError(f"{source}: threshold {calibration.threshold} outside [0, 1]")
        return calibration


def _youden_threshold(scores: np.ndarray, failed: np.ndarray) -> tuple[float, str]:
    """The threshold t (flag ``score < t``) maximizing sensitivity + specificity − 1 for failures, taken halfway
    between neighbouring scores (ties: the lower threshold, flagging fewer cases); without failures the lowest
    score seen, without successes just above the highest."""
    values = np.unique(scores)
    if not failed.any():
        return float(values[0]), "no cross-validation case failed: flag only scores below every case seen"
    if failed.all():
        return float(min(1.0, values[-1] + 1e-6)), "every cross-validation case failed: flag every case"
    candidates = [float(values[0])] + [float((a + b) / 2) for a, b in zip(values[:-1], values[1:])]
    candidates.append(float(min(1.0, values[-1] + 1e-6)))
    best, best_j = candidates[0], -math.inf
    for t in candidates:
        flagged = scores < t
        j = flagged[failed].mean() + (~flagged[~failed]).mean() - 1
        if j > best_j + 1e-12:
            best, best_j = t, j
    return best, f"Youden's J (sensitivity + specificity - 1 = {best_j:.2f}) for Dice < {FAILURE_DICE}"
