"""The compute budget as a deadline: re-planning the rest of a run after every epoch so the fold ends on time.

Nothing here is timed: a simulated machine (a clock the test advances by the seconds each iteration, validation
batch and epoch would take, slowed down or sped up over the run) drives the :class:`Deadline` exactly as the training
loop does, and the fold's length is read from that clock, independently of the deadline's own accounting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.io.files import read_json
from autoseg.train import deadline as deadline_module
from autoseg.train.deadline import Deadline
from autoseg.train.replan import MAX_GROWTH, REPLAN_TOLERANCE, EpochTime, replan, replan_within_epoch
from autoseg.train.run_length import RunLength
from autoseg.train.time_promise import TimePromise

#: A zoom-in&out plan in miniature: 16 epochs of 50 iterations (1 s each in zoom-in, 2.5 s in zoom-out from epoch 14),
#: 5 validation batches of 0.5 s, 2 s per epoch besides, 30 s of end-of-fold validation: 1052 s promised.
PLANNED = RunLength(epochs=16, iterations_per_epoch=50, val_iterations=5, stage_starts=(0, 14), restart_period_epochs=7)
PROMISE = TimePromise(
    network_seconds=(14 * 1.0 + 2 * 2.5) / 16,
    loader_seconds=0.0,
    validation_batch_seconds=0.5,
    overhead_seconds=2.0,
    final_validation_seconds=30.0,
    epochs=16,
    iterations_per_epoch=50,
    val_iterations=5,
    stage_seconds_per_iteration=(1.0, 2.5),
)
PROMISED_SECONDS = 14 * (50 * 1.0 + 5 * 0.5 + 2) + 2 * (50 * 2.5 + 5 * 0.5 + 2) + 30


class SimulatedLoop:
    """What the deadline sees of the training loop, on a machine whose speed is ``slowdown(t)`` times the promise's
    at simulated time ``t`` (seconds since the fold began). Like the trainer's loop, it tells the deadline after
    every training iteration and reads the epoch's iterations anew each time (a check may shorten the epoch)."""

    def __init__(
        self,
        run_length: RunLength,
        slowdown: Callable[[float], float],
        now: float = 0.0,
        promise: TimePromise = PROMISE,
    ) -> None:
        self.run_length = run_length
        self.slowdown = slowdown
        self.now = now
        self.promise = promise
        self.timing: dict[str, float] = {}

    def clock(self) -> float:
        return self.now

    def spend(self, seconds: float) -> float:
        """Advance the clock by ``seconds`` of promised work at the current speed; the seconds it took."""
        taken = seconds * self.slowdown(self.now)
        self.now += taken
        return taken

    def run_epoch(self, epoch: int, deadline: Deadline) -> list[str]:
        promise, stage = self.promise, self.run_length.stage_at(epoch)
        self.timing = {"started": self.now, "training": 0.0, "iterations": 0, "validation": 0.0, "val_iterations": 0}
        self.spend(promise.overhead_seconds)  # loader start, checkpoint, plot
        lines = []
        while self.timing["iterations"] < self.run_length.iterations_at(epoch):
            self.timing["training"] += self.spend(promise.stage_seconds_per_iteration[stage])
            self.timing["iterations"] += 1
            lines += deadline.iteration_completed(self, epoch, int(self.timing["iterations"]))
        for _ in range(self.run_length.val_iterations_at(epoch)):
            ratio = promise.stage_seconds_per_iteration[stage] / promise.stage_seconds_per_iteration[0]
            self.timing["validation"] += self.spend(promise.validation_batch_seconds * ratio)
            self.timing["val_iterations"] += 1
        return lines + deadline.epoch_completed(self, epoch, math.nan)


def make_deadline(budget_minutes: float, path: Path | None = None, **kwargs) -> Deadline:
    return Deadline(PROMISE, budget_minutes, PLANNED, ("zoom_in", "zoom_out"), path=path, **kwargs)


