"""The cost model that turns a planned network, patch and batch into seconds, from the probed points
(:mod:`autoseg.plan.probe`).

The cost model (:class:`CostModel`) charges a step ``a * GMAC + b * Mact + c * Mvox + d``: multiply-accumulates
of the convolutions (:meth:`autoseg.networks.ResidualUNet.forward_macs`, from the layer sizes), elements stored for
backward (:meth:`autoseg.networks.ResidualUNet.stored_activations`: the memory-bound normalization and activation work)
and input voxels (loss, heads, copies), fitted by non-negative least squares to the probed points, so networks
between them are interpolated and larger ones extrapolated along the same per-MAC cost. :class:`TrainingEstimate` adds what a run does besides its steps: the
loader's augmentation (which shares the cores on a CPU), the per-epoch validation batches, per-epoch overhead
(loader start, checkpoint, plot), and the end-of-fold sliding-window validation with mirroring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autoseg.machine import available_cores
from autoseg.networks import ResidualUNet, on_meta
from autoseg.plan.topology import PLANNED_UNET_LAYOUT

if TYPE_CHECKING:  # the probe fits this module's cost models: a type only here
    from autoseg.plan.probe import ComputeProbe


#: Seconds per epoch spent outside the steps: starting the loader's processes, writing checkpoint_latest.pth,
#: drawing progress.png. Measured on 2 CPU cores with a 3 M-parameter network (about 1.5 s); kept generous.
EPOCH_OVERHEAD_SECONDS = {"cpu": 2.0, "cuda": 3.0}
#: Seconds per million voxels of the original image to restore a validation case to its grid, post-process,
#: write it and score it (measured about 1.5 s for a 2 mm whole-brain case of 1.1 M voxels on 2 CPU cores).
CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL = 1.5


@dataclass(frozen=True)
class NetworkShape:
    """The numbers of a residual U-Net that decide its cost: as in ``autoseg.plans.Network`` (plus channels)."""

    in_channels: int
    num_classes: int
    features: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    layout: str = PLANNED_UNET_LAYOUT

    def kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "features": self.features,
            "strides": self.strides,
            "kernel_sizes": self.kernel_sizes,
            "layout": self.layout,
        }

    def macs(self, patch: Sequence[int], deep_supervision: bool = True) -> int:
        """Forward multiply-accumulates for one sample of ``patch``."""
        return on_meta(ResidualUNet, deep_supervision=deep_supervision, **self.kwargs()).forward_macs(patch)

    def activations(self, patch: Sequence[int]) -> int:
        """Elements stored for backward for one training sample of ``patch``."""
        return on_meta(ResidualUNet, **self.kwargs()).stored_activations(patch)

    @classmethod
    def isotropic(cls, base: int, edge: int, in_channels: int = 1) -> NetworkShape:
        """The probe's networks: 3x3x3 kernels, stride 2 on every axis while the edge keeps >= 4 voxels, features
        doubling from ``base`` up to 16x ``base``, the layout new plans get."""
        stages = 1
        while edge // 2**stages >= 4 and stages < 6:
            stages += 1
        return cls(
            in_channels,
            1,
            tuple(min(base * 2**i, 16 * base) for i in range(stages)),
            ((1, 1, 1),) + ((2, 2, 2),) * (stages - 1),
            ((3, 3, 3),) * stages,
        )


@dataclass(frozen=True)
class ProbePoint:
    """One probed network: its size and the measured seconds.

    Attributes:
        features: per-stage widths.
        patch: (X, Y, Z) voxels.
        batch: samples per step.
        gmacs: forward giga-MACs of the whole batch with deep-supervision heads.
        mega_activations: million elements stored for backward, whole batch.
        train_seconds: seconds of one training step (forward, loss, backward, optimizer step).
        inference_seconds: seconds of one forward pass of the batch without gradients.
    """

    features: tuple[int, ...]
    patch: tuple[int, ...]
    batch: int
    gmacs: float
    mega_activations: float
    train_seconds: float
    inference_seconds: float


@dataclass(frozen=True)
class CostModel:
    """``seconds = per_gmac * GMAC + per_mega_activation * Mact + per_megavoxel * Mvox + constant``: the
    convolutions' multiply-accumulates, the memory-bound work on stored activations (normalization,
    activation functions), the per-voxel work on the input and outputs (loss, deep-supervision heads, copies),
    and a fixed cost; non-negative, fitted to the probed points. Arguments are for the whole batch."""

    per_gmac: float
    per_mega_activation: float
    per_megavoxel: float
    constant: float

    def seconds(self, gmacs: float, mega_activations: float, megavoxels: float) -> float:
        return (
            self.per_gmac * gmacs
            + self.per_mega_activation * mega_activations
            + self.per_megavoxel * megavoxels
            + self.constant
        )

    def scaled(self, factor: float) -> CostModel:
        """The model of a machine ``factor`` times slower (every coefficient times ``factor``)."""
        return CostModel(*(factor * value for value in dataclasses.astuple(self)))

    @classmethod
    def fit(
        cls,
        gmacs: Sequence[float],
        mega_activations: Sequence[float],
        megavoxels: Sequence[float],
        seconds: Sequence[float],
    ) -> CostModel:
        """Least squares on relative errors (each point weighs the same whatever its size), coefficients >= 0."""
        from scipy.optimize import nnls

        y = np.asarray(seconds, float)
        design = np.stack(
            [
                np.asarray(gmacs, float),
                np.asarray(mega_activations, float),
                np.asarray(megavoxels, float),
                np.ones_like(y),
            ],
            1,
        )
        coefficients, _ = nnls(design / y[:, None], np.ones_like(y))
        return cls(*(float(c) for c in coefficients))


def iteration_seconds(step: float, augmentation: float, device_type: str, data_processes: int) -> float:
    """Wall seconds of one training iteration: the network's step and the making of its batch.

    Args:
        step: the network's step on all cores (CPU) or on the GPU.
        augmentation: one core's seconds to make the batch.
        device_type: ``cpu`` or ``cuda``.
        data_processes: 0: the batch is made in the training process between steps (adds all of
            ``augmentation``); n > 0: n processes make batches while the network trains. On a GPU they only slow
            it down when they cannot keep up; on a CPU they also take n cores from the network, whose step then
            runs on the others (torch's threads are set to the remaining cores).
    """
    if data_processes == 0:
        return step + augmentation
    if device_type == "cuda":
        return max(step, augmentation / data_processes)
    cores = available_cores()
    return max(step * cores / max(1, cores - data_processes), augmentation / data_processes)


def choose_data_processes(step: float, augmentation: float, device_type: str) -> tuple[int, str]:
    """The number of background augmentation processes that makes an iteration fastest, and why.

    On a GPU every core but one may augment. On a CPU the cores are shared: batches made between steps cost
    their whole time, processes beside the network take cores from it (and with threads and processes both
    wanting every core, each waits for the other: on 2 cores a 3 M-parameter network took 1.46 s per step beside
    2 processes against 0.38 s alone), so the cores are split between the network and the loader as the
    estimate says is fastest.
    """
    cores = available_cores()
    if device_type == "cuda":
        processes = max(1, min(12, cores - 1))
        return processes, f"{processes} of {cores} CPU cores make batches while the GPU trains"
    options = {p: iteration_seconds(step, augmentation, device_type, p) for p in range(cores)}
    best = min(options, key=options.get)
    if best == 0:
        return 0, (
            f"{cores} CPU cores: the batch ({augmentation:.2f} s on one core) is made between network steps "
            f"({step:.2f} s on all cores): {options[0]:.2f} s per iteration, faster than giving cores to "
            "background processes"
        )
    return best, (
        f"{best} of {cores} CPU cores make batches ({augmentation:.2f} s each on one core) while "
        f"{cores - best} train the network: {options[best]:.2f} s per iteration against {options[0]:.2f} s "
        "with the batches made between steps"
    )


@dataclass(frozen=True)
class TrainingEstimate:
    """Estimated wall time of one fold, in seconds, and its parts.

    Attributes:
        iterations: training iterations (epochs x iterations per epoch).
        epochs: epochs.
        seconds_per_iteration: mean over the stages (each stage weighted by its share of the epochs): the network
            step plus the loader's share of the cores.
        step_seconds: the network step alone, per iteration (mean over stages).
        loader_seconds: what making the batches adds per iteration (0 when background processes keep up).
        training_seconds: all training iterations.
        epoch_validation_seconds: the per-epoch validation batches (pseudo-Dice), all epochs.
        overhead_seconds: per-epoch overhead (loader start, checkpoint, plot), all epochs.
        final_validation_seconds: the end-of-fold sliding-window prediction of the validation cases.
    """

    iterations: int
    epochs: int
    seconds_per_iteration: float
    step_seconds: float
    loader_seconds: float
    training_seconds: float
    epoch_validation_seconds: float
    overhead_seconds: float
    final_validation_seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return (
            self.training_seconds
            + self.epoch_validation_seconds
            + self.overhead_seconds
            + self.final_validation_seconds
        )

    @property
    def total_minutes(self) -> float:
        return self.total_seconds / 60

    @classmethod
    def for_steps(
        cls,
        step: float,
        augmentation: float,
        validation_batch: float,
        epochs: int,
        iterations_per_epoch: int,
        val_iterations: int,
        device_type: str,
        final_validation_seconds: float,
        notes: dict[str, Any] | None = None,
    ) -> TrainingEstimate:
        """The estimate of a run from its per-iteration parts (seconds): the network's step, one core's time to
        make a batch, one validation batch; the augmentation processes are chosen here
        (:func:`choose_data_processes`, recorded in ``notes``)."""
        processes, processes_reason = choose_data_processes(step, augmentation, device_type)
        per_iteration = iteration_seconds(step, augmentation, device_type, processes)
        iterations = epochs * iterations_per_epoch
        return cls(
            iterations=iterations,
            epochs=epochs,
            seconds_per_iteration=per_iteration,
            step_seconds=step,
            loader_seconds=per_iteration - step,
            training_seconds=iterations * per_iteration,
            epoch_validation_seconds=epochs * val_iterations * validation_batch,
            overhead_seconds=epochs * EPOCH_OVERHEAD_SECONDS.get(device_type, 2.0),
            final_validation_seconds=final_validation_seconds,
            notes={**(notes or {}), "data_processes": processes, "data_processes_reason": processes_reason},
        )


def estimate_training(
    probe: ComputeProbe,
    network: NetworkShape,
    stages: Sequence[tuple[Sequence[int], int, float]],
    *,
    epochs: int,
    iterations_per_epoch: int,
    val_iterations: int,
    validation_windows: int,
    mirror_count: int,
    validation_megavoxels: float,
    device_type: str,
) -> TrainingEstimate:
    """Estimated wall time of one fold.

    Args:
        probe: this machine's probe.
        network: the planned network (the same for every stage).
        stages: per stage (patch, batch, share of the epochs).
        epochs, iterations_per_epoch, val_iterations: the schedule.
        validation_windows: sliding windows over all end-of-fold validation cases (at the last stage's patch).
        mirror_count: forward passes per window (mirroring).
        validation_megavoxels: million voxels of those cases on their original grid (restore, write, score).
        device_type: ``cpu`` or ``cuda``; the augmentation processes are chosen for it
            (:func:`choose_data_processes`, recorded in ``notes``).
    """
    step = augmentation = validation_batch = 0.0
    per_stage = []
    for patch, batch, share in stages:
        stage_step, stage_augmentation = (
            probe.step_seconds(network, patch, batch),
            batch * probe.augmentation_seconds(patch),
        )
        per_stage.append((stage_step, stage_augmentation))
        step += share * stage_step
        augmentation += share * stage_augmentation
        validation_batch += share * probe.forward_seconds(network, patch, batch)
    window_seconds = probe.forward_seconds(network, stages[-1][0], 2) / 2
    final = (
        validation_windows * mirror_count * window_seconds + CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL * validation_megavoxels
    )
    estimate = TrainingEstimate.for_steps(
        step,
        augmentation,
        validation_batch,
        epochs,
        iterations_per_epoch,
        val_iterations,
        device_type,
        final,
        {"window_seconds": window_seconds, "validation_windows": validation_windows, "mirror_count": mirror_count},
    )
    processes = estimate.notes["data_processes"]
    stage_seconds = [round(iteration_seconds(s, a, device_type, processes), 4) for s, a in per_stage]
    return dataclasses.replace(estimate, notes={**estimate.notes, "stage_seconds_per_iteration": stage_seconds})


def pspnet_cost(backbone: str, patch: Sequence[int], batch: int, in_channels: int) -> tuple[float, float]:
    """Forward giga-MACs and million stored activations of a training batch of the 2-D PSPNet, counted on the
    meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from autoseg.networks import ADAM_BYTES_PER_PARAMETER, CUDA_OVERHEAD_BYTES, PSPNet, parameter_count

    with torch.device("meta"):
        network = PSPNet(in_channels=in_channels, num_classes=1, backbone=backbone, aux_head=True)
        data = torch.zeros(batch, in_channels, *patch)
        with FlopCounterMode(display=False) as counter:
            network(data)
    gmacs = counter.get_total_flops() / 2e9
    memory = network.training_memory_bytes(patch_size=patch, batch_size=batch, bytes_per_activation=1)
    parameters = sum(p.numel() for p in network.parameters())
    activations = (
        memory - CUDA_OVERHEAD_BYTES - ADAM_BYTES_PER_PARAMETER * max(parameters, parameter_count(network.backbone))
    )
    return gmacs, max(activations, 0) / 1e6
