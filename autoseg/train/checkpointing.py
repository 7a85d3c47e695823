"""A training run's checkpoints and its folder: whether to continue or start afresh, reading a checkpoint to
continue from, writing one, and the random generator states of every rank.

A checkpoint (``checkpoint_latest.pth`` after every epoch, ``checkpoint_best.pth``, ``checkpoint_final.pth``,
snapshots) holds tensors and plain values only (``autoseg.io.checkpoints``): the network's and optimizer's state,
the memory format it trains in (``memory_format``, kept by a continued run), the CPU thread check's state
(``threads``, ``autoseg.train.threads``), the grad scaler's, the epoch and stage, the run length (under
``run_length``; ``budget`` in older ones; with the iterations a deadline re-planned), the history, the seed and the random generator states (``rng``; ``rng_ranks``,
one per rank, in a distributed run), and the state of every handler attached to the loop under its key
(``plateau``; ``deadline``: the fold's elapsed time, measured epochs and re-plans). Because batches depend only on
(seed, epoch), a run continued from it goes on exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from autoseg import distributed
from autoseg.errors import ExistingOutputError, UsageError
from autoseg.io.checkpoints import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from autoseg.paths import PLANS_FILE
from autoseg.plans import Configuration, Plans, PlansError
from autoseg.train.options import TrainingOptions
from autoseg.train.run_length import RunLength

CHECKPOINT_FORMAT = 1
#: What ``--continue`` continues from, first found first: the last completed epoch's checkpoint.
CONTINUABLE = ("checkpoint_latest.pth", "checkpoint_final.pth")


def checkpoint_to_continue(output_folder: Path) -> Path | None:
    """The checkpoint of the last completed epoch (``checkpoint_latest.pth``, else ``checkpoint_final.pth``);
    None when no epoch completed (a run stopped, e.g. by a full disk, before its first latest checkpoint: a
    ``checkpoint_best.pth`` written just before does not count)."""
    return next((output_folder / name for name in CONTINUABLE if (output_folder / name).is_file()), None)


def remove_incomplete_run(output_folder: Path) -> list[Path]:
    """Delete ``checkpoint_best.pth`` and snapshots of a run that completed no epoch (they were written just
    before its first ``checkpoint_latest.pth`` failed); returns what was removed."""
    found = [output_folder / "checkpoint_best.pth", *output_folder.glob("checkpoint_snapshot_*.pth")]
    removed = [path for path in found if path.is_file()]
    for path in removed:
        path.unlink()
    return removed


def refuse_overwrite(output_folder: Path) -> None:
    """A new run never silently replaces one that has checkpoints (a forgotten ``--continue`` would).

    Raises:
        ExistingOutputError: ``output_folder`` holds ``checkpoint_latest.pth`` or ``checkpoint_final.pth``.
    """
    found = [name for name in CONTINUABLE if (output_folder / name).is_file()]
    if found:
        raise ExistingOutputError(
            f"{output_folder} already holds a run ({found[0]}); resume it with --continue, "
            "or delete the folder to start anew"
        )


def resume_point(output_folder: Path, continue_training: bool, is_main: bool = True) -> tuple[Path | None, str | None]:
    """Where a run starts: (the checkpoint to continue from, or None; the log line of a ``--continue`` that
    starts afresh because no epoch completed, or None). Starting afresh removes what the stopped run left
    (:func:`remove_incomplete_run`, on the main process only).

    Raises:
        ExistingOutputError: a new run (not ``continue_training``) over a folder that holds one.
    """
    if not continue_training:
        refuse_overwrite(output_folder)
        return None, None
    path = checkpoint_to_continue(output_folder)
    if path is not None:
        return path, None
    afresh = f"--continue: no epoch completed yet (no checkpoint_latest.pth in {output_folder}); starting afresh"
    stale = [p.name for p in remove_incomplete_run(output_folder)] if is_main else []
    return None, afresh + (f" (removed {', '.join(stale)} of the run that stopped)" if stale else "")


def read_run_checkpoint(
    path: Path,
    trainer: str,
    configuration: str,
    options: TrainingOptions,
    device: torch.device | str | None = None,
) -> tuple[dict[str, Any], RunLength, int]:
    """Read a checkpoint of ``trainer`` and ``configuration`` to continue from: (its state with ``path`` added,
    the run length to continue with, the seed). The run length and seed are the saved run's (stage boundaries,
    batches and the iterations a deadline re-planned stay those of the run that wrote it), the validation batches
    per epoch ``--val-iters`` when given.

    Raises:
        CheckpointError: unreadable, pickled, or written by another trainer or for another configuration.
        UsageError: ``--epochs``/``--iters-per-epoch`` other than the saved run's.
    """
    state = load_checkpoint(path, map_location=device or "cpu")
    if state.get("trainer") != trainer or state.get("configuration") != configuration:
        raise CheckpointError(
            f"{path}: written by {state.get('trainer')} for configuration "
            f"{state.get('configuration')}, not {trainer} for {configuration}"
        )
    # checkpoints written before the run length had its own name keep it under "budget"
    saved, o = RunLength.from_plain(state["run_length"] if "run_length" in state else state["budget"]), options
    if (o.epochs or saved.epochs) != saved.epochs or (
        o.iterations_per_epoch or saved.iterations_per_epoch
    ) != saved.iterations_per_epoch:
        raise UsageError(
            f"{path}: this run trains {saved.epochs} epochs x {saved.iterations_per_epoch} "
            "iterations; continue it with the same --epochs/--iters-per-epoch (or leave them out)"
        )
    if o.val_iterations is not None:  # every epoch still to come validates as many batches as asked
        reschedules = tuple((first, iterations, o.val_iterations) for first, iterations, _ in saved.reschedules)
        saved = replace(saved, val_iterations=o.val_iterations, reschedules=reschedules)
    return {**state, "path": str(path)}, saved, int(state["seed"])


def save_run_checkpoint(state: dict[str, Any], path: Path, context: distributed.DistributedContext) -> Path:
    """Write ``state`` to ``path`` atomically. In a distributed run every rank calls this (their random generator
    states are gathered into ``rng_ranks``) and rank 0 writes."""
    if context.enabled:
        state["rng_ranks"] = distributed.gather_objects(state["rng"])
    if context.is_main:
        save_checkpoint(state, path)
    return path


def restore_run_rng(state: dict[str, Any], context: distributed.DistributedContext) -> str | None:
    """Put back this rank's random generator states from a checkpoint; returns a log line when the run was saved
    by another number of processes (the weights and schedule continue, the batches differ), else None."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    restore_rng_state(ranks[context.rank] if context.rank < len(ranks) else ranks[0])
    if len(ranks) == context.world_size:
        return None
    return (
        f"continuing with {context.world_size} process(es) a run saved by {len(ranks)}: the weights "
        "and schedule continue, the batches differ from an uninterrupted run"
    )


def prepare_output_folder(output_folder: Path, plans: Plans, configuration: Configuration, resuming: bool) -> None:
    """Create the run folder, remove temporaries a killed run left, and keep a copy of the plans there; a resumed
    run checks that its configuration did not change since it started.

    Raises:
        PlansError: resuming, and the plans' configuration differs from the copy in the run folder.
    """
    output_folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_folder)
    copy = output_folder / PLANS_FILE
    if resuming and copy.is_file():
        before = Plans.from_json(copy).configurations.get(configuration.name)
        if before is None or replace(before, reasons={}) != replace(configuration, reasons={}):
            raise PlansError(
                f"{copy}: configuration '{configuration.name}' of the plans changed since this "
                "run started; start a new run (without --continue) or restore the plans"
            )
    else:
        plans.to_json(copy)
