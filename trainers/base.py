"""The trainer registry and the base trainer, which owns the training loop.

A trainer subclass changes only what differs (network, optimizer, learning-rate schedule, ...) by overriding the
hooks :meth:`Trainer.build_network`, :meth:`Trainer.build_optimizer`, :meth:`Trainer.learning_rate` and, when
needed, :meth:`Trainer.build_loss`, :meth:`Trainer.loss_spec`, :meth:`Trainer.sampling_spec` or its
:class:`TrainerSettings`. Data loading, logging, checkpoints, device and
precision live in ``autoseg`` modules the loop calls.

The loop, per epoch: enter the epoch's stage (a new stage starts a fresh optimizer at the stage's learning rate
from the current weights), train ``iterations_per_epoch`` batches from a loader seeded by (seed, epoch), measure
the pseudo-Dice on ``val_iterations`` validation batches, log, plot, and write ``checkpoint_latest.pth`` (plus
``checkpoint_best.pth`` and snapshots when due). Because batches depend only on (seed, epoch) and a checkpoint
holds every other state (weights, optimizer, grad scaler, random generators), a resumed run continues exactly as
the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from autoseg import distributed
from autoseg.data.dataset import RawDataset
from autoseg.errors import ExistingOutputError, UsageError
from autoseg.infer.predictor import Predictor
from autoseg.io.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from autoseg.machine import available_cores, choose_device, choose_precision, configure_threads
from autoseg.networks import build_network
from autoseg.networks.factory import NETWORK_OPTIONS_KEY
from autoseg.paths import PLANS_FILE
from autoseg.plans import Loss, Plans, PlansError, Sampling, Stage
from autoseg.registry import Registry
from autoseg.train.loading import BatchStream, derived_seed, make_loader
from autoseg.train.log import TrainingLog, empty_history, format_epoch, plot_progress
from autoseg.train.losses import build_loss
from autoseg.train.options import Fold, TrainingOptions
from autoseg.train.time_promise import TimePromise
from trainers.toolkit import (
    Budget,
    deterministic_algorithms,
    dice_counts,
    fold_cases,
    global_dice,
    validate_cases,
)

_REGISTRY = Registry("trainers", "trainer")
CHECKPOINT_FORMAT = 1
#: Augmentation processes when neither ``-np`` nor the plans' compute budget says.
DEFAULT_DATA_PROCESSES = 2


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
    """

    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip_norm: float | None = 12.0
    ema_alpha: float = 0.9
    snapshot_fractions: tuple[float, ...] = ()


