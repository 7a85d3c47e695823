"""User-facing errors are one line and exit 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import autoseg
from autoseg.commands.common import run
from autoseg.commands.evaluate import main as evaluate_main
from autoseg.commands.export import main as export_main
from autoseg.commands.plan import main as plan_main
from autoseg.commands.predict import main as predict_main
from autoseg.commands.train import main as train_main
from autoseg.errors import AutosegError, UnknownNameError, UsageError
from autoseg.io.files import read_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

TINY_MODEL = "Dataset961_ATLASPredict"  # what conftest's tiny_model_home trains


def _modules() -> list[str]:
    # The prefix makes walk_packages import autoseg's subpackages by their full names (without it, "api" could be
    # found elsewhere on sys.path, e.g. tests/api).
    names = [m.name for m in pkgutil.walk_packages(autoseg.__path__, prefix="autoseg.") if not m.ispkg]
    return names + [
        f"{package}.{m.name}"
        for package in ("planners", "trainers")
        for m in pkgutil.iter_modules(importlib.import_module(package).__path__)
    ]


def test_every_error_class_of_the_package_is_an_autoseg_error() -> None:
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{attribute}"] = value
    assert len(found) >= 15, sorted(found)  # DatasetError, PlansError, DiskFullError, ... and the shared ones
    assert [name for name, cls in found.items() if not issubclass(cls, AutosegError)] == []


def test_a_user_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture) -> None:
    def wrong_option() -> None:
        raise UsageError("--fold 9: out of range")

    assert run(wrong_option) == 1
    assert capsys.readouterr().err == "error: --fold 9: out of range\n"

    def unknown() -> None:
        raise UnknownNameError("unknown trainer 'X'; available: A, B")

    assert run(unknown) == 1
    assert capsys.readouterr().err == "error: unknown trainer 'X'; available: A, B\n"  # not quoted as KeyError would


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr("autoseg.api.train.find_dataset", broken)
    with pytest.raises(ValueError, match="a bug"):  # not turned into 'error: ...' and exit 1
        train_main(["-d", "ATLAS", "-f", "0"])


def test_a_missing_dataset_through_a_command(capsys: pytest.CaptureFixture) -> None:
    assert train_main(["-d", "NoSuchDataset", "-f", "0"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no dataset 'NoSuchDataset'") and "\n" not in error


# ---------------------------------------------------------------------------- outputs that cannot be written
def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` (relative name -> bytes, None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``folder`` read-only. Root writes anywhere (but on a read-only file system), so for root the permission
    check (``os.access``) is also told what it would say to an ordinary user."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:
        access = os.access

        def as_a_user(path: object, mode: int, **kwargs: object) -> bool:
            if mode & os.W_OK and Path(path).resolve().is_relative_to(folder.resolve()):
                return False
            return access(path, mode, **kwargs)

        monkeypatch.setattr("os.access", as_a_user)
    return folder


def _refused(main: Callable[[list[str]], int], arguments: list[str], root: Path, capsys: pytest.CaptureFixture) -> str:
    """Run a command that must refuse its output: exit 1, one ``error:`` line, nothing under ``root`` changed."""
    before = _snapshot(root)
    assert main(arguments) == 1, arguments
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err and _snapshot(root) == before, arguments
    return err.removeprefix("error: ").rstrip("\n")


def test_predict_refuses_an_output_it_cannot_write_in_one_line(
    trained_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((trained_home / "raw" / TINY_MODEL / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(source, scans / "scan.nii.gz")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "out" / "scan.nii.gz").mkdir(parents=True)
    (tmp_path / "probabilities" / "scan_probabilities.nii.gz").mkdir(parents=True)
    read_only = _read_only(tmp_path / "read_only", monkeypatch)
    common = ["-i", str(scans), "--device", "cpu", "--no-progress", "--no-tta"]
    expected = {
        "file": f"output folder {tmp_path / 'file'}: is a file, not a folder",
        "file/sub": f"output folder {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, not a folder",
        "out": f"output {tmp_path / 'out' / 'scan.nii.gz'} (case scan's labels): is a folder, not a file",
        "probabilities": f"output {tmp_path / 'probabilities' / 'scan_probabilities.nii.gz'} (case scan's "
        "probability map): is a folder, not a file",
        "read_only": f"output folder {read_only}: is read-only",
        "read_only/sub": f"output folder {read_only / 'sub'}: {read_only} is read-only",
    }
    for output, message in expected.items():
        arguments = [*common, "-o", str(tmp_path / output), "--save-probabilities"]
        assert _refused(predict_main, arguments, tmp_path, capsys) == message


def test_evaluate_refuses_an_output_it_cannot_write_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    geometry = Geometry((6, 6, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    for folder in ("ref", "pred"):
        write_image(mask, geometry, tmp_path / folder / "case.nii.gz")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "summary_is_a_folder" / "summary.json").mkdir(parents=True)
    (tmp_path / "report_is_a_folder" / "report.html").mkdir(parents=True)
    read_only = _read_only(tmp_path / "read_only", monkeypatch)
    common = ["-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "--bootstrap", "10", "--no-progress"]
    expected = {
        "file": f"output folder {tmp_path / 'file'}: is a file, not a folder",
        "summary_is_a_folder": f"output {tmp_path / 'summary_is_a_folder' / 'summary.json'}: is a folder, not a file",
        "report_is_a_folder": f"results page (--report) {tmp_path / 'report_is_a_folder' / 'report.html'}: is a "
        "folder, not a file",
        "read_only": f"output folder {read_only}: is read-only",
    }
    for output, message in expected.items():
        arguments = [*common, "-o", str(tmp_path / output), "--report"]
        assert _refused(evaluate_main, arguments, tmp_path, capsys) == message
    arguments = [*common, "-o", str(read_only / "sub")]  # without --report
    message = f"output folder {read_only / 'sub'}: {read_only} is read-only"
    assert _refused(evaluate_main, arguments, tmp_path, capsys) == message


def test_export_refuses_a_zip_path_it_cannot_write_in_one_line(
    trained_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "model.zip").mkdir()
    read_only = _read_only(tmp_path / "read_only", monkeypatch)
    expected = {
        tmp_path / "model.zip": f"model file {tmp_path / 'model.zip'}: is a folder, not a file",
        tmp_path / "file" / "model.zip": f"model file {tmp_path / 'file' / 'model.zip'}: {tmp_path / 'file'} is a "
        "file, not a folder",
        read_only / "model.zip": f"model file {read_only / 'model.zip'}: {read_only} is read-only",
    }
    for output, message in expected.items():
        assert _refused(export_main, ["-o", str(output)], tmp_path, capsys) == message


def test_train_pretrain_and_demo_refuse_a_read_only_output_before_any_work_in_one_line(
    trained_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A read-only AUTOSEG_RESULTS (train), -o folder (pretrain: before ten epochs of training, not after) and
    AUTOSEG_RAW (demo): one line each, nothing written."""
    from autoseg.commands.demo import main as demo_main
    from autoseg.commands.pretrain import main as pretrain_main

    read_only = _read_only(tmp_path / "read_only", monkeypatch)
    monkeypatch.setenv("AUTOSEG_RESULTS", str(read_only))
    run = read_only / TINY_MODEL / "3d_resunet" / "ResidualUNetTrainer" / "fold_0"
    arguments = ["-d", TINY_MODEL, "-f", "0", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "1"]
    assert _refused(train_main, arguments, tmp_path, capsys) == f"run folder {run}: {read_only} is read-only"
    arguments = ["-d", TINY_MODEL, "-o", str(read_only / "r.pth"), "--backbone", "resnet18", "--device", "cpu"]
    message = f"backbone file {read_only / 'r.pth'}: {read_only} is read-only"
    assert _refused(pretrain_main, arguments, tmp_path, capsys) == message
    monkeypatch.setenv("AUTOSEG_RAW", str(read_only))
    message = f"dataset folder {read_only}: is read-only"
    assert _refused(demo_main, ["atlas", "--tiny"], tmp_path, capsys) == message


