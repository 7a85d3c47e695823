"""Predicting whole cases with one configuration and an ensemble of networks (:class:`Predictor`): preprocess the
images as training did, run :mod:`autoseg.infer.sliding_window` with every member, average, post-process and restore
the probabilities to the input grid. Shared by the validation at the end of training and by ``autoseg_predict``.

Arrays are ``(C, X, Y, Z)`` for one case, spacing in mm in the same axis order."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autoseg.errors import UsageError
from autoseg.infer.postprocessing import postprocess_probabilities
from autoseg.infer.quality import AgreementCounter
from autoseg.infer.sliding_window import (
    TTA_CHOICES,
    _as_tensor,
    predict_slices,
    predict_sliding_window,
    tta_mirror_axes,
)
from autoseg.io.geometry import Geometry
from autoseg.plans import Configuration
from autoseg.preprocess.preprocessing import preprocess_arrays, restore_probabilities


def ensemble_probabilities(probabilities: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Mean of the members' probabilities (folds, checkpoints or configurations), all of the same shape.

    Args:
        probabilities: one (K, X, Y, Z) array or CPU tensor per member.

    Returns:
        (K, X, Y, Z) float32 mean.

    Raises:
        ValueError: no members, or members of different shapes.

    Example:
        >>> mean = ensemble_probabilities([np.full((1, 2, 2, 2), 0.2), np.full((1, 2, 2, 2), 0.6)])
        >>> round(float(mean.max()), 3), mean.dtype
        (0.4, dtype('float32'))
    """
    if not probabilities:
        raise ValueError("ensemble_probabilities needs at least one member")
    shapes = {tuple(p.shape) for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members differ in shape: {sorted(shapes)}")
    total = np.zeros(next(iter(shapes)), dtype=np.float64)
    for member in probabilities:
        total += member.detach().cpu().numpy() if isinstance(member, torch.Tensor) else np.asarray(member)
    return (total / len(probabilities)).astype(np.float32)


class Predictor:
    """Predicts cases with one configuration and an ensemble of networks (folds, checkpoints, stages).

    The members must share the configuration's preprocessing (an ensemble of configurations with different
    spacings averages their :meth:`predict_case` probabilities with :func:`ensemble_probabilities` instead).

    Args:
        configuration: the plans' configuration: preprocessing, patch size, dimension, slice axis, mirror
            axes, post-processing.
        networks: one or more trained networks, on ``device``; 3-D for ``dimension`` 3, 2-D for 2.
        step_size: window step as a fraction of the patch; None (default): the configuration's
            ``sliding_window_step``.
        tta: test-time mirroring (see :func:`tta_mirror_axes`): ``all`` (default; every combination of the
            configuration's ``mirror_axes``, as validation uses), ``lr`` (the left-right flip only; needs the
            image's direction, which :meth:`predict_case` has and :meth:`predict_preprocessed` takes) or ``none``.
        use_mirroring: False is the older spelling of ``tta="none"``. Default True.
        batch_size: windows per forward pass; default 2 in 3-D and the configuration's batch size in 2-D.
        device, autocast_dtype, skip_empty, accumulate_on_cpu, progress: as for :func:`predict_sliding_window`.

    Raises:
        ValueError: no networks, a 2-D configuration without ``slice_axis``, or an unknown ``tta``.

    Example:
        >>> predictor = Predictor(configuration, [fold0, fold1], device="cuda")  # doctest: +SKIP
        >>> probabilities, labels = predictor.predict_case(images, geometry)  # doctest: +SKIP
    """

    def __init__(
        self,
        configuration: Configuration,
        networks: Sequence[nn.Module],
        *,
        step_size: float | None = None,
        tta: str = "all",
        use_mirroring: bool = True,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        skip_empty: bool = True,
        accumulate_on_cpu: bool | None = None,
        progress: bool = False,
    ) -> None:
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        if configuration.dimension == 2 and configuration.slice_axis is None:
            raise ValueError(f"configuration '{configuration.name}' is 2-D but has no slice_axis")
        if tta not in TTA_CHOICES:
            raise UsageError(f"unknown tta '{tta}', use one of {list(TTA_CHOICES)}")
        self.configuration = configuration
        self.networks = list(networks)
        self.tta = tta if use_mirroring else "none"
        self._notices: set[str] = set()
        self.batch_size = batch_size or (configuration.batch_size if configuration.dimension == 2 else 2)
        self.options: dict[str, Any] = dict(
            step_size=configuration.sliding_window_step if step_size is None else step_size,
            device=device,
            autocast_dtype=autocast_dtype,
            skip_empty=skip_empty,
            accumulate_on_cpu=accumulate_on_cpu,
            progress=progress,
        )

    def predict_preprocessed(
        self,
        data: np.ndarray | torch.Tensor,
        direction: Sequence[float] | None = None,
        agreement: AgreementCounter | None = None,
    ) -> np.ndarray:
        """Mean probabilities of all networks for one preprocessed case.

        Args:
            data: (C, X', Y', Z') as ``preprocess_arrays`` returns it (target spacing, cropped).
            direction: the raw image's direction matrix; needed only with ``tta="lr"``.
            agreement: receives every network's views (its mirrorings' lesion probabilities,
                ``autoseg.infer.quality``), so the members' and mirrorings' agreement can be measured; None: not
                measured (no extra memory).

        Returns:
            (K, X', Y', Z') float32 probabilities.

        Raises:
            ValueError: ``tta="lr"`` without ``direction``.
        """
        mirror_axes = self.mirror_axes(direction)
        volume = _as_tensor(data)
        total: torch.Tensor | None = None
        for network in self.networks:
            probabilities = self._predict_one(network, volume, mirror_axes, agreement is not None)
            if agreement is not None:
                probabilities, views = probabilities
                agreement.add_member(views)
                del views
            total = probabilities if total is None else total.add_(probabilities)
        if len(self.networks) > 1:
            total.div_(len(self.networks))
        return total.numpy()

    def mirror_axes(self, direction: Sequence[float] | None = None) -> tuple[int, ...]:
        """The axes this predictor mirrors over for an image of ``direction`` (see :func:`tta_mirror_axes`); when
        ``lr`` falls back to no mirroring it says so once, in one line on stderr."""
        configuration = self.configuration
        slice_axis = configuration.slice_axis if configuration.dimension == 2 else None
        axes, notice = tta_mirror_axes(configuration.mirror_axes, self.tta, direction, slice_axis)
        if notice and notice not in self._notices:
            self._notices.add(notice)
            tqdm.write(f"note: {notice}", file=sys.stderr)
        return axes

    def predict_case(self, images: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """Preprocess, predict, restore to the input grid and post-process one raw case.

        Args:
            images: (C, X, Y, Z) raw intensities, channels in the plans' order.
            geometry: the raw images' geometry (their shape, spacing, origin, direction).

        Returns:
            (K, X, Y, Z) float32 probabilities and the (X, Y, Z) uint8 label map, both on the grid of
            ``geometry``.
        """
        data, _, properties = preprocess_arrays(images, None, geometry, self.configuration)
        probabilities = self.predict_preprocessed(data, geometry.direction)
        del data  # not needed any more: one full-size array less while restoring
        probabilities = restore_probabilities(probabilities, properties)
        return probabilities, self.postprocess(probabilities, geometry.spacing)

    def postprocess(
        self,
        probabilities: np.ndarray,
        spacing: Sequence[float],
        threshold: float | None = None,
        min_lesion_mm3: float | None = None,
    ) -> np.ndarray:
        """(K, X, Y, Z) probabilities -> (X, Y, Z) uint8 labels (see ``autoseg.infer.postprocessing``).

        ``threshold`` and ``min_lesion_mm3`` default to the configuration's ``postprocessing``.
        """
        settings = self.configuration.postprocessing
        return postprocess_probabilities(
            probabilities,
            spacing,
            threshold=settings.threshold if threshold is None else threshold,
            min_lesion_mm3=settings.min_lesion_mm3 if min_lesion_mm3 is None else min_lesion_mm3,
        )

    def _predict_one(
        self, network: nn.Module, volume: torch.Tensor, mirror_axes: tuple[int, ...], views: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        configuration = self.configuration
        if configuration.dimension == 2:
            return predict_slices(
                network,
                volume,
                configuration.patch_size,
                configuration.slice_axis,
                mirror_axes=mirror_axes,
                batch_size=self.batch_size,
                views=views,
                **self.options,
            )
        return predict_sliding_window(
            network,
            volume,
            configuration.patch_size,
            mirror_axes=mirror_axes,
            batch_size=self.batch_size,
            views=views,
            **self.options,
        )
