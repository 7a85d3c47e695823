"""Tests of autoseg.train.threads: the thread count checked on a run's own steps (simulated step times)."""

from __future__ import annotations

import pytest

from autoseg.train.threads import MAX_INTERVAL, SWITCH_MARGIN, TRIALS, ThreadCheck


def _epoch(check: ThreadCheck, epoch: int, seconds_on: dict[int, float], iterations: int = 6):
    """Run one epoch's iterations through ``check``: (the threads of each step, the lines it logged)."""
    used, lines = [], []
    for iteration in range(iterations):
        threads = check.step_threads(epoch, iteration, iterations)
        used.append(threads)
        line = check.step_done(epoch, iteration, iterations, seconds_on[threads])
        if line is not None:
            lines.append(line)
    return used, lines


def test_nothing_to_check_on_one_thread() -> None:
    assert ThreadCheck.for_run(1) is None
    assert ThreadCheck.for_run(2).other == 1 and ThreadCheck.for_run(16).other == 8


def test_a_busy_machine_switches_to_fewer_threads_and_checks_again_less_often() -> None:
    check = ThreadCheck.for_run(2)
    busy = {2: 2.0, 1: 0.5}
    used, lines = _epoch(check, 0, busy)
    assert used == [2, 1, 2, 1, 1, 1]  # the trials alternate, then the rest of the epoch runs on the choice
    assert lines == [
        "threads: 1 (switched from 2; steps 2.00 s on 2, 0.50 s on 1 thread(s), fastest of 2 each at the start of "
        "epoch 1; next check at epoch 2)"
    ]
    used, lines = _epoch(check, 1, busy)
    assert used == [1, 2, 1, 2, 1, 1] and "threads: 1 (kept;" in lines[0] and "next check at epoch 4" in lines[0]
    assert _epoch(check, 2, busy) == ([1] * 6, [])  # no check until epoch 4 (0-based 3)
    # the machine is idle again: the next check switches back, and checks follow every epoch again
    idle = {2: 0.6, 1: 1.0}
    used, lines = _epoch(check, 3, idle)
    assert used == [1, 2, 1, 2, 2, 2] and lines[0].startswith("threads: 2 (switched from 1;")
    assert check.state_dict() == {"configured": 2, "current": 2, "interval": 1, "next": 4}


def test_the_interval_doubles_up_to_its_longest_and_trials_keep_the_fastest() -> None:
    check = ThreadCheck.for_run(4)
    epochs = []
    for epoch in range(40):
        used, lines = _epoch(check, epoch, {4: 1.0, 2: 1.5})
        if lines:
            epochs.append(epoch)
        assert set(used) == ({4, 2} if lines else {4})
    gaps = [b - a for a, b in zip(epochs, epochs[1:])]
    assert gaps[:4] == [2, 4, 8, 8] and max(gaps) == MAX_INTERVAL
    # only the fastest of each candidate's trials counts: one slow trial (a busy moment) decides nothing
    check = ThreadCheck.for_run(2)
    seconds = iter([1.0, 5.0, 1.0, 0.95])  # 2, 1, 2, 1 threads: 1 thread's fastest is 5% faster, within the margin
    for iteration in range(2 * TRIALS):
        check.step_threads(0, iteration, 10)
        line = check.step_done(0, iteration, 10, next(seconds))
    assert SWITCH_MARGIN > 0.05 and check.current == 2 and "kept" in line


def test_a_short_epoch_moves_the_check_to_the_next_and_state_round_trips() -> None:
    check = ThreadCheck.for_run(2)
    assert _epoch(check, 0, {2: 2.0, 1: 0.5}, iterations=3) == ([2, 2, 2], [])
    assert check.next_check == 1
    _epoch(check, 1, {2: 2.0, 1: 0.5})
    again = ThreadCheck.for_run(2)
    again.load_state_dict(check.state_dict())
    assert again == check
    other_machine = ThreadCheck.for_run(4)
    other_machine.load_state_dict(check.state_dict())  # another thread count: start afresh
    assert (other_machine.current, other_machine.next_check) == (4, 0)


@pytest.mark.parametrize("configured, other", [(2, 1), (3, 1), (8, 4)])
def test_the_other_candidate(configured: int, other: int) -> None:
    check = ThreadCheck.for_run(configured)
    assert check.other == other
    check.current = other
    assert check.other == configured
