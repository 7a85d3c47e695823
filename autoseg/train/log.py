"""What a training run reports: ``log.txt`` (its header, :func:`run_header`; one line per epoch, :func:`format_epoch`;
the measured times, :func:`epoch_time_line`) and ``progress.png`` (:func:`plot_progress`), from one history.

The history is a dict of plain lists, one entry per finished epoch, so it goes into every checkpoint as it is
and a resumed run continues its curves:

=================== ==============================================================================
``epoch``            epoch number (0-based)
``stage``            name of the schedule stage the epoch trained in
``train_loss``       mean training loss of the epoch
``val_loss``         mean loss on the validation patches (NaN without validation iterations)
``pseudo_dice``      global Dice of the validation patches: TP, FP, FN summed over all of them
``ema_pseudo_dice``  its exponential moving average (``alpha·ema + (1 − alpha)·dice``), which picks
                     ``checkpoint_best.pth``
``learning_rate``    learning rate at the start of the epoch
``epoch_time``       seconds
=================== ==============================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from autoseg import distributed
from autoseg.io.files import atomic_path, reporting_disk_full
from autoseg.machine import Precision
from autoseg.plans import Configuration, Loss
from autoseg.train.losses import describe_loss
from autoseg.train.options import TrainingOptions
from autoseg.train.run_length import RunLength
from autoseg.train.time_promise import TimePromise

HISTORY_KEYS = (
    "epoch",
    "stage",
    "train_loss",
    "val_loss",
    "pseudo_dice",
    "ema_pseudo_dice",
    "learning_rate",
    "epoch_time",
)

History = dict[str, list]


def empty_history() -> History:
    """A history with no epochs yet."""
    return {key: [] for key in HISTORY_KEYS}


def format_epoch(history: History, index: int, total_epochs: int) -> str:
    """One human-readable line for entry ``index`` of ``history``.

    Example:
        ``epoch 3/4 [zoom_in] train_loss 0.6123 val_loss 0.5980 pseudo_dice 0.4123 ema 0.3011 lr 1.00e-03 12.3 s``
    """
    h = {key: values[index] for key, values in history.items()}
    return (
        f"epoch {h['epoch'] + 1}/{total_epochs} [{h['stage']}] train_loss {h['train_loss']:.4f} "
        f"val_loss {h['val_loss']:.4f} pseudo_dice {h['pseudo_dice']:.4f} ema {h['ema_pseudo_dice']:.4f} "
        f"lr {h['learning_rate']:.2e} {h['epoch_time']:.1f} s"
    )


class TrainingLog:
    """Appends timestamped lines to ``log.txt`` (and echoes them to stdout when ``echo``).

    Args:
        path: the log file; created with its folder on the first line.
        echo: also print every line.
        enabled: False for a log that writes and prints nothing (the ranks other than 0 of a distributed run).
    """

    def __init__(self, path: str | Path, echo: bool = True, enabled: bool = True) -> None:
        self.path = Path(path)
        self.echo = echo
        self.enabled = enabled

    def start(self, append: bool) -> None:
        """Begin a run: truncate the file unless ``append`` (a resumed run continues the same log)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            with reporting_disk_full(self.path):
                self.path.write_text("", encoding="utf-8")

    def __call__(self, message: str) -> None:
        """Append ``message`` (one stamped line per line of it).

        Raises:
            DiskFullError: the disk is full (the message names ``log.txt``).
        """
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with reporting_disk_full(self.path), open(self.path, "a", encoding="utf-8") as handle:
            for line in message.splitlines() or [""]:
                handle.write(f"{stamp}  {line}\n")
        if self.echo:
            print(message, flush=True)


