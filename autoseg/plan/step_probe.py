r"""Which memory format makes a run's own training step fastest on this machine: a quick timed probe when the run
starts, cached per machine like the compute probe, and what the step achieves against a plain convolution.

The compute probe (:mod:`autoseg.plan.probe`) times its own small networks for planning; which memory format trains
a given network fastest depends on that network's widths and patch (on an AMD EPYC with AVX512-BF16 channels-last
convolutions are 5–70% faster, most at the full-resolution layers, while everything between them costs more), so a
3-D run on the CPU asks the step probe (:func:`choose_training_memory_format`) about its own network:

- **What is timed**: a copy of the run's network with the run's loss and an SGD step (the optimizer barely
  depends on the format) on random data, at the first stage's batch and a patch halved per axis (kept a multiple of
  the total stride) until it holds at most :data:`STEP_PROBE_VOXELS` voxels (:func:`step_probe_patch`), under the
  run's precision and threads, in each of :data:`TRAINING_FORMATS`; beside each, a plain convolution
  (:data:`PLAIN_CONVOLUTION`, forward and backward) in the same format and precision, which says how close the step
  comes to what convolutions achieve on this machine (:meth:`StepProbe.gflops`).
- **Rounds**: every step once untimed (warm-up), then :data:`STEP_PROBE_REPEATS` rounds each running every step once
  (contiguous, channels-last, contiguous, ...: both see the same load), the fastest of each kept
  (:func:`autoseg.plan.probe.timed_rounds`).
- **Decision** (:meth:`StepProbe.choice`): ``channels_last_3d`` when its fastest step is at least
  :data:`FORMAT_MARGIN` faster than contiguous's, else contiguous (the default, which needs no conversions).
- **Cache**: ``AUTOSEG_HOME/compute_probes/step_<key>.json`` per machine (:func:`autoseg.machine.machine_description`:
  CPU model, threads, torch version, precision), network structure, patch, batch and loss. A measurement taken while
  the machine looked busy (:func:`autoseg.plan.probe.busy_reasons`: repeats more than 25% apart, or a load average
  above the cores) is measured again by the next run here, which keeps the faster of each timing
  (:func:`fastest_steps`): one busy moment does not steer every later run. After :data:`BUSY_MEASUREMENTS`
  measurements the merged one stands (on a machine that is always busy, the probe costs about 8 steps per run
  otherwise: 79 s on 2 busy cores for the CPUPlanner's network on 2 threads).

A run continued from a checkpoint keeps the format it began with (the checkpoint records it), so that resuming stays
exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoseg.io.files import read_json, write_json
from autoseg.machine import Precision, available_cores, load_average, machine_description
from autoseg.plan.probe import Step, busy_reasons, probe_cache_folder, timed_rounds
from autoseg.plans import Configuration, Plans, Stage
from autoseg.train import resources

__all__ = [
    "BUSY_MEASUREMENTS",
    "FORMAT_MARGIN",
    "PLAIN_CONVOLUTION",
    "STEP_PROBE_REPEATS",
    "STEP_PROBE_VOXELS",
    "TRAINING_FORMATS",
    "PlainConvolution",
    "StepProbe",
    "StepTimer",
    "choose_training_memory_format",
    "fastest_steps",
    "format_name",
    "load_or_run_step_probe",
    "plain_convolution_step",
    "run_step_probe",
    "step_probe_patch",
]

#: Bump when the step probe measures something else, so old caches are not reused.
STEP_PROBE_VERSION = 1
#: Timed rounds after the warm-up; the fastest repeat of each step is kept.
STEP_PROBE_REPEATS = 3
#: A measurement taken while the machine looked busy is taken again by later runs until this many are merged.
BUSY_MEASUREMENTS = 3
#: The probed patch is shortened until it holds at most this many voxels (:func:`step_probe_patch`; 64³: about two
#: seconds per step of the CPUPlanner's network on one core; channels-last gains more on larger full-resolution maps,
#: 16% at 64 x 80 x 64 against 4% at 48³ for the DefaultPlanner's network, so not smaller).
STEP_PROBE_VOXELS = 64**3
#: ``channels_last_3d`` must be at least this much faster than contiguous to be chosen: a smaller difference is
#: within what repeats on a busy machine differ by, and contiguous needs no conversions.
FORMAT_MARGIN = 0.03
#: The memory formats a 3-D network can train in, by the name the log and the cache use.
TRAINING_FORMATS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last_3d": torch.channels_last_3d,
}


def format_name(memory_format: torch.memory_format) -> str:
    """``contiguous`` or ``channels_last_3d`` (:data:`TRAINING_FORMATS`' name of ``memory_format``)."""
    return next((name for name, value in TRAINING_FORMATS.items() if value == memory_format), str(memory_format))


@dataclass(frozen=True)
class PlainConvolution:
    """The plain convolution the step is compared with: a ``kernel``³ convolution of ``channels`` → ``channels``
    (bias included) on a batch of ``batch`` cubes of ``edge`` voxels, forward and backward (input and weight
    gradients), in the step's precision and memory format. At 64 channels oneDNN's CPU convolutions run near their
    best, so it says what convolutions achieve on this machine."""

    channels: int = 64
    edge: int = 32
    batch: int = 2
    kernel: int = 3

    def macs(self) -> int:
        """Multiply-accumulates of its forward pass (bias left out, as the networks count theirs)."""
        return self.batch * self.channels * self.channels * self.kernel**3 * self.edge**3

    def gflop(self) -> float:
        """GFLOP of forward + backward: 3 × 2 × :meth:`macs` (backward computes two products of the forward's size)."""
        return 6 * self.macs() / 1e9


PLAIN_CONVOLUTION = PlainConvolution()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: Precision) -> torch.autocast:
    return torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None)


