"""Training: trainer registry, run lengths and schedules, the loop end to end (overfitting, exact resume, zoom-in&out
stage switch), the run folder's files, end-of-fold validation and the command line's errors.

Networks and patches are tiny (the plans are edited as a user would edit ``plans.json``) and everything runs on
one CPU thread, so the whole file takes well under a minute and a half.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fractions
import math
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_step_rounds, hold_lock, home_environment

import trainers.base as trainers_base
from autoseg.api.plan import plan_and_preprocess
from autoseg.api.train import TrainingOptions, prepare_run, train
from autoseg.commands.train import main
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.io.checkpoints import load_checkpoint
from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_header, write_image
from autoseg.machine import choose_precision, deterministic_algorithms
from autoseg.machine import cpu_has_fast_bf16 as native_bf16_probe  # imported before conftest fakes it
from autoseg.networks.factory import BUILT_IN_NETWORK_OPTIONS
from autoseg.plan.probe import ComputeProbe
from autoseg.plans import Plans, Stage
from autoseg.registry import plugin_class
from autoseg.train.events import EpochHandler
from autoseg.train.run_length import RunLength
from autoseg.train.validation import dice_counts, global_dice
from planners import get_planner
from trainers import Trainer, available_trainers, get_trainer, register_trainer

FIVE = "Dataset951_ATLASFive"  # 5 tiny ATLAS-like cases: enough for a 5-fold split
SPHERE = "Dataset952_Sphere"  # 1 case: a bright sphere in noise


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_network(configuration, features: tuple[int, ...]):
    strides = ((1, 1, 1),) + ((2, 2, 2),) * (len(features) - 1)
    return dataclasses.replace(
        configuration.network, features=features, strides=strides, kernel_sizes=((3, 3, 3),) * len(features)
    )


def _edit_plans(path: Path, **changes) -> None:
    """Rewrite the default configuration of ``plans.json`` with ``changes`` (as a user editing the file)."""
    plans = Plans.from_json(path)
    configuration = dataclasses.replace(plans.configuration(), **changes)
    plans = dataclasses.replace(plans, configurations={configuration.name: configuration})
    plans.to_json(path)
    Plans.from_json(path)  # still valid


def _write_sphere_dataset(folder: Path) -> None:
    rng = np.random.default_rng(0)
    shape = (32, 32, 32)
    sphere = ((np.indices(shape) - np.array([17, 14, 16])[:, None, None, None]) ** 2).sum(0) <= 5.5**2
    image = (100 + 10 * rng.standard_normal(shape) + 80 * sphere).astype(np.float32)
    geometry = Geometry(shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_image(image, geometry, folder / "imagesTr" / "sphere_0000.nii.gz")
    write_image(sphere.astype(np.uint8), geometry, folder / "labelsTr" / "sphere.nii.gz")
    write_json(
        {
            "channel_names": {"0": "T1"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": 1,
            "file_ending": ".nii.gz",
        },
        folder / "dataset.json",
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with both datasets planned, preprocessed and given tiny networks; copied by each test."""
    home = tmp_path_factory.mktemp("training_home")
    with home_environment(home):
        make_atlas_like(home / "raw" / FIVE, num_cases=5, seed=0, tiny=True, progress=False)
        _write_sphere_dataset(home / "raw" / SPHERE)
        five, sphere = (plan_and_preprocess(name, progress=False).plans for name in (FIVE, SPHERE))
    # Zoom-in&out in miniature: 4 epochs of 3 iterations, 16³ patches, then 24³ from epoch 2 at a tenth of the lr.
    _edit_plans(
        home / "preprocessed" / FIVE / "plans.json",
        network=_tiny_network(five.configuration(), (4, 8, 16)),
        patch_size=(24, 24, 24),
        schedule=dataclasses.replace(
            five.configuration().schedule,
            trainer="ZoomInOutTrainer",
            epochs=4,
            iterations_per_epoch=3,
            restart_period_epochs=2,
            stages=(
                Stage(name="zoom_in", start_epoch=0, patch_size=(16, 16, 16), batch_size=2, learning_rate=1e-3),
                Stage(name="zoom_out", start_epoch=2, patch_size=(24, 24, 24), batch_size=2, learning_rate=1e-4),
            ),
        ),
    )
    # nnU-Net's recipe on one case: 6 epochs of 25 iterations on 16³ patches of a 32³ volume.
    _edit_plans(
        home / "preprocessed" / SPHERE / "plans.json",
        network=_tiny_network(sphere.configuration(), (4, 8, 16)),
        patch_size=(16, 16, 16),
        schedule=dataclasses.replace(
            sphere.configuration().schedule,
            trainer="ResidualUNetTrainer",
            epochs=6,
            iterations_per_epoch=25,
            restart_period_epochs=None,
            stages=(Stage(name="full", start_epoch=0, patch_size=(16, 16, 16), batch_size=2, learning_rate=1e-2),),
        ),
    )
    return home


QUIET = TrainingOptions(num_processes=0, echo=False)


# ---------------------------------------------------------------------------- registry and construction
def test_registry_resolves_the_package_trainers_and_those_registered_explicitly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = trainers_base._REGISTRY
    monkeypatch.setattr(registry, "_classes", dict(registry._classes))  # this test's registrations end with it
    monkeypatch.setattr(registry, "_explicit", set(registry._explicit))
    assert {"ResidualUNetTrainer", "ZoomInOutTrainer"} <= set(available_trainers())
    assert get_trainer("ZoomInOutTrainer").__module__ == "trainers.residual_unet"
    for name in ("NoSuchTrainer", "Trainer", "ResidualUNet", "Predictor"):
        with pytest.raises(KeyError, match="available: .*ResidualUNetTrainer, ZoomInOutTrainer") as error:
            get_trainer(name)
        assert f"unknown trainer '{name}'" in str(error.value)
    # a trainer prototyped in a notebook: defined freely, resolvable by name once registered
    mine = type("MyTrainer", (get_trainer("ResidualUNetTrainer"),), {"__module__": "__main__"})
    assert "MyTrainer" not in available_trainers()
    assert register_trainer(mine) is mine and get_trainer("MyTrainer") is mine
    again = type("MyTrainer", (get_trainer("ResidualUNetTrainer"),), {"__module__": "__main__"})  # the cell re-run
    assert register_trainer(again) is again and get_trainer("MyTrainer") is again
    shadow = type("ZoomInOutTrainer", (Trainer,), {"__module__": "__main__"})
    with pytest.raises(TypeError, match="two trainers are named ZoomInOutTrainer"):
        register_trainer(shadow)
    assert get_trainer("ZoomInOutTrainer").__module__ == "trainers.residual_unet"
    with pytest.raises(TypeError, match="is not a Trainer subclass"):
        register_trainer(dict)


def test_the_library_resolves_planners_and_trainers_by_name_through_the_registry() -> None:
    assert plugin_class("trainer", "ZoomInOutTrainer") is get_trainer("ZoomInOutTrainer")
    assert plugin_class("planner", "CPUPlanner") is get_planner("CPUPlanner")
    with pytest.raises(KeyError, match="unknown trainer 'Fancy'; available: AcuteStrokeTrainer, "):
        plugin_class("trainer", "Fancy")


