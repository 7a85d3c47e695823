"""nnU-Net v2 trainer that trains nnU-Net's own default plan within a wall-clock budget (for the CPU comparison).

``nnUNetTrainer_WallTime`` is nnU-Net's ``nnUNetTrainer`` unchanged (network, loss, augmentation, SGD with
Nesterov momentum, poly learning rate, deep supervision, checkpoints) except for the length of the schedule:
nnU-Net's 1000 epochs x 250 iterations cannot finish on a CPU, so the schedule is shortened to what fits a
budget, and the poly learning rate is laid out over the shortened schedule so that it still decays towards
zero when the budget ends. This file belongs to autoseg's tools (autoseg itself does not use it); it runs in
nnU-Net's own virtual environment.

Install (nnU-Net finds trainers by class name inside its package)::

    NNUNET_PY=/work/nnunet_venv/bin/python
    $NNUNET_PY tools/nnunet_budget_trainer.py --install     # prints where it copied itself

``--install`` copies this file to ``<site-packages>/nnunetv2/training/nnUNetTrainer/nnUNetTrainer_WallTime.py``,
next to ``nnUNetTrainer.py``. (The usual place, ``.../nnUNetTrainer/variants/``, only works where timm is
installed: nnU-Net's class search imports the ``primus`` package, alphabetically before ``variants``, and
primus needs timm, which needs torchvision. Our CPU venv keeps torch 2.13.0+cpu and has no torchvision, so
the trainer sits at the top of the package, which is searched first.) ``tools/nnunet_benchmark.sh`` installs
it itself. Copying by hand to either place works too.

Use (set ``nnUNet_compile=f`` on the CPU)::

    NNUNET_BUDGET_MINUTES=30 nnUNet_compile=f nnUNetv2_train 2 3d_fullres 0 -tr nnUNetTrainer_WallTime -device cpu
    nnUNetv2_predict -i IN -o OUT -d 2 -c 3d_fullres -tr nnUNetTrainer_WallTime -f 0 -chk checkpoint_final.pth -device cpu

Environment variables (read when the trainer is created):

``NNUNET_BUDGET_MINUTES``
    wall-clock budget. Counted from ``NNUNET_BUDGET_START`` (a Unix time; the benchmark script sets it just
    before it starts ``nnUNetv2_train``, so imports, data loader start-up and unpacking count) or else from the
    creation of the trainer. Training stops (between iterations) when the next iteration, the epoch's
    validation batches and the final checkpoint would no longer fit, finishes that epoch's validation and
    logging, and saves ``checkpoint_final.pth``. Without a budget the schedule is ``NNUNET_EPOCHS`` (default
    nnU-Net's 1000) x ``NNUNET_ITERS``.
``NNUNET_ITERS``
    training iterations per epoch. Default 250 (nnU-Net's) when at least ``NNUNET_MIN_EPOCHS`` epochs of 250
    fit the budget; otherwise fewer, so that ``NNUNET_MIN_EPOCHS`` epochs fit (on a CPU a 250-iteration epoch
    of the default 2 mm plan takes hours, so one epoch would hold the whole budget at a constant learning
    rate).
``NNUNET_MIN_EPOCHS``
    default 10: the fewest epochs the automatic choice of ``NNUNET_ITERS`` aims for.
``NNUNET_EPOCHS``
    number of epochs. Default: as many as fit the budget, estimated from the first
    ``NNUNET_CALIBRATION_ITERS`` (default 3) iterations and re-estimated after every epoch from the measured
    epoch times (the poly schedule's length follows; the learning rate is ``0.01 (1 - epoch / epochs)^0.9``
    as in nnU-Net). Another epoch is planned when at least a quarter of it fits; the budget cuts the last
    one short. With a fixed number the budget can still cut the schedule short (logged).
``NNUNET_VAL_ITERS``
    validation batches per epoch. Default: nnU-Net's ratio 50/250, i.e. a fifth of ``NNUNET_ITERS``, at
    least 1; a partial last epoch validates a proportional share.
``NNUNET_FINAL_VALIDATION``
    ``0`` skips nnU-Net's sliding-window prediction of the fold's validation cases after training (the
    benchmark scores held-out cases instead). Default ``1`` (nnU-Net's behaviour).

The device is the one given to ``nnUNetv2_train`` (``-device cpu``); a CUDA device on a machine without CUDA
falls back to the CPU. At the end ``walltime_summary.json`` in the fold folder records the budget, the
schedule (and its re-estimates), iterations done, seconds per iteration and the wall time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
from os.path import join
from time import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: nnU-Net's validation batches per training iteration (50 per 250).
VAL_RATIO = 50 / 250
#: Time of one validation batch relative to a training iteration before one has been measured (forward only).
VAL_COST_GUESS = 0.5
CPU = torch.device("cpu")
#: Seconds of logging and checkpointing per epoch before they have been measured.
EPOCH_OVERHEAD_GUESS = 5.0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _env_float(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    return float(value) if value else None


def _epochs_that_fit(seconds: float, epoch_seconds: float) -> int:
    """Epochs to plan in ``seconds``: one more is started when at least a quarter of it fits (the budget then
    cuts it short), so little of the budget is left unused."""
    return max(0, math.ceil(seconds / epoch_seconds - 0.25))


class nnUNetTrainer_WallTime(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CPU):
        if device.type == "cuda" and not torch.cuda.is_available():
            print("nnUNetTrainer_WallTime: no CUDA here, training on the CPU")
            device = torch.device("cpu")
        super().__init__(plans, configuration, fold, dataset_json, device)
        minutes = _env_float("NNUNET_BUDGET_MINUTES")
        self.budget_s = None if minutes is None else 60.0 * minutes
        self.budget_start = _env_float("NNUNET_BUDGET_START") or time()
        self.fixed_iters = _env_int("NNUNET_ITERS")
        self.fixed_epochs = _env_int("NNUNET_EPOCHS")
        self.fixed_val_iters = _env_int("NNUNET_VAL_ITERS")
        self.min_epochs = _env_int("NNUNET_MIN_EPOCHS") or 10
        self.calibration_iters = max(1, _env_int("NNUNET_CALIBRATION_ITERS") or 3)
        self.final_validation = os.environ.get("NNUNET_FINAL_VALIDATION", "1").lower() not in ("0", "f", "false", "no")

        self.num_iterations_per_epoch = self.fixed_iters or 250
        self._set_val_iters()
        # Without a budget the length is known now; with one it is estimated after the first iterations
        # (the poly learning rate of epoch 0 is the initial one whatever the length).
        self.num_epochs = self.fixed_epochs or 1000
        self.schedule_planned = self.budget_s is None or (
            self.fixed_iters is not None and self.fixed_epochs is not None
        )
        self.iteration_times: list[float] = []
        self.val_iteration_times: list[float] = []
        self.epoch_times: list[float] = []
        self.epoch_overheads: list[float] = []
        self.replans: list[dict] = []
        self.stopped_by_budget = False
        self.train_loop_start = self.train_loop_end = None

    # ------------------------------------------------------------------ schedule
    def _set_val_iters(self) -> None:
        self.num_val_iterations_per_epoch = (
            self.fixed_val_iters
            if self.fixed_val_iters is not None
            else max(1, round(VAL_RATIO * self.num_iterations_per_epoch))
        )
        self.num_val_iterations_per_epoch = max(1, self.num_val_iterations_per_epoch)

    def _elapsed(self) -> float:
        return time() - self.budget_start

    def _s_per_iteration(self) -> float:
        """Recent seconds per training iteration (the first, warm-up iteration left out when others exist)."""
        times = self.iteration_times[1:] if len(self.iteration_times) > 1 else self.iteration_times
        return statistics.median(times[-20:])

    def _s_per_val_iteration(self) -> float:
        if self.val_iteration_times:
            return statistics.median(self.val_iteration_times[-20:])
        return VAL_COST_GUESS * self._s_per_iteration()

    def _epoch_overhead(self) -> float:
        return max(self.epoch_overheads) if self.epoch_overheads else EPOCH_OVERHEAD_GUESS

    def _estimated_epoch_time(self, iters: int) -> float:
        val = self.fixed_val_iters if self.fixed_val_iters is not None else max(1, round(VAL_RATIO * iters))
        return iters * self._s_per_iteration() + val * self._s_per_val_iteration() + self._epoch_overhead()

    def _plan_schedule(self, epoch_start: float) -> None:
        """First estimate, inside epoch 0: iterations per epoch and number of epochs that fit the budget."""
        available = self.budget_s - (epoch_start - self.budget_start) - self._epoch_overhead()
        if self.fixed_iters is None:
            iters = 250
            if available / self._estimated_epoch_time(iters) < self.min_epochs:
                per_iteration = self._s_per_iteration() + (
                    VAL_RATIO * self._s_per_val_iteration() if self.fixed_val_iters is None else 0.0
                )
                fixed = self._epoch_overhead() + (self.fixed_val_iters or 0) * self._s_per_val_iteration()
                iters = int((available / self.min_epochs - fixed) // per_iteration)
            self.num_iterations_per_epoch = max(iters, len(self.iteration_times), 1)
            self._set_val_iters()
        if self.fixed_epochs is None:
            epoch_time = self._estimated_epoch_time(self.num_iterations_per_epoch)
            self._set_num_epochs(max(1, _epochs_that_fit(available, epoch_time)))
        self.schedule_planned = True
        self._log_schedule("first estimate")

    def _replan_epochs(self) -> None:
        """After an epoch: the epochs still fitting, from the measured epoch times (more adaptive than the guess)."""
        if self.budget_s is None or self.fixed_epochs is not None:
            return
        epoch_time = statistics.mean(self.epoch_times[-3:])
        remaining = self.budget_s - self._elapsed() - self._epoch_overhead()
        self._set_num_epochs(self.current_epoch + _epochs_that_fit(remaining, epoch_time))
        self._log_schedule(f"after epoch {self.current_epoch - 1} ({epoch_time:.1f} s/epoch)")

    def _set_num_epochs(self, epochs: int) -> None:
        self.num_epochs = epochs
        if self.lr_scheduler is not None:
            self.lr_scheduler.max_steps = epochs

    def _log_schedule(self, why: str) -> None:
        entry = {
            "why": why,
            "at_s": round(self._elapsed(), 1),
            "epochs": self.num_epochs,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "s_per_iteration": round(self._s_per_iteration(), 3),
        }
        if not self.replans or any(
            self.replans[-1][k] != entry[k] for k in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch")
        ):
            self.print_to_log_file(
                f"WallTime schedule ({why}): {self.num_epochs} epochs x "
                f"{self.num_iterations_per_epoch} iterations, {self.num_val_iterations_per_epoch} "
                f"validation batches per epoch, {entry['s_per_iteration']} s/iteration, "
                f"budget {self._budget_text()}"
            )
        self.replans.append(entry)

    def _budget_text(self) -> str:
        return "none" if self.budget_s is None else f"{self._elapsed():.0f}/{self.budget_s:.0f} s used"

    def _out_of_time(self, val_iters: int) -> bool:
        """Whether one more training iteration, ``val_iters`` validation batches, the epoch's logging and the
        final checkpoint would overrun the budget."""
        if self.budget_s is None or not self.iteration_times:
            return False
        needed = self._s_per_iteration() + val_iters * self._s_per_val_iteration() + 2 * self._epoch_overhead()
        return self._elapsed() + needed > self.budget_s

    # ------------------------------------------------------------------ training loop
    def run_training(self):
        self.on_train_start()
        self.train_loop_start = time()
        planned = "" if self.schedule_planned else ", estimated after the first iterations"
        self.print_to_log_file(
            f"WallTime: training starts {self._elapsed():.1f} s into the budget "
            f"({self._budget_text()}); schedule {self.num_epochs} epochs x "
            f"{self.num_iterations_per_epoch} iterations{planned}"
        )
        while self.current_epoch < self.num_epochs and not self.stopped_by_budget:
            if self._out_of_time(1):
                self.stopped_by_budget = True  # not even a short epoch fits any more
                break
            self._run_epoch()
        self.train_loop_end = time()
        self.on_train_end()

    def _run_epoch(self) -> None:
        epoch_start = time()
        self.on_epoch_start()
        self.on_train_epoch_start()
        outputs = []
        while len(outputs) < self.num_iterations_per_epoch:
            done = len(outputs)
            val_share = max(1, round(self.num_val_iterations_per_epoch * (done + 1) / self.num_iterations_per_epoch))
            if done > 0 and self._out_of_time(val_share):
                self.stopped_by_budget = True
                break
            start = time()
            outputs.append(self.train_step(next(self.dataloader_train)))
            self.iteration_times.append(time() - start)
            if not self.schedule_planned and len(self.iteration_times) >= self.calibration_iters:
                self._plan_schedule(epoch_start)
        self.on_train_epoch_end(outputs)

        val_iters = self.num_val_iterations_per_epoch
        if len(outputs) < self.num_iterations_per_epoch:  # cut by the budget: a proportional share
            val_iters = max(1, round(val_iters * len(outputs) / self.num_iterations_per_epoch))
            self.print_to_log_file(
                f"WallTime: budget reached after {len(outputs)} of "
                f"{self.num_iterations_per_epoch} iterations of epoch {self.current_epoch}"
            )
        with torch.no_grad():
            self.on_validation_epoch_start()
            val_outputs = []
            for _ in range(val_iters):
                start = time()
                val_outputs.append(self.validation_step(next(self.dataloader_val)))
                self.val_iteration_times.append(time() - start)
            self.on_validation_epoch_end(val_outputs)

        end_start = time()
        self.on_epoch_end()
        self.epoch_overheads.append(time() - end_start)
        if len(outputs) == self.num_iterations_per_epoch:
            self.epoch_times.append(time() - epoch_start)
        self.print_to_log_file(
            f"WallTime: {len(outputs)} iterations, "
            f"{statistics.mean(self.iteration_times[-len(outputs) :]):.2f} s/iteration, "
            f"{val_iters} validation batches, {self._budget_text()}"
        )
        if not self.stopped_by_budget:
            self._replan_epochs()

    def on_train_end(self):
        super().on_train_end()
        summary = self.walltime_summary()
        self.print_to_log_file("WallTime summary: " + json.dumps(summary))
        if self.local_rank == 0:
            with open(join(self.output_folder, "walltime_summary.json"), "w") as f:
                json.dump(summary, f, indent=2)

    def walltime_summary(self) -> dict:
        times = self.iteration_times
        steady = times[1:] if len(times) > 1 else times
        loop_s = (self.train_loop_end or time()) - (self.train_loop_start or time())
        return {
            "trainer": type(self).__name__,
            "budget_minutes": None if self.budget_s is None else self.budget_s / 60,
            "wall_s": round(self._elapsed(), 2),
            "startup_s": None if self.train_loop_start is None else round(self.train_loop_start - self.budget_start, 2),
            "training_loop_s": round(loop_s, 2),
            "stopped_by_budget": self.stopped_by_budget,
            "epochs_run": self.current_epoch,
            "epochs_planned": self.num_epochs,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "iterations": len(times),
            "val_iterations": len(self.val_iteration_times),
            "s_per_iteration_mean": round(statistics.mean(steady), 3) if steady else None,
            "s_per_iteration_median": round(statistics.median(steady), 3) if steady else None,
            "s_first_iteration": round(times[0], 3) if times else None,
            "s_per_val_iteration_median": round(statistics.median(self.val_iteration_times), 3)
            if self.val_iteration_times
            else None,
            "loop_s_per_iteration": round(loop_s / len(times), 3) if times else None,
            "final_lr": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None,
            "initial_lr": self.initial_lr,
            "batch_size": self.batch_size if hasattr(self, "batch_size") else self.configuration_manager.batch_size,
            "patch_size": list(self.configuration_manager.patch_size),
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "iteration_times": [round(t, 3) for t in times],
            "schedule": self.replans,
        }

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.final_validation:
            self.print_to_log_file("WallTime: final validation skipped (NNUNET_FINAL_VALIDATION=0)")
            return
        start = time()
        super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"WallTime: final validation took {time() - start:.1f} s")


def install() -> str:
    """Copy this file into the installed nnunetv2 package, where nnU-Net's trainer search finds it."""
    import nnunetv2

    target = join(nnunetv2.__path__[0], "training", "nnUNetTrainer", "nnUNetTrainer_WallTime.py")
    shutil.copyfile(os.path.abspath(__file__), target)
    return target


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:
        print(install())
    else:
        sys.exit(f"usage: {sys.argv[0]} --install   (copies the trainer into nnunetv2; see the docstring)")
