"""Sliding-window inference: patches, Gaussian weighting, mirroring, 2-D slices, ensembles.

Shared by the validation at the end of training and by ``autoseg_predict``. The conventions follow
nnU-Net v2's predictor:

- **Windows** of the training patch size tile the volume, the first at 0 and the last flush with the
  end, neighbours at most ``step_size`` (default 0.5) of a patch apart. A volume smaller than the patch
  is padded (centred) with 0, the value of normalized background, and the padding is cropped away at
  the end.
- **Gaussian weighting**: each window's probabilities are weighted by a Gaussian with sigma 1/8 of the
  patch edge (:func:`gaussian_importance_map`) and the weighted sum is divided by the summed weights,
  because a network sees less context near a patch border and is less reliable there.
- **Probabilities** are the sigmoid of the logits, one channel per non-background label (K channels).
  Averages (over windows, mirrorings and ensemble members) are averages of probabilities, so a voxel
  no window reached keeps probability 0.
- **Mirroring** (test-time augmentation): the mean over all ``2 ** len(mirror_axes)`` combinations of
  flips (flip the input, predict, flip the prediction back). :class:`autoseg.infer.predictor.Predictor` chooses the axes with ``tta``:
  ``all`` (the configuration's mirror axes), ``lr`` (only the patient's left-right axis, found from the image's
  direction matrix by :func:`left_right_axis`) or ``none``; the forward passes per window are ``2 ** len(axes)``.
- **CPU speed**: on the CPU a 3-D network runs in the memory format :func:`inference_memory_format` measured to be
  fastest for its precision (channels-last), under bf16 autocast where the caller asks for it.
- **Skipping**: a window whose input is entirely 0 lies outside the non-zero region (preprocessing sets
  everything outside the brain to exactly 0 for MRI) and is not run at all.
- **Views** (``views=True``): besides the mean, the Gaussian-weighted lesion probability of every mirroring on its
  own, ``(F, X, Y, Z)`` for ``F`` flip combinations (the maximum over the K channels), from the same forward passes;
  ``autoseg.infer.quality`` measures how much they agree. They cost ``F`` more float32 volumes of memory.
- **2-D configurations** run the 2-D network on every slice along ``slice_axis``, each slice tiled in
  plane the same way (:func:`predict_slices`).

Arrays are ``(C, X, Y, Z)`` for one case and ``(B, C, X, Y, Z)`` for a batch; spacing and patch sizes
are in the same axis order. For 2-D, ``patch_size`` and ``mirror_axes`` refer to the slice's own two
axes, i.e. the volume's axes without ``slice_axis``, in their order."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autoseg.errors import UsageError
from autoseg.io.geometry import left_right_axis
from autoseg.networks import Shape

#: Smallest weight of the Gaussian importance map (its maximum is 1): every voxel of a window counts a
#: little, so no voxel covered only by window borders is left with a (near) zero weight sum.
GAUSSIAN_FLOOR = 1e-4

#: ``tta`` choices: no mirroring, the left-right flip only, every combination of the planned mirror axes.
TTA_CHOICES = ("none", "lr", "all")

#: Accumulators go on the GPU only when they need at most this share of the memory still available,
#: leaving the rest for the network's activations.
_DEVICE_ACCUMULATOR_SHARE = 0.5

Window = tuple[slice, ...]
"""Spatial slices of one window, one per axis, in the array's axis order."""


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 1 / 8, floor: float = GAUSSIAN_FLOOR
) -> np.ndarray:
    """Weights of the voxels of one window: a Gaussian centred on the patch, maximum 1, never below ``floor``.

    Args:
        patch_size: voxels per axis, e.g. ``(128, 128, 128)``; an axis of size 1 has weight 1 along it.
        sigma_scale: sigma per axis as a fraction of that axis's size. Default 1/8 (nnU-Net).
        floor: smallest weight; border voxels get at least this. Default :data:`GAUSSIAN_FLOOR`.

    Returns:
        float32 array of shape ``patch_size``, symmetric about the patch centre, maximum exactly 1.

    Raises:
        ValueError: a non-positive size, ``sigma_scale`` or ``floor``, or ``floor`` above 1.

    Example:
        >>> g = gaussian_importance_map((8, 6))
        >>> g.shape, float(g.max()), bool(g.min() > 0)
        ((8, 6), 1.0, True)
    """
    if any(int(n) < 1 for n in patch_size) or sigma_scale <= 0 or not 0 < floor <= 1:
        raise ValueError(
            f"need positive patch sizes, sigma_scale > 0 and 0 < floor <= 1, got {list(patch_size)}, "
            f"{sigma_scale}, {floor}"
        )
    profiles = []
    for n in patch_size:
        offsets = np.arange(int(n)) - (int(n) - 1) / 2  # symmetric: the centre lies between voxels for even n
        profiles.append(np.exp(-0.5 * (offsets / (n * sigma_scale)) ** 2))
    weights = reduce(np.multiply.outer, profiles)
    weights /= weights.max()
    return np.maximum(weights, floor).astype(np.float32)


