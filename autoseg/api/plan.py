"""``autoseg_plan`` as a library: verify, fingerprint, plan, preprocess.

Files, all under ``AUTOSEG_PREPROCESSED/<dataset>/``: ``fingerprint.json``, ``plans.json``, and one
folder of preprocessed cases per ``data_identifier`` (see ``autoseg.preprocess.preprocessing``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.api.source_model import find_source_model
from autoseg.data.coregistration import COREGISTRATION_METHOD
from autoseg.data.dataset import Case, RawDataset, find_dataset
from autoseg.data.verify import VerificationReport, check_dataset, training_cases
from autoseg.errors import UsageError
from autoseg.io.files import check_output_file, check_output_folder
from autoseg.machine import choose_device, choose_precision, configure_threads
from autoseg.paths import FINGERPRINT_FILE, PLANS_FILE, SPLITS_FILE, preprocessed_folder
from autoseg.plan.budget import BudgetError, BudgetRequest
from autoseg.plan.fingerprint import ChannelFingerprint, Fingerprint, compute_fingerprint
from autoseg.plan.probe import load_or_run_probe
from autoseg.plan.topology import histeq_twin
from autoseg.plans import Configuration, Plans, PlansError, zscore_name
from autoseg.preprocess.cases import remove_stale_cases
from autoseg.preprocess.preprocessing import preprocess_dataset
from autoseg.registry import plugin_class
from autoseg.train import splits
from autoseg.train.loading import case_identifiers
from autoseg.train.transfer import SourceModel, channel_sources


@dataclass(frozen=True)
class PlanResult:
    """What ``plan_and_preprocess`` produced."""

    plans: Plans
    plans_path: Path
    fingerprint_path: Path
    preprocessed: dict[str, list[str]]  # data identifier -> cases (re)computed in this run
    notes: list[str] = field(default_factory=list)  # verification notes, one line each (autoseg.data.verify)
    # cases added to or removed from the dataset since it was preprocessed, what was done about them and about
    # splits_final.json; one line each (:func:`update_cases`)
    case_changes: list[str] = field(default_factory=list)


def verify(dataset_name: str, num_processes: int = 1, progress: bool = True) -> VerificationReport:
    """Verify a dataset only; returns its cases and notes (raises ``VerificationError``)."""
    return check_dataset(find_dataset(dataset_name), num_processes, progress)


def plan_and_preprocess(
    dataset_name: str,
    planner: str = "DefaultPlanner",
    memory_budget_gb: float | None = None,
    configurations: list[str] | None = None,
    num_processes: int = 1,
    preprocess_only: bool = False,
    progress: bool = True,
    budget_minutes: float | None = None,
    device: str = "auto",
    normalization: str = "zscore",
    resplit: str | None = None,
    like: str | None = None,
    unet_layout: str | None = None,
) -> PlanResult:
    """Verify and fingerprint the dataset, plan with ``planner``, preprocess ``configurations``
    (default: all in the plans).

    With ``preprocess_only`` the existing ``plans.json`` (possibly edited by hand) is validated and
    used as it is; nothing is re-planned.

    ``dataset.json``'s ``coregister_channels`` is recorded in the plans (:func:`record_coregistration`), and the
    cases are verified, fingerprinted and preprocessed with their channels co-registered when it is set.

    With ``budget_minutes`` the plan is fitted to that much training time per fold on ``device`` (``auto``, ``cpu``
    or ``cuda``): this machine is probed first (``autoseg.plan.probe``, cached under ``AUTOSEG_HOME``), and the
    planner chooses resolution, width, patch, batch and iterations (``autoseg.plan.budget``).

    ``normalization``: ``zscore`` (default: each modality's z-score scheme) or ``histeq`` (also a histogram-equalized
    twin ``NAME_histeq`` of every z-score configuration, with a data folder of its own); ignored with
    ``preprocess_only``, where ``plans.json`` says. With an existing ``plans.json``, ``histeq`` adds the twins of
    its z-score configurations as they stand and re-plans nothing (:func:`add_histeq_twins`); a z-score run replaces
    the configurations it plans and keeps every other one, e.g. the ``_histeq`` twins (:func:`keep_unplanned`), so
    no configuration that may have been trained loses its entry.

    Cases added to or removed from the raw dataset since it was last preprocessed are named in
    ``case_changes``; the preprocessed files of removed cases are deleted from every configuration's data folder.
    A ``splits_final.json`` that no longer holds the dataset's cases is reported there (training refuses it);
    ``resplit`` (``keep`` or ``fresh``, see :func:`autoseg.train.splits.resplit`) re-splits it.

    With ``like`` (a model file from ``autoseg_export`` or a trained dataset's name,
    :func:`autoseg.api.source_model.find_source_model`) only the model's configuration is planned, with its network,
    normalization schemes, symmetric channels and trainer, so its weights fit (:mod:`planners.like`); a model file is
    installed into ``AUTOSEG_RESULTS`` as ``autoseg_predict -m`` does. ``normalization`` must then be ``zscore``.

    ``unet_layout``: the residual U-Nets' block layout (``autoseg.plans.UNET_LAYOUTS``); default the planner's
    (``residual_encoder``). Not with ``like``, whose network is the model's.

    Raises:
        DatasetError / VerificationError: the dataset cannot be found or has problems, e.g. no training case
            contains a lesion (nothing written: no fingerprint, no plans, no preprocessed folder).
        PlansError: invalid ``plans.json`` or an unknown configuration name; with ``preprocess_only``, a
            ``plans.json`` whose ``coregister_channels`` differs from ``dataset.json``'s.
        BudgetError: the budget cannot buy a useful run (the message says what would).
        KeyError: unknown planner (the message lists the known ones).
        ValueError: an unknown ``normalization``.
        OutputPathError: the dataset's preprocessed folder, or a configuration's data folder in it, is a file or
            read-only, or plans.json or fingerprint.json is a folder (checked before anything is written).
        SplitsError: an unknown ``resplit``, or splits it cannot make (see :func:`autoseg.train.splits.resplit`).
        TransferError, ModelFileError, UsageError: ``like`` names no usable model, one the planner cannot plan like
            (not a residual 3-D U-Net), or one that needs a channel the dataset lacks (before anything is written).
        UsageError: an unknown ``unet_layout``, or one given with ``like``.
    """
    if resplit is not None:
        splits.check_resplit_option(resplit)  # before any work
    dataset = find_dataset(dataset_name)
    source = _source_model(like, dataset, normalization) if like is not None and not preprocess_only else None
    folder = preprocessed_folder(dataset.name)
    plans_path, fingerprint_path = folder / PLANS_FILE, folder / FINGERPRINT_FILE
    check_output_folder(folder, "preprocessed folder")
    for path in (plans_path, fingerprint_path):
        check_output_file(path)
    if preprocess_only:
        plans = Plans.from_json(plans_path)
        if plans.coregister_channels != dataset.coregister_channels:
            raise PlansError(
                f"{plans_path}: coregister_channels is {str(plans.coregister_channels).lower()} but "
                f"{dataset.folder / 'dataset.json'} declares {str(dataset.coregister_channels).lower()}; run "
                "autoseg_plan without --preprocess-only to plan again"
            )
        report = check_dataset(dataset, num_processes, progress)
        cases, notes = report.cases, [str(note) for note in report.notes]
    else:
        fingerprint, plans, notes = _fingerprint_and_plan(
            dataset,
            plans_path,
            planner,
            memory_budget_gb,
            (budget_minutes, device),
            normalization,
            num_processes,
            progress,
            source,
            unet_layout,
        )
    chosen = [plans.configuration(name) for name in configurations or list(plans.configurations)]
    for configuration in chosen:  # before anything is written
        check_output_folder(folder / configuration.data_identifier, "preprocessed folder")
    if not preprocess_only:
        fingerprint.to_json(fingerprint_path)
        plans.to_json(plans_path)
        cases = training_cases(dataset)
    changes = update_cases(folder, plans, cases)
    done = _preprocess(dataset, cases, plans, chosen, folder, num_processes, progress)
    changes += _splits_changes(folder, cases, resplit)
    return PlanResult(plans, plans_path, fingerprint_path, done, notes, changes)


def _preprocess(
    dataset: RawDataset,
    cases: Sequence[Case],
    plans: Plans,
    chosen: list[Configuration],
    folder: Path,
    num_processes: int,
    progress: bool,
) -> dict[str, list[str]]:
    """Preprocess ``cases`` for each of the ``chosen`` configurations into its data folder under ``folder``, once
    per data folder (configurations may share one). Returns, per data folder, what :func:`preprocess_dataset`
    did."""
    done: dict[str, list[str]] = {}
    for configuration in chosen:
        if configuration.data_identifier not in done:
            done[configuration.data_identifier] = preprocess_dataset(
                cases,
                configuration,
                folder / configuration.data_identifier,
                num_processes,
                progress,
                labels=dataset.labels,
                coregister=plans.coregister_channels,
            )
    return done


def _fingerprint_and_plan(
    dataset: RawDataset,
    plans_path: Path,
    planner: str,
    memory_budget_gb: float | None,
    compute_budget: tuple[float | None, str],
    normalization: str,
    num_processes: int,
    progress: bool,
    like: SourceModel | None = None,
    unet_layout: str | None = None,
) -> tuple[Fingerprint, Plans, list[str]]:
    """Verify and fingerprint ``dataset`` (a dataset that fails stops here, before anything is written), then plan
    it with ``planner`` (fitted to ``compute_budget``: minutes per fold and the device, when minutes are given; like
    the model ``like``, when given), or, for ``histeq`` with an existing ``plans_path``, add the histogram-equalized
    twins to it. Nothing is written. Returns the fingerprint, the plans and the notes to print."""
    planner_class = plugin_class("planner", planner)
    fingerprint = compute_fingerprint(dataset, num_processes, progress)  # a dataset that fails stops here
    notes = list(fingerprint.notes)
    previous = _previous_plans(plans_path, notes)
    if normalization == "histeq" and previous is not None:
        notes.append(
            f"{plans_path.name}: histogram-equalized twins added; its other configurations are kept as "
            "they are (run autoseg_plan without --normalization histeq to re-plan them)"
        )
        twins = add_histeq_twins(previous, fingerprint.channels)
        return fingerprint, record_coregistration(twins, fingerprint, dataset.coregister_channels), notes
    budget_minutes, device = compute_budget
    compute = budget_request(budget_minutes, device) if budget_minutes is not None else None
    plans = planner_class(
        fingerprint, memory_budget_gb, compute, normalization=normalization, like=like, unet_layout=unet_layout
    ).plan()
    plans = plans if previous is None else keep_unplanned(previous, plans, normalization)
    return fingerprint, record_coregistration(plans, fingerprint, dataset.coregister_channels), notes


def record_coregistration(plans: Plans, fingerprint: Fingerprint, coregister: bool) -> Plans:
    """``plans`` with ``dataset.json``'s ``coregister_channels`` (``coregister``) recorded, and with it
    ``reasons.coregister_channels`` saying in how many of the fingerprint's cases a channel was moved; the planner
    is not asked (a planner of one's own cannot forget it)."""
    reasons = {key: value for key, value in plans.reasons.items() if key != "coregister_channels"}
    if coregister:
        fits = [case.coregistration or () for case in fingerprint.cases.values()]
        moved = sum(1 for case in fits if case)
        largest = max((fit.rotation_degrees for case in fits for fit in case), default=0.0)
        shift = max((fit.shift_mm for case in fits for fit in case), default=0.0)
        reasons["coregister_channels"] = (
            f'dataset.json declares "coregister_channels": a channel on another grid than channel 0 '
            f"({plans.channels[0]}) is rigidly registered to it and resampled onto its grid, in preprocessing and "
            f"prediction alike ({COREGISTRATION_METHOD}); "
            + (
                f"{moved} of {len(fits)} training cases had a channel moved (at most {largest:.1f}° and {shift:.1f} mm)"
                if moved
                else f"the channels of all {len(fits)} training cases already share channel 0's grid (a release "
                "autoseg_convert registered: its coregistration.json), so only new scans on their own grids are moved"
            )
        )
    return dataclasses.replace(plans, coregister_channels=coregister, reasons=reasons)


def _source_model(like: str, dataset: RawDataset, normalization: str) -> SourceModel:
    """The model to plan ``dataset`` like, found (a model file installed) and its channels checked against the
    dataset's before anything is fingerprinted or written."""
    if normalization != "zscore":
        raise UsageError(
            f"--like {like}: the normalization is the model's, channel by channel; leave out --normalization"
        )
    source = find_source_model(like)
    channel_sources(source.plans.channels, dataset.channel_names, source.describe(), dataset.name)
    return source


def _splits_changes(folder: Path, cases: Sequence[Case], resplit: str | None) -> list[str]:
    """``splits_final.json`` re-split as ``resplit`` asks (its line), else what no longer fits the dataset's
    ``cases`` in it (a line, for training refuses it), else nothing."""
    identifiers, subjects = [case.identifier for case in cases], {case.identifier: case.subject for case in cases}
    if resplit is not None:
        return [splits.resplit(folder, identifiers, subjects, resplit)]
    if (folder / SPLITS_FILE).is_file():
        problem = splits.splits_problem(folder / SPLITS_FILE, identifiers, subjects)
        return [problem] if problem else []
    return []


def update_cases(folder: Path, plans: Plans, cases: Sequence[Case]) -> list[str]:
    """Compare the training ``cases`` with those preprocessed in the data folders under ``folder``
    (``AUTOSEG_PREPROCESSED/<dataset>``: those of ``plans`` and any other, e.g. of a configuration deleted from
    ``plans.json``), and delete the preprocessed files of cases no longer in the dataset
    (:func:`autoseg.preprocess.cases.remove_stale_cases`); returns one line for what was added or removed and one
    for what was deleted (nothing when the cases are those preprocessed, or nothing was preprocessed yet)."""
    identifiers = {case.identifier for case in cases}
    planned = {folder / c.data_identifier for c in plans.configurations.values()}
    data_folders = sorted(planned | {p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")})
    before = {identifier for data in data_folders for identifier in case_identifiers(data)}
    added, removed = sorted(identifiers - before), sorted(before - identifiers)
    lines = []
    if before and (added or removed):
        counts = [f"{len(names)} {what} {names}" for what, names in (("added", added), ("removed", removed)) if names]
        lines.append(f"the dataset's cases changed since it was last preprocessed: {', '.join(counts)}")
    deleted = {data.name: remove_stale_cases(data, sorted(identifiers)) for data in data_folders}
    deleted = {name: cases for name, cases in deleted.items() if cases}
    if deleted:
        lines.append(
            "deleted the preprocessed files of cases no longer in the dataset: "
            + "; ".join(f"{name}: {', '.join(cases)}" for name, cases in deleted.items())
        )
    return lines


def _previous_plans(path: Path, notes: list[str]) -> Plans | None:
    """The existing ``plans.json``, or None when there is none or it is unusable (said in ``notes``)."""
    if not path.is_file():
        return None
    try:
        return Plans.from_json(path)
    except PlansError as error:  # unusable as it is: nothing in it can be kept
        notes.append(f"the previous plans.json was replaced, none of it kept: {error}")
        return None


def add_histeq_twins(plans: Plans, channels: Sequence[ChannelFingerprint]) -> Plans:
    """``plans`` with a histogram-equalized twin ``NAME_histeq`` of each z-score configuration ``NAME``, made from
    the configuration as it stands (hand edits included; see :func:`autoseg.plan.topology.histeq_twin`), so the two
    differ in normalization alone. A twin already there is made afresh; nothing else changes, except that a
    compute budget's estimate of ``NAME`` is given to its twin too.

    Args:
        plans: the existing plans.
        channels: the fingerprint's ``channels``.
    """
    twins = {
        twin.name: twin
        for twin in (histeq_twin(c, channels) for name, c in plans.configurations.items() if zscore_name(name) == name)
    }
    budget = plans.compute_budget
    if budget is not None:
        estimates = {
            name: budget.estimates[zscore_name(name)] for name in twins if zscore_name(name) in budget.estimates
        }
        budget = dataclasses.replace(budget, estimates={**budget.estimates, **estimates})
    reason = (
        f"{', '.join(twins)}: histogram-equalized twins of the z-score configurations, added by autoseg_plan "
        "--normalization histeq"
    )
    return dataclasses.replace(
        plans,
        configurations={**plans.configurations, **twins},
        compute_budget=budget,
        reasons={**plans.reasons, "histeq": reason},
    )


def keep_unplanned(previous: Plans, planned: Plans, normalization: str = "zscore") -> Plans:
    """``planned`` plus every configuration of ``previous`` it does not plan, so a re-plan never loses a
    configuration that may have been trained (e.g. ``3d_resunet_histeq`` after a z-score re-plan, or
    ``3d_resunet_sym`` after a re-plan with another planner); one that no longer fits the dataset's channels is
    dropped. The planner's ``default_configuration`` leads (always a z-score one); kept configurations keep their
    compute-budget estimates where both plans have a budget; ``reasons.kept_configurations`` names what was kept.
    Delete an entry from ``plans.json`` to drop it."""
    kept = {
        name: c
        for name, c in previous.configurations.items()
        if name not in planned.configurations and not c.problems(len(planned.channels))
    }
    if not kept:
        return planned
    budget = planned.compute_budget
    if budget is not None and previous.compute_budget is not None:
        estimates = {name: e for name, e in previous.compute_budget.estimates.items() if name in kept}
        budget = dataclasses.replace(budget, estimates={**budget.estimates, **estimates})
    reason = (
        f"{', '.join(kept)}: kept from the previous plans.json (not planned by this run, --normalization "
        f"{normalization}, planner {planned.planner}); delete an entry to drop it"
    )
    return dataclasses.replace(
        planned,
        configurations={**planned.configurations, **kept},
        compute_budget=budget,
        reasons={**planned.reasons, "kept_configurations": reason},
    )


def budget_request(minutes: float, device: str = "auto") -> BudgetRequest:
    """A compute budget of ``minutes`` per fold on ``device``, with this machine's (cached) probe.

    Raises:
        BudgetError: a budget that is not a positive number of minutes.
        ValueError: ``cuda`` asked for on a machine without CUDA.
    """
    if not 0 < minutes < math.inf:
        raise BudgetError(f"the budget must be a positive finite number of minutes, got {minutes:g}")
    chosen, _ = choose_device(device)
    configure_threads()
    precision = choose_precision(chosen)
    probe, cached = load_or_run_probe(chosen, precision)
    return BudgetRequest(minutes, chosen.type, precision.name, probe, cached)


__all__ = [
    "PlanResult",
    "PlansError",
    "add_histeq_twins",
    "budget_request",
    "keep_unplanned",
    "plan_and_preprocess",
    "record_coregistration",
    "update_cases",
    "verify",
]
