"""``autoseg_train`` as a library: :func:`train` (one fold) and :func:`cross_validate` (every fold).

:func:`train` finds the dataset, its plans and the trainer named by ``-tr`` (default: the plans'), and runs one
fold: ``setup()``, ``fit()`` and the end-of-fold validation. Everything a run writes goes to
``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>/``:

===================================== ========================================================================
``plans.json``                         the plans the run was started with (a resumed run checks it still holds)
``log.txt``                            header (device, precision, seed, trainer, configuration), one line/epoch
``progress.png``                       losses, validation pseudo-Dice and its moving average, learning rate
``checkpoint_latest.pth``              after every epoch; ``--continue`` resumes from it
``checkpoint_best.pth``                best moving average of the validation pseudo-Dice
``checkpoint_final.pth``               after the last epoch
``checkpoint_snapshot_<EPOCH>.pth``    snapshot-ensemble members (``ZoomInOutTrainer``: 1/3, 2/3, end of stage 2)
``validation/CASE.nii.gz``             the fold's validation cases, predicted on their original grid
``validation/CASE_probabilities.npz``  their probabilities (``probabilities``: (K, X, Y, Z) float16), same grid
``validation/summary.json``            per-case Dice, HD95 and lesion F1 against the raw labels, and their means
``deadline.json``                      with a compute budget: what was planned, each epoch's measured and promised
                                       time, every re-plan with its reason, what ran (:mod:`autoseg.train.deadline`)
``.autoseg_run.lock``                  while the run lasts: one run per folder at a time (:mod:`autoseg.train.run_lock`)
===================================== ========================================================================

The run flags (:class:`TrainingOptions`) and the fold are the library's (:mod:`autoseg.train.options`); what the
trainers' loop calls lives beside them in :mod:`autoseg.train` (the run length, :mod:`~autoseg.train.run_length`;
the fold's cases, :func:`autoseg.train.splits.fold_cases`; checkpoints, :mod:`~autoseg.train.checkpointing`; the
validation of whole cases, :mod:`~autoseg.train.validation`); the library finds a trainer by name
(:func:`autoseg.registry.plugin_class`) and never imports the trainers. ``options.init_from`` (``--init-from MODEL``)
is found and checked against the planned network before training (:func:`prepare_run`,
:mod:`autoseg.train.transfer`), and the trainer starts a new run from its weights. The device and precision choice in
:mod:`autoseg.machine`; where a run's folder is in :func:`autoseg.paths.run_folder`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from autoseg.api.source_model import find_source_model
from autoseg.data.dataset import find_dataset
from autoseg.distributed import DistributedContext, leave
from autoseg.errors import MissingFileError, UsageError
from autoseg.io.files import check_output_folder
from autoseg.paths import PLANS_FILE, preprocessed_folder, run_folder
from autoseg.plans import Configuration, Plans
from autoseg.registry import plugin_class
from autoseg.train.checkpointing import refuse_overwrite
from autoseg.train.loading import case_identifiers
from autoseg.train.options import Fold, TrainingOptions, parse_fold
from autoseg.train.run_lock import check_unlocked, run_lock
from autoseg.train.splits import load_or_create_splits, read_subjects
from autoseg.train.time_promise import TimePromise
from autoseg.train.transfer import InitialWeights, choose_initial_weights, initial_state

__all__ = ["TrainingOptions", "TrainingResult", "TrainingRun", "cross_validate", "prepare_run", "train"]


class TrainingRun(Protocol):
    """What :func:`train` asks of the trainer of one fold (``trainers.Trainer``, which the library never imports:
    it resolves a trainer's name through :func:`autoseg.registry.plugin_class`)."""

    output_folder: Path
    context: DistributedContext
    log: Callable[[str], None]
    promise: TimePromise | None
    epoch: int
    best_ema: float

    def setup(self) -> Any: ...

    def fit(self) -> None: ...

    def validate(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrainingResult:
    """What :func:`train` produced: the run folder, the epochs trained in total and the validation summary."""

    output_folder: Path
    epochs: int
    best_ema_pseudo_dice: float
    validation: dict[str, Any] | None


def train(
    dataset: str,
    configuration: str | None = None,
    fold: Fold = 0,
    trainer: str | type[TrainingRun] | None = None,
    options: TrainingOptions | None = None,
) -> TrainingResult:
    """Train one fold of ``dataset``: ``autoseg_train -d DATASET -c CONFIGURATION -f FOLD -tr TRAINER``.

    Args:
        dataset: name, number or folder of the raw dataset (see ``autoseg.data.dataset.find_dataset``); it must have
            been planned and preprocessed (``autoseg_plan``).
        configuration: a configuration of the plans; default the plans' ``default_configuration``.
        fold: 0..4 (a fold of ``splits_final.json``) or ``"full"`` (every case).
        trainer: the name of a registered trainer class (``trainers/``, or ``register_trainer``), or the class
            itself (a trainer prototyped in a notebook); default the configuration's ``schedule.trainer``.
        options: run flags (:class:`TrainingOptions`).

    Returns:
        :class:`TrainingResult`.

    Raises:
        DatasetError: no such dataset.
        PlansError: not planned yet, or the configuration is not in the plans (the message lists them).
        KeyError: unknown trainer (the message lists the known ones).
        ValueError: fold out of range, no preprocessed data, CUDA requested without CUDA, ...
        DiskFullError: the disk filled up while a checkpoint, log or validation file was written (the message
            names it); ``continue_training`` then resumes after the last epoch whose ``checkpoint_latest.pth`` was
            written, or starts afresh (saying so in the log) when there is none.
        CheckpointError: the checkpoint to continue from is unreadable or holds pickled objects.
        RunLockedError: another process is training this fold (the message names it); see
            :mod:`autoseg.train.run_lock`.
        TransferError, ModelFileError: ``options.init_from`` names no usable model, or its weights do not fit the
            planned network (a channel it needs is missing, another network class, a layer of another shape: named).
    """
    options = options or TrainingOptions()
    runner = prepare_run(dataset, configuration, fold, trainer, options)
    # Rank 0 owns the run folder (the other ranks of a torchrun run write nothing there): it alone locks it.
    lock = run_lock(runner.output_folder) if runner.context.is_main else contextlib.nullcontext()
    try:
        with lock as taken_over:
            runner.setup()
            if taken_over:
                runner.log(taken_over)
            start = time.perf_counter()
            runner.fit()
            summary = runner.validate() if options.validation else None
            if runner.promise is not None and options.validation and not options.continue_training:
                seconds = time.perf_counter() - start
                runner.log(runner.promise.check("whole fold", seconds, runner.promise.total_seconds)[1])
    finally:
        leave()  # the process group of a distributed run (torchrun), if setup() joined one
    return TrainingResult(runner.output_folder, runner.epoch, runner.best_ema, summary)


def prepare_run(
    dataset: str,
    configuration: str | None = None,
    fold: Fold = 0,
    trainer: str | type[TrainingRun] | None = None,
    options: TrainingOptions | None = None,
) -> TrainingRun:
    """The trainer of one fold, constructed (nothing is written or built yet) after every check that needs no
    training: the dataset, its plans and configuration, the trainer, the fold, that no other process is training
    the fold (:mod:`autoseg.train.run_lock`) and that the run folder holds no run unless continuing. ``autoseg_train
    --num-gpus`` calls it before starting torchrun, so these errors come as one line and not from every process.

    Raises:
        see :func:`train`.
    """
    options = options or TrainingOptions()
    raw = find_dataset(dataset)
    preprocessed = preprocessed_folder(raw.name)
    plans = Plans.from_json(preprocessed / PLANS_FILE)
    chosen = plans.configuration(configuration)
    trainer_class = (
        trainer if isinstance(trainer, type) else plugin_class("trainer", trainer or chosen.schedule.trainer)
    )
    fold = parse_fold(fold)
    _check_pretrained(options.pretrained, chosen)
    if options.init_from is not None:
        options = replace(options, initial_weights=_initial_weights(options, plans, chosen, trainer_class, fold))
    runner = trainer_class(
        plans,
        chosen.name,
        fold,
        preprocessed_folder=preprocessed,
        output_folder=run_folder(raw.name, chosen.name, trainer_class.__name__, fold),
        options=options,
        raw_dataset=raw,
    )
    if runner.context.is_main:
        check_output_folder(runner.output_folder, "run folder")  # AUTOSEG_RESULTS read-only: one line, not a traceback
        check_unlocked(runner.output_folder)  # a fold in training is named as such, with or without --continue
    if not options.continue_training:
        refuse_overwrite(runner.output_folder)
    return runner


def _initial_weights(
    options: TrainingOptions, plans: Plans, configuration: Configuration, trainer: type[TrainingRun], fold: Fold
) -> InitialWeights:
    """``--init-from MODEL`` found (:func:`autoseg.api.source_model.find_source_model`; a model file is installed
    into ``AUTOSEG_RESULTS``), its fold for ``fold`` chosen, and its weights checked against the network the trainer
    builds (channels by name, network class, every tensor's shape), so a mismatch is one line before training."""
    source = find_source_model(options.init_from, configuration.name)
    initial = choose_initial_weights(source, fold, options.init_fold)
    network_options = getattr(trainer, "network_options", dict)()
    initial_state(initial, plans, configuration.name, network_options)
    return initial


def _check_pretrained(path: str | None, configuration: Configuration) -> None:
    """``--pretrained`` starts a PSPNet's backbone: refuse it for another network, or a file that is not there,
    before anything is trained (rather than ignoring it, or failing after the first stage)."""
    if path is None:
        return
    architecture = configuration.network.architecture
    if architecture != "PSPNet":
        raise UsageError(
            f"--pretrained {path}: configuration '{configuration.name}' trains a {architecture}, and --pretrained "
            "starts a PSPNet's ResNet backbone; leave it out, or train a 2d_pspnet configuration"
        )
    if not Path(path).is_file():
        raise MissingFileError(f"--pretrained {path}: no such file")


def cross_validate(
    dataset: str,
    configuration: str | None = None,
    trainer: str | type[TrainingRun] | None = None,
    options: TrainingOptions | None = None,
) -> list[TrainingResult]:
    """Train every fold of ``splits_final.json`` in turn (``autoseg_train -f all``).

    With ``options.continue_training`` a fold that already finished (``checkpoint_final.pth``) is kept as it
    is, a fold with ``checkpoint_latest.pth`` is resumed, and a fold with no completed epoch starts afresh (its
    log says so); so the same command picks up a killed cross-validation where it stopped.
    """
    options = options or TrainingOptions()
    raw = find_dataset(dataset)
    preprocessed = preprocessed_folder(raw.name)
    chosen = Plans.from_json(preprocessed / PLANS_FILE).configuration(configuration)
    trainer_name = (
        trainer if isinstance(trainer, type) else plugin_class("trainer", trainer or chosen.schedule.trainer)
    ).__name__
    data_folder = preprocessed / chosen.data_identifier
    identifiers = case_identifiers(data_folder)
    splits = load_or_create_splits(preprocessed, identifiers, read_subjects(data_folder, identifiers))
    results = []
    for fold in range(len(splits)):
        folder = run_folder(raw.name, chosen.name, trainer_name, fold)
        if options.continue_training and (folder / "checkpoint_final.pth").is_file():
            continue
        results.append(train(dataset, configuration, fold, trainer, options))
    return results
