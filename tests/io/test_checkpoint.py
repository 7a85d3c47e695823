"""Checkpoints: plain values only, refused when pickled, atomic even under kill -9, random states restored."""

from __future__ import annotations

import fractions
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.io.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    non_plain_values,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {
        "network": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "stage": 1,
        "history": {"train_loss": [0.5, float("nan")], "stage": ["zoom_in", "zoom_out"]},
        "run_length": {"stage_starts": [0, 2], "restart_period_epochs": None},
        "rng": capture_rng_state(),
    }


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    state = _state()
    save_checkpoint(state, tmp_path / "run" / "checkpoint_latest.pth")
    _assert_same(load_checkpoint(tmp_path / "run" / "checkpoint_latest.pth"), state)
    # What every consumer relies on: torch's own safe loader reads it.
    assert torch.load(tmp_path / "run" / "checkpoint_latest.pth", weights_only=True)["epoch"] == 3


def test_saving_objects_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['rng'\]\['numpy'\]: numpy.ndarray"):
        save_checkpoint({"rng": {"numpy": np.zeros(3)}}, tmp_path / "c.pth")
    assert not (tmp_path / "c.pth").exists()
    assert non_plain_values({"ok": [1, 2.0, "x", None, torch.zeros(1)], "bad": fractions.Fraction(1, 3)}) == [
        "checkpoint['bad']: fractions.Fraction"
    ]


def test_a_pickled_payload_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({"network": {}, "epoch": fractions.Fraction(1, 3)}, path)  # a pickled Python object
    with pytest.raises(CheckpointError, match="refused") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "fractions.Fraction" in str(error.value)


def test_truncated_missing_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(_state(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"epoch": 1}, path)

    def half_written(obj: object, handle: object) -> None:
        handle.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]  # no temporary left


_WRITER = """
import sys, torch
from autoseg.io.checkpoints import save_checkpoint
path, step = sys.argv[1], 0
while True:
    step += 1
    save_checkpoint({"step": step, "weights": torch.full((1_000_000,), float(step))}, path)
    print(step, flush=True)
"""


def test_kill_9_during_writes_never_leaves_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_latest.pth"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let it replace the file a few times, then kill it mid-write (4 MB per write)
            writer.stdout.readline()
        time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    state = load_checkpoint(path)
    assert state["step"] >= 3 and torch.all(state["weights"] == state["step"])
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]


def test_rng_states_are_plain_and_restore_every_generator(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    state = capture_rng_state()
    assert non_plain_values(state) == []
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    save_checkpoint({"rng": state}, tmp_path / "rng.pth")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert random.random() == expected[2]
