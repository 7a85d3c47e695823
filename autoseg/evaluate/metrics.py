"""Segmentation metrics for one case: overlap, surface distance, volume and lesion-wise counts.

Pure functions on numpy arrays. Masks are binary arrays of shape (X, Y, Z) (or (X, Y) for 2-D); any
non-zero value counts as foreground. ``spacing`` is the voxel size in mm per axis, in the same axis
order as the array, so anisotropic voxels give correct distances and volumes.

One case is scored by :func:`score_case` wherever the pipeline scores one: end-of-fold validation
(``validation/summary.json``), ``autoseg_find_best`` and ``autoseg_evaluate``. It takes the two label
maps and the labels to score, and scores each label on ``prediction == label`` against
``reference == label`` with :func:`evaluate_case` (autoseg's own metrics, below) or, for a challenge's protocol
(``autoseg.evaluate.protocols``: ``isles22``, ``atlas2``), with :func:`challenge_case`; :func:`mean_over_labels`
makes one value per metric of several labels.

Definitions (autoseg's own protocol):
    * Overlap: with TP, FP, FN voxel counts, Dice = 2TP / (2TP + FP + FN), sensitivity (TPR) =
      TP / (TP + FN), precision (PPV) = TP / (TP + FP).
    * Surface voxels: the mask minus its binary erosion with the full 3x3x3 (3x3 in 2-D) structuring
      element, voxels outside the array counting as background. A voxel is on the surface when any
      of its 26 (8) neighbours is background.
    * Surface distances: for every surface voxel of one mask, the Euclidean distance in mm to the
      nearest surface voxel of the other (``scipy.ndimage.distance_transform_edt`` with
      ``sampling=spacing``), in both directions.
    * HD: the largest of all those distances (both directions).
    * HD95: the 95th percentile (numpy's linear interpolation) of the *pooled* distances of both
      directions. MedPy's ``hd95`` computes the same with ``connectivity=3``; its default ``connectivity=1`` erodes
      with the 6-neighbour cross, so its surfaces hold fewer voxels and its values differ. MONAI and DeepMind's
      ``surface-distance`` take the larger of the two directed 95th percentiles instead, on surfaces of their own
      (``surface-distance``: surface elements on the voxel-corner grid weighted by their area, a percentile without
      interpolation); their HD95 can be larger or smaller than this one.
    * ASSD: the mean of the two directed mean surface distances, as MedPy's ``assd`` up to 0.4.0 computes it (with
      ``connectivity=3``; ``numpy.mean((asd(A, B), asd(B, A)))``). MedPy 0.5.0 and 0.5.1 take the mean of the two
      distance arrays themselves (the same where both surfaces have equal voxel counts, an error with NumPy >= 1.24
      otherwise), and 0.5.2 pools them: the mean over all distances of both directions (Heimann et al. 2009), which
      weights the direction with more surface voxels more.
    * Lesions: connected components with 26-connectivity in 3-D (8 in 2-D), as the ISLES 2022 evaluation code
      counts them (``cc3d``, ``connectivity=26``). The ATLAS R2.0 code counts 6-connected components
      (``scipy.ndimage.label``'s default structure); ``score_case(..., protocol="atlas2")`` reproduces it. A
      reference lesion is detected (TP) if it overlaps any predicted voxel, otherwise it is missed (FN); a
      predicted component overlapping no reference voxel is a false positive (FP). Lesion F1 = 2TP / (2TP + FP +
      FN). The lesion-count difference is |number of predicted components - number of reference lesions|.
    * mDSC: the largest Dice over binarizations ``probabilities >= t`` for the given thresholds.
    * micro-Dice: Dice of the TP, FP, FN voxel counts summed over all cases of a data set.

Empty masks (what "nothing to find" and "found where nothing is" mean):

    ==========================  =====  ===========  =========  ==============  ==========
    case                        Dice   sensitivity  precision  HD, HD95, ASSD  lesion F1
    ==========================  =====  ===========  =========  ==============  ==========
    both empty                  1      1            1          0               1
    reference empty only        0      NaN          0          NaN             0
    prediction empty only       0      0            NaN        NaN             0
    ==========================  =====  ===========  =========  ==============  ==========

NaN means "undefined": a distance to an empty surface does not exist, and a worst-case stand-in
(such as the image diagonal) would dominate any mean. NaN values are left out of means and the
folder summary reports how many cases were NaN for each metric. The relative volume difference is 0
when both masks are empty and NaN when only the reference is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from autoseg.evaluate.protocols import DEFAULT_PROTOCOL, Protocol, get_protocol

#: A binary mask, shape (X, Y, Z) or (X, Y); non-zero is foreground.
Mask = np.ndarray
#: Voxel size in mm per axis, same order as the array axes.
Spacing = Sequence[float]

#: Thresholds tried for mDSC when none are given: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))
#: The connectivities of lesion components cc3d offers, by the number of axes; the last is the full neighbourhood.
LESION_CONNECTIVITIES: dict[int, tuple[int, ...]] = {2: (4, 8), 3: (6, 18, 26)}
#: HD normaliser of the combined Dice/HD score: 200 voxels in Clerigues et al., on 1 mm isotropic ISLES 2015 data.
DEFAULT_HD_MAX_MM = 200.0


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection result (see the module docstring for the matching rule).

    Attributes:
        f1: 2TP / (2TP + FP + FN); 1 when both masks are empty.
        tp: reference lesions overlapped by the prediction.
        fp: predicted components overlapping no reference lesion.
        fn: reference lesions not overlapped.
        count_difference: |predicted components - reference lesions|.
        num_reference: reference lesions.
        num_prediction: predicted components.
    """

    f1: float
    tp: int
    fp: int
    fn: int
    count_difference: int
    num_reference: int
    num_prediction: int