@pytest.mark.parametrize("name", available_trainers())
def test_the_librarys_table_of_built_in_network_options_is_each_trainers_own(name: str) -> None:
    """Checkpoints from before runs recorded their network options are rebuilt from this table: it must say what
    each trainer's ``network_options()`` says, and name no trainer that does not exist."""
    assert BUILT_IN_NETWORK_OPTIONS.get(name, {}) == get_trainer(name).network_options()
    assert set(BUILT_IN_NETWORK_OPTIONS) <= set(available_trainers())


@pytest.mark.parametrize("name", available_trainers())
def test_every_trainer_is_built_without_side_effects_and_starts_at_its_stage_rate(name: str, home: Path) -> None:
    plans = Plans.from_json(home / "preprocessed" / FIVE / "plans.json")
    output = home / "results" / "run"
    trainer = get_trainer(name)(
        plans, "3d_resunet", 0, preprocessed_folder=home / "preprocessed" / FIVE, output_folder=output, options=QUIET
    )
    assert not output.exists() and trainer.network is None  # the constructor only stores
    if trainer.schedule_description()["name"] == "adadelta":  # its own rate: no learning rate to tune
        assert trainer.learning_rate(0, 0) == trainer.learning_rate(2, 0) == 1.0
        return
    assert trainer.learning_rate(0, 0) == pytest.approx(1e-3)
    assert trainer.learning_rate(2, 0) == pytest.approx(1e-4)  # stage 2 restarts at its own, lower rate
    if trainer.schedule_description()["name"] != "plateau":  # a plateau schedule holds the rate within a stage
        assert trainer.learning_rate(1, 2) <= trainer.learning_rate(1, 0) < trainer.learning_rate(0, 0)


@pytest.mark.parametrize("name", available_trainers())
def test_every_trainer_takes_a_training_step_on_a_plan_it_suits(name: str, home: Path, tiny_ctp: Path) -> None:
    """Each registered trainer sets up on tiny data (a 3-D plan, or a 2-D PSPNet plan for the PSPNet trainers),
    takes one optimizer step with a finite loss and changes its weights."""
    trainer_class = get_trainer(name)
    dataset, fold = FIVE, 0
    if trainer_class.network_options().get("auxiliary_head") is not None:  # a PSPNet trainer: slices of CT slabs
        ctp = plan_and_preprocess(tiny_ctp.name, progress=False).plans
        pspnet = ctp.configuration("2d_pspnet")
        _edit_plans(
            home / "preprocessed" / tiny_ctp.name / "plans.json",  # the default, 2d_pspnet
            network=dataclasses.replace(pspnet.network, backbone="resnet18"),
        )
        dataset, fold = tiny_ctp.name, "full"  # 4 subjects: too few for 5 folds
    runner = prepare_run(dataset, None, fold, trainer_class, QUIET).setup()
    before = {key: value.clone() for key, value in runner.network.state_dict().items()}
    with runner.loader(0, train=True) as batches:
        loss = runner.train_step(next(batches))
    assert math.isfinite(loss)
    assert any(not torch.equal(before[key], value) for key, value in runner.network.state_dict().items())


# ---------------------------------------------------------------------------- run lengths, schedules, precision
def test_epoch_overrides_scale_stage_starts_and_restart_period(home: Path) -> None:
    schedule = dataclasses.replace(
        Plans.from_json(home / "preprocessed" / FIVE / "plans.json").configuration().schedule,
        epochs=1000,
        iterations_per_epoch=250,
        restart_period_epochs=50,
        stages=(
            Stage(name="zoom_in", start_epoch=0, patch_size=(16,) * 3, batch_size=2, learning_rate=1e-3),
            Stage(name="zoom_out", start_epoch=875, patch_size=(24,) * 3, batch_size=2, learning_rate=1e-4),
        ),
    )
    plan = RunLength.from_schedule(schedule)
    assert (plan.stage_starts, plan.restart_period_epochs, plan.val_iterations) == ((0, 875), 50, 50)
    short = RunLength.from_schedule(schedule, epochs=8, iterations_per_epoch=5, val_iterations=2)
    assert (short.epochs, short.iterations_per_epoch, short.val_iterations) == (8, 5, 2)
    assert short.stage_starts == (0, 7) and short.restart_period_epochs == 1  # 875·8/1000 = 7; 50·8/1000 -> 1
    assert RunLength.from_schedule(schedule, epochs=4).stage_starts == (0, 3)  # 3.5 rounds up to 4, kept < 4
    squeezed = RunLength.from_schedule(schedule, epochs=1)
    assert squeezed.stage_starts == (0, 0) and squeezed.stage_at(0) == 1  # stage 1 gets no epoch at all
    assert [plan.stage_at(e) for e in (0, 874, 875, 999)] == [0, 0, 1, 1]


def test_poly_and_cosine_warm_restart_schedules(home: Path) -> None:
    plans = Plans.from_json(home / "preprocessed" / FIVE / "plans.json")
    folders = dict(preprocessed_folder=home / "preprocessed" / FIVE, output_folder=home / "results" / "x")
    zoom = get_trainer("ZoomInOutTrainer")(
        plans, "3d_resunet", 0, **folders, options=TrainingOptions(epochs=400, iterations_per_epoch=10)
    )
    assert zoom.run_length.stage_starts == (0, 200) and zoom.run_length.restart_period_epochs == 200
    assert zoom.learning_rate(100, 0) == pytest.approx(0.5e-3)  # half a period: half the rate
    assert zoom.learning_rate(199, 9) < 1e-6 < zoom.learning_rate(200, 0) == pytest.approx(1e-4)
    assert zoom.run_length.snapshot_epochs(zoom.settings.snapshot_fractions) == [
        267,
        333,
        400,
    ]  # 1/3, 2/3 and the end of stage 2
    poly = get_trainer("ResidualUNetTrainer")(
        plans, "3d_resunet", 0, **folders, options=TrainingOptions(epochs=400, iterations_per_epoch=10)
    )
    assert poly.learning_rate(100, 5) == pytest.approx(1e-3 * (1 - 100 / 200) ** 0.9)
    assert poly.learning_rate(399, 0) == pytest.approx(1e-4 * (1 / 200) ** 0.9)


def test_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("autoseg.machine.cpu_has_fast_bf16", native_bf16_probe)  # the real probe, fed fake answers
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu = choose_precision(torch.device("cpu"))
    assert cpu.name == "fp32" and cpu.autocast_dtype is None and "AVX2" in cpu.reason
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert choose_precision(torch.device("cpu")).autocast_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert choose_precision(torch.device("cpu")).name == "fp32"  # AVX512 without bf16 instructions
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    fp16 = choose_precision(torch.device("cuda"))
    assert fp16.autocast_dtype == torch.float16 and fp16.grad_scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision(torch.device("cuda")).autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 mixed precision needs CUDA"):
        choose_precision(torch.device("cpu"), "fp16")


