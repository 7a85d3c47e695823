"""How fast this machine trains and predicts: a short timed probe, cached per machine, and the cost model that
turns a planned network, patch and batch into seconds.

The probe (:func:`run_probe`) times a few training steps (forward + backward + optimizer step) and forward passes
of five small residual U-Nets under the precision training will use, chooses the faster memory format for
training (``channels_last_3d`` or contiguous), and times the augmentation of one training sample. It takes
well under a minute on two CPU cores and is cached under ``AUTOSEG_HOME/compute_probes/`` per machine
(:func:`autoseg.machine.machine_description`: device model, threads, torch version, precision), so planning
again on the same machine reuses it and another CPU, thread count or torch version probes anew.

The cost model (:class:`CostModel`) charges a step ``a * GMAC + b * Mact + c * Mvox + d``: multiply-accumulates
of the convolutions (:func:`autoseg.networks.count_forward_macs`, from the layer sizes), elements stored for
backward (:func:`autoseg.networks.count_stored_activations`: the memory-bound normalization and activation work)
and input voxels (loss, heads, copies), fitted by non-negative least squares to the probed points, so networks
between them are interpolated and larger ones extrapolated along the same per-MAC cost. :class:`TrainingEstimate` adds what a run does besides its steps: the
loader's augmentation (which shares the cores on a CPU), the per-epoch validation batches, per-epoch overhead
(loader start, checkpoint, plot), and the end-of-fold sliding-window validation with mirroring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from autoseg.io.files import read_json, write_json
from autoseg.machine import Precision, available_cores, machine_description
from autoseg.networks import ResidualUNet, count_forward_macs, count_stored_activations
from autoseg.paths import autoseg_home

__all__ = [
    "PROBE_VERSION",
    "ComputeProbe",
    "CostModel",
    "NetworkShape",
    "ProbePoint",
    "TimePromise",
    "TrainingEstimate",
    "estimate_training",
    "choose_data_processes",
    "load_or_run_probe",
    "pspnet_cost",
    "iteration_seconds",
    "probe_cache_folder",
    "run_probe",
]

#: Bump when the probe measures something else, so old caches are not reused.
PROBE_VERSION = 3
#: Probed networks as (first-stage features, isotropic patch edge in voxels), batch 2, features doubling to 16x.
#: On a CPU they span 0.05–3 s per step; on a GPU larger ones keep the timings above launch overhead.
CPU_PROBE_NETWORKS = ((8, 32), (8, 64), (16, 48), (16, 64), (32, 32))
CUDA_PROBE_NETWORKS = ((16, 64), (32, 64), (32, 96), (32, 128), (32, 160))
PROBE_BATCH = 2
#: Timed repetitions per probed network after one untimed warm-up; the fastest is kept (what the machine does
#: without other load: load from elsewhere is what the training's time check then names as the cause).
PROBE_REPEATS = 2
#: Patch edge at which one sample's augmentation is timed (its cost scales with the patch's voxels).
AUGMENTATION_PROBE_EDGE = 64
AUGMENTATION_PROBE_SAMPLES = 4
#: Seconds per epoch spent outside the steps: starting the loader's processes, writing checkpoint_latest.pth,
#: drawing progress.png. Measured on 2 CPU cores with a 3 M-parameter network (about 1.5 s); kept generous.
EPOCH_OVERHEAD_SECONDS = {"cpu": 2.0, "cuda": 3.0}
#: Seconds per million voxels of the original image to restore a validation case to its grid, post-process,
#: write it and score it (measured about 1.5 s for a 2 mm whole-brain case of 1.1 M voxels on 2 CPU cores).
CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL = 1.5


def probe_cache_folder() -> Path:
    """``AUTOSEG_HOME/compute_probes``: one JSON file per probed machine."""
    return autoseg_home() / "compute_probes"


@dataclass(frozen=True)
class NetworkShape:
    """The numbers of a residual U-Net that decide its cost: as in ``autoseg.plans.Network`` (plus channels)."""

    in_channels: int
    num_classes: int
    features: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]

    def kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "features": self.features,
            "strides": self.strides,
            "kernel_sizes": self.kernel_sizes,
        }

    def macs(self, patch: Sequence[int], deep_supervision: bool = True) -> int:
        """Forward multiply-accumulates for one sample of ``patch``."""
        return count_forward_macs(patch_size=tuple(patch), deep_supervision=deep_supervision, **self.kwargs())

    def activations(self, patch: Sequence[int]) -> int:
        """Elements stored for backward for one training sample of ``patch``."""
        return count_stored_activations(patch_size=tuple(patch), **self.kwargs())

    @classmethod
    def isotropic(cls, base: int, edge: int, in_channels: int = 1) -> NetworkShape:
        """The probe's networks: 3x3x3 kernels, stride 2 on every axis while the edge keeps >= 4 voxels, features
        doubling from ``base`` up to 16x ``base``."""
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


@dataclass(frozen=True)
class ComputeProbe:
    """What the probe measured on one machine, and the cost models fitted to it.

    Attributes:
        machine: :func:`autoseg.machine.machine_description` (device, model, threads, torch, precision).
        created: when it was measured (UTC, ISO 8601).
        probe_seconds: how long the probe took.
        memory_format: ``channels_last_3d`` or ``contiguous``: the faster for training here.
        memory_format_seconds: the step time of the format-test network in each format.
        augmentation_seconds_per_megavoxel: one CPU core's seconds to augment one training sample, per million
            voxels of its patch.
        points: the probed networks.
        training: cost model of one training step.
        inference: cost model of one forward pass without gradients.
    """

    machine: dict[str, Any]
    created: str
    probe_seconds: float
    memory_format: str
    memory_format_seconds: dict[str, float]
    augmentation_seconds_per_megavoxel: float
    points: tuple[ProbePoint, ...]
    training: CostModel
    inference: CostModel
    version: int = PROBE_VERSION

    def step_seconds(self, network: NetworkShape, patch: Sequence[int], batch: int) -> float:
        """Estimated seconds of one training step (network only)."""
        gmacs = batch * network.macs(patch) / 1e9
        return self.training.seconds(gmacs, batch * network.activations(patch) / 1e6, batch * math.prod(patch) / 1e6)

    def forward_seconds(self, network: NetworkShape, patch: Sequence[int], batch: int) -> float:
        """Estimated seconds of one forward pass of ``batch`` windows without gradients (inference)."""
        gmacs = batch * network.macs(patch, deep_supervision=False) / 1e9
        # Without autograd nothing is stored, but the same tensors are written once: the activation count is
        # the memory traffic the inference model was fitted on.
        return self.inference.seconds(gmacs, batch * network.activations(patch) / 1e6, batch * math.prod(patch) / 1e6)

    def augmentation_seconds(self, patch: Sequence[int]) -> float:
        """One core's seconds to sample and augment one training patch."""
        return self.augmentation_seconds_per_megavoxel * math.prod(patch) / 1e6

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> ComputeProbe:
        points = tuple(
            ProbePoint(**{**p, "features": tuple(p["features"]), "patch": tuple(p["patch"])}) for p in plain["points"]
        )
        return cls(
            **{
                **plain,
                "points": points,
                "training": CostModel(**plain["training"]),
                "inference": CostModel(**plain["inference"]),
            }
        )

    def summary(self) -> dict[str, Any]:
        """What ``plans.json`` records of the probe: machine, date, memory format and the fitted models."""
        return {
            "machine": self.machine,
            "created": self.created,
            "probe_seconds": round(self.probe_seconds, 1),
            "memory_format": self.memory_format,
            "points": [
                {
                    "features": list(p.features),
                    "patch": list(p.patch),
                    "batch": p.batch,
                    "train_seconds": round(p.train_seconds, 4),
                }
                for p in self.points
            ],
            "augmentation_seconds_per_megavoxel": round(self.augmentation_seconds_per_megavoxel, 3),
        }


