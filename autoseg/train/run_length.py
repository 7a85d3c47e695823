"""How long a run trains (:class:`RunLength`): epochs × iterations per epoch, the validation batches per epoch and
the stage boundaries, after ``--epochs``/``--iters-per-epoch``/``--val-iters`` shorten the plans' schedule, and the
iterations per epoch a compute budget's deadline re-planned (:meth:`RunLength.rescheduled`).

A run length is counted in epochs and iterations, never in minutes: the time a plan may take is the plans'
compute budget (``autoseg.plans.ComputeBudget``), checked and kept by :mod:`autoseg.train.time_promise` and
:mod:`autoseg.train.deadline`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from autoseg.plans import Schedule


def round_half_up(value: float) -> int:
    """``value`` rounded to the nearest integer, halves up (2.5 -> 3), as every rescaled epoch count is."""
    return int(math.floor(value + 0.5))


def _default_val_iterations(schedule: Schedule, iterations_per_epoch: int) -> int:
    """The plans' validation batches per epoch when set and the iterations per epoch are the plans', else a fifth
    of the iterations per epoch (nnU-Net's 50 for 250)."""
    if schedule.val_iterations_per_epoch is not None and iterations_per_epoch == schedule.iterations_per_epoch:
        return schedule.val_iterations_per_epoch
    return max(1, round_half_up(iterations_per_epoch / 5))


@dataclass(frozen=True)
class RunLength:
    """How long a run trains: the plans' schedule, possibly shortened with ``--epochs``/``--iters-per-epoch``.

    With ``epochs`` other than the plans', every stage start epoch becomes ``start · epochs / plan_epochs``
    rounded (half up) and kept below ``epochs``, and the warm-restart period scales the same way (at least 1
    epoch). A stage squeezed to no epochs is skipped (the later stage starting at the same epoch wins).

    Everything in the schedule is counted in epochs (stage starts, the warm-restart period, snapshots, validation
    once per epoch), so a deadline that re-plans the iterations of the epochs still to come
    (:meth:`rescheduled`) keeps the schedule's shape: each epoch trains more or fewer iterations, and validates
    in the same proportion.

    Checkpoints keep it under their ``run_length`` key (:meth:`to_plain`); those written before it had its own name,
    under ``budget``, still continue.

    Attributes:
        epochs: epochs of the run.
        iterations_per_epoch: training iterations per epoch as the run started (the plans' or ``--iters-per-epoch``).
        val_iterations: validation batches per epoch as the run started (0: none).
        stage_starts: first epoch (0-based) of each stage of ``schedule.stages``.
        restart_period_epochs: cosine warm-restart period in epochs, if the plans give one.
        reschedules: re-plans, in order: (first epoch, iterations per epoch, validation batches per epoch) from
            that epoch on (:meth:`rescheduled`); empty when the run trains as it started.
    """

    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    stage_starts: tuple[int, ...]
    restart_period_epochs: int | None = None
    reschedules: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def from_schedule(
        cls,
        schedule: Schedule,
        epochs: int | None = None,
        iterations_per_epoch: int | None = None,
        val_iterations: int | None = None,
    ) -> RunLength:
        """The run length of ``schedule`` with the given overrides (None keeps the plans' value).

        Example:
            >>> RunLength.from_schedule(schedule, epochs=4).stage_starts  # plans: 1000 epochs, stages at 0 and 875
            (0, 3)
        """
        new = epochs or schedule.epochs
        scale = new / schedule.epochs
        starts = tuple(min(round_half_up(stage.start_epoch * scale), new - 1) for stage in schedule.stages)
        period = schedule.restart_period_epochs
        iterations = iterations_per_epoch or schedule.iterations_per_epoch
        return cls(
            epochs=new,
            iterations_per_epoch=iterations,
            val_iterations=_default_val_iterations(schedule, iterations) if val_iterations is None else val_iterations,
            stage_starts=starts,
            restart_period_epochs=None if period is None else max(1, round_half_up(period * scale)),
        )

    def _segment(self, epoch: int) -> tuple[int, int]:
        """(iterations, validation batches) of ``epoch``: the last re-plan starting at or before it, else the start's."""
        found = (self.iterations_per_epoch, self.val_iterations)
        for first, iterations, val_iterations in self.reschedules:
            if first <= epoch:
                found = (iterations, val_iterations)
        return found

    def iterations_at(self, epoch: int) -> int:
        """Training iterations of ``epoch`` (0-based)."""
        return self._segment(epoch)[0]

    def val_iterations_at(self, epoch: int) -> int:
        """Validation batches of ``epoch`` (0-based)."""
        return self._segment(epoch)[1]

    @property
    def total_iterations(self) -> int:
        """Training iterations of the whole run, re-plans included."""
        return sum(self.iterations_at(epoch) for epoch in range(self.epochs))

    def rescheduled(self, first_epoch: int, iterations: int, val_iterations: int) -> RunLength:
        """The run length with ``iterations`` training iterations and ``val_iterations`` validation batches in every
        epoch from ``first_epoch`` on (earlier epochs unchanged; a later re-plan replaces this one's tail).

        Raises:
            ValueError: ``first_epoch`` outside the run, or fewer than 1 iteration or 0 validation batches.
        """
        if not 0 <= first_epoch < self.epochs or iterations < 1 or val_iterations < 0:
            raise ValueError(
                f"cannot re-plan epochs from {first_epoch} of {self.epochs} to {iterations} iterations and "
                f"{val_iterations} validation batches"
            )
        kept = tuple(change for change in self.reschedules if change[0] < first_epoch)
        return replace(self, reschedules=(*kept, (first_epoch, iterations, val_iterations)))

    def stage_at(self, epoch: int) -> int:
        """Index of the stage that trains ``epoch`` (0-based): the last one starting at or before it."""
        return max(index for index, start in enumerate(self.stage_starts) if start <= epoch)

    def stage_end(self, index: int) -> int:
        """The epoch after the last one of stage ``index`` (the next stage's start, or ``epochs``)."""
        later = [start for start in self.stage_starts[index + 1 :] if start > self.stage_starts[index]]
        return min(later, default=self.epochs)

    def snapshot_epochs(self, fractions: Sequence[float]) -> list[int]:
        """Epoch counts after which a snapshot is kept: ``fractions`` of the last stage (each at least 1 epoch
        into it), sorted, without repeats."""
        start = self.stage_starts[-1]
        length = self.epochs - start
        return sorted({start + max(1, round_half_up(length * f)) for f in fractions})

    def to_plain(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {
            "epochs": self.epochs,
            "iterations_per_epoch": self.iterations_per_epoch,
            "val_iterations": self.val_iterations,
            "stage_starts": list(self.stage_starts),
            "restart_period_epochs": self.restart_period_epochs,
            "reschedules": [list(change) for change in self.reschedules],
        }

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> RunLength:
        """The run length :meth:`to_plain` wrote (one written before re-plans were recorded has none)."""
        reschedules = tuple(tuple(int(v) for v in change) for change in plain.get("reschedules", ()))
        return cls(**{**plain, "stage_starts": tuple(plain["stage_starts"]), "reschedules": reschedules})
