"""Losses against independent computations: Dice on hard masks, focal vs BCE, deep supervision, autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoseg.plans import Loss
from autoseg.train.losses import (
    AuxiliaryLoss,
    BCELoss,
    FocalLoss,
    LesionWiseDiceLoss,
    SoftDiceLoss,
    balanced_positive_weight,
    build_loss,
    deep_supervision_weights,
    downsample_target,
    one_hot_foreground,
)

SURE = 60.0  # sigmoid(±60) is 0/1 to float32 precision


def random_masks(shape, seed: int, share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(shape) < share, rng.random(shape) < share


def hard_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of boolean masks, over everything (batch Dice), written out without the loss code."""
    return 2 * np.logical_and(prediction, reference).sum() / (prediction.sum() + reference.sum())


@pytest.mark.parametrize("shape, seed", [((2, 1, 6, 7, 5), 0), ((4, 1, 9, 9), 1), ((1, 1, 3, 3, 3), 2)])
def test_dice_loss_is_one_minus_hard_dice_for_certain_predictions(shape, seed: int) -> None:
    prediction, reference = random_masks(shape, seed)
    logits = torch.from_numpy(np.where(prediction, SURE, -SURE).astype(np.float32))
    loss = SoftDiceLoss()(logits, torch.from_numpy(reference.astype(np.float32)))
    assert loss.item() == pytest.approx(1 - hard_dice(prediction, reference), abs=1e-5)


def test_dice_is_averaged_over_foreground_classes() -> None:
    first, second = random_masks((2, 1, 8, 8), 3)
    other, reference_other = random_masks((2, 1, 8, 8), 4)
    logits = torch.from_numpy(np.where(np.concatenate([first, other], 1), SURE, -SURE).astype(np.float32))
    target = torch.from_numpy(np.concatenate([second, reference_other], 1).astype(np.float32))
    expected = 1 - (hard_dice(first, second) + hard_dice(other, reference_other)) / 2
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(expected, abs=1e-5)


def test_focal_with_gamma_zero_and_alpha_half_is_half_the_bce() -> None:
    logits = torch.randn(2, 1, 5, 6, 7, generator=torch.Generator().manual_seed(0)) * 3
    target = (torch.rand(2, 1, 5, 6, 7, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    focal = FocalLoss(gamma=0.0, alpha=0.5)(logits, target)
    assert focal.item() == pytest.approx(0.5 * F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6)


def test_focal_matches_lin_et_al_on_single_voxels() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0]).view(1, 1, 4)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    gamma, alpha = 2.0, 0.75
    expected = []
    for z, y in zip(logits.flatten().tolist(), target.flatten().tolist()):
        p = 1 / (1 + math.exp(-z))
        p_t, alpha_t = (p, alpha) if y else (1 - p, 1 - alpha)
        expected.append(-alpha_t * (1 - p_t) ** gamma * math.log(p_t))
    assert FocalLoss(gamma, alpha)(logits, target).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_weighted_ce_weights_the_lesion_term() -> None:
    logits, target = torch.tensor([[[0.3, -0.2]]]), torch.tensor([[[1.0, 0.0]]])
    p = torch.sigmoid(logits)[0, 0]
    expected = (-3.0 * math.log(p[0]) - math.log(1 - p[1])) / 2
    assert BCELoss(positive_weight=3.0)(logits, target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["dice_bce", "dice_bce_focal", "focal", "weighted_ce"])
def test_perfect_logits_give_near_zero_loss(name: str) -> None:
    target = torch.from_numpy(random_masks((2, 1, 8, 8, 8), 5)[0].astype(np.int16))
    logits = torch.where(target > 0, SURE, -SURE).float()
    loss = build_loss(
        Loss(
            name=name,
            dice_weight=1.0,
            bce_weight=1.0,
            focal_weight=1.0,
            focal_gamma=2.0,
            focal_alpha=0.75,
            positive_weight=2.0,
        )
    )(logits, target)
    assert 0 <= loss.item() < 1e-4
    wrong = build_loss(
        Loss(
            name=name,
            dice_weight=1.0,
            bce_weight=1.0,
            focal_weight=1.0,
            focal_gamma=2.0,
            focal_alpha=0.75,
            positive_weight=2.0,
        )
    )(-logits, target)
    assert wrong.item() > 1.0