def _cache_file(machine: dict[str, Any]) -> Path:
    key = json.dumps({**machine, "version": PROBE_VERSION}, sort_keys=True)
    return probe_cache_folder() / f"probe_{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def load_or_run_probe(
    device: torch.device, precision: Precision, *, refresh: bool = False, log: Callable[[str], None] = print
) -> tuple[ComputeProbe, bool]:
    """The cached probe of this machine and precision, or a new one (then cached).

    Returns:
        (probe, whether it came from the cache).
    """
    machine = machine_description(device, precision.name)
    path = _cache_file(machine)
    if path.is_file() and not refresh:
        try:
            probe = ComputeProbe.from_plain(read_json(path))
            if probe.machine == machine and probe.version == PROBE_VERSION:
                return probe, True
        except (KeyError, TypeError, ValueError):
            log(f"compute probe: {path} is unreadable, probing again")
    probe = run_probe(device, precision, log=log)
    write_json(probe.to_plain(), path)
    return probe, False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(
    network: torch.nn.Module, data: torch.Tensor, precision: Precision, device: torch.device, train: bool
) -> float:
    """Fastest of PROBE_REPEATS training steps (or forward passes) after one warm-up, in seconds.

    A training step is what the trainer does: forward under autocast, the deep-supervised Dice + BCE + focal
    loss against a lesion mask, backward, gradient clipping and an Adam step."""
    from autoseg.plans import Loss
    from autoseg.train.losses import build_loss

    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4) if train else None
    levels = len(network.features) - 1
    criterion = (
        build_loss(
            Loss(
                name="dice_bce_focal",
                dice_weight=1.0,
                bce_weight=1.0,
                focal_weight=1.0,
                focal_gamma=2.0,
                focal_alpha=0.75,
            ),
            levels,
        )
        if train
        else None
    )
    target = (data[:, :1] > 1).to(torch.int16) if train else None
    times = []
    for repeat in range(PROBE_REPEATS + 1):
        _synchronize(device)
        start = time.perf_counter()
        with (
            torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None),
            torch.set_grad_enabled(train),
        ):
            outputs = network(data)
            if train:
                loss = criterion(outputs, target)
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            optimizer.step()
        _synchronize(device)
        if repeat:
            times.append(time.perf_counter() - start)
    return float(min(times))


