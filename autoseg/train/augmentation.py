"""Data augmentation with batchgenerators: which transforms, with which ranges and probabilities.

Batches are dicts ``{"data": (B, C, *S) float32, "seg": (B, 1, *S) integer labels, "keys": [...]}`` where
``S`` is the *sampling* patch (see :func:`sampling_patch_size`); the training pipeline returns
``data`` (B, C, *P) float32 and ``seg`` (B, 1, *P) int16 torch tensors for the final patch ``P``.

Spatial augmentation (``SpatialTransform``, one per configuration kind):

- 3-D (``3d_resunet``): nnU-Net's: rotation ±30° about each axis (p 0.2 per sample), scaling 0.7–1.4
  (p 0.2), optional elastic deformation (p 0.2); cubic interpolation for data, per-label linear for labels.
- thin 3-D patches (``3d_aniso``: the longest patch edge more than 3x the shortest): nnU-Net's
  ``do_dummy_2D_aug``: the flat axis is folded into the channels, the spatial transform runs in-plane
  (rotation ±180°, scaling 0.7–1.4) and the axis is unfolded again, so slices are never interpolated
  across the thick axis; simulated low resolution also leaves that axis alone.
- 2-D U-Net slices: nnU-Net's in-plane ±180° (±15° for patches more than 1.5x longer than wide).
- 2-D PSPNet (``2d_pspnet``): the CTP paper's rotation ±10°, translation ±10% of the patch edge and
  scaling 0.9–1.1, applied to every sample.

Then nnU-Net's intensity augmentations (Gaussian noise p 0.1, Gaussian blur p 0.2, multiplicative
brightness 0.75–1.25 p 0.15, contrast p 0.15, simulated low resolution p 0.25, inverted gamma p 0.1, gamma
p 0.3), mirroring along ``configuration.mirror_axes`` (p 0.5 per axis) and conversion to tensors.

Outside the volume and outside the sampling patch, data and labels are 0 (constant border), as in nnU-Net.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import NumpyToTensor

from autoseg.plans import Configuration

Shape = tuple[int, ...]

#: A 3-D patch whose longest edge exceeds this multiple of its shortest is augmented in-plane (nnU-Net's value).
ANISOTROPY_THRESHOLD = 3.0


@dataclass(frozen=True)
class SpatialAugmentation:
    """The spatial augmentation of one configuration and patch.

    Attributes:
        rotation_degrees: largest |angle| about each rotation axis: 3 (about x, y, z) for 3-D patches, 1 for 2-D
            (and for in-plane augmentation of thin 3-D patches).
        scale_range: (smallest, largest) zoom; > 1 shows more of the image, i.e. zooms out (batchgenerators).
        translation_fraction: largest shift of the crop centre, as a fraction of the patch edge.
        probability: chance per sample of a rotation and, independently, of a scaling.
        flat_axis: for in-plane augmentation of a thin 3-D patch, the axis folded into the channels.
    """

    rotation_degrees: tuple[float, ...]
    scale_range: tuple[float, float]
    translation_fraction: float = 0.0
    probability: float = 0.2
    flat_axis: int | None = None

    def sampling_patch_size(self, patch_size: Sequence[int]) -> Shape:
        """The patch to read so that the spatial transform finds image data everywhere (see
        :func:`sampling_patch_size`)."""
        if self.flat_axis is None:
            return sampling_patch_size(patch_size, self.rotation_degrees, self.scale_range, self.translation_fraction)
        in_plane = [p for axis, p in enumerate(patch_size) if axis != self.flat_axis]
        enlarged = list(
            sampling_patch_size(in_plane, self.rotation_degrees, self.scale_range, self.translation_fraction)
        )
        enlarged.insert(self.flat_axis, int(patch_size[self.flat_axis]))
        return tuple(enlarged)


def resampling_probability(spatial: SpatialAugmentation) -> float:
    """Chance that a sample is rotated or scaled, i.e. interpolated rather than only cropped (elastic off): the
    expensive case of the spatial transform."""
    return 1 - (1 - spatial.probability) ** 2


def spatial_transform(
    configuration: Configuration, patch_size: Sequence[int], probability: float | None = None
) -> SpatialTransform:
    """The spatial transform of the training pipeline alone (no elastic deformation); ``probability`` overrides
    the chance of rotation and of scaling (the compute probe times the interpolating and the cropping case)."""
    spatial = spatial_augmentation(configuration, patch_size)
    if probability is not None:
        spatial = dataclasses.replace(spatial, probability=probability)
    return _spatial_transform(spatial, tuple(int(p) for p in patch_size), False)


def spatial_augmentation(configuration: Configuration, patch_size: Sequence[int]) -> SpatialAugmentation:
    """Choose the spatial augmentation for ``configuration`` at ``patch_size`` (see the module docstring)."""
    if configuration.network.architecture == "PSPNet":
        return SpatialAugmentation((10.0,), (0.9, 1.1), translation_fraction=0.1, probability=1.0)
    if len(patch_size) == 2:
        elongated = max(patch_size) / min(patch_size) > 1.5  # a full turn would put the long edge across
        return SpatialAugmentation((15.0,) if elongated else (180.0,), (0.7, 1.4))
    flat = int(np.argmin(patch_size))
    if max(patch_size) / patch_size[flat] > ANISOTROPY_THRESHOLD:
        return SpatialAugmentation((180.0,), (0.7, 1.4), flat_axis=flat)
    return SpatialAugmentation((30.0, 30.0, 30.0), (0.7, 1.4))


def sampling_patch_size(
    patch_size: Sequence[int],
    rotation_degrees: Sequence[float],
    scale_range: tuple[float, float],
    translation_fraction: float = 0.0,
) -> Shape:
    """Edges of the box a spatial transform of ``patch_size`` may read from.

    Per axis: the largest extent of the patch rotated about any one rotation axis by up to its angle (taken
    separately per rotation axis, like nnU-Net: a rare combined rotation may reach slightly beyond the box
    at the corners, which then read zeros), times the largest zoom (coordinates are multiplied by it), plus
    the translation on both sides. Rounded up so that ``S - P`` is even and the final patch sits exactly
    in the middle.

    Args:
        patch_size: final patch (P0, P1[, P2]).
        rotation_degrees: 3 angles (about axis 0, 1, 2) for 3-D, 1 (in-plane) for 2-D.
        scale_range: (smallest, largest) zoom factor.
        translation_fraction: largest shift of the centre as a fraction of the patch edge.

    Returns:
        The sampling patch, at least ``patch_size`` in every axis.

    Example:
        >>> sampling_patch_size((64, 64), (10.0,), (0.9, 1.1), 0.1)
        (96, 96)
    """
    patch = np.asarray(patch_size, dtype=float)
    dim = len(patch)
    if len(rotation_degrees) != (3 if dim == 3 else 1):
        raise ValueError(f"{dim}-D patch {list(patch_size)} needs {3 if dim == 3 else 1} rotation angles")
    extent = patch.copy()
    planes = [(1, 2), (0, 2), (0, 1)] if dim == 3 else [(0, 1)]  # the plane each rotation axis turns
    for degrees, (a, b) in zip(rotation_degrees, planes):
        angles = np.radians(np.linspace(0.0, min(abs(degrees), 90.0), 91))  # beyond 90° extents repeat
        extent[a] = max(extent[a], float(np.max(patch[a] * np.cos(angles) + patch[b] * np.sin(angles))))
        extent[b] = max(extent[b], float(np.max(patch[b] * np.cos(angles) + patch[a] * np.sin(angles))))
    extent = extent * max(1.0, float(max(scale_range))) + 2 * translation_fraction * patch
    margin = np.ceil((extent - patch - 1e-6) / 2).clip(min=0)  # ignore float noise at exact fits
    return tuple(int(p + 2 * m) for p, m in zip(patch_size, margin))


def training_transforms(
    configuration: Configuration, patch_size: Sequence[int], elastic: bool = False, *, to_tensor: bool = True
) -> Compose:
    """The training pipeline for ``configuration`` producing patches of ``patch_size``.

    Args:
        configuration: gives the kind of spatial augmentation, ``mirror_axes`` and (2-D) the dimension.
        patch_size: the final patch P (the stage's); batches must come in at ``spatial_augmentation(...)
            .sampling_patch_size(patch_size)``.
        elastic: add elastic deformation (p 0.2, nnU-Net's magnitude); off by default, as in nnU-Net.
        to_tensor: end with the conversion to torch tensors; False leaves numpy arrays (what background
            processes should send, see ``autoseg.train.loading``).

    Returns:
        A ``Compose`` taking ``data`` (B, C, *S) float32 and ``seg`` (B, 1, *S) and returning torch tensors
        ``data`` (B, C, *P) float32 and ``seg`` (B, 1, *P) int16 (numpy arrays without ``to_tensor``).
    """
    patch = tuple(int(p) for p in patch_size)
    spatial = spatial_augmentation(configuration, patch)
    transforms: list[AbstractTransform] = []
    if spatial.flat_axis is not None:
        transforms.append(FoldAxisIntoChannels(spatial.flat_axis))
    transforms.append(_spatial_transform(spatial, patch, elastic))
    if spatial.flat_axis is not None:
        transforms.append(UnfoldAxisFromChannels())
    transforms += _intensity_transforms(None if spatial.flat_axis is None else (spatial.flat_axis,))
    if configuration.mirror_axes:
        transforms.append(MirrorTransform(tuple(configuration.mirror_axes)))
    transforms.append(SegmentationToInteger())
    return Compose(transforms + ([NumpyToTensor(["data", "seg"])] if to_tensor else []))


def validation_transforms(*, to_tensor: bool = True) -> Compose:
    """No augmentation: ``seg`` to int16 and, with ``to_tensor``, both to torch tensors (float32, int16)."""
    return Compose([SegmentationToInteger()] + ([NumpyToTensor(["data", "seg"])] if to_tensor else []))


def _spatial_transform(spatial: SpatialAugmentation, patch: Shape, elastic: bool) -> SpatialTransform:
    in_plane = patch if spatial.flat_axis is None else tuple(p for a, p in enumerate(patch) if a != spatial.flat_axis)
    radians = [(-math.radians(d), math.radians(d)) for d in spatial.rotation_degrees] + [(0.0, 0.0)] * 2
    sampled_in_plane = tuple(s for a, s in enumerate(spatial.sampling_patch_size(patch)) if a != spatial.flat_axis)
    # A random crop centre within ±shift of the middle is the translation (the sampling patch has room for it).
    shift = [int(round(spatial.translation_fraction * p)) for p in in_plane]
    return SpatialTransform(
        in_plane,
        patch_center_dist_from_border=[s // 2 - t for s, t in zip(sampled_in_plane, shift)],
        do_elastic_deform=elastic,
        alpha=(0.0, 200.0),
        sigma=(9.0, 13.0),
        p_el_per_sample=0.2,
        do_rotation=True,
        angle_x=radians[0],
        angle_y=radians[1],
        angle_z=radians[2],
        p_rot_per_sample=spatial.probability,
        p_rot_per_axis=1.0,
        do_scale=True,
        scale=spatial.scale_range,
        p_scale_per_sample=spatial.probability,
        border_mode_data="constant",
        border_cval_data=0,
        order_data=3,
        border_mode_seg="constant",
        border_cval_seg=0,
        order_seg=1,
        random_crop=spatial.translation_fraction > 0,
    )


def _intensity_transforms(ignore_axes: tuple[int, ...] | None) -> list[AbstractTransform]:
    """nnU-Net's intensity augmentations and probabilities; ``ignore_axes`` keep their resolution."""
    return [
        GaussianNoiseTransform(noise_variance=(0.0, 0.1), p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        SimulateLowResolutionTransform(
            zoom_range=(0.5, 1.0),
            per_channel=True,
            p_per_channel=0.5,
            order_downsample=0,
            order_upsample=3,
            p_per_sample=0.25,
            ignore_axes=ignore_axes,
        ),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
    ]


class FoldAxisIntoChannels(AbstractTransform):
    """(B, C, X, Y, Z) -> (B, C * A, ...): spatial ``axis`` (length A) joins the channels, so a 2-D spatial
    transform treats each slice along it alike. Undone by :class:`UnfoldAxisFromChannels`."""

    def __init__(self, axis: int) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be a spatial axis 0, 1 or 2, got {axis}")
        self.axis = axis

    def __call__(self, **batch):
        batch["folded_axis"] = self.axis
        for key in ("data", "seg"):
            moved = np.moveaxis(batch[key], 2 + self.axis, 2)  # (B, C, A, in-plane...)
            batch[f"folded_{key}_shape"] = moved.shape[:3]
            batch[key] = np.ascontiguousarray(moved).reshape(moved.shape[0], -1, *moved.shape[3:])
        return batch


class UnfoldAxisFromChannels(AbstractTransform):
    """Undo :class:`FoldAxisIntoChannels`: (B, C * A, P, Q) -> (B, C, X, Y, Z) with A back at its axis."""

    def __call__(self, **batch):
        axis = batch.pop("folded_axis")
        for key in ("data", "seg"):
            b, c, a = batch.pop(f"folded_{key}_shape")
            unfolded = batch[key].reshape(b, c, a, *batch[key].shape[2:])
            batch[key] = np.ascontiguousarray(np.moveaxis(unfolded, 2, 2 + axis))
        return batch


class SegmentationToInteger(AbstractTransform):
    """``seg`` to int16: the spatial transform returns labels as float32; integers are what losses compare."""

    def __call__(self, **batch):
        batch["seg"] = np.rint(batch["seg"]).astype(np.int16)
        return batch
