"""Shared fixtures: every test gets its own empty data roots; tiny demo datasets are made once."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from autoseg.demo import make_atlas_like, make_ctp_like


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: tiny tensors gain nothing from threads, and on a busy 2-core machine
    OpenMP threads waiting for each other make a millisecond step take a second."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the commands' configure_threads() honours it
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture(autouse=True)
def data_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point AUTOSEG_HOME at a fresh folder and unset the per-root variables."""
    home = tmp_path / "autoseg_home"
    monkeypatch.setenv("AUTOSEG_HOME", str(home))
    for variable in ("AUTOSEG_RAW", "AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS"):
        monkeypatch.delenv(variable, raising=False)
    return home


@pytest.fixture
def home(prepared: Path, data_roots: Path) -> Path:
    """This test's AUTOSEG_HOME with private copies of the ``raw`` and ``preprocessed`` folders of its module's
    ``prepared`` home (a module-scoped fixture each module that uses ``home`` defines)."""
    for root in ("raw", "preprocessed"):
        shutil.copytree(prepared / root, data_roots / root, dirs_exist_ok=True)
    return data_roots


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ATLAS-like (4 cases) and CTP-like (4 subjects) datasets, generated once per session."""
    root = tmp_path_factory.mktemp("tiny_sources")
    return {
        "atlas": make_atlas_like(root / "Dataset901_ATLASTiny", num_cases=4, seed=0, tiny=True, progress=False),
        "ctp": make_ctp_like(root / "Dataset903_CTPTiny", num_subjects=4, seed=0, tiny=True, progress=False),
    }


@pytest.fixture
def tiny_atlas(tiny_sources: dict[str, Path], data_roots: Path) -> Path:
    """A private copy of the tiny ATLAS-like dataset under this test's AUTOSEG_RAW."""
    return Path(shutil.copytree(tiny_sources["atlas"], data_roots / "raw" / tiny_sources["atlas"].name))


@pytest.fixture
def tiny_ctp(tiny_sources: dict[str, Path], data_roots: Path) -> Path:
    """A private copy of the tiny CTP-like dataset under this test's AUTOSEG_RAW."""
    return Path(shutil.copytree(tiny_sources["ctp"], data_roots / "raw" / tiny_sources["ctp"].name))


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees a CPU without native bf16, so ``--precision auto`` means fp32 on every machine the suite
    runs on (AVX2-only and AMX alike). Tests of the bf16 path ask for it explicitly; the automatic choice is tested
    by faking this probe."""
    monkeypatch.setattr("autoseg.machine.cpu_has_fast_bf16", lambda: (False, "AVX2 (pinned by the test suite)"))


def _reoriented_copy(source: Path, target: Path, orientation: str) -> Path:
    """Write ``source`` to ``target`` stored in ``orientation`` (e.g. ``ASL``, ``LPI``): the same voxels at the same
    world positions, with the axes permuted and flipped by SimpleITK's own DICOMOrient filter."""
    import SimpleITK as sitk

    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(source)), orientation), str(target))
    return target


@pytest.fixture
def reoriented_copy() -> Callable[[Path, Path, str], Path]:
    """``reoriented_copy(source, target, orientation)``: see :func:`_reoriented_copy`."""
    return _reoriented_copy