def _probe_network(
    shape: NetworkShape, edge: int, device: torch.device, precision: Precision, memory_format: torch.memory_format
) -> tuple[float, float]:
    torch.manual_seed(0)
    network = ResidualUNet(**shape.kwargs(), deep_supervision=True).to(device, memory_format=memory_format)
    data = torch.randn(PROBE_BATCH, shape.in_channels, edge, edge, edge, device=device)
    data = data.contiguous(memory_format=memory_format)
    train = _time_steps(network, data, precision, device, train=True)
    network.deep_supervision = False
    network.eval()
    return train, _time_steps(network, data, precision, device, train=False)


def _augmentation_seconds_per_megavoxel() -> float:
    """Expected seconds of one core to augment one 3-D training sample, per million voxels of its patch.

    The spatial transform is timed twice, interpolating (rotated or scaled: cubic spline over the larger sampling
    patch) and only cropping, and weighted by the chance of each (``resampling_probability``): a handful of
    random samples would hit the expensive case by luck or not at all. The rest of the pipeline (intensity
    transforms, mirroring) runs with its own probabilities over the same samples."""
    from autoseg.train.augmentation import (
        resampling_probability,
        spatial_augmentation,
        spatial_transform,
        training_transforms,
    )

    patch = (AUGMENTATION_PROBE_EDGE,) * 3
    like = SimpleNamespace(network=SimpleNamespace(architecture="ResidualUNet"), mirror_axes=(0, 1, 2), dimension=3)
    spatial = spatial_augmentation(like, patch)
    sampled = spatial.sampling_patch_size(patch)
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((1, 1, *sampled)).astype(np.float32)
    labels = (rng.random((1, 1, *sampled)) > 0.98).astype(np.int16)
    rest = training_transforms(like, patch, to_tensor=False).transforms[1:]  # after the spatial transform
    state = np.random.get_state()
    np.random.seed(0)

    def seconds(transform: Callable[..., Any], data: np.ndarray, seg: np.ndarray) -> float:
        start = time.perf_counter()
        for _ in range(AUGMENTATION_PROBE_SAMPLES):
            transform(data=data.copy(), seg=seg.copy())
        return (time.perf_counter() - start) / AUGMENTATION_PROBE_SAMPLES

    resampled = seconds(spatial_transform(like, patch, probability=1.0), volume, labels)
    cropped = seconds(spatial_transform(like, patch, probability=0.0), volume, labels)

    def intensity(**batch: Any) -> dict[str, Any]:
        for transform in rest:
            batch = transform(**batch)
        return batch

    small = volume[(slice(None), slice(None), *(slice(0, p) for p in patch))]
    other = seconds(intensity, small, labels[(slice(None), slice(None), *(slice(0, p) for p in patch))])
    np.random.set_state(state)
    chance = resampling_probability(spatial)
    return (chance * resampled + (1 - chance) * cropped + other) / (math.prod(patch) / 1e6)


