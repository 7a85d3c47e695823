"""A compute budget is a deadline: the run re-plans the epochs still to come after every epoch, and within an epoch
every :data:`CHECK_SECONDS` of training, so the fold ends on time.

A run whose plans were fitted to a compute budget (``plans.json``'s ``compute_budget``) carries the plan's time
promise (:class:`~autoseg.train.time_promise.TimePromise`). After every epoch the :class:`Deadline` handler compares
the epoch's measured time with it and, with :func:`replan`, lays the remaining epochs out so that the fold, its
end-of-fold validation included, ends when the budget does: fewer iterations per epoch when the machine got slower
(another job on a shared workstation), more when it got faster (up to :data:`MAX_GROWTH` times the planned ones).

The shape of the schedule is kept. Only the training iterations of the remaining epochs change, and their
validation batches in the same proportion; the epochs, the stage starts (zoom-in, zoom-out), the learning-rate
schedule (poly decay and cosine warm restarts are functions of the epoch) and the snapshot epochs are counted in
epochs and stay where the plan put them (:meth:`autoseg.train.run_length.RunLength.rescheduled`). nnU-Net's
wall-time trainer (``tools/nnunet_budget_trainer.py``) re-plans the number of epochs instead, which stretches or
squeezes the learning-rate schedule it has already followed part of.

How the rest of the fold is estimated (:func:`replan`): the last epoch's measured seconds per training iteration,
per validation batch, and outside both (loader start, checkpoints, plot) carry over to every remaining epoch, each
stage's iterations weighted by the promise's ratio of stage costs (zoom-out patches cost more); the end-of-fold
validation is the promise's times the measured speed (measured over promised seconds per training iteration). The
schedule is re-laid only when it would miss the budget by more than :data:`REPLAN_TOLERANCE`, and then aims at the
budget itself. A re-plan reads only what the checkpoint records (the fold's elapsed time, the run length, the
measured epochs) and the epoch just measured, so a continued run re-plans exactly as the uninterrupted one would
from the same times.

One epoch can be long (minutes at a large budget) and the machine can slow down in the middle of it: a competing job
that makes every iteration 7 times slower turns an epoch planned for 1 minute into 7. So the deadline also looks
during the epoch, every :data:`CHECK_SECONDS` and once more at the run's last training iteration. When the fold
would end more than :data:`REPLAN_TOLERANCE` late or early (:func:`replan_within_epoch`, at the speed of the stretch
since the last check) it re-lays the epoch under way and the ones after it, all to the same iterations per epoch
(the epoch under way stops at once when it has already trained more), the schedule's shape kept as above. That the
check also lengthens matters when the competing job stops during the last epochs: what a slow stretch took away is
given back while there is time to use it.

In a distributed run every rank measures its own clock; the deadline takes the maximum over the ranks of every
measurement before it decides (``autoseg.distributed.max_``), so all ranks take the same decision at the same
iteration.

Every epoch, every re-plan (with its one-line reason, also logged) and what ran go into ``deadline.json`` in the run
folder (:data:`DEADLINE_FILE`), rewritten after each epoch and at the end of the fold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from autoseg import distributed
from autoseg.io.files import write_json
from autoseg.train.events import EpochHandler
from autoseg.train.run_length import RunLength, round_half_up
from autoseg.train.time_promise import TimePromise

#: The run folder's record of the deadline.
DEADLINE_FILE = "deadline.json"
#: A re-plan gives an epoch at most this many times the iterations it started with (a much faster machine than
#: probed is more likely a stale probe than a lasting gift; the next plan corrects it, ``autoseg.plan.probe``).
MAX_GROWTH = 4.0
#: The schedule is re-laid when the projected end of the fold misses the budget by more than this share of it.
REPLAN_TOLERANCE = 0.02
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
class EpochTime:
    """What one epoch took, in seconds.

    Attributes:
        epoch: 0-based.
        stage: index of its stage.
        iterations, val_iterations: training iterations and validation batches it ran.
        seconds: wall time since the previous epoch's measurement (its checkpoints and plot included).
        training_seconds: training steps and waiting for batches.
        validation_seconds: the per-epoch validation batches.
    """

    epoch: int
    stage: int
    iterations: int
    val_iterations: int
    seconds: float
    training_seconds: float
    validation_seconds: float

    @property
    def overhead_seconds(self) -> float:
        """Seconds outside training and validation (loader start, checkpoints, plot, log)."""
        return max(0.0, self.seconds - self.training_seconds - self.validation_seconds)


@dataclass(frozen=True)
class Replan:
    """What :func:`replan` decided after an epoch.

    Attributes:
        run_length: the run length from now on (the same object when nothing changed).
        speed: measured over promised seconds per training iteration in the epoch (> 1: slower than promised).
        projected_seconds: the fold's projected wall time with ``run_length``, end-of-fold validation included.
        reason: one line for the log: why and how the schedule changed; empty when it did not.
    """

    run_length: RunLength
    speed: float
    projected_seconds: float
    reason: str

    @property
    def changed(self) -> bool:
        return bool(self.reason)


@dataclass(frozen=True)
class _Projection:
    """The fold's projected end for a run length, from an epoch under way (``epoch``, ``done`` iterations trained;
    ``done`` = 0 for an epoch not started) at measured costs.

    Attributes:
        epoch, done: the epoch projected from and its iterations already trained.
        per_iteration: seconds per training iteration in ``epoch``'s stage; later stages weighted by ``weights``.
        per_batch: seconds per validation batch in ``epoch``'s stage.
        weights: for each epoch after ``epoch``, its stage's promised cost per iteration over ``epoch``'s.
        fixed: seconds that do not depend on the run length: the fold so far, the epochs' overheads still to come,
            the end-of-fold validation.
    """

    epoch: int
    done: int
    per_iteration: float
    per_batch: float
    weights: tuple[float, ...]
    fixed: float

    @classmethod
    def measure(
        cls,
        promise: TimePromise,
        run_length: RunLength,
        epoch: int,
        done: int,
        costs: tuple[float, float, float],
        elapsed_seconds: float,
        final_validation: bool,
    ) -> _Projection:
        """From ``costs`` (seconds per iteration, per validation batch, overhead per epoch, all in ``epoch``'s stage
        at the measured speed): the overhead counts for ``epoch`` and every later one; the final validation at the
        promise times the speed (measured over promised seconds per iteration)."""
        per_iteration, per_batch, overhead = costs
        stage = promised_seconds(promise, run_length.stage_at(epoch))
        weights = tuple(
            promised_seconds(promise, run_length.stage_at(e)) / stage for e in range(epoch + 1, run_length.epochs)
        )
        fixed = elapsed_seconds + (len(weights) + 1) * overhead
        fixed += promise.final_validation_seconds * per_iteration / stage if final_validation else 0.0
        return cls(epoch, done, per_iteration, per_batch, weights, fixed)

    def seconds(self, length: RunLength) -> float:
        """The fold's projected wall time with ``length``, end-of-fold validation included."""
        e = self.epoch
        rest = max(0, length.iterations_at(e) - self.done) * self.per_iteration
        rest += length.val_iterations_at(e) * self.per_batch
        for later, weight in enumerate(self.weights, start=e + 1):
            rest += weight * (
                length.iterations_at(later) * self.per_iteration + length.val_iterations_at(later) * self.per_batch
            )
        return self.fixed + rest

    def iterations(self, share: float, budget_seconds: float, cap: int) -> tuple[int, int]:
        """(iterations of ``epoch``, iterations of each later epoch) that end the fold at ``budget_seconds``, every
        epoch with ``share`` validation batches per iteration: ``epoch`` and the later ones alike, ``epoch`` at least
        ``done`` (it stops at once when fewer would do; the later ones share what is left); 1 to ``cap`` each."""
        unit = self.per_iteration + share * self.per_batch  # an iteration and its share of validation
        spare = budget_seconds - self.fixed
        # n iterations in this epoch and each later one: (n - done) p + n share b + n sum(w) unit = spare
        n = round_half_up((spare + self.done * self.per_iteration) / ((1 + sum(self.weights)) * unit))
        if self.done and n <= self.done:
            if not self.weights:
                return self.done, self.done
            n = round_half_up((spare - self.done * share * self.per_batch) / (sum(self.weights) * unit))
        n = min(cap, max(1, n))
        return max(self.done, n), n