def run_fold(
    budget_minutes: float, slowdown: Callable[[float], float], path: Path | None = None
) -> tuple[SimulatedLoop, Deadline, list[str]]:
    """A whole fold on the simulated machine: every epoch, then the end-of-fold validation."""
    loop, deadline = SimulatedLoop(PLANNED, slowdown), make_deadline(budget_minutes, path)
    lines = []
    for epoch in range(loop.run_length.epochs):
        lines += loop.run_epoch(epoch, deadline)
    deadline.training_finished(loop)
    lines.append(deadline.fold_finished(loop.spend(PROMISE.final_validation_seconds)))
    return loop, deadline, lines


def busy_in_middle_third(budget_seconds: float, factor: float = 1.8) -> Callable[[float], float]:
    """A competing CPU-bound process from a third of the budget to two thirds: everything ``factor`` times slower."""
    return lambda t: factor if budget_seconds / 3 <= t < 2 * budget_seconds / 3 else 1.0


def check_shape_is_kept(run_length: RunLength) -> None:
    """Epochs, stage starts, warm-restart period and snapshot epochs as planned; validation in proportion."""
    assert (run_length.epochs, run_length.stage_starts, run_length.restart_period_epochs) == (16, (0, 14), 7)
    assert run_length.snapshot_epochs((1 / 3, 2 / 3, 1.0)) == PLANNED.snapshot_epochs((1 / 3, 2 / 3, 1.0))
    for epoch in range(16):
        iterations, batches = run_length.iterations_at(epoch), run_length.val_iterations_at(epoch)
        assert iterations >= 1 and batches == max(1, round(iterations / 10 + 1e-9)), (epoch, iterations, batches)


# ---------------------------------------------------------------------------- the run length re-planned
def test_a_rescheduled_run_length_changes_only_the_epochs_from_the_re_plan_on() -> None:
    once = PLANNED.rescheduled(4, 30, 3)
    twice = once.rescheduled(9, 70, 7)
    assert [twice.iterations_at(e) for e in range(16)] == [50] * 4 + [30] * 5 + [70] * 7
    assert [twice.val_iterations_at(e) for e in range(16)] == [5] * 4 + [3] * 5 + [7] * 7
    assert twice.total_iterations == 4 * 50 + 5 * 30 + 7 * 70
    assert twice.rescheduled(6, 40, 4).reschedules == ((4, 30, 3), (6, 40, 4)), "a re-plan replaces the later tail"
    assert RunLength.from_plain(twice.to_plain()) == twice
    old = {k: v for k, v in PLANNED.to_plain().items() if k != "reschedules"}  # a checkpoint from before re-plans
    assert RunLength.from_plain(old) == PLANNED
    for first, iterations, batches in ((16, 10, 1), (-1, 10, 1), (3, 0, 1), (3, 10, -1)):
        with pytest.raises(ValueError, match="cannot re-plan"):
            PLANNED.rescheduled(first, iterations, batches)


# ---------------------------------------------------------------------------- one re-plan, by hand
def test_a_re_plan_solves_for_the_iterations_that_end_the_fold_at_the_budget() -> None:
    # Epoch 4 (0-based 3) of zoom-in took 1.5 s per iteration, 0.6 s per validation batch, 3 s besides.
    measured = EpochTime(epoch=3, stage=0, iterations=50, val_iterations=5, seconds=81.0, training_seconds=75.0,
                         validation_seconds=3.0)  # fmt: skip
    elapsed, budget = 300.0, 1200.0
    decision = replan(PROMISE, PLANNED, measured, elapsed, budget)
    # By hand: 10 zoom-in and 2 zoom-out epochs remain (weights 1 and 2.5); per iteration 1.5 s plus a tenth of a
    # 0.6 s batch; 3 s besides each; final validation 30 s x 1.5 (the measured speed).
    unit = (10 * 1 + 2 * 2.5) * (1.5 + 0.1 * 0.6)
    wanted = (budget - elapsed - 12 * 3.0 - 45.0) / unit
    assert decision.speed == pytest.approx(1.5)
    assert decision.run_length.iterations_at(4) == round(wanted) == 35
    assert decision.run_length.val_iterations_at(4) == 4 and decision.run_length.iterations_at(3) == 50
    projected = elapsed + 12 * 3.0 + 45.0 + (10 + 2 * 2.5) * (35 * 1.5 + 4 * 0.6)
    assert decision.projected_seconds == pytest.approx(projected)
    assert decision.reason.startswith("deadline: re-planned after epoch 4 of 16 (5.0 of 20 min used)")
    assert "1.50x the promised 1.00 s" in decision.reason and "train 35 instead of 50 iterations" in decision.reason
    # a schedule projected to end within the tolerance of the budget is left as it is
    as_planned = elapsed + 12 * 3.0 + 45.0 + (10 + 2 * 2.5) * (50 * 1.5 + 5 * 0.6)
    for budget in (as_planned, as_planned * (1 + 0.9 * REPLAN_TOLERANCE), as_planned * (1 - 0.9 * REPLAN_TOLERANCE)):
        on_time = replan(PROMISE, PLANNED, measured, elapsed, budget)
        assert not on_time.changed and on_time.run_length is PLANNED
        assert on_time.projected_seconds == pytest.approx(as_planned)
    assert replan(PROMISE, PLANNED, measured, elapsed, as_planned * (1 + 1.1 * REPLAN_TOLERANCE)).changed