def test_algorithm_settings_hold_within_a_run_and_come_back_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with deterministic_algorithms(False, cudnn_benchmark=True):  # a CUDA run: the autotuner for fixed patches
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # the caller's own choice
    with deterministic_algorithms(True, cudnn_benchmark=True):  # --deterministic wins
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_the_suite_pins_fp32_unless_bf16_is_asked_for() -> None:
    """Whatever CPU runs the suite, ``auto`` means fp32 here (conftest fakes a CPU without native bf16)."""
    assert choose_precision(torch.device("cpu")).name == "fp32"
    assert choose_precision(torch.device("cpu"), "bf16").autocast_dtype == torch.bfloat16


@pytest.mark.skipif(
    not native_bf16_probe()[0],
    reason="this CPU has no native bf16 (AVX512-BF16/AMX): emulated "
    "bf16 is about 100x slower than fp32, so its path is not run",
)
def test_bf16_training_step_learns_on_a_cpu_with_native_bf16(home: Path) -> None:
    result = train(
        "Sphere", fold="full", options=dataclasses.replace(QUIET, precision="bf16", val_iterations=2, validation=False)
    )
    history = load_checkpoint(result.output_folder / "checkpoint_final.pth")["history"]
    assert history["train_loss"][-1] < 0.7 * history["train_loss"][0], history["train_loss"]
    assert "precision: bf16 (requested" in (result.output_folder / "log.txt").read_text()


def test_pseudo_dice_is_the_global_dice_of_summed_counts() -> None:
    target = torch.zeros(2, 1, 4, 4, 4, dtype=torch.int16)
    target[0, 0, :2] = 1  # 32 lesion voxels in the first sample, none in the second
    logits = torch.full((2, 1, 4, 4, 4), -5.0)
    logits[0, 0, :1] = 5.0  # 16 of them found
    logits[1, 0, :1, :1] = 5.0  # 4 false positives in the second sample
    counts = dice_counts(logits, target) + dice_counts(logits[:1], target[:1])
    assert counts[:, 0].tolist() == [32, 4, 32]
    assert global_dice(counts) == pytest.approx(2 * 32 / (2 * 32 + 4 + 32))
    assert math.isnan(global_dice(torch.zeros(3, 1, dtype=torch.long)))


# ---------------------------------------------------------------------------- the loop, end to end
@pytest.mark.parametrize("trainer", ["ResidualUNetTrainer", "AcuteStrokeTrainer"])
def test_overfits_a_single_lesion_and_writes_the_run_folder(trainer: str, home: Path) -> None:
    result = train("Sphere", fold="full", trainer=trainer, options=dataclasses.replace(QUIET, val_iterations=2))
    folder = home / "results" / SPHERE / "3d_resunet" / trainer / "fold_full"
    assert result.output_folder == folder
    history = load_checkpoint(folder / "checkpoint_final.pth")["history"]
    assert history["pseudo_dice"][-1] > 0.8, history["pseudo_dice"]
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0], history["train_loss"]  # a few steps lower it
    case = read_json(folder / "validation" / "summary.json")["cases"]["sphere"]
    assert case["dice"] > 0.8 and case["hausdorff95"] < 6.0, case  # the whole volume, sliding window
    for name in (
        "plans.json",
        "log.txt",
        "progress.png",
        "checkpoint_latest.pth",
        "checkpoint_best.pth",
        "checkpoint_final.pth",
        "validation/sphere.nii.gz",
    ):
        assert (folder / name).is_file(), name
    assert (folder / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (folder / "log.txt").read_text()
    for header in (f"trainer {trainer}", "configuration 3d_resunet", "device: cpu", "precision: fp32", "seed: 0"):
        assert header in log, header
    network = (
        "ResidualUNet (residual_encoder layout)" if trainer == "ResidualUNetTrainer" else "AsymmetricResidualUNet,"
    )
    assert f"network: {network}" in log
    assert len([line for line in log.splitlines() if " epoch " in line and "train_loss" in line]) == 6
    assert not list(folder.glob(".*tmp*"))


class Killed(Exception):
    """What :func:`_killed_after` raises in place of a killed process."""


@contextlib.contextmanager
def _killed_after(monkeypatch: pytest.MonkeyPatch, epochs: int) -> Iterator[None]:
    """The training run inside stops like a killed process once ``epochs`` epochs (and their checkpoints) are done."""
    original = Trainer.end_epoch

    def end_epoch(self: Trainer, epoch: int, **record: float) -> None:
        original(self, epoch, **record)
        if self.epoch == epochs:
            raise Killed

    monkeypatch.setattr(Trainer, "end_epoch", end_epoch)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(Trainer, "end_epoch", original)


@pytest.mark.parametrize("trainer", ["ZoomInOutTrainer", "AcuteStrokeTrainer"])
def test_resume_is_bitwise_identical_and_keeps_the_zoom_stages(
    trainer: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patches: list[tuple[int, ...]] = []
    original_step = Trainer.train_step

    def recording_step(self: Trainer, batch: dict) -> float:
        patches.append(tuple(batch["data"].shape[2:]))
        return original_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    # both runs begin in channels-last (their step probe finds it faster)...
    faster = {"contiguous": 0.12, "channels_last_3d": 0.10}
    monkeypatch.setattr("autoseg.plan.step_probe.timed_rounds", fake_step_rounds(faster))
    options = dataclasses.replace(QUIET, validation=False, val_iterations=1)
    monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "uninterrupted"))
    whole = train("ATLASFive", fold=0, trainer=trainer, options=options)
    assert patches == [(16, 16, 16)] * 6 + [(24, 24, 24)] * 6  # the switch at the planned epoch 2
    patches.clear()

    monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "resumed"))
    with _killed_after(monkeypatch, 2):
        train("ATLASFive", fold=0, trainer=trainer, options=options)
    # ...and the continued run keeps channels-last from its checkpoint, whatever the probe would now say
    monkeypatch.setattr(
        "autoseg.plan.step_probe.timed_rounds", fake_step_rounds({"contiguous": 0.05, "channels_last_3d": 0.5})
    )
    resumed = train("ATLASFive", fold=0, trainer=trainer, options=dataclasses.replace(options, continue_training=True))
    assert patches == [(16, 16, 16)] * 6 + [(24, 24, 24)] * 6  # the resumed half starts in stage 2

    a = load_checkpoint(whole.output_folder / "checkpoint_final.pth")
    b = load_checkpoint(resumed.output_folder / "checkpoint_final.pth")
    assert a["network"].keys() == b["network"].keys()
    assert all(torch.equal(a["network"][k], b["network"][k]) for k in a["network"])
    assert all(
        torch.equal(x, y)
        for k in a["optimizer"]["state"]
        for x, y in zip(a["optimizer"]["state"][k].values(), b["optimizer"]["state"][k].values())
    )
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert b["history"]["stage"] == ["zoom_in", "zoom_in", "zoom_out", "zoom_out"]
    log = (resumed.output_folder / "log.txt").read_text()
    assert "continuing from checkpoint_latest.pth after epoch 2 (stage zoom_in" in log
    assert a["memory_format"] == b["memory_format"] == "channels_last_3d"
    assert "memory format: channels_last_3d (as the run began (its checkpoint records it))" in log
    assert "stage zoom_out starts at epoch 3" in log
    snapshots = sorted(p.name for p in resumed.output_folder.glob("checkpoint_snapshot_*.pth"))
    if trainer == "ZoomInOutTrainer":
        assert b["history"]["learning_rate"] == pytest.approx([1e-3, 0.5e-3, 1e-4, 0.5e-4])  # restart period 2
        assert snapshots == ["checkpoint_snapshot_3.pth", "checkpoint_snapshot_4.pth"]
    else:  # Adadelta at its own rate; the early-stopping counters went through the checkpoint
        assert b["history"]["learning_rate"] == [1.0] * 4 and not snapshots
        assert a["plateau"] == b["plateau"] and isinstance(b["optimizer"]["state"][0]["acc_delta"], torch.Tensor)