def test_plan_refuses_preprocessed_folders_it_cannot_write_in_one_line(
    tiny_atlas: Path, data_roots: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = data_roots / "preprocessed" / tiny_atlas.name
    arguments = ["-d", tiny_atlas.name, "-np", "1", "--no-progress"]
    folder.parent.mkdir(parents=True)
    folder.write_text("not a folder")
    message = f"preprocessed folder {folder}: is a file, not a folder"
    assert _refused(plan_main, arguments, data_roots, capsys) == message
    folder.unlink()
    (folder / "plans.json").mkdir(parents=True)
    message = f"output {folder / 'plans.json'}: is a folder, not a file"
    assert _refused(plan_main, arguments, data_roots, capsys) == message
    (folder / "plans.json").rmdir()
    assert plan_main([*arguments, "-c", "3d_resunet"]) == 0
    capsys.readouterr()
    data = folder / read_json(folder / "plans.json")["configurations"]["3d_resunet"]["data_identifier"]
    shutil.rmtree(data)
    data.write_text("not a folder")  # where the configuration's preprocessed data go
    message = f"preprocessed folder {data}: is a file, not a folder"
    assert _refused(plan_main, [*arguments, "-c", "3d_resunet"], data_roots, capsys) == message
    data.unlink()
    _read_only(folder, monkeypatch)
    message = f"preprocessed folder {folder}: is read-only"
    assert _refused(plan_main, arguments, data_roots, capsys) == message


def _commands() -> dict[str, Callable[[list[str]], int]]:
    from autoseg.commands import convert, demo, evaluate, plan, predict, pretrain, train

    return {
        "plan": plan.main,
        "predict": predict.main,
        "train": train.main,
        "pretrain": pretrain.main,
        "evaluate": evaluate.main,
        "demo": demo.main,
        "convert": convert.main,
    }


PLAN, PREDICT, TRAIN = ["-d", "ATLAS"], ["-i", "in", "-o", "out"], ["-d", "ATLAS"]
PRETRAIN, EVALUATE = ["-d", "ATLAS", "-o", "w.pth"], ["-ref", "r", "-pred", "p", "-o", "o"]
POSITIVE, NOT_NEGATIVE = "must be at least 1, got", "must be at least 0, got"
FINITE = "must be a positive finite number, got"
#: (command, arguments, the flag, what argparse says) for every numeric and device flag, with hostile values.
BAD_VALUES = [
    *[("plan", [*PLAN, "--budget-minutes", v], "--budget-minutes", FINITE) for v in ("inf", "-1", "0", "nan", "x")],
    *[("plan", [*PLAN, "--budget-hours", v], "--budget-hours", FINITE) for v in ("inf", "-0.5")],
    *[("plan", [*PLAN, "--gpu-memory-gb", v], "--gpu-memory-gb", FINITE) for v in ("-4", "nan", "inf")],
    ("plan", [*PLAN, "-np", "0"], "-np/--num-processes", POSITIVE),
    ("plan", [*PLAN, "--device", "tpu"], "--device", "invalid choice: 'tpu'"),
    *[("predict", [*PREDICT, "--device", v], "--device", "not a device autoseg runs on") for v in ("tpu", "cuda:x")],
    *[
        ("predict", [*PREDICT, "--step-size", v], "--step-size", "greater than 0 and at most 1")
        for v in ("0", "2", "nan")
    ],
    ("predict", [*PREDICT, "--num-parts", "0"], "--num-parts", POSITIVE),
    ("predict", [*PREDICT, "--part-id", "-1"], "--part-id", NOT_NEGATIVE),
    ("train", [*TRAIN, "--device", "tpu"], "--device", "not a device autoseg runs on"),
    ("train", [*TRAIN, "--epochs", "0"], "--epochs", POSITIVE),
    ("train", [*TRAIN, "--iters-per-epoch", "-3"], "--iters-per-epoch", POSITIVE),
    ("train", [*TRAIN, "--val-iters", "-1"], "--val-iters", NOT_NEGATIVE),
    ("train", [*TRAIN, "-np", "-1"], "-np/--num-processes", NOT_NEGATIVE),
    ("train", [*TRAIN, "--num-gpus", "0"], "--num-gpus", POSITIVE),
    ("train", [*TRAIN, "--seed", "-1"], "--seed", "must be from 0 to 4294967295"),
    ("train", [*TRAIN, "--seed", "1.5"], "--seed", "must be a whole number"),
    ("pretrain", [*PRETRAIN, "--device", "tpu"], "--device", "not a device autoseg runs on"),
    ("pretrain", [*PRETRAIN, "--epochs", "0"], "--epochs", POSITIVE),
    ("pretrain", [*PRETRAIN, "-np", "-2"], "-np/--num-processes", NOT_NEGATIVE),
    ("evaluate", [*EVALUATE, "--bootstrap", "-1"], "--bootstrap", NOT_NEGATIVE),
    ("evaluate", [*EVALUATE, "-np", "0"], "-np/--num-workers", POSITIVE),
    ("evaluate", [*EVALUATE, "--seed", "2e9"], "--seed", "must be a whole number"),
    ("demo", ["atlas", "-n", "0"], "-n/--cases", POSITIVE),
    ("convert", ["isles22", "src", "-d", "X", "--id", "1000"], "--id", "must be from 0 to 999"),
]


@pytest.mark.parametrize(("command", "arguments", "flag", "words"), BAD_VALUES)
def test_a_bad_flag_value_is_argparses_one_line_error_before_anything_runs(
    capsys: pytest.CaptureFixture, command: str, arguments: list[str], flag: str, words: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _commands()[command](arguments)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0].startswith("usage: ") and len([line for line in error if "error:" in line]) == 1, error
    assert f"error: argument {flag}: " in error[-1] and words in error[-1], error


@pytest.mark.parametrize(
    ("command", "arguments", "words"),
    [
        ("plan", [*PLAN, "--verify", "--preprocess-only"], "--preprocess-only has no effect with --verify"),
        ("plan", [*PLAN, "--verify", "-c", "3d", "--budget-minutes", "5"], "--configurations, --budget-minutes have"),
        ("plan", [*PLAN, "--verify", "--normalization", "histeq"], "--normalization has no effect with --verify"),
        ("plan", [*PLAN, "--preprocess-only", "--gpu-memory-gb", "4"], "--gpu-memory-gb has no effect with --prep"),
        ("plan", [*PLAN, "--preprocess-only", "-pl", "CPUPlanner"], "--planner has no effect with --preprocess-only"),
        ("plan", [*PLAN, "--device", "cpu"], "--device has no effect without --budget-minutes or --budget-hours"),
        ("demo", ["atlas", "--tiny", "--spacing", "2"], "--spacing has no effect with --tiny"),
        ("demo", ["ctp", "--spacing", "2"], "--spacing has no effect with ctp"),
    ],
)
def test_a_flag_that_would_be_silently_ignored_is_refused(
    capsys: pytest.CaptureFixture, command: str, arguments: list[str], words: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _commands()[command](arguments)
    assert stopped.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


def test_good_flag_values_still_parse() -> None:
    from autoseg.commands import plan, predict, train

    args = plan.parser().parse_args([*PLAN, "--budget-minutes", "30", "--gpu-memory-gb", "7.5", "--device", "cpu"])
    assert (args.budget_minutes, args.gpu_memory_gb) == (30.0, 7.5)
    args = predict.parser().parse_args([*PREDICT, "--device", "cuda:1", "--step-size", "1", "--part-id", "0"])
    assert (args.device, args.step_size) == ("cuda:1", 1.0)
    args = train.parser().parse_args([*TRAIN, "--val-iters", "0", "-np", "0", "--seed", "4294967295"])
    assert (args.val_iters, args.num_processes, args.seed) == (0, 0, 2**32 - 1)


def test_the_library_refuses_an_unknown_device_in_one_line() -> None:
    from autoseg.machine import choose_device

    with pytest.raises(UsageError, match="--device tpu: not a device autoseg runs on; use auto, cpu, cuda or cuda:N"):
        choose_device("tpu")


def test_a_memory_budget_too_small_for_any_network_is_one_line_and_writes_nothing(
    tiny_atlas: Path, data_roots: Path, capsys: pytest.CaptureFixture
) -> None:
    arguments = ["-d", tiny_atlas.name, "-np", "1", "--no-progress", "--gpu-memory-gb", "0.5"]
    message = _refused(plan_main, arguments, data_roots, capsys)
    assert message.startswith("a memory budget of 0.5 GB cannot hold 2 patches of even the smallest U-Net")
    assert message.endswith("give more memory (--gpu-memory-gb)")
