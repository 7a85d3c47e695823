"""Learning-rate reduction on a plateau and early stopping, counted on the validation score after every epoch.

The counters are plain values (they go into checkpoints, so ``--continue`` resumes them). Epochs without a
validation score (NaN) are not counted, nor are epochs before the score first leaves 0 (the network has not found
any lesion yet: that is the start of learning, not a plateau). Used by the PSPNet trainers (the CTP paper: ÷10 after
20 epochs without gain, stop after 50) and ``AcuteStrokeTrainer`` (the acute stroke paper: stop after 8), through
``trainers.plateau.PlateauStopping``.
"""

from __future__ import annotations

import math
from typing import Any

#: Factor of each learning-rate reduction on a plateau (CTP paper).
PLATEAU_FACTOR = 0.1


def fresh_plateau() -> dict[str, Any]:
    """Counters of a stage that just began: best score, epochs without gain, reductions so far, stopped."""
    return {"best": -math.inf, "epochs_without_gain": 0, "reductions": 0, "stopped": False}


def scaled_patience(planned: int | None, epochs: int, planned_epochs: int) -> int | None:
    """A patience of ``planned`` epochs (None: none) for a run of ``epochs`` instead of ``planned_epochs``, scaled like
    the stage starts are (``trainers.toolkit.Budget``), at least 1."""
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
