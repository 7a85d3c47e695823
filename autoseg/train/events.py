"""What the training loop tells the handlers attached to it, as MONAI's handlers attach to an engine's events.

A trainer attaches handlers to its loop (``trainer.handlers.append(handler)``, in its constructor); the loop calls
every handler, in the order attached, when a stage starts (:meth:`EpochHandler.stage_started`), after every
training iteration (:meth:`EpochHandler.iteration_completed`: a handler may change the run length, the epoch under
way's iterations included) and when an epoch completes (:meth:`EpochHandler.epoch_completed`), asks them before every epoch whether to stop
(:meth:`EpochHandler.stop_requested`), and keeps their state in every checkpoint under :attr:`EpochHandler.key`,
so ``--continue`` resumes them. Behaviour that cuts across trainers (early stopping:
``autoseg.train.early_stopping.PlateauStopping``) is a handler, not a base class whose place in the class order
would matter.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from autoseg.train.run_length import RunLength


class TrainingLoop(Protocol):
    """What a handler may ask of the loop it is attached to (``trainers.Trainer``)."""

    run_length: RunLength

    def learning_rate(self, epoch: int, iteration: int) -> float: ...


class EpochHandler:
    """Base of the handlers a training loop calls; each event's default does nothing.

    Attributes:
        key: the checkpoint key of the handler's state (:meth:`state_dict`); unique among a loop's handlers.
    """

    key: ClassVar[str]

    def stage_started(self) -> None:
        """A new stage of the schedule begins (not called for the first stage, nor on resuming)."""

    def iteration_completed(self, loop: TrainingLoop, epoch: int, done: int) -> list[str]:
        """Training iteration ``done`` (1-based) of epoch ``epoch`` (0-based) has stepped; the loop reads the epoch's
        iterations from ``loop.run_length`` again afterwards, so a handler that replaces it can shorten or lengthen
        the epoch under way. Returns lines for the log."""
        return []

    def epoch_completed(self, loop: TrainingLoop, epoch: int, score: float) -> list[str]:
        """Epoch ``epoch`` (0-based) has trained and been validated; ``score`` is its moving-average validation
        pseudo-Dice (NaN without validation). Called before the epoch's checkpoints are written, so they hold what
        the handler counted. Returns lines for the log, written after the checkpoints."""
        return []

    def stop_requested(self) -> bool:
        """True to end training before the run length's last epoch; asked before every epoch, so a run continued
        after it stopped ends at once."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """The handler's state as plain values, for the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the state :meth:`state_dict` gave (possibly from an older checkpoint that lacked some keys)."""