def plain_convolution_step(
    device: torch.device,
    precision: Precision,
    memory_format: torch.memory_format,
    spec: PlainConvolution = PLAIN_CONVOLUTION,
) -> Step:
    """A callable that runs :data:`PLAIN_CONVOLUTION` (forward under the precision's autocast, backward) once and
    returns its seconds. The convolution, its input and the incoming gradient are made once, seeded, the global
    random state left as it was."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(spec.channels, spec.channels, spec.kernel, padding=spec.kernel // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    conv = conv.to(device, memory_format=memory_format)
    shape = (spec.batch, spec.channels, spec.edge, spec.edge, spec.edge)
    data = torch.randn(shape, generator=generator).to(device).contiguous(memory_format=memory_format)
    data.requires_grad_(True)

    def run() -> float:
        _synchronize(device)
        start = time.perf_counter()
        with _autocast(device, precision):
            output = conv(data)
        output.backward(torch.ones_like(output))
        _synchronize(device)
        seconds = time.perf_counter() - start
        conv.zero_grad(set_to_none=True)
        data.grad = None
        return seconds

    return run


@dataclass
class StepTimer:
    """One training step as the trainer takes it, timed by part: ``forward`` (network and loss under autocast),
    ``backward`` and ``optimizer`` (gradient clipping to 12, the step, clearing the gradients). Calling it runs one
    step and returns its seconds; :attr:`last` holds the parts of the latest call.

    Args:
        network: in training mode, on ``device``, in the memory format to time.
        loss: ``(outputs, target) -> scalar`` (the run's loss).
        optimizer: over ``network``'s parameters.
        data: (B, C, X, Y, Z) on ``device``, in the memory format to time.
        target: (B, 1, X, Y, Z) label values.
        precision: the autocast to run under.
        device: where it runs (CUDA is synchronized before each clock reading).
    """

    network: nn.Module
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    data: torch.Tensor
    target: torch.Tensor
    precision: Precision
    device: torch.device
    last: dict[str, float] = field(default_factory=dict)

    def __call__(self) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        with _autocast(self.device, self.precision):
            value = self.loss(self.network(self.data), self.target)
        _synchronize(self.device)
        forward = time.perf_counter()
        value.backward()
        _synchronize(self.device)
        backward = time.perf_counter()
        nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        end = time.perf_counter()
        self.last = {"forward": forward - start, "backward": backward - forward, "optimizer": end - backward}
        return end - start


def _timed_copy(
    network: nn.Module,
    loss: Callable[[Any, torch.Tensor], torch.Tensor],
    patch: Sequence[int],
    batch: int,
    device: torch.device,
    precision: Precision,
    memory_format: torch.memory_format,
) -> StepTimer:
    """A :class:`StepTimer` of a copy of ``network`` in ``memory_format`` (SGD, Nesterov momentum 0.99) on seeded
    random data ``(batch, in_channels, *patch)``, the target its first channel above 1."""
    generator = torch.Generator().manual_seed(0)
    twin = copy.deepcopy(network).to(device, memory_format=memory_format).train()
    channels = int(twin.in_channels)
    data = torch.randn((batch, channels, *patch), generator=generator).to(device)
    target = (data[:, :1] > 1).to(torch.int16)
    optimizer = torch.optim.SGD(twin.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    return StepTimer(twin, loss, optimizer, data.contiguous(memory_format=memory_format), target, precision, device)


def step_probe_patch(patch: Sequence[int], divisor: Sequence[int], voxels: int = STEP_PROBE_VOXELS) -> tuple[int, ...]:
    """``patch`` (X, Y, Z) with its longest axis (the first of equals) shortened by that axis' ``divisor`` (the
    network's total stride) until it holds at most ``voxels`` voxels or no axis is longer than its divisor: close to
    the run's shape, since channels-last gains most on large full-resolution maps.

    Example:
        >>> step_probe_patch((80, 96, 80), (16, 16, 16))
        (64, 64, 64)
    """
    current = [int(p) for p in patch]
    while math.prod(current) > voxels:
        longer = [axis for axis in range(len(current)) if current[axis] > divisor[axis]]
        if not longer:
            break
        axis = max(longer, key=lambda a: current[a])
        current[axis] -= divisor[axis]
    return tuple(current)


@dataclass(frozen=True)
class StepProbe:
    """What the step probe measured for one network on one machine.

    Attributes:
        machine: :func:`autoseg.machine.machine_description` (device, model, threads, torch, precision).
        network: the key of the network, its loss, patch and batch (a hash of their description).
        patch: the probed patch (X, Y, Z) in voxels.
        batch: the probed batch.
        created: when it was first measured (UTC, ISO 8601).
        step_seconds: per memory format, its fastest training step in seconds.
        plain_convolution_seconds: per memory format, the fastest :data:`PLAIN_CONVOLUTION` forward + backward.
        step_gflop: GFLOP of one step (3 × 2 × the network's forward multiply-accumulates at ``patch`` and
            ``batch``, ``forward_macs``); None for a network that does not count them.
        repeats: timed rounds (summed over merged measurements).
        probe_seconds: how long the latest measurement took (warm-up included).
        load_average: the one-minute load average before measuring (None where unknown).
        spread: median over the steps of slowest repeat over fastest - 1.
        busy: why the machine looked busy while measuring (empty when it did not).
    """

    machine: dict[str, Any]
    network: str
    patch: tuple[int, ...]
    batch: int
    created: str
    step_seconds: dict[str, float]
    plain_convolution_seconds: dict[str, float]
    step_gflop: float | None
    repeats: int
    probe_seconds: float = 0.0
    load_average: float | None = None
    spread: float = 0.0
    busy: str = ""
    version: int = STEP_PROBE_VERSION

    def choice(self) -> str:
        """``channels_last_3d`` when its fastest step beats contiguous's by at least :data:`FORMAT_MARGIN`, else
        ``contiguous``."""
        seconds = self.step_seconds
        faster = seconds.get("channels_last_3d", math.inf) < (1 - FORMAT_MARGIN) * seconds["contiguous"]
        return "channels_last_3d" if faster else "contiguous"

    def gflops(self, name: str) -> tuple[float | None, float]:
        """(the step's GFLOP/s in format ``name``, or None without an operation count; the plain convolution's)."""
        step = None if self.step_gflop is None else self.step_gflop / self.step_seconds[name]
        return step, PLAIN_CONVOLUTION.gflop() / self.plain_convolution_seconds[name]

    def describe(self, cached: bool) -> str:
        """Why :meth:`choice` chose, for the training log's memory-format line: every format's step, the rounds,
        measured now or cached, the step's share of a plain convolution's throughput, and a busy machine."""
        times = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self.step_seconds.items())
        step, plain = self.gflops(self.choice())
        throughput = (
            f"; the step runs at {step:.0f} GFLOP/s, {step / plain:.0%} of a plain convolution's {plain:.0f}"
            if step is not None
            else f"; a plain convolution runs at {plain:.0f} GFLOP/s"
        )
        source = f"cached, measured {self.created}" if cached else f"measured now in {self.probe_seconds:.0f} s"
        busy = f"; the machine looked busy ({self.busy})" if self.busy else ""
        return (
            f"step probe of this network at {'x'.join(map(str, self.patch))}, batch {self.batch}: {times} per step, "
            f"fastest of {self.repeats} interleaved rounds, {source}{throughput}{busy}"
        )

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> StepProbe:
        return cls(**{**plain, "patch": tuple(plain["patch"])})


def fastest_steps(first: StepProbe, second: StepProbe) -> StepProbe:
    """``second`` (a new measurement of the same network here) with each timing the faster of both and the rounds
    added; busy only when both were; dated as ``first``."""
    step = {name: min(seconds, first.step_seconds.get(name, seconds)) for name, seconds in second.step_seconds.items()}
    plain = {
        name: min(seconds, first.plain_convolution_seconds.get(name, seconds))
        for name, seconds in second.plain_convolution_seconds.items()
    }
    return replace(
        second,
        created=first.created,
        step_seconds=step,
        plain_convolution_seconds=plain,
        repeats=first.repeats + second.repeats,
        busy=second.busy if first.busy else "",
    )


def _network_key(network: nn.Module, loss: nn.Module, patch: Sequence[int], batch: int) -> str:
    """A hash of the network's structure (its module tree, every layer's sizes), the loss, patch and batch."""
    text = json.dumps([type(network).__name__, repr(network), repr(loss), list(patch), batch])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _cache_file(machine: dict[str, Any], key: str) -> Path:
    text = json.dumps({**machine, "network": key, "version": STEP_PROBE_VERSION}, sort_keys=True)
    return probe_cache_folder() / f"step_{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"


def run_step_probe(
    network: nn.Module,
    loss: nn.Module,
    patch: Sequence[int],
    batch: int,
    device: torch.device,
    precision: Precision,
    *,
    repeats: int = STEP_PROBE_REPEATS,
) -> StepProbe:
    """Time copies of ``network`` with ``loss`` in every :data:`TRAINING_FORMATS` format, and the plain
    convolution in each, in interleaved rounds (see the module doc). ``network`` itself and the global random state
    are left as they were.

    Args:
        network: the run's network (3-D, input (B, C, X, Y, Z)), untouched.
        loss: the run's loss, ``(outputs, target (B, 1, X, Y, Z)) -> scalar``.
        patch: (X, Y, Z) to time at (:func:`step_probe_patch` of the run's).
        batch: samples per step.
        device, precision: where and how the run trains.
        repeats: timed rounds after the warm-up.
    """
    start = time.perf_counter()
    rng = torch.random.get_rng_state()
    load = load_average()
    steps: list[Step] = []
    for memory_format in TRAINING_FORMATS.values():
        steps.append(_timed_copy(network, loss, patch, batch, device, precision, memory_format))
        steps.append(plain_convolution_step(device, precision, memory_format))
    times = timed_rounds(steps, repeats)
    del steps
    torch.random.set_rng_state(rng)
    spread, busy = busy_reasons(times, load, available_cores())
    counts = getattr(network, "forward_macs", None)
    gflop = None if counts is None else 6 * batch * counts(tuple(patch)) / 1e9
    return StepProbe(
        machine=machine_description(device, precision.name),
        network=_network_key(network, loss, patch, batch),
        patch=tuple(int(p) for p in patch),
        batch=batch,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        step_seconds={name: round(min(times[2 * i]), 5) for i, name in enumerate(TRAINING_FORMATS)},
        plain_convolution_seconds={name: round(min(times[2 * i + 1]), 5) for i, name in enumerate(TRAINING_FORMATS)},
        step_gflop=gflop,
        repeats=repeats,
        probe_seconds=round(time.perf_counter() - start, 1),
        load_average=load,
        spread=spread,
        busy=busy,
    )


def _read_cached(path: Path, machine: dict[str, Any], key: str) -> StepProbe | None:
    if not path.is_file():
        return None
    try:
        probe = StepProbe.from_plain(read_json(path))
    except (KeyError, TypeError, ValueError):
        return None
    fits = probe.machine == machine and probe.network == key and probe.version == STEP_PROBE_VERSION
    return probe if fits else None


def load_or_run_step_probe(
    network: nn.Module,
    loss: nn.Module,
    patch: Sequence[int],
    batch: int,
    device: torch.device,
    precision: Precision,
    *,
    refresh: bool = False,
) -> tuple[StepProbe, bool]:
    """The cached step probe of this network on this machine, or a new one (then cached); a cached one taken while
    the machine looked busy is measured again, keeping the faster of each timing (:func:`fastest_steps`), until it
    holds :data:`BUSY_MEASUREMENTS` measurements (a machine that is always busy does not pay for it in every run).

    Returns:
        (probe, whether it came from the cache as it was).
    """
    machine = machine_description(device, precision.name)
    key = _network_key(network, loss, patch, batch)
    path = _cache_file(machine, key)
    cached = None if refresh else _read_cached(path, machine, key)
    if cached is not None and (not cached.busy or cached.repeats >= BUSY_MEASUREMENTS * STEP_PROBE_REPEATS):
        return cached, True
    probe = run_step_probe(network, loss, patch, batch, device, precision)
    if cached is not None:
        probe = fastest_steps(cached, probe)
    write_json(probe.to_plain(), path)
    return probe, False


def choose_training_memory_format(
    plans: Plans,
    configuration: Configuration,
    network: nn.Module,
    loss: nn.Module,
    stage: Stage,
    device: torch.device,
    precision: Precision,
    *,
    distributed: bool = False,
) -> tuple[torch.memory_format, str]:
    """The memory format a run trains ``network`` in, and the reason for the log.

    A 3-D network in one process on the CPU: the step probe's choice for this network at ``stage``'s batch (the
    stage the run begins with) and its patch, reduced to at most :data:`STEP_PROBE_VOXELS` voxels
    (:func:`load_or_run_step_probe`, :meth:`StepProbe.choice`). Anywhere else (2-D networks, GPUs, distributed runs,
    whose ranks must agree): the plans' compute-budget choice (:func:`autoseg.train.resources.memory_format`).
    """
    if configuration.dimension != 3 or device.type != "cpu" or distributed:
        chosen, reason = resources.memory_format(plans, configuration, device, precision)
        return chosen, reason + ("; a distributed run's ranks keep one format" if distributed else "")
    patch = step_probe_patch(stage.patch_size, configuration.network.total_stride)
    probe, cached = load_or_run_step_probe(network, loss, patch, stage.batch_size, device, precision)
    return TRAINING_FORMATS[probe.choice()], probe.describe(cached)
