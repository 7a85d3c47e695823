"""Augmentation and loading: batch shapes and dtypes per configuration, determinism, data/label alignment,
clean shutdown of worker processes."""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.api.plan import plan_and_preprocess
from autoseg.io.files import DamagedArrayError, save_array, write_json
from autoseg.plans import Configuration
from autoseg.train.augmentation import (
    FoldAxisIntoChannels,
    UnfoldAxisFromChannels,
    sampling_patch_size,
    spatial_augmentation,
    training_transforms,
)
from autoseg.train.loading import case_identifiers, make_loader

CONFIGURATIONS = ["3d_resunet", "3d_aniso", "2d_pspnet"]


@pytest.fixture(scope="module")
def planned(tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Configuration name -> (configuration, preprocessed folder) for the tiny ATLAS- and CTP-like datasets,
    planned and preprocessed once for this module."""
    home = tmp_path_factory.mktemp("loading_home")
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOSEG_HOME", str(home))
        for source, name in ((tiny_sources["atlas"], "ATLASTiny"), (tiny_sources["ctp"], "CTPTiny")):
            shutil.copytree(source, home / "raw" / source.name)
            result = plan_and_preprocess(name, progress=False)
            for configuration in result.plans.configurations.values():
                folder = result.plans_path.parent / configuration.data_identifier
                found[configuration.name] = (configuration, folder)
    return found


def take(
    configuration: Configuration,
    folder: Path,
    count: int,
    seed: int = 0,
    num_processes: int = 0,
    train: bool = True,
    **options,
) -> list[dict]:
    with make_loader(
        folder, case_identifiers(folder), configuration, None, num_processes, seed, train, **options
    ) as stream:
        return [next(stream) for _ in range(count)]


def same(first: list[dict], second: list[dict]) -> bool:
    return all(
        a["keys"] == b["keys"] and torch.equal(a["data"], b["data"]) and torch.equal(a["seg"], b["seg"])
        for a, b in zip(first, second)
    )


@pytest.mark.parametrize("name", CONFIGURATIONS)
@pytest.mark.parametrize("train", [True, False])
def test_batches_have_the_planned_shapes_and_types(planned, name: str, train: bool) -> None:
    configuration, folder = planned[name]
    channels = np.load(folder / f"{case_identifiers(folder)[0]}.npy", mmap_mode="r").shape[0]
    for stage in configuration.schedule.stages:
        with make_loader(folder, case_identifiers(folder), configuration, stage, 0, 0, train) as stream:
            batch = next(stream)
        expected = (stage.batch_size, channels, *stage.patch_size)
        assert tuple(batch["data"].shape) == expected and batch["data"].dtype == torch.float32
        assert tuple(batch["seg"].shape) == (stage.batch_size, 1, *stage.patch_size)
        assert batch["seg"].dtype == torch.int16 and set(batch["seg"].unique().tolist()) <= {0, 1}
        assert len(batch["keys"]) == stage.batch_size and torch.isfinite(batch["data"]).all()


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_same_seed_gives_the_same_batches(planned, name: str) -> None:
    configuration, folder = planned[name]
    first = take(configuration, folder, 3, seed=7)
    np.random.seed(0)
    random.seed(0)  # other users of the global generators must not change the stream
    assert same(first, take(configuration, folder, 3, seed=7))
    assert not same(first, take(configuration, folder, 3, seed=8))


def test_same_seed_gives_the_same_batches_with_worker_processes(planned) -> None:
    configuration, folder = planned["3d_resunet"]
    first = take(configuration, folder, 4, seed=5, num_processes=2)
    assert same(first, take(configuration, folder, 4, seed=5, num_processes=2))
    assert first[0]["keys"] != first[1]["keys"] or not torch.equal(first[0]["seg"], first[1]["seg"])  # own seeds
    assert multiprocessing.active_children() == []  # closing the stream ended its workers


def test_stream_leaves_the_global_generators_alone(planned) -> None:
    configuration, folder = planned["3d_aniso"]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    take(configuration, folder, 2)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(numpy_state, after)) and random.getstate() == python_state


def test_closed_stream_refuses_batches(planned) -> None:
    configuration, folder = planned["3d_resunet"]
    stream = make_loader(folder, case_identifiers(folder), configuration, None, 1, 0, True)
    next(stream)
    stream.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(RuntimeError, match="closed"):
        next(stream)


def _truncated_copy(folder: Path, destination: Path, case_index: int) -> tuple[Path, list[str]]:
    """A copy of a preprocessed folder; returns the array of one case to cut short, and the cases."""
    copy = Path(shutil.copytree(folder, destination))
    cases = case_identifiers(copy)
    return copy / f"{cases[case_index]}.npy", cases


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("num_processes", [0, 1])
def test_a_damaged_array_is_named_by_the_loader(planned, tmp_path: Path, num_processes: int) -> None:
    configuration, folder = planned["3d_resunet"]
    damaged, cases = _truncated_copy(folder, tmp_path / "data", 0)
    _cut_short(damaged)
    with pytest.raises(DamagedArrayError, match="re-run autoseg_plan") as error:
        with make_loader(damaged.parent, cases, configuration, None, num_processes, 0, True) as stream:
            for _ in range(20):  # in this process: as soon as the damaged case is drawn
                next(stream)
    assert str(damaged) in str(error.value) and "cut short" in str(error.value)
    assert multiprocessing.active_children() == []


def test_an_array_damaged_while_workers_run_is_named(planned, tmp_path: Path) -> None:
    configuration, folder = planned["3d_resunet"]
    damaged, cases = _truncated_copy(folder, tmp_path / "data", 1)
    with pytest.raises(DamagedArrayError, match="re-run autoseg_plan") as error:
        with make_loader(damaged.parent, cases, configuration, None, 1, 0, True) as stream:
            next(stream)
            _cut_short(damaged)
            for _ in range(200):  # a worker dies on it; the error names the file, not only "no longer alive"
                next(stream)
    assert str(damaged) in str(error.value)
    assert multiprocessing.active_children() == []


def write_label_image(folder: Path, shape: tuple[int, ...]) -> None:
    """One case whose single channel equals its label: four ellipsoidal 'lesions' (thin axes keep all slices)."""
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    seg = np.zeros(shape, np.uint8)
    for _ in range(4):
        centre = [rng.uniform(0.2 * n, 0.8 * n) for n in shape]
        radius = [rng.uniform(0.1, 0.2) * n if n > 8 else np.inf for n in shape]
        seg[sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) <= 1] = 1
    save_array(seg[None].astype(np.float32), folder / "case.npy")
    save_array(seg, folder / "case_seg.npy")
    save_array(np.argwhere(seg).astype(np.int32), folder / "case_lesion.npy")
    write_json({"subject": "case"}, folder / "case.json")


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_augmented_data_and_labels_stay_aligned(planned, tmp_path: Path, name: str) -> None:
    configuration, _ = planned[name]
    configuration = dataclasses.replace(configuration, normalization=configuration.normalization[:1])
    volume = list(configuration.patch_size)
    if configuration.dimension == 2:
        volume.insert(configuration.slice_axis, 6)
    write_label_image(tmp_path, tuple(int(n * 1.5) if n > 8 else n for n in volume))
    counts = np.zeros(4)  # intersection, data > 0.5, seg, control intersection with a flipped seg
    with make_loader(tmp_path, ["case"], configuration, None, 0, 0, True, elastic=True) as stream:
        for _ in range(10):
            batch = next(stream)
            data, seg = batch["data"][:, 0].numpy() > 0.5, batch["seg"][:, 0].numpy() > 0
            counts += [(data & seg).sum(), data.sum(), seg.sum(), (data & seg[:, ::-1]).sum()]
    assert 2 * counts[0] / (counts[1] + counts[2]) >= 0.95
    assert 2 * counts[3] / (counts[1] + counts[2]) < 0.8  # the check notices labels that moved on their own


@pytest.mark.parametrize("name", ["3d_resunet", "3d_aniso"])
def test_unaugmented_training_patches_equal_validation_patches(planned, name: str) -> None:
    """The final patch is the centre of the enlarged sampling patch: without mirroring, samples that were
    neither rotated nor scaled (about 2/3 at p 0.2 each) show exactly the validation patch of the same seed
    (same cases, same places: the sampler's choices do not depend on the patch size)."""
    configuration, folder = planned[name]
    configuration = dataclasses.replace(configuration, mirror_axes=())
    trained, validated = take(configuration, folder, 12), take(configuration, folder, 12, train=False)
    pairs = [(t["seg"][i], v["seg"][i]) for t, v in zip(trained, validated) for i in range(len(t["seg"]))]
    equal = [torch.equal(a, b) for a, b in pairs if b.any()]  # empty patches would be equal anyway
    assert len(equal) >= 12 and sum(equal) >= 0.25 * len(equal) and not all(equal)


@pytest.mark.parametrize(
    "patch, rotation, scale, translation, expected",
    [
        ((64, 64), (10.0,), (0.9, 1.1), 0.1, (96, 96)),  # PSPNet: 64·(cos 10° + sin 10°)·1.1 + 12.8 = 94.4
        ((64, 64), (0.0,), (0.8, 1.0), 0.0, (64, 64)),  # nothing reaches outside
        ((40, 48, 40), (30.0,) * 3, (0.7, 1.4), 0.0, (84, 88, 84)),  # x: (40 cos 30° + 48 sin 30°)·1.4 = 82.1
    ],
)
def test_sampling_patch_size(patch, rotation, scale, translation, expected) -> None:
    assert sampling_patch_size(patch, rotation, scale, translation) == expected


def test_thin_patches_are_augmented_in_plane(planned) -> None:
    configuration, _ = planned["3d_aniso"]
    spatial = spatial_augmentation(configuration, (64, 64, 3))
    assert spatial.flat_axis == 2 and spatial.sampling_patch_size((64, 64, 3))[2] == 3
    assert spatial_augmentation(planned["3d_resunet"][0], (40, 48, 40)).flat_axis is None
    assert spatial_augmentation(planned["2d_pspnet"][0], (64, 64)).rotation_degrees == (10.0,)
    names = [type(t).__name__ for t in training_transforms(configuration, (64, 64, 3)).transforms]
    assert names[:3] == ["FoldAxisIntoChannels", "SpatialTransform", "UnfoldAxisFromChannels"]
    assert names[-1] == "NumpyToTensor"


def test_folding_an_axis_into_channels_is_undone_exactly() -> None:
    batch = {
        "data": np.random.default_rng(0).normal(size=(2, 3, 5, 6, 4)).astype(np.float32),
        "seg": np.arange(2 * 5 * 6 * 4, dtype=np.int16).reshape(2, 1, 5, 6, 4),
    }
    for axis in (0, 1, 2):
        folded = FoldAxisIntoChannels(axis)(**{k: v.copy() for k, v in batch.items()})
        assert folded["data"].shape == (2, 3 * (5, 6, 4)[axis], *[n for a, n in enumerate((5, 6, 4)) if a != axis])
        restored = UnfoldAxisFromChannels()(**folded)
        assert set(restored) == {"data", "seg"}
        np.testing.assert_array_equal(restored["data"], batch["data"])
        np.testing.assert_array_equal(restored["seg"], batch["seg"])