def sliding_window_positions(shape: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5) -> list[Window]:
    """Windows of ``patch_size`` that cover every voxel of ``shape``.

    Per axis the first window starts at 0 and the last ends at the volume's end; neighbours are evenly
    spread and at most ``floor(step_size * patch)`` (at least 1) voxels apart, so windows overlap by at
    least ``1 - step_size`` of a patch.

    Args:
        shape: spatial size of the (padded) volume, each at least the patch size.
        patch_size: window size per axis, same length as ``shape``.
        step_size: largest distance between neighbouring windows as a fraction of the patch, in (0, 1].

    Returns:
        One tuple of slices (one per axis) per window, in C order (last axis fastest).

    Raises:
        ValueError: lengths differ, a patch edge is not positive or larger than the volume, or
            ``step_size`` is outside (0, 1].
    """
    if len(shape) != len(patch_size):
        raise ValueError(f"shape {list(shape)} and patch size {list(patch_size)} need the same number of axes")
    if not 0 < step_size <= 1:
        raise UsageError(f"step_size must lie in (0, 1], got {step_size}")
    if any(p < 1 or p > s for s, p in zip(shape, patch_size)):
        raise ValueError(f"patch {list(patch_size)} must be positive and fit in the volume {list(shape)}; pad first")
    per_axis = [_window_starts(int(s), int(p), step_size) for s, p in zip(shape, patch_size)]
    return [
        tuple(slice(start, start + int(p)) for start, p in zip(starts, patch_size))
        for starts in itertools.product(*per_axis)
    ]


