"""What the plan promised a run would take (:class:`TimePromise`), rescaled to the run's actual epochs and
iterations, checked against the measured times."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from autoseg.machine import available_cores, load_average

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

    def iteration_seconds(self, stage: int) -> float:
        """Estimated seconds of one training iteration (network step and the loader's share) in ``stage`` (stages
        differ in patch size); the mean over the stages without per-stage figures."""
        if stage >= len(self.stage_seconds_per_iteration):
            return self.network_seconds + self.loader_seconds
        return self.stage_seconds_per_iteration[stage]

    def stage_epoch_seconds(
        self, stage: int, iterations: int | None = None, val_iterations: int | None = None
    ) -> float:
        """Estimated seconds of an epoch of ``stage`` with ``iterations`` training iterations and ``val_iterations``
        validation batches (default: the run's per epoch, as it started)."""
        iterations = self.iterations_per_epoch if iterations is None else iterations
        val_iterations = self.val_iterations if val_iterations is None else val_iterations
        return (
            iterations * self.iteration_seconds(stage)
            + val_iterations * self.validation_batch_seconds
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

    def describe(self, budget_minutes: float) -> str:
        """One line for the log: the estimated training and final validation time of a ``budget_minutes`` budget."""
        return (
            f"time estimate (plans' compute budget): {self.training_seconds / 60:.1f} min of training "
            f"({self.epoch_seconds:.1f} s per epoch: {self.network_seconds + self.loader_seconds:.2f} s per "
            f"iteration) + {self.final_validation_seconds / 60:.1f} min of final validation = "
            f"{self.total_seconds / 60:.1f} min of a {budget_minutes:g}-minute budget"
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
            load = load_average()
            causes.append(
                f"network steps took {step_seconds / steps:.2f} s instead of {self.network_seconds:.2f} s: "
                f"other load on the machine (load average {math.nan if load is None else load:.1f} on "
                f"{available_cores()} cores) or a "
                "slower machine than the one probed"
            )
        if not causes:
            causes.append("validation, checkpoints or plotting took longer than estimated")
        return False, f"WARNING: {line}, more than {OVERRUN_TOLERANCE:.0%} over: " + "; ".join(causes)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"