def test_a_re_plan_names_what_it_cannot_do() -> None:
    measured = EpochTime(epoch=1, stage=0, iterations=50, val_iterations=5, seconds=500.0, training_seconds=480.0,
                         validation_seconds=10.0)  # fmt: skip
    late = replan(PROMISE, PLANNED, measured, 1000.0, 1200.0)
    assert late.run_length.iterations_at(2) == 1 and "cannot end on time" in late.reason
    measured = EpochTime(epoch=1, stage=0, iterations=50, val_iterations=5, seconds=8.0, training_seconds=5.0,
                         validation_seconds=0.5)  # fmt: skip
    early = replan(PROMISE, PLANNED, measured, 20.0, 1200.0)
    assert early.run_length.iterations_at(2) == MAX_GROWTH * 50 and "ends about" in early.reason
    last = EpochTime(epoch=15, stage=1, iterations=50, val_iterations=5, seconds=500.0, training_seconds=480.0,
                     validation_seconds=10.0)  # fmt: skip
    assert not replan(PROMISE, PLANNED, last, 2000.0, 1200.0).changed, "no epoch left to re-plan"


# ---------------------------------------------------------------------------- whole folds on a simulated machine
@pytest.mark.parametrize(
    ("case", "plan_share"),
    [("slowed in the middle third", 0.95), ("faster than probed", 0.95), ("as promised", 0.9), ("slower", 1.0)],
)
def test_the_fold_ends_within_ten_percent_of_the_budget_and_keeps_its_shape(
    case: str, plan_share: float, tmp_path: Path
) -> None:
    budget = PROMISED_SECONDS / plan_share
    slowdown = {
        "slowed in the middle third": busy_in_middle_third(budget),
        "faster than probed": lambda t: 0.6,
        "as promised": lambda t: 1.0,
        "slower": lambda t: 1.4,
    }[case]
    loop, deadline, lines = run_fold(budget / 60, slowdown, tmp_path / "deadline.json")
    assert abs(loop.now / budget - 1) <= 0.10, (case, loop.now / budget)
    assert abs(loop.now / budget - 1) <= 0.03, "in fact within a few percent"
    check_shape_is_kept(loop.run_length)
    planned_iterations = PLANNED.total_iterations
    ran = loop.run_length.total_iterations
    if case == "faster than probed":
        assert ran > 1.5 * planned_iterations
    elif case in ("slower", "slowed in the middle third"):
        assert ran < planned_iterations
    # zoom-out keeps about its planned share of the iterations (12.5%)
    zoom_out = sum(loop.run_length.iterations_at(e) for e in range(14, 16)) / ran
    assert abs(zoom_out - 0.125) < 0.05, zoom_out
    # every re-plan is logged with its reason, one line each, and recorded with what ran
    record = read_json(tmp_path / "deadline.json")
    assert [line for line in lines if line.startswith("deadline: re-planned")] == [
        r["reason"] for r in record["replans"]
    ]
    assert all("\n" not in r["reason"] for r in record["replans"])
    assert record["planned"] == {
        "epochs": 16,
        "iterations_per_epoch": 50,
        "val_iterations_per_epoch": 5,
        "iterations": 800,
        "stage_starts": [0, 14],
        "estimated_minutes": round(PROMISED_SECONDS / 60, 3),
    }
    assert record["ran"]["iterations"] == ran == sum(e["iterations"] for e in record["epochs"])
    assert record["ran"]["fold_minutes"] == pytest.approx(loop.now / 60, abs=1e-3)
    assert [e["iterations"] for e in record["epochs"]] == [loop.run_length.iterations_at(e) for e in range(16)]
    assert lines[-1].startswith(
        f"deadline: the fold took {loop.now / 60:.1f} min of its {round(budget / 60, 2):g}-minute budget"
    )
    if case == "as promised":
        assert len(record["replans"]) == 1, "the plan's 90% is stretched to the budget once, then left alone"


