"""Patch sampling: shapes and padding, lesion-forced patches at the planned share, varying offsets, 2-D slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import autoseg.train.sampling
from autoseg.io.files import save_array, write_json
from autoseg.train.loading import PatchDataLoader
from autoseg.train.sampling import PatchSampler, forced_count


def coded_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """(2, X, Y, Z): channel 0 encodes each voxel's position (1 + x*10^4 + y*10^2 + z), channel 1 is its negative."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    code = (1 + x * 10_000 + y * 100 + z).astype(np.float32)
    return np.stack([code, -code])


def write_case(folder: Path, identifier: str, shape: tuple[int, int, int], lesion: list[tuple[int, int, int]]) -> None:
    """A preprocessed case as autoseg.preprocess.preprocessing writes it, with lesion voxels at ``lesion``."""
    seg = np.zeros(shape, np.uint8)
    for voxel in lesion:
        seg[voxel] = 1
    save_array(coded_volume(shape), folder / f"{identifier}.npy")
    save_array(seg, folder / f"{identifier}_seg.npy")
    save_array(np.argwhere(seg > 0).astype(np.int32), folder / f"{identifier}_lesion.npy")
    write_json({"subject": identifier}, folder / f"{identifier}.json")


def position(code: float) -> tuple[int, int, int]:
    code = int(code) - 1
    return code // 10_000, code // 100 % 100, code % 100


def sampler(folder: Path, patch, seed: int = 0, **options) -> PatchSampler:
    options = {"foreground_oversampling": 0.33, "max_offset_fraction": 0.5, **options}
    return PatchSampler(folder, ["big", "small", "empty"], patch, rng=np.random.default_rng(seed), **options)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_case(tmp_path, "big", (40, 36, 30), [(20, 18, 15)])  # a single lesion voxel in the middle
    write_case(tmp_path, "small", (6, 7, 5), [(0, 0, 0), (5, 6, 4)])  # smaller than the patch on every axis
    write_case(tmp_path, "empty", (20, 20, 20), [])
    write_case(tmp_path, "corner", (40, 36, 30), [(0, 35, 29)])
    return tmp_path


def test_patches_are_crops_of_the_volume(folder: Path) -> None:
    volume = coded_volume((40, 36, 30))
    patches = sampler(folder, (16, 12, 10))
    for _ in range(20):
        data, seg = patches.sample("big", force_lesion=False)
        assert data.shape == (2, 16, 12, 10) and data.dtype == np.float32
        assert seg.shape == (1, 16, 12, 10) and seg.dtype == np.uint8
        x, y, z = position(data[0, 0, 0, 0])  # random patches of a large volume lie inside it: no padding
        np.testing.assert_array_equal(data, volume[:, x : x + 16, y : y + 12, z : z + 10])


def test_small_volumes_are_padded_with_zeros_and_kept_whole(folder: Path) -> None:
    patches = sampler(folder, (8, 8, 8))
    for force in (False, True):
        data, seg = patches.sample("small", force_lesion=force)
        assert data.shape == (2, 8, 8, 8) and seg.shape == (1, 8, 8, 8)
        assert (data[0] > 0).sum() == 6 * 7 * 5  # every voxel of the volume is in the patch
        assert seg.sum() == 2
        assert np.all(data[:, data[0] == 0] == 0) and np.all(seg[0][data[0] == 0] == 0)


@pytest.mark.parametrize(
    "batch, ratio, expected",
    [(2, 0.0, 0), (2, 0.1, 1), (2, 0.33, 1), (2, 0.5, 1), (5, 0.5, 3), (8, 0.33, 3), (8, 0.5, 4), (4, 1.0, 4)],
)
def test_forced_count_is_nnunets_rule(batch: int, ratio: float, expected: int) -> None:
    assert forced_count(batch, ratio) == expected
    forced = sampler(Path("."), (8, 8, 8), foreground_oversampling=ratio).forced_in_batch(batch)
    assert forced == [False] * (batch - expected) + [True] * expected


def test_forced_patches_contain_lesion_at_the_planned_share(folder: Path) -> None:
    patches = PatchSampler(
        folder,
        ["big", "corner"],
        (12, 12, 12),
        foreground_oversampling=0.33,
        max_offset_fraction=0.5,
        rng=np.random.default_rng(0),
    )
    loader = PatchDataLoader(patches, batch_size=8, seed=3)
    for _ in range(10):
        batch = next(loader)
        has_lesion = batch["seg"].reshape(8, -1).max(axis=1) > 0
        assert has_lesion[-3:].all()  # the last round(8 * 0.33) = 3 samples
        assert batch["data"].shape == (8, 2, 12, 12, 12) and batch["seg"].shape == (8, 1, 12, 12, 12)
    # the lesion is one voxel of ~43,000: random patches almost never hit it
    assert has_lesion[:5].sum() <= 1


