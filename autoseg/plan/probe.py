r"""How fast this machine trains and predicts: a short timed probe, cached per machine and corrected by training.

The probe (:func:`run_probe`) times training steps (forward + backward + optimizer step) and forward passes of five
small residual U-Nets under the precision training will use, chooses the faster memory format for training
(``channels_last_3d`` or contiguous), and times the augmentation of one training sample. It takes well under a
minute on two CPU cores and is cached under ``AUTOSEG_HOME/compute_probes/`` per machine
(:func:`autoseg.machine.machine_description`: device model, threads, torch version, precision), so planning again
on the same machine reuses it and another CPU, thread count or torch version probes anew. The probed points are
fitted into :class:`autoseg.plan.cost_model.CostModel`\ s.

A passing load must not shrink every later plan:

- **Repeats spread out, the fastest kept.** Every network is timed :data:`PROBE_REPEATS` times, in rounds over all
  networks (each round times every network once; on a GPU over one network's training step and forward pass), so
  a busy moment of a few seconds slows one round, not every repeat of one network; the fastest repeat of each is
  kept: what the machine does without other load.
- **Busy while probing** (:attr:`ComputeProbe.busy`): the repeats of a network differed by more than
  :data:`BUSY_SPREAD` (median over the networks), or the load average before probing exceeded the cores. The plan
  says so (``compute_budget.reasons.probe``), and the next plan on this machine probes again and keeps the faster
  of each timing of both probes (:func:`fastest_of`).
- **Corrected by training** (:func:`record_training_speed`, :meth:`ComputeProbe.corrected`): every budgeted
  training run on this machine records in the cached probe's file how its iterations compared with the probe's
  estimate (its fastest quarter of epochs, ``autoseg.train.deadline``); a later plan scales the probe's timings by
  the fastest of the last :data:`CORRECTION_RUNS` runs, and logs it. A run slowed by other jobs does not slow later
  plans unless every recent run was slow; a probe fooled by a busy moment is corrected by the first run after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from autoseg.io.files import read_json, write_json
from autoseg.machine import Precision, available_cores, load_average, machine_description
from autoseg.networks import ResidualUNet
from autoseg.paths import autoseg_home
from autoseg.plan.cost_model import CostModel, NetworkShape, ProbePoint

#: Bump when the probe measures something else, so old caches are not reused (4: repeats in rounds, busy flag; 5:
#: networks of the residual_encoder layout).
PROBE_VERSION = 5
#: Probed networks as (first-stage features, isotropic patch edge in voxels), batch 2, features doubling to 16x.
#: On a CPU they span 0.05–3 s per step; on a GPU larger ones keep the timings above launch overhead.
CPU_PROBE_NETWORKS = ((8, 32), (8, 64), (16, 48), (16, 64), (32, 32))
CUDA_PROBE_NETWORKS = ((16, 64), (32, 64), (32, 96), (32, 128), (32, 160))
PROBE_BATCH = 2
#: Timed repetitions per probed network after one untimed warm-up, in rounds over all networks; the fastest is kept
#: (what the machine does without other load: load from elsewhere is what training's deadline then absorbs).
PROBE_REPEATS = 3
#: The machine looked busy while probing when the repeats of a network differ by more than this (slowest over
#: fastest - 1, median over the timed networks)...
BUSY_SPREAD = 0.25
#: ...or the load average before probing exceeded the cores this many times over.
BUSY_LOAD_PER_CORE = 1.0
#: A cached probe is corrected by the fastest of this many most recent training runs on the machine.
CORRECTION_RUNS = 5
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
        load_average: the system's one-minute load average before probing (None where unknown).
        spread: how much the repeats of a network differed: slowest over fastest - 1, median over the networks.
        busy: why the machine looked busy while probing (:data:`BUSY_SPREAD`, :data:`BUSY_LOAD_PER_CORE`); empty
            when it did not.
        training_runs: what budgeted training runs on this machine measured since the probe, latest last (at most
            :data:`CORRECTION_RUNS`): ``run`` (its folder), ``date``, ``speed`` (its iterations' measured over
            this probe's estimated seconds, uncorrected) and, for a run recorded against an earlier probe that a new
            one was merged with (:func:`fastest_of`), ``rescaled`` (the factor its speed was re-expressed by).
        correction: the factor the timings were multiplied by (:meth:`corrected`); 1 as measured.
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
    load_average: float | None = None
    spread: float = 0.0
    busy: str = ""
    training_runs: tuple[dict[str, Any], ...] = ()
    correction: float = 1.0

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
                "training_runs": tuple(dict(run) for run in plain.get("training_runs", ())),
            }
        )

    def correction_from_training(self) -> tuple[float, str]:
        """The factor training measured on this machine asks for (the fastest :attr:`training_runs`' speed) and a
        description; (1, "") without runs."""
        if not self.training_runs:
            return 1.0, ""
        speeds = [float(run["speed"]) for run in self.training_runs]
        factor = min(speeds)
        return factor, (
            f"x{factor:.2f}, the fastest of {len(speeds)} training run(s) on this machine since the probe "
            f"(their iterations took {', '.join(f'{v:.2f}' for v in speeds)} times the probe's estimate)"
        )

    def corrected(self) -> ComputeProbe:
        """The probe with its timings (training and inference cost models, augmentation) multiplied by
        :meth:`correction_from_training`'s factor, recorded in :attr:`correction`."""
        factor, _ = self.correction_from_training()
        return replace(
            self,
            training=self.training.scaled(factor),
            inference=self.inference.scaled(factor),
            augmentation_seconds_per_megavoxel=self.augmentation_seconds_per_megavoxel * factor,
            correction=factor,
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
            "load_average": None if self.load_average is None else round(self.load_average, 2),
            "spread": round(self.spread, 3),
            "busy": self.busy,
            "correction": round(self.correction, 4),
            "training_runs": len(self.training_runs),
        }

    def describe(self) -> str:
        """What the plans' ``reasons.probe`` says of it after the machine and date: busy, corrected."""
        parts = []
        if self.busy:
            parts.append(
                f"the machine looked busy while probing ({self.busy}): the fastest of {PROBE_REPEATS} repeats "
                "was kept, training re-plans to end on time, and the next plan here probes again"
            )
        _, reason = self.correction_from_training()
        if reason:
            parts.append(f"timings corrected by what training measured here: {reason}")
        return "; ".join(parts)


def _cache_file(machine: dict[str, Any]) -> Path:
    key = json.dumps({**machine, "version": PROBE_VERSION}, sort_keys=True)
    return probe_cache_folder() / f"probe_{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _read_cached(path: Path, machine: dict[str, Any], log: Callable[[str], None]) -> ComputeProbe | None:
    """The probe cached at ``path`` for ``machine``; None when there is none, or it is unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        probe = ComputeProbe.from_plain(read_json(path))
    except (KeyError, TypeError, ValueError):
        log(f"compute probe: {path} is unreadable, probing again")
        return None
    return probe if probe.machine == machine and probe.version == PROBE_VERSION else None


def load_or_run_probe(
    device: torch.device, precision: Precision, *, refresh: bool = False, log: Callable[[str], None] = print
) -> tuple[ComputeProbe, bool]:
    """This machine's probe for ``precision``: the cached one, corrected by what training measured here since
    (:meth:`ComputeProbe.corrected`, logged), or a new one (then cached). A cached probe taken while the machine
    looked busy is probed again, keeping the faster of each timing (:func:`fastest_of`).

    Returns:
        (probe, whether it came from the cache).
    """
    machine = machine_description(device, precision.name)
    path = _cache_file(machine)
    cached = None if refresh else _read_cached(path, machine, log)
    if cached is not None and not cached.busy:
        _, reason = cached.correction_from_training()
        if reason:
            log(
                f"compute probe: the cached probe ({cached.created}) corrected by what training measured here: {reason}"
            )
        return cached.corrected(), True
    if cached is not None:
        log(
            f"compute probe: the cached probe ({cached.created}) was taken while the machine looked busy "
            f"({cached.busy}); probing again and keeping the faster of each timing"
        )
    probe = run_probe(device, precision, log=log)
    if cached is not None:
        probe = fastest_of(cached, probe)
    write_json(probe.to_plain(), path)
    return probe, False


def record_training_speed(
    planned: dict[str, Any], device: torch.device, precision: Precision, speed: float, run: str
) -> str:
    """Record in the cached probe's file what a budgeted training run measured, to correct later plans here.

    Args:
        planned: the plans' record of the probe their estimate came from (``compute_budget.probe``: machine, date,
            the correction it was planned with).
        device, precision: where and how the run trained.
        speed: the run's measured over estimated seconds per training iteration (``autoseg.train.deadline``:
            the fast end of its epochs).
        run: the run's folder (a continued run replaces its own earlier record).

    Returns:
        One line for the log: what was recorded where, or why nothing was (another machine, no cached probe, a
        probe measured again since the plan).
    """
    machine = planned.get("machine", {})
    here = machine_description(device, precision.name)
    differs = [key for key in ("device", "model", "torch", "precision") if machine.get(key) != here[key]]
    if differs:
        return (
            f"compute probe: this run's speed is not recorded: it trained with another {', '.join(differs)} "
            "than the plan was probed with"
        )
    path = _cache_file(machine)
    cached = _read_cached(path, machine, lambda line: None)
    if cached is None or cached.created != planned.get("created"):
        return f"compute probe: this run's speed is not recorded: {path} no longer holds the probe the plan used"
    measured = speed * float(planned.get("correction", 1.0))  # against the probe as measured, not as corrected
    entry = {"run": run, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "speed": round(measured, 4)}
    runs = [*(r for r in cached.training_runs if r.get("run") != run), entry][-CORRECTION_RUNS:]
    write_json(replace(cached, training_runs=tuple(runs)).to_plain(), path)
    return (
        f"compute probe: this run's iterations took {measured:.2f} times the probe's estimate (its fastest quarter of "
        f"epochs); recorded in {path} to correct later plans on this machine"
    )


def fastest_of(first: ComputeProbe, second: ComputeProbe) -> ComputeProbe:
    """``second`` (a new probe of the same machine) with each timing the faster of both probes' and the cost models
    fitted again; busy only when both were.

    Training runs recorded against ``first`` are re-expressed against the merged timings: a run's speed is its
    measured over ``first``'s estimated seconds per iteration, so against the merged probe it is multiplied by
    ``first``'s over the merged probe's total training-step seconds (the probed networks are the same; the factor is
    recorded in the run's ``rescaled``). Like the timings, only the faster evidence is kept: runs still faster than
    the merged probe's estimate (re-expressed speed below 1) stay; a run slower than a probe taken since (typically
    one slowed by the load that made ``first`` look busy) is dropped. Probes that chose another training memory format (a busy
    machine can tip the choice) are not mixed: the one whose training steps were faster in total is kept whole,
    ``first`` with its training runs (``second`` without them: they trained in the other format); probes of other
    networks do not compare: ``second`` as it is."""
    networks = [(p.features, p.patch, p.batch) for p in first.points]
    if networks != [(p.features, p.patch, p.batch) for p in second.points]:
        return second  # other networks: the timings do not compare
    if first.memory_format != second.memory_format:
        total = [sum(p.train_seconds for p in probe.points) for probe in (first, second)]
        return second if total[1] < total[0] else replace(first, busy=second.busy if first.busy else "")
    points = tuple(
        replace(
            b,
            train_seconds=min(a.train_seconds, b.train_seconds),
            inference_seconds=min(a.inference_seconds, b.inference_seconds),
        )
        for a, b in zip(first.points, second.points)
    )
    formats = {
        name: min(seconds, first.memory_format_seconds.get(name, seconds))
        for name, seconds in second.memory_format_seconds.items()
    }
    factor = sum(p.train_seconds for p in first.points) / max(sum(p.train_seconds for p in points), 1e-12)
    runs = tuple(
        {
            **run,
            "speed": round(float(run["speed"]) * factor, 4),
            "rescaled": round(float(run.get("rescaled", 1.0)) * factor, 4),
        }
        for run in first.training_runs
        if float(run["speed"]) * factor < 1.0
    )
    return replace(
        second,
        points=points,
        memory_format_seconds=formats,
        augmentation_seconds_per_megavoxel=min(
            first.augmentation_seconds_per_megavoxel, second.augmentation_seconds_per_megavoxel
        ),
        training=_fit(points, train=True),
        inference=_fit(points, train=False),
        busy=second.busy if first.busy else "",
        training_runs=runs,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Step = Callable[[], float]


def _step(network: ResidualUNet, data: torch.Tensor, precision: Precision, device: torch.device, train: bool) -> Step:
    """A callable that runs one training step (or forward pass without gradients) of ``network`` on ``data`` and
    returns its seconds.

    A training step is what the trainer does: forward under autocast, the deep-supervised Dice + BCE + focal
    loss against a lesion mask, backward, gradient clipping and an Adam step."""
    from autoseg.plans import Loss
    from autoseg.train.losses import build_loss

    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4) if train else None
    levels = len(network.features) - 1
    loss = Loss(
        name="dice_bce_focal", dice_weight=1.0, bce_weight=1.0, focal_weight=1.0, focal_gamma=2.0, focal_alpha=0.75
    )
    criterion = build_loss(loss, levels) if train else None
    target = (data[:, :1] > 1).to(torch.int16) if train else None

    def run() -> float:
        network.train(train)  # one network serves both steps, which the rounds interleave
        network.deep_supervision = train
        _synchronize(device)
        start = time.perf_counter()
        with (
            torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None),
            torch.set_grad_enabled(train),
        ):
            outputs = network(data)
            if train:
                value = criterion(outputs, target)
        if train:
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            optimizer.step()
        _synchronize(device)
        seconds = time.perf_counter() - start
        if train:
            optimizer.zero_grad(set_to_none=True)  # untimed: no gradients held while the other networks run
        return seconds

    return run


def _network_steps(
    shape: NetworkShape, edge: int, device: torch.device, precision: Precision, memory_format: torch.memory_format
) -> tuple[Step, Step]:
    """The (training step, forward pass) of the probe network ``shape`` on a batch of ``edge``-voxel cubes."""
    torch.manual_seed(0)
    network = ResidualUNet(**shape.kwargs(), deep_supervision=True).to(device, memory_format=memory_format)
    data = torch.randn(PROBE_BATCH, shape.in_channels, edge, edge, edge, device=device)
    data = data.contiguous(memory_format=memory_format)
    return _step(network, data, precision, device, True), _step(network, data, precision, device, False)


def timed_rounds(steps: Sequence[Step], repeats: int) -> list[list[float]]:
    """Each step once untimed (warm-up), then ``repeats`` rounds, each running every step once: the repeats of one
    step are spread over the whole probe, so a busy moment slows one of them, not all.

    Returns:
        per step its ``repeats`` timings in seconds, in the order run.
    """
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for index, step in enumerate(steps):
            times[index].append(step())
    return times


def _timed_networks(
    networks: Sequence[tuple[NetworkShape, int, torch.memory_format]],
    device: torch.device,
    precision: Precision,
    *,
    training_only: bool = False,
) -> list[list[float]]:
    """The repeats (:func:`timed_rounds`) of each network's training step and forward pass, in that order (only the
    training steps with ``training_only``). On the CPU the rounds go over all networks at once; on a GPU over one
    network's steps at a time, since holding every probe network with its optimizer state would take several GB
    of GPU memory more than the largest alone."""
    groups = [list(networks)] if device.type == "cpu" else [[network] for network in networks]
    times = []
    for group in groups:
        steps = [_network_steps(shape, edge, device, precision, fmt) for shape, edge, fmt in group]
        times += timed_rounds([s for pair in steps for s in (pair[:1] if training_only else pair)], PROBE_REPEATS)
        del steps  # this group's networks go before the next group's are built
    return times


def busy_reasons(times: Sequence[Sequence[float]], load: float | None, cores: int) -> tuple[float, str]:
    """(the median spread of the repeats, why the machine looked busy or ""): see :data:`BUSY_SPREAD` and
    :data:`BUSY_LOAD_PER_CORE`."""
    spreads = [max(t) / min(t) - 1 for t in times if len(t) > 1 and min(t) > 0]
    spread = float(np.median(spreads)) if spreads else 0.0
    reasons = []
    if spread > BUSY_SPREAD:
        reasons.append(f"repeats of the same step differed by {spread:.0%} (median over the networks)")
    if load is not None and load > BUSY_LOAD_PER_CORE * cores:
        reasons.append(f"load average {load:.1f} on {cores} cores before probing")
    return spread, "; ".join(reasons)


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


def _fit(points: Sequence[ProbePoint], train: bool) -> CostModel:
    """The training (or inference) cost model fitted to ``points``."""
    activations = [p.mega_activations for p in points]
    voxels = [p.batch * math.prod(p.patch) / 1e6 for p in points]
    if train:
        return CostModel.fit([p.gmacs for p in points], activations, voxels, [p.train_seconds for p in points])
    gmacs = [p.gmacs * _inference_share(p) for p in points]
    return CostModel.fit(gmacs, activations, voxels, [p.inference_seconds for p in points])


def run_probe(device: torch.device, precision: Precision, *, log: Callable[[str], None] = print) -> ComputeProbe:
    """Time the probe networks on ``device`` under ``precision`` and fit the cost models (see the module doc)."""
    start = time.perf_counter()
    networks = CUDA_PROBE_NETWORKS if device.type == "cuda" else CPU_PROBE_NETWORKS
    log(
        f"compute probe: timing {len(networks)} networks on {machine_description(device, precision.name)['model']} "
        f"({precision.name}, {torch.get_num_threads()} threads), {PROBE_REPEATS} rounds; cached for later plans"
    )
    load = load_average()
    rng_state = torch.random.get_rng_state()
    test_base, test_edge = networks[2]
    formats = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    test_shape = NetworkShape.isotropic(test_base, test_edge)
    format_times = _timed_networks(
        [(test_shape, test_edge, fmt) for fmt in formats.values()], device, precision, training_only=True
    )
    format_seconds = {name: min(t) for name, t in zip(formats, format_times)}
    chosen = min(format_seconds, key=format_seconds.get)
    shapes = [NetworkShape.isotropic(base, edge) for base, edge in networks]
    times = _timed_networks(
        [(shape, edge, formats[chosen]) for shape, (_, edge) in zip(shapes, networks)], device, precision
    )
    points = []
    for index, (shape, (_, edge)) in enumerate(zip(shapes, networks)):
        patch = (edge,) * 3
        points.append(
            ProbePoint(
                shape.features,
                patch,
                PROBE_BATCH,
                PROBE_BATCH * shape.macs(patch) / 1e9,
                PROBE_BATCH * shape.activations(patch) / 1e6,
                min(times[2 * index]),
                min(times[2 * index + 1]),
            )
        )
    augmentation = _augmentation_seconds_per_megavoxel()
    torch.random.set_rng_state(rng_state)
    spread, busy = busy_reasons([*format_times, *times], load, available_cores())
    probe = ComputeProbe(
        machine=machine_description(device, precision.name),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        probe_seconds=time.perf_counter() - start,
        memory_format=chosen,
        memory_format_seconds={k: round(v, 4) for k, v in format_seconds.items()},
        augmentation_seconds_per_megavoxel=augmentation,
        points=tuple(points),
        training=_fit(points, train=True),
        inference=_fit(points, train=False),
        load_average=load,
        spread=spread,
        busy=busy,
    )
    log(
        f"compute probe: {probe.probe_seconds:.0f} s; training memory format {chosen} "
        f"({', '.join(f'{k} {v:.3f} s' for k, v in format_seconds.items())} per step)"
        + (f"; the machine looked busy: {busy}" if busy else "")
    )
    return probe