class _StopAfter(EpochHandler):
    """A handler that records the events it hears and asks the loop to stop after ``epochs`` epochs."""

    key = "stop_after"

    def __init__(self, epochs: int) -> None:
        self.epochs, self.heard = epochs, []

    def stage_started(self) -> None:
        self.heard.append("stage")

    def epoch_completed(self, loop, epoch: int, score: float) -> list[str]:
        self.heard.append(epoch)
        return [f"handler heard epoch {epoch + 1} of {loop.run_length.epochs}"]

    def stop_requested(self) -> bool:
        return sum(isinstance(event, int) for event in self.heard) >= self.epochs

    def state_dict(self) -> dict:
        return {"heard": list(self.heard)}

    def load_state_dict(self, state: dict) -> None:
        self.heard = list(state.get("heard", []))


def test_a_handler_attached_to_the_loop_stops_it_and_continues_from_the_checkpoint(home: Path) -> None:
    options = dataclasses.replace(QUIET, validation=False, val_iterations=1)
    runner = prepare_run("ATLASFive", fold=0, options=options)  # the plans' ZoomInOutTrainer: no handler of its own
    handler = _StopAfter(3)
    runner.handlers.append(handler)
    runner.setup().fit()
    assert runner.epoch == 3 and handler.heard == [0, 1, "stage", 2]  # the zoom-out stage starts at epoch 2
    final = load_checkpoint(runner.output_folder / "checkpoint_final.pth")
    assert final["stop_after"] == {"heard": [0, 1, "stage", 2]} and final["epoch"] == 3
    lines = (runner.output_folder / "log.txt").read_text().splitlines()
    said = next(i for i, line in enumerate(lines) if "handler heard epoch 3 of 4" in line)
    assert "epoch 3/4 [zoom_out]" in next(line for line in reversed(lines[:said]) if "train_loss" in line)

    continued = prepare_run("ATLASFive", fold=0, options=dataclasses.replace(options, continue_training=True))
    again = _StopAfter(3)
    continued.handlers.append(again)
    continued.setup()
    assert again.heard == [0, 1, "stage", 2]  # from checkpoint_final.pth
    continued.fit()  # the handler still asks to stop: no further epoch
    assert continued.epoch == 3


def test_command_line_run_validates_the_fold_on_the_original_grid(home: Path, capsys: pytest.CaptureFixture) -> None:
    arguments = [
        "-d",
        "ATLASFive",
        "-f",
        "0",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "2",
        "--val-iters",
        "1",
        "-np",
        "0",
        "--device",
        "cpu",
    ]
    assert main(arguments) == 0
    folder = home / "results" / FIVE / "3d_resunet" / "ZoomInOutTrainer" / "fold_0"
    validation = read_json(home / "preprocessed" / FIVE / "splits_final.json")[0]["val"]
    summary = read_json(folder / "validation" / "summary.json")
    assert sorted(summary["cases"]) == validation and set(summary["mean"]) == {"dice", "hausdorff95", "lesion_f1"}
    for case, metrics in summary["cases"].items():
        assert 0 <= metrics["dice"] <= 1 and (metrics["hausdorff95"] is None or metrics["hausdorff95"] >= 0)
        predicted = read_header(folder / "validation" / f"{case}.nii.gz")[0]
        reference = read_header(home / "raw" / FIVE / "labelsTr" / f"{case}.nii.gz")[0]
        assert predicted.differences(reference) == []
    assert "epoch 2/2 [zoom_out]" in capsys.readouterr().out  # --epochs 2: stage 2 from epoch round(2·2/4) = 1

    # Continuing a finished run trains nothing; a different run length, or a fresh start over the run, is refused.
    final = (folder / "checkpoint_final.pth").stat().st_mtime_ns
    assert main([*arguments[:4], "--continue", "--no-validation", "-np", "0"]) == 0  # the run's own --epochs 2
    assert (folder / "checkpoint_final.pth").stat().st_mtime_ns == final
    lengths = [line for line in (folder / "log.txt").read_text().splitlines() if "run length:" in line]
    assert len(lengths) == 2 and "run length: 2 epochs x 2 iterations (plans: 4 x 3)" in lengths[-1]
    capsys.readouterr()
    assert main([*arguments[:4], "--epochs", "3", "--continue", "--no-validation", "-np", "0"]) == 1
    assert "continue it with the same --epochs" in capsys.readouterr().err
    assert main(arguments) == 1  # a forgotten --continue does not overwrite the run
    assert "already holds a run (checkpoint_latest.pth); resume it with --continue" in capsys.readouterr().err