def run_probe(device: torch.device, precision: Precision, *, log: Callable[[str], None] = print) -> ComputeProbe:
    """Time the probe networks on ``device`` under ``precision`` and fit the cost models (see the module doc)."""
    start = time.perf_counter()
    networks = CUDA_PROBE_NETWORKS if device.type == "cuda" else CPU_PROBE_NETWORKS
    log(
        f"compute probe: timing {len(networks)} networks on {machine_description(device, precision.name)['model']} "
        f"({precision.name}, {torch.get_num_threads()} threads); cached for later plans"
    )
    rng_state = torch.random.get_rng_state()
    test_base, test_edge = networks[2]
    shape = NetworkShape.isotropic(test_base, test_edge)
    formats = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    format_seconds = {
        name: _probe_network(shape, test_edge, device, precision, fmt)[0] for name, fmt in formats.items()
    }
    chosen = min(format_seconds, key=format_seconds.get)
    points = []
    for base, edge in networks:
        shape = NetworkShape.isotropic(base, edge)
        train, inference = _probe_network(shape, edge, device, precision, formats[chosen])
        patch = (edge,) * 3
        points.append(
            ProbePoint(
                shape.features,
                patch,
                PROBE_BATCH,
                PROBE_BATCH * shape.macs(patch) / 1e9,
                PROBE_BATCH * shape.activations(patch) / 1e6,
                train,
                inference,
            )
        )
    augmentation = _augmentation_seconds_per_megavoxel()
    torch.random.set_rng_state(rng_state)
    gmacs = [p.gmacs for p in points]
    activations = [p.mega_activations for p in points]
    voxels = [p.batch * math.prod(p.patch) / 1e6 for p in points]
    inference_gmacs = [p.gmacs * _inference_share(p) for p in points]
    probe = ComputeProbe(
        machine=machine_description(device, precision.name),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        probe_seconds=time.perf_counter() - start,
        memory_format=chosen,
        memory_format_seconds={k: round(v, 4) for k, v in format_seconds.items()},
        augmentation_seconds_per_megavoxel=augmentation,
        points=tuple(points),
        training=CostModel.fit(gmacs, activations, voxels, [p.train_seconds for p in points]),
        inference=CostModel.fit(inference_gmacs, activations, voxels, [p.inference_seconds for p in points]),
    )
    log(
        f"compute probe: {probe.probe_seconds:.0f} s; training memory format {chosen} "
        f"({', '.join(f'{k} {v:.3f} s' for k, v in format_seconds.items())} per step)"
    )
    return probe


def _inference_share(point: ProbePoint) -> float:
    """Forward MACs without the deep-supervision heads as a share of those with them (the heads are tiny)."""
    shape = NetworkShape(
        1,
        1,
        point.features,
        ((1, 1, 1),) + ((2, 2, 2),) * (len(point.features) - 1),
        ((3, 3, 3),) * len(point.features),
    )
    return shape.macs(point.patch, deep_supervision=False) / shape.macs(point.patch)


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

    from autoseg.networks import PSPNet
    from autoseg.networks.memory import (
        _RESNET_PARAMETERS,
        ADAM_BYTES_PER_PARAMETER,
        CUDA_OVERHEAD_BYTES,
        estimate_pspnet_training_memory_bytes,
    )

    with torch.device("meta"):
        network = PSPNet(in_channels=in_channels, num_classes=1, backbone=backbone, aux_head=True)
        data = torch.zeros(batch, in_channels, *patch)
        with FlopCounterMode(display=False) as counter:
            network(data)
    gmacs = counter.get_total_flops() / 2e9
    memory = estimate_pspnet_training_memory_bytes(
        patch_size=patch,
        batch_size=batch,
        in_channels=in_channels,
        num_classes=1,
        backbone=backbone,
        bytes_per_activation=1,
    )
    parameters = sum(p.numel() for p in network.parameters())
    activations = (
        memory - CUDA_OVERHEAD_BYTES - ADAM_BYTES_PER_PARAMETER * max(parameters, _RESNET_PARAMETERS[backbone])
    )
    return gmacs, max(activations, 0) / 1e6


#: A run more than this much slower than its estimate gets a warning that names the likely cause.
OVERRUN_TOLERANCE = 0.25