def test_offsets_move_the_lesion_around_the_patch(folder: Path) -> None:
    patch = (16, 16, 16)
    positions = []
    for fraction in (0.0, 0.25):
        patches = sampler(folder, patch, max_offset_fraction=fraction)
        found = np.array([np.argwhere(patches.sample("big", force_lesion=True)[1][0])[0] for _ in range(200)])
        positions.append(found)
    assert (positions[0] == 8).all()  # no offset: the lesion voxel sits at the centre P // 2
    offsets = positions[1] - 8
    assert offsets.min() == -4 and offsets.max() == 4  # up to 0.25 x 16 voxels either way, on every axis
    assert len({tuple(o) for o in offsets}) > 100


def test_lesions_at_the_border_stay_inside_the_patch(folder: Path) -> None:
    patches = sampler(folder, (16, 16, 16), max_offset_fraction=0.9)  # more than half a patch: capped
    for _ in range(50):
        assert patches.sample("corner", force_lesion=True)[1].sum() == 1


def test_enlarged_sampling_patch_centres_the_final_patch_inside_the_volume(folder: Path) -> None:
    patches = sampler(folder, (24, 20, 18), final_patch_size=(16, 12, 10))
    for force in (False, True):
        for _ in range(20):
            data, _ = patches.sample("big", force_lesion=force)
            final = data[:, 4:20, 4:16, 4:14]
            assert (final[0] > 0).all()  # the final patch never leaves the volume; the margin may
            x, y, z = position(final[0, 0, 0, 0])
            assert 0 <= x <= 40 - 16 and 0 <= y <= 36 - 12 and 0 <= z <= 30 - 10


def test_cases_without_lesion_fall_back_to_random_patches(folder: Path) -> None:
    patches = sampler(folder, (8, 8, 8))
    starts = {position(patches.sample("empty", force_lesion=True)[0][0, 0, 0, 0]) for _ in range(20)}
    assert len(starts) > 5


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_two_dimensional_slices(folder: Path, slice_axis: int) -> None:
    in_plane = [n for axis, n in enumerate((40, 36, 30)) if axis != slice_axis]
    patches = sampler(folder, (16, 16), slice_axis=slice_axis)
    data, seg = patches.sample("big", force_lesion=True)
    assert data.shape == (2, 16, 16) and seg.shape == (1, 16, 16)
    assert seg.sum() == 1 and position(data[0, 0, 0])[slice_axis] == (20, 18, 15)[slice_axis]
    slices = {position(patches.sample("big", force_lesion=False)[0][0, 0, 0])[slice_axis] for _ in range(30)}
    assert len(slices) > 10
    whole = sampler(folder, tuple(in_plane), slice_axis=slice_axis).sample("big", force_lesion=False)[0]
    assert (whole[0] > 0).all()  # a patch as large as the slice is the whole slice


def test_reads_through_memory_maps(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = autoseg.train.sampling.load_array

    def spy(path, mmap=False):
        calls.append((Path(path).name, mmap))
        return original(path, mmap)

    monkeypatch.setattr(autoseg.train.sampling, "load_array", spy)
    sampler(folder, (8, 8, 8)).sample("big", force_lesion=True)
    assert ("big.npy", True) in calls and ("big_seg.npy", True) in calls


def test_inconsistent_sizes_are_refused(folder: Path) -> None:
    with pytest.raises(ValueError, match="larger than the sampling patch"):
        sampler(folder, (8, 8, 8), final_patch_size=(10, 8, 8))
    with pytest.raises(ValueError, match="need 2 entries"):
        sampler(folder, (8, 8, 8), slice_axis=2)


def test_lesion_choice_lesion_sees_a_small_lesion_beside_a_large_one_as_often(tmp_path: Path) -> None:
    large = [(x, y, z) for x in range(4, 14) for y in range(4, 14) for z in range(4, 14)]  # 1,000 voxels
    small = [(30, 30, 20), (31, 30, 20)]  # 2 voxels, far from the large lesion
    write_case(tmp_path, "two", (40, 36, 30), large + small)

    def share_on_small(choice: str) -> float:
        patches = PatchSampler(
            tmp_path,
            ["two"],
            (4, 4, 4),
            foreground_oversampling=1.0,
            max_offset_fraction=0.0,
            rng=np.random.default_rng(0),
            lesion_choice=choice,
        )
        hits = 0
        for _ in range(400):
            data, _ = patches.sample("two", force_lesion=True)
            hits += position(data[0, 2, 2, 2])[0] >= 28  # the patch is centred on the chosen voxel
        return hits / 400

    assert share_on_small("voxel") < 0.02  # 2 of 1,002 voxels
    assert 0.4 < share_on_small("lesion") < 0.6  # one of two lesions
    with pytest.raises(ValueError, match="lesion_choice"):
        PatchSampler(
            tmp_path,
            ["two"],
            (4, 4, 4),
            foreground_oversampling=1.0,
            max_offset_fraction=0.0,
            rng=np.random.default_rng(0),
            lesion_choice="largest",
        )