# ---------------------------------------------------------------------------- errors on the command line
def _error(capsys: pytest.CaptureFixture, *arguments: str) -> str:
    assert main(list(arguments)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_clear_one_line_errors(home: Path, tiny_atlas: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no plans found; run autoseg_plan first" in _error(capsys, "-d", "ATLASTiny")
    assert "configuration '3d_fancy' is not in the plans; available: ['3d_resunet']" in _error(
        capsys, "-d", "ATLASFive", "-c", "3d_fancy"
    )
    assert "fold 7 is out of range" in _error(capsys, "-d", "ATLASFive", "-f", "7", "-np", "0")
    assert (
        "unknown trainer 'Fancy'; available: AcuteStrokeTrainer, PSPNetCETrainer, PSPNetTrainer, ResidualUNetTrainer, ZoomInOutTrainer"
        in _error(capsys, "-d", "ATLASFive", "-tr", "Fancy")
    )
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in _error(capsys, "-d", "ATLASFive", "--device", "cuda")


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, name: str, epoch: int, how: str) -> None:
    """Make the write of checkpoint ``name`` after ``epoch`` fail as on a full disk: torch.save's short write
    (``how="torch"``) or ENOSPC from fsync (``how="fsync"``)."""
    saved, original_save, original_fsync = {"count": 0}, torch.save, os.fsync

    def failing(handle: object) -> bool:
        if f".{name}." not in str(getattr(handle, "name", "")):
            return False
        saved["count"] += 1
        return saved["count"] == epoch

    def save(state: object, handle: object, *args: object, **kwargs: object) -> None:
        if how == "torch" and failing(handle):
            handle.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        original_save(state, handle, *args, **kwargs)
        if how == "fsync" and failing(handle):
            monkeypatch.setattr(os, "fsync", lambda _: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        else:
            monkeypatch.setattr(os, "fsync", original_fsync)

    monkeypatch.setattr(torch, "save", save)


RUN = [
    "-d",
    "ATLASFive",
    "-f",
    "0",
    "--epochs",
    "3",
    "--iters-per-epoch",
    "1",
    "--val-iters",
    "1",
    "-np",
    "0",
    "--no-validation",
]


def test_a_full_disk_before_any_epoch_completed_then_continue_starts_afresh(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = home / "results" / FIVE / "3d_resunet" / "ZoomInOutTrainer" / "fold_0"
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, "checkpoint_latest.pth", 1, "torch")
        assert (
            _error(capsys, *RUN) == f"error: no space left on device while writing {folder / 'checkpoint_latest.pth'}"
        )
    assert sorted(p.name for p in folder.glob("*.pth")) == ["checkpoint_best.pth"]  # the state the issue describes
    assert not list(folder.glob(".*tmp*"))
    assert main([*RUN, "--continue"]) == 0
    log = (folder / "log.txt").read_text()
    assert "--continue: no epoch completed yet (no checkpoint_latest.pth in" in log and "starting afresh" in log
    assert "removed checkpoint_best.pth of the run that stopped" in log
    assert load_checkpoint(folder / "checkpoint_final.pth")["epoch"] == 3
    shutil.rmtree(folder)
    assert main([*RUN, "--continue"]) == 0  # never started: --continue starts it, saying so
    assert "starting afresh" in (folder / "log.txt").read_text()


def test_a_full_disk_at_a_later_epoch_then_continue_resumes_from_the_last_complete_one(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "uninterrupted"))
    assert main(RUN) == 0
    whole = load_checkpoint(
        home / "uninterrupted" / FIVE / "3d_resunet" / "ZoomInOutTrainer" / "fold_0" / "checkpoint_final.pth"
    )
    monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "results"))
    folder = home / "results" / FIVE / "3d_resunet" / "ZoomInOutTrainer" / "fold_0"
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, "checkpoint_latest.pth", 2, "fsync")
        assert (
            _error(capsys, *RUN) == f"error: no space left on device while writing {folder / 'checkpoint_latest.pth'}"
        )
    assert load_checkpoint(folder / "checkpoint_latest.pth")["epoch"] == 1  # the last complete epoch, intact
    assert not list(folder.glob(".*tmp*"))
    assert main([*RUN, "--continue"]) == 0
    assert "continuing from checkpoint_latest.pth after epoch 1" in (folder / "log.txt").read_text()
    resumed = load_checkpoint(folder / "checkpoint_final.pth")
    assert resumed["epoch"] == 3 and resumed["history"]["train_loss"] == whole["history"]["train_loss"]
    assert all(torch.equal(resumed["network"][k], whole["network"][k]) for k in whole["network"])


def test_continuing_from_a_pickled_checkpoint_is_refused(home: Path, capsys: pytest.CaptureFixture) -> None:
    folder = home / "results" / FIVE / "3d_resunet" / "ZoomInOutTrainer" / "fold_0"
    folder.mkdir(parents=True)
    torch.save({"network": {}, "epoch": fractions.Fraction(1, 3)}, folder / "checkpoint_latest.pth")
    error = _error(capsys, "-d", "ATLASFive", "--continue", "-np", "0")
    assert str(folder / "checkpoint_latest.pth") in error and "refused" in error and "fractions.Fraction" in error