def promised_seconds(promise: TimePromise, stage: int) -> float:
    """The promise's seconds per training iteration in ``stage`` (a hand-edited estimate of 0 s must not divide by
    zero)."""
    return max(promise.iteration_seconds(stage), 1e-9)


def _batches(share: float, iterations: int) -> int:
    """Validation batches for ``iterations`` at ``share`` batches per iteration: at least 1 when there are any."""
    return max(1, round_half_up(share * iterations)) if share > 0 else 0


def _limit(iterations: int, cap: int, end: float, budget_seconds: float) -> str:
    """What a re-plan could not do, for its reason: end on time at 1 iteration per epoch, or use the budget at
    ``cap``; empty when neither applies."""
    if iterations == 1 and end > budget_seconds * (1 + REPLAN_TOLERANCE):
        return f"; cannot end on time: even 1 iteration per epoch ends about {(end - budget_seconds) / 60:.1f} min late"
    if iterations == cap and end < budget_seconds * (1 - REPLAN_TOLERANCE):
        return (
            f"; at most {MAX_GROWTH:g}x the planned iterations per epoch: ends about "
            f"{(budget_seconds - end) / 60:.1f} min early"
        )
    return ""


def replan(
    promise: TimePromise,
    run_length: RunLength,
    measured: EpochTime,
    elapsed_seconds: float,
    budget_seconds: float,
    *,
    final_validation: bool = True,
) -> Replan:
    """Re-lay the epochs after ``measured.epoch`` so the fold ends at ``budget_seconds`` (see the module doc).

    Args:
        promise: the plan's time promise (per-stage seconds per iteration, validation batch, final validation).
        run_length: the run length the epoch trained under.
        measured: the epoch just finished.
        elapsed_seconds: the fold's training time so far, this epoch included.
        budget_seconds: the compute budget of the fold (minutes x 60).
        final_validation: the end-of-fold validation follows training and counts towards the budget.

    Returns:
        :class:`Replan`: every remaining epoch trains ``n`` iterations (1 to :data:`MAX_GROWTH` times the run's
        starting iterations per epoch) and validates ``n`` times the starting share of validation batches (at least
        1 when it validated at all), ``n`` chosen so the projection meets the budget; unchanged when the current
        schedule's projection is within :data:`REPLAN_TOLERANCE` of it, or no epoch remains.
    """
    stage = measured.stage
    per_iteration = measured.training_seconds / max(1, measured.iterations)
    speed = per_iteration / promised_seconds(promise, stage)
    per_batch = (
        measured.validation_seconds / measured.val_iterations
        if measured.val_iterations
        else promise.validation_batch_seconds * speed
    )
    first = measured.epoch + 1
    if first >= run_length.epochs:  # nothing left to re-plan but the end-of-fold validation
        final = promise.final_validation_seconds * speed if final_validation else 0.0
        return Replan(run_length, speed, elapsed_seconds + final, "")
    # the next epoch, not started, at this epoch's costs weighted by its stage
    weight = promised_seconds(promise, run_length.stage_at(first)) / promised_seconds(promise, stage)
    costs = (per_iteration * weight, per_batch * weight, measured.overhead_seconds)
    projection = _Projection.measure(promise, run_length, first, 0, costs, elapsed_seconds, final_validation)
    current = projection.seconds(run_length)
    if abs(current - budget_seconds) <= REPLAN_TOLERANCE * budget_seconds:
        return Replan(run_length, speed, current, "")
    share = run_length.val_iterations / run_length.iterations_per_epoch
    cap = max(1, math.floor(MAX_GROWTH * run_length.iterations_per_epoch))
    iterations, _ = projection.iterations(share, budget_seconds, cap)
    before = (run_length.iterations_at(first), run_length.val_iterations_at(first))
    if (iterations, _batches(share, iterations)) == before:
        return Replan(run_length, speed, current, "")
    new = run_length.rescheduled(first, iterations, _batches(share, iterations))
    end = projection.seconds(new)
    batches = _batches(share, iterations)
    validation = f" ({batches} instead of {before[1]} validation batches)" if batches != before[1] else ""
    reason = (
        f"deadline: re-planned after epoch {measured.epoch + 1} of {run_length.epochs} "
        f"({elapsed_seconds / 60:.1f} of {_minutes(budget_seconds)} min used): iterations took "
        f"{per_iteration:.2f} s, {speed:.2f}x the promised {promised_seconds(promise, stage):.2f} s; the schedule "
        f"would end at {current / 60:.1f} min, so the remaining {run_length.epochs - first} epoch(s) train "
        f"{iterations} instead of {before[0]} iterations{validation}, ending at {end / 60:.1f} min"
        f"{_limit(iterations, cap, end, budget_seconds)}"
    )
    return Replan(new, speed, end, reason)


