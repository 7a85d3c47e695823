"""Compute-budget planning: FLOP counts, the cost model, the probe and its cache, the ladder of candidates, the
plans' record of the estimate, and the training's check of it.

Every plan here uses a *fake* probe with fixed coefficients (those of a 2-core CPU), so the decisions do not depend
on the machine running the suite; only the cache test runs the real probe, on tiny networks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import fake_probe
from torch.utils.flop_counter import FlopCounterMode

import autoseg.plan.probe as probe
from autoseg.api.plan import budget_request, plan_and_preprocess
from autoseg.commands.plan import main as plan_main
from autoseg.data.dataset import find_dataset
from autoseg.io.files import read_json, write_json
from autoseg.machine import Precision
from autoseg.networks import ResidualUNet
from autoseg.plan.budget import (
    BudgetError,
    BudgetRequest,
    ScheduleLayout,
    choose_rung,
    lay_out_schedule,
    target_iterations,
)
from autoseg.plan.cost_model import CostModel, NetworkShape, TrainingEstimate
from autoseg.plan.fingerprint import Fingerprint, compute_fingerprint
from autoseg.plan.probe import ComputeProbe, load_or_run_probe
from autoseg.plans import Plans
from autoseg.train.time_promise import TimePromise
from autoseg.train.transfer import SourceModel
from planners import get_planner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32 = Precision("fp32", None, False, "test")


def budget(minutes: float, speed: float = 1.0) -> BudgetRequest:
    return BudgetRequest(minutes, "cpu", "fp32", fake_probe(speed), True)


@pytest.fixture(scope="module")
def atlas_1mm_fingerprint(tiny_sources: dict[str, Path]) -> Fingerprint:
    """The tiny ATLAS-like fingerprint with the sizes of 20 whole-brain 1 mm T1w scans (197x233x189)."""
    fingerprint = compute_fingerprint(find_dataset(str(tiny_sources["atlas"])), progress=False)
    aggregate = dataclasses.replace(
        fingerprint.aggregate,
        num_cases=20,
        median_spacing=(1.0, 1.0, 1.0),
        spacing_percentile_10=(1.0, 1.0, 1.0),
        median_shape=(197.0, 233.0, 189.0),
        median_cropped_shape=(150.0, 184.0, 158.0),
        median_cropped_size_mm=(150.0, 184.0, 158.0),
        anisotropy_ratio=1.0,
    )
    return dataclasses.replace(fingerprint, aggregate=aggregate)


# ---------------------------------------------------------------------------- FLOPs and the cost model
@pytest.mark.parametrize("dimension", [2, 3])
def test_forward_macs_equal_torch_flop_counter(dimension: int) -> None:
    if dimension == 3:
        kwargs = dict(
            features=(8, 16, 32, 32),
            strides=((1, 1, 1), (2, 2, 2), (2, 2, 1), (2, 2, 2)),
            kernel_sizes=((3, 3, 3), (3, 3, 3), (3, 3, 1), (3, 3, 3)),
        )
        patch = (32, 24, 16)
    else:
        kwargs = dict(features=(8, 16, 32), strides=((1, 1), (2, 2), (2, 2)), kernel_sizes=((3, 3),) * 3)
        patch = (40, 24)
    for deep_supervision in (True, False):
        network = ResidualUNet(in_channels=2, num_classes=1, deep_supervision=deep_supervision, **kwargs)
        with FlopCounterMode(display=False) as counter:
            network(torch.zeros(1, 2, *patch))
        assert network.forward_macs(patch) == counter.get_total_flops() // 2


def test_cost_model_recovers_known_coefficients_and_interpolates() -> None:
    truth = CostModel(0.01, 0.002, 0.3, 0.05)
    gmacs, activations, voxels = [1.0, 5.0, 20.0, 8.0, 3.0], [10.0, 40.0, 90.0, 100.0, 5.0], [0.1, 0.5, 0.4, 2.0, 1.0]
    seconds = [truth.seconds(g, a, v) for g, a, v in zip(gmacs, activations, voxels)]
    fitted = CostModel.fit(gmacs, activations, voxels, seconds)
    assert tuple(fitted.__dict__.values()) == pytest.approx(tuple(truth.__dict__.values()), rel=1e-6)
    assert fitted.seconds(10.0, 50.0, 1.0) == pytest.approx(truth.seconds(10.0, 50.0, 1.0))  # between probed points
    assert min(CostModel.fit([1, 2, 3], [1, 2, 3], [1, 2, 3], [3.0, 2.0, 1.0]).__dict__.values()) >= 0


# ---------------------------------------------------------------------------- the probe and its cache
@pytest.fixture
def quick_probe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The real probe on tiny networks; returns a list that grows by one per probe run."""
    monkeypatch.setattr(probe, "CPU_PROBE_NETWORKS", ((4, 16), (4, 24), (8, 16)))
    monkeypatch.setattr(probe, "PROBE_REPEATS", 1)  # one repeat: no spread to judge
    monkeypatch.setattr(probe, "load_average", lambda: 0.0)  # an idle machine, whatever runs beside the suite
    monkeypatch.setattr(probe, "AUGMENTATION_PROBE_EDGE", 16)
    monkeypatch.setattr(probe, "AUGMENTATION_PROBE_SAMPLES", 1)
    runs: list[int] = []
    original = probe.run_probe

    def counting(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(probe, "run_probe", counting)
    return runs


def test_probe_is_cached_per_machine_and_reprobed_when_machine_or_torch_changes(
    quick_probe: list[int], data_roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = torch.device("cpu")
    first, cached = load_or_run_probe(cpu, FP32, log=lambda line: None)
    assert not cached and len(quick_probe) == 1
    assert first.machine["threads"] == torch.get_num_threads() and first.machine["torch"] == torch.__version__
    assert all(p.train_seconds > 0 and p.inference_seconds > 0 for p in first.points)
    assert first.memory_format in ("contiguous", "channels_last_3d")
    files = list((data_roots / "compute_probes").glob("probe_*.json"))
    assert len(files) == 1
    again, cached = load_or_run_probe(cpu, FP32, log=lambda line: None)
    assert cached and len(quick_probe) == 1 and again == first
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # a torch upgrade
    _, cached = load_or_run_probe(cpu, FP32, log=lambda line: None)
    assert not cached and len(quick_probe) == 2
    monkeypatch.setattr("autoseg.machine.cpu_model", lambda: "another CPU")  # another machine
    _, cached = load_or_run_probe(cpu, FP32, log=lambda line: None)
    assert not cached and len(quick_probe) == 3
    files = sorted((data_roots / "compute_probes").glob("probe_*.json"))
    assert len(files) == 3
    files[0].write_text("{ not json")  # a damaged cache file is probed again, not trusted
    monkeypatch.undo()


class FakeSteps:
    """Probe steps that run nothing: each returns a made-up time (from its network's voxels and features), and the
    repeat ``busy_round`` of every step (0: the first timed one; rounds interleave the steps, so these all fall in
    the same stretch of the probe) takes ``busy_factor`` times as long: a passing load on a simulated machine."""

    def __init__(self, busy_round: int | None = None, busy_factor: float = 3.0) -> None:
        self.busy_round, self.busy_factor = busy_round, busy_factor
        self.train_scale = self.inference_scale = 1.0  # how much slower the whole machine is than the made-up times

    def network_steps(self, shape, edge, device, precision, memory_format):
        cost = shape.features[0] * edge**3 / 1e6
        return self.step(cost * self.train_scale), self.step(cost / 4 * self.inference_scale)

    def step(self, seconds: float):
        calls = [0]

        def run() -> float:
            calls[0] += 1  # call 1 is the untimed warm-up
            return seconds * (self.busy_factor if calls[0] - 2 == self.busy_round else 1.0)

        return run


@pytest.fixture
def simulated_probe(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeSteps]:
    """Replace the probe's timed steps and augmentation timing by :class:`FakeSteps`; the load average and cores are
    the test's: nothing depends on the CPU running the suite."""

    def install(busy_round: int | None = None, load: float = 0.5) -> FakeSteps:
        fake = FakeSteps(busy_round)
        monkeypatch.setattr(probe, "_network_steps", fake.network_steps)
        monkeypatch.setattr(probe, "_augmentation_seconds_per_megavoxel", lambda: 0.3)
        monkeypatch.setattr(probe, "load_average", lambda: load)
        monkeypatch.setattr(probe, "available_cores", lambda: 2)
        return fake

    return install


def test_timed_rounds_spread_the_repeats_of_each_step_over_the_whole_probe() -> None:
    order: list[str] = []

    def step(name: str):
        return lambda: order.append(name) or 1.0

    times = probe.timed_rounds([step("a"), step("b"), step("c")], 3)
    assert order == ["a", "b", "c"] * 4, "one untimed warm-up each, then rounds over all steps"
    assert times == [[1.0] * 3] * 3


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_on_a_gpu_the_rounds_go_over_one_network_at_a_time(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    def network_steps(shape, edge, device, precision, memory_format):
        events.append(f"build {edge}")
        return (lambda: events.append(f"train {edge}") or 1.0), (lambda: events.append(f"infer {edge}") or 0.5)

    monkeypatch.setattr(probe, "_network_steps", network_steps)
    monkeypatch.setattr(probe, "PROBE_REPEATS", 2)
    networks = [(NetworkShape.isotropic(4, edge), edge, torch.contiguous_format) for edge in (16, 24)]
    times = probe._timed_networks(networks, torch.device(device), FP32)
    assert times == [[1.0, 1.0], [0.5, 0.5]] * 2
    one = ["train 16", "infer 16"] * 3
    two = ["train 24", "infer 24"] * 3
    if device == "cpu":  # every network built first, then rounds over all of them
        assert events == ["build 16", "build 24"] + ["train 16", "infer 16", "train 24", "infer 24"] * 3
    else:  # one network's weights and optimizer state on the GPU at a time
        assert events == ["build 16", *one, "build 24", *two]


def test_a_busy_moment_slows_one_round_and_the_fastest_repeat_is_kept(simulated_probe) -> None:
    simulated_probe(busy_round=None)
    idle = probe.run_probe(torch.device("cpu"), FP32, log=lambda line: None)
    assert not idle.busy and idle.spread == 0.0 and idle.load_average == 0.5
    simulated_probe(busy_round=1)  # the second of the three rounds runs 3 times slower
    lines: list[str] = []
    busy = probe.run_probe(torch.device("cpu"), FP32, log=lines.append)
    assert [p.train_seconds for p in busy.points] == [p.train_seconds for p in idle.points]
    assert [p.inference_seconds for p in busy.points] == [p.inference_seconds for p in idle.points]
    assert busy.training == idle.training, "the cost model is fitted to the fastest repeats"
    assert busy.spread == pytest.approx(2.0) and busy.busy.startswith("repeats of the same step differed by 200%")
    assert "the machine looked busy: repeats" in lines[-1]
    simulated_probe(busy_round=None, load=4.5)  # steady load from elsewhere: every repeat alike, the load is high
    loaded = probe.run_probe(torch.device("cpu"), FP32, log=lambda line: None)
    assert loaded.spread == 0.0 and loaded.busy == "load average 4.5 on 2 cores before probing"


def test_the_plan_says_when_the_probe_found_the_machine_busy(atlas_1mm_fingerprint: dict) -> None:
    busy = dataclasses.replace(fake_probe(4.0), busy="load average 4.5 on 2 cores before probing", spread=0.1)
    plans = get_planner("DefaultPlanner")(atlas_1mm_fingerprint, compute=BudgetRequest(15, "cpu", "fp32", busy)).plan()
    reason = plans.compute_budget.reasons["probe"]
    assert "the machine looked busy while probing (load average 4.5 on 2 cores before probing)" in reason
    assert plans.compute_budget.probe["busy"] == busy.busy


def test_a_busy_cached_probe_is_probed_again_keeping_the_faster_of_each_timing(
    simulated_probe, data_roots: Path
) -> None:
    cpu = torch.device("cpu")
    simulated_probe(load=4.5).train_scale = 2.0  # under steady load from elsewhere: training steps twice as slow
    first, cached = load_or_run_probe(cpu, FP32, log=lambda line: None)
    assert first.busy and not cached
    # the next plan probes again: training steps as fast as they can be, forward passes slower than the first time
    fake = simulated_probe()
    fake.inference_scale = 1.5
    lines: list[str] = []
    second, cached = load_or_run_probe(cpu, FP32, log=lines.append)
    assert not cached and "was taken while the machine looked busy" in lines[0]
    assert [p.train_seconds for p in second.points] == pytest.approx([p.train_seconds / 2 for p in first.points])
    assert [p.inference_seconds for p in second.points] == [p.inference_seconds for p in first.points]
    assert second.busy == "" and second.training != first.training and second.inference == first.inference
    third, cached = load_or_run_probe(cpu, FP32, log=lambda line: None)
    assert cached and third == second, "a probe that did not look busy is kept"


def test_training_runs_faster_than_a_new_probe_carry_over_to_it_re_expressed(data_roots: Path) -> None:
    """A run's speed compares its measured seconds with the probe's estimate: against a merged probe twice as fast, the
    same measured seconds are twice the (new) estimate, so a run's correction survives the new probe where it is
    still faster than the new probe's estimate."""
    here = probe.machine_description(torch.device("cpu"), "fp32")
    runs = (
        {"run": "A", "date": "2026-12-07T10:00:00+00:00", "speed": 0.4},  # faster than even the new probe
        {"run": "B", "date": "2026-12-07T11:00:00+00:00", "speed": 0.8},  # slower than the new probe: dropped
    )
    busy = dataclasses.replace(fake_probe(machine=here), busy="load average 4.1", training_runs=runs)
    quiet_points = tuple(dataclasses.replace(p, train_seconds=p.train_seconds / 2) for p in busy.points)
    quiet = dataclasses.replace(busy, points=quiet_points, busy="", training_runs=(), created="2026-12-08T09:00:00")
    merged = probe.fastest_of(busy, quiet)
    assert [r["run"] for r in merged.training_runs] == ["A"]
    assert merged.training_runs[0]["speed"] == pytest.approx(0.8) and merged.training_runs[0]["rescaled"] == 2.0
    network = NetworkShape(1, 2, (8, 16, 32, 64), ((1, 1, 1),) + ((2, 2, 2),) * 3, ((3, 3, 3),) * 4)
    patch = (32, 32, 32)
    measured = busy.step_seconds(network, patch, 2) * 0.4  # what run A's iterations took
    # the cost model is fitted again on the merged timings, so the estimate is preserved up to that fit
    assert busy.corrected().step_seconds(network, patch, 2) == pytest.approx(measured, rel=1e-6)
    assert merged.corrected().step_seconds(network, patch, 2) == pytest.approx(measured, rel=0.05)
    assert merged.step_seconds(network, patch, 2) > 1.15 * measured, "uncorrected, the new probe would promise more"


def test_a_probe_under_steady_load_that_tips_the_memory_format_does_not_replace_a_faster_one(data_roots: Path) -> None:
    """Under steady load a new probe can choose another training memory format and time every step slower: the
    faster probe is kept whole, with the training runs recorded against it."""
    cpu = torch.device("cpu")
    here = probe.machine_description(cpu, "fp32")
    runs = ({"run": "A", "date": "2026-12-07T10:00:00+00:00", "speed": 0.8},)
    fast = dataclasses.replace(fake_probe(machine=here), busy="repeats differed by 125%", training_runs=runs)
    slow_points = tuple(dataclasses.replace(p, train_seconds=3 * p.train_seconds) for p in fast.points)
    other = "channels_last_3d" if fast.memory_format != "channels_last_3d" else "contiguous"
    slow = dataclasses.replace(fast, points=slow_points, memory_format=other, busy="load average 4.1", training_runs=())
    kept = probe.fastest_of(fast, slow)
    assert kept.points == fast.points and kept.memory_format == fast.memory_format and kept.training_runs == runs
    assert kept.busy == "load average 4.1", "busy only when both were: the next plan probes again"
    assert probe.fastest_of(slow, fast).points == fast.points, "a faster new probe replaces a slower cached one"
    assert probe.fastest_of(dataclasses.replace(fast, busy=""), slow).busy == ""


def test_training_corrects_the_cached_probe_and_a_busy_run_does_not_shrink_later_plans(
    data_roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = torch.device("cpu")
    here = probe.machine_description(cpu, "fp32")
    measured = fake_probe(machine=here)
    path = probe._cache_file(here)
    write_json(measured.to_plain(), path)
    planned = measured.summary()
    # a run slowed by other jobs (its fast epochs 1.6x), then a quiet one (0.8x), then the first again, continued
    assert "took 1.60 times the probe's estimate" in probe.record_training_speed(planned, cpu, FP32, 1.6, "run A")
    probe.record_training_speed(planned, cpu, FP32, 0.8, "run B")
    probe.record_training_speed(planned, cpu, FP32, 1.5, "run A")
    lines: list[str] = []
    corrected, cached = load_or_run_probe(cpu, FP32, log=lines.append)
    assert cached and corrected.correction == 0.8, "the fastest run counts, not the busy one"
    assert [r["run"] for r in corrected.training_runs] == ["run B", "run A"]
    assert "corrected by what training measured here: x0.80, the fastest of 2 training run(s)" in lines[0]
    shape = NetworkShape.isotropic(16, 64)
    assert corrected.step_seconds(shape, (64,) * 3, 2) == pytest.approx(
        0.8 * measured.step_seconds(shape, (64,) * 3, 2)
    )
    assert corrected.augmentation_seconds((64,) * 3) == pytest.approx(0.8 * measured.augmentation_seconds((64,) * 3))
    # a plan made with the corrected probe is recorded as such; its runs compare against the probe as measured
    planned_corrected = corrected.summary()
    assert planned_corrected["correction"] == 0.8 and "timings corrected" in corrected.describe()
    probe.record_training_speed(planned_corrected, cpu, FP32, 1.25, "run C")  # 1.25 x the corrected estimate
    assert ComputeProbe.from_plain(read_json(path)).training_runs[-1]["speed"] == pytest.approx(1.0)
    for n in range(probe.CORRECTION_RUNS + 2):
        probe.record_training_speed(planned, cpu, FP32, 2.0 + n, f"run {n}")
    assert len(ComputeProbe.from_plain(read_json(path)).training_runs) == probe.CORRECTION_RUNS
    # nothing is recorded for another machine, or a probe measured again since the plan
    other = {**planned, "machine": {**planned["machine"], "model": "another CPU"}}
    assert "not recorded: it trained with another model" in probe.record_training_speed(other, cpu, FP32, 1.0, "x")
    stale = {**planned, "created": "2020-01-01T00:00:00+00:00"}
    assert "no longer holds the probe the plan used" in probe.record_training_speed(stale, cpu, FP32, 1.0, "x")


# ---------------------------------------------------------------------------- planning to a budget
def _plan(fingerprint: dict, minutes: float, planner: str = "DefaultPlanner", speed: float = 1.0) -> Plans:
    return get_planner(planner)(fingerprint, compute=budget(minutes, speed)).plan()


def test_a_smaller_budget_never_plans_a_larger_network_or_patch_and_every_plan_uses_the_budget(
    atlas_1mm_fingerprint: dict,
) -> None:
    planner_iterations = 1000 * 250  # DefaultPlanner's own schedule: no budget buys more
    seen, previous = [], None
    for minutes in (5, 8, 12, 15, 20, 30, 45, 60, 90, 120, 240, 480, 960, 2880, 10080, 40320):
        plans = _plan(atlas_1mm_fingerprint, minutes, speed=4.0)
        configuration, record = plans.configuration(), plans.compute_budget
        assert record.estimated_minutes <= minutes * 1.001, (minutes, record.estimated_minutes)
        if record.iterations < planner_iterations - configuration.schedule.epochs:
            assert record.estimated_minutes >= 0.9 * minutes, (minutes, record.estimated_minutes)
        features = configuration.network.features
        current = (
            configuration.target_spacing,
            features,
            configuration.patch_size,
            configuration.batch_size,
            record.iterations,
        )
        if previous is not None:
            spacing, old_features, patch, batch, iterations = previous
            assert all(a <= b for a, b in zip(configuration.target_spacing, spacing)), (minutes, current, previous)
            assert features[0] >= old_features[0] and len(features) >= len(old_features), (minutes, current, previous)
            assert all(a >= b for a, b in zip(configuration.patch_size, patch)), (minutes, current, previous)
            assert configuration.batch_size >= batch, (minutes, current, previous)
            if current[:4] == previous[:4]:  # the same candidate: a larger budget trains it longer
                assert record.iterations >= iterations, (minutes, current, previous)
        previous = current
        seen.append(current)
    assert {s[0] for s in seen} == {(2.0, 2.0, 2.0), (1.0, 1.0, 1.0)}, "the budget trades resolution"
    assert len({(s[1][0], s[2]) for s in seen}) >= 4, "and width and patch"
    unlimited = get_planner("DefaultPlanner")(atlas_1mm_fingerprint).plan().configuration()
    richest = _plan(atlas_1mm_fingerprint, 40320, speed=4.0).configuration()
    assert (richest.network, richest.patch_size, richest.batch_size, richest.target_spacing) == (
        unlimited.network,
        unlimited.patch_size,
        unlimited.batch_size,
        unlimited.target_spacing,
    )
    assert richest.data_identifier == unlimited.data_identifier == "3d_resunet"
    cheap = _plan(atlas_1mm_fingerprint, 8, speed=4.0).configuration()
    assert cheap.data_identifier == "3d_resunet_2x2x2mm", "a lowered resolution gets its own data folder"


def test_the_budget_is_laid_out_as_a_complete_schedule_and_recorded_with_its_reasons(
    atlas_1mm_fingerprint: dict, tmp_path: Path
) -> None:
    plans = _plan(atlas_1mm_fingerprint, 20, speed=4.0)
    plans.to_json(tmp_path / "plans.json")
    plans = Plans.from_json(tmp_path / "plans.json")  # survives the JSON round trip
    configuration, record = plans.configuration(), plans.compute_budget
    schedule = configuration.schedule
    assert (record.device, record.minutes, record.precision, record.configuration) == ("cpu", 20, "fp32", "3d_resunet")
    assert record.iterations == schedule.epochs * schedule.iterations_per_epoch >= target_iterations(20)
    estimate = record.estimates["3d_resunet"]
    assert (
        record.estimated_minutes
        == estimate["estimated_minutes"]
        == pytest.approx(sum(estimate["minutes"].values()), abs=0.02)
    )
    assert estimate["minutes"]["final_validation"] > 0, "the end-of-fold validation counts towards the budget"
    assert record.seconds_per_iteration == pytest.approx(
        estimate["network_seconds_per_iteration"] + estimate["loader_seconds_per_iteration"], abs=1e-3
    )
    assert record.probe["machine"]["model"] == "test CPU" and "cached probe of test CPU" in record.reasons["probe"]
    reason = configuration.reasons["compute_budget"]
    assert "would allow only" in reason and "iterations" in reason and "20-minute budget" in reason
    # every stage starts inside the run; zoom-out takes the last eighth; validation every epoch
    starts = [stage.start_epoch for stage in schedule.stages]
    assert starts[0] == 0 and all(0 < s < schedule.epochs for s in starts[1:])
    if len(starts) == 2:
        assert starts[1] == round(schedule.epochs * 7 / 8)
    assert 1 <= schedule.val_iterations_per_epoch <= schedule.iterations_per_epoch
    assert "laid out over the budget" in configuration.reasons["schedule"]
    # the symmetric configuration (the tiny brains are symmetric) is fitted to the same budget, with its 2 channels
    symmetric = plans.configuration("3d_resunet_sym")
    assert (
        record.estimates["3d_resunet_sym"]["estimated_minutes"] <= 20
        and "would allow only" in symmetric.reasons["compute_budget"]
        and "laid out over the budget" in symmetric.reasons["schedule"]
    )
    assert (
        symmetric.schedule.epochs * symmetric.schedule.iterations_per_epoch
        == record.estimates["3d_resunet_sym"]["iterations"]
        >= target_iterations(20)
    )


def test_a_plan_like_a_model_fits_the_budget_with_the_models_network(atlas_1mm_fingerprint: dict) -> None:
    model = _plan(atlas_1mm_fingerprint, 60, speed=4.0)  # a richer network than 8 or 20 minutes buy
    source = SourceModel("model.zip", "Dataset001_ATLAS", "3d_resunet", "ZoomInOutTrainer", model, {})
    for minutes in (8, 20):
        own = _plan(atlas_1mm_fingerprint, minutes, speed=4.0).configuration()
        plans = get_planner("DefaultPlanner")(atlas_1mm_fingerprint, compute=budget(minutes, 4.0), like=source).plan()
        configuration, record = plans.configuration(), plans.compute_budget
        assert list(plans.configurations) == ["3d_resunet"] and record.configuration == "3d_resunet"
        assert configuration.network == model.configuration().network != own.network
        # The budget buys resolution, patch and batch for the model's network, and nothing over the minutes.
        assert record.estimated_minutes <= minutes and record.iterations >= target_iterations(minutes)
        assert all(edge % stride == 0 for edge, stride in zip(configuration.patch_size, (16, 16, 16)))
        assert "features 24–320 (5 stages)" in configuration.reasons["compute_budget"]
        stages = configuration.schedule.stages
        assert [s.name for s in stages] == ["warmup", "zoom_in", "zoom_out"] and stages[1].start_epoch == 1
        assert record.iterations == configuration.schedule.epochs * configuration.schedule.iterations_per_epoch


def test_without_a_budget_the_plans_are_todays(atlas_1mm_fingerprint: dict) -> None:
    plans = get_planner("DefaultPlanner")(atlas_1mm_fingerprint).plan()
    assert plans.compute_budget is None
    schedule = plans.configuration().schedule
    assert (schedule.epochs, schedule.iterations_per_epoch, schedule.val_iterations_per_epoch) == (1000, 250, None)


def test_a_budget_too_small_for_a_useful_run_is_a_clear_error(atlas_1mm_fingerprint: dict) -> None:
    with pytest.raises(
        BudgetError,
        match=r"budget of 0.2 minutes is too small: the cheapest plan needs about "
        r"[0-9.]+ minutes for 100 iterations",
    ):
        _plan(atlas_1mm_fingerprint, 0.2)
    with pytest.raises(BudgetError, match="positive number of minutes"):
        budget(0)


@pytest.mark.parametrize("minutes", [10, 15, 16.5, 30, 120])
def test_the_chosen_candidate_fills_the_budget_with_iterations(minutes: float) -> None:
    # Three candidates whose iterations cost 0.2, 0.35 and 0.6 s; 1 s per epoch and 20 s of validation besides.
    costs = (0.2, 0.35, 0.6)

    def estimator(rung: int, layout: ScheduleLayout) -> TrainingEstimate:
        return TrainingEstimate(
            iterations=layout.iterations,
            epochs=layout.epochs,
            seconds_per_iteration=costs[rung],
            step_seconds=costs[rung],
            loader_seconds=0.0,
            training_seconds=layout.iterations * costs[rung],
            epoch_validation_seconds=0.0,
            overhead_seconds=layout.epochs * 1.0,
            final_validation_seconds=20.0,
        )

    choice = choose_rung(3, estimator, minutes, 10**6)
    seconds = 60 * minutes

    # by hand: the richest candidate whose target iterations fit, then as many of its iterations as fit
    def total(rung: int, iterations: int) -> float:
        layout = lay_out_schedule(iterations, costs[rung])
        return layout.iterations * costs[rung] + layout.epochs * 1.0 + 20

    fits = [r for r in range(3) if total(r, target_iterations(minutes)) <= seconds]
    assert choice.index == max(fits)
    assert choice.estimate.total_seconds <= seconds
    assert choice.estimate.total_seconds >= 0.9 * seconds
    # what is left is less than an iteration per epoch (the layout's rounding) and an epoch's overhead
    assert seconds - choice.estimate.total_seconds <= (choice.layout.epochs + 1) * costs[choice.index] + 1.0


def test_schedule_layout_keeps_epochs_about_a_minute_and_never_exceeds_the_iterations() -> None:
    for iterations, seconds in ((100, 0.5), (1000, 0.43), (5000, 2.0), (250_000, 0.2), (733, 0.05)):
        layout = lay_out_schedule(iterations, seconds)
        assert iterations - layout.epochs < layout.iterations <= iterations, "less than one iteration per epoch lost"
        assert layout.epochs >= 8 or iterations < 80
        assert 1 <= layout.val_iterations <= layout.iterations_per_epoch
    assert lay_out_schedule(250_000, 0.2).iterations_per_epoch == 250  # nnU-Net's epoch at most
    assert lay_out_schedule(1000, 0.5).iterations_per_epoch == 125  # about a minute per epoch...
    assert lay_out_schedule(1000, 0.5).iterations == 1000  # ...and every iteration asked for
    assert target_iterations(15) == 2000 and target_iterations(60) == 4000


def test_command_line_budget_in_minutes_or_hours(
    tiny_atlas: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(
        "autoseg.api.plan.load_or_run_probe",
        lambda device, precision: (
            dataclasses.replace(fake_probe(20.0), machine={**fake_probe().machine, "precision": precision.name}),
            True,
        ),
    )
    assert plan_main(["-d", "ATLASTiny", "--budget-minutes", "3", "--device", "cpu", "--no-progress", "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert "compute budget: 3 min per fold on cpu (fp32); estimated" in out
    record = Plans.from_json(tiny_atlas.parent.parent / "preprocessed" / tiny_atlas.name / "plans.json").compute_budget
    assert record.minutes == 3 and record.estimated_minutes <= 3
    assert plan_main(["-d", "ATLASTiny", "--budget-hours", "0.05", "--no-progress", "-np", "1"]) == 0
    assert "compute budget: 3 min per fold" in capsys.readouterr().out
    for minutes in ("-1", "0", "inf", "nan"):
        with pytest.raises(SystemExit) as stopped:
            plan_main(["-d", "ATLASTiny", "--budget-minutes", minutes, "--no-progress"])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert (
            error
            == f"autoseg_plan: error: argument --budget-minutes: must be a positive finite number, got '{minutes}'"
        )
    for minutes in (-1.0, 0.0, math.inf, math.nan):
        with pytest.raises(BudgetError, match="positive finite number of minutes"):
            budget_request(minutes)
    assert plan_and_preprocess("ATLASTiny", progress=False).plans.compute_budget is None


# ---------------------------------------------------------------------------- keeping the promise
def test_time_check_names_the_cause_of_an_overrun() -> None:
    promise = TimePromise(
        network_seconds=0.4,
        loader_seconds=0.05,
        validation_batch_seconds=0.1,
        overhead_seconds=2.0,
        final_validation_seconds=30.0,
        epochs=10,
        iterations_per_epoch=100,
        val_iterations=10,
    )
    assert promise.epoch_seconds == pytest.approx(100 * 0.45 + 10 * 0.1 + 2.0)
    assert promise.total_seconds == pytest.approx(10 * promise.epoch_seconds + 30.0)
    ok, line = promise.check("training", 480.0, 480.0 * 1.2, step_seconds=400.0, steps=1000)
    assert ok and "(-17%)" in line
    ok, line = promise.check("training", 700.0, 480.0, loader_wait=250.0, step_seconds=400.0, steps=1000)
    assert not ok and line.startswith("WARNING") and "the loader kept the network waiting" in line
    ok, line = promise.check("training", 900.0, 480.0, loader_wait=5.0, step_seconds=800.0, steps=1000)
    assert not ok and "network steps took 0.80 s instead of 0.40 s: other load on the machine" in line
    ok, line = promise.check("validation", 60.0, 30.0)
    assert not ok and "validation, checkpoints or plotting" in line


def test_estimate_of_a_planned_network_matches_the_probe_at_a_probed_point() -> None:
    probe = fake_probe()
    shape = NetworkShape.isotropic(8, 32)
    point = probe.points[0]
    assert shape.features == point.features
    seconds = probe.step_seconds(shape, point.patch, point.batch)
    assert seconds == pytest.approx(
        probe.training.seconds(point.gmacs, point.mega_activations, 2 * 32**3 / 1e6), rel=0.02
    )
    assert math.isclose(point.gmacs, 2 * shape.macs(point.patch) / 1e9, rel_tol=0.05)


def test_thin_slabs_get_both_configurations_fitted_to_the_budget(tiny_sources: dict[str, Path]) -> None:
    fingerprint = compute_fingerprint(find_dataset(str(tiny_sources["ctp"])), progress=False)
    plans = get_planner("CPUPlanner")(fingerprint, compute=budget(10)).plan()
    # the CT head is symmetric, so the in-plane symmetric PSPNet is planned and budgeted too
    assert set(plans.compute_budget.estimates) == {"2d_pspnet", "3d_aniso", "2d_pspnet_sym"}
    assert plans.compute_budget.configuration == "2d_pspnet"
    for name, estimate in plans.compute_budget.estimates.items():
        schedule = plans.configuration(name).schedule
        assert (
            9 <= estimate["estimated_minutes"] <= 10
            and estimate["iterations"] == schedule.epochs * schedule.iterations_per_epoch
        ), name
        assert "compute_budget" in plans.configuration(name).reasons
    pspnet = plans.configuration("2d_pspnet").schedule
    assert 0 < pspnet.stages[1].start_epoch < pspnet.epochs  # the frozen-backbone phase stays first
    assert pspnet.early_stopping_patience_epochs <= pspnet.epochs
    assert all(stride[2] == 1 for stride in plans.configuration("3d_aniso").network.strides)