def test_compound_is_the_weighted_sum_of_its_terms() -> None:
    logits = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    target = (torch.rand(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(3)) < 0.3).to(torch.int16)
    one_hot = target.float()
    expected = (
        0.7 * SoftDiceLoss()(logits, one_hot)
        + 0.3 * BCELoss()(logits, one_hot)
        + 2.0 * FocalLoss(1.0, 0.6)(logits, one_hot)
    )
    loss = build_loss(
        Loss(name="dice_bce_focal", dice_weight=0.7, bce_weight=0.3, focal_weight=2.0, focal_gamma=1.0, focal_alpha=0.6)
    )(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_targets_become_one_hot_over_non_background_labels() -> None:
    target = torch.tensor([0, 1, 2, 2]).view(1, 1, 4)
    np.testing.assert_array_equal(one_hot_foreground(target, 2)[0].numpy(), [[0, 1, 0, 0], [0, 0, 1, 1]])


@pytest.mark.parametrize(
    "levels, expected",
    [(1, [1.0]), (2, [2 / 3, 1 / 3]), (3, [2 / 3, 1 / 3, 0.0]), (5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])],
)
def test_deep_supervision_weights(levels: int, expected: list[float]) -> None:
    assert deep_supervision_weights(levels) == pytest.approx(expected)


def test_deep_supervision_combines_levels_with_max_pooled_targets() -> None:
    target = torch.zeros(1, 1, 8, 8, 4, dtype=torch.int16)
    target[0, 0, 5, 2, 1] = 1  # a single-voxel lesion: nearest-neighbour subsampling could drop it
    coarse = downsample_target(target, (4, 4, 2))
    assert coarse.sum() == 1 and coarse[0, 0, 2, 1, 0] == 1
    generator = torch.Generator().manual_seed(4)
    outputs = [
        torch.randn(1, 1, 8, 8, 4, generator=generator),
        torch.randn(1, 1, 4, 4, 2, generator=generator),
        torch.randn(1, 1, 2, 2, 1, generator=generator),
    ]
    single = build_loss(Loss(name="dice_bce"))
    expected = 2 / 3 * single(outputs[0], target) + 1 / 3 * single(outputs[1], coarse)
    assert build_loss(Loss(name="dice_bce"), 3)(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="expected 3 deep-supervision outputs"):
        build_loss(Loss(name="dice_bce"), 3)(outputs[:2], target)


def test_bf16_autocast_gives_the_float32_loss_and_gradients() -> None:
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)
    image = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    target = (image > 0.5).to(torch.int16)
    criterion = build_loss(
        Loss(
            name="dice_bce_focal", dice_weight=1.0, bce_weight=1.0, focal_weight=1.0, focal_gamma=2.0, focal_alpha=0.75
        )
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        loss = criterion(logits, target)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(criterion(logits.float(), target).item(), rel=1e-6)
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss(Loss(name="dice"))
    with pytest.raises(ValueError, match="positive weight"):
        build_loss(Loss(name="focal", focal_weight=0.0))
    with pytest.raises(ValueError, match=r"\(B, 1, \.\.\.\)"):
        build_loss(Loss(name="dice_bce"))(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))


def test_balanced_weight_makes_lesion_and_background_contribute_equally() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((2, 1, 40, 40)) < 0.03).astype(np.int16)
    fraction = labels.mean()
    weight = balanced_positive_weight(float(fraction))
    assert weight == pytest.approx((1 - fraction) / fraction)
    logits = torch.tensor(rng.standard_normal(labels.shape), dtype=torch.float32)
    per_voxel = F.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float32), reduction="none")
    lesion, background = labels == 1, labels == 0
    # at equal per-voxel losses, the weighted lesion total equals the background total
    assert weight * lesion.sum() == pytest.approx(background.sum())
    expected = (weight * per_voxel.numpy()[lesion].sum() + per_voxel.numpy()[background].sum()) / labels.size
    loss = build_loss(Loss(name="weighted_ce", positive_weight=weight))(logits, torch.tensor(labels))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="lesion fraction"):
            balanced_positive_weight(bad)


