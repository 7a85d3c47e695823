"""User-facing errors are one line and exit 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import autoseg
from autoseg.commands.common import run
from autoseg.commands.train import main as train_main
from autoseg.errors import AutosegError, UnknownNameError, UsageError


def _modules() -> list[str]:
    names = [f"autoseg.{m.name}" for m in pkgutil.walk_packages(autoseg.__path__) if not m.ispkg]
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

    monkeypatch.setattr("autoseg.training.find_dataset", broken)
    with pytest.raises(ValueError, match="a bug"):  # not turned into 'error: ...' and exit 1
        train_main(["-d", "ATLAS", "-f", "0"])


def test_a_missing_dataset_through_a_command(capsys: pytest.CaptureFixture) -> None:
    assert train_main(["-d", "NoSuchDataset", "-f", "0"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no dataset 'NoSuchDataset'") and "\n" not in error