def _window_starts(size: int, patch: int, step_size: float) -> list[int]:
    if size == patch:
        return [0]
    largest_step = max(1, math.floor(step_size * patch))
    gaps = math.ceil((size - patch) / largest_step)
    # Integer floor of evenly spread starts: every gap is at most ceil((size - patch) / gaps) <= largest_step.
    return [(i * (size - patch)) // gaps for i in range(gaps + 1)]


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (the empty one first): the flips that mirroring averages over.

    Example:
        >>> mirror_combinations((0, 2))
        [(), (0,), (2,), (0, 2)]
    """
    axes = tuple(int(a) for a in mirror_axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"mirror axes must not repeat, got {list(axes)}")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def tta_mirror_axes(
    mirror_axes: Sequence[int],
    tta: str,
    direction: Sequence[float] | None = None,
    slice_axis: int | None = None,
) -> tuple[tuple[int, ...], str | None]:
    """The mirror axes that one ``tta`` choice averages over, and a notice when ``lr`` cannot be honoured.

    Args:
        mirror_axes: the configuration's mirror axes: volume axes for 3-D, the slice's own two axes for 2-D.
        tta: ``all`` (``mirror_axes``), ``lr`` (only the left-right axis) or ``none``.
        direction: the image's direction matrix (see :func:`left_right_axis`); needed for ``lr`` only.
        slice_axis: the volume axis 2-D slices are taken along; None for 3-D.

    Returns:
        The axes, in the convention of ``mirror_axes``, and None or a one-line notice: ``lr`` falls back to no
        mirroring when the left-right axis is not among ``mirror_axes`` (or is the 2-D slice axis).

    Raises:
        ValueError: an unknown ``tta``, or ``lr`` without ``direction``.

    Example:
        >>> tta_mirror_axes((0, 1, 2), "lr", (0, 1, 0, 0, 0, 1, 1, 0, 0))
        ((1,), None)
    """
    if tta not in TTA_CHOICES:
        raise UsageError(f"unknown tta '{tta}', use one of {list(TTA_CHOICES)}")
    axes = tuple(int(a) for a in mirror_axes)
    if tta == "all":
        return axes, None
    if tta == "none":
        return (), None
    if direction is None:
        raise ValueError("tta 'lr' needs the image's direction matrix to find the left-right axis")
    volume_axis = left_right_axis(direction)
    in_plane = [a for a in range(3) if a != slice_axis]
    axis = in_plane.index(volume_axis) if volume_axis in in_plane else None
    if axis is None or axis not in axes:
        return (), (
            f"--tta lr: the left-right axis is array axis {volume_axis}, which the configuration does not "
            f"mirror (mirror axes {list(axes)}{'' if slice_axis is None else f', slice axis {slice_axis}'}); "
            "predicting without mirroring"
        )
    return (axis,), None


def inference_memory_format(device: str | torch.device, autocast_dtype: torch.dtype | None) -> torch.memory_format:
    """Memory format of a 3-D network and its input windows for inference: the faster one measured per precision.

    On the CPU channels-last (``torch.channels_last_3d``) is the faster format in both precisions, so both get it.
    Measured with autoseg's ResidualUNet (features 16-256, four stride-2 levels, GroupNorm; the CPUPlanner's
    network), a batch of 2 windows in inference mode, torch 2.13.0 on 2 threads of an AMD EPYC with AVX512-BF16
    (shared with a training run; median seconds per window over 5 (80³) and 3 (96³) interleaved rounds)::

        window  precision  contiguous  channels_last_3d
        80³     fp32       2.81        1.90  (-32 %)
        80³     bf16       1.28        1.11  (-13 %)
        96³     fp32       3.81        2.81  (-26 %)
        96³     bf16       2.46        1.81  (-27 %)

    Training measures its own choice when it starts (``autoseg.plan.step_probe``): there the backward pass weighs
    in, and bf16 channels-last pays only with autoseg's GroupNorm backward (``autoseg.networks.normalization``). On
    CUDA the contiguous format is kept (not measured there); 2-D networks are never converted.
    """
    if torch.device(device).type != "cpu":
        return torch.contiguous_format
    faster = {None: torch.channels_last_3d, torch.bfloat16: torch.channels_last_3d}  # fp32 and bf16, measured above
    return faster.get(autocast_dtype, torch.contiguous_format)


def accumulation_device(requested_cpu: bool | None, device: torch.device, num_bytes: int) -> torch.device:
    """Where the probability and weight sums live: ``device`` or the CPU.

    Args:
        requested_cpu: True = CPU, False = ``device``, None = decide: on CUDA the device when the sums
            need at most half the memory still available to PyTorch there, else the CPU.
        device: the device the network runs on.
        num_bytes: size of the sums.
    """
    if device.type == "cpu" or requested_cpu:
        return torch.device("cpu")
    if requested_cpu is False or device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return device if num_bytes <= _DEVICE_ACCUMULATOR_SHARE * (free + reusable) else torch.device("cpu")


@dataclass(frozen=True)
class _Run:
    """How windows are run: settings shared by the 3-D and the slice-wise prediction."""

    step_size: float
    mirror_axes: tuple[int, ...]  # spatial axes of the network's input (0 = first spatial axis)
    batch_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    skip_empty: bool
    accumulate_on_cpu: bool | None
    progress: bool
    squeeze_first_axis: bool  # 2-D: windows are (1, a, b) and the network sees (a, b)
    memory_format: torch.memory_format = torch.contiguous_format  # of a 3-D network and its (B, C, X, Y, Z) windows
    views: bool = False  # also accumulate every mirroring's lesion probability on its own

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def flips(self) -> list[tuple[int, ...]]:
        """Tensor dims of a (B, C, *window) batch to flip, one tuple per mirror combination."""
        first = 3 if self.squeeze_first_axis else 2  # a 2-D window is (1, a, b): its axes start one later
        return [tuple(first + a for a in combo) for combo in mirror_combinations(self.mirror_axes)]


def predict_sliding_window(
    network: nn.Module,
    data: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    *,
    step_size: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    skip_empty: bool = True,
    accumulate_on_cpu: bool | None = None,
    progress: bool = False,
    memory_format: torch.memory_format | None = None,
    views: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of a 3-D network for a whole preprocessed volume.

    The network is put in eval mode with deep supervision off for the call and restored afterwards.

    Args:
        network: 3-D segmentation network on ``device``; (B, C, *patch) -> logits (B, K, *patch) (a list,
            as deep supervision returns, is read at its first, full-resolution entry).
        data: (C, X, Y, Z) normalized volume, float32.
        patch_size: (X, Y, Z) window size; each edge acceptable to the network (a multiple of its total stride).
        step_size: largest distance between neighbouring windows, fraction of the patch, in (0, 1]. Default 0.5.
        mirror_axes: spatial axes (0 = X) to mirror over; the result averages all 2^n flip combinations.
            Default () (no mirroring).
        batch_size: windows per forward pass. Default 2.
        device: where the network runs. Default ``"cpu"``.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the network under autocast; None
            (default) runs it in float32. Sums are always float32.
        skip_empty: do not run windows whose input is entirely 0; voxels they alone cover get probability 0.
            Default True.
        accumulate_on_cpu: keep the sums on the CPU (True), on ``device`` (False), or decide from the free
            memory (None, default; see :func:`accumulation_device`). On the CPU device always the CPU.
        progress: show a progress bar over windows. Default False.
        memory_format: of the network and its input windows while predicting (the network's own is restored
            afterwards); None (default): :func:`inference_memory_format` for ``device`` and ``autocast_dtype``.
        views: also return every mirroring's lesion probability (see the module docstring). Default False.

    Returns:
        (K, X, Y, Z) float32 probabilities on the CPU; with ``views`` also the (F, X, Y, Z) float32 lesion
        probability of each of the F mirror combinations (:func:`mirror_combinations` order).

    Raises:
        ValueError: ``data`` is not 4-D, the patch has not 3 entries, or an invalid step size or mirror axis.

    Example:
        >>> class Half(nn.Module):
        ...     def forward(self, x):
        ...         return torch.zeros_like(x[:, :1])
        >>> predict_sliding_window(Half(), torch.ones(1, 10, 9, 7), (8, 8, 8)).unique().tolist()
        [0.5]
    """
    volume = _as_tensor(data)
    if volume.ndim != 4 or len(patch_size) != 3:
        raise ValueError(
            f"expected data (C, X, Y, Z) and a 3-D patch, got {tuple(volume.shape)} and {list(patch_size)}"
        )
    _check_axes(mirror_axes, 3)
    run = _Run(
        step_size=step_size,
        mirror_axes=tuple(mirror_axes),
        batch_size=batch_size,
        device=torch.device(device),
        autocast_dtype=autocast_dtype,
        skip_empty=skip_empty,
        accumulate_on_cpu=accumulate_on_cpu,
        progress=progress,
        squeeze_first_axis=False,
        memory_format=memory_format or inference_memory_format(device, autocast_dtype),
        views=views,
    )
    return _predict_volume(network, volume, tuple(int(p) for p in patch_size), run)