def test_auxiliary_loss_adds_the_weighted_auxiliary_term() -> None:
    torch.manual_seed(0)
    main, auxiliary = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    target = (torch.rand(2, 1, 16, 16) < 0.2).to(torch.int16)
    base = build_loss(Loss(name="focal", dice_weight=0, bce_weight=0, focal_weight=1, focal_gamma=1, focal_alpha=0.75))
    combined = AuxiliaryLoss(base, 0.4)
    assert float(combined((main, auxiliary), target)) == pytest.approx(
        float(base(main, target)) + 0.4 * float(base(auxiliary, target))
    )
    assert float(combined(main, target)) == pytest.approx(float(base(main, target)))  # evaluation: main output only
    with pytest.raises(ValueError, match=">= 0"):
        AuxiliaryLoss(base, -1)


def lesion_dice_by_hand(probabilities: np.ndarray, lesions: list[np.ndarray], sample_of: list[int]) -> float:
    """1 − mean over samples (with lesions) of the mean Dice of each lesion with the sample's other lesions removed,
    from boolean masks of each lesion, written out without the loss code."""
    per_sample: dict[int, list[float]] = {}
    for index, (mask, b) in enumerate(zip(lesions, sample_of)):
        others = np.zeros_like(mask)
        for j, (other, c) in enumerate(zip(lesions, sample_of)):
            if j != index and c == b:
                others |= other
        p = probabilities[b, 0]
        dice = 2 * p[mask].sum() / (p[~others].sum() + mask.sum())
        per_sample.setdefault(b, []).append(dice)
    return 1 - float(np.mean([np.mean(values) for values in per_sample.values()]))


def test_lesion_wise_dice_counts_every_lesion_equally() -> None:
    """Each lesion's Dice with the other lesions masked out, averaged per sample, then over samples with lesions;
    the empty third sample is ignored; gradients reach the small lesion as strongly as the large one."""
    shape = (3, 1, 24, 24, 16)
    target = torch.zeros(shape)
    small, large, other = (np.zeros(shape[2:], bool) for _ in range(3))
    small[2:4, 2:4, 2:4] = True
    large[8:20, 8:20, 4:14] = True
    other[5:9, 5:9, 5:9] = True
    target[0, 0][torch.from_numpy(small)] = 1
    target[0, 0][torch.from_numpy(large)] = 1
    target[1, 0][torch.from_numpy(other)] = 1
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
    loss = LesionWiseDiceLoss()(logits, target)
    expected = lesion_dice_by_hand(torch.sigmoid(logits).detach().numpy(), [small, large, other], [0, 0, 1])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Missing the 8-voxel lesion entirely costs half of sample 0's term; a batch Dice barely notices it.
    sure = torch.where(target > 0, SURE, -SURE)
    missed = sure.clone()
    missed[0, 0][torch.from_numpy(small)] = -SURE
    assert LesionWiseDiceLoss()(missed, target).item() == pytest.approx(0.25, abs=1e-4)
    assert SoftDiceLoss()(missed, target).item() < 0.005
    loss.backward()
    gradient = logits.grad[0, 0].abs()
    assert gradient[torch.from_numpy(small)].mean() > gradient[torch.from_numpy(large)].mean()


def test_lesion_wise_dice_is_added_by_its_weight_and_ignores_lesion_free_batches() -> None:
    logits = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(6))
    target = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16)
    target[0, 0, 1:3, 1:3, 1:3] = 1
    target[1, 0, 5:8, 5:8, 5:8] = 1
    one_hot = target.float()
    plain = build_loss(Loss(name="dice_bce"))(logits, target)
    combined = build_loss(Loss(name="dice_bce", lesion_dice_weight=0.5))(logits, target)
    assert combined.item() == pytest.approx(plain.item() + 0.5 * LesionWiseDiceLoss()(logits, one_hot).item(), rel=1e-6)
    empty = torch.zeros_like(target)
    assert LesionWiseDiceLoss()(logits, empty.float()).item() == 0.0
    assert build_loss(Loss(name="dice_bce", lesion_dice_weight=1.0))(logits, empty).item() == pytest.approx(
        build_loss(Loss(name="dice_bce"))(logits, empty).item(), rel=1e-6
    )


def test_the_log_names_every_term_of_the_loss() -> None:
    from autoseg.train.losses import describe_loss

    assert (
        describe_loss(Loss(name="dice_bce", lesion_dice_weight=1.0)) == "dice_bce (Dice 1 + BCE 1 + lesion-wise Dice 1)"
    )
    assert describe_loss(Loss(name="weighted_ce", positive_weight=19.25)) == "weighted_ce (lesion weight 19.2)"
