"""Segmentation losses built from a plans ``Loss``: soft Dice, BCE, focal, weighted CE, deep supervision.

Conventions:

- outputs are logits (B, K, X, Y, Z) or (B, K, X, Y), K = number of non-background labels (1 for a binary
  lesion task), each read through its own sigmoid;
- the target is the integer label map (B, 1, ...) at full resolution; it becomes a one-hot map over labels
  1..K, (B, K, ...) float32, background implied;
- every loss is computed in float32 with autocast switched off, so bf16/fp16 logits from an autocast
  region give the same loss as float32 ones (sigmoid, log and the Dice sums lose too much in bf16).

``build_loss`` combines the terms named by ``Loss.name``, each times its weight:

================== ===============================================================
``dice_bce``        dice_weight · soft Dice + bce_weight · BCE
``dice_bce_focal``  dice_weight · soft Dice + bce_weight · BCE + focal_weight · focal
``focal``           focal_weight · focal
``weighted_ce``     BCE with lesion voxels weighted by positive_weight
================== ===============================================================

and, for any of them, ``lesion_dice_weight`` · lesion-wise soft Dice (:class:`LesionWiseDiceLoss`, the "blob
loss" of Kofler et al., IPMI 2023), which counts every lesion of a patch equally whatever its size.

:func:`balanced_positive_weight` turns a lesion fraction into the ``positive_weight`` that balances the two
classes, and :class:`AuxiliaryLoss` adds a network's auxiliary output (PSPNet's head on ``layer3``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoseg.distributed import sum_across_ranks
from autoseg.plans import LOSSES, Loss

DICE_SMOOTH = 1e-5


def one_hot_foreground(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, ...) integer labels -> (B, K, ...) float32 masks of labels 1..K (background dropped)."""
    if target.ndim < 3 or target.shape[1] != 1:
        raise ValueError(f"target must be a (B, 1, ...) label map, got shape {tuple(target.shape)}")
    labels = torch.arange(1, num_classes + 1, device=target.device).view(1, -1, *([1] * (target.ndim - 2)))
    return (target == labels).float()


