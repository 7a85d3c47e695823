"""The QC score's parts (``autoseg.infer.quality``) and the views the sliding window hands it, against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from autoseg.errors import InvalidFileError
from autoseg.infer.quality import (
    AgreementCounter,
    QCCalibration,
    QualityComponents,
    TrainingVolumes,
    auroc,
    pairwise_dice,
    predictive_entropy,
    qc_score,
    volume_plausibility,
)
from autoseg.infer.sliding_window import mirror_combinations, predict_sliding_window


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * (a & b).sum() / total


def test_pairwise_dice_is_the_mean_over_every_pair() -> None:
    rng = np.random.default_rng(0)
    masks = [rng.random((9, 8, 7)) > p for p in (0.5, 0.6, 0.7, 0.95)] + [np.zeros((9, 8, 7), bool)]
    expected = np.mean([_dice(a, b) for a, b in itertools.combinations(masks, 2)])
    assert pairwise_dice(masks) == pytest.approx(expected)
    assert pairwise_dice([masks[-1], masks[-1]]) == 1.0  # two empty masks agree
    assert pairwise_dice(masks[:1]) is None


def test_predictive_entropy_is_the_binary_entropy_in_bits() -> None:
    p = np.array([0.0, 0.1, 0.5, 0.75, 1.0], np.float32)
    expected = [0.0] + [-(q * math.log2(q) + (1 - q) * math.log2(1 - q)) for q in (0.1, 0.5, 0.75)] + [0.0]
    assert predictive_entropy(p).tolist() == pytest.approx(expected, abs=1e-6)


def test_agreement_pairs_members_within_and_between_configurations() -> None:
    rng = np.random.default_rng(1)
    views = [torch.from_numpy(rng.random((4, 6, 6, 6)).astype(np.float32)) for _ in range(3)]
    counter = AgreementCounter(threshold=0.5)
    for member in views:
        counter.add_member(member)
    counter.end_configuration()
    member_masks = [(v.mean(0) >= 0.5).numpy() for v in views]
    within = np.mean([_dice(a, b) for a, b in itertools.combinations(member_masks, 2)])
    mirroring = np.mean([pairwise_dice([(x >= 0.5).numpy() for x in v]) for v in views])
    assert counter.member_agreement() == pytest.approx(within)
    assert counter.mirroring_agreement() == pytest.approx(mirroring)
    assert (counter.members, counter.mirrorings) == (3, 4)
    single = AgreementCounter(0.5)
    single.add_member(views[0][:1])
    single.end_configuration()
    assert single.member_agreement() is None and single.mirroring_agreement() is None


def test_the_score_is_the_mean_of_what_is_known_times_the_volume_plausibility() -> None:
    training = TrainingVolumes(min_ml=2.0, max_ml=50.0, lesion_free_cases=False)
    assert volume_plausibility(10.0, training) == 1.0
    assert volume_plausibility(0.5, training) == pytest.approx(0.25)
    assert volume_plausibility(100.0, training) == pytest.approx(0.5)
    assert volume_plausibility(0.0, training) == 0.0
    assert volume_plausibility(0.0, TrainingVolumes(2.0, 50.0, lesion_free_cases=True)) == 1.0
    parts = QualityComponents(0.8, None, 0.6, 0.5)
    assert qc_score(parts) == pytest.approx(0.35)
    assert qc_score(QualityComponents(None, None, None, None)) == 1.0
    assert TrainingVolumes.from_ranges((0, 3), (0.0, 90.0)) == TrainingVolumes(0.0, 90.0, True)
    assert TrainingVolumes.from_ranges((1, 3), (1.5, 90.0)) == TrainingVolumes(1.5, 90.0, False)


def test_auroc_is_the_mann_whitney_probability() -> None:
    rng = np.random.default_rng(2)
    scores = rng.random(30)
    failed = rng.random(30) < 0.4
    u = stats.mannwhitneyu(scores[failed], scores[~failed], alternative="less").statistic
    assert auroc(scores, failed) == pytest.approx(1 - u / (failed.sum() * (~failed).sum()))
    assert math.isnan(auroc([0.1, 0.2], [False, False]))


def test_calibration_flags_the_failures_it_can_separate_and_reads_back() -> None:
    scores = [0.2, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9]
    dice = [0.1, 0.4, 0.3, 0.6, 0.55, 0.8, 0.85]
    calibration = QCCalibration.fit(["3d/T"], scores, dice)
    flagged = [s < calibration.threshold for s in scores]
    assert flagged == [d < 0.5 for d in dice]
    assert 0.35 < calibration.threshold < 0.6
    assert calibration.auroc == 1.0 and calibration.failures == 3 and calibration.cases == 7
    assert calibration.spearman == pytest.approx(stats.spearmanr(scores, dice).statistic)
    assert np.all(np.diff(calibration.expected_dice) >= 0)  # isotonic
    assert calibration.expected(0.32) == pytest.approx(0.35)  # 0.3 and 0.35 pooled: (0.4 + 0.3) / 2
    again = QCCalibration.from_json(calibration.to_json())
    assert again.to_json() == calibration.to_json()
    with pytest.raises(InvalidFileError, match="qc_calibration.json: not a QC calibration"):
        QCCalibration.from_json({"members": ["3d/T"], "threshold": "high"})
    with pytest.raises(ValueError, match="at least two cases"):
        QCCalibration.fit(["3d/T"], [0.5], [0.5])
    never = QCCalibration.fit(["3d/T"], [0.6, 0.8], [0.7, 0.9])
    assert never.threshold == 0.6 and "no cross-validation case failed" in never.rule


class _Asymmetric(nn.Module):
    """Logits that depend on the position in the window, so every mirroring predicts something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-3, 3, x.shape[2]).view(1, 1, -1, 1, 1)
        return x[:, :1] + ramp


def test_the_sliding_windows_views_are_each_mirrorings_own_prediction() -> None:
    torch.manual_seed(0)
    volume = torch.randn(1, 12, 10, 9)
    network = _Asymmetric()
    mean, views = predict_sliding_window(network, volume, (8, 8, 8), mirror_axes=(0, 1), views=True)
    assert views.shape == (4, 12, 10, 9)
    assert torch.allclose(views.mean(0), mean[0], atol=1e-6)
    for view, combination in zip(views, mirror_combinations((0, 1))):
        dims = tuple(a + 1 for a in combination)
        flipped = volume.flip(dims) if dims else volume
        alone = predict_sliding_window(network, flipped, (8, 8, 8))
        alone = alone.flip(dims) if dims else alone
        assert torch.allclose(view, alone[0], atol=1e-6)
    assert torch.equal(predict_sliding_window(network, volume, (8, 8, 8), mirror_axes=(0, 1)), mean)