class Trainer:
    """Trains one fold of one configuration. Subclasses register themselves under their class name.

    The constructor only stores its arguments; :meth:`setup` picks the device, builds network, loss and optimizer,
    prepares the output folder and (with ``options.continue_training``) loads the latest checkpoint, or starts
    afresh, saying so in the log, when no epoch completed;
    :meth:`fit` trains; :meth:`validate` predicts the fold's validation cases.

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
        self.budget = Budget.from_schedule(
            self.configuration.schedule,
            self.options.epochs,
            self.options.iterations_per_epoch,
            self.options.val_iterations,
        )
        self.seed = self.options.seed
        self.context = distributed.current()  # torchrun's rank and world size; one process by default
        self.log = TrainingLog(self.output_folder / "log.txt", echo=self.options.echo, enabled=self.context.is_main)
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
        self.num_processes, self.num_processes_reason = DEFAULT_DATA_PROCESSES, "default"
        self.timing = {"loader_wait": 0.0, "steps": 0.0, "iterations": 0}  # this epoch's, reset by fit()

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

    def should_stop(self) -> bool:
        """True to end training before the budget's last epoch (early stopping); asked before every epoch, so a
        run continued after it stopped ends at once. Default: never."""
        return False

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
    def num_classes(self) -> int:
        """K: foreground labels of the plans (one sigmoid output each)."""
        return sum(1 for value in self.plans.labels.values() if value != 0)

    @property
    def stage(self) -> Stage:
        return self.configuration.schedule.stages[self.stage_index]

    def snapshot_epochs(self) -> list[int]:
        """Epoch counts after which a snapshot is kept: ``settings.snapshot_fractions`` of the last stage."""
        start = self.budget.stage_starts[-1]
        length = self.budget.epochs - start
        return sorted({start + max(1, math.floor(length * f + 0.5)) for f in self.settings.snapshot_fractions})

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Device, precision, cases, network, loss, optimizer, output folder; resume when asked."""
        self.device, device_reason = choose_device(self.options.device)
        self.device = self.context.device(self.device)
        backend = distributed.join(self.context, self.device)
        self.precision = choose_precision(self.device, self.options.precision)
        self.num_processes, self.num_processes_reason = self.choose_num_processes()
        self._configure_cpu_threads()
        # Before anything is written: a dataset that changed since its splits were made is refused here.
        raw_cases = None if self.raw_dataset is None else [case.identifier for case in self.raw_dataset.cases()]
        self.train_cases, self.val_cases = fold_cases(self.preprocessed_folder, self.data_folder, self.fold, raw_cases)
        resumed, afresh = None, None
        if self.options.continue_training:
            path = self._checkpoint_to_continue()
            if path is None:
                afresh = (
                    f"--continue: no epoch completed yet (no checkpoint_latest.pth in {self.output_folder}); "
                    "starting afresh"
                )
                stale = [p.name for p in self._remove_incomplete_run()] if self.context.is_main else []
                afresh += f" (removed {', '.join(stale)} of the run that stopped)" if stale else ""
            else:
                resumed = self.read_checkpoint(path)
        else:
            self.refuse_overwrite()
        torch.manual_seed(self.seed)
        self.memory_format, format_reason = self.choose_memory_format()
        self.network = self.build_network().to(self.device, memory_format=self.memory_format)
        normalization = self._wrap_for_data_parallel()
        self.model = torch.compile(self.model) if self.options.compile else self.model
        self.loss_settings = self.loss_spec()
        self.loss = self.build_loss()
        self.stage_index = self.budget.stage_at(0)
        self.optimizer = self.build_optimizer(self.stage)
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        if self.context.is_main:
            self._prepare_output_folder(resumed is not None)
        distributed.barrier()  # the output folder exists before any rank writes validation files into it
        if afresh is not None:
            self.log(afresh)
        self._log_header(device_reason, continued=resumed is not None)
        if self.context.enabled:
            self._log_data_parallel(backend, normalization)
        self.log(
            f"memory format: {'channels_last_3d' if self.memory_format == torch.channels_last_3d else 'contiguous'}"
            f" ({format_reason})"
        )
        self.promise = self.time_promise()
        if self.promise is not None and self.context.enabled:
            self.log("time estimate: the plans' compute budget was measured for one process; not checked here")
            self.promise = None
        if self.promise is not None:
            p = self.promise
            self.log(
                f"time estimate (plans' compute budget): {p.training_seconds / 60:.1f} min of training "
                f"({p.epoch_seconds:.1f} s per epoch: {p.network_seconds + p.loader_seconds:.2f} s per iteration) + "
                f"{p.final_validation_seconds / 60:.1f} min of final validation = {p.total_seconds / 60:.1f} min "
                f"of a {self.plans.compute_budget.minutes:g}-minute budget"
            )
        if resumed is not None:
            self.restore(resumed)
        return self

    def _configure_cpu_threads(self) -> None:
        """On the CPU, torch's threads: this node's cores shared by its ranks, minus the augmentation processes
        when the plans' compute budget chose them."""
        if self.device.type != "cpu":
            return
        cores = available_cores() // self.context.local_world_size
        if self.num_processes and self.options.num_processes is None:
            configure_threads(max(1, cores - self.num_processes))  # the loader has the other cores
        elif self.context.enabled:
            configure_threads(max(1, cores))  # the ranks share the cores

    def _wrap_for_data_parallel(self) -> str:
        """``self.model``: the network, in DistributedDataParallel when this is one rank of several; returns what
        was done to its normalization (empty for one process)."""
        self.model = self.network
        if not self.context.enabled:
            return ""
        self.model, normalization = distributed.wrap_network(self.network, self.device)
        self.network = self.model.module  # SyncBatchNorm layers, where converted; checkpoints save this
        return normalization

    def _log_data_parallel(self, backend: str, normalization: str) -> None:
        shares = ", ".join(
            f"{s.name} {s.batch_size} = "
            + " + ".join(
                str(distributed.split_batch(s.batch_size, replace(self.context, rank=r)))
                for r in range(self.context.world_size)
            )
            for s in self.configuration.schedule.stages
        )
        self.log(
            f"distributed: world size {self.context.world_size} ({backend}, DistributedDataParallel); "
            f"global batch per stage split over the ranks: {shares}; {normalization}; each rank draws its own "
            "patches (seed, epoch, rank); only rank 0 writes"
        )

    def choose_memory_format(self) -> tuple[torch.memory_format, str]:
        """``channels_last_3d`` when the plans' compute-budget probe found it faster for training on this kind of
        device and precision (3-D networks only), else contiguous."""
        budget = self.plans.compute_budget
        if self.configuration.dimension != 3:
            return torch.contiguous_format, "2-D network"
        if budget is None:
            return torch.contiguous_format, "no compute-budget probe in the plans"
        if budget.device != self.device.type or budget.precision != self.precision.name:
            return torch.contiguous_format, (
                f"the plans were probed on {budget.device} in {budget.precision}, this "
                f"run is on {self.device.type} in {self.precision.name}"
            )
        chosen = torch.channels_last_3d if budget.memory_format == "channels_last_3d" else torch.contiguous_format
        return chosen, f"faster in the compute-budget probe ({budget.probe.get('created', 'date unknown')})"

    def choose_num_processes(self) -> tuple[int, str]:
        """Background augmentation processes: ``-np`` when given, else the plans' compute-budget choice for this
        device, else 2."""
        if self.options.num_processes is not None:
            return self.options.num_processes, "requested"
        budget = self.plans.compute_budget
        if budget is not None and budget.device == self.device.type:
            return budget.data_processes, "the plans' compute budget: " + budget.reasons.get("data_processes", "")
        return DEFAULT_DATA_PROCESSES, "default"

    def time_promise(self) -> TimePromise | None:
        """The plans' time estimate for this run (rescaled to its epochs and iterations), when the plans were
        fitted to a compute budget on this kind of device and precision."""
        budget = self.plans.compute_budget
        estimate = budget.estimates.get(self.configuration.name) if budget is not None else None
        if estimate is None or budget.device != self.device.type or budget.precision != self.precision.name:
            return None
        return TimePromise.from_estimate(
            estimate, self.budget.epochs, self.budget.iterations_per_epoch, self.budget.val_iterations
        )

    def _checkpoint_to_continue(self) -> Path | None:
        """The checkpoint of the last completed epoch (``checkpoint_latest.pth``, else ``checkpoint_final.pth``);
        None when no epoch completed (a run stopped, e.g. by a full disk, before its first latest checkpoint: a
        ``checkpoint_best.pth`` written just before does not count)."""
        for name in ("checkpoint_latest.pth", "checkpoint_final.pth"):
            if (self.output_folder / name).is_file():
                return self.output_folder / name
        return None

    def _remove_incomplete_run(self) -> list[Path]:
        """Delete ``checkpoint_best.pth`` and snapshots of a run that completed no epoch (they were written just
        before its first ``checkpoint_latest.pth`` failed); returns what was removed."""
        found = [self.output_folder / "checkpoint_best.pth", *self.output_folder.glob("checkpoint_snapshot_*.pth")]
        removed = [path for path in found if path.is_file()]
        for path in removed:
            path.unlink()
        return removed

    def refuse_overwrite(self) -> None:
        """A new run never silently replaces one that has checkpoints (a forgotten ``--continue`` would)."""
        found = [
            name for name in ("checkpoint_latest.pth", "checkpoint_final.pth") if (self.output_folder / name).is_file()
        ]
        if found:
            raise ExistingOutputError(
                f"{self.output_folder} already holds a run ({found[0]}); resume it with --continue, "
                "or delete the folder to start anew"
            )

    def _prepare_output_folder(self, resuming: bool) -> None:
        self.output_folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.output_folder)
        copy = self.output_folder / PLANS_FILE
        if resuming and copy.is_file():
            before = Plans.from_json(copy).configurations.get(self.configuration.name)
            if before is None or replace(before, reasons={}) != replace(self.configuration, reasons={}):
                raise PlansError(
                    f"{copy}: configuration '{self.configuration.name}' of the plans changed since this "
                    "run started; start a new run (without --continue) or restore the plans"
                )
        else:
            self.plans.to_json(copy)
        self.log.start(append=resuming)

    def _log_header(self, device_reason: str, continued: bool = False) -> None:
        c, b = self.configuration, self.budget
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        stages = "; ".join(
            f"{s.name} from epoch {start + 1} (patch {list(s.patch_size)}, batch {s.batch_size}, "
            f"lr {s.learning_rate:g})"
            for s, start in zip(c.schedule.stages, b.stage_starts)
        )
        parameters = sum(p.numel() for p in self.network.parameters())
        self.log(
            "\n".join(
                [
                    f"autoseg training: trainer {type(self).__name__}, configuration {c.name}, fold {self.fold}, "
                    f"dataset {self.plans.dataset}" + (" (continued)" if continued else ""),
                    f"device: {self.device} ({device_reason}){threads}; world size {self.context.world_size}",
                    f"precision: {self.precision.name} ({self.precision.reason})",
                    f"seed: {self.seed}; data processes: {self.num_processes} ({self.num_processes_reason}); "
                    "deterministic algorithms: "
                    f"{'on' if self.options.deterministic else 'off'}; torch.compile: {'on' if self.options.compile else 'off'}",
                    f"budget: {b.epochs} epochs x {b.iterations_per_epoch} iterations (plans: {c.schedule.epochs} x "
                    f"{c.schedule.iterations_per_epoch}), {b.val_iterations} validation iterations per epoch",
                    f"stages: {stages}",
                    "optimizer and learning-rate schedule: "
                    + ", ".join(f"{key} {value}" for key, value in self.schedule_description().items()),
                    f"loss: {describe_loss(self.loss_settings)}; network: {type(self.network).__name__}, {parameters:,} parameters",
                    f"cases: {len(self.train_cases)} training, {len(self.val_cases)} validation (fold {self.fold})",
                ]
            )
        )

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        """Train from epoch ``self.epoch`` to the end of the budget; then write ``checkpoint_final.pth``."""
        if self.network is None:
            raise RuntimeError("call setup() before fit()")
        first = self.epoch
        totals = {"loader_wait": 0.0, "steps": 0.0, "iterations": 0, "seconds": 0.0, "estimated": 0.0}
        with self.algorithms():
            for epoch in range(self.epoch, self.budget.epochs):
                if self.should_stop():
                    break
                self.enter_stage(epoch)
                start = time.perf_counter()
                self.timing = {"loader_wait": 0.0, "steps": 0.0, "iterations": 0}
                train_loss, learning_rate = self.train_epoch(epoch)
                val_loss, pseudo_dice = self.validate_epoch(epoch)
                self.end_epoch(
                    epoch,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    pseudo_dice=pseudo_dice,
                    learning_rate=learning_rate,
                    epoch_time=time.perf_counter() - start,
                )
                for key in ("loader_wait", "steps", "iterations"):
                    totals[key] += self.timing[key]
                totals["seconds"] += time.perf_counter() - start
                if self.promise is not None:
                    totals["estimated"] += self.promise.stage_epoch_seconds(self.stage_index)
                self._log_epoch_time(time.perf_counter() - start)
        if self.promise is not None and totals["iterations"]:
            epochs = self.epoch - first
            _, line = self.promise.check(
                f"training time of {epochs} epochs",
                totals["seconds"],
                totals["estimated"],
                loader_wait=totals["loader_wait"],
                step_seconds=totals["steps"],
                steps=totals["iterations"],
            )
            self.log(line)
        if self.epoch > first or not (self.output_folder / "checkpoint_final.pth").is_file():
            self.save("checkpoint_final.pth")
            best = (
                f"best moving-average pseudo-Dice {self.best_ema:.4f}"
                if math.isfinite(self.best_ema)
                else "no per-epoch validation"
            )
            self.log(f"training finished after {self.epoch} epochs; {best}")

    def algorithms(self) -> contextlib.AbstractContextManager[None]:
        """The block's algorithm settings: deterministic ones with ``--deterministic``; on CUDA otherwise cuDNN's
        autotuner, since patch sizes are fixed (restored afterwards)."""
        return deterministic_algorithms(self.options.deterministic, cudnn_benchmark=self.device.type == "cuda")

    def _log_epoch_time(self, seconds: float) -> None:
        """Measured vs estimated time of the epoch just finished, with the loader's wait and the steps' time."""
        t = self.timing
        parts = [f"time: epoch {seconds:.1f} s", f"steps {t['steps']:.1f} s", f"loader wait {t['loader_wait']:.1f} s"]
        if self.promise is not None:
            parts.insert(1, f"estimated {self.promise.stage_epoch_seconds(self.stage_index):.1f} s")
        self.log(", ".join(parts))

    def enter_stage(self, epoch: int) -> None:
        """Switch to the stage of ``epoch``: a fresh optimizer at that stage's learning rate, same weights."""
        index = self.budget.stage_at(epoch)
        if index == self.stage_index:
            return
        self.stage_index = index
        self.optimizer = self.build_optimizer(self.stage)
        s = self.stage
        self.log(
            f"stage {s.name} starts at epoch {epoch + 1}: patch {list(s.patch_size)}, batch {s.batch_size}, "
            f"lr {s.learning_rate:g}, continuing from the current weights"
        )

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
        """Mean training loss of ``epoch`` and its learning rate at the first iteration."""
        self.model.train()
        losses, first_rate = [], self.learning_rate(epoch, 0)
        with self.loader(epoch, train=True) as batches:
            for iteration in range(self.budget.iterations_per_epoch):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.learning_rate(epoch, iteration)
                waited = time.perf_counter()
                batch = next(batches)
                stepped = time.perf_counter()
                losses.append(self.train_step(batch))
                self.timing["loader_wait"] += stepped - waited
                self.timing["steps"] += time.perf_counter() - stepped
                self.timing["iterations"] += 1
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
        if self.budget.val_iterations == 0:
            return math.nan, math.nan
        self.model.eval()
        losses, counts = [], torch.zeros((3, self.num_classes), dtype=torch.long)
        with self.loader(epoch, train=False) as batches:
            for _ in range(self.budget.val_iterations):
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
        return float(total[0] / total[1]), global_dice(distributed.sum_(counts))

    def end_epoch(self, epoch: int, **record: float) -> None:
        """Record, log and plot the epoch; write the latest (and, when due, best and snapshot) checkpoints."""
        ema = self.moving_average(record["pseudo_dice"])
        for key, value in {"epoch": epoch, "stage": self.stage.name, **record, "ema_pseudo_dice": ema}.items():
            self.history[key].append(value)
        self.epoch = epoch + 1
        self.log(format_epoch(self.history, -1, self.budget.epochs))
        if self.context.is_main:
            plot_progress(self.history, self.output_folder / "progress.png", [s for s in self.budget.stage_starts if s])
        # The latest checkpoint goes last: a run killed before it repeats this epoch, and with it these files.
        if not math.isnan(ema) and ema > self.best_ema:
            self.best_ema = ema
            self.save("checkpoint_best.pth")
            self.log(f"new best moving-average pseudo-Dice {ema:.4f}: checkpoint_best.pth")
        if self.epoch in self.snapshot_epochs():
            self.save(f"checkpoint_snapshot_{self.epoch}.pth")
            self.log(f"snapshot kept: checkpoint_snapshot_{self.epoch}.pth")
        self.save("checkpoint_latest.pth")

    def moving_average(self, dice: float) -> float:
        """The moving-average pseudo-Dice once ``dice`` (NaN: no validation) joins the history's."""
        previous = self.history["ema_pseudo_dice"][-1] if self.history["ema_pseudo_dice"] else math.nan
        alpha = self.settings.ema_alpha
        return previous if math.isnan(dice) else dice if math.isnan(previous) else alpha * previous + (1 - alpha) * dice

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as tensors and plain values."""
        return {
            "format": CHECKPOINT_FORMAT,
            "trainer": type(self).__name__,
            "configuration": self.configuration.name,
            "fold": self.fold,
            "network": self.network.state_dict(),
            NETWORK_OPTIONS_KEY: self.network_options(),  # prediction rebuilds the network from this record
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": {**self.schedule_description(), "last_lr": self.optimizer.param_groups[0]["lr"]},
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler.is_enabled() else {},
            "epoch": self.epoch,
            "stage": self.stage_index,
            "budget": self.budget.to_plain(),
            "history": self.history,
            "best_ema_pseudo_dice": self.best_ema,
            "seed": self.seed,
            "rng": capture_rng_state(),
            "world_size": self.context.world_size,
        }

    def save(self, name: str) -> Path:
        """Write :meth:`checkpoint_state` to ``output_folder / name`` atomically. In a distributed run every
        rank calls this (their random generator states are gathered into ``rng_ranks``) and rank 0 writes."""
        path = self.output_folder / name
        state = self.checkpoint_state()
        if self.context.enabled:
            state["rng_ranks"] = distributed.gather_objects(state["rng"])
        if self.context.is_main:
            save_checkpoint(state, path)
        return path

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read a checkpoint of this trainer and configuration to continue from, and adopt its budget and seed
        (stage boundaries and batches stay those of the run that wrote it)."""
        state = load_checkpoint(path, map_location=self.device or "cpu")
        if state.get("trainer") != type(self).__name__ or state.get("configuration") != self.configuration.name:
            raise CheckpointError(
                f"{path}: written by {state.get('trainer')} for configuration "
                f"{state.get('configuration')}, not {type(self).__name__} for {self.configuration.name}"
            )
        saved, o = Budget.from_plain(state["budget"]), self.options
        if (o.epochs or saved.epochs) != saved.epochs or (
            o.iterations_per_epoch or saved.iterations_per_epoch
        ) != saved.iterations_per_epoch:
            raise UsageError(
                f"{path}: this run trains {saved.epochs} epochs x {saved.iterations_per_epoch} "
                "iterations; continue it with the same --epochs/--iters-per-epoch (or leave them out)"
            )
        self.budget = replace(
            saved, val_iterations=saved.val_iterations if o.val_iterations is None else o.val_iterations
        )
        self.seed = int(state["seed"])
        return {**state, "path": str(path)}

    def restore(self, state: dict[str, Any]) -> None:
        """Put a checkpoint's weights, optimizer, grad scaler, epoch, stage, history and random generator states
        into this set-up trainer."""
        self.network.load_state_dict(state["network"])
        self.epoch, self.stage_index = int(state["epoch"]), int(state["stage"])
        self.optimizer = self.build_optimizer(self.stage)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.grad_scaler.is_enabled() and state["grad_scaler"]:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.history = {key: list(values) for key, values in state["history"].items()}
        self.best_ema = float(state["best_ema_pseudo_dice"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != self.context.world_size:
            self.log(
                f"continuing with {self.context.world_size} process(es) a run saved by {len(ranks)}: the weights "
                "and schedule continue, the batches differ from an uninterrupted run"
            )
        restore_rng_state(ranks[self.context.rank] if self.context.rank < len(ranks) else ranks[0])
        self.log(
            f"continuing from {Path(state['path']).name} after epoch {self.epoch} (stage {self.stage.name}, "
            f"seed {self.seed})"
        )

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
        start = time.perf_counter()
        with self.algorithms():
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
        if self.promise is not None:
            self.log(
                self.promise.check(
                    "end-of-fold validation", time.perf_counter() - start, self.promise.final_validation_seconds
                )[1]
            )
        self.log(
            f"validation: mean Dice {summary['mean']['dice']:.4f}, mean HD95 "
            f"{summary['mean']['hausdorff95']:.2f} mm over {len(self.val_cases)} case(s): validation/summary.json"
        )
        return summary


def describe_loss(loss: Loss) -> str:
    """One line naming a loss and its non-zero terms, e.g. ``weighted_ce (lesion weight 19.3)`` or
    ``dice_bce (Dice 1 + BCE 1 + lesion-wise Dice 1)``."""
    lesion_wise = f" + lesion-wise Dice {loss.lesion_dice_weight:g}" if loss.lesion_dice_weight else ""
    if loss.name == "weighted_ce":
        return f"weighted_ce (lesion weight {loss.positive_weight:.3g}{lesion_wise})"
    terms = [
        f"{name} {weight:g}"
        for name, weight in (("Dice", loss.dice_weight), ("BCE", loss.bce_weight), ("focal", loss.focal_weight))
        if weight
    ]
    focal = f", focal γ={loss.focal_gamma:g} α={loss.focal_alpha:g}" if loss.focal_weight else ""
    return f"{loss.name} ({' + '.join(terms)}{lesion_wise}{focal})"


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