def predict_slices(
    network: nn.Module,
    data: np.ndarray | torch.Tensor,
    patch_size_2d: Sequence[int],
    slice_axis: int,
    *,
    step_size: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    skip_empty: bool = True,
    accumulate_on_cpu: bool | None = None,
    progress: bool = False,
    views: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of a 2-D network, run on every slice of a volume along ``slice_axis``.

    Each slice is tiled in plane like :func:`predict_sliding_window` (padded when smaller than the patch);
    windows of several slices share a forward pass.

    Args:
        network: 2-D network on ``device``; (B, C, a, b) -> logits (B, K, a, b).
        data: (C, X, Y, Z) normalized volume.
        patch_size_2d: window size over the two in-plane axes, in the volume's axis order without ``slice_axis``.
        slice_axis: 0, 1 or 2 (X, Y, Z): the axis the slices are taken along.
        mirror_axes: in-plane axes (0 or 1, the slice's own axes) to mirror over. Default ().
        batch_size: windows (slices) per forward pass. Default 8.
        step_size, device, autocast_dtype, skip_empty, accumulate_on_cpu, progress, views: as for
            :func:`predict_sliding_window`.

    Returns:
        (K, X, Y, Z) float32 probabilities on the CPU; with ``views`` also (F, X, Y, Z) per mirroring.

    Raises:
        ValueError: ``data`` is not 4-D, ``slice_axis`` not 0-2, the patch has not 2 entries, or an invalid
            step size or mirror axis.
    """
    volume = _as_tensor(data)
    if volume.ndim != 4 or slice_axis not in (0, 1, 2) or len(patch_size_2d) != 2:
        raise ValueError(
            f"expected data (C, X, Y, Z), slice_axis in 0-2 and a 2-D patch, got {tuple(volume.shape)}, "
            f"{slice_axis} and {list(patch_size_2d)}"
        )
    _check_axes(mirror_axes, 2)
    run = _Run(
        step_size=step_size,
        mirror_axes=tuple(mirror_axes),
        batch_size=batch_size,
        device=torch.device(device),
        autocast_dtype=autocast_dtype,
        skip_empty=skip_empty,
        accumulate_on_cpu=accumulate_on_cpu,
        progress=progress,
        squeeze_first_axis=True,
        views=views,
    )
    slices_first = volume.movedim(slice_axis + 1, 1)  # (C, S, a, b), in-plane axes keep their order
    window = (1, *(int(p) for p in patch_size_2d))
    result = _predict_volume(network, slices_first, window, run)
    if views:
        return tuple(r.movedim(1, slice_axis + 1).contiguous() for r in result)
    return result.movedim(1, slice_axis + 1).contiguous()


def _check_axes(mirror_axes: Sequence[int], dimension: int) -> None:
    if any(a not in range(dimension) for a in mirror_axes):
        raise ValueError(
            f"mirror axes must lie in 0..{dimension - 1} for {dimension}-D patches, got {list(mirror_axes)}"
        )


def _predict_volume(
    network: nn.Module, volume: torch.Tensor, window: Shape, run: _Run
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(C, *S) -> (K, *S) (and (F, *S) with ``run.views``): pad to the window, predict (retrying with the sums on the CPU on a GPU
    out-of-memory error when their place was chosen automatically), crop the padding away."""
    padded, inner = _pad_to(volume, window)
    with _inference_state(network, run.memory_format):
        try:
            probabilities = _accumulate(network, padded, window, run)
        except torch.OutOfMemoryError:
            if run.accumulate_on_cpu is not None or run.device.type != "cuda":
                raise
            probabilities = None  # retried below, once the failed attempt's tensors are released
        if probabilities is None:
            torch.cuda.empty_cache()
            probabilities = _accumulate(network, padded, window, dataclasses.replace(run, accumulate_on_cpu=True))
    # The sums are ordinary tensors (only the forward passes run in inference mode), so callers may change the
    # result in place; without padding it is returned without a copy.
    if run.views:
        return tuple(part[(slice(None), *inner)].to("cpu").contiguous() for part in probabilities)
    return probabilities[(slice(None), *inner)].to("cpu").contiguous()


@torch.no_grad()
def _accumulate(
    network: nn.Module, volume: torch.Tensor, window: Shape, run: _Run
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-weighted mean of the window probabilities over a volume at least as large as the window (and,
    with ``run.views``, of each mirroring's lesion probability).

    Memory: the sums are the only full-size tensors, K + 1 float32 volumes (probabilities and weights), F more with
    ``run.views``; the means are computed in place in the sums.
    """
    positions = sliding_window_positions(volume.shape[1:], window, run.step_size)
    if run.skip_empty:
        positions = [p for p in positions if bool(volume[(slice(None), *p)].any())]
    gaussian = torch.from_numpy(gaussian_importance_map(window))
    flips = run.flips()
    sums: _Sums | None = None
    with tqdm(total=len(positions), unit="window", disable=not run.progress, desc="sliding window") as bar:
        for start in range(0, len(positions), run.batch_size):
            chunk = positions[start : start + run.batch_size]
            batch = torch.stack([volume[(slice(None), *p)] for p in chunk]).to(run.device, non_blocking=True)
            probabilities, views = _predict_batch(network, batch, flips, run)
            if sums is None:
                sums = _Sums.allocate(probabilities.shape[1], volume.shape[1:], gaussian, run, len(flips))
            sums.add(chunk, probabilities, views)
            bar.update(len(chunk))
    if sums is None:  # every window was empty
        num_classes = _num_classes(network, volume, window, run)
        empty = torch.zeros((num_classes, *volume.shape[1:]), dtype=torch.float32)
        return (empty, torch.zeros((len(flips), *volume.shape[1:]), dtype=torch.float32)) if run.views else empty
    return sums.mean()


class _Sums:
    """Running sums of weighted probabilities (K, *S) and of weights (*S), float32.

    On the CPU they are NumPy-allocated (shared with the tensors, no copy): :meth:`Predictor.predict_preprocessed`
    hands the probability sums on as its array without a copy, and ``tracemalloc`` sees them (the tests bound the
    memory of the whole inference path with it).
    """

    def __init__(
        self,
        probabilities: torch.Tensor,
        weights: torch.Tensor,
        gaussian: torch.Tensor,
        views: torch.Tensor | None = None,
    ) -> None:
        self.probabilities = probabilities
        self.weights = weights
        self.gaussian = gaussian
        self.views = views

    @classmethod
    def allocate(
        cls, num_classes: int, shape: Sequence[int], gaussian: torch.Tensor, run: _Run, num_views: int
    ) -> _Sums:
        planes = [num_classes, 1] + ([num_views] if run.views else [])
        where = accumulation_device(run.accumulate_on_cpu, run.device, 4 * sum(planes) * math.prod(shape))

        def zeros(*size: int) -> torch.Tensor:
            if where.type == "cpu":
                return torch.from_numpy(np.zeros(size, np.float32))
            return torch.zeros(size, dtype=torch.float32, device=where)

        views = zeros(num_views, *shape) if run.views else None
        return cls(zeros(num_classes, *shape), zeros(*shape), gaussian.to(where), views)

    def add(self, windows: Sequence[Window], probabilities: torch.Tensor, views: torch.Tensor | None) -> None:
        probabilities = probabilities.to(self.weights.device)
        for index, (window, prediction) in enumerate(zip(windows, probabilities)):
            self.probabilities[(slice(None), *window)].addcmul_(prediction, self.gaussian)
            self.weights[window] += self.gaussian
            if self.views is not None:
                self.views[(slice(None), *window)].addcmul_(views[index].to(self.weights.device), self.gaussian)

    def mean(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Where no window was run both sums are 0, and 0 / floor stays 0.
        weights = self.weights.clamp_min_(GAUSSIAN_FLOOR)
        mean = self.probabilities.div_(weights)
        return mean if self.views is None else (mean, self.views.div_(weights))


@torch.inference_mode()
def _predict_batch(
    network: nn.Module, batch: torch.Tensor, flips: Sequence[tuple[int, ...]], run: _Run
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, *window) -> (B, K, *window) float32 probabilities, averaged over the mirror ``flips`` (one forward
    pass per flip), and with ``run.views`` the (B, F, *window) lesion probability (maximum over K) of each flip."""
    total: torch.Tensor | None = None
    views = []
    for dims in flips:
        flipped = batch.flip(dims) if dims else batch
        probabilities = torch.sigmoid(_forward(network, flipped, run).float())
        probabilities = probabilities.flip(dims) if dims else probabilities
        if run.views:
            views.append(probabilities.amax(dim=1))
        total = probabilities if total is None else total.add_(probabilities)
    mean = total.div_(len(flips)) if len(flips) > 1 else total
    return mean, torch.stack(views, dim=1) if run.views else None


def _forward(network: nn.Module, batch: torch.Tensor, run: _Run) -> torch.Tensor:
    """Logits of one batch; a 2-D window (1, a, b) is squeezed for the network and expanded back."""
    inputs = batch.squeeze(2) if run.squeeze_first_axis else batch
    if inputs.ndim == 5:
        inputs = inputs.contiguous(memory_format=run.memory_format)
    with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
        logits = network(inputs)
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return logits.unsqueeze(2) if run.squeeze_first_axis else logits


def _num_classes(network: nn.Module, volume: torch.Tensor, window: Shape, run: _Run) -> int:
    """K without a prediction to read it from: the network's ``num_classes``, else one forward pass."""
    known = getattr(network, "num_classes", None)
    if isinstance(known, int):
        return known
    probe = torch.zeros((1, volume.shape[0], *window), dtype=torch.float32, device=run.device)
    with torch.inference_mode():
        return int(_forward(network, probe, run).shape[1])


def _pad_to(volume: torch.Tensor, window: Shape) -> tuple[torch.Tensor, Window]:
    """Zero-pad (C, *S) to at least ``window`` per axis, centred; returns it and the slices of the original."""
    shape = tuple(volume.shape[1:])
    target = tuple(max(s, w) for s, w in zip(shape, window))
    if target == shape:
        return volume, tuple(slice(0, s) for s in shape)
    inner = tuple(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(shape, target))
    padded = volume.new_zeros((volume.shape[0], *target))
    padded[(slice(None), *inner)] = volume
    return padded, inner


@contextlib.contextmanager
def _inference_state(network: nn.Module, memory_format: torch.memory_format) -> Iterator[None]:
    """Eval mode, no deep supervision and (for a 3-D network) ``memory_format`` while predicting; the previous
    state is restored afterwards."""
    was_training = network.training
    deep_supervision = getattr(network, "deep_supervision", None)
    previous_format = _memory_format_of(network)
    convert = previous_format is not None and previous_format != memory_format
    network.eval()
    if deep_supervision is not None:
        network.deep_supervision = False
    if convert:
        network.to(memory_format=memory_format)
    try:
        yield
    finally:
        network.train(was_training)
        if deep_supervision is not None:
            network.deep_supervision = deep_supervision
        if convert:
            network.to(memory_format=previous_format)


def _memory_format_of(network: nn.Module) -> torch.memory_format | None:
    """channels_last_3d or contiguous for a network of 5-D (3-D convolution) weights; None for any other network,
    whose format is left alone."""
    weights = [p for p in network.parameters() if p.ndim >= 4]
    if not weights or any(p.ndim != 5 for p in weights):
        return None
    channels_last = any(
        not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights
    )
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _as_tensor(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 tensor; a tensor stays on its device, an array (also read-only or memory-mapped) goes to the CPU."""
    if isinstance(data, torch.Tensor):
        return data.detach().float()
    array = np.asarray(data, dtype=np.float32)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)
