r"""How fast this machine trains and predicts: a short timed probe, cached per machine.

The probe (:func:`run_probe`) times a few training steps (forward + backward + optimizer step) and forward passes
of five small residual U-Nets under the precision training will use, chooses the faster memory format for
training (``channels_last_3d`` or contiguous), and times the augmentation of one training sample. It takes
well under a minute on two CPU cores and is cached under ``AUTOSEG_HOME/compute_probes/`` per machine
(:func:`autoseg.machine.machine_description`: device model, threads, torch version, precision), so planning
again on the same machine reuses it and another CPU, thread count or torch version probes anew. The probed points
are fitted into :class:`autoseg.plan.cost_model.CostModel`\ s.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from autoseg.io.files import read_json, write_json
from autoseg.machine import Precision, machine_description
from autoseg.networks import ResidualUNet
from autoseg.paths import autoseg_home
from autoseg.plan.cost_model import CostModel, NetworkShape, ProbePoint

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


def probe_cache_folder() -> Path:
    """``AUTOSEG_HOME/compute_probes``: one JSON file per probed machine."""
    return autoseg_home() / "compute_probes"


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
