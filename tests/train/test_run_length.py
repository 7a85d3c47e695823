"""The run length of a training (epochs × iterations): what checkpoints keep of it, under the name it has now and
the one it had, with the iterations a deadline re-planned."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.io.checkpoints import save_checkpoint
from autoseg.train.checkpointing import read_run_checkpoint
from autoseg.train.options import TrainingOptions
from autoseg.train.run_length import RunLength


@pytest.mark.parametrize("key", ["run_length", "budget"])  # "budget": checkpoints written before the rename
def test_a_checkpoint_continues_with_the_run_length_it_saved_under_either_name(tmp_path: Path, key: str) -> None:
    length = RunLength(epochs=3, iterations_per_epoch=5, val_iterations=2, stage_starts=(0, 2))
    path = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"trainer": "T", "configuration": "c", "seed": 7, key: length.to_plain()}, path)
    _, continued, seed = read_run_checkpoint(path, "T", "c", TrainingOptions())
    assert (continued.epochs, continued.iterations_per_epoch, continued.stage_starts, seed) == (3, 5, (0, 2), 7)


def test_a_checkpoint_continues_with_the_iterations_a_deadline_re_planned(tmp_path: Path) -> None:
    length = RunLength(epochs=6, iterations_per_epoch=10, val_iterations=2, stage_starts=(0, 5)).rescheduled(2, 7, 1)
    path = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"trainer": "T", "configuration": "c", "seed": 7, "run_length": length.to_plain()}, path)
    _, continued, _ = read_run_checkpoint(path, "T", "c", TrainingOptions())
    assert continued == length and [continued.iterations_at(e) for e in range(6)] == [10, 10, 7, 7, 7, 7]
    _, asked, _ = read_run_checkpoint(path, "T", "c", TrainingOptions(val_iterations=3))  # --val-iters 3
    assert [asked.val_iterations_at(e) for e in range(6)] == [3] * 6
    assert [asked.iterations_at(e) for e in range(6)] == [10, 10, 7, 7, 7, 7]