def test_all_trains_every_fold_and_continue_picks_up_where_it_stopped(home: Path, capsys) -> None:
    arguments = [
        "-d",
        "ATLASFive",
        "-f",
        "all",
        "--epochs",
        "1",
        "--iters-per-epoch",
        "1",
        "--val-iters",
        "0",
        "-np",
        "0",
        "--no-validation",
    ]
    runs = home / "results" / FIVE / "3d_resunet" / "ZoomInOutTrainer"
    assert main(["-d", "ATLASFive", "-f", "1", *arguments[4:]]) == 0  # fold 1 finished earlier
    before = (runs / "fold_1" / "checkpoint_final.pth").stat().st_mtime_ns
    assert main([*arguments, "--continue"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == [f"fold_{k}" for k in range(5)]
    assert all((runs / f"fold_{k}" / "checkpoint_final.pth").is_file() for k in range(5))
    assert (runs / "fold_1" / "checkpoint_final.pth").stat().st_mtime_ns == before, "a finished fold is kept"
    assert "--continue: no epoch completed yet" in (runs / "fold_0" / "log.txt").read_text()  # started afresh
    splits = read_json(home / "preprocessed" / FIVE / "splits_final.json")
    assert sorted(case for split in splits for case in split["val"]) == sorted(splits[0]["train"] + splits[0]["val"])


def test_a_budgeted_plan_is_checked_against_the_measured_time(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoseg.plans import ComputeBudget

    # the plans' probe said contiguous; this run's own step probe finds channels-last faster, and that decides
    monkeypatch.setattr(
        "autoseg.plan.step_probe.timed_rounds", fake_step_rounds({"contiguous": 0.12, "channels_last_3d": 0.10})
    )

    path = home / "preprocessed" / SPHERE / "plans.json"
    plans = Plans.from_json(path)
    estimate = {
        "estimated_minutes": 0.01,
        "seconds_per_iteration": 0.001,
        "iterations": 150,
        "epochs": 6,
        "val_iterations_per_epoch": 2,
        "network_seconds_per_iteration": 0.0008,
        "loader_seconds_per_iteration": 0.0002,
        "minutes": {"training": 0.005, "epoch_validation": 0.001, "overhead": 0.002, "final_validation": 0.002},
    }
    record = ComputeBudget(
        device="cpu",
        minutes=0.02,
        precision="fp32",
        estimated_minutes=0.01,
        seconds_per_iteration=0.001,
        iterations=150,
        configuration="3d_resunet",
        memory_format="contiguous",
        data_processes=0,
        estimates={"3d_resunet": estimate},
        reasons={"data_processes": "a test's choice"},
    )
    dataclasses.replace(plans, compute_budget=record).to_json(path)
    # --epochs keeps the run length (an estimate of milliseconds would otherwise re-plan it to 1 iteration an epoch)
    options = dataclasses.replace(QUIET, num_processes=None, val_iterations=2, epochs=6)
    result = train("Sphere", fold="full", options=options)
    log = (result.output_folder / "log.txt").read_text()
    assert "the schedule is not re-planned (--epochs given: the run length asked for is kept)" in log
    assert "deadline: re-planned" not in log and "deadline: the fold took" in log
    assert "data processes: 0 (the plans' compute budget: a test's choice)" in log
    assert "memory format: channels_last_3d (step probe of this network at " in log
    assert (
        "contiguous 0.120 s, channels_last_3d 0.100 s per step, fastest of 3 interleaved rounds, measured now in "
        in log
    )
    assert "time estimate (plans' compute budget):" in log and "of a 0.02-minute budget" in log
    assert len([line for line in log.splitlines() if "time: epoch" in line and "estimated" in line]) == 6
    # an estimate of milliseconds cannot hold: the overrun is a warning that names a cause
    assert "WARNING: training time of 6 epochs: measured" in log and "more than 25% over" in log
    assert "WARNING: whole fold: measured" in log
    history = load_checkpoint(result.output_folder / "checkpoint_final.pth")["history"]
    assert history["pseudo_dice"][-1] > 0.8, "channels_last_3d trains as well"


class SimulatedMachine:
    """A clock for the training loop (``Trainer.clock``) that advances only by what the test says each piece of work
    takes, times ``slowdown(t)`` at simulated time ``t``: the deadline is tested without timing anything."""

    def __init__(self, slowdown) -> None:
        self.now, self.slowdown = 0.0, slowdown

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * self.slowdown(self.now)


#: The deadline test's plan: zoom-in&out over 12 epochs of 10 iterations (1 s each, 2 s from the zoom-out at epoch
#: 10), 2 validation batches of 0.25 s (0.5 s in zoom-out), 1 s per epoch besides, 10 s of end-of-fold validation.
STAGE_SECONDS, VAL_BATCH_SECONDS, EPOCH_OVERHEAD_SECONDS, FINAL_SECONDS = (1.0, 2.0), 0.25, 1.0, 10.0
PROMISED_FOLD_SECONDS = 10 * (10 * 1.0 + 2 * 0.25 + 1) + 2 * (10 * 2.0 + 2 * 0.25 + 1) + 10


def _budgeted_zoom_plans(home: Path, minutes: float, probe_record: dict) -> None:
    """ATLASFive's plans as a compute budget of ``minutes`` would have laid out the deadline test's plan."""
    from autoseg.plans import ComputeBudget

    path = home / "preprocessed" / FIVE / "plans.json"
    plans = Plans.from_json(path)
    configuration = plans.configuration()
    stages = tuple(dataclasses.replace(s, start_epoch=(0, 10)[i]) for i, s in enumerate(configuration.schedule.stages))
    schedule = dataclasses.replace(
        configuration.schedule,
        epochs=12,
        iterations_per_epoch=10,
        val_iterations_per_epoch=2,
        restart_period_epochs=3,
        stages=stages,
    )
    estimate = {
        "estimated_minutes": PROMISED_FOLD_SECONDS / 60,
        "seconds_per_iteration": 7 / 6,
        "iterations": 120,
        "epochs": 12,
        "val_iterations_per_epoch": 2,
        "network_seconds_per_iteration": 7 / 6,
        "loader_seconds_per_iteration": 0.0,
        "stage_seconds_per_iteration": list(STAGE_SECONDS),
        "minutes": {
            "training": 140 / 60,
            "epoch_validation": 24 * VAL_BATCH_SECONDS / 60,
            "overhead": 12 * EPOCH_OVERHEAD_SECONDS / 60,
            "final_validation": FINAL_SECONDS / 60,
        },
    }
    record = ComputeBudget(
        device="cpu",
        minutes=minutes,
        precision="fp32",
        estimated_minutes=PROMISED_FOLD_SECONDS / 60,
        seconds_per_iteration=7 / 6,
        iterations=120,
        configuration=configuration.name,
        data_processes=0,
        estimates={configuration.name: estimate},
        probe=probe_record,
    )
    configuration = dataclasses.replace(configuration, schedule=schedule)
    plans = dataclasses.replace(plans, configurations={configuration.name: configuration}, compute_budget=record)
    plans.to_json(path)


def _on_simulated_machine(monkeypatch: pytest.MonkeyPatch, machine: SimulatedMachine) -> list[Trainer]:
    """Make every training step, validation batch, epoch and end-of-fold validation take its simulated time on
    ``machine``; returns the list to put the running trainer in (its stage decides what an iteration costs)."""
    running: list[Trainer] = []
    step, epoch, counts, cases = (
        Trainer.train_step,
        Trainer.train_epoch,
        trainers_base.dice_counts,
        trainers_base.validate_cases,
    )

    def stage_factor() -> float:
        return STAGE_SECONDS[running[-1].stage_index] / STAGE_SECONDS[0]

    def timed_step(self: Trainer, batch: dict) -> float:
        machine.spend(STAGE_SECONDS[self.stage_index])
        return step(self, batch)

    def timed_epoch(self: Trainer, number: int):
        machine.spend(EPOCH_OVERHEAD_SECONDS)  # loader start, checkpoints and plot, inside the epoch
        return epoch(self, number)

    def timed_counts(*args, **kwargs):
        machine.spend(VAL_BATCH_SECONDS * stage_factor())
        return counts(*args, **kwargs)

    def timed_cases(*args, **kwargs):
        machine.spend(FINAL_SECONDS)
        return cases(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(Trainer, "train_epoch", timed_epoch)
    monkeypatch.setattr(trainers_base, "dice_counts", timed_counts)
    monkeypatch.setattr(trainers_base, "validate_cases", timed_cases)
    return running


def _run_fold(machine: SimulatedMachine, running: list[Trainer], options: TrainingOptions) -> Trainer:
    runner = prepare_run("ATLASFive", fold=0, options=options)
    runner.clock = machine
    running.append(runner)
    runner.setup()
    runner.fit()
    runner.validate()
    return runner


def test_a_budgeted_run_slowed_mid_way_re_plans_ends_on_time_and_continues_exactly(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import fake_probe

    from autoseg.machine import machine_description
    from autoseg.plan.probe import _cache_file, load_or_run_probe

    # This machine's cached probe, from which the plan was made (the run's speed is recorded in it).
    probe = fake_probe(machine=machine_description(torch.device("cpu"), "fp32"))
    write_json(probe.to_plain(), _cache_file(probe.machine))
    budget = PROMISED_FOLD_SECONDS / 0.95 / 60  # the plan promised 95% of the budget
    _budgeted_zoom_plans(home, round(budget, 4), probe.summary())
    budget_seconds = 60 * round(budget, 4)
    # A competing process from a third of the budget to two thirds makes everything twice as slow.
    machine = SimulatedMachine(lambda t: 2.0 if budget_seconds / 3 <= t < 2 * budget_seconds / 3 else 1.0)
    running = _on_simulated_machine(monkeypatch, machine)
    options = dataclasses.replace(QUIET, num_processes=None)

    monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "uninterrupted"))
    whole = _run_fold(machine, running, options)
    assert abs(machine.now / budget_seconds - 1) <= 0.10, machine.now / budget_seconds
    length = whole.run_length
    assert length.reschedules and length.total_iterations < 120, "the slowdown cost iterations"
    assert (length.epochs, length.stage_starts, length.restart_period_epochs) == (12, (0, 10), 3), "the shape is kept"
    assert [length.val_iterations_at(e) for e in range(12)] == [
        max(1, round(length.iterations_at(e) / 5 + 1e-9)) for e in range(12)
    ], "validation in proportion"
    final = load_checkpoint(whole.output_folder / "checkpoint_final.pth")
    assert final["history"]["stage"] == ["zoom_in"] * 10 + ["zoom_out"] * 2
    # each epoch's learning rate is the planned schedule's: cosine restarts every 3 epochs, then the zoom-out stage
    assert final["history"]["learning_rate"] == pytest.approx([1e-3, 0.75e-3, 0.25e-3] * 3 + [1e-3, 1e-4, 0.75e-4])
    snapshots = sorted(p.name for p in whole.output_folder.glob("checkpoint_snapshot_*.pth"))
    assert snapshots == ["checkpoint_snapshot_11.pth", "checkpoint_snapshot_12.pth"]
    log = (whole.output_folder / "log.txt").read_text()
    replanned = [line.split("  ", 1)[1] for line in log.splitlines() if "deadline: re-planned after epoch" in line]
    record = read_json(whole.output_folder / "deadline.json")
    assert replanned == [r["reason"] for r in record["replans"]] and len(replanned) >= 2
    assert record["planned"]["iterations"] == 120 and record["planned"]["estimated_minutes"] == pytest.approx(
        PROMISED_FOLD_SECONDS / 60, abs=1e-3
    )
    assert record["ran"]["iterations"] == length.total_iterations == sum(e["iterations"] for e in record["epochs"])
    assert record["ran"]["fold_minutes"] == pytest.approx(machine.now / 60, abs=1e-3)
    assert f"deadline: the fold took {machine.now / 60:.1f} min of its" in log
    assert f"time: epoch {record['epochs'][-1]['seconds']:.1f} s, estimated" in log
    # The run's speed went into this machine's probe cache: its fast end, so the busy stretch shrinks no later plan.
    speeds = [e["speed"] for e in record["epochs"]]
    assert max(speeds) == pytest.approx(2.0) and min(speeds) == pytest.approx(1.0)
    cached = ComputeProbe.from_plain(read_json(_cache_file(probe.machine)))
    assert [r["speed"] for r in cached.training_runs] == [pytest.approx(np.percentile(speeds, 25), abs=1e-4)]
    assert "recorded in" in log and "to correct later plans on this machine" in log
    lines: list[str] = []
    corrected, from_cache = load_or_run_probe(
        torch.device("cpu"), choose_precision(torch.device("cpu"), "fp32"), log=lines.append
    )
    assert from_cache and corrected.correction == pytest.approx(np.percentile(speeds, 25), abs=1e-4) == pytest.approx(
        1.0
    )
    assert "corrected by what training measured here: x1.00" in lines[0]

    # The same fold, killed after its sixth epoch (in the busy stretch) and continued, re-plans exactly alike.
    machine.now = 0.0
    monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "resumed"))
    with _killed_after(monkeypatch, 6):
        _run_fold(machine, running, options)
    resumed = _run_fold(machine, running, dataclasses.replace(options, continue_training=True))
    assert resumed.run_length == whole.run_length
    again = load_checkpoint(resumed.output_folder / "checkpoint_final.pth")
    assert all(torch.equal(final["network"][k], again["network"][k]) for k in final["network"])
    assert again["deadline"] == final["deadline"]
    assert read_json(resumed.output_folder / "deadline.json") == {
        **record,
        "ran": {**record["ran"], "fold_minutes": pytest.approx(machine.now / 60, abs=1e-3)},
    }


# ---------------------------------------------------------------------------- the acute stroke recipe
def test_acute_stroke_trainer_builds_the_paper_recipe_from_the_plans_numbers(home: Path) -> None:
    from autoseg.networks import AsymmetricResidualUNet, on_meta
    from autoseg.plans import ComputeBudget

    path = home / "preprocessed" / SPHERE / "plans.json"
    plans = Plans.from_json(path)
    record = ComputeBudget(
        device="cpu",
        minutes=1.0,
        precision="fp32",
        estimated_minutes=0.5,
        seconds_per_iteration=0.01,
        iterations=150,
        configuration="3d_resunet",
        estimates={"3d_resunet": {"estimated_minutes": 0.5}},
        reasons={"data_processes": "test"},
    )
    plans = dataclasses.replace(plans, compute_budget=record)
    configuration = plans.configuration()
    trainer = get_trainer("AcuteStrokeTrainer")(
        plans,
        "3d_resunet",
        "full",
        preprocessed_folder=path.parent,
        output_folder=home / "results" / "acute",
        options=dataclasses.replace(QUIET, epochs=100),
    ).setup()
    network = trainer.network
    assert isinstance(network, AsymmetricResidualUNet) and network.features == configuration.network.features
    assert (
        network.strides == configuration.network.strides and network.kernel_sizes == configuration.network.kernel_sizes
    )
    assert (
        network.parameter_split()
        == on_meta(
            AsymmetricResidualUNet,
            in_channels=1,
            num_classes=1,
            features=configuration.network.features,
            strides=configuration.network.strides,
            kernel_sizes=configuration.network.kernel_sizes,
        ).parameter_split()
    )
    loss = trainer.loss_settings
    assert (loss.name, loss.focal_gamma, loss.focal_alpha) == ("focal", 2.0, configuration.loss.focal_alpha)
    assert isinstance(trainer.optimizer, torch.optim.Adadelta) and trainer.deep_supervision_levels == 1
    sampling = trainer.sampling_spec()
    assert (
        sampling.foreground_oversampling == 0.5
        and sampling.max_offset_fraction == configuration.sampling.max_offset_fraction
    )
    with trainer.loader(0, train=True) as batches:  # balanced: one of the two patches is centred on lesion
        assert all(batch["seg"][-1].any() for batch in (next(batches) for _ in range(3)))
    assert (
        trainer.plateau.patience("early_stopping_patience_epochs", trainer.run_length.epochs) == 10
    )  # none planned: a tenth of 100 epochs, >= 8
    assert trainer.promise is None
    log = (trainer.output_folder / "log.txt").read_text()
    assert "time check skipped" in log and "acute stroke recipe: AsymmetricResidualUNet" in log
    assert "time estimate (plans' compute budget)" not in log
    for epoch, dice in enumerate([0.5] + [0.4] * 10):
        trainer.plateau.epoch_completed(trainer, epoch, dice)
        assert trainer.plateau.stop_requested() == (epoch == 10) and trainer.learning_rate(epoch, 0) == 1.0

    pspnet = dataclasses.replace(
        configuration,
        name="2d",
        network=dataclasses.replace(configuration.network, architecture="PSPNet", backbone="resnet18"),
    )
    with pytest.raises(ValueError, match="plans a PSPNet"):
        get_trainer("AcuteStrokeTrainer")(
            dataclasses.replace(plans, configurations={"2d": pspnet}),
            "2d",
            0,
            preprocessed_folder=path.parent,
            output_folder=home / "x",
        ).build_network()


def test_a_histeq_twin_beside_the_zscore_configuration_trains_into_its_own_results_folder(home: Path) -> None:
    path = home / "preprocessed" / FIVE / "plans.json"
    before = Plans.from_json(path)
    result = plan_and_preprocess(FIVE, normalization="histeq", progress=False)
    plans = Plans.from_json(path)
    assert sorted(plans.configurations) == ["3d_resunet", "3d_resunet_histeq"]
    assert plans.configuration("3d_resunet") == before.configuration("3d_resunet")  # hand edits kept as they are
    twin = plans.configuration("3d_resunet_histeq")
    assert twin.network == before.configuration().network and twin.schedule == before.configuration().schedule
    assert list(result.preprocessed) == ["3d_resunet", "3d_resunet_histeq"]
    options = TrainingOptions(
        epochs=1, iterations_per_epoch=1, val_iterations=0, num_processes=0, echo=False, validation=False
    )
    for name in ("3d_resunet", "3d_resunet_histeq"):
        train(FIVE, name, 0, options=options)
    runs = {name: home / "results" / FIVE / name / "ZoomInOutTrainer" / "fold_0" for name in plans.configurations}
    for name, folder in runs.items():
        assert (folder / "checkpoint_final.pth").is_file()
        assert Plans.from_json(folder / "plans.json").configuration(name) == plans.configuration(name)
    schemes = {name: [n.scheme for n in plans.configuration(name).normalization] for name in runs}
    assert schemes == {"3d_resunet": ["zscore_foreground"], "3d_resunet_histeq": ["histogram_equalization"]}


def test_a_dataset_changed_after_its_splits_were_made_is_named_cleaned_refused_and_resplit(
    home: Path, capsys: pytest.CaptureFixture
) -> None:
    from autoseg.commands.plan import main as plan_main

    plan = ["-d", "ATLASFive", "-np", "1", "--no-progress", "--preprocess-only"]
    assert plan_main([*plan, "--resplit", "keep"]) == 0
    assert "splits_final.json: --resplit keep: no splits yet, made 5 folds" in capsys.readouterr().out
    splits_path, data = home / "preprocessed" / FIVE / "splits_final.json", home / "preprocessed" / FIVE / "3d_resunet"
    old, raw = read_json(splits_path), home / "raw" / FIVE
    for new in ("atlas_0006", "atlas_0007"):  # two cases added, one removed
        shutil.copy(raw / "imagesTr" / "atlas_0001_0000.nii.gz", raw / "imagesTr" / f"{new}_0000.nii.gz")
        shutil.copy(raw / "labelsTr" / "atlas_0001.nii.gz", raw / "labelsTr" / f"{new}.nii.gz")
    gone = old[2]["val"][0]
    for path in raw.glob(f"*/{gone}*"):
        path.unlink()
    error = _error(capsys, "-d", "ATLASFive", "-np", "0")  # not re-planned: refused, before training
    assert (
        f"the raw dataset changed since it was preprocessed (new, not preprocessed: ['atlas_0006', 'atlas_0007'], preprocessed, no longer in the raw dataset: ['{gone}']); re-run autoseg_plan"
        in error
    )

    assert plan_main(plan) == 0
    out = capsys.readouterr().out
    assert (
        f"cases changed since it was last preprocessed: 2 added ['atlas_0006', 'atlas_0007'], 1 removed ['{gone}']"
        in out
    )
    assert f"deleted the preprocessed files of cases no longer in the dataset: 3d_resunet: {gone};" in out
    assert not list(data.glob(f"{gone}*")) and (data / "atlas_0006.npy").is_file()
    assert read_json(splits_path) == old  # kept until a re-split is asked for
    assert "leaves out cases that are in no fold: ['atlas_0006', 'atlas_0007']" in out
    error = _error(capsys, "-d", "ATLASFive", "-f", "all", "-np", "0")
    assert f"names cases that are not preprocessed: ['{gone}']" in error and "--resplit keep" in error
    assert "--resplit fresh" in _error(capsys, "-d", "ATLASFive", "-f", "1", "-np", "0")
    assert not (home / "results").exists()  # refused before anything was written

    assert plan_main(["-d", "ATLASFive", "--verify", "--resplit", "keep"]) == 1
    assert capsys.readouterr().err == "error: --verify only checks the dataset; run --resplit without it\n"
    assert plan_main([*plan, "--resplit", "keep"]) == 0
    assert "validate the same cases as before (their trained models stay valid)" in capsys.readouterr().out
    new = read_json(splits_path)
    cases = sorted({*old[0]["train"], *old[0]["val"], "atlas_0006", "atlas_0007"} - {gone})
    assert sorted(case for fold in new for case in fold["val"]) == cases  # every case validated exactly once
    assert all(sorted(fold["train"] + fold["val"]) == cases for fold in new)
    for before, after in zip(old, new):
        assert set(before["val"]) - {gone} <= set(after["val"])  # no case moved
    assert sum(before["val"] == after["val"] for before, after in zip(old, new)) >= 3  # at most 2 folds changed
    assert (
        main([*RUN[:4], "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "0", "-np", "0", "--no-validation"])
        == 0
    )


def test_a_fold_in_training_is_refused_to_a_second_run_and_a_killed_runs_lock_is_taken_over(
    home: Path, capsys: pytest.CaptureFixture
) -> None:

    from autoseg.train.run_lock import LOCK_FILE

    folder = home / "results" / FIVE / "3d_resunet" / "ZoomInOutTrainer" / "fold_0"
    holder = hold_lock(folder)  # as autoseg_train holds it while it trains the fold
    try:
        for extra in ([], ["--continue"]):
            error = _error(capsys, *RUN, *extra)
            assert f"{folder} is in use by another run (pid {holder.pid} on host " in error
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(RUN) == 0
    log = (folder / "log.txt").read_text()
    assert f"took over the lock of a run that ended without releasing it (pid {holder.pid} on host " in log
    assert log.count("autoseg training: trainer") == 1 and not (folder / LOCK_FILE).exists()


def test_a_cpu_run_checks_its_thread_count_on_its_own_steps_and_continues_from_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulated busy machine: a step takes 2 s on 2 threads and 0.5 s on 1. The run switches to 1 thread at its
    first epoch, logs why, keeps it, and a continued run starts on 1 thread with the check's schedule."""
    from autoseg.train.threads import ThreadCheck

    monkeypatch.setattr(trainers_base, "ThreadCheck", ThreadCheck)  # the suite's stand-in checks nothing
    machine = SimulatedMachine(lambda t: 1.0)
    used: list[int] = []

    def timed_step(self: Trainer, batch: dict) -> float:  # the step's time only: no network runs
        used.append(torch.get_num_threads())
        machine.spend(0.5 if torch.get_num_threads() == 1 else 2.0)
        return 1.0

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    options = dataclasses.replace(QUIET, validation=False, val_iterations=0, epochs=3, iterations_per_epoch=4)

    def run(**changes) -> Trainer:
        runner = prepare_run("ATLASFive", fold=0, options=dataclasses.replace(options, **changes))
        runner.clock = machine
        runner.setup()
        runner.fit()
        return runner

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = run()
        assert torch.get_num_threads() == 2, "after training the run's own count again"
        log = (whole.output_folder / "log.txt").read_text()
        assert used == [2, 1, 2, 1] + [1, 2, 1, 2] + [1] * 4  # epoch 1 switches, epoch 2 keeps, epoch 3 unchecked
        assert (
            "threads: 1 (switched from 2; steps 2.00 s on 2, 0.50 s on 1 thread(s), fastest of 2 each at the start "
            "of epoch 1; next check at epoch 2)" in log
        )
        assert "threads: 1 (kept; steps 0.50 s on 1, 2.00 s on 2 thread(s)" in log and "next check at epoch 4" in log
        final = load_checkpoint(whole.output_folder / "checkpoint_final.pth")
        assert final["threads"] == {"configured": 2, "current": 1, "interval": 2, "next": 3}

        # killed after epoch 1: the continued run starts on 1 thread and checks at epoch 2, as the whole run did
        used.clear()
        monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "resumed"))
        with _killed_after(monkeypatch, 1):
            run()
        used.clear()
        run(continue_training=True)
        assert used == [1, 2, 1, 2] + [1] * 4
        # --deterministic keeps the count fixed
        used.clear()
        monkeypatch.setenv("AUTOSEG_RESULTS", str(home / "deterministic"))
        run(deterministic=True, epochs=1)
        assert used == [2] * 4
    finally:
        torch.set_num_threads(threads)
