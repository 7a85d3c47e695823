"""One process per run folder: a second is refused naming the first; a lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from conftest import hold_lock

from autoseg.train.run_lock import LOCK_FILE, RunLockedError, check_unlocked, run_lock


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "results" / "fold_0"
    holder = hold_lock(folder)
    try:
        expected = rf"{folder} is in use by another run \(pid {holder.pid} on host {socket.gethostname()} since 20"
        with pytest.raises(RunLockedError, match=expected):
            with run_lock(folder):
                pass
        with pytest.raises(RunLockedError, match=expected):
            check_unlocked(folder)
        assert (folder / LOCK_FILE).is_file()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock, the file stays
        holder.wait()
    assert f"pid {holder.pid}" in (folder / LOCK_FILE).read_text()
    check_unlocked(folder)
    with run_lock(folder) as taken_over:
        assert taken_over.startswith(f"took over the lock of a run that ended without releasing it (pid {holder.pid} ")
        assert f"pid {os.getpid()} " in (folder / LOCK_FILE).read_text()
    assert not (folder / LOCK_FILE).exists()  # released


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_holder_stopped_by_a_signal_releases_the_lock(tmp_path: Path, stop: signal.Signals) -> None:
    folder = tmp_path / "fold_0"
    folder.mkdir()
    (folder / "log.txt").write_text("epoch 1\n")
    holder = hold_lock(folder)
    holder.send_signal(stop)
    holder.wait(timeout=30)
    with run_lock(folder):  # free again
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["log.txt"]  # a folder with a run in it stays


def test_the_lock_is_taken_again_after_release_and_an_error_releases_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside"):
        with run_lock(tmp_path) as taken_over:
            assert taken_over is None and (tmp_path / LOCK_FILE).is_file()
            raise ValueError("inside")
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path) as taken_over:
        assert taken_over is None


def test_a_folder_the_lock_made_is_removed_when_nothing_else_was_written(tmp_path: Path) -> None:
    with run_lock(tmp_path / "results" / "fold_0"):
        pass
    assert list(tmp_path.iterdir()) == []