def replan_within_epoch(
    promise: TimePromise,
    run_length: RunLength,
    epoch: int,
    done: int,
    per_iteration: float,
    elapsed_seconds: float,
    budget_seconds: float,
    *,
    final_validation: bool = True,
) -> Replan:
    """Re-lay the epoch under way and the ones after it when the fold would end late or early (see the module doc).

    Args:
        promise: the plan's time promise.
        run_length: the run length the epoch is training under.
        epoch: the epoch under way (0-based).
        done: its training iterations so far (at least 1).
        per_iteration: seconds per training iteration measured over the last stretch of this epoch.
        elapsed_seconds: the fold's time so far, this epoch's part included.
        budget_seconds: the compute budget of the fold.
        final_validation: the end-of-fold validation follows training and counts towards the budget.

    Returns:
        :class:`Replan`. Everything still to come is projected at the measured speed (over the promise's, for this
        epoch's stage): the epoch's remaining iterations, its validation batches, the later epochs (each stage at its
        promised cost ratio), a promised epoch overhead for this epoch and each later one, the end-of-fold
        validation. When that misses the budget by more than :data:`REPLAN_TOLERANCE`, this epoch and the later
        ones train ``n`` iterations each (1 to :data:`MAX_GROWTH` times the run's starting iterations per epoch;
        this one at least ``done``: it stops at once when ``n`` is smaller, and the later ones share what is left)
        with validation batches in the starting proportion, ``n`` chosen to meet the budget; else the run length is
        returned unchanged.
    """
    promised = promised_seconds(promise, run_length.stage_at(epoch))
    speed = per_iteration / promised
    costs = (per_iteration, promise.validation_batch_seconds * speed, promise.overhead_seconds * speed)
    projection = _Projection.measure(promise, run_length, epoch, done, costs, elapsed_seconds, final_validation)
    current = projection.seconds(run_length)
    if abs(current - budget_seconds) <= REPLAN_TOLERANCE * budget_seconds:
        return Replan(run_length, speed, current, "")
    share = run_length.val_iterations / run_length.iterations_per_epoch
    cap = max(1, math.floor(MAX_GROWTH * run_length.iterations_per_epoch))
    this, later = projection.iterations(share, budget_seconds, cap)
    new = run_length.rescheduled(epoch, this, _batches(share, this))
    if projection.weights:
        new = new.rescheduled(epoch + 1, later, _batches(share, later))
    if new.reschedules == run_length.reschedules:
        return Replan(run_length, speed, current, "")
    end = projection.seconds(new)
    planned_now = run_length.iterations_at(epoch)
    later_text = f", the remaining {len(projection.weights)} epoch(s) {later}," if projection.weights else ""
    reason = (
        f"deadline: re-planned during epoch {epoch + 1} of {run_length.epochs}, after {done} of its "
        f"{planned_now} iterations ({elapsed_seconds / 60:.1f} of {_minutes(budget_seconds)} min used): iterations "
        f"took {per_iteration:.2f} s, {speed:.2f}x the promised {promised:.2f} s; the schedule would end at "
        f"{current / 60:.1f} min, so this epoch trains {this}{later_text} instead of {planned_now} iterations, "
        f"ending at {end / 60:.1f} min{_limit(later if projection.weights else this, cap, end, budget_seconds)}"
    )
    return Replan(new, speed, end, reason)