def test_a_busy_stretch_slows_the_epochs_it_covers_and_the_run_speed_is_its_fast_end() -> None:
    budget = PROMISED_SECONDS / 0.95
    loop, deadline, _ = run_fold(budget / 60, busy_in_middle_third(budget))
    speeds = [entry["speed"] for entry in deadline.epochs]
    assert min(speeds) == pytest.approx(1.0) and max(speeds) > 1.5, speeds
    assert deadline.run_speed() == pytest.approx(np.percentile(speeds, 25)) == pytest.approx(1.0, abs=0.05)


def test_a_continued_run_re_plans_exactly_as_the_uninterrupted_one() -> None:
    budget = PROMISED_SECONDS / 0.95
    slowdown = busy_in_middle_third(budget)
    whole, whole_deadline, _ = run_fold(budget / 60, slowdown)
    # The same fold killed after epoch 7: the checkpoint keeps the run length and the deadline's state...
    first, deadline = SimulatedLoop(PLANNED, slowdown), make_deadline(budget / 60)
    for epoch in range(7):
        first.run_epoch(epoch, deadline)
    saved_length, saved_state = first.run_length.to_plain(), deadline.state_dict()
    # ...from which a new process continues (its clock read where the old one stopped, as a simulated machine's does).
    again = SimulatedLoop(RunLength.from_plain(saved_length), slowdown, now=first.now)
    resumed = make_deadline(budget / 60)
    resumed.load_state_dict(saved_state)
    for epoch in range(7, 16):
        again.run_epoch(epoch, resumed)
    assert again.run_length == whole.run_length and again.run_length.reschedules
    assert resumed.replans == whole_deadline.replans and resumed.epochs == whole_deadline.epochs


def test_a_run_length_fixed_by_the_user_is_measured_not_re_planned() -> None:
    loop, deadline = SimulatedLoop(PLANNED, lambda t: 1.5), make_deadline(20.0, replanning="--epochs given")
    for epoch in range(16):
        assert loop.run_epoch(epoch, deadline) == []
    assert loop.run_length is PLANNED and not deadline.replans
    assert deadline.epochs[-1]["speed"] == pytest.approx(1.5)
    assert "not re-planned (--epochs given)" in deadline.describe()


# ---------------------------------------------------------------------------- checks within a long epoch
#: A plan of few long epochs: 4 epochs of 300 iterations (1 s each, 2 s in the last epoch's zoom-out stage), 30
#: validation batches of 0.5 s, 2 s besides, 60 s of end-of-fold validation: an epoch lasts about 5 minutes.
LONG = RunLength(epochs=4, iterations_per_epoch=300, val_iterations=30, stage_starts=(0, 3))
LONG_PROMISE = TimePromise(
    network_seconds=(3 * 1.0 + 2.0) / 4,
    loader_seconds=0.0,
    validation_batch_seconds=0.5,
    overhead_seconds=2.0,
    final_validation_seconds=60.0,
    epochs=4,
    iterations_per_epoch=300,
    val_iterations=30,
    stage_seconds_per_iteration=(1.0, 2.0),
)
LONG_SECONDS = 3 * (300 + 15 + 2) + (600 + 15 + 2) + 60


