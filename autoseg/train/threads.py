"""Torch's CPU threads for a run's training steps, checked on the run's own iterations while it trains.

On a CPU shared with other jobs, fewer threads can be faster: torch's OpenMP threads wait for each other at every
parallel region, and a thread the system has set aside stalls the rest. On 2 cores of an AMD EPYC under a load
average of 4–5, a step of the CPUPlanner's network took 4.7 times as long on 2 threads as on 1 (1.6 times in
channels-last), while on an idle machine 2 threads are the faster (``documentation/benchmarks.md``, "A faster CPU
step"). Which is faster changes with the load, so no measurement is cached: :class:`ThreadCheck` measures it again
and again on the training steps themselves.

- **Candidates**: the run's thread count (``autoseg.train.resources``: the cores, less the augmentation processes)
  and half of it (1 on 2 cores).
- **Check**: at the start of an epoch when a check is due, the first ``2 x TRIALS`` iterations alternate between the
  current count and the other (current, other, current, other: both see the same load), each step timed; the
  fastest step of each is compared and the other count is taken when at least :data:`SWITCH_MARGIN` faster. The
  rest of the epoch, and the epochs until the next check, run on the choice.
- **When**: at the first epoch, then after 1, 2, 4, ... up to :data:`MAX_INTERVAL` epochs while the choice holds; a
  switch starts the interval at 1 again. An epoch of fewer than ``2 x TRIALS`` iterations is not checked.
- **Log**: one line per check (:meth:`ThreadCheck.step_done`); the state goes into the checkpoint, so a continued
  run starts on the count the interrupted one had reached.

Results depend on the thread count at float rounding (the order of the sums in a convolution's gradient), so a run
whose thread count changed is reproducible to rounding, not bit for bit; ``--deterministic`` keeps the count fixed
(as do GPUs, distributed runs and runs on one thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MAX_INTERVAL", "SWITCH_MARGIN", "TRIALS", "ThreadCheck", "threads_restored"]

#: Timed steps per candidate in one check.
TRIALS = 2
#: The other count must be at least this much faster to be taken: a smaller difference is within what steps on a
#: busy machine differ by, and each switch makes oneDNN build its kernels again.
SWITCH_MARGIN = 0.10
#: The longest interval between checks, in epochs.
MAX_INTERVAL = 8


@dataclass
class ThreadCheck:
    """The thread count of a CPU run's steps, checked on its iterations (see the module doc).

    Args:
        configured: the run's thread count; the candidates are it and ``max(1, configured // 2)``.
        current: the count in use.
        interval: epochs from one check to the next.
        next_check: the epoch (0-based) of the next check.
    """

    configured: int
    current: int
    interval: int = 1
    next_check: int = 0
    trials: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def for_run(cls, configured: int) -> ThreadCheck | None:
        """A check for a run on ``configured`` threads; None on one thread (nothing to compare)."""
        return cls(configured, configured) if configured > 1 else None

    @property
    def other(self) -> int:
        """The candidate not in use."""
        half = max(1, self.configured // 2)
        return half if self.current == self.configured else self.configured

    def _checking(self, epoch: int, iterations: int) -> bool:
        return epoch == self.next_check and iterations >= 2 * TRIALS

    def step_threads(self, epoch: int, iteration: int, iterations: int) -> int:
        """The threads for ``iteration`` of ``epoch`` (of ``iterations``): the current count, or during a check
        the candidates in turn."""
        if self._checking(epoch, iterations) and iteration < 2 * TRIALS:
            return self.other if iteration % 2 else self.current
        return self.current

    def before_step(self, epoch: int, iteration: int, iterations: int) -> None:
        """Give torch :meth:`step_threads`' count for ``iteration`` of ``epoch`` (of ``iterations``)."""
        threads = self.step_threads(epoch, iteration, iterations)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def step_done(self, epoch: int, iteration: int, iterations: int, seconds: float) -> str | None:
        """Record the seconds of ``iteration``'s step (on :meth:`step_threads`' count); after a check's last trial,
        decide and return the log line (else None). An epoch too short to check moves the check to the next."""
        if epoch == self.next_check and iterations < 2 * TRIALS:
            self.next_check += 1
            return None
        if not self._checking(epoch, iterations) or iteration >= 2 * TRIALS:
            return None
        self.trials.setdefault(self.step_threads(epoch, iteration, iterations), []).append(seconds)
        if iteration < 2 * TRIALS - 1:
            return None
        return self._decide(epoch)

    def _decide(self, epoch: int) -> str:
        seconds = {count: min(values) for count, values in self.trials.items()}
        was, other = self.current, self.other
        self.trials = {}
        if seconds[other] < (1 - SWITCH_MARGIN) * seconds[was]:
            self.current, self.interval, verb = other, 1, f"switched from {was}"
        else:
            self.interval, verb = min(2 * self.interval, MAX_INTERVAL), "kept"
        self.next_check = epoch + self.interval
        steps = ", ".join(f"{seconds[count]:.2f} s on {count}" for count in (was, other))
        return (
            f"threads: {self.current} ({verb}; steps {steps} thread(s), fastest of {TRIALS} each at the start of "
            f"epoch {epoch + 1}; next check at epoch {self.next_check + 1})"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the count in use and when to check next."""
        return {
            "configured": self.configured,
            "current": self.current,
            "interval": self.interval,
            "next": self.next_check,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s values when the run has the same thread count (else start afresh)."""
        if state.get("configured") == self.configured:
            self.current = int(state["current"])
            self.interval = int(state["interval"])
            self.next_check = int(state["next"])


@contextlib.contextmanager
def threads_restored(check: ThreadCheck | None) -> Iterator[None]:
    """Within the block the check may change torch's threads; afterwards (also after an error) they are the run's
    own count again, for the end-of-fold validation and a next fold in the same process."""
    try:
        yield
    finally:
        if check is not None:
            torch.set_num_threads(check.configured)
