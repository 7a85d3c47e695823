"""What a training run takes from the plans' compute budget (``plans.json``'s ``compute_budget``) on this machine:
the memory format, the augmentation processes, torch's CPU threads, the time promise to check the run against and
the deadline that keeps the run to the budget.

Each applies only where the plans were probed on the same kind of device (and precision); otherwise the run
takes the defaults, and each choice comes with its reason for the log.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from autoseg.distributed import DistributedContext
from autoseg.machine import Precision, available_cores, configure_threads
from autoseg.plans import Configuration, Plans
from autoseg.train.deadline import DEADLINE_FILE, Deadline
from autoseg.train.options import TrainingOptions
from autoseg.train.run_length import RunLength
from autoseg.train.time_promise import TimePromise

#: Augmentation processes when neither ``-np`` nor the plans' compute budget says.
DEFAULT_DATA_PROCESSES = 2


def memory_format(
    plans: Plans, configuration: Configuration, device: torch.device, precision: Precision
) -> tuple[torch.memory_format, str]:
    """``channels_last_3d`` when the plans' compute-budget probe found it faster for training on this kind of
    device and precision (3-D networks only), else contiguous; with the reason."""
    budget = plans.compute_budget
    if configuration.dimension != 3:
        return torch.contiguous_format, "2-D network"
    if budget is None:
        return torch.contiguous_format, "no compute-budget probe in the plans"
    if budget.device != device.type or budget.precision != precision.name:
        return torch.contiguous_format, (
            f"the plans were probed on {budget.device} in {budget.precision}, this "
            f"run is on {device.type} in {precision.name}"
        )
    chosen = torch.channels_last_3d if budget.memory_format == "channels_last_3d" else torch.contiguous_format
    return chosen, f"faster in the compute-budget probe ({budget.probe.get('created', 'date unknown')})"


def data_processes(requested: int | None, plans: Plans, device: torch.device) -> tuple[int, str]:
    """Background augmentation processes: ``requested`` (``-np``) when given, else the plans' compute-budget
    choice for this device, else :data:`DEFAULT_DATA_PROCESSES`; with the reason."""
    if requested is not None:
        return requested, "requested"
    budget = plans.compute_budget
    if budget is not None and budget.device == device.type:
        return budget.data_processes, "the plans' compute budget: " + budget.reasons.get("data_processes", "")
    return DEFAULT_DATA_PROCESSES, "default"


def configure_cpu_threads(
    device: torch.device, context: DistributedContext, processes: int, requested_processes: int | None
) -> None:
    """On the CPU, torch's threads: this node's cores shared by its ranks, minus the augmentation ``processes``
    when the plans' compute budget chose them (``requested_processes`` None); nothing on a GPU."""
    if device.type != "cpu":
        return
    cores = available_cores() // context.local_world_size
    if processes and requested_processes is None:
        configure_threads(max(1, cores - processes))  # the loader has the other cores
    elif context.enabled:
        configure_threads(max(1, cores))  # the ranks share the cores


def time_promise(
    plans: Plans, configuration: Configuration, device: torch.device, precision: Precision, run_length: RunLength
) -> TimePromise | None:
    """The plans' time estimate for this run (rescaled to its epochs and iterations), when the plans were
    fitted to a compute budget on this kind of device and precision; else None."""
    budget = plans.compute_budget
    estimate = budget.estimates.get(configuration.name) if budget is not None else None
    if estimate is None or budget.device != device.type or budget.precision != precision.name:
        return None
    return TimePromise.from_estimate(
        estimate, run_length.epochs, run_length.iterations_per_epoch, run_length.val_iterations
    )


def deadline(
    plans: Plans,
    configuration: Configuration,
    promise: TimePromise | None,
    run_length: RunLength,
    options: TrainingOptions,
    output_folder: Path,
) -> Deadline | None:
    """The deadline of a run with a time promise (:func:`time_promise`): the plans' compute budget, re-planned after
    every epoch unless ``--epochs`` or ``--iters-per-epoch`` fixed the run length (then only measured); None without
    a promise. ``deadline.json`` goes into ``output_folder``."""
    if promise is None or plans.compute_budget is None:
        return None
    fixed = [
        flag
        for flag, value in (("--epochs", options.epochs), ("--iters-per-epoch", options.iterations_per_epoch))
        if value is not None
    ]
    return Deadline(
        promise,
        plans.compute_budget.minutes,
        replace(run_length, reschedules=()),
        [stage.name for stage in configuration.schedule.stages],
        replanning=f"{' and '.join(fixed)} given: the run length asked for is kept" if fixed else None,
        final_validation=options.validation,
        path=output_folder / DEADLINE_FILE,
    )
