"""Training checkpoints: tensors and plain values only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict whose leaves are ``torch.Tensor``, ``str``, ``int``, ``float``, ``bool`` or ``None``,
nested in ``dict``, ``list`` and ``tuple``: model and optimizer state dicts, the learning-rate schedule and
grad-scaler state as plain dicts, the epoch, the stage, the logging history and the random generator states
(:func:`capture_rng_state`). Loading and saving must never depend on pickling Python objects: a pickled object
runs code when it is loaded, and a class that was renamed or moved makes an old checkpoint unreadable.
:func:`load_checkpoint` therefore reads with ``torch.load(..., weights_only=True)`` and refuses anything else
with a :class:`CheckpointError` naming the file.

Every checkpoint is written to a temporary file in its destination folder, flushed to disk, and renamed over
the final name (``os.replace`` is atomic within a file system), so a process killed at any moment (even with
``kill -9``) leaves either the previous checkpoint or the new one, never a truncated file. A kill may leave
a hidden temporary file (``.NAME.*.tmp.pth``) behind; :func:`remove_stale_temporaries` clears them.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from pickle import UnpicklingError  # what torch.load(weights_only=True) raises for a pickled object
from typing import Any

import numpy as np
import torch

from autoseg.errors import AutosegError, MissingFileError
from autoseg.io.files import atomic_path

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "non_plain_values",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
]

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class CheckpointError(AutosegError, ValueError):
    """A checkpoint is unreadable, incomplete, or holds something other than tensors and plain values."""


def non_plain_values(value: Any, where: str = "checkpoint") -> list[str]:
    """Where ``value`` holds something other than tensors and plain values, as ``key.path: type`` strings.

    Example:
        >>> non_plain_values({"epoch": 3, "weights": torch.zeros(2), "rng": np.zeros(2)})
        ["checkpoint['rng']: numpy.ndarray"]
    """
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                found.append(f"{where}: key {key!r} of type {type(key).__name__}")
            found += non_plain_values(item, f"{where}[{key!r}]")
        return found
    if isinstance(value, (list, tuple)):
        return [problem for index, item in enumerate(value) for problem in non_plain_values(item, f"{where}[{index}]")]
    if isinstance(value, _PLAIN):
        return []
    return [f"{where}: {type(value).__module__}.{type(value).__qualname__}"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    Args:
        state: tensors and plain values only (see the module docstring); tensors may live on any device and
            are stored as they are (``load_checkpoint`` maps them).
        path: destination, e.g. ``.../fold_0/checkpoint_latest.pth``; its folder is created if missing.

    Raises:
        TypeError: ``state`` holds other objects (numpy arrays, dataclasses, ...); the message names each key.
        DiskFullError: the disk filled up (``OSError`` ENOSPC from write or fsync, or torch's ``unexpected pos``);
            the previous file under ``path``, if any, is kept as it was.
    """
    problems = non_plain_values(state)
    if problems:
        raise TypeError(
            f"{path}: a checkpoint may hold only tensors and plain values; found "
            + "; ".join(problems[:5])
            + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        )
    with atomic_path(Path(path), suffix=".pth") as temporary:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the checkpoint


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.pth`` file.
        map_location: where tensors go (default the CPU), as for ``torch.load``.

    Returns:
        The state dict.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file holds pickled objects (refused, ``weights_only=True``), is truncated or is not
            a checkpoint at all; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as error:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects ({', '.join(names) or 'unknown'}), not only "
            "tensors and plain values, and loading it could run arbitrary code"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else f"{type(error).__name__}: the file ends early"
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors and plain values, found {type(state).__name__}")
    return state


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed process left in a run ``folder`` while writing atomically (checkpoints,
    and the plot and plans beside them: ``.NAME.XXXXXXXX.tmp.SUFFIX``); returns what was removed. Call it only
    where no other process writes into ``folder`` (a run folder under its lock)."""
    removed = []
    for temporary in Path(folder).glob(".*.*.tmp.*"):
        if not temporary.is_file():
            continue
        temporary.unlink(missing_ok=True)
        removed.append(temporary)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator, as tensors and plain values.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (empty without CUDA), "numpy": {...},
        "python": {...}}``; numpy's and Python's Mersenne Twister states become lists of ints.
    """
    kind, key, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(kind),
            "key": [int(k) for k in key],
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states from :func:`capture_rng_state`; CUDA states only when CUDA is in use."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            np.asarray(numpy_state["key"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
