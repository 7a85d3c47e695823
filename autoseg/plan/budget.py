"""Fitting a plan to the time a user has: which candidate configuration, how many iterations, laid out how.

A planner lists candidate configurations as a *ladder*, cheapest first, each at least as rich as the one before
in every respect (resolution, network width and depth, patch, batch), and gives a function that estimates the
wall time of one fold of a candidate trained for ``n`` iterations (``autoseg.plan.cost_model``). :func:`choose_rung` then
picks:

- the richest candidate that still trains :func:`target_iterations` (``B``) iterations within the budget ``B``:
  enough steps to converge come first (about 1,000 at 15 minutes, growing with the square root of the budget),
  what is left buys resolution, width and patch;
- the iterations: as many as fit the budget (up to the planner's own schedule), so the plan uses the whole budget
  (a user who gives 15 minutes expects a model trained for about 15) and the training's deadline
  (``autoseg.train.deadline``) absorbs the estimate's error in either direction. A larger budget never gives a
  smaller network or patch; just above the budget at which a richer candidate becomes affordable it trains fewer
  iterations of that richer candidate than the budget below gave the cheaper one;
- when even the cheapest candidate cannot reach the target, the cheapest with the iterations that fit, and an
  error below :data:`MIN_ITERATIONS`.

:func:`lay_out_schedule` splits the iterations into epochs (about a minute each, at least :data:`MIN_EPOCHS`, all
but fewer than one iteration per epoch of them used) so every stage, learning-rate cycle, snapshot and validation of
the schedule lies inside the budget: a short budget is a complete short run, not the start of a long one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autoseg.errors import AutosegError
from autoseg.plan.cost_model import TrainingEstimate
from autoseg.plan.probe import ComputeProbe

__all__ = [
    "MIN_EPOCHS",
    "MIN_ITERATIONS",
    "BudgetError",
    "BudgetRequest",
    "RungChoice",
    "ScheduleLayout",
    "choose_rung",
    "lay_out_schedule",
    "target_iterations",
]

#: Iterations a run should have before resolution, width or patch grow: this many at REFERENCE_MINUTES...
REFERENCE_ITERATIONS = 2000
REFERENCE_MINUTES = 15.0
#: ...and growing with this power of the budget (square root: twice the iterations for four times the time).
ITERATION_EXPONENT = 0.5
#: Fewer iterations than this do not make a model; the budget is refused.
MIN_ITERATIONS = 100
#: Epochs are laid out to take about this long (log lines, progress plot, checkpoints about once a minute)...
EPOCH_TARGET_SECONDS = 60.0
#: ...with at least this many epochs (a zoom-out stage of 1/8 of the epochs needs 8) and at most this many
#: iterations per epoch (nnU-Net's 250).
MIN_EPOCHS = 8
MAX_ITERATIONS_PER_EPOCH = 250
MIN_ITERATIONS_PER_EPOCH = 10
#: Per-epoch validation batches (pseudo-Dice) as a share of the training iterations per epoch.
VALIDATION_SHARE = 0.1
#: One cosine learning-rate cycle per this many iterations (at least one, at most 20 per stage).
ITERATIONS_PER_CYCLE = 12_500


class BudgetError(AutosegError, ValueError):
    """The budget cannot buy a useful run; the message says how much would."""


def target_iterations(minutes: float) -> int:
    """Iterations a budget of ``minutes`` should train before anything else grows (see the module doc)."""
    return int(round(REFERENCE_ITERATIONS * (minutes / REFERENCE_MINUTES) ** ITERATION_EXPONENT))


@dataclass(frozen=True)
class ScheduleLayout:
    """Epochs of a budgeted run: ``epochs x iterations_per_epoch`` training iterations, ``val_iterations`` batches
    of validation per epoch, ``cycles`` cosine learning-rate cycles in the first stage."""

    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    cycles: int

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


def lay_out_schedule(iterations: int, seconds_per_iteration: float) -> ScheduleLayout:
    """Split ``iterations`` into epochs of about :data:`EPOCH_TARGET_SECONDS` (10–250 iterations each), at least
    :data:`MIN_EPOCHS` of them; every epoch trains ``iterations // epochs``, so fewer than one iteration per epoch
    is left out (never more than asked)."""
    per_epoch = round(EPOCH_TARGET_SECONDS / max(seconds_per_iteration, 1e-6))
    per_epoch = max(MIN_ITERATIONS_PER_EPOCH, min(MAX_ITERATIONS_PER_EPOCH, per_epoch))
    epochs = max(MIN_EPOCHS, round(iterations / per_epoch), math.ceil(iterations / MAX_ITERATIONS_PER_EPOCH))
    epochs = max(1, min(epochs, iterations))
    per_epoch = max(1, iterations // epochs)
    cycles = max(1, min(20, round(iterations / ITERATIONS_PER_CYCLE)))
    return ScheduleLayout(epochs, per_epoch, max(1, round(VALIDATION_SHARE * per_epoch)), cycles)


@dataclass(frozen=True)
class RungChoice:
    """What :func:`choose_rung` decided.

    Attributes:
        index: the chosen rung of the ladder.
        layout: its schedule.
        estimate: its estimated wall time.
        target: :func:`target_iterations` of the budget.
        next_index: the next richer rung, if any, and ``next_iterations``: the iterations it would get in the
            budget (fewer than ``target``, which is why it was not chosen).
    """

    index: int
    layout: ScheduleLayout
    estimate: TrainingEstimate
    target: int
    next_index: int | None
    next_iterations: int | None


Estimator = Callable[[int, ScheduleLayout], TrainingEstimate]


def _layout_for(estimator: Estimator, rung: int, iterations: int) -> tuple[ScheduleLayout, TrainingEstimate]:
    probe = estimator(rung, lay_out_schedule(max(iterations, MIN_EPOCHS), 1.0))
    layout = lay_out_schedule(iterations, probe.seconds_per_iteration)
    return layout, estimator(rung, layout)


def _fill(estimator: Estimator, rung: int, seconds: float, cap: int) -> int:
    """Most iterations (<= cap) of ``rung`` whose estimate fits ``seconds``; 0 if none."""
    low, high = 0, cap
    while low < high:
        middle = (low + high + 1) // 2
        if _layout_for(estimator, rung, middle)[1].total_seconds <= seconds:
            low = middle
        else:
            high = middle - 1
    return low


def _affordable(estimator: Estimator, rung: int, minutes: float) -> bool:
    return _layout_for(estimator, rung, target_iterations(minutes))[1].total_seconds <= 60 * minutes


def choose_rung(num_rungs: int, estimator: Estimator, minutes: float, max_iterations: int) -> RungChoice:
    """Choose rung and iterations for a budget of ``minutes`` (see the module doc).

    Args:
        num_rungs: length of the ladder (rungs 0..n-1, cheapest first).
        estimator: ``(rung, layout) -> TrainingEstimate``.
        minutes: the budget for one fold.
        max_iterations: the planner's own schedule length: no rung trains more.

    Raises:
        BudgetError: not even :data:`MIN_ITERATIONS` of the cheapest rung fit; the message says what would.
    """
    seconds, target = 60 * minutes, target_iterations(minutes)
    affordable = [rung for rung in range(num_rungs) if _affordable(estimator, rung, minutes)]
    if not affordable:
        iterations = _fill(estimator, 0, seconds, min(target, max_iterations))
        if iterations < MIN_ITERATIONS:
            needed = _layout_for(estimator, 0, MIN_ITERATIONS)[1].total_minutes
            raise BudgetError(
                f"a budget of {minutes:g} minutes is too small: the cheapest plan needs about "
                f"{needed:.1f} minutes for {MIN_ITERATIONS} iterations and its validation on this machine"
            )
        layout, estimate = _layout_for(estimator, 0, iterations)
        return RungChoice(
            0,
            layout,
            estimate,
            target,
            1 if num_rungs > 1 else None,
            _fill(estimator, 1, seconds, target) if num_rungs > 1 else None,
        )
    chosen = max(affordable)
    next_index = chosen + 1 if chosen < num_rungs - 1 else None
    next_iterations = None if next_index is None else _fill(estimator, next_index, seconds, target)
    iterations = max(min(target, max_iterations), _fill(estimator, chosen, seconds, max_iterations))
    layout, estimate = _layout_for(estimator, chosen, iterations)
    return RungChoice(chosen, layout, estimate, target, next_index, next_iterations)


def describe_minutes(seconds: float) -> str:
    """``"12.3 min"`` or, from two hours, ``"2.5 h"``."""
    minutes = seconds / 60
    return f"{minutes / 60:.1f} h" if minutes >= 120 else f"{minutes:.1f} min"


def stage_shares(starts: Sequence[int], epochs: int) -> list[float]:
    """Share of ``epochs`` each stage trains, from the stages' start epochs."""
    ends = [*starts[1:], epochs]
    return [max(0, end - start) / epochs for start, end in zip(starts, ends)]


@dataclass(frozen=True)
class BudgetRequest:
    """A user's compute budget and the probe of the machine it will be spent on.

    Attributes:
        minutes: wall time for training one fold, its end-of-fold validation included.
        device: ``cpu`` or ``cuda``.
        precision: the precision training will use there (``autoseg.machine.choose_precision``).
        probe: this machine's timings (``autoseg.plan.probe.load_or_run_probe``).
        probe_cached: whether the probe came from the cache.
    """

    minutes: float
    device: str
    precision: str
    probe: ComputeProbe
    probe_cached: bool = False

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise BudgetError(f"the budget must be a positive number of minutes, got {self.minutes}")