@dataclass(frozen=True)
class VolumeDifference:
    """Volume disagreement between prediction and reference.

    Attributes:
        absolute_mm3: |V_prediction - V_reference| in mm^3.
        relative: |V_prediction - V_reference| / V_reference; 0 when both are empty, NaN when only
            the reference is.
    """

    absolute_mm3: float
    relative: float


def dice(prediction: Mask, reference: Mask) -> float:
    """Dice similarity coefficient 2TP / (2TP + FP + FN) of two masks of equal shape; 1 if both are empty."""
    return dice_from_counts(*_confusion_counts(*_as_masks(prediction, reference)))


def sensitivity(prediction: Mask, reference: Mask) -> float:
    """True positive rate TP / (TP + FN); 1 if both masks are empty, NaN if only the reference is."""
    tp, fp, fn = _confusion_counts(*_as_masks(prediction, reference))
    return _ratio(tp, tp + fn, both_empty=fp == 0)


def precision(prediction: Mask, reference: Mask) -> float:
    """Positive predictive value TP / (TP + FP); 1 if both masks are empty, NaN if only the prediction is."""
    tp, fp, fn = _confusion_counts(*_as_masks(prediction, reference))
    return _ratio(tp, tp + fp, both_empty=fn == 0)


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice from voxel counts: 2TP / (2TP + FP + FN), and 1 when all three are 0."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def micro_dice(pairs: Iterable[tuple[Mask, Mask]]) -> float:
    """Data-set-level Dice from TP, FP and FN voxel counts summed over ``(prediction, reference)`` pairs.

    Unlike the mean of per-case Dice, large lesions weigh more and empty cases do not pull it to 0 or 1.
    """
    totals = np.zeros(3, dtype=np.int64)
    for prediction, reference in pairs:
        totals += _confusion_counts(*_as_masks(prediction, reference))
    return dice_from_counts(*(int(v) for v in totals))


def volume_difference(prediction: Mask, reference: Mask, spacing: Spacing) -> VolumeDifference:
    """Absolute (mm^3) and relative volume difference; ``spacing`` in mm per axis."""
    pred, ref, spacing = _validated(prediction, reference, spacing)
    voxel = float(np.prod(spacing))
    return _volume_difference(int(pred.sum()) * voxel, int(ref.sum()) * voxel)


