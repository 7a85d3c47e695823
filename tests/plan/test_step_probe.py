"""Tests of autoseg.plan.step_probe: the memory format a run trains in, chosen from patched timings (no test depends on
the CPU it runs on), cached, measured again after a busy measurement, and the throughput it reports."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import fake_step_rounds

from autoseg.machine import Precision
from autoseg.networks import ResidualUNet
from autoseg.plan import step_probe
from autoseg.plan.probe import timed_rounds
from autoseg.plan.step_probe import (
    FORMAT_MARGIN,
    PLAIN_CONVOLUTION,
    StepTimer,
    choose_training_memory_format,
    load_or_run_step_probe,
    run_step_probe,
    step_probe_patch,
)
from autoseg.plans import Loss
from autoseg.train.losses import build_loss

CPU = torch.device("cpu")
FP32 = Precision("fp32", None, False, "test")
PATCH = (16, 16, 16)


def _network() -> ResidualUNet:
    torch.manual_seed(0)
    return ResidualUNet(
        in_channels=2,
        num_classes=1,
        features=(4, 8),
        strides=((1, 1, 1), (2, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 2,
        deep_supervision=False,
    )


def _loss() -> torch.nn.Module:
    return build_loss(Loss(name="dice_bce", dice_weight=1.0, bce_weight=1.0))


@pytest.mark.parametrize(
    "patch, divisor, expected",
    [
        ((64, 64, 64), (16, 16, 16), (64, 64, 64)),  # 64³ voxels: timed as it is
        ((64, 80, 64), (16, 16, 16), (64, 64, 64)),  # the longest axis shortened by its stride
        ((80, 96, 80), (16, 16, 16), (64, 64, 64)),
        ((80, 80, 80), (16, 16, 16), (64, 64, 64)),  # equals: the first axis first
        ((160, 192, 16), (32, 32, 16), (128, 128, 16)),
        ((512, 16, 16), (16, 16, 16), (512, 16, 16)),  # 131,072 voxels: small enough
        ((32, 32, 32), (32, 32, 32), (32, 32, 32)),
    ],
)
def test_step_probe_patch(patch, divisor, expected) -> None:
    assert step_probe_patch(patch, divisor) == expected
    assert step_probe_patch((96, 96, 96), (32, 32, 32), voxels=1) == (32, 32, 32)  # no axis below its stride


@pytest.mark.parametrize(
    "contiguous, channels_last, chosen",
    [
        (0.10, 0.12, "contiguous"),
        (0.10, 0.09, "channels_last_3d"),  # 10% faster
        (0.10, 0.10 * (1 - FORMAT_MARGIN) + 1e-4, "contiguous"),  # faster, but within the margin
        (0.10, 0.10 * (1 - FORMAT_MARGIN) - 1e-4, "channels_last_3d"),
    ],
)
def test_the_faster_format_is_chosen_beyond_the_margin(
    contiguous, channels_last, chosen, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        step_probe, "timed_rounds", fake_step_rounds({"contiguous": contiguous, "channels_last_3d": channels_last})
    )
    probe = run_step_probe(_network(), _loss(), PATCH, 2, CPU, FP32)
    assert probe.choice() == chosen
    assert probe.step_seconds == {"contiguous": contiguous, "channels_last_3d": channels_last}


def test_throughput_is_the_networks_own_count_over_the_step_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        step_probe, "timed_rounds", fake_step_rounds({"contiguous": 0.5, "channels_last_3d": 0.8}, 0.25)
    )
    network = _network()
    probe = run_step_probe(network, _loss(), PATCH, 2, CPU, FP32)
    # a step: forward + backward = 3 x 2 FLOP per multiply-accumulate of the forward, for 2 samples
    gflop = 6 * 2 * network.forward_macs(PATCH) / 1e9
    plain = 6 * PLAIN_CONVOLUTION.batch * 64 * 64 * 27 * 32**3 / 1e9
    assert probe.step_gflop == pytest.approx(gflop)
    step, convolution = probe.gflops("contiguous")
    assert step == pytest.approx(gflop / 0.5) and convolution == pytest.approx(plain / 0.25)
    line = probe.describe(cached=False)
    assert line.startswith("step probe of this network at 16x16x16, batch 2: contiguous 0.500 s, channels_last_3d ")
    assert "fastest of 3 interleaved rounds, measured now in " in line
    assert f"the step runs at {gflop / 0.5:.0f} GFLOP/s, {gflop / 0.5 / (plain / 0.25):.0%} of a plain" in line


def test_the_probe_leaves_the_network_and_the_random_state_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # really run the steps (tiny, once each): the run's network must not be trained by them
    monkeypatch.setattr(step_probe, "timed_rounds", timed_rounds)
    small = step_probe.PlainConvolution(channels=4, edge=8, batch=1)
    plain = step_probe.plain_convolution_step
    monkeypatch.setattr(step_probe, "plain_convolution_step", lambda *args: plain(*args, spec=small))
    network = _network()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    state = torch.random.get_rng_state()
    probe = run_step_probe(network, _loss(), (8, 8, 8), 1, CPU, FP32, repeats=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[name], value) for name, value in network.state_dict().items())
    assert network.encoder[0][0][0].weight.is_contiguous() and network.training
    assert set(probe.step_seconds) == {"contiguous", "channels_last_3d"} and min(probe.step_seconds.values()) > 0


def test_a_step_timer_times_its_parts_and_steps_the_optimizer() -> None:
    network = _network()
    data = torch.randn(2, 2, 8, 8, 8)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    before = network.heads[0].weight.detach().clone()
    timer = StepTimer(network, _loss(), optimizer, data, (data[:, :1] > 0).to(torch.int16), FP32, CPU)
    seconds = timer()
    assert set(timer.last) == {"forward", "backward", "optimizer"}
    assert sum(timer.last.values()) == pytest.approx(seconds, rel=1e-6)
    assert not torch.equal(before, network.heads[0].weight) and all(p.grad is None for p in network.parameters())


def test_cached_then_measured_again_after_a_busy_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    network, loss = _network(), _loss()
    monkeypatch.setattr(step_probe, "load_average", lambda: 99.0)  # busy: more load than cores
    monkeypatch.setattr(step_probe, "timed_rounds", fake_step_rounds({"contiguous": 0.20, "channels_last_3d": 0.15}))
    first, cached = load_or_run_step_probe(network, loss, PATCH, 2, CPU, FP32)
    assert not cached and "load average 99.0" in first.busy and first.choice() == "channels_last_3d"
    files = list((step_probe.probe_cache_folder()).glob("step_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["busy"]

    # the next run measures again (quiet now) and keeps the faster of each timing: one busy moment steers nothing
    monkeypatch.setattr(step_probe, "load_average", lambda: 0.0)
    monkeypatch.setattr(step_probe, "timed_rounds", fake_step_rounds({"contiguous": 0.12, "channels_last_3d": 0.16}))
    second, cached = load_or_run_step_probe(network, loss, PATCH, 2, CPU, FP32)
    assert not cached and not second.busy and second.repeats == 6 and second.created == first.created
    assert second.step_seconds == {"contiguous": 0.12, "channels_last_3d": 0.15}
    assert second.choice() == "contiguous"

    # quiet and cached: nothing is timed
    def never(*args, **kwargs):
        raise AssertionError("a quiet cached probe is not measured again")

    monkeypatch.setattr(step_probe, "timed_rounds", never)
    third, cached = load_or_run_step_probe(network, loss, PATCH, 2, CPU, FP32)
    assert cached and third == second
    assert "cached, measured " + first.created in third.describe(cached=True)
    # a machine that stays busy: measured again until three measurements are merged, then the merged one stands
    monkeypatch.setattr(step_probe, "load_average", lambda: 99.0)
    monkeypatch.setattr(step_probe, "timed_rounds", fake_step_rounds({"contiguous": 0.2, "channels_last_3d": 0.3}))
    counted = []
    for _ in range(4):
        probe, cached = load_or_run_step_probe(network, loss, (8, 8, 8), 2, CPU, FP32)
        counted.append((cached, probe.repeats))
    assert counted == [(False, 3), (False, 6), (False, 9), (True, 9)] and probe.busy
    # another patch, batch or network is another probe
    monkeypatch.setattr(step_probe, "timed_rounds", fake_step_rounds({"contiguous": 0.3, "channels_last_3d": 0.2}))
    _, cached = load_or_run_step_probe(network, loss, PATCH, 1, CPU, FP32)
    assert not cached and len(list(step_probe.probe_cache_folder().glob("step_*.json"))) == 3


def _plans_stub(dimension: int, memory_format: str = "contiguous"):
    """The parts of plans and a configuration the choice reads."""
    from types import SimpleNamespace

    stage = SimpleNamespace(patch_size=(32, 32, 32), batch_size=2)
    configuration = SimpleNamespace(
        name="3d_resunet",
        dimension=dimension,
        schedule=SimpleNamespace(stages=(stage,)),
        network=SimpleNamespace(total_stride=(2, 2, 2)),
    )
    budget = SimpleNamespace(device="cpu", precision="fp32", memory_format=memory_format, probe={"created": "then"})
    return SimpleNamespace(compute_budget=budget), configuration


def test_the_step_probe_decides_on_the_cpu_the_plans_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_probe, "timed_rounds", fake_step_rounds({"contiguous": 0.2, "channels_last_3d": 0.1}))
    plans, configuration = _plans_stub(3, memory_format="contiguous")
    chosen, reason = choose_training_memory_format(
        plans, configuration, _network(), _loss(), configuration.schedule.stages[0], CPU, FP32
    )
    assert chosen == torch.channels_last_3d and reason.startswith("step probe of this network at 32x32x32, batch 2")
    chosen, reason = choose_training_memory_format(
        plans, configuration, _network(), _loss(), configuration.schedule.stages[0], CPU, FP32, distributed=True
    )
    assert chosen == torch.contiguous_format
    assert reason == "faster in the compute-budget probe (then); a distributed run's ranks keep one format"
    plans, configuration = _plans_stub(2)
    chosen, reason = choose_training_memory_format(
        plans, configuration, _network(), _loss(), configuration.schedule.stages[0], CPU, FP32
    )
    assert (chosen, reason) == (torch.contiguous_format, "2-D network")


def test_a_probe_round_trips_through_its_file() -> None:
    probe = step_probe.StepProbe(
        machine={"device": "cpu"},
        network="abc",
        patch=(16, 16, 16),
        batch=2,
        created="2026-12-07T00:00:00+00:00",
        step_seconds={"contiguous": 0.1, "channels_last_3d": 0.2},
        plain_convolution_seconds={"contiguous": 0.05, "channels_last_3d": 0.04},
        step_gflop=None,
        repeats=3,
    )
    assert step_probe.StepProbe.from_plain(json.loads(json.dumps(probe.to_plain()))) == probe
    assert "a plain convolution runs at" in probe.describe(cached=True)  # no operation count: no share
    assert dataclasses.replace(probe, busy="x").describe(cached=False).endswith("; the machine looked busy (x)")
