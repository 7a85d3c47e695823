"""``PlateauStopping``: what a trainer adds to reduce its learning rate on a validation plateau and stop early.

A mixin placed before the trainer base class (``class PSPNetTrainer(PlateauStopping, Trainer)``); the counting
itself is ``autoseg.train.early_stopping``. Both patiences come from the plans' schedule
(``plateau_patience_epochs``, ``early_stopping_patience_epochs``), scaled with a shortened run (``--epochs``) like the
stage starts, and count the moving-average validation pseudo-Dice (the one ``checkpoint_best.pth`` follows). The
counters restart with each stage and are stored in the checkpoint, so ``--continue`` resumes them.
"""

from __future__ import annotations

from typing import Any

from autoseg.train.early_stopping import PLATEAU_FACTOR, fresh_plateau, scaled_patience, update_plateau


class PlateauStopping:
    """Plateau learning-rate reduction and early stopping for a :class:`~trainers.base.Trainer` subclass.

    ``self.plateau`` holds the counters; :meth:`plateau_factor` is what the trainer's ``learning_rate`` multiplies
    its rate by (``PLATEAU_FACTOR`` per reduction so far in the stage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plateau = fresh_plateau()

    def patience(self, name: str) -> int | None:
        """The schedule's patience ``name`` in epochs, scaled to the run's length like the stage starts."""
        schedule = self.configuration.schedule
        return scaled_patience(getattr(schedule, name), self.budget.epochs, schedule.epochs)

    def plateau_factor(self) -> float:
        return PLATEAU_FACTOR ** self.plateau["reductions"]

    def should_stop(self) -> bool:
        return bool(self.plateau["stopped"])

    def enter_stage(self, epoch: int) -> None:
        before = self.stage_index
        super().enter_stage(epoch)
        if self.stage_index != before:
            self.plateau = fresh_plateau()

    def end_epoch(self, epoch: int, **record: float) -> None:
        """Update the plateau counters (before the base class writes the checkpoint), then record the epoch."""
        messages = self.update_plateau(self.moving_average(record["pseudo_dice"]), epoch)
        super().end_epoch(epoch, **record)
        for message in messages:
            self.log(message)

    def update_plateau(self, dice: float, epoch: int) -> list[str]:
        """Count an epoch with validation score ``dice`` (see ``autoseg.train.early_stopping.update_plateau``); returns
        the log lines."""
        stop = self.patience("early_stopping_patience_epochs")
        reduced, stopped = update_plateau(self.plateau, dice, self.patience("plateau_patience_epochs"), stop)
        waited = self.plateau["epochs_without_gain"]
        return (
            [
                f"no better validation pseudo-Dice for {waited} epochs: learning rate ÷{1 / PLATEAU_FACTOR:g} to "
                f"{self.learning_rate(epoch, 0):g}"
            ]
            if reduced
            else []
        ) + ([f"early stopping: no better validation pseudo-Dice for {stop} epochs"] if stopped else [])

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "plateau": dict(self.plateau)}

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self.plateau = {**fresh_plateau(), **state.get("plateau", {})}