def plot_progress(history: History, path: str | Path, stage_starts: Sequence[int] = ()) -> None:
    """Write ``progress.png`` atomically: losses, pseudo-Dice with its moving average, and the learning rate.

    Args:
        history: see the module docstring.
        path: the PNG file.
        stage_starts: epochs where a schedule stage begins (after the first); drawn as dashed lines.
    """
    epochs = [e + 1 for e in history["epoch"]]
    # A bare Figure renders with Agg and leaves pyplot's global state (and any GUI backend) alone.
    figure = Figure(figsize=(8, 9), layout="constrained")
    loss, dice, rate = figure.subplots(3, 1, sharex=True)
    loss.plot(epochs, history["train_loss"], label="train loss", color="tab:blue")
    loss.plot(epochs, history["val_loss"], label="validation loss", color="tab:red")
    loss.set_ylabel("loss")
    dice.plot(epochs, history["pseudo_dice"], label="pseudo-Dice", color="tab:green", alpha=0.5, linestyle=":")
    dice.plot(epochs, history["ema_pseudo_dice"], label="pseudo-Dice (moving average)", color="tab:green")
    dice.set_ylabel("validation pseudo-Dice")
    dice.set_ylim(0, 1)
    rate.plot(epochs, history["learning_rate"], color="black", label="learning rate")
    rate.set_ylabel("learning rate")
    rate.set_xlabel("epoch")
    positive = [v for v in history["learning_rate"] if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 100:
        rate.set_yscale("log")
    for axis in (loss, dice, rate):
        for start in stage_starts:
            axis.axvline(start + 0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    with atomic_path(Path(path), suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=80)


def run_header(
    *,
    trainer: str,
    dataset: str,
    configuration: Configuration,
    fold: object,
    continued: bool,
    device: torch.device,
    device_reason: str,
    world_size: int,
    precision: Precision,
    seed: int,
    data_processes: tuple[int, str],
    options: TrainingOptions,
    run_length: RunLength,
    schedule: dict[str, Any],
    loss: Loss,
    network: nn.Module,
    cases: tuple[int, int],
) -> str:
    """The lines that open a run's log: trainer, device, precision, seed, run length, stages, optimizer and
    schedule (``schedule``: the trainer's description), loss, network and the fold's (training, validation) case
    counts."""
    c, b = configuration, run_length
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    stages = "; ".join(
        f"{s.name} from epoch {start + 1} (patch {list(s.patch_size)}, batch {s.batch_size}, lr {s.learning_rate:g})"
        for s, start in zip(c.schedule.stages, b.stage_starts)
    )
    parameters = sum(p.numel() for p in network.parameters())
    layout = f" ({network.layout} layout)" if isinstance(getattr(network, "layout", None), str) else ""
    return "\n".join(
        [
            f"autoseg training: trainer {trainer}, configuration {c.name}, fold {fold}, dataset {dataset}"
            + (" (continued)" if continued else ""),
            f"device: {device} ({device_reason}){threads}; world size {world_size}",
            f"precision: {precision.name} ({precision.reason})",
            f"seed: {seed}; data processes: {data_processes[0]} ({data_processes[1]}); deterministic algorithms: "
            f"{'on' if options.deterministic else 'off'}; torch.compile: {'on' if options.compile else 'off'}",
            f"run length: {b.epochs} epochs x {b.iterations_per_epoch} iterations (plans: {c.schedule.epochs} x "
            f"{c.schedule.iterations_per_epoch}), {b.val_iterations} validation iterations per epoch"
            + "".join(
                f"; re-planned from epoch {first + 1}: {iterations} iterations, {val} validation"
                for first, iterations, val in b.reschedules
            ),
            f"stages: {stages}",
            "optimizer and learning-rate schedule: " + ", ".join(f"{key} {value}" for key, value in schedule.items()),
            f"loss: {describe_loss(loss)}; network: {type(network).__name__}{layout}, {parameters:,} parameters",
            f"cases: {cases[0]} training, {cases[1]} validation (fold {fold})",
        ]
    )


def data_parallel_line(
    context: distributed.DistributedContext, configuration: Configuration, backend: str, normalization: str
) -> str:
    """The log line of a distributed run: world size, backend, each stage's global batch split over the ranks,
    what was done to the normalization layers."""
    shares = ", ".join(
        f"{s.name} {s.batch_size} = "
        + " + ".join(
            str(distributed.split_batch(s.batch_size, replace(context, rank=r))) for r in range(context.world_size)
        )
        for s in configuration.schedule.stages
    )
    return (
        f"distributed: world size {context.world_size} ({backend}, DistributedDataParallel); "
        f"global batch per stage split over the ranks: {shares}; {normalization}; each rank draws its own "
        "patches (seed, epoch, rank); only rank 0 writes"
    )


def epoch_time_line(seconds: float, timing: dict[str, float], estimated: float | None = None) -> str:
    """Measured (and ``estimated``, when the plans promised a time) seconds of an epoch, with the loader's wait
    and the steps' time (``timing``: ``loader_wait``, ``steps``)."""
    parts = [
        f"time: epoch {seconds:.1f} s",
        f"steps {timing['steps']:.1f} s",
        f"loader wait {timing['loader_wait']:.1f} s",
    ]
    if estimated is not None:
        parts.insert(1, f"estimated {estimated:.1f} s")
    return ", ".join(parts)


def check_training_time(promise: TimePromise, epochs: int, totals: dict[str, float]) -> str:
    """The log line comparing the measured training time of ``epochs`` epochs (``totals``: ``seconds``,
    ``estimated``, ``loader_wait``, ``steps``, ``iterations``) with the promise."""
    return promise.check(
        f"training time of {epochs} epochs",
        totals["seconds"],
        totals["estimated"],
        loader_wait=totals["loader_wait"],
        step_seconds=totals["steps"],
        steps=totals["iterations"],
    )[1]