def surface_voxels(mask: Mask) -> np.ndarray:
    """Surface of a mask: the mask minus its erosion by the full 3x3x3 (3x3) structure; bool, same shape."""
    mask = np.asarray(mask, dtype=bool)
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    # border_value=0: a voxel on the array border is surface, as if the image were padded with background.
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(prediction: Mask, reference: Mask, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm.

    Returns:
        prediction_to_reference: for each surface voxel of the prediction, the distance to the nearest
            reference surface voxel, shape (N_prediction_surface,).
        reference_to_prediction: the same the other way round, shape (N_reference_surface,).
        Both are empty when either mask is empty (there is nothing to measure to).
    """
    pred, ref, spacing = _validated(prediction, reference, spacing)
    if not pred.any() or not ref.any():
        return np.zeros(0), np.zeros(0)
    return _directed_distances(*_crop_to_union(pred, ref), spacing)


def hausdorff(prediction: Mask, reference: Mask, spacing: Spacing) -> float:
    """Hausdorff distance in mm: the largest symmetric surface distance. 0 if both empty, NaN if one is."""
    return _distance_metrics(*_validated(prediction, reference, spacing))["hausdorff"]


def hausdorff95(prediction: Mask, reference: Mask, spacing: Spacing) -> float:
    """95th percentile in mm of the pooled surface distances of both directions (MedPy's ``hd95``).

    0 if both masks are empty, NaN if one is.
    """
    return _distance_metrics(*_validated(prediction, reference, spacing))["hausdorff95"]


def assd(prediction: Mask, reference: Mask, spacing: Spacing) -> float:
    """Average symmetric surface distance in mm: mean of the two directed mean distances (MedPy's ``assd``).

    0 if both masks are empty, NaN if one is.
    """
    return _distance_metrics(*_validated(prediction, reference, spacing))["assd"]


def lesion_wise(prediction: Mask, reference: Mask, connectivity: int | None = None) -> LesionCounts:
    """Lesion-wise detection on connected components.

    A reference lesion overlapping any predicted voxel is a TP, otherwise an FN; a predicted component
    overlapping no reference voxel is an FP. F1 = 2TP / (2TP + FP + FN), 1 when both masks are empty.

    Args:
        prediction, reference: binary masks of equal shape, (X, Y, Z) or (X, Y).
        connectivity: neighbours joining voxels into one lesion: 6, 18 or 26 in 3-D, 4 or 8 in 2-D; None (default)
            the full neighbourhood, 26 (8), as ISLES 2022 counts lesions. ATLAS R2.0 counts 6-connected ones.

    Raises:
        ValueError: shapes differ, the masks are not 2-D or 3-D, or ``connectivity`` does not fit their dimension.
    """
    pred, ref = _as_masks(prediction, reference)
    allowed = LESION_CONNECTIVITIES[ref.ndim]
    connectivity = allowed[-1] if connectivity is None else connectivity
    if connectivity not in allowed:
        raise ValueError(f"connectivity {connectivity} does not fit {ref.ndim}-D masks; use one of {list(allowed)}")
    ref_labels, num_ref = cc3d.connected_components(ref, connectivity=connectivity, return_N=True)
    pred_labels, num_pred = cc3d.connected_components(pred, connectivity=connectivity, return_N=True)
    overlap = pred & ref
    tp = int(np.count_nonzero(np.unique(ref_labels[overlap])))
    matched_predictions = int(np.count_nonzero(np.unique(pred_labels[overlap])))
    fp = int(num_pred) - matched_predictions
    fn = int(num_ref) - tp
    return LesionCounts(
        f1=dice_from_counts(tp, fp, fn),  # 2TP / (2TP + FP + FN) is the same formula as Dice
        tp=tp,
        fp=fp,
        fn=fn,
        count_difference=abs(int(num_pred) - int(num_ref)),
        num_reference=int(num_ref),
        num_prediction=int(num_pred),
    )


def dice_over_thresholds(
    probabilities: np.ndarray, reference: Mask, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> np.ndarray:
    """Dice of ``probabilities >= t`` against ``reference`` for each threshold, in the order given.

    Args:
        probabilities: lesion probabilities in [0, 1], same shape as ``reference``.
        reference: binary mask.
        thresholds: thresholds to try (default 0.05, 0.10, ..., 0.95).

    Returns:
        Dice per threshold, shape (len(thresholds),).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    ref = np.asarray(reference, dtype=bool)
    if probabilities.shape != ref.shape:
        raise ValueError(f"probabilities shape {probabilities.shape} differs from reference shape {ref.shape}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.size == 0:
        raise ValueError("at least one threshold is needed")
    # Counting through sorted values answers every threshold with one sort instead of one pass each.
    above_lowest = np.sort(probabilities[probabilities >= thresholds.min()])
    in_reference = np.sort(probabilities[ref])
    predicted = above_lowest.size - np.searchsorted(above_lowest, thresholds, side="left")
    tp = in_reference.size - np.searchsorted(in_reference, thresholds, side="left")
    denominator = predicted + in_reference.size
    return np.where(denominator == 0, 1.0, 2.0 * tp / np.maximum(denominator, 1))


def max_dice_over_thresholds(
    probabilities: np.ndarray, reference: Mask, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> float:
    """Maximal Dice (mDSC) over binarizations ``probabilities >= t``; see :func:`dice_over_thresholds`."""
    return float(np.max(dice_over_thresholds(probabilities, reference, thresholds)))


def dice_hausdorff_score(dice_value: float, hausdorff_mm: float, hd_max_mm: float = DEFAULT_HD_MAX_MM) -> float:
    """Combined score used to choose a threshold: DSC * h / (DSC + h) with h = 1 - HD / HD_max.

    Equation 2 of Clerigues et al. (ISLES 2015 post-processing grid search): half the harmonic mean
    of Dice and the normalised HD, so it lies in [0, 0.5]. ``hd_max_mm`` defaults to the paper's 200
    voxels at 1 mm. h is clipped at 0 when HD > HD_max; the score is 0 when Dice and h are both 0 and
    NaN when HD is NaN (one mask empty).
    """
    if math.isnan(dice_value) or math.isnan(hausdorff_mm):
        return math.nan
    closeness = max(0.0, 1.0 - hausdorff_mm / hd_max_mm)
    total = dice_value + closeness
    return 0.0 if total == 0 else dice_value * closeness / total


def score_case(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Spacing,
    labels: Sequence[int] = (1,),
    probabilities: np.ndarray | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    overlap_only: bool = False,
    protocol: str | Protocol = DEFAULT_PROTOCOL,
) -> dict[int, dict[str, float]]:
    """Score one case, label by label: the one function end-of-fold validation (``autoseg.train.validation.validate_cases``),
    ``autoseg_find_best`` (``autoseg.api.select``) and ``autoseg_evaluate`` (``autoseg.evaluate.evaluation``) score with.

    Each label is scored on the masks ``prediction == label`` and ``reference == label`` (never ``> 0``: with
    several labels the union would credit a voxel given the wrong label), with :func:`evaluate_case` under the
    ``autoseg`` protocol and with :func:`challenge_case` under ``isles22`` or ``atlas2``.

    Args:
        prediction: predicted label map, shape (X, Y, Z) or (X, Y); 0 is background.
        reference: reference label map, same shape.
        spacing: voxel size in mm per axis, same axis order.
        labels: the labels to score (default ``(1,)``, the lesion of a single-label dataset).
        probabilities: optional probabilities, shape (len(labels), X, Y, Z) or (len(labels), X, Y): channel ``i``
            for ``labels[i]``; adds ``max_dice`` (mDSC).
        thresholds: thresholds for ``max_dice``.
        overlap_only: only the metrics of the voxel counts (Dice, sensitivity, precision, volumes, counts), without
            the surface distances and lesion components, which cost most of the time.
        protocol: ``autoseg`` (default), ``isles22`` or ``atlas2``, or a :class:`autoseg.evaluate.protocols.Protocol`.

    Returns:
        Label -> the metrics of :func:`evaluate_case` or :func:`challenge_case` (see :func:`mean_over_labels` for one
        value per case).

    Raises:
        ValueError: shapes differ, the array is not 2-D or 3-D (3-D for a challenge's protocol), ``spacing`` does not
            fit, no label is given, ``probabilities`` has not one channel per label, or probabilities are given to a
            challenge's protocol (mDSC is no metric of theirs).
        UnknownNameError: an unknown protocol name.

    Example:
        >>> reference = np.zeros((4, 4, 4), np.uint8); reference[:2] = 1; reference[2:] = 2
        >>> prediction = np.zeros_like(reference); prediction[:2] = 2; prediction[2:] = 1  # labels swapped
        >>> {label: m["dice"] for label, m in score_case(prediction, reference, (1, 1, 1), (1, 2)).items()}
        {1: 0.0, 2: 0.0}
    """
    labels = [int(label) for label in labels]
    if not labels:
        raise ValueError("at least one label to score is needed")
    protocol = get_protocol(protocol)
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if probabilities is not None and len(probabilities) != len(labels):
        raise ValueError(f"probabilities need one channel per label {labels}, got {len(probabilities)}")
    if protocol.is_challenge:
        if probabilities is not None:
            raise ValueError(f"the {protocol.name} protocol has no mDSC: score probabilities with the autoseg protocol")
        return {
            label: challenge_case(prediction == label, reference == label, spacing, protocol, overlap_only=overlap_only)
            for label in labels
        }
    return {
        label: evaluate_case(
            prediction == label,
            reference == label,
            spacing,
            None if probabilities is None else probabilities[index],
            thresholds,
            overlap_only=overlap_only,
        )
        for index, label in enumerate(labels)
    }


def mean_over_labels(scores: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """One value per metric for a case scored by :func:`score_case`: a single label's own values, or the mean over
    the labels with NaN left out (NaN when it is NaN for every label), as nnU-Net averages its foreground classes.

    Example:
        >>> mean_over_labels({1: {"dice": 0.5, "hausdorff95": math.nan}, 2: {"dice": 1.0, "hausdorff95": 2.0}})
        {'dice': 0.75, 'hausdorff95': 2.0}
    """
    if len(scores) == 1:
        return dict(next(iter(scores.values())))
    names = list(dict.fromkeys(name for metrics in scores.values() for name in metrics))
    means = {}
    for name in names:
        values = [metrics[name] for metrics in scores.values() if not math.isnan(metrics[name])]
        means[name] = float(np.mean(values)) if values else math.nan
    return means


def evaluate_case(
    prediction: Mask,
    reference: Mask,
    spacing: Spacing,
    probabilities: np.ndarray | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    overlap_only: bool = False,
) -> dict[str, float]:
    """Every metric of this module for one binary mask pair; :func:`score_case` calls it for each label.

    Args:
        prediction: binary mask, shape (X, Y, Z) or (X, Y).
        reference: binary mask, same shape.
        spacing: voxel size in mm per axis, same axis order.
        probabilities: optional lesion probabilities, same shape; adds ``max_dice`` (mDSC).
        thresholds: thresholds for ``max_dice``.
        overlap_only: leave out hausdorff, hausdorff95, assd, dice_hd_score and the lesion_* metrics.

    Returns:
        Metric name -> value (counts as floats): dice, [max_dice,] sensitivity, precision, hausdorff,
        hausdorff95, assd (mm), dice_hd_score, volume_reference_mm3, volume_prediction_mm3,
        volume_difference_mm3, relative_volume_difference, lesion_f1, lesion_tp, lesion_fp, lesion_fn,
        lesion_count_difference, tp_voxels, fp_voxels, fn_voxels (for micro-Dice).

    Raises:
        ValueError: shapes differ, the array is not 2-D or 3-D, or ``spacing`` does not fit.
    """
    pred, ref, spacing = _validated(prediction, reference, spacing)
    if not overlap_only:  # every metric below is unchanged by dropping empty borders; cropping pays for distances
        pred, ref = _crop_to_union(pred, ref)
    tp, fp, fn = _confusion_counts(pred, ref)
    voxel = float(np.prod(spacing))
    volumes = _volume_difference((tp + fp) * voxel, (tp + fn) * voxel)
    result = {"dice": dice_from_counts(tp, fp, fn)}
    if probabilities is not None:
        result["max_dice"] = max_dice_over_thresholds(probabilities, reference, thresholds)
    result.update(
        sensitivity=_ratio(tp, tp + fn, both_empty=fp == 0), precision=_ratio(tp, tp + fp, both_empty=fn == 0)
    )
    if not overlap_only:
        distances = _distance_metrics(pred, ref, spacing)
        result.update(**distances, dice_hd_score=dice_hausdorff_score(result["dice"], distances["hausdorff"]))
    result.update(
        volume_reference_mm3=(tp + fn) * voxel,
        volume_prediction_mm3=(tp + fp) * voxel,
        volume_difference_mm3=volumes.absolute_mm3,
        relative_volume_difference=volumes.relative,
    )
    if not overlap_only:
        lesions = lesion_wise(pred, ref)
        result.update(
            lesion_f1=lesions.f1,
            lesion_tp=lesions.tp,
            lesion_fp=lesions.fp,
            lesion_fn=lesions.fn,
            lesion_count_difference=lesions.count_difference,
        )
    result.update(tp_voxels=tp, fp_voxels=fp, fn_voxels=fn)
    return {name: float(value) for name, value in result.items()}


def challenge_case(
    prediction: Mask, reference: Mask, spacing: Spacing, protocol: str | Protocol, *, overlap_only: bool = False
) -> dict[str, float]:
    """The metrics of a challenge's protocol (``isles22`` or ``atlas2``) for one binary mask pair, as its published
    evaluation code computes them (sources in :mod:`autoseg.evaluate.protocols`).

    Both count lesions as connected components with the protocol's connectivity (``isles22`` 26, ``atlas2`` 6) and
    match them as :func:`lesion_wise` does; a predicted voxel on a reference lesion finds it.

    Args:
        prediction: binary mask, shape (X, Y, Z).
        reference: binary mask, same shape.
        spacing: voxel size in mm per axis, same axis order; the voxel volume is their product (mm³), 1/1000 of it
            in ml (ISLES 2022 divides |det(affine[:3, :3])| by 1000, the same for any grid with orthogonal axes).
        protocol: ``isles22`` or ``atlas2`` (or its :class:`autoseg.evaluate.protocols.Protocol`).
        overlap_only: leave out the lesion_* metrics (the connected components).

    Returns:
        Metric name -> value (counts as floats): ``dice`` (both empty: 1), the volume difference
        ``volume_difference_ml`` (isles22: |V_P - V_R| in ml) or ``volume_difference_voxels`` (atlas2: |N_P - N_R|
        in voxels), ``lesion_count_difference`` (|components of P - components of R|), ``lesion_f1`` (both empty:
        1; exactly one empty: 0), ``lesion_tp``, ``lesion_fp``, ``lesion_fn``; and what the report and the summary
        need beside them: ``volume_reference_mm3``, ``volume_prediction_mm3``, ``tp_voxels``, ``fp_voxels``,
        ``fn_voxels``.

    Raises:
        ValueError: the protocol is autoseg's own (use :func:`evaluate_case`), the masks are not 3-D or differ in
            shape, or ``spacing`` does not fit.
    """
    protocol = get_protocol(protocol)
    if not protocol.is_challenge:
        raise ValueError(f"{protocol.name} is no challenge protocol; evaluate_case scores it")
    pred, ref, spacing = _validated(prediction, reference, spacing)
    if pred.ndim != 3:
        raise ValueError(f"the {protocol.name} protocol scores 3-D masks, got {pred.ndim}-D with shape {pred.shape}")
    pred, ref = _crop_to_union(pred, ref)  # a one-voxel margin keeps every component as it is
    tp, fp, fn = _confusion_counts(pred, ref)
    voxel_mm3 = float(np.prod(spacing))
    difference_voxels = abs((tp + fp) - (tp + fn))
    volume = {"ml": difference_voxels * voxel_mm3 / 1000.0, "voxels": float(difference_voxels)}
    result: dict[str, float] = {
        "dice": dice_from_counts(tp, fp, fn),
        protocol.volume_metric: volume[protocol.volume_unit],
    }
    if not overlap_only:
        lesions = lesion_wise(pred, ref, protocol.lesion_connectivity)
        result.update(
            lesion_count_difference=lesions.count_difference,
            lesion_f1=lesions.f1,
            lesion_tp=lesions.tp,
            lesion_fp=lesions.fp,
            lesion_fn=lesions.fn,
        )
    result.update(
        volume_reference_mm3=(tp + fn) * voxel_mm3,
        volume_prediction_mm3=(tp + fp) * voxel_mm3,
        tp_voxels=tp,
        fp_voxels=fp,
        fn_voxels=fn,
    )
    return {name: float(value) for name, value in result.items()}


def _as_masks(prediction: Mask, reference: Mask) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2-D or 3-D, got {pred.ndim}-D with shape {pred.shape}")
    return pred, ref


def _validated(prediction: Mask, reference: Mask, spacing: Spacing) -> tuple[np.ndarray, np.ndarray, tuple]:
    pred, ref = _as_masks(prediction, reference)
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != pred.ndim or not all(v > 0 and math.isfinite(v) for v in spacing):
        raise ValueError(f"spacing {list(spacing)} must hold {pred.ndim} positive values (mm per axis)")
    return pred, ref, spacing


def _confusion_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    """numerator / denominator; an empty denominator gives 1 if both masks are empty, NaN otherwise."""
    if denominator == 0:
        return 1.0 if both_empty else math.nan
    return numerator / denominator


def _volume_difference(prediction_mm3: float, reference_mm3: float) -> VolumeDifference:
    absolute = abs(prediction_mm3 - reference_mm3)
    if reference_mm3 > 0:
        relative = absolute / reference_mm3
    else:
        relative = 0.0 if prediction_mm3 == 0 else math.nan
    return VolumeDifference(absolute_mm3=absolute, relative=relative)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus ``margin`` voxels (clipped to the array).

    The one-voxel margin keeps a background ring around the masks, so surfaces, components and
    distances on the crop equal those on the full array; distance transforms get much cheaper.
    """
    found = ndimage.find_objects((pred | ref).astype(np.uint8))
    if not found:
        return pred, ref
    box = tuple(
        slice(max(part.start - margin, 0), min(part.stop + margin, size)) for part, size in zip(found[0], pred.shape)
    )
    return pred[box], ref[box]


def _directed_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one non-empty mask to the other's surface, both ways."""
    pred_surface, ref_surface = surface_voxels(pred), surface_voxels(ref)
    to_reference = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_reference[pred_surface], to_prediction[ref_surface]


def _distance_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> dict[str, float]:
    """HD, HD95 and ASSD in mm from one pair of distance transforms, with the empty-mask conventions."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"hausdorff": 0.0, "hausdorff95": 0.0, "assd": 0.0}
    if not (has_pred and has_ref):
        return {"hausdorff": math.nan, "hausdorff95": math.nan, "assd": math.nan}
    forward, backward = _directed_distances(*_crop_to_union(pred, ref), spacing)
    pooled = np.concatenate([forward, backward])
    return {
        "hausdorff": float(pooled.max()),
        "hausdorff95": float(np.percentile(pooled, 95)),
        "assd": float((forward.mean() + backward.mean()) / 2.0),
    }
