"""Shared fixtures: every test gets its own empty data roots; tiny demo datasets are made once."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoseg.api.plan import plan_and_preprocess
from autoseg.api.train import TrainingOptions, train
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.data.demo.ctp import make_ctp_like
from autoseg.io.geometry import Geometry
from autoseg.plan.cost_model import CostModel, ProbePoint
from autoseg.plan.probe import ComputeProbe
from autoseg.plan.step_probe import TRAINING_FORMATS
from autoseg.plans import Configuration, Plans, Stage


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


#: What the step probe's patched rounds return in every test (seconds per step): contiguous faster, as training
#: ran before the step probe; a test of the choice passes its own to :func:`fake_step_rounds`.
CONTIGUOUS_FASTER = {"contiguous": 0.10, "channels_last_3d": 0.12}


def fake_step_rounds(step_seconds: dict[str, float], plain_seconds: float = 0.05) -> Callable[..., list[list[float]]]:
    """A stand-in for :func:`autoseg.plan.probe.timed_rounds` as the step probe calls it (per memory format its
    training step, then the plain convolution): nothing is run or timed, every repeat takes the seconds given."""

    def rounds(steps: Sequence[Callable[[], float]], repeats: int) -> list[list[float]]:
        seconds = [value for name in TRAINING_FORMATS for value in (step_seconds[name], plain_seconds)]
        assert len(steps) == len(seconds), "one training step and one plain convolution per memory format"
        return [[value] * repeats for value in seconds]

    return rounds


@pytest.fixture(autouse=True)
def step_probe_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run's step probe (``autoseg.plan.step_probe``) sees contiguous faster, so training does not depend on
    the CPU the suite runs on (and times nothing); tests of the choice patch their own timings."""
    monkeypatch.setattr("autoseg.plan.step_probe.timed_rounds", fake_step_rounds(CONTIGUOUS_FASTER))
    monkeypatch.setattr("autoseg.plan.step_probe.load_average", lambda: 0.0)  # never busy by the machine's load


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """No run checks its thread count while training (``autoseg.train.threads``), so results do not depend on the
    machine's load; tests of the check attach their own."""
    monkeypatch.setattr("trainers.base.ThreadCheck", _NoThreadCheck)


class _NoThreadCheck:
    """Stands in for :class:`autoseg.train.threads.ThreadCheck` in the trainer: no check for any run."""

    @classmethod
    def for_run(cls, configured: int) -> None:
        return None


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


#: The system's Chromium and its ChromeDriver (tools/install_browser.sh installs both), for the pages' browser tests.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Headless Chromium driven by the system's chromedriver (never Selenium Manager's downloads), with the browser's
    console log kept; a skip, saying why, where selenium, Chromium or ChromeDriver is missing. Quit afterwards."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.exists():
            pytest.skip(f"{program} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="autoseg_chromium_")
    # The background-networking flags keep Chromium from dialling out, which a closed network refuses loudly.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1300,1000", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


#: Hostile NIfTI headers (:func:`_write_hostile_image`), each with words of the one line that refuses it.
HOSTILE_HEADERS = {
    "huge": "32767 x 32767 x 32767",  # 3.5e13 voxels declared in a file of a hundred bytes
    "not_gzip": "not gzip-compressed",  # a sound .nii under a .nii.gz name: plain bytes to a gzip reader
    "cut_short": "it was cut short",  # 200³ float32 declared, 8³ stored
    "metre_voxel": "[1e+09, 1e+09, 1e+09] mm in the header lies outside",
    "negative_pixdim": "[-1, 1, 1] mm in the header: every voxel size must be a positive number",
    "micrometre_voxel": "[1e-06, 1e-06, 1e-06] mm in the header lies outside",
    # SimpleITK reads a NaN, infinite or zero pixdim as 1 mm: only the NIfTI header itself tells
    "nan_pixdim": "voxel size (pixdim) nan, 1, 1 in the NIfTI header: every voxel size must be a positive number",
    "zero_pixdim": "voxel size (pixdim) 1, 0, 1 in the NIfTI header: every voxel size must be a positive number",
    "inf_pixdim": "voxel size (pixdim) 1, 1, inf in the NIfTI header: every voxel size must be a positive number",
}


def _write_hostile_image(path: Path, kind: str) -> Path:
    """Write the hostile NIfTI file ``kind`` of :data:`HOSTILE_HEADERS` to ``path`` (``.nii.gz``), byte by byte:
    a 348-byte header with voxel size in pixdim (qform code 1, no sform, so every reader takes pixdim) and 8³
    float32 voxels (none for ``huge``)."""
    import gzip
    import struct

    import nibabel
    import numpy as np

    shape = {"huge": (32767,) * 3, "cut_short": (200,) * 3}.get(kind, (8, 8, 8))
    pixdim = {
        "metre_voxel": (1e9,) * 3,
        "negative_pixdim": (-1.0, 1.0, 1.0),
        "micrometre_voxel": (1e-6,) * 3,
        "nan_pixdim": (float("nan"), 1.0, 1.0),
        "zero_pixdim": (1.0, 0.0, 1.0),
        "inf_pixdim": (1.0, 1.0, float("inf")),
    }
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=0)
    header["vox_offset"] = 352
    block = bytearray(header.binaryblock)
    struct.pack_into("<3f", block, 80, *pixdim.get(kind, (1.0, 1.0, 1.0)))  # pixdim[1:4]
    voxels = b"" if kind == "huge" else np.random.default_rng(0).random(512, np.float32).tobytes()
    data = bytes(block) + b"\0" * 4 + voxels  # the 4-byte extension flag, then the voxels at offset 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if kind == "not_gzip" else gzip.compress(data))
    return path


