"""Tests of autoseg.evaluate.metrics: brute-force surface distances, hand-made cases and empty-mask conventions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from autoseg.evaluate import metrics

ANISOTROPIC = (0.7, 1.3, 3.0)


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by definition: a foreground voxel with a background voxel among its 26 (8) neighbours.

    Written without scipy.ndimage so it checks the erosion-based implementation independently.
    """
    padded = np.pad(mask, 1, constant_values=False)
    interior = np.ones_like(mask)
    for offset in itertools.product((-1, 0, 1), repeat=mask.ndim):
        window = tuple(slice(1 + step, 1 + step + size) for step, size in zip(offset, mask.shape))
        interior &= padded[window]
    return mask & ~interior


def brute_distances(prediction: np.ndarray, reference: np.ndarray, spacing) -> dict[str, float]:
    """HD, HD95 (pooled) and ASSD (mean of directed means) from all pairwise surface-voxel distances."""
    pred_points = np.argwhere(brute_surface(prediction)) * np.asarray(spacing)
    ref_points = np.argwhere(brute_surface(reference)) * np.asarray(spacing)
    pairwise = cdist(pred_points, ref_points)
    forward, backward = pairwise.min(axis=1), pairwise.min(axis=0)
    pooled = np.concatenate([forward, backward])
    return {
        "hausdorff": pooled.max(),
        "hausdorff95": np.percentile(pooled, 95),
        "assd": (forward.mean() + backward.mean()) / 2,
    }


