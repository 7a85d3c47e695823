"""The trainer registry and the base trainer, which owns the training loop.

A trainer subclass changes only what differs (network, optimizer, learning-rate schedule, ...) by overriding the
hooks :meth:`Trainer.build_network`, :meth:`Trainer.build_optimizer`, :meth:`Trainer.learning_rate` and, when
needed, :meth:`Trainer.build_loss`, :meth:`Trainer.loss_spec`, :meth:`Trainer.sampling_spec` or its
:class:`TrainerSettings`; behaviour that cuts across trainers (early stopping) is a handler attached to the loop
(``self.handlers``, :mod:`autoseg.train.events`). The loop calls ``autoseg.train`` modules for the rest: the run
length (:mod:`~autoseg.train.run_length`), checkpoints and the run folder (:mod:`~autoseg.train.checkpointing`),
the log and progress plot (:mod:`~autoseg.train.log`), validation (:mod:`~autoseg.train.validation`), and what the
plans' compute budget chose for this machine (:mod:`~autoseg.train.resources`).

The loop, per epoch: enter the epoch's stage (a new stage starts a fresh optimizer at the stage's learning rate
from the current weights), train the epoch's iterations (``run_length.iterations_at``) from a loader seeded by
(seed, epoch), measure the pseudo-Dice on its validation batches, tell the handlers, log, plot, and write
``checkpoint_latest.pth`` (plus ``checkpoint_best.pth`` and snapshots when due). Because batches depend only on
(seed, epoch) and a checkpoint holds every other state (weights, optimizer, grad scaler, random generators, the
handlers', the run length as re-planned), a resumed run continues exactly as the uninterrupted one would have.

A run with the plans' time promise has a deadline (:mod:`~autoseg.train.deadline`, a handler): after every epoch,
and every 30 s of training within one, it re-plans the iterations of the epoch under way and those still to come so
the fold ends when its compute budget does; at the end the run's speed goes into the cached probe of the machine
(``autoseg.plan.probe.record_training_speed``). Times are read from ``self.clock`` (``time.perf_counter``; a test
injects a simulated clock).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from autoseg import distributed
from autoseg.data.dataset import RawDataset
from autoseg.errors import UsageError
from autoseg.infer.predictor import Predictor
from autoseg.io.checkpoints import capture_rng_state
from autoseg.machine import choose_device, choose_precision, deterministic_algorithms
from autoseg.networks import build_network
from autoseg.networks.factory import NETWORK_OPTIONS_KEY
from autoseg.plan.probe import record_training_speed
from autoseg.plan.step_probe import TRAINING_FORMATS, choose_training_memory_format, format_name
from autoseg.plans import Loss, Plans, Sampling, Stage
from autoseg.registry import Registry
from autoseg.train import resources
from autoseg.train.checkpointing import (
    CHECKPOINT_FORMAT,
    prepare_output_folder,
    read_run_checkpoint,
    restore_run_rng,
    resume_point,
    save_run_checkpoint,
)
from autoseg.train.deadline import Deadline
from autoseg.train.events import EpochHandler
from autoseg.train.loading import BatchStream, derived_seed, make_loader
from autoseg.train.log import (
    TrainingLog,
    check_training_time,
    data_parallel_line,
    empty_history,
    epoch_time_line,
    format_epoch,
    plot_progress,
    run_header,
)
from autoseg.train.losses import build_loss
from autoseg.train.options import Fold, TrainingOptions
from autoseg.train.run_length import RunLength
from autoseg.train.splits import fold_cases
from autoseg.train.threads import ThreadCheck, threads_restored
from autoseg.train.time_promise import TimePromise
from autoseg.train.transfer import load_initial_weights
from autoseg.train.validation import dice_counts, global_dice, moving_average, validate_cases

_REGISTRY = Registry("trainers", "trainer")


@dataclass(frozen=True)
class TrainerSettings:
    """Hyper-parameters a trainer class fixes; the plans give patch, batch, learning rate, epochs and loss.

    Attributes:
        momentum: SGD momentum (Nesterov). Default 0.99 (nnU-Net).
        weight_decay: L2 penalty of the optimizer. Default 3e-5 (nnU-Net).
        poly_exponent: exponent of the polynomial learning-rate decay. Default 0.9 (nnU-Net).
        grad_clip_norm: gradients are clipped to this global norm; None: no clipping. Default 12 (nnU-Net).
        ema_alpha: weight of the old value in the moving average of the validation pseudo-Dice. Default 0.9.
        snapshot_fractions: keep ``checkpoint_snapshot_EPOCH.pth`` after these fractions of the last stage.
        time_check: check the run against the plans' time estimate (``autoseg.train.resources.time_promise``);
            False for a trainer whose network is not the one the estimate was made for. Default True.
    """

    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip_norm: float | None = 12.0
    ema_alpha: float = 0.9
    snapshot_fractions: tuple[float, ...] = ()
    time_check: bool = True


class Trainer:
    """Trains one fold of one configuration. Subclasses register themselves under their class name.

    The constructor only stores its arguments (a subclass attaches its handlers there); :meth:`setup` picks the
    device, builds network, loss and optimizer, prepares the output folder and (with ``options.continue_training``)
    loads the latest checkpoint, or starts afresh, saying so in the log, when no epoch completed; :meth:`fit` trains;
    :meth:`validate` predicts the fold's validation cases.

    Args:
        plans: the dataset's plans.
        configuration: name of the configuration to train.
        fold: 0..n-1 (a fold of ``splits_final.json``) or ``"all"``.
        preprocessed_folder: ``AUTOSEG_PREPROCESSED/<dataset>`` (plans, splits, data folders).
        output_folder: where the run writes its files (``autoseg.paths.run_folder``).
        options: run flags.
        raw_dataset: the raw dataset, whose label files score the end-of-fold validation.
    """

    settings: ClassVar[TrainerSettings] = TrainerSettings()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY.register(cls)

    def __init__(
        self,
        plans: Plans,
        configuration: str,
        fold: Fold,
        *,
        preprocessed_folder: Path,
        output_folder: Path,
        options: TrainingOptions | None = None,
        raw_dataset: RawDataset | None = None,
    ) -> None:
        self.plans = plans
        self.configuration = plans.configuration(configuration)
        self.fold = fold
        self.preprocessed_folder = Path(preprocessed_folder)
        self.data_folder = self.preprocessed_folder / self.configuration.data_identifier
        self.output_folder = Path(output_folder)
        self.options = options or TrainingOptions()
        self.raw_dataset = raw_dataset
        self.run_length = RunLength.from_schedule(
            self.configuration.schedule,
            self.options.epochs,
            self.options.iterations_per_epoch,
            self.options.val_iterations,
        )
        self.seed = self.options.seed
        self.context = distributed.current()  # torchrun's rank and world size; one process by default
        self.log = TrainingLog(self.output_folder / "log.txt", echo=self.options.echo, enabled=self.context.is_main)
        self.handlers: list[EpochHandler] = []  # called at every stage start and epoch end, in this order
        self.epoch = 0  # epochs finished
        self.stage_index = 0
        self.history = empty_history()
        self.best_ema = -math.inf
        self.train_cases: list[str] = []
        self.val_cases: list[str] = []
        # built by setup()
        self.device: torch.device | None = None
        self.network: nn.Module | None = None
        self.model: nn.Module | None = None  # the network, or its torch.compile wrapper
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss_settings: Loss = self.configuration.loss
        self.memory_format = torch.contiguous_format
        self.promise: TimePromise | None = None
        self.deadline: Deadline | None = None  # with the promise; attached to the handlers by setup()
        self.num_processes, self.num_processes_reason = resources.DEFAULT_DATA_PROCESSES, "default"
        self.clock = time.perf_counter  # every time the loop measures; a test injects a simulated clock
        self.timing = _epoch_timing(0.0)  # this epoch's, reset by fit()
        self.thread_check: ThreadCheck | None = None  # set by setup() on a CPU

    # ------------------------------------------------------------------ hooks
    @classmethod
    def network_options(cls) -> dict[str, Any]:
        """What this trainer asks :func:`autoseg.networks.build_network` for beyond the plan (another network
        built from the plan's numbers, an auxiliary head): a dict of str to str or bool, written into every
        checkpoint (``autoseg.networks.factory.NETWORK_OPTIONS_KEY``), from which ``autoseg_predict``, export and
        import rebuild the run's network. Default: nothing (the plan's own network)."""
        return {}

    def build_network(self) -> nn.Module:
        """The network to train, on the CPU (``setup`` moves it): the plan's, through
        :func:`autoseg.networks.build_network` with :meth:`network_options`. Subclasses check that the plan suits
        them, or load weights, around it."""
        return build_network(self.plans, self.configuration.name, **self.network_options())

    def start_from_initial_weights(self, network: nn.Module) -> str | None:
        """Start a new run's ``network`` (just built) from another model's weights, ``options.initial_weights``
        (``autoseg_train --init-from``): channels matched by name, shapes checked
        (:func:`autoseg.train.transfer.load_initial_weights`); returns the log line, or None without them."""
        if self.options.initial_weights is None:
            return None
        return load_initial_weights(
            network, self.options.initial_weights, self.plans, self.configuration.name, self.network_options()
        )

    def build_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """A fresh optimizer over the trainable parameters at ``stage.learning_rate``."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_optimizer()")

    def learning_rate(self, epoch: int, iteration: int) -> float:
        """Learning rate of training iteration ``iteration`` of ``epoch`` (0-based); a pure function, so a
        resumed run needs no scheduler state to continue the schedule."""
        raise NotImplementedError(f"{type(self).__name__} must implement learning_rate()")

    def schedule_description(self) -> dict[str, Any]:
        """The learning-rate schedule as a plain dict (logged and stored in checkpoints)."""
        return {"name": "custom"}

    def loss_spec(self) -> Loss:
        """The loss to train with (read once, by :meth:`setup`, into ``self.loss_settings``): the plans'."""
        return self.configuration.loss

    def sampling_spec(self) -> Sampling:
        """How training and validation patches are sampled: the plans'."""
        return self.configuration.sampling

    def build_loss(self) -> nn.Module:
        """``self.loss_settings`` over every deep-supervision output of the network."""
        return build_loss(self.loss_settings, self.deep_supervision_levels)

    @property
    def deep_supervision_levels(self) -> int:
        """Outputs of the network: one per decoder level with deep supervision (which needs at least two), else 1."""
        network = self.configuration.network
        levels = len(network.features) - 1
        return levels if network.deep_supervision and levels > 1 else 1

    @property
    def stage(self) -> Stage:
        return self.configuration.schedule.stages[self.stage_index]

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Device, precision, cases, network, loss, optimizer, output folder; resume when asked."""
        self.device, device_reason = choose_device(self.options.device)
        self.device = self.context.device(self.device)
        backend = distributed.join(self.context, self.device)
        self.precision = choose_precision(self.device, self.options.precision)
        self.num_processes, self.num_processes_reason = resources.data_processes(
            self.options.num_processes, self.plans, self.device
        )
        resources.configure_cpu_threads(self.device, self.context, self.num_processes, self.options.num_processes)
        self.thread_check = (  # the steps' threads, checked while training (not with --deterministic)
            ThreadCheck.for_run(torch.get_num_threads())
            if self.device.type == "cpu" and not self.context.enabled and not self.options.deterministic
            else None
        )
        # Before anything is written: a dataset that changed since its splits were made is refused here.
        raw_cases = None if self.raw_dataset is None else [case.identifier for case in self.raw_dataset.cases()]
        self.train_cases, self.val_cases = fold_cases(self.preprocessed_folder, self.data_folder, self.fold, raw_cases)
        path, afresh = resume_point(self.output_folder, self.options.continue_training, self.context.is_main)
        resumed = None
        if path is not None:
            resumed, self.run_length, self.seed = read_run_checkpoint(
                path, type(self).__name__, self.configuration.name, self.options, self.device
            )
        torch.manual_seed(self.seed)
        network = self.build_network()
        weights_line = self.start_from_initial_weights(network) if resumed is None else None
        self.loss_settings = self.loss_spec()  # after the network: a trainer's loss may say what it built
        self.loss = self.build_loss()
        self.memory_format, format_reason = self.choose_memory_format(network, resumed)
        self.network = network.to(self.device, memory_format=self.memory_format)
        self.model, normalization = self.network, ""
        if self.context.enabled:
            self.model, normalization = distributed.wrap_network(self.network, self.device)
            self.network = self.model.module  # SyncBatchNorm layers, where converted; checkpoints save this
        self.model = torch.compile(self.model) if self.options.compile else self.model
        self.stage_index = self.run_length.stage_at(0)
        self.optimizer = self.build_optimizer(self.stage)
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        if self.context.is_main:
            prepare_output_folder(self.output_folder, self.plans, self.configuration, resumed is not None)
            self.log.start(append=resumed is not None)
        distributed.barrier()  # the output folder exists before any rank writes validation files into it
        if afresh is not None:
            self.log(afresh)
        self._log_start(device_reason, resumed is not None, backend, normalization, format_reason)
        if weights_line is not None:
            self.log(weights_line)
        if resumed is not None:
            self.restore(resumed)
        return self

    def choose_memory_format(
        self, network: nn.Module, resumed: dict[str, Any] | None
    ) -> tuple[torch.memory_format, str]:
        """The memory format to train ``network`` (just built, on the CPU) in, and why: a continued run's as its
        checkpoint records it (resuming stays exact; one from before they were recorded: the plans' choice, as then);
        a new run's from the step probe of this network on this machine on the CPU
        (:func:`autoseg.plan.step_probe.choose_training_memory_format`), else the plans' choice."""
        if resumed is not None:
            recorded = resumed.get("memory_format")
            if recorded in TRAINING_FORMATS:
                return TRAINING_FORMATS[recorded], "as the run began (its checkpoint records it)"
            return resources.memory_format(self.plans, self.configuration, self.device, self.precision)
        return choose_training_memory_format(
            self.plans,
            self.configuration,
            network,
            self.loss,
            self.configuration.schedule.stages[self.run_length.stage_at(0)],
            self.device,
            self.precision,
            distributed=self.context.enabled,
        )

    def _log_start(
        self, device_reason: str, continued: bool, backend: str, normalization: str, format_reason: str
    ) -> None:
        """The log's header, the distributed and memory-format lines, and the time estimate (``self.promise``)."""
        self.log(
            run_header(
                trainer=type(self).__name__,
                dataset=self.plans.dataset,
                configuration=self.configuration,
                fold=self.fold,
                continued=continued,
                device=self.device,
                device_reason=device_reason,
                world_size=self.context.world_size,
                precision=self.precision,
                seed=self.seed,
                data_processes=(self.num_processes, self.num_processes_reason),
                options=self.options,
                run_length=self.run_length,
                schedule=self.schedule_description(),
                loss=self.loss_settings,
                network=self.network,
                cases=(len(self.train_cases), len(self.val_cases)),
            )
        )
        if self.context.enabled:
            self.log(data_parallel_line(self.context, self.configuration, backend, normalization))
        self.log(f"memory format: {format_name(self.memory_format)} ({format_reason})")
        self.promise = None
        if self.settings.time_check:
            self.promise = resources.time_promise(
                self.plans, self.configuration, self.device, self.precision, self.run_length
            )
        if self.promise is not None and self.context.enabled:
            self.log("time estimate: the plans' compute budget was measured for one process; not checked here")
            self.promise = None
        if self.promise is not None:
            self.log(self.promise.describe(self.plans.compute_budget.minutes))
        self.deadline = resources.deadline(
            self.plans, self.configuration, self.promise, self.run_length, self.options, self.output_folder
        )
        self.handlers = [handler for handler in self.handlers if not isinstance(handler, Deadline)]
        if self.deadline is not None:
            self.handlers.append(self.deadline)
            self.log(self.deadline.describe())

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        """Train from epoch ``self.epoch`` to the end of the run length, or until a handler asks to stop; then
        write ``checkpoint_final.pth``."""
        if self.network is None:
            raise RuntimeError("call setup() before fit()")
        first = self.epoch
        totals = {"loader_wait": 0.0, "steps": 0.0, "iterations": 0, "seconds": 0.0, "estimated": 0.0}
        with (
            deterministic_algorithms(self.options.deterministic, cudnn_benchmark=self.device.type == "cuda"),
            threads_restored(self.thread_check),
        ):
            for epoch in range(self.epoch, self.run_length.epochs):
                if any(handler.stop_requested() for handler in self.handlers):
                    break
                self.enter_stage(epoch)
                start = self.clock()
                self.timing = _epoch_timing(start)
                train_loss, learning_rate = self.train_epoch(epoch)
                val_loss, pseudo_dice = self.validate_epoch(epoch)
                self.end_epoch(
                    epoch,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    pseudo_dice=pseudo_dice,
                    learning_rate=learning_rate,
                    epoch_time=self.clock() - start,
                )
                for key in ("loader_wait", "steps", "iterations"):
                    totals[key] += self.timing[key]
                totals["seconds"] += self.clock() - start
                estimated = None
                if self.promise is not None:
                    estimated = self.promise.stage_epoch_seconds(
                        self.stage_index, int(self.timing["iterations"]), int(self.timing["val_iterations"])
                    )
                totals["estimated"] += estimated or 0.0
                self.log(epoch_time_line(self.clock() - start, self.timing, estimated))
        if self.promise is not None and totals["iterations"]:
            self.log(check_training_time(self.promise, self.epoch - first, totals))
        if self.deadline is not None:
            self.deadline.training_finished(self)
            speed = self.deadline.run_speed()  # against the plans' probe, recorded to correct later plans here
            if self.epoch > first and self.context.is_main and speed is not None:
                probe = self.plans.compute_budget.probe
                self.log(record_training_speed(probe, self.device, self.precision, speed, str(self.output_folder)))
        if self.epoch > first or not (self.output_folder / "checkpoint_final.pth").is_file():
            self.save("checkpoint_final.pth")
            best = (
                f"best moving-average pseudo-Dice {self.best_ema:.4f}"
                if math.isfinite(self.best_ema)
                else "no per-epoch validation"
            )
            self.log(f"training finished after {self.epoch} epochs; {best}")

    def enter_stage(self, epoch: int) -> None:
        """Switch to the stage of ``epoch``: a fresh optimizer at that stage's learning rate, same weights; the
        handlers hear that a stage started."""
        index = self.run_length.stage_at(epoch)
        if index == self.stage_index:
            return
        self.stage_index = index
        self.optimizer = self.build_optimizer(self.stage)
        s = self.stage
        self.log(
            f"stage {s.name} starts at epoch {epoch + 1}: patch {list(s.patch_size)}, batch {s.batch_size}, "
            f"lr {s.learning_rate:g}, continuing from the current weights"
        )
        for handler in self.handlers:
            handler.stage_started()

    def loader(self, epoch: int, train: bool) -> BatchStream:
        """Batches of ``epoch``, seeded by (seed, epoch) alone; validation batches are made in this process.

        In a distributed run each rank gets its share of the stage's batch (``distributed.split_batch``) and its
        own seed (rank 0 keeps the single-process one)."""
        configuration = replace(self.configuration, sampling=self.sampling_spec())
        stage = replace(self.stage, batch_size=distributed.split_batch(self.stage.batch_size, self.context))
        rank = (self.context.rank,) if self.context.rank else ()
        return make_loader(
            self.data_folder,
            self.train_cases if train else self.val_cases,
            configuration,
            stage,
            self.num_processes if train else 0,
            derived_seed(self.seed, epoch, 0 if train else 1, *rank),
            train,
            pin_memory=self.device.type == "cuda",
        )

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Mean training loss of ``epoch`` and its learning rate at the first iteration. The handlers hear of every
        iteration (a deadline may shorten or lengthen the epoch under way: its iterations are read anew each time)."""
        self.model.train()
        losses, first_rate, check = [], self.learning_rate(epoch, 0), self.thread_check
        with self.loader(epoch, train=True) as batches:
            iteration = 0
            while iteration < (iterations := self.run_length.iterations_at(epoch)):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.learning_rate(epoch, iteration)
                if check is not None:
                    check.before_step(epoch, iteration, iterations)
                waited = self.clock()
                batch = next(batches)
                stepped = self.clock()
                losses.append(self.train_step(batch))
                done = self.clock()
                self.timing["loader_wait"] += stepped - waited
                self.timing["steps"] += done - stepped
                self.timing["training"] = self.timing["loader_wait"] + self.timing["steps"]
                self.timing["iterations"] += 1
                said = [] if check is None else [check.step_done(epoch, iteration, iterations, done - stepped)]
                iteration += 1
                said += [
                    line for handler in self.handlers for line in handler.iteration_completed(self, epoch, iteration)
                ]
                for line in said:
                    if line is not None:
                        self.log(line)
        total = distributed.sum_(torch.tensor([sum(losses), len(losses)], dtype=torch.float64))
        return float(total[0] / total[1]), first_rate

    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimizer step on ``batch``; returns the loss."""
        data = batch["data"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        target = batch["seg"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.precision.autocast_dtype, enabled=self.precision.autocast_dtype is not None
        ):
            loss = self.loss(self.model(data), target)
        weight = distributed.loss_weight(self.stage.batch_size, self.context)  # 1 for one process
        self.grad_scaler.scale(loss * weight if weight != 1 else loss).backward()
        if self.settings.grad_clip_norm is not None:
            self.grad_scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), self.settings.grad_clip_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def validate_epoch(self, epoch: int) -> tuple[float, float]:
        """Mean loss and pseudo-Dice (global Dice of TP/FP/FN summed over all batches) of validation patches."""
        batches_due = self.run_length.val_iterations_at(epoch)
        if batches_due == 0:
            return math.nan, math.nan
        start = self.clock()
        self.model.eval()
        classes = sum(1 for value in self.plans.labels.values() if value != 0)  # K: one sigmoid output each
        losses, counts = [], torch.zeros((3, classes), dtype=torch.long)
        with self.loader(epoch, train=False) as batches:
            for _ in range(batches_due):
                batch = next(batches)
                data = batch["data"].to(self.device, non_blocking=True)
                target = batch["seg"].to(self.device, non_blocking=True)
                with torch.autocast(
                    self.device.type,
                    dtype=self.precision.autocast_dtype,
                    enabled=self.precision.autocast_dtype is not None,
                ):
                    output = self.model(data)
                    losses.append(float(self.loss(output, target)))
                counts += dice_counts(output[0] if isinstance(output, (list, tuple)) else output, target)
        total = distributed.sum_(torch.tensor([sum(losses), len(losses)], dtype=torch.float64))
        self.timing["validation"] += self.clock() - start
        self.timing["val_iterations"] += batches_due
        return float(total[0] / total[1]), global_dice(distributed.sum_(counts))

    def end_epoch(self, epoch: int, **record: float) -> None:
        """Tell the handlers, record, log and plot the epoch; write the latest (and, when due, best and snapshot)
        checkpoints; then log what the handlers said."""
        previous = self.history["ema_pseudo_dice"][-1] if self.history["ema_pseudo_dice"] else math.nan
        ema = moving_average(previous, record["pseudo_dice"], self.settings.ema_alpha)
        said = [line for handler in self.handlers for line in handler.epoch_completed(self, epoch, ema)]
        for key, value in {"epoch": epoch, "stage": self.stage.name, **record, "ema_pseudo_dice": ema}.items():
            self.history[key].append(value)
        self.epoch = epoch + 1
        self.log(format_epoch(self.history, -1, self.run_length.epochs))
        if self.context.is_main:
            stage_starts = [s for s in self.run_length.stage_starts if s]
            plot_progress(self.history, self.output_folder / "progress.png", stage_starts)
        # The latest checkpoint goes last: a run killed before it repeats this epoch, and with it these files.
        if not math.isnan(ema) and ema > self.best_ema:
            self.best_ema = ema
            self.save("checkpoint_best.pth")
            self.log(f"new best moving-average pseudo-Dice {ema:.4f}: checkpoint_best.pth")
        if self.epoch in self.run_length.snapshot_epochs(self.settings.snapshot_fractions):
            self.save(f"checkpoint_snapshot_{self.epoch}.pth")
            self.log(f"snapshot kept: checkpoint_snapshot_{self.epoch}.pth")
        self.save("checkpoint_latest.pth")
        for line in said:
            self.log(line)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as tensors and plain values (``autoseg.train.checkpointing``);
        each handler's state under its key."""
        return {
            "format": CHECKPOINT_FORMAT,
            "trainer": type(self).__name__,
            "configuration": self.configuration.name,
            "fold": self.fold,
            "network": self.network.state_dict(),
            "memory_format": format_name(self.memory_format),  # a continued run keeps it, so resuming stays exact
            NETWORK_OPTIONS_KEY: self.network_options(),  # prediction rebuilds the network from this record
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": {**self.schedule_description(), "last_lr": self.optimizer.param_groups[0]["lr"]},
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler.is_enabled() else {},
            "epoch": self.epoch,
            "stage": self.stage_index,
            "run_length": self.run_length.to_plain(),
            "history": self.history,
            "best_ema_pseudo_dice": self.best_ema,
            "seed": self.seed,
            "rng": capture_rng_state(),
            "world_size": self.context.world_size,
            "threads": self.thread_check.state_dict() if self.thread_check is not None else {},
            **{handler.key: handler.state_dict() for handler in self.handlers},
        }

    def save(self, name: str) -> Path:
        """Write :meth:`checkpoint_state` to ``output_folder / name`` atomically (every rank calls this; rank 0
        writes: ``autoseg.train.checkpointing.save_run_checkpoint``)."""
        return save_run_checkpoint(self.checkpoint_state(), self.output_folder / name, self.context)

    def restore(self, state: dict[str, Any]) -> None:
        """Put a checkpoint's weights, optimizer, grad scaler, epoch, stage, history, handler and random generator
        states into this set-up trainer."""
        self.network.load_state_dict(state["network"])
        self.epoch, self.stage_index = int(state["epoch"]), int(state["stage"])
        self.optimizer = self.build_optimizer(self.stage)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.grad_scaler.is_enabled() and state["grad_scaler"]:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.history = {key: list(values) for key, values in state["history"].items()}
        self.best_ema = float(state["best_ema_pseudo_dice"])
        message = restore_run_rng(state, self.context)
        if message is not None:
            self.log(message)
        self.log(
            f"continuing from {Path(state['path']).name} after epoch {self.epoch} (stage {self.stage.name}, "
            f"seed {self.seed})"
        )
        for handler in self.handlers:
            handler.load_state_dict(state.get(handler.key, {}))
        if self.thread_check is not None:
            self.thread_check.load_state_dict(state.get("threads", {}))
            torch.set_num_threads(self.thread_check.current)

    # ------------------------------------------------------------------ end of fold
    def validate(self) -> dict[str, Any]:
        """Predict the fold's validation cases (sliding window, mirroring, post-processing), write them to
        ``validation/`` and score them against the raw labels in ``validation/summary.json``."""
        if self.network is None:
            raise RuntimeError("call setup() before validate()")
        if self.raw_dataset is None:
            raise UsageError("validation needs the raw dataset, whose label files are the reference")
        raw_cases = self.raw_dataset.cases()
        references = {case.identifier: case.label for case in raw_cases}
        predictor = Predictor(
            self.configuration, [self.network], device=self.device, autocast_dtype=self.precision.autocast_dtype
        )
        self.log(f"validation: predicting {len(self.val_cases)} case(s) with sliding-window inference")
        about = {
            "trainer": type(self).__name__,
            "configuration": self.configuration.name,
            "fold": self.fold,
            "epochs_trained": self.epoch,
            "postprocessing": dict(vars(self.configuration.postprocessing)),
        }
        start = self.clock()
        with deterministic_algorithms(self.options.deterministic, cudnn_benchmark=self.device.type == "cuda"):
            summary = validate_cases(
                predictor,
                self.data_folder,
                self.val_cases,
                references,
                self.output_folder / "validation",
                about,
                images={case.identifier: case.images[0] for case in raw_cases},
                context=self.context,
                labels=self.plans.labels,
            )
        seconds = self.clock() - start
        if self.promise is not None:
            self.log(self.promise.check("end-of-fold validation", seconds, self.promise.final_validation_seconds)[1])
        if self.deadline is not None:
            self.log(self.deadline.fold_finished(seconds))
        self.log(
            f"validation: mean Dice {summary['mean']['dice']:.4f}, mean HD95 "
            f"{summary['mean']['hausdorff95']:.2f} mm over {len(self.val_cases)} case(s): validation/summary.json"
        )
        return summary


def _epoch_timing(started: float) -> dict[str, float]:
    """An epoch's timing record (seconds; ``started`` a clock reading), filled in by the loop."""
    return {
        "started": started,
        "loader_wait": 0.0,
        "steps": 0.0,
        "iterations": 0,
        "training": 0.0,
        "validation": 0.0,
        "val_iterations": 0,
    }


def available_trainers() -> list[str]:
    """Sorted names of every trainer in the package."""
    return _REGISTRY.names()


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    """Make a trainer defined outside the ``trainers`` package (a script, a notebook) available by name, e.g. to
    ``autoseg.api.train.train(..., trainer="MyTrainer")``; usable as a class decorator. Trainers in the package
    register themselves."""
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise TypeError(f"{cls!r} is not a Trainer subclass")
    return _REGISTRY.register(cls, explicit=True)


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class called ``name``.

    Raises:
        KeyError: unknown name; the message lists the known trainers.
    """
    return _REGISTRY.get(name)