@pytest.fixture
def hostile_image() -> Callable[[Path, str], Path]:
    """``hostile_image(path, kind)``: see :func:`_write_hostile_image` and :data:`HOSTILE_HEADERS`."""
    return _write_hostile_image


#: The dataset of the tiny trained model shared by the prediction and model-file tests.
TINY_MODEL = "Dataset961_ATLASPredict"
TINY_MODEL_TRAINER = "ResidualUNetTrainer"


@contextmanager
def home_environment(home: Path) -> Iterator[None]:
    """``AUTOSEG_HOME`` set to ``home`` and ``AUTOSEG_RAW``/``_PREPROCESSED``/``_RESULTS`` unset while it lasts: for
    fixtures wider than a test, which cannot use ``monkeypatch`` (:func:`data_roots` does it per test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOSEG_HOME", str(home))
        for variable in ("AUTOSEG_RAW", "AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS"):
            patch.delenv(variable, raising=False)
        yield


def fake_probe(speed: float = 1.0, machine: dict | None = None) -> ComputeProbe:
    """A compute probe with the coefficients measured on a 2-core CPU (bf16), ``speed`` times faster, of ``machine``
    (default a made-up ``test CPU``): plans made with it do not depend on the machine running the suite."""
    point = ProbePoint((8, 16, 32, 64), (32, 32, 32), 2, 1.0, 7.6, 0.088 / speed, 0.016 / speed)
    return ComputeProbe(
        machine=machine
        or {"device": "cpu", "model": "test CPU", "threads": 2, "torch": torch.__version__, "precision": "fp32"},
        created="2026-11-30T00:00:00+00:00",
        probe_seconds=20.0,
        memory_format="contiguous",
        memory_format_seconds={"contiguous": 0.45, "channels_last_3d": 0.52},
        augmentation_seconds_per_megavoxel=0.25 / speed,
        points=(point,),
        training=CostModel(0.0159 / speed, 0.0, 0.85 / speed, 0.0167 / speed),
        inference=CostModel(0.0029 / speed, 0.0012 / speed, 0.0, 0.004 / speed),
    )


def tiny_configuration(
    configuration: Configuration,
    features: Sequence[int],
    patch_size: Sequence[int],
    batch_size: int,
    *,
    epochs: int = 1,
    iterations_per_epoch: int = 1,
    trainer: str = "ResidualUNetTrainer",
    mirror_axes: Sequence[int] | None = None,
    deep_supervision: bool | None = None,
) -> Configuration:
    """``configuration`` made small enough to train in seconds: a U-Net of ``features`` per level (3³ kernels, stride
    1 then 2 per level), one stage of ``patch_size`` cubes in batches of ``batch_size`` at lr 1e-2 without restarts;
    ``mirror_axes`` and ``deep_supervision`` as given, else as planned."""
    levels = len(features)
    network = dataclasses.replace(
        configuration.network,
        features=tuple(features),
        strides=((1, 1, 1),) + ((2, 2, 2),) * (levels - 1),
        kernel_sizes=((3, 3, 3),) * levels,
        **({} if deep_supervision is None else {"deep_supervision": deep_supervision}),
    )
    stage = Stage(name="full", start_epoch=0, patch_size=tuple(patch_size), batch_size=batch_size, learning_rate=1e-2)
    schedule = dataclasses.replace(
        configuration.schedule,
        trainer=trainer,
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        restart_period_epochs=None,
        stages=(stage,),
    )
    return dataclasses.replace(
        configuration,
        network=network,
        patch_size=tuple(patch_size),
        batch_size=batch_size,
        schedule=schedule,
        **({} if mirror_axes is None else {"mirror_axes": tuple(mirror_axes)}),
    )


@pytest.fixture(scope="session")
def tiny_model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with a tiny model trained once per session: a 5-case tiny ATLAS-like dataset ``TINY_MODEL``, planned,
    its default configuration (a 3-level U-Net with 4-16 features, one iteration, 32³ patches, mirroring along axis
    0) trained with ``TINY_MODEL_TRAINER`` on folds 0 and 1, with the end-of-fold validation. Copy it before use
    (:func:`trained_home`)."""
    home = tmp_path_factory.mktemp("tiny_model_home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors gain nothing from threads (see one_torch_thread)
    with home_environment(home):
        make_atlas_like(home / "raw" / TINY_MODEL, num_cases=5, seed=0, tiny=True, progress=False)
        plans = plan_and_preprocess(TINY_MODEL, progress=False).plans
        path = home / "preprocessed" / TINY_MODEL / "plans.json"
        # 32³ windows and mirroring along one axis keep a prediction to a few dozen forward passes.
        configuration = tiny_configuration(
            plans.configuration(), (4, 8, 16), (32, 32, 32), 1, trainer=TINY_MODEL_TRAINER, mirror_axes=(0,)
        )
        dataclasses.replace(plans, configurations={configuration.name: configuration}).to_json(path)
        Plans.from_json(path)
        for fold in (0, 1):  # another seed per fold: the two members differ clearly
            options = TrainingOptions(
                num_processes=0, echo=False, val_iterations=0, device="cpu", precision="fp32", seed=fold
            )
            train(TINY_MODEL, configuration.name, fold, options=options)
    torch.set_num_threads(threads)
    return home


@pytest.fixture
def trained_home(tiny_model_home: Path, data_roots: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's AUTOSEG_HOME holding a copy of :func:`tiny_model_home`; commands run on one thread."""
    shutil.copytree(tiny_model_home, data_roots, dirs_exist_ok=True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return data_roots


# ------------------------------------------------------------------------------------------------
# A brain-like phantom in world coordinates, for channels on different grids (channel co-registration)
# ------------------------------------------------------------------------------------------------

#: Contrast of each phantom sequence: (brain, ventricles, lesion, texture) weights.
PHANTOM_CONTRASTS = {
    "dwi": (100.0, 60.0, 80.0, 30.0),
    "adc": (800.0, 1500.0, -400.0, 150.0),
    "flair": (200.0, -150.0, 120.0, -40.0),
}


def rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """The 3x3 rotation by ``degrees`` about world x, then y, then z (``Rz @ Ry @ Rx``)."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_geometry(
    shape: Sequence[int], spacing: Sequence[float], degrees: Sequence[float], center: Sequence[float] = (0, 0, 0)
) -> Geometry:
    """A grid of ``shape`` voxels of ``spacing`` mm centred on ``center`` (mm), its axes turned by ``degrees``
    (:func:`rotation_matrix`) against the world's: an oblique acquisition."""
    rotation = rotation_matrix(degrees)
    origin = np.asarray(center, float) - rotation @ ((np.asarray(shape) - 1) / 2 * np.asarray(spacing, float))
    return Geometry(
        tuple(int(n) for n in shape),
        tuple(float(s) for s in spacing),
        tuple(float(v) for v in origin),
        tuple(float(v) for v in rotation.ravel()),
    )


def grid_points(geometry: Geometry) -> np.ndarray:
    """(X·Y·Z, 3) world points (mm) of every voxel centre of ``geometry``'s grid, x fastest last (C order)."""
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1).reshape(-1, 3)
    return np.asarray(geometry.origin, float) + (indices * np.asarray(geometry.spacing, float)) @ direction.T


def _inside(points: np.ndarray, center: Sequence[float], semi_axes: Sequence[float], edge: float) -> np.ndarray:
    """A smooth ellipsoid indicator (1 inside, 0 outside, a sigmoid ``edge`` wide in units of the radius)."""
    radius = np.sqrt((((points - np.asarray(center)) / np.asarray(semi_axes)) ** 2).sum(-1))
    return 1.0 / (1.0 + np.exp(np.clip((radius - 1.0) / edge, -50, 50)))


PHANTOM_LESION = ((28.0, -20.0, 15.0), (10.0, 8.0, 12.0))  # centre and semi-axes (mm)


def brain_phantom(points: np.ndarray, contrast: str, lesion_center: Sequence[float] = PHANTOM_LESION[0]) -> np.ndarray:
    """A head-sized brain at the world origin (ellipsoid of semi-axes 60 x 72 x 55 mm) with two asymmetric ventricles,
    a lesion and a fixed texture of 40 blobs and 6 waves (3-20 mm), seen with ``contrast`` (:data:`PHANTOM_CONTRASTS`)
    at world ``points`` (N, 3) mm; 0 outside the brain. Returns (N,) float32."""
    brain_weight, ventricle_weight, lesion_weight, texture_weight = PHANTOM_CONTRASTS[contrast]
    brain = _inside(points, (0, 0, 0), (60, 72, 55), 0.03)
    ventricles = _inside(points, (-9, 5, 8), (6, 22, 9), 0.15) + _inside(points, (10, 3, 6), (5, 20, 10), 0.15)
    lesion = _inside(points, lesion_center, PHANTOM_LESION[1], 0.15)
    rng = np.random.default_rng(7)
    texture = np.zeros(len(points))
    for _ in range(40):
        center, sigma = rng.uniform(-45, 45, 3) * [1, 1.1, 0.8], rng.uniform(3, 7)
        texture += rng.uniform(-1, 1) * np.exp(-((points - center) ** 2).sum(-1) / (2 * sigma * sigma))
    waves = rng.standard_normal((6, 3))
    waves *= (2 * np.pi / rng.uniform(12, 20, 6))[:, None] / np.linalg.norm(waves, axis=1, keepdims=True)
    texture += 0.3 * np.cos(points @ waves.T + rng.uniform(0, 6, 6)).sum(-1)
    value = brain * (brain_weight + texture_weight * texture + lesion_weight * lesion) + ventricle_weight * ventricles
    return np.where(brain > 0.01, value, 0.0).astype(np.float32)


def phantom_lesion(points: np.ndarray, lesion_center: Sequence[float] = PHANTOM_LESION[0]) -> np.ndarray:
    """(N,) bool: the phantom's lesion (:func:`brain_phantom`) at world ``points``."""
    return _inside(points, lesion_center, PHANTOM_LESION[1], 0.15) > 0.5


def sample_phantom(
    geometry: Geometry,
    contrast: str,
    motion: tuple[np.ndarray, np.ndarray] | None = None,
    lesion_center: Sequence[float] = PHANTOM_LESION[0],
) -> np.ndarray:
    """(X, Y, Z) float32: :func:`brain_phantom` sampled at the voxel centres of ``geometry``; with ``motion`` =
    (R, t) the head moved so that voxel ``y`` shows the phantom at ``R y + t``."""
    points = grid_points(geometry)
    if motion is not None:
        rotation, shift = motion
        points = points @ rotation.T + shift
    return brain_phantom(points, contrast, lesion_center).reshape(geometry.shape)


_REPO = Path(__file__).resolve().parents[1]
_HOLD = """
import sys, time
from autoseg.train.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is stopped."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=environment
    )
    assert process.stdout.readline().strip() == "locked"
    return process
