"""Learning-rate reduction on a plateau and early stopping, counted on the validation score after every epoch.

The counters are plain values (they go into checkpoints, so ``--continue`` resumes them). Epochs without a
validation score (NaN) are not counted, nor are epochs before the score first leaves 0 (the network has not found
any lesion yet: that is the start of learning, not a plateau). :class:`PlateauStopping` attaches them to the
training loop as a handler (``autoseg.train.events``); the PSPNet trainers (the CTP paper: ÷10 after 20 epochs
without gain, stop after 50) and ``AcuteStrokeTrainer`` (the acute stroke paper: stop after 8) attach it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from autoseg.plans import Schedule
from autoseg.train.events import EpochHandler, TrainingLoop

#: Factor of each learning-rate reduction on a plateau (CTP paper).
PLATEAU_FACTOR = 0.1


def fresh_plateau() -> dict[str, Any]:
    """Counters of a stage that just began: best score, epochs without gain, reductions so far, stopped."""
    return {"best": -math.inf, "epochs_without_gain": 0, "reductions": 0, "stopped": False}


def scaled_patience(planned: int | None, epochs: int, planned_epochs: int) -> int | None:
    """A patience of ``planned`` epochs (None: none) for a run of ``epochs`` instead of ``planned_epochs``, scaled like
    the stage starts are (``autoseg.train.run_length.RunLength``), at least 1."""
    if planned is None:
        return None
    return max(1, math.floor(planned * epochs / planned_epochs + 0.5))


def update_plateau(
    state: dict[str, Any], score: float, plateau_patience: int | None, stop_patience: int | None
) -> tuple[bool, bool]:
    """Count one epoch with validation ``score`` into ``state`` (changed in place).

    Args:
        state: counters from :func:`fresh_plateau`.
        score: the epoch's validation score, higher is better; NaN: no validation (not counted).
        plateau_patience: reduce the learning rate after every this many epochs without gain; None: never.
        stop_patience: stop after this many epochs without gain; None: never.

    Returns:
        (the learning rate is reduced now, training stops now).
    """
    if math.isnan(score):
        return False, False
    if score > state["best"]:
        state["best"], state["epochs_without_gain"] = score, 0
        return False, False
    if state["best"] <= 0:
        return False, False
    state["epochs_without_gain"] += 1
    reduced = bool(plateau_patience) and state["epochs_without_gain"] % plateau_patience == 0
    state["reductions"] += int(reduced)
    stopped = bool(stop_patience) and state["epochs_without_gain"] >= stop_patience and not state["stopped"]
    state["stopped"] = state["stopped"] or stopped
    return reduced, stopped


class PlateauStopping(EpochHandler):
    """Learning-rate reduction on a plateau and early stopping, as a handler attached to the training loop.

    Both patiences come from the plans' schedule (``plateau_patience_epochs``, ``early_stopping_patience_epochs``),
    scaled with a shortened run (``--epochs``) like the stage starts (:func:`scaled_patience`), and count the
    moving-average validation pseudo-Dice (the one ``checkpoint_best.pth`` follows). The counters restart with each
    stage and are stored in the checkpoint under ``plateau``, so ``--continue`` resumes them. The trainer's
    ``learning_rate`` multiplies its rate by :attr:`factor`.

    Args:
        schedule: the plans' schedule (patiences and planned epochs).
        default_stop_patience: early-stopping patience for a run of the given epochs where the plans set none;
            None: no early stopping then.

    Example:
        >>> plateau = PlateauStopping(configuration.schedule)
        >>> trainer.handlers.append(plateau)  # in the trainer's constructor
    """

    key = "plateau"

    def __init__(self, schedule: Schedule, default_stop_patience: Callable[[int], int] | None = None) -> None:
        self.schedule = schedule
        self.default_stop_patience = default_stop_patience
        self.counters = fresh_plateau()

    def patience(self, name: str, epochs: int) -> int | None:
        """The schedule's patience ``name`` (``plateau_patience_epochs`` or ``early_stopping_patience_epochs``) in
        epochs for a run of ``epochs``, scaled like the stage starts; None: none."""
        planned = scaled_patience(getattr(self.schedule, name), epochs, self.schedule.epochs)
        if planned is None and name == "early_stopping_patience_epochs" and self.default_stop_patience is not None:
            return self.default_stop_patience(epochs)
        return planned

    @property
    def factor(self) -> float:
        """What the learning rate is multiplied by: ``PLATEAU_FACTOR`` per reduction so far in the stage."""
        return PLATEAU_FACTOR ** self.counters["reductions"]

    def stage_started(self) -> None:
        self.counters = fresh_plateau()

    def epoch_completed(self, loop: TrainingLoop, epoch: int, score: float) -> list[str]:
        """Count the epoch (:func:`update_plateau`, patiences for the loop's ``run_length.epochs``); returns the
        log lines of a reduction (with the new rate, ``loop.learning_rate(epoch, 0)``) and of stopping."""
        epochs = loop.run_length.epochs
        stop = self.patience("early_stopping_patience_epochs", epochs)
        reduced, stopped = update_plateau(self.counters, score, self.patience("plateau_patience_epochs", epochs), stop)
        waited = self.counters["epochs_without_gain"]
        return (
            [
                f"no better validation pseudo-Dice for {waited} epochs: learning rate ÷{1 / PLATEAU_FACTOR:g} to "
                f"{loop.learning_rate(epoch, 0):g}"
            ]
            if reduced
            else []
        ) + ([f"early stopping: no better validation pseudo-Dice for {stop} epochs"] if stopped else [])

    def stop_requested(self) -> bool:
        return bool(self.counters["stopped"])

    def state_dict(self) -> dict[str, Any]:
        return dict(self.counters)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = {**fresh_plateau(), **state}