@dataclass(frozen=True)
class _Watch:
    """The deadline's watch over the epoch under way: the clock reading, training seconds and iterations at its last
    check (the epoch's start before the first)."""

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
        watch = self._watch
        if watch is None or watch.epoch != epoch:
            watch = self._watch = _Watch(epoch, timing["started"])
        since, in_epoch, training = _agreed(
            now - watch.clock, now - (timing["started"] if self._mark is None else self._mark), timing["training"]
        )
        last_epoch_ends = epoch == loop.run_length.epochs - 1 and done >= loop.run_length.iterations_at(epoch)
        if since < CHECK_SECONDS and not last_epoch_ends:
            return []
        per_iteration = max(training - watch.training_seconds, 0.0) / max(1, done - watch.iterations)
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
            final_validation=self.final_validation,
        )
        return self._adopt(loop, decision, epoch, {"during_epoch": epoch + 1, "after_iteration": done}, elapsed)

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
            f"deadline: the fold took {fold / 60:.1f} min of its {_minutes(self.budget_seconds)}-minute budget "
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
        return f"deadline: {_minutes(self.budget_seconds)} min for the fold, end-of-fold validation included; {how}"

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


def _minutes(seconds: float) -> str:
    """``900`` -> ``"15"``, ``1107.4`` -> ``"18.46"``: a budget in minutes as the user would write it."""
    return f"{round(seconds / 60, 2):g}"
