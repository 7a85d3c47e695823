"""The compute-budget ladder of ``DefaultPlanner``: the richest plan that trains enough iterations in the minutes given.

For a U-Net (``3d_resunet``, ``3d_aniso``) a ladder of candidates, cheapest first, each at least as rich as the one
before in resolution, width, patch and batch; the probe's cost model estimates one fold of each and
:func:`autoseg.plan.budget.choose_rung` picks. The PSPNet keeps its network and fits its epochs. The chosen
estimates become the plans' ``compute_budget`` object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from autoseg.infer.sliding_window import sliding_window_positions
from autoseg.plan.budget import BudgetRequest, RungChoice, ScheduleLayout, choose_rung, describe_minutes, stage_shares
from autoseg.plan.cost_model import (
    CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL,
    NetworkShape,
    TrainingEstimate,
    estimate_training,
    pspnet_cost,
)
from autoseg.plan.topology import Topology, unet_topology
from autoseg.plans import ComputeBudget, Configuration, Schedule, Symmetry
from planners.resunet import ZOOM_OUT_SHARE

if TYPE_CHECKING:
    from planners.default import DefaultPlanner

#: Network widths a compute budget chooses from, narrowest first: (first-stage features, cap).
BUDGET_WIDTHS = ((8, 128), (16, 256), (24, 320), (32, 320))
#: A compute budget may lower the resolution to this (mm per axis) when the data are finer.
BUDGET_COARSE_SPACING_MM = 2.0
#: The smallest patch edge (voxels) a compute budget tries.
BUDGET_MIN_PATCH_EDGE = 32
#: Patches per batch of every budgeted candidate but the richest (which fits its batch to memory, as without a
#: compute budget): two, nnU-Net's usual, so time buys iterations rather than bigger batches.
BUDGET_BATCH = 2

#: ``plan_resunet``/``plan_aniso`` of ``DefaultPlanner``: (spacing, reason, normalization, widths, patch, batch).
UNetBuilder = Callable[..., Configuration]


class ComputeLadder:
    """Fits one planning pass's configurations to ``compute`` and keeps each one's choice for the plans' record.

    Args:
        planner: the planner whose configurations are fitted (its widths, epochs and iterations are the richest
            candidate's).
        compute: the compute budget (minutes on a device, with that machine's probe).
    """

    def __init__(self, planner: DefaultPlanner, compute: BudgetRequest):
        self.planner = planner
        self.compute = compute
        #: Configuration name -> the rung chosen for it, in planning order.
        self.choices: dict[str, RungChoice] = {}

    def share(self, name: str, twin: str) -> None:
        """``twin`` (e.g. ``NAME_histeq``) trains like ``name``: it shares its compute-budget estimate."""
        if name in self.choices:
            self.choices = {**self.choices, twin: self.choices[name]}

    def spacings(self, spacing: tuple[float, ...], reason: str) -> list[tuple[tuple[float, ...], str]]:
        """Resolutions a compute budget may train at, coarsest first: the planned one, and 2 mm when finer."""
        coarse = tuple(max(float(s), BUDGET_COARSE_SPACING_MM) for s in spacing)
        if coarse == tuple(spacing):
            return [(spacing, reason)]
        return [
            (coarse, f"{reason}; lowered to {BUDGET_COARSE_SPACING_MM:g} mm to fit the compute budget"),
            (spacing, reason),
        ]

    def widths(self) -> list[tuple[int, int]]:
        """Widths a compute budget may choose, narrowest first, ending with the planner's own."""
        return [w for w in BUDGET_WIDTHS if w[0] < self.planner.widths[0]] + [self.planner.widths]

    def ladder(
        self, build: UNetBuilder, spacing, spacing_reason, normalization, inherited: Topology | None = None
    ) -> list[Configuration]:
        """Candidate U-Net configurations for a compute budget, cheapest first, each at least as rich as the
        previous in resolution, width, patch and batch; the last is the plan without a compute budget.

        Order: at the coarsest resolution the narrowest network with growing patches, then wider networks on
        the full patch; then finer resolutions with the widest network and growing patches.

        Args:
            build: the planner's ``plan_resunet`` or ``plan_aniso``.
            inherited: the network every candidate has (``autoseg_plan --like``: the model's, which ``build``
                builds); only resolution, patch and batch then vary.
        """
        candidates = []
        step = inherited.total_stride if inherited is not None else None
        for index, (option, reason) in enumerate(self.spacings(spacing, spacing_reason)):
            for widths in self.widths() if index == 0 and inherited is None else [self.planner.widths]:
                largest = build(option, reason, normalization, widths, batch=BUDGET_BATCH)
                for patch in growing_patches(largest.patch_size, option, widths, step):
                    candidates.append(build(option, reason, normalization, widths, patch, BUDGET_BATCH))
                candidates.append(largest)
        richest = build(spacing, spacing_reason, normalization)
        ladder = []
        for candidate in candidates:
            candidate = _fixed_stage_batches(candidate)
            if _at_least_as_rich(richest, candidate) and (not ladder or _at_least_as_rich(candidate, ladder[-1])):
                ladder.append(candidate)
        return [*ladder, richest]

    def estimate(self, configuration: Configuration, layout: ScheduleLayout) -> TrainingEstimate:
        """Estimated wall time of one fold of ``configuration`` laid out as ``layout`` on the budget's machine."""
        fingerprint = self.planner.fingerprint
        network = NetworkShape(
            configuration.input_channels(len(fingerprint.channels)),
            len(fingerprint.labels) - 1,
            configuration.network.features,
            configuration.network.strides,
            configuration.network.kernel_sizes,
            configuration.network.layout,
        )
        schedule = laid_out_schedule(configuration, layout)
        shares = stage_shares([s.start_epoch for s in schedule.stages], layout.epochs)
        stages = [(s.patch_size, s.batch_size, share) for s, share in zip(schedule.stages, shares)]
        cases = max(1, round(fingerprint.aggregate.num_cases / 5))
        shape = tuple(max(m, p) for m, p in zip(configuration.median_shape, configuration.patch_size))
        windows = (
            len(sliding_window_positions(shape, configuration.patch_size, configuration.sliding_window_step)) * cases
        )
        megavoxels = float(np.prod(fingerprint.aggregate.median_shape)) * cases / 1e6
        return estimate_training(
            self.compute.probe,
            network,
            stages,
            epochs=layout.epochs,
            iterations_per_epoch=layout.iterations_per_epoch,
            val_iterations=layout.val_iterations,
            validation_windows=windows,
            mirror_count=2 ** len(configuration.mirror_axes),
            validation_megavoxels=megavoxels,
            device_type=self.compute.device,
        )

    def plan_unet(
        self, build: UNetBuilder, spacing, spacing_reason, normalization, inherited: Topology | None = None
    ) -> Configuration:
        """The richest U-Net candidate (``build``: the planner's ``plan_resunet`` or ``plan_aniso``) that trains
        enough iterations within the compute budget (``inherited``: see :meth:`ladder`)."""
        ladder = self.ladder(build, spacing, spacing_reason, normalization, inherited)
        choice = choose_rung(
            len(ladder),
            lambda rung, layout: self.estimate(ladder[rung], layout),
            self.compute.minutes,
            self.planner.epochs * self.planner.iterations_per_epoch,
        )
        chosen = ladder[choice.index]
        schedule = laid_out_schedule(chosen, choice.layout)
        reasons = dict(chosen.reasons)
        reasons["compute_budget"] = self.reason(ladder, choice)
        reasons["schedule"] = schedule_reason(schedule, choice)
        configuration = dataclasses.replace(chosen, schedule=schedule, reasons=reasons)
        self.choices = {**self.choices, configuration.name: choice}
        return configuration

    def plan_pspnet(self, spacing, spacing_reason, normalization, symmetry: Symmetry | None = None) -> Configuration:
        """The planner's 2d_pspnet plan with its epochs fitted to the compute budget.

        The network stays the planner's (a pre-trained backbone is chosen for its weights, not its cost); its
        step is estimated from the PSPNet's multiply-accumulates (counted on the meta device) and activations
        with the probe's cost model, fitted on 3-D U-Nets, so the figure is rougher than for the U-Nets."""
        planner = self.planner
        configuration = planner.plan_pspnet(spacing, spacing_reason, normalization, symmetry)
        choice = choose_rung(
            1,
            lambda rung, layout: self.estimate_pspnet(configuration, layout),
            self.compute.minutes,
            planner.pspnet_epochs * planner.iterations_per_epoch,
        )
        schedule = _pspnet_laid_out(configuration.schedule, choice.layout)
        reasons = dict(configuration.reasons)
        estimate = choice.estimate
        reasons["compute_budget"] = (
            f"{configuration.network.backbone} PSPNet on {'x'.join(map(str, configuration.patch_size))} slices, "
            f"batch {configuration.batch_size}: {estimate.iterations} iterations at "
            f"{estimate.seconds_per_iteration:.2f} s plus validation: estimated "
            f"{describe_minutes(estimate.total_seconds)} of the {self.compute.minutes:g}-minute budget (step "
            "estimated from its multiply-accumulates with the cost model fitted on 3-D U-Nets)"
        )
        reasons["schedule"] = schedule_reason(schedule, choice)
        self.choices = {**self.choices, configuration.name: choice}
        return dataclasses.replace(configuration, schedule=schedule, reasons=reasons)

    def estimate_pspnet(self, configuration: Configuration, layout: ScheduleLayout) -> TrainingEstimate:
        """Estimated wall time of one fold of a 2d_pspnet configuration laid out as ``layout``."""
        aggregate = self.planner.fingerprint.aggregate
        in_channels = configuration.input_channels(len(self.planner.fingerprint.channels))
        gmacs, mega_activations = pspnet_cost(
            configuration.network.backbone, configuration.patch_size, configuration.batch_size, in_channels
        )
        probe = self.compute.probe
        megavoxels = configuration.batch_size * float(np.prod(configuration.patch_size)) / 1e6
        step = probe.training.seconds(gmacs, mega_activations, megavoxels)
        forward = probe.inference.seconds(gmacs, mega_activations, megavoxels) / configuration.batch_size
        augmentation = configuration.batch_size * probe.augmentation_seconds((*configuration.patch_size, 1))
        cases = max(1, round(aggregate.num_cases / 5))
        slices = configuration.median_shape[configuration.slice_axis] * cases
        return TrainingEstimate.for_steps(
            step,
            augmentation,
            forward * configuration.batch_size,
            layout.epochs,
            layout.iterations_per_epoch,
            layout.val_iterations,
            self.compute.device,
            final_validation_seconds=slices * 2 ** len(configuration.mirror_axes) * forward
            + CASE_OVERHEAD_SECONDS_PER_MEGAVOXEL * float(np.prod(aggregate.median_shape)) * cases / 1e6,
        )

    def reason(self, ladder: list[Configuration], choice: RungChoice) -> str:
        """The ``reasons.compute_budget`` of a U-Net: the chosen candidate, its estimate and what the next costs."""
        chosen, estimate, minutes = ladder[choice.index], choice.estimate, self.compute.minutes
        text = (
            f"{_label(chosen)}: {estimate.iterations} iterations at {estimate.seconds_per_iteration:.2f} s "
            f"(network {estimate.step_seconds:.2f} s + loader {estimate.loader_seconds:.2f} s) plus validation: "
            f"estimated {describe_minutes(estimate.total_seconds)} of the {minutes:g}-minute budget; candidate "
            f"{choice.index + 1} of {len(ladder)}, the richest that trains the {choice.target} iterations this "
            "budget asks for first"
        )
        if choice.next_index is not None:
            richer = ladder[choice.next_index]
            text += (
                f". {_difference(richer, chosen)} would allow only {choice.next_iterations} iterations in "
                f"{minutes:g} minutes"
            )
        return text

    def record(self, configurations: list[Configuration]) -> ComputeBudget:
        """The plans' ``compute_budget`` object, describing the default (first) configuration.

        Raises:
            ValueError: the default configuration was not fitted to the compute budget (a planner's bug).
        """
        estimates = {name: _estimate_record(choice) for name, choice in self.choices.items()}
        default = configurations[0].name
        first = estimates.get(default)
        if first is None:
            raise ValueError(
                f"{type(self.planner).__name__}: the compute budget covers {sorted(estimates)}, not {default}"
            )
        reasons = {c.name: c.reasons["compute_budget"] for c in configurations if "compute_budget" in c.reasons}
        probe = self.compute.probe
        notes = self.choices[default].estimate.notes
        processes, reasons["data_processes"] = notes["data_processes"], notes["data_processes_reason"]
        reasons["probe"] = (
            f"{'cached' if self.compute.probe_cached else 'new'} probe of {probe.machine['model']}, "
            f"{probe.machine['threads'] or 'GPU'} threads, torch {probe.machine['torch']}, "
            f"{probe.machine['precision']}: {len(probe.points)} networks timed on "
            f"{probe.created}; training memory format {probe.memory_format}"
        )
        if probe.describe():
            reasons["probe"] += "; " + probe.describe()
        return ComputeBudget(
            device=self.compute.device,
            minutes=self.compute.minutes,
            precision=self.compute.precision,
            estimated_minutes=first["estimated_minutes"],
            seconds_per_iteration=first["seconds_per_iteration"],
            iterations=first["iterations"],
            configuration=default,
            memory_format=probe.memory_format,
            data_processes=processes,
            estimates=estimates,
            probe=probe.summary(),
            reasons=reasons,
        )


def growing_patches(
    largest: tuple[int, ...], spacing, widths, step: tuple[int, ...] | None = None
) -> list[tuple[int, ...]]:
    """Patches from BUDGET_MIN_PATCH_EDGE voxels up to (not including) ``largest``, smallest first: each grows
    the axis that is furthest from its final size by one multiple of the total stride (``step``; by default that of
    the topology planned for ``largest``; about 1.2–1.5 times the voxels per step), so the ladder of candidates has
    small steps in cost."""
    step = step or unet_topology(largest, spacing, max_features=widths[1], base_features=widths[0]).total_stride
    patch = [min(edge, max(s, int(np.ceil(BUDGET_MIN_PATCH_EDGE / s)) * s)) for edge, s in zip(largest, step)]
    found = []
    while tuple(patch) != tuple(largest):
        found.append(tuple(patch))
        ratios = [p / edge if p < edge else np.inf for p, edge in zip(patch, largest)]
        axis = int(np.argmin(ratios))
        patch[axis] = min(largest[axis], patch[axis] + step[axis])
    return found


def laid_out_schedule(configuration: Configuration, layout: ScheduleLayout) -> Schedule:
    """The configuration's schedule over ``layout``: zoom-out from 7/8 of the epochs, one cosine cycle per
    stage for short runs (``layout.cycles`` in stage 1 for long ones), the layout's validation batches."""
    schedule = configuration.schedule
    stages, period = schedule.stages, None
    if len(stages) == 2:
        switch = min(layout.epochs - 1, max(1, round(layout.epochs * (1 - ZOOM_OUT_SHARE))))
        stages = (stages[0], dataclasses.replace(stages[1], start_epoch=switch))
        period = max(1, switch // layout.cycles) if layout.cycles > 1 else None
    return dataclasses.replace(
        schedule,
        epochs=layout.epochs,
        iterations_per_epoch=layout.iterations_per_epoch,
        stages=stages,
        restart_period_epochs=period,
        val_iterations_per_epoch=layout.val_iterations,
    )


def _pspnet_laid_out(schedule: Schedule, layout: ScheduleLayout) -> Schedule:
    """The PSPNet's two phases over ``layout``: all layers from a tenth of the epochs, patience scaled alike."""
    scale = layout.epochs / schedule.epochs
    stages = (
        schedule.stages[0],
        dataclasses.replace(schedule.stages[1], start_epoch=max(1, round(layout.epochs / 10))),
    )
    return dataclasses.replace(
        schedule,
        epochs=layout.epochs,
        iterations_per_epoch=layout.iterations_per_epoch,
        stages=stages,
        val_iterations_per_epoch=layout.val_iterations,
        plateau_patience_epochs=max(2, round(schedule.plateau_patience_epochs * scale)),
        early_stopping_patience_epochs=max(4, round(schedule.early_stopping_patience_epochs * scale)),
    )


def schedule_reason(schedule: Schedule, choice: RungChoice) -> str:
    """The ``reasons.schedule`` of a configuration laid out over the compute budget."""
    layout = choice.layout
    stages = ", ".join(
        f"{s.name} from epoch {s.start_epoch} (patch {list(s.patch_size)}, lr {s.learning_rate:g})"
        for s in schedule.stages
    )
    cycles = (
        "one cosine learning-rate cycle per stage"
        if schedule.restart_period_epochs is None
        else f"cosine warm restarts every {schedule.restart_period_epochs} epochs"
    )
    return (
        f"laid out over the budget: {layout.epochs} epochs x {layout.iterations_per_epoch} iterations "
        f"(about {choice.estimate.seconds_per_iteration * layout.iterations_per_epoch:.0f} s each), "
        f"{layout.val_iterations} validation batches per epoch; {stages}; {cycles}; the trainer "
        f"{schedule.trainer} chooses the optimizer"
    )


def _estimate_record(choice: RungChoice) -> dict:
    """One configuration's entry in the plans' ``compute_budget.estimates``."""
    e = choice.estimate
    return {
        "estimated_minutes": round(e.total_minutes, 2),
        "seconds_per_iteration": round(e.seconds_per_iteration, 4),
        "iterations": e.iterations,
        "epochs": e.epochs,
        "val_iterations_per_epoch": choice.layout.val_iterations,
        "minutes": {
            "training": round(e.training_seconds / 60, 2),
            "epoch_validation": round(e.epoch_validation_seconds / 60, 2),
            "overhead": round(e.overhead_seconds / 60, 2),
            "final_validation": round(e.final_validation_seconds / 60, 2),
        },
        "network_seconds_per_iteration": round(e.step_seconds, 4),
        "stage_seconds_per_iteration": e.notes.get("stage_seconds_per_iteration", []),
        "loader_seconds_per_iteration": round(e.loader_seconds, 4),
    }


def _fixed_stage_batches(configuration: Configuration) -> Configuration:
    """Every stage of a budgeted candidate trains with the configuration's batch."""
    stages = tuple(dataclasses.replace(s, batch_size=configuration.batch_size) for s in configuration.schedule.stages)
    return dataclasses.replace(configuration, schedule=dataclasses.replace(configuration.schedule, stages=stages))


def _at_least_as_rich(candidate: Configuration, previous: Configuration) -> bool:
    """Finer or equal spacing, wider or equal network, larger or equal patch and batch on every axis."""
    return (
        all(a <= b for a, b in zip(candidate.target_spacing, previous.target_spacing))
        and candidate.network.features[0] >= previous.network.features[0]
        and max(candidate.network.features) >= max(previous.network.features)
        and all(a >= b for a, b in zip(candidate.patch_size, previous.patch_size))
        and candidate.batch_size >= previous.batch_size
        and candidate != previous
    )


def _label(configuration: Configuration) -> str:
    """E.g. ``2 mm, features 8–128 (5 stages), patch 64x64x64, batch 2``."""
    spacing = configuration.target_spacing
    resolution = f"{spacing[0]:g} mm" if len(set(spacing)) == 1 else "x".join(f"{s:g}" for s in spacing) + " mm"
    features = configuration.network.features
    return (
        f"{resolution}, features {features[0]}–{max(features)} ({len(features)} stages), patch "
        f"{'x'.join(map(str, configuration.patch_size))}, batch {configuration.batch_size}"
    )


def _difference(richer: Configuration, chosen: Configuration) -> str:
    """What the next richer candidate changes, e.g. ``1 mm instead of 2 mm``."""
    parts = []
    if richer.target_spacing != chosen.target_spacing:
        parts.append(f"{_label(richer).split(',')[0]} instead of {_label(chosen).split(',')[0]}")
    if richer.network.features[0] != chosen.network.features[0]:
        parts.append(
            f"features {richer.network.features[0]}–{max(richer.network.features)} instead of "
            f"{chosen.network.features[0]}–{max(chosen.network.features)}"
        )
    if richer.patch_size != chosen.patch_size:
        parts.append(
            f"patch {'x'.join(map(str, richer.patch_size))} instead of {'x'.join(map(str, chosen.patch_size))}"
        )
    if richer.batch_size != chosen.batch_size:
        parts.append(f"batch {richer.batch_size} instead of {chosen.batch_size}")
    text = " and ".join(parts) or "the next candidate"
    return text[0].upper() + text[1:]