def run_long_fold(budget_seconds: float, slowdown: Callable[[float], float]) -> tuple[SimulatedLoop, Deadline]:
    loop = SimulatedLoop(LONG, slowdown, promise=LONG_PROMISE)
    deadline = Deadline(LONG_PROMISE, budget_seconds / 60, LONG, ("zoom_in", "zoom_out"))
    for epoch in range(LONG.epochs):
        loop.run_epoch(epoch, deadline)
    deadline.training_finished(loop)
    deadline.fold_finished(loop.spend(LONG_PROMISE.final_validation_seconds))
    return loop, deadline


def test_a_re_plan_within_an_epoch_re_lays_it_and_the_later_ones_by_hand() -> None:
    # Epoch 2 (0-based 1) has trained 100 of its 300 iterations; the last stretch ran at 3 s per iteration.
    elapsed, budget = 700.0, 2000.0
    decision = replan_within_epoch(LONG_PROMISE, LONG, 1, 100, 3.0, elapsed, budget)
    # By hand, at speed 3: overheads 3 x 2 s x 3, final validation 60 s x 3; per validation batch 1.5 s, a tenth of
    # one per iteration; the later epochs weigh 1 (zoom-in) and 2 (zoom-out). With n iterations in this epoch and
    # in each later one: (n - 100) x 3 + n x 0.1 x 1.5 + (1 + 2) x n x (3 + 0.1 x 1.5) = budget - fixed.
    fixed = elapsed + 3 * 2.0 * 3 + 60.0 * 3
    n = (budget - fixed + 100 * 3.0) / ((1 + 3) * (3.0 + 0.1 * 1.5))
    assert decision.speed == pytest.approx(3.0)
    assert round(n) == 111
    assert [decision.run_length.iterations_at(e) for e in range(4)] == [300, 111, 111, 111]
    assert [decision.run_length.val_iterations_at(e) for e in range(4)] == [30, 11, 11, 11]
    assert decision.reason.startswith("deadline: re-planned during epoch 2 of 4, after 100 of its 300 iterations")
    assert "this epoch trains 111, the remaining 2 epoch(s) 111, instead of 300 iterations" in decision.reason
    # With 1500 s, this epoch must stop at once (n < 100): the later epochs share what is left after its validation.
    stop = replan_within_epoch(LONG_PROMISE, LONG, 1, 100, 3.0, elapsed, 1500.0)
    later = (1500.0 - fixed - 10 * 1.5) / (3 * (3.0 + 0.1 * 1.5))
    assert round(later) == 62
    assert [stop.run_length.iterations_at(e) for e in range(4)] == [300, 100, 62, 62]
    assert "cannot end on time" not in stop.reason
    hopeless = replan_within_epoch(LONG_PROMISE, LONG, 1, 100, 6.0, 1100.0, 1500.0)
    assert hopeless.run_length.iterations_at(2) == 1 and "cannot end on time" in hopeless.reason
    # On time at the promised speed: 200 iterations and 30 batches left in this epoch, 315 s and 2 x 315 s for the
    # later ones, 3 overheads of 2 s and 60 s of final validation after 400 s: nothing changes.
    on_time = 400.0 + 200 + 15 + 315 + 2 * 315 + 3 * 2.0 + 60.0
    same = replan_within_epoch(LONG_PROMISE, LONG, 1, 100, 1.0, 400.0, on_time * (1 + 0.9 * REPLAN_TOLERANCE))
    assert not same.changed and same.run_length is LONG
    # Early (the machine got faster): the epochs grow, at most MAX_GROWTH times the planned iterations.
    early = replan_within_epoch(LONG_PROMISE, LONG, 1, 100, 1.0, 400.0, 1.5 * on_time)
    assert early.run_length.iterations_at(1) == early.run_length.iterations_at(3) > 300
    capped = replan_within_epoch(LONG_PROMISE, LONG, 1, 100, 0.1, 400.0, 1.5 * on_time)
    assert capped.run_length.iterations_at(2) == MAX_GROWTH * 300 and "at most 4x" in capped.reason