def random_blob(rng: np.random.Generator, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """Smoothed noise thresholded to about ``fill`` of the voxels: irregular, often several components."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=1.2)
    return field > np.quantile(field, 1.0 - fill)


def cube(shape: tuple[int, ...], start: int, size: int, axis: int = 0, shift: int = 0) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    box = [slice(start, start + size)] * len(shape)
    box[axis] = slice(start + shift, start + shift + size)
    mask[tuple(box)] = True
    return mask


@pytest.mark.parametrize("seed", range(8))
def test_distances_match_brute_force_anisotropic_3d(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prediction = random_blob(rng, (12, 10, 8), fill=rng.uniform(0.1, 0.4))
    reference = random_blob(rng, (12, 10, 8), fill=rng.uniform(0.1, 0.4))
    expected = brute_distances(prediction, reference, ANISOTROPIC)
    assert metrics.hausdorff(prediction, reference, ANISOTROPIC) == pytest.approx(expected["hausdorff"], abs=1e-6)
    assert metrics.hausdorff95(prediction, reference, ANISOTROPIC) == pytest.approx(expected["hausdorff95"], abs=1e-6)
    assert metrics.assd(prediction, reference, ANISOTROPIC) == pytest.approx(expected["assd"], abs=1e-6)
    case = metrics.evaluate_case(prediction, reference, ANISOTROPIC)
    for name, value in expected.items():
        assert case[name] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_small_lesions_in_large_volume_match_brute_force(seed: int) -> None:
    # Small masks far apart in a larger array exercise the crop to the joint bounding box.
    rng = np.random.default_rng(100 + seed)
    prediction = np.zeros((40, 30, 20), dtype=bool)
    reference = np.zeros_like(prediction)
    prediction[2:10, 3:9, 1:6] = random_blob(rng, (8, 6, 5), 0.5)
    reference[25:39, 20:30, 12:20] = random_blob(rng, (14, 10, 8), 0.3)  # touches the array border
    expected = brute_distances(prediction, reference, ANISOTROPIC)
    case = metrics.evaluate_case(prediction, reference, ANISOTROPIC)
    for name, value in expected.items():
        assert case[name] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_distances_match_brute_force_2d(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    prediction, reference = random_blob(rng, (15, 11), 0.3), random_blob(rng, (15, 11), 0.3)
    expected = brute_distances(prediction, reference, (0.8, 2.5))
    for name, value in expected.items():
        assert getattr(metrics, name)(prediction, reference, (0.8, 2.5)) == pytest.approx(value, abs=1e-6)


def test_pooled_hd95_can_exceed_the_larger_directed_95th_percentile() -> None:
    """Why the docstring no longer says the directed variant (MONAI, surface-distance) is never smaller: two voxels
    each, distances 1 and 3 in both directions. Directed: 1 + 0.95 * 2 = 2.9 each way; pooled [1, 1, 3, 3]: 3."""
    prediction, reference = np.zeros((5, 5, 12), bool), np.zeros((5, 5, 12), bool)
    prediction[2, 2, 2] = prediction[2, 2, 6] = True
    reference[2, 3, 2] = reference[2, 2, 9] = True
    forward, backward = metrics.surface_distances(prediction, reference, (1, 1, 1))
    assert sorted(forward) == sorted(backward) == [1.0, 3.0]
    directed = max(np.percentile(forward, 95), np.percentile(backward, 95))
    assert directed == pytest.approx(2.9)
    pooled = metrics.hausdorff95(prediction, reference, (1, 1, 1))
    assert pooled == pytest.approx(3.0) and pooled > directed
    assert brute_distances(prediction, reference, (1, 1, 1))["hausdorff95"] == pytest.approx(3.0)


def test_surface_matches_definition() -> None:
    mask = random_blob(np.random.default_rng(7), (12, 10, 8), 0.3)
    np.testing.assert_array_equal(metrics.surface_voxels(mask), brute_surface(mask))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_shifted_cubes_hausdorff_is_shift_times_spacing(axis: int, shift: int) -> None:
    reference = cube((14, 14, 14), start=3, size=4)
    prediction = cube((14, 14, 14), start=3, size=4, axis=axis, shift=shift)
    assert metrics.hausdorff(prediction, reference, ANISOTROPIC) == pytest.approx(shift * ANISOTROPIC[axis])
    assert metrics.dice(prediction, reference) == pytest.approx((4 - shift) / 4)


def test_half_overlap_dice_is_exact() -> None:
    reference = cube((12, 12, 12), start=2, size=4)
    prediction = cube((12, 12, 12), start=2, size=4, axis=1, shift=2)
    assert metrics.dice(prediction, reference) == 0.5
    assert metrics.sensitivity(prediction, reference) == 0.5
    assert metrics.precision(prediction, reference) == 0.5


def test_identical_masks_are_perfect() -> None:
    mask = random_blob(np.random.default_rng(3), (12, 10, 8), 0.3)
    case = metrics.evaluate_case(mask, mask, ANISOTROPIC)
    assert case["dice"] == 1.0 and case["sensitivity"] == 1.0 and case["precision"] == 1.0
    assert case["hausdorff"] == 0.0 and case["hausdorff95"] == 0.0 and case["assd"] == 0.0
    assert case["volume_difference_mm3"] == 0.0 and case["lesion_f1"] == 1.0


def test_disjoint_single_voxels() -> None:
    prediction = np.zeros((6, 6), dtype=bool)
    reference = np.zeros((6, 6), dtype=bool)
    prediction[0, 0], reference[3, 4] = True, True  # a 3-4-5 triangle
    assert metrics.dice(prediction, reference) == 0.0
    assert metrics.sensitivity(prediction, reference) == 0.0
    assert metrics.precision(prediction, reference) == 0.0
    assert metrics.hausdorff(prediction, reference, (1.0, 1.0)) == pytest.approx(5.0)
    assert metrics.assd(prediction, reference, (2.0, 2.0)) == pytest.approx(10.0)


def test_volume_difference() -> None:
    reference = cube((10, 10, 10), start=1, size=4)  # 64 voxels
    prediction = cube((10, 10, 10), start=1, size=2)  # 8 voxels
    result = metrics.volume_difference(prediction, reference, (0.5, 1.0, 2.0))
    assert result.absolute_mm3 == pytest.approx(56.0)
    assert result.relative == pytest.approx(56 / 64)


def three_lesions() -> np.ndarray:
    reference = np.zeros((20, 20, 10), dtype=bool)
    reference[1:4, 1:4, 1:4] = True
    reference[10:13, 1:4, 1:4] = True
    reference[1:4, 10:13, 5:8] = True
    return reference


def test_lesion_wise_two_hits_one_miss_one_false_positive() -> None:
    reference = three_lesions()
    prediction = np.zeros_like(reference)
    prediction[2, 2, 2] = True  # hits lesion 1 with a single voxel
    prediction[11:15, 2:4, 2:4] = True  # hits lesion 2 and spills over
    prediction[15:18, 15:18, 5:8] = True  # false blob
    result = metrics.lesion_wise(prediction, reference)
    assert (result.tp, result.fp, result.fn) == (2, 1, 1)
    assert result.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert (result.num_reference, result.num_prediction, result.count_difference) == (3, 3, 0)


def test_lesion_wise_one_component_covering_two_lesions() -> None:
    reference = three_lesions()
    prediction = np.zeros_like(reference)
    prediction[1:13, 1:4, 1:4] = True  # bridges lesions 1 and 2
    result = metrics.lesion_wise(prediction, reference)
    assert (result.tp, result.fp, result.fn, result.count_difference) == (2, 0, 1, 2)
    assert result.f1 == pytest.approx(4 / 5)


def test_lesion_components_use_26_connectivity() -> None:
    reference = np.zeros((5, 5, 5), dtype=bool)
    reference[1, 1, 1] = reference[2, 2, 2] = True  # touch only at a corner: one lesion in 26-connectivity
    prediction = np.zeros_like(reference)
    prediction[1, 1, 1] = True
    result = metrics.lesion_wise(prediction, reference)
    assert (result.num_reference, result.tp, result.fn) == (1, 1, 0)


def test_max_dice_over_thresholds() -> None:
    reference = np.zeros((4, 4, 4), dtype=bool)
    reference[0, :2] = True  # 8 voxels
    probabilities = np.zeros(reference.shape)
    probabilities[reference] = 0.3
    probabilities[3, 3, 3] = 0.8  # a confident false positive
    dices = metrics.dice_over_thresholds(probabilities, reference, [0.2, 0.5, 0.9])
    np.testing.assert_allclose(dices, [2 * 8 / (9 + 8), 0.0, 0.0])
    assert metrics.max_dice_over_thresholds(probabilities, reference, [0.2, 0.5, 0.9]) == pytest.approx(16 / 17)
    case = metrics.evaluate_case(probabilities >= 0.5, reference, (1, 1, 1), probabilities=probabilities)
    assert case["max_dice"] == pytest.approx(16 / 17) and case["dice"] == 0.0


def test_max_dice_brute_force_over_thresholds() -> None:
    rng = np.random.default_rng(5)
    probabilities = rng.random((9, 8, 7))
    reference = random_blob(rng, (9, 8, 7), 0.2)
    thresholds = [0.1, 0.35, 0.5, 0.77]
    expected = [metrics.dice(probabilities >= t, reference) for t in thresholds]
    np.testing.assert_allclose(metrics.dice_over_thresholds(probabilities, reference, thresholds), expected)


def test_micro_dice_pools_counts() -> None:
    big_reference = cube((10, 10, 10), start=0, size=6)  # 216 voxels, predicted perfectly
    small_reference = cube((10, 10, 10), start=0, size=1)  # 1 voxel, missed
    pairs = [(big_reference, big_reference), (np.zeros_like(small_reference), small_reference)]
    assert metrics.micro_dice(pairs) == pytest.approx(2 * 216 / (2 * 216 + 1))
    assert metrics.micro_dice([]) == 1.0


def test_dice_hausdorff_score() -> None:
    assert metrics.dice_hausdorff_score(0.8, 50.0) == pytest.approx(0.8 * 0.75 / 1.55)
    assert metrics.dice_hausdorff_score(1.0, 0.0) == 0.5
    assert metrics.dice_hausdorff_score(0.0, 500.0) == 0.0
    assert math.isnan(metrics.dice_hausdorff_score(0.0, math.nan))


EMPTY_CONVENTIONS = {
    # name: (prediction non-empty, reference non-empty, expected values; None means NaN)
    "both empty": (False, False, {
        "dice": 1.0, "sensitivity": 1.0, "precision": 1.0, "hausdorff": 0.0, "hausdorff95": 0.0, "assd": 0.0,
        "lesion_f1": 1.0, "relative_volume_difference": 0.0, "lesion_count_difference": 0.0,
    }),
    "reference empty": (True, False, {
        "dice": 0.0, "sensitivity": None, "precision": 0.0, "hausdorff": None, "hausdorff95": None, "assd": None,
        "lesion_f1": 0.0, "relative_volume_difference": None, "lesion_fp": 1.0, "dice_hd_score": None,
    }),
    "prediction empty": (False, True, {
        "dice": 0.0, "sensitivity": 0.0, "precision": None, "hausdorff": None, "hausdorff95": None, "assd": None,
        "lesion_f1": 0.0, "relative_volume_difference": 1.0, "lesion_fn": 1.0,
    }),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EMPTY_CONVENTIONS))
def test_empty_mask_conventions(name: str) -> None:
    has_prediction, has_reference, expected = EMPTY_CONVENTIONS[name]
    blob = cube((8, 8, 8), start=2, size=3)
    prediction = blob if has_prediction else np.zeros_like(blob)
    reference = blob if has_reference else np.zeros_like(blob)
    case = metrics.evaluate_case(prediction, reference, ANISOTROPIC)
    for metric, value in expected.items():
        if value is None:
            assert math.isnan(case[metric]), metric
        else:
            assert case[metric] == value, metric
    # The single-metric functions follow the same conventions.
    for metric in ("dice", "sensitivity", "precision"):
        assert _same(getattr(metrics, metric)(prediction, reference), case[metric])
    for metric in ("hausdorff", "hausdorff95", "assd"):
        assert _same(getattr(metrics, metric)(prediction, reference, ANISOTROPIC), case[metric])


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_surface_distances_empty_when_a_mask_is_empty() -> None:
    blob = cube((8, 8, 8), start=2, size=3)
    forward, backward = metrics.surface_distances(blob, np.zeros_like(blob), ANISOTROPIC)
    assert forward.size == 0 and backward.size == 0


@pytest.mark.parametrize(
    "prediction, reference, spacing",
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1)),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1)),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1)),
        (np.zeros(4), np.zeros(4), (1,)),
    ],
)
def test_invalid_inputs_raise(prediction, reference, spacing) -> None:
    with pytest.raises(ValueError):
        metrics.evaluate_case(prediction, reference, spacing)


def test_score_case_scores_each_label_as_equal_to_it_not_the_union() -> None:
    """Two labels, the prediction's lesion labelled across the other axis: the union ``> 0`` would call it perfect;
    each label overlaps by half, which is what score_case gives (checked against numpy and brute-force distances)."""
    lesion = cube((12, 12, 12), start=3, size=6)
    reference, prediction = np.zeros(lesion.shape, np.uint8), np.zeros(lesion.shape, np.uint8)
    index = np.indices(lesion.shape)
    reference[lesion & (index[0] < 6)], reference[lesion & (index[0] >= 6)] = 1, 2
    prediction[lesion & (index[1] < 6)], prediction[lesion & (index[1] >= 6)] = 1, 2
    scores = metrics.score_case(prediction, reference, ANISOTROPIC, (1, 2))
    assert metrics.dice(prediction > 0, reference > 0) == 1.0  # what the union would have said
    for label in (1, 2):
        pred, ref = prediction == label, reference == label
        assert scores[label]["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum())) == 0.5
        expected = brute_distances(pred, ref, ANISOTROPIC)
        assert scores[label]["hausdorff95"] == pytest.approx(expected["hausdorff95"], abs=1e-6)
        assert scores[label] == metrics.evaluate_case(pred, ref, ANISOTROPIC)
    mean = metrics.mean_over_labels(scores)
    assert mean["dice"] == 0.5 and mean["hausdorff95"] == pytest.approx(
        np.mean([scores[k]["hausdorff95"] for k in (1, 2)])
    )
    # one label: its own values; a label given to nothing is empty on both sides
    assert metrics.mean_over_labels({1: scores[1]}) == scores[1]
    assert metrics.score_case(prediction, reference, ANISOTROPIC, (3,))[3]["dice"] == 1.0


def test_mean_over_labels_leaves_nan_out_and_score_case_checks_its_inputs() -> None:
    mean = metrics.mean_over_labels(
        {
            1: {"dice": 0.0, "hausdorff95": math.nan},
            2: {"dice": 1.0, "hausdorff95": 3.0},
            3: {"dice": 0.5, "hausdorff95": math.nan},
        }
    )
    assert mean == {"dice": 0.5, "hausdorff95": 3.0}
    assert math.isnan(metrics.mean_over_labels({1: {"assd": math.nan}, 2: {"assd": math.nan}})["assd"])
    mask = cube((6, 6, 6), start=1, size=3).astype(np.uint8)
    with pytest.raises(ValueError, match="label"):
        metrics.score_case(mask, mask, (1, 1, 1), ())
    with pytest.raises(ValueError, match="one channel per label"):
        metrics.score_case(mask, mask, (1, 1, 1), (1, 2), probabilities=np.zeros((1, 6, 6, 6)))
    overlap = metrics.score_case(mask, mask, (1, 1, 1), overlap_only=True)[1]
    assert overlap["dice"] == 1.0 and "hausdorff95" not in overlap and "lesion_f1" not in overlap
