"""A compute budget is a deadline: the run re-plans the epochs still to come after every epoch, and within an epoch
every :data:`CHECK_SECONDS` of training, so the fold ends on time.

A run whose plans were fitted to a compute budget (``plans.json``'s ``compute_budget``) carries the plan's time
promise (:class:`~autoseg.train.time_promise.TimePromise`). After every epoch the :class:`Deadline` handler compares
the epoch's measured time with it and, with :func:`~autoseg.train.replan.replan`, lays the remaining epochs out so that the fold, its
end-of-fold validation included, ends when the budget does: fewer iterations per epoch when the machine got slower
(another job on a shared workstation), more when it got faster.

How the rest of the fold is projected and re-laid, keeping the schedule's shape, is
:mod:`autoseg.train.replan`: after an epoch (:func:`~autoseg.train.replan.replan`, at the epoch's measured costs)
and, because one epoch can be long and the machine can slow down in the middle of it, within the epoch under way
(:func:`~autoseg.train.replan.replan_within_epoch`, at the speed of the stretch since the last check), which the
deadline checks every :data:`CHECK_SECONDS` and once more at the run's last training iteration. A re-plan reads
only what the checkpoint records (the fold's elapsed time, the run length, the measured epochs) and what was
measured since, so a continued run re-plans exactly as the uninterrupted one would from the same times.

In a distributed run every rank measures its own clock; the deadline takes the maximum over the ranks of every
measurement before it decides (``autoseg.distributed.max_``), so all ranks take the same decision at the same
iteration. (The trainer attaches a deadline to one-process runs only, as the plan's time promise was measured for
one process.)

Every epoch, every re-plan (with its one-line reason, also logged) and what ran go into ``deadline.json`` in the run
folder (:data:`DEADLINE_FILE`), rewritten after each epoch and at the end of the fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from autoseg import distributed
from autoseg.io.files import write_json
from autoseg.train.events import EpochHandler
from autoseg.train.replan import EpochTime, Replan, minutes_text, replan, replan_within_epoch
from autoseg.train.run_length import RunLength
from autoseg.train.time_promise import TimePromise

#: The run folder's record of the deadline.
DEADLINE_FILE = "deadline.json"
#: Seconds of training between two checks of the deadline within an epoch.
CHECK_SECONDS = 30.0
#: A run's speed for the probe's correction: this percentile of its epochs' speeds (the fast end: what the machine
#: does with no other load, as the probe keeps its fastest repeats).
SPEED_PERCENTILE = 25


class DeadlineLoop(Protocol):
    """What the deadline asks of the training loop (``trainers.Trainer``).

    Attributes:
        run_length: the run's; the deadline replaces it when it re-plans.
        timing: the epoch's ``started`` (clock reading), ``training`` (seconds in training steps and waiting for
            batches, kept up to date after every iteration), ``iterations``, ``validation`` (seconds of the per-epoch
            validation) and ``val_iterations``.
        clock: seconds, monotonic (``time.perf_counter``; a test injects its own).
    """

    run_length: RunLength
    timing: dict[str, float]
    clock: Callable[[], float]


@dataclass(frozen=True)
class _Watch:
    """The deadline's watch over the epoch under way: the clock reading, training seconds and iterations at its last
    check (after the epoch's first iteration before the first check)."""

    epoch: int
    clock: float
    training_seconds: float = 0.0
    iterations: int = 0


class Deadline(EpochHandler):
    """Keeps a budgeted run on time: measures every epoch, re-plans the rest (:func:`replan`), records both.

    Attached to the training loop by the trainer when the plans' time promise applies to the run; its state (the
    fold's elapsed time, the measured epochs, the re-plans) goes into every checkpoint under :attr:`key`.

    Args:
        promise: the plan's time promise, for the run length the run started with.
        budget_minutes: the compute budget of one fold.
        planned: the run length the run started with (before any re-plan).
        stage_names: the schedule's stage names, for the record.
        replanning: None to re-plan; else why the schedule stays as it is (e.g. ``--epochs`` was given): the epochs
            are still measured and recorded.
        final_validation: the end-of-fold validation follows and counts towards the budget.
        path: where ``deadline.json`` is written; None: nowhere.
    """

    key = "deadline"

    def __init__(
        self,
        promise: TimePromise,
        budget_minutes: float,
        planned: RunLength,
        stage_names: Sequence[str],
        *,
        replanning: str | None = None,
        final_validation: bool = True,
        path: Path | None = None,
    ) -> None:
        self.promise = promise
        self.budget_seconds = 60.0 * budget_minutes
        self.planned = planned
        self.stage_names = tuple(stage_names)
        self.replanning = replanning
        self.final_validation = final_validation
        self.path = path
        self.elapsed_seconds = 0.0
        self.epochs: list[dict[str, Any]] = []
        self.replans: list[dict[str, Any]] = []
        self.ran: dict[str, Any] = {}
        self._mark: float | None = None  # clock reading of the last measurement in this process
        self._watch: _Watch | None = None  # the epoch under way's next check

    # ------------------------------------------------------------------ events
    def epoch_completed(self, loop: DeadlineLoop, epoch: int, score: float) -> list[str]:
        """Measure the epoch, re-plan the rest of the run (``loop.run_length``) when it would miss the budget, write
        ``deadline.json``; returns the re-plan's line for the log, if any."""
        now = loop.clock()
        timing = loop.timing
        seconds, training, validation = _agreed(
            now - (timing["started"] if self._mark is None else self._mark), timing["training"], timing["validation"]
        )
        measured = EpochTime(
            epoch=epoch,
            stage=loop.run_length.stage_at(epoch),
            iterations=int(timing["iterations"]),
            val_iterations=int(timing["val_iterations"]),
            seconds=seconds,
            training_seconds=training,
            validation_seconds=validation,
        )
        self._mark = now
        self._watch = None
        self.elapsed_seconds += measured.seconds
        promised = self.promise.stage_epoch_seconds(measured.stage, measured.iterations, measured.val_iterations)
        decision = replan(
            self.promise,
            loop.run_length,
            measured,
            self.elapsed_seconds,
            self.budget_seconds,
            final_validation=self.final_validation,
        )
        self.epochs.append(
            {
                "epoch": epoch + 1,
                "stage": self.stage_names[measured.stage] if measured.stage < len(self.stage_names) else measured.stage,
                "iterations": measured.iterations,
                "val_iterations": measured.val_iterations,
                "seconds": round(measured.seconds, 3),
                "training_seconds": round(measured.training_seconds, 3),
                "validation_seconds": round(measured.validation_seconds, 3),
                "promised_seconds": round(promised, 3),
                "speed": round(decision.speed, 4),
                "elapsed_minutes": round(self.elapsed_seconds / 60, 3),
                "projected_minutes": round(decision.projected_seconds / 60, 3),
            }
        )
        lines = self._adopt(loop, decision, epoch + 1, {"after_epoch": epoch + 1}, self.elapsed_seconds)
        self.ran = self._ran(loop.run_length, epoch + 1)
        self.write()
        return lines

    def iteration_completed(self, loop: DeadlineLoop, epoch: int, done: int) -> list[str]:
        """After training iteration ``done`` (1-based) of ``epoch``: when a check is due (:data:`CHECK_SECONDS`
        after the last one, or at the last training iteration of the run), re-lay the rest of the run if the fold would
        end late or early (:func:`replan_within_epoch`); returns the re-plan's line for the log, if any.

        In a distributed run the ranks agree on every iteration whether a check is due (one all-reduce of three
        numbers), so they check, and re-plan, at the same iteration."""
        if self.replanning is not None:
            return []
        timing, now = loop.timing, loop.clock()
        since, in_epoch, training = _agreed(
            now - (self._watch.clock if self._watch else now),
            now - (timing["started"] if self._mark is None else self._mark),
            timing["training"],
        )
        watch = self._watch
        if watch is None or watch.epoch != epoch:  # the stretches start after the first iteration (loader start)
            self._watch = _Watch(epoch, now, training, done)
            return []
        last_epoch_ends = epoch == loop.run_length.epochs - 1 and done >= loop.run_length.iterations_at(epoch)
        if since < CHECK_SECONDS and not last_epoch_ends:
            return []
        per_iteration = max(training - watch.training_seconds, 0.0) / (done - watch.iterations)
        self._watch = _Watch(epoch, now, training, done)
        elapsed = self.elapsed_seconds + in_epoch
        decision = replan_within_epoch(
            self.promise,
            loop.run_length,
            epoch,
            done,
            per_iteration,
            elapsed,
            self.budget_seconds,
            measured=self._last_epoch_costs(per_iteration),
            final_validation=self.final_validation,
        )
        return self._adopt(loop, decision, epoch, {"during_epoch": epoch + 1, "after_iteration": done}, elapsed)

    def _last_epoch_costs(self, per_iteration: float) -> tuple[float, float] | None:
        """(seconds per validation batch, overhead seconds per epoch) of the last measured epoch, the batches scaled
        by ``per_iteration`` over that epoch's seconds per training iteration; None before any epoch, or when it
        validated nothing."""
        if not self.epochs or not self.epochs[-1]["val_iterations"]:
            return None
        last = self.epochs[-1]
        last_per_iteration = max(last["training_seconds"] / max(1, last["iterations"]), 1e-9)
        per_batch = last["validation_seconds"] / last["val_iterations"] * per_iteration / last_per_iteration
        overhead = max(0.0, last["seconds"] - last["training_seconds"] - last["validation_seconds"])
        return per_batch, overhead

    def _adopt(
        self, loop: DeadlineLoop, decision: Replan, first: int, when: dict[str, int], elapsed_seconds: float
    ) -> list[str]:
        """Record ``decision`` and give the loop its run length when it changed the schedule from epoch ``first``
        on; returns its reason as a log line."""
        if not decision.changed or self.replanning is not None:
            return []
        self.replans.append(
            {
                **when,
                "elapsed_minutes": round(elapsed_seconds / 60, 3),
                "speed": round(decision.speed, 4),
                "iterations_per_epoch": [
                    loop.run_length.iterations_at(first),
                    decision.run_length.iterations_at(first),
                ],
                "val_iterations": [
                    loop.run_length.val_iterations_at(first),
                    decision.run_length.val_iterations_at(first),
                ],
                "projected_minutes": round(decision.projected_seconds / 60, 3),
                "reason": decision.reason,
            }
        )
        loop.run_length = decision.run_length
        return [decision.reason]

    def training_finished(self, loop: DeadlineLoop) -> None:
        """Count the time since the last epoch's measurement (its checkpoints) and record what trained."""
        if self._mark is not None:
            self.elapsed_seconds += loop.clock() - self._mark
            self._mark = None
        self.ran = self._ran(loop.run_length, len(self.epochs))
        self.write()

    def fold_finished(self, validation_seconds: float) -> str:
        """Record the end-of-fold validation; returns the line comparing the whole fold with the budget."""
        fold = self.elapsed_seconds + validation_seconds
        self.ran = {
            **self.ran,
            "final_validation_minutes": round(validation_seconds / 60, 3),
            "fold_minutes": round(fold / 60, 3),
            "of_budget": round(fold / self.budget_seconds, 4),
        }
        self.write()
        return (
            f"deadline: the fold took {fold / 60:.1f} min of its {minutes_text(self.budget_seconds)}-minute budget "
            f"({round(100 * (fold / self.budget_seconds - 1)):+d}%): {self.ran['iterations']} training iterations "
            f"(planned {self.planned.total_iterations}), {len(self.replans)} re-plan(s)"
        )

    def run_speed(self) -> float | None:
        """The run's measured over promised seconds per training iteration, at :data:`SPEED_PERCENTILE` of its
        epochs (None before any epoch)."""
        speeds = [entry["speed"] for entry in self.epochs]
        return float(np.percentile(speeds, SPEED_PERCENTILE)) if speeds else None

    def describe(self) -> str:
        """The log line at the start of a run: the budget, and whether the schedule is re-planned."""
        how = (
            "the schedule is re-planned after every epoch to end on time"
            if self.replanning is None
            else f"the schedule is not re-planned ({self.replanning}); epochs are measured"
        )
        return f"deadline: {minutes_text(self.budget_seconds)} min for the fold, end-of-fold validation included; {how}"

    # ------------------------------------------------------------------ the record
    def _ran(self, run_length: RunLength, epochs: int) -> dict[str, Any]:
        return {
            "epochs": epochs,
            "iterations": sum(run_length.iterations_at(e) for e in range(epochs)),
            "training_minutes": round(self.elapsed_seconds / 60, 3),
        }

    def record(self) -> dict[str, Any]:
        """What ``deadline.json`` holds: the budget, the plan, the epochs, the re-plans and what ran."""
        planned = self.planned
        return {
            "budget_minutes": self.budget_seconds / 60,
            "replanning": "on" if self.replanning is None else f"off: {self.replanning}",
            "planned": {
                "epochs": planned.epochs,
                "iterations_per_epoch": planned.iterations_per_epoch,
                "val_iterations_per_epoch": planned.val_iterations,
                "iterations": planned.total_iterations,
                "stage_starts": list(planned.stage_starts),
                "estimated_minutes": round(self._planned_seconds() / 60, 3),
            },
            "epochs": self.epochs,
            "replans": self.replans,
            "ran": self.ran,
        }

    def _planned_seconds(self) -> float:
        """The promise for the plan: each epoch at its stage's cost, and the end-of-fold validation."""
        stages = (self.planned.stage_at(epoch) for epoch in range(self.planned.epochs))
        final = self.promise.final_validation_seconds if self.final_validation else 0.0
        return sum(self.promise.stage_epoch_seconds(stage) for stage in stages) + final

    def write(self) -> None:
        if self.path is not None:
            write_json(self.record(), self.path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "elapsed_seconds": self.elapsed_seconds,
            "epochs": [dict(entry) for entry in self.epochs],
            "replans": [dict(entry) for entry in self.replans],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed_seconds = float(state.get("elapsed_seconds", 0.0))
        self.epochs = [dict(entry) for entry in state.get("epochs", [])]
        self.replans = [dict(entry) for entry in state.get("replans", [])]
        self._mark = None
        self._watch = None


def _agreed(*seconds: float) -> list[float]:
    """Measured ``seconds``, each the maximum over the ranks of a distributed run (as they are for one process)."""
    values = distributed.max_(torch.tensor([float(value) for value in seconds], dtype=torch.float64))
    return [float(value) for value in values]