class SoftDiceLoss(nn.Module):
    """1 − soft Dice of sigmoid probabilities, as *batch* Dice: sums run over the batch and all voxels, per class,
    then the K classes are averaged. Batch Dice is stable for patches without lesion (nnU-Net's choice for
    small-batch 3-D training): one empty patch does not make its own Dice 0 or undefined.

    ``dice_k = (2·Σ p·t + smooth) / (Σ p + Σ t + smooth)``, smooth = 1e-5.

    In data-parallel training the sums run over the global batch of every rank
    (``autoseg.distributed.sum_across_ranks``), so the loss is the one of a single process with the whole batch.

    Example:
        >>> float(SoftDiceLoss()(torch.full((1, 1, 4, 4), 20.0), torch.ones(1, 1, 4, 4))) < 1e-6
        True
    """

    def __init__(self, smooth: float = DICE_SMOOTH) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...), ``target`` (B, K, ...) one-hot float; returns a scalar."""
        probabilities = torch.sigmoid(logits)
        axes = [0, *range(2, logits.ndim)]
        intersection = sum_across_ranks((probabilities * target).sum(axes))
        denominator = sum_across_ranks(probabilities.sum(axes) + target.sum(axes))
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
        return 1 - dice.mean()


class LesionWiseDiceLoss(nn.Module):
    """1 − mean over lesions of each lesion's own soft Dice, other lesions masked out: the *blob loss* of Kofler
    et al., "blob loss: instance imbalance aware loss functions for semantic segmentation" (IPMI 2023).

    A global (batch) Dice lets a 40-voxel lesion beside a 5,000-voxel one count for under 1%; here each
    connected lesion (26-connectivity in 3-D, 8 in 2-D, as the lesion-wise metrics count them) of a sample gets a
    Dice term of its own, computed over that lesion and the sample's background, so missing it costs as much as
    missing the large one. Lesion terms are averaged per sample, then over the samples that have a lesion;
    patches without lesions contribute nothing (the global terms still see them).

    For lesion ``j`` of sample ``b`` and class ``k``, with ``S_j`` the summed probability on its voxels, ``n_j`` its
    voxel count and ``S_0`` the summed probability on the background of (b, k):
    ``dice_j = (2·S_j + smooth) / (S_0 + S_j + n_j + smooth)``.

    Components are found on the CPU (``cc3d``) from the one-hot target, a few ms per 64³ patch.

    Example:
        >>> target = torch.zeros(1, 1, 8, 8, 8); target[0, 0, 1, 1, 1] = 1; target[0, 0, 4:8, 4:8, 4:8] = 1
        >>> logits = torch.where(target > 0, 20.0, -20.0); logits[0, 0, 1, 1, 1] = -20.0  # the small one missed
        >>> round(float(LesionWiseDiceLoss()(logits, target)), 3)  # batch Dice would say 0.008
        0.5
    """

    def __init__(self, smooth: float = DICE_SMOOTH) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...), ``target`` (B, K, ...) one-hot float; returns a scalar."""
        probabilities = torch.sigmoid(logits)
        ids, owner = lesion_ids(target)  # (B·K·N,) long; owner (L,) index of (b, k) of each lesion id >= B·K
        groups = target.shape[0] * target.shape[1]
        if owner.numel() == 0:
            return probabilities.sum() * 0.0
        ids = ids.to(logits.device)
        owner = owner.to(logits.device)
        sums = torch.zeros(groups + owner.numel(), dtype=probabilities.dtype, device=logits.device)
        sums.index_add_(0, ids, probabilities.reshape(-1))
        counts = torch.bincount(ids, minlength=groups + owner.numel())[groups:].to(probabilities.dtype)
        lesion_sums, background_sums = sums[groups:], sums[owner]
        dice = (2 * lesion_sums + self.smooth) / (background_sums + lesion_sums + counts + self.smooth)
        sample = torch.div(owner, target.shape[1], rounding_mode="floor")
        per_sample = torch.zeros(target.shape[0], dtype=dice.dtype, device=dice.device).index_add_(0, sample, dice)
        lesions = torch.bincount(sample, minlength=target.shape[0]).to(dice.dtype)
        has_lesion = lesions > 0
        return 1 - (per_sample[has_lesion] / lesions[has_lesion]).mean()