def test_a_long_epoch_slowed_seven_times_is_re_laid_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = LONG_SECONDS / 0.95
    seven_times = busy_in_middle_third(budget, factor=7.0)
    loop, deadline = run_long_fold(budget, seven_times)
    assert abs(loop.now / budget - 1) <= 0.10, loop.now / budget
    slowed = [r for r in deadline.replans if r["speed"] > 2]
    assert slowed and slowed[0].get("during_epoch") == 2, deadline.replans
    # it noticed within a check of the slowdown: at most CHECK_SECONDS (and an iteration) after a third of the budget
    assert 60 * slowed[0]["elapsed_minutes"] <= budget / 3 + deadline_module.CHECK_SECONDS + 7.0 + 1e-3
    # and gave the time back when the competing job stopped: the last epoch grew again
    assert loop.run_length.iterations_at(3) > 4 * loop.run_length.iterations_at(2)
    assert (loop.run_length.epochs, loop.run_length.stage_starts) == (4, (0, 3)), "the shape is kept"
    assert sum(e["iterations"] for e in deadline.epochs) == loop.run_length.total_iterations


def test_a_slowdown_in_the_last_epoch_ends_on_time_only_with_checks_within_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = LONG_SECONDS / 0.95
    from_three_quarters = lambda t: 7.0 if t >= 0.75 * budget else 1.0  # noqa: E731
    loop, deadline = run_long_fold(budget, from_three_quarters)
    assert abs(loop.now / budget - 1) <= 0.10, loop.now / budget
    assert any(r.get("during_epoch") == 4 and r["speed"] > 5 for r in deadline.replans), deadline.replans
    # Re-planned only at epoch ends, the same fold ends far too late: nothing is left to re-plan after the last one.
    monkeypatch.setattr(Deadline, "iteration_completed", lambda self, loop, epoch, done: [])
    late, _ = run_long_fold(budget, from_three_quarters)
    assert late.now / budget > 1.25, late.now / budget


# ---------------------------------------------------------------------------- two ranks, one decision
def _rank_runs_fold(rank: int, store: str, budget_seconds: float, result: str) -> None:
    """One rank of a 2-process group (gloo) running the long fold on its own clock: rank 1's machine is 10% slower
    than rank 0's throughout, and both are slowed seven times in the middle third."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        busy = busy_in_middle_third(budget_seconds, factor=7.0)
        loop, deadline = run_long_fold(budget_seconds, lambda t: busy(t) * (1.1 if rank else 1.0))
        torch.save({"run_length": loop.run_length.to_plain(), "replans": deadline.replans}, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_ranks_of_a_distributed_run_re_plan_alike(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    result = tmp_path / "rank"
    mp.spawn(_rank_runs_fold, args=(str(tmp_path / "store"), LONG_SECONDS / 0.95, str(result)), nprocs=2)
    ranks = [torch.load(f"{result}.{rank}", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["replans"] and ranks[0] == ranks[1], "every rank took the same decisions at the same iterations"
    # each rank alone, on its own clock, would have decided differently: the agreement is what made them equal
    alone = [run_long_fold(LONG_SECONDS / 0.95, lambda t, f=f: busy_in_middle_third(LONG_SECONDS / 0.95, 7.0)(t) * f)
             for f in (1.0, 1.1)]  # fmt: skip
    assert alone[0][0].run_length != alone[1][0].run_length


class SlowStartLoop(SimulatedLoop):
    """Each epoch's first batch waits ``wait`` seconds for the loader's workers to start."""

    wait = 20.0

    def spend(self, seconds: float) -> float:
        if (
            self.timing.get("iterations") == 0
            and self.timing.get("training") == 0.0
            and seconds != self.promise.overhead_seconds
        ):
            seconds += self.wait
        return super().spend(seconds)


def test_the_loader_start_of_an_epoch_is_not_taken_for_a_slowdown() -> None:
    budget = LONG_SECONDS / 0.95
    loop = SlowStartLoop(LONG, lambda t: 1.0, promise=LONG_PROMISE)
    deadline = Deadline(LONG_PROMISE, budget / 60, LONG, ("zoom_in", "zoom_out"))
    for epoch in range(LONG.epochs):
        loop.run_epoch(epoch, deadline)
    within = [r for r in deadline.replans if "during_epoch" in r]
    assert all(r["speed"] == pytest.approx(1.0) for r in within), within
