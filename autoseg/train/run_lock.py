"""One process at a time per run folder: a lock file that the kernel releases when its holder ends.

``autoseg_train`` takes :func:`run_lock` on a fold's folder before it writes anything there and holds it until the
run ends; a second ``autoseg_train`` on the same fold (with or without ``--continue``) is refused in one line naming
the process that holds it (pid, host and since when), instead of both writing ``log.txt`` and the checkpoints.

The lock is ``fcntl.flock`` on ``.autoseg_run.lock`` in the folder, which also records the holder for that message.
The kernel drops a ``flock`` when its holder exits however it exits (an exception, SIGINT, SIGTERM, even SIGKILL or
a crash), so a lock is never stale in effect: a file left by a killed run is taken over by the next one (which
says so). An orderly exit also deletes the file, and the folder when the run wrote nothing else into it. Linux's
NFS client maps ``flock`` to NFS locks, so runs on other machines sharing the folder see it too.

In a distributed run (torchrun) rank 0 owns the folder and takes the lock; the other ranks write nothing there
and take none, and the ``--num-gpus`` launcher only looks (:func:`check_unlocked`), so they never lock each other
out.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from autoseg.errors import AutosegError

__all__ = ["LOCK_FILE", "RunLockedError", "check_unlocked", "run_lock"]

#: The lock file inside a locked folder.
LOCK_FILE = ".autoseg_run.lock"


class RunLockedError(AutosegError, RuntimeError):
    """Another process holds the folder's lock; the message names it (pid, host, since when)."""


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says (``pid P on host H since T``)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its name yet"


def _refusal(folder: Path, path: Path) -> RunLockedError:
    return RunLockedError(
        f"{folder} is in use by another run ({_holder(path)}); wait for it to end or stop it. Its lock ends with "
        "it, also when it is killed"
    )


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive ``flock``, or None when another process holds it. A
    file deleted or replaced between opening and locking (its holder ended) is opened again."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # programs it starts do not hold it
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return descriptor
        os.close(descriptor)  # locked a file its holder had just deleted: lock the one there now


def check_unlocked(folder: Path) -> None:
    """Refuse early when another process holds ``folder``'s lock (nothing is created; the lock is not kept).

    Raises:
        RunLockedError: naming the holder.
    """
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(Path(folder), path) from None
    finally:
        os.close(descriptor)  # also drops the shared lock taken just to look


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[str | None]:
    """Hold ``folder``'s lock within the block (the folder is created when missing).

    Yields:
        A line to log when the lock was taken over from a run that ended without releasing it (killed), else None.

    Raises:
        RunLockedError: another process holds it; the message names the process (pid, host, since when).
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.is_dir()]  # removed again if left empty
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    descriptor = _try_lock(path)
    if descriptor is None:
        _remove_empty(created)
        raise _refusal(folder, path)
    try:
        previous = os.read(descriptor, 4096).decode("utf-8", "replace").strip()
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode(), 0)
        yield f"took over the lock of a run that ended without releasing it ({previous})" if previous else None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: a process waiting on this file then locks a fresh one
        os.close(descriptor)
        _remove_empty(created)  # a run refused before it wrote anything leaves no folder behind


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first), as long as each is empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
