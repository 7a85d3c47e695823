"""Re-laying a budgeted run's remaining schedule so the fold ends on time: the arithmetic of the deadline
(:mod:`autoseg.train.deadline`, which measures and decides when).

The shape of the schedule is kept. Only the training iterations of the remaining epochs change, and their
validation batches in the same proportion; the epochs, the stage starts (zoom-in, zoom-out), the learning-rate
schedule (poly decay and cosine warm restarts are functions of the epoch) and the snapshot epochs are counted in
epochs and stay where the plan put them (:meth:`autoseg.train.run_length.RunLength.rescheduled`). nnU-Net's
wall-time trainer (``tools/nnunet_budget_trainer.py``) re-plans the number of epochs instead, which stretches or
squeezes the learning-rate schedule it has already followed part of.

After an epoch (:func:`replan`): the epoch's measured seconds per training iteration, per validation batch, and
outside both (loader start, checkpoints, plot) carry over to every remaining epoch, each stage's iterations weighted
by the promise's ratio of stage costs (zoom-out patches cost more); the end-of-fold validation is the promise's
times the measured speed (measured over promised seconds per training iteration). The schedule is re-laid only when
it would miss the budget by more than :data:`REPLAN_TOLERANCE`, and then aims at the budget itself: fewer iterations
per epoch when the machine got slower, more when it got faster (up to :data:`MAX_GROWTH` times the planned ones).

Within an epoch (:func:`replan_within_epoch`): a competing job that makes every iteration 7 times slower turns an
epoch planned for 1 minute into 7, so the epoch under way is re-laid too, at the speed of the stretch since the last
check, with the later epochs, all to the same iterations per epoch (the epoch under way stops at once when it has
already trained more). That it also lengthens matters when the competing job stops during the last epochs: what a
slow stretch took away is given back while there is time to use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoseg.train.run_length import RunLength, round_half_up
from autoseg.train.time_promise import TimePromise

#: A re-plan gives an epoch at most this many times the iterations it started with (a much faster machine than
#: probed is more likely a stale probe than a lasting gift; the next plan corrects it, ``autoseg.plan.probe``).
MAX_GROWTH = 4.0
#: The schedule is re-laid when the projected end of the fold misses the budget by more than this share of it.
REPLAN_TOLERANCE = 0.02
#: Within an epoch, the share it must miss by: a stretch of 30 s measures the speed less well than a whole epoch, and
#: the re-plan at the epoch's end corrects a smaller miss with the epoch's own measurements.
WITHIN_EPOCH_TOLERANCE = 0.05


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


def _share_and_cap(run_length: RunLength) -> tuple[float, int]:
    """The run's starting validation batches per training iteration, and the most iterations a re-plan gives an
    epoch (:data:`MAX_GROWTH` times the starting ones, at least 1)."""
    share = run_length.val_iterations / run_length.iterations_per_epoch
    return share, max(1, math.floor(MAX_GROWTH * run_length.iterations_per_epoch))


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
    share, cap = _share_and_cap(run_length)
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
        f"({elapsed_seconds / 60:.1f} of {minutes_text(budget_seconds)} min used): iterations took "
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
    measured: tuple[float, float] | None = None,
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
        measured: (seconds per validation batch, seconds of overhead per epoch) as measured in the last epoch, the
            batches scaled to this stretch's speed; None: the promise's, at this stretch's speed.
        final_validation: the end-of-fold validation follows training and counts towards the budget.

    Returns:
        :class:`Replan`. Everything still to come is projected at the measured speed (over the promise's, for this
        epoch's stage): the epoch's remaining iterations, its validation batches, the later epochs (each stage at its
        promised cost ratio), an epoch's overhead for this epoch and each later one, the end-of-fold validation.
        When that misses the budget by more than :data:`WITHIN_EPOCH_TOLERANCE`, this epoch and the later
        ones train ``n`` iterations each (1 to :data:`MAX_GROWTH` times the run's starting iterations per epoch;
        this one at least ``done``: it stops at once when ``n`` is smaller, and the later ones share what is left)
        with validation batches in the starting proportion, ``n`` chosen to meet the budget; else the run length is
        returned unchanged.
    """
    promised = promised_seconds(promise, run_length.stage_at(epoch))
    speed = per_iteration / promised
    per_batch, overhead = measured or (promise.validation_batch_seconds * speed, promise.overhead_seconds * speed)
    costs = (per_iteration, per_batch, overhead)
    projection = _Projection.measure(promise, run_length, epoch, done, costs, elapsed_seconds, final_validation)
    current = projection.seconds(run_length)
    if abs(current - budget_seconds) <= WITHIN_EPOCH_TOLERANCE * budget_seconds:
        return Replan(run_length, speed, current, "")
    share, cap = _share_and_cap(run_length)
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
        f"{planned_now} iterations ({elapsed_seconds / 60:.1f} of {minutes_text(budget_seconds)} min used): iterations "
        f"took {per_iteration:.2f} s, {speed:.2f}x the promised {promised:.2f} s; the schedule would end at "
        f"{current / 60:.1f} min, so this epoch trains {this}{later_text} instead of {planned_now} iterations, "
        f"ending at {end / 60:.1f} min{_limit(later if projection.weights else this, cap, end, budget_seconds)}"
    )
    return Replan(new, speed, end, reason)


def minutes_text(seconds: float) -> str:
    """``900`` -> ``"15"``, ``1107.4`` -> ``"18.46"``: a budget in minutes as the user would write it."""
    return f"{round(seconds / 60, 2):g}"