@dataclass(frozen=True)
class TimePromise:
    """What the plan promised for one run (``plans.json``'s ``compute_budget``), rescaled to the run's actual
    epochs and iterations, to be checked against the measured times.

    Attributes:
        network_seconds: network step per iteration.
        loader_seconds: the loader's share per iteration.
        validation_batch_seconds: one per-epoch validation batch.
        overhead_seconds: per epoch (loader start, checkpoint, plot).
        final_validation_seconds: the end-of-fold validation.
        epochs, iterations_per_epoch, val_iterations: the run's schedule.
    """

    network_seconds: float
    loader_seconds: float
    validation_batch_seconds: float
    overhead_seconds: float
    final_validation_seconds: float
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    stage_seconds_per_iteration: tuple[float, ...] = ()

    @property
    def epoch_seconds(self) -> float:
        """Mean estimated seconds of an epoch (all stages)."""
        return (
            self.iterations_per_epoch * (self.network_seconds + self.loader_seconds)
            + self.val_iterations * self.validation_batch_seconds
            + self.overhead_seconds
        )

    def stage_epoch_seconds(self, stage: int) -> float:
        """Estimated seconds of an epoch of ``stage`` (stages differ in patch size); the mean without per-stage
        figures."""
        if stage >= len(self.stage_seconds_per_iteration):
            return self.epoch_seconds
        return (
            self.iterations_per_epoch * self.stage_seconds_per_iteration[stage]
            + self.val_iterations * self.validation_batch_seconds
            + self.overhead_seconds
        )

    @property
    def training_seconds(self) -> float:
        return self.epochs * self.epoch_seconds

    @property
    def total_seconds(self) -> float:
        return self.training_seconds + self.final_validation_seconds

    @classmethod
    def from_estimate(
        cls, estimate: dict[str, Any], epochs: int, iterations_per_epoch: int, val_iterations: int
    ) -> TimePromise:
        """From a ``compute_budget.estimates`` entry of ``plans.json`` and the run's schedule."""
        minutes = estimate["minutes"]
        planned_epochs = max(1, int(estimate["epochs"]))
        planned_val = max(1, planned_epochs * int(estimate.get("val_iterations_per_epoch", 1)))
        return cls(
            network_seconds=float(estimate["network_seconds_per_iteration"]),
            loader_seconds=float(estimate["loader_seconds_per_iteration"]),
            validation_batch_seconds=60 * float(minutes["epoch_validation"]) / planned_val,
            overhead_seconds=60 * float(minutes["overhead"]) / planned_epochs,
            final_validation_seconds=60 * float(minutes["final_validation"]),
            epochs=epochs,
            iterations_per_epoch=iterations_per_epoch,
            val_iterations=val_iterations,
            stage_seconds_per_iteration=tuple(estimate.get("stage_seconds_per_iteration", ())),
        )

    def check(
        self,
        what: str,
        measured: float,
        estimated: float,
        *,
        loader_wait: float = 0.0,
        step_seconds: float | None = None,
        steps: int = 0,
    ) -> tuple[bool, str]:
        """Compare a measured duration (seconds) with its estimate.

        Returns:
            (within tolerance, one line: measured vs estimated, and for an overrun its likely cause: the loader
            making the network wait, network steps slower than probed (other load on the machine, load average
            given), or the rest (validation, checkpoints)).
        """
        ratio = measured / estimated if estimated > 0 else math.inf
        line = f"{what}: measured {_duration(measured)}, estimated {_duration(estimated)} ({100 * (ratio - 1):+.0f}%)"
        if ratio <= 1 + OVERRUN_TOLERANCE:
            return True, line
        causes = []
        if loader_wait > 0.1 * measured:
            causes.append(
                f"the loader kept the network waiting {_duration(loader_wait)} "
                f"({100 * loader_wait / measured:.0f}% of the time): augmentation is slower than probed; "
                "more data processes (-np) or a free core would help"
            )
        if step_seconds is not None and steps and step_seconds / steps > (1 + OVERRUN_TOLERANCE) * self.network_seconds:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
            causes.append(
                f"network steps took {step_seconds / steps:.2f} s instead of {self.network_seconds:.2f} s: "
                f"other load on the machine (load average {load:.1f} on {available_cores()} cores) or a "
                "slower machine than the one probed"
            )
        if not causes:
            causes.append("validation, checkpoints or plotting took longer than estimated")
        return False, f"WARNING: {line}, more than {OVERRUN_TOLERANCE:.0%} over: " + "; ".join(causes)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"