def lesion_ids(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number every voxel of a one-hot target (B, K, ...) by the lesion it belongs to.

    Returns:
        ``ids``: (B·K·N,) int64, flattened like ``target``: voxels outside any lesion of (b, k) get the group id
        ``b·K + k``; the voxels of the j-th lesion found overall get ``B·K + j``.
        ``owner``: (L,) int64, for each of the L lesions the group id ``b·K + k`` it belongs to.
    """
    masks = target.detach().to("cpu", torch.bool).numpy()
    batch, classes = masks.shape[:2]
    connectivity = 26 if masks.ndim == 5 else 8
    ids = np.empty(masks.shape, np.int64)
    owner: list[int] = []
    for b in range(batch):
        for k in range(classes):
            group = b * classes + k
            labels, count = cc3d.connected_components(masks[b, k], connectivity=connectivity, return_N=True)
            first = batch * classes + len(owner)
            ids[b, k] = np.where(labels > 0, labels.astype(np.int64) + first - 1, group)
            owner += [group] * count
    return torch.from_numpy(ids.reshape(-1)), torch.tensor(owner, dtype=torch.int64)


class FocalLoss(nn.Module):
    """Binary (sigmoid) focal loss of Lin et al., averaged over all voxels and classes:
    ``−α_t (1 − p_t)^γ log p_t`` with ``p_t = p`` and ``α_t = alpha`` on lesion voxels, ``1 − p`` and
    ``1 − alpha`` elsewhere. γ = 0 and α = 0.5 give half the BCE.

    Args:
        gamma: focusing exponent γ ≥ 0 (0: no focusing).
        alpha: weight of the lesion class in [0, 1].
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        if gamma < 0 or not 0 <= alpha <= 1:
            raise ValueError(f"focal loss needs gamma >= 0 and alpha in [0, 1], got gamma={gamma}, alpha={alpha}")
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...), ``target`` (B, K, ...) one-hot float; returns a scalar."""
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # = −log p_t, stable
        weight = self.alpha * target + (1 - self.alpha) * (1 - target)
        if self.gamma:
            weight = weight * (1 - torch.exp(-bce)) ** self.gamma
        return (weight * bce).mean()


class BCELoss(nn.Module):
    """Binary cross-entropy with logits, averaged over voxels and classes; lesion voxels weighted by
    ``positive_weight`` (the positive term only, as ``pos_weight`` in torch; the mean is still over voxels)."""

    def __init__(self, positive_weight: float = 1.0) -> None:
        super().__init__()
        if positive_weight <= 0:
            raise ValueError(f"positive_weight must be > 0, got {positive_weight}")
        self.positive_weight = positive_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...), ``target`` (B, K, ...) one-hot float; returns a scalar."""
        weight = None if self.positive_weight == 1 else torch.tensor(self.positive_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


class CompoundLoss(nn.Module):
    """Weighted sum of loss terms on one output: ``Σ weight_i · term_i(logits, one_hot(target))``.

    Args:
        terms: (weight, module) pairs; each module takes (B, K, ...) logits and one-hot targets.
    """

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms or sum(weight for weight, _ in terms) <= 0:
            raise ValueError("a loss needs at least one term with a positive weight")
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList(module for _, module in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...) of any float dtype; ``target`` (B, 1, ...) integer labels, same spatial size."""
        if (
            target.ndim != logits.ndim
            or target.shape[1] != 1
            or target.shape[0] != logits.shape[0]
            or (target.shape[2:] != logits.shape[2:])
        ):
            raise ValueError(
                f"target must be a (B, 1, ...) label map of the size of the logits (B, K, ...); got "
                f"logits {tuple(logits.shape)}, target {tuple(target.shape)}"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            one_hot = one_hot_foreground(target, logits.shape[1])
            return sum(w * term(logits, one_hot) for w, term in zip(self.weights, self.terms))


def balanced_positive_weight(lesion_fraction: float) -> float:
    """``positive_weight`` of ``weighted_ce`` that balances lesion and background: ``(1 − f) / f`` for a lesion
    fraction ``f`` in (0, 1).

    Up to a constant factor (which RMSProp and Adam ignore) this is the CTP paper's weighted cross entropy
    ``−w·y·log p − (1 − w)·(1 − y)·log(1 − p)`` with the lesion class weighted by the background share
    ``w = 1 − f`` and the background by ``f``, so each class contributes equally to the loss.

    Example:
        >>> balanced_positive_weight(0.2)
        4.0
    """
    if not 0 < lesion_fraction < 1:
        raise ValueError(f"the lesion fraction must lie in (0, 1), got {lesion_fraction}")
    return (1 - lesion_fraction) / lesion_fraction


class AuxiliaryLoss(nn.Module):
    """``loss(main) + weight · loss(auxiliary)`` for a network that returns (main, auxiliary) logits while training
    (PSPNet's auxiliary head, weight 0.4 in PSPNet); a single tensor (evaluation mode) gets ``loss`` alone, so
    validation losses compare with training ones only up to the auxiliary term.

    Args:
        loss: takes (logits, target).
        weight: weight of the auxiliary output's loss, >= 0.
    """

    def __init__(self, loss: nn.Module, weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"the auxiliary loss weight must be >= 0, got {weight}")
        self.loss, self.weight = loss, float(weight)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        main, auxiliary = outputs
        return self.loss(main, target) + self.weight * self.loss(auxiliary, target)


def deep_supervision_weights(levels: int) -> list[float]:
    """Weights of ``levels`` outputs, full resolution first: 1, 1/2, 1/4, ..., the coarsest set to 0 when there
    are at least 3 levels (too coarse to say where a small lesion is; nnU-Net always zeroes it, which with two
    levels would switch deep supervision off), normalized to sum 1."""
    if levels < 1:
        raise ValueError(f"need at least one output, got {levels}")
    weights = [0.5**level for level in range(levels)]
    if levels >= 3:
        weights[-1] = 0.0
    return [w / sum(weights) for w in weights]


def downsample_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, 1, ...) integer labels to spatial ``size`` by max-pooling each label's mask (then the largest label
    present wins), so a lesion smaller than a coarse voxel still marks that voxel instead of vanishing the way it
    would under nearest-neighbour subsampling."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    pool = F.adaptive_max_pool3d if target.ndim == 5 else F.adaptive_max_pool2d
    labels = int(target.max().item())
    out = torch.zeros((target.shape[0], 1, *size), dtype=target.dtype, device=target.device)
    for label in range(1, labels + 1):
        present = pool((target == label).float(), tuple(size)) > 0
        out[present] = label
    return out


class DeepSupervisionLoss(nn.Module):
    """``loss`` on every output of a deep-supervised network, weighted by :func:`deep_supervision_weights`.

    Args:
        loss: takes (logits, target) at one resolution.
        levels: number of outputs expected.

    Forward takes a list of ``levels`` logits, full resolution first, and the full-resolution (B, 1, ...) target,
    which is max-pooled to each output's size (:func:`downsample_target`).
    """

    def __init__(self, loss: nn.Module, levels: int) -> None:
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(levels)

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(outputs) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} deep-supervision outputs, got {len(outputs)}")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(self.weights, outputs):
            if weight:
                total = total + weight * self.loss(logits, downsample_target(target, logits.shape[2:]))
        return total


def build_loss(loss: Loss, deep_supervision_levels: int = 1) -> nn.Module:
    """The loss of a plans ``Loss`` (see the module docstring), wrapped for deep supervision when
    ``deep_supervision_levels`` > 1.

    Args:
        loss: ``configuration.loss`` from the plans.
        deep_supervision_levels: number of network outputs (1: a single full-resolution output).

    Returns:
        A module ``(logits or list of logits, target (B, 1, ...)) -> scalar float32``.

    Raises:
        ValueError: unknown loss name, or weights that leave no positive term.

    Example:
        >>> criterion = build_loss(Loss("dice_bce"), deep_supervision_levels=3)
        >>> loss = criterion([torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 2, 2, 2)],
        ...                  torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16))  # scalar, float32
    """
    if loss.name not in LOSSES:
        raise ValueError(f"unknown loss '{loss.name}', use one of {list(LOSSES)}")
    focal = (loss.focal_weight, FocalLoss(loss.focal_gamma, loss.focal_alpha))
    terms = {
        "dice_bce": [(loss.dice_weight, SoftDiceLoss()), (loss.bce_weight, BCELoss())],
        "dice_bce_focal": [(loss.dice_weight, SoftDiceLoss()), (loss.bce_weight, BCELoss()), focal],
        "focal": [focal],
        "weighted_ce": [(1.0, BCELoss(loss.positive_weight))],
    }[loss.name]
    terms.append((loss.lesion_dice_weight, LesionWiseDiceLoss()))
    compound = CompoundLoss([(weight, term) for weight, term in terms if weight])
    return DeepSupervisionLoss(compound, deep_supervision_levels) if deep_supervision_levels > 1 else compound


def describe_loss(loss: Loss) -> str:
    """One line naming a loss and its non-zero terms, e.g. ``weighted_ce (lesion weight 19.3)`` or
    ``dice_bce (Dice 1 + BCE 1 + lesion-wise Dice 1)``."""
    lesion_wise = f" + lesion-wise Dice {loss.lesion_dice_weight:g}" if loss.lesion_dice_weight else ""
    if loss.name == "weighted_ce":
        return f"weighted_ce (lesion weight {loss.positive_weight:.3g}{lesion_wise})"
    terms = [
        f"{name} {weight:g}"
        for name, weight in (("Dice", loss.dice_weight), ("BCE", loss.bce_weight), ("focal", loss.focal_weight))
        if weight
    ]
    focal = f", focal γ={loss.focal_gamma:g} α={loss.focal_alpha:g}" if loss.focal_weight else ""
    return f"{loss.name} ({' + '.join(terms)}{lesion_wise}{focal})"
