"""Sliding-window inference, ensembling and post-processing: what validation and ``autoseg_predict`` rely on."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import home_environment
from torch import nn

from autoseg.api.plan import plan_and_preprocess
from autoseg.infer.postprocessing import postprocess_probabilities, remove_small_components
from autoseg.infer.predictor import Predictor, ensemble_probabilities
from autoseg.infer.sliding_window import (
    GAUSSIAN_FLOOR,
    TTA_CHOICES,
    accumulation_device,
    gaussian_importance_map,
    inference_memory_format,
    mirror_combinations,
    predict_slices,
    predict_sliding_window,
    sliding_window_positions,
    tta_mirror_axes,
)
from autoseg.io.geometry import Geometry, left_right_axis
from autoseg.io.images import read_image, write_image
from autoseg.networks import ResidualUNet
from autoseg.plans import Configuration
from autoseg.preprocess.preprocessing import preprocess_arrays, restore_probabilities

OBLIQUE = tuple(np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]]).ravel().tolist())
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class ProbabilityIdentity(nn.Module):
    """Logits whose sigmoid is the first input channel (inputs in (0, 1)): it 'predicts' its input. 2-D or 3-D."""

    num_classes = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, :1].clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)  # torch.logit is oddly slow on some CPU builds


class Constant(nn.Module):
    """Probability ``p`` everywhere; counts forward passes, windows, and windows that were entirely 0."""

    def __init__(self, p: float, num_classes: int = 1) -> None:
        super().__init__()
        self.logit, self.num_classes = math.log(p / (1 - p)), num_classes
        self.calls = self.windows = self.empty_windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.windows += x.shape[0]
        self.empty_windows += sum(not bool(sample.any()) for sample in x)
        return torch.full((x.shape[0], self.num_classes, *x.shape[2:]), self.logit)


class WindowMean(nn.Module):
    """One probability per window: the mean of its input, so the Gaussian weighting of windows can be checked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return (torch.log(means) - torch.log1p(-means)).expand(x.shape[0], 1, *x.shape[2:])


class Recorder(ProbabilityIdentity):
    """Predicts its input like :class:`ProbabilityIdentity` and keeps every batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return super().forward(x)


class DarkIsLesion(nn.Module):
    """Voxel-wise 'network': z-scored intensities far below the brain's (a T1 lesion) get a high probability."""

    num_classes = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -4.0 * (x[:, :1] + 1.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def atlas_configuration(tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Configuration:
    """The tiny ATLAS-like demo's default configuration, planned once for this module."""
    home = tmp_path_factory.mktemp("inference_home")
    with home_environment(home):
        shutil.copytree(tiny_sources["atlas"], home / "raw" / tiny_sources["atlas"].name)
        return plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()


# --- (b) Gaussian importance map -------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [(8, 8, 8), (33, 17, 9), (128, 128, 128), (1, 16, 12), (20, 13)])
def test_gaussian_map_peaks_at_one_in_the_centre_is_symmetric_and_positive(patch) -> None:
    weights = gaussian_importance_map(patch)
    assert weights.shape == patch and weights.dtype == np.float32
    assert weights.max() == 1.0 and weights.min() >= GAUSSIAN_FLOOR
    for axis in range(len(patch)):
        np.testing.assert_array_equal(weights, np.flip(weights, axis))
    centre = tuple(n // 2 for n in patch)
    assert weights[centre] == weights.max()


def test_gaussian_profile_has_sigma_of_one_eighth_of_the_patch() -> None:
    weights = gaussian_importance_map((33, 33, 33))
    profile = weights[:, 16, 16]
    offsets = np.arange(33) - 16
    expected = np.maximum(np.exp(-0.5 * (offsets / (33 / 8)) ** 2), GAUSSIAN_FLOOR)
    np.testing.assert_allclose(profile, expected, rtol=1e-6)
    assert np.all(np.diff(profile[:17]) > 0) and np.all(np.diff(profile[16:]) < 0)
    assert weights[0, 0, 0] == pytest.approx(GAUSSIAN_FLOOR)  # corners are clipped, not zero


def test_gaussian_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive patch sizes"):
        gaussian_importance_map((0, 8, 8))
    with pytest.raises(ValueError):
        gaussian_importance_map((8, 8, 8), sigma_scale=0)


# --- (c) window positions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, patch, step",
    [
        ((64, 64, 64), (64, 64, 64), 0.5),
        ((140, 175, 150), (128, 128, 128), 0.5),
        ((23, 17, 13), (8, 8, 8), 0.5),
        ((23, 17, 13), (8, 8, 8), 0.25),
        ((100, 9, 31), (7, 9, 5), 0.5),  # odd patch: step 3.5 voxels is rounded down to 3
        ((12, 40, 41), (1, 16, 16), 0.5),  # slice-wise windows: every slice
        ((50,), (10,), 1.0),
    ],
)
def test_positions_cover_every_voxel_stay_in_bounds_and_respect_the_step(shape, patch, step) -> None:
    windows = sliding_window_positions(shape, patch, step)
    coverage = np.zeros(shape, np.int32)
    for window in windows:
        assert all(0 <= w.start and w.stop <= n and w.stop - w.start == p for w, n, p in zip(window, shape, patch))
        coverage[window] += 1
    assert coverage.min() >= 1
    for axis, (n, p) in enumerate(zip(shape, patch)):
        starts = sorted({window[axis].start for window in windows})
        assert starts[0] == 0 and starts[-1] + p == n
        assert all(0 < b - a <= max(1, step * p) for a, b in zip(starts, starts[1:]))
    assert len(windows) == len({tuple(w.start for w in window) for window in windows})


def test_positions_of_an_atlas_sized_volume() -> None:
    """Two windows per axis for the cropped 1 mm brain with a 128^3 patch: 8 in all."""
    assert len(sliding_window_positions((140, 175, 150), (128, 128, 128), 0.5)) == 8
    assert len(sliding_window_positions((140, 175, 150), (128, 128, 128), 0.25)) == 12  # 2, 3 and 2 windows


@pytest.mark.parametrize(
    "shape, patch, step, message",
    [
        ((7, 20, 20), (8, 8, 8), 0.5, "pad first"),
        ((20, 20, 20), (8, 8), 0.5, "same number of axes"),
        ((20, 20, 20), (8, 8, 8), 0.0, "step_size"),
        ((20, 20, 20), (8, 8, 8), 1.5, "step_size"),
    ],
)
def test_positions_reject_invalid_requests(shape, patch, step, message) -> None:
    with pytest.raises(ValueError, match=message):
        sliding_window_positions(shape, patch, step)


def test_mirror_combinations_are_all_subsets() -> None:
    assert mirror_combinations(()) == [()]
    assert len(mirror_combinations((0, 1, 2))) == 8
    assert sorted(mirror_combinations((0, 1))) == sorted([(), (0,), (1,), (0, 1)])


# --- (a) a network that returns its input comes back through the sliding window ---------------------------------


@pytest.mark.parametrize("shape", [(23, 17, 13), (5, 6, 7), (8, 20, 6)], ids=["not_divisible", "smaller", "mixed"])
@pytest.mark.parametrize("step", [0.5, 0.25])
@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)], ids=["no_mirroring", "mirroring"])
def test_identity_network_gives_its_input_back(shape, step, mirror_axes) -> None:
    data = np.random.default_rng(0).uniform(0.05, 0.95, (2, *shape)).astype(np.float32)
    probabilities = predict_sliding_window(
        ProbabilityIdentity(), data, (8, 8, 8), step_size=step, mirror_axes=mirror_axes, batch_size=3
    )
    assert probabilities.shape == (1, *shape) and probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities[0], torch.from_numpy(data[0]), atol=1e-5, rtol=0)


def test_windows_are_averaged_with_gaussian_weights() -> None:
    """Each window predicts one value (its input mean); every voxel must get the Gaussian-weighted mean."""
    shape, patch = (20, 14, 11), (8, 8, 8)
    data = np.random.default_rng(1).uniform(0.1, 0.9, (1, *shape)).astype(np.float32)
    probabilities = predict_sliding_window(WindowMean(), data, patch, step_size=0.5)
    weights = gaussian_importance_map(patch).astype(np.float64)
    numerator, denominator = np.zeros(shape), np.zeros(shape)
    for window in sliding_window_positions(shape, patch, 0.5):
        numerator[window] += weights * data[(0, *window)].mean()
        denominator[window] += weights
    np.testing.assert_allclose(probabilities[0].numpy(), numerator / denominator, atol=1e-5)


def test_read_only_memory_mapped_input_is_accepted_and_left_unchanged(tmp_path: Path) -> None:
    data = np.random.default_rng(2).uniform(0.1, 0.9, (1, 10, 9, 8)).astype(np.float32)
    np.save(tmp_path / "case.npy", data)
    mapped = np.load(tmp_path / "case.npy", mmap_mode="r")
    probabilities = predict_sliding_window(ProbabilityIdentity(), mapped, (8, 8, 8), mirror_axes=(0,))
    np.testing.assert_allclose(probabilities[0].numpy(), data[0], atol=1e-5)
    np.testing.assert_array_equal(mapped, data)


def test_residual_unet_state_is_restored_and_bf16_autocast_agrees_with_fp32() -> None:
    torch.manual_seed(0)
    network = ResidualUNet(
        in_channels=1,
        num_classes=2,
        features=(8, 16, 16),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 3,
        deep_supervision=True,
    )
    network.train()
    data = torch.randn(1, 19, 12, 10)
    full = predict_sliding_window(network, data, (8, 8, 8), mirror_axes=(1,))
    half = predict_sliding_window(network, data, (8, 8, 8), mirror_axes=(1,), autocast_dtype=torch.bfloat16)
    assert full.shape == half.shape == (2, 19, 12, 10)
    assert float((full - half).abs().max()) < 0.05
    assert network.training and network.deep_supervision  # put back as they were


# --- (d) skipping windows that are entirely 0 ----------------------------------------------------------------


def test_empty_windows_are_not_run_and_keep_probability_zero() -> None:
    data = np.zeros((1, 40, 40, 40), np.float32)
    data[0, :6, :6, :6] = 1.0
    network = Constant(0.7)
    probabilities = predict_sliding_window(network, data, (16, 16, 16), step_size=0.5, batch_size=4)
    assert len(sliding_window_positions((40, 40, 40), (16, 16, 16), 0.5)) == 64
    assert network.windows == 1 and network.calls == 1 and network.empty_windows == 0
    np.testing.assert_allclose(probabilities[0, :16, :16, :16].numpy(), 0.7, rtol=1e-5)
    assert probabilities[0, 16:].abs().max() == 0 and probabilities[0, :, 16:].abs().max() == 0

    everything = Constant(0.7)
    probabilities = predict_sliding_window(everything, data, (16, 16, 16), skip_empty=False, batch_size=4)
    assert everything.windows == 64 and everything.calls == 16
    np.testing.assert_allclose(probabilities.numpy(), 0.7, rtol=1e-5)


def test_an_all_zero_volume_runs_nothing_and_returns_zeros() -> None:
    network = Constant(0.7, num_classes=3)
    probabilities = predict_sliding_window(network, np.zeros((2, 20, 20, 20), np.float32), (16, 16, 16))
    assert network.calls == 0 and probabilities.shape == (3, 20, 20, 20) and probabilities.abs().max() == 0


def test_accumulators_stay_on_the_cpu_for_a_cpu_network() -> None:
    cpu = torch.device("cpu")
    assert accumulation_device(None, cpu, 10**12) == cpu
    assert accumulation_device(False, cpu, 1) == cpu


# --- (e) ensembles ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 30, 25), (48, 50, 44)], ids=["padded", "tiled"])
def test_two_folds_average_their_probabilities(atlas_configuration: Configuration, shape) -> None:
    predictor = Predictor(atlas_configuration, [Constant(0.2), Constant(0.6)], use_mirroring=True)
    probabilities = predictor.predict_preprocessed(np.ones((1, *shape), np.float32))
    assert probabilities.shape == (1, *shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, 0.4, rtol=1e-5)


def test_the_result_is_an_ordinary_tensor_that_may_be_changed() -> None:
    probabilities = predict_sliding_window(Constant(0.3), np.ones((1, 8, 8, 8), np.float32), (8, 8, 8))
    assert not probabilities.is_inference()
    probabilities.mul_(2)  # an inference-mode tensor would refuse this
    np.testing.assert_allclose(probabilities.numpy(), 0.6, rtol=1e-5)


def test_ensemble_probabilities_is_the_mean_and_checks_shapes() -> None:
    members = [np.full((2, 3, 4, 5), 0.1, np.float32), torch.full((2, 3, 4, 5), 0.5), np.full((2, 3, 4, 5), 0.9)]
    np.testing.assert_allclose(ensemble_probabilities(members), 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        ensemble_probabilities([np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 3))])
    with pytest.raises(ValueError, match="at least one"):
        ensemble_probabilities([])


# --- (f) whole cases come back on the input's grid --------------------------------------------------------------


def lesion_case(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A bright brain-like block with an off-centre dark ellipsoid (so swapped or flipped axes would show)."""
    grid = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre, radii = (8.0, -6.0, 4.0), (10.0, 14.0, 9.0)
    label = (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1).astype(np.uint8)
    image = np.zeros(shape, np.float32)
    inner = (slice(2, -2), slice(2, -2), slice(1, -1))
    image[inner] = 100 + np.random.default_rng(0).normal(0, 5, image[inner].shape)
    image[label > 0] = 30
    return image[None], label


def two_dimensional(configuration: Configuration) -> Configuration:
    return dataclasses.replace(configuration, dimension=2, slice_axis=2, patch_size=(48, 48), mirror_axes=(0, 1))


@pytest.mark.parametrize(
    "spacing, direction",
    [((1.0, 1.0, 1.0), None), ((0.8, 0.8, 3.0), None), ((1.0, 1.0, 1.2), OBLIQUE)],
    ids=["isotropic", "anisotropic", "oblique"],
)
@pytest.mark.parametrize("dimension", [3, 2])
def test_predicted_case_has_the_input_geometry(atlas_configuration, tmp_path, spacing, direction, dimension) -> None:
    configuration = atlas_configuration if dimension == 3 else two_dimensional(atlas_configuration)
    configuration = dataclasses.replace(configuration, target_spacing=(2.0, 2.0, 2.0))
    shape = tuple(int(round(60 / s)) for s in spacing)
    images, truth = lesion_case(shape, spacing)
    geometry = Geometry(shape, spacing, (-20.0, 13.0, 7.5), direction or IDENTITY_DIRECTION)
    probabilities, labels = Predictor(configuration, [DarkIsLesion()]).predict_case(images, geometry)
    assert probabilities.shape == (1, *shape) and probabilities.dtype == np.float32
    assert labels.shape == shape and labels.dtype == np.uint8
    overlap = 2 * np.logical_and(labels, truth).sum() / (labels.sum() + truth.sum())
    assert overlap > 0.9
    write_image(labels, geometry, tmp_path / "prediction.nii.gz")
    written, written_geometry = read_image(tmp_path / "prediction.nii.gz", np.uint8, canonical=False)
    assert written_geometry.shape == geometry.shape and written_geometry.differences(geometry) == []
    np.testing.assert_array_equal(written, labels)


def test_residual_unet_from_the_plans_predicts_a_case(atlas_configuration: Configuration) -> None:
    torch.manual_seed(0)
    numbers = atlas_configuration.network
    network = ResidualUNet(
        in_channels=1,
        num_classes=1,
        features=numbers.features,
        strides=numbers.strides,
        kernel_sizes=numbers.kernel_sizes,
        deep_supervision=True,
    )
    shape, spacing = (40, 50, 36), (1.5, 1.2, 1.8)
    images, _ = lesion_case(shape, spacing)
    geometry = Geometry(shape, spacing, (1.0, 2.0, 3.0), OBLIQUE)
    predictor = Predictor(atlas_configuration, [network], use_mirroring=False)
    probabilities, labels = predictor.predict_case(images, geometry)
    assert probabilities.shape == (1, *shape) and labels.shape == shape
    assert 0 <= probabilities.min() and probabilities.max() <= 1 and set(np.unique(labels)) <= {0, 1}


# --- (g) post-processing ------------------------------------------------------------------------------------------


def two_lesions() -> np.ndarray:
    """A diagonal chain of 3 voxels (one lesion only with 26-connectivity) and a 2x2x3 block of 12 voxels."""
    labels = np.zeros((12, 12, 8), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = labels[3, 3, 3] = 1
    labels[7:9, 7:9, 4:7] = 1
    return labels


@pytest.mark.parametrize(
    "spacing, min_mm3, kept_voxels",
    [
        ((0.5, 0.5, 4.0), 0.0, 15),  # 1 mm^3 voxels, nothing removed
        ((0.5, 0.5, 4.0), 10.0, 12),  # chain 3 mm^3 < 10 removed; block 12 mm^3 kept
        ((0.5, 0.5, 4.0), 12.0, 12),  # exactly the minimum is kept
        ((0.5, 0.5, 4.0), 12.5, 0),  # both below
        ((1.0, 1.0, 4.0), 10.0, 15),  # 4 mm^3 voxels: chain 12 mm^3 kept
        ((1.0, 1.0, 4.0), 13.0, 12),  # chain 12 mm^3 removed, block 48 mm^3 kept
    ],
)
def test_small_components_are_removed_by_physical_volume(spacing, min_mm3, kept_voxels) -> None:
    probabilities = two_lesions()[None].astype(np.float32) * 0.9
    labels = postprocess_probabilities(probabilities, spacing, threshold=0.5, min_lesion_mm3=min_mm3)
    assert labels.dtype == np.uint8 and int(labels.sum()) == kept_voxels


def test_components_are_26_connected_and_input_is_not_changed() -> None:
    labels = two_lesions()
    kept = remove_small_components(labels, (1.0, 1.0, 1.0), 3.0)
    np.testing.assert_array_equal(kept, labels)  # with 6-connectivity the chain would be three 1 mm^3 lesions
    remove_small_components(labels, (1.0, 1.0, 1.0), 100.0)
    assert labels.sum() == 15


def test_multiple_classes_take_the_most_probable_class_above_threshold() -> None:
    probabilities = np.zeros((2, 4, 1, 1), np.float32)
    probabilities[:, :, 0, 0] = [[0.9, 0.6, 0.45, 0.2], [0.7, 0.8, 0.3, 0.55]]
    labels = postprocess_probabilities(probabilities, (1.0, 1.0, 1.0), threshold=0.5)
    assert labels[:, 0, 0].tolist() == [1, 2, 0, 2]


def test_predictor_postprocess_uses_the_plans_unless_told_otherwise(atlas_configuration: Configuration) -> None:
    predictor = Predictor(atlas_configuration, [Constant(0.5)])
    settings = atlas_configuration.postprocessing
    probabilities = np.zeros((1, 20, 20, 20), np.float32)
    probabilities[0, 2:6, 2:6, 2:6] = 0.9  # 64 voxels of 8 mm^3 = 512 mm^3
    probabilities[0, 10:12, 10:12, 10:12] = settings.threshold - 0.01
    expected = int(64 * 8 >= settings.min_lesion_mm3) * 64
    assert int(predictor.postprocess(probabilities, (2.0, 2.0, 2.0)).sum()) == expected
    assert int(predictor.postprocess(probabilities, (2.0, 2.0, 2.0), threshold=0.3, min_lesion_mm3=0).sum()) == 72


# --- (h) 2-D configurations: slice by slice ------------------------------------------------------------------------


@pytest.mark.parametrize("num_slices", [2, 20])
@pytest.mark.parametrize("slice_axis", [2, 0])
def test_slice_wise_prediction_returns_the_volume(num_slices, slice_axis) -> None:
    in_plane = [21, 13]  # one axis larger than the 16x16 patch (tiled), one smaller (padded)
    shape = tuple(in_plane[:slice_axis] + [num_slices] + in_plane[slice_axis:])
    data = np.random.default_rng(3).uniform(0.05, 0.95, (1, *shape)).astype(np.float32)
    probabilities = predict_slices(ProbabilityIdentity(), data, (16, 16), slice_axis, mirror_axes=(0, 1), batch_size=5)
    assert probabilities.shape == (1, *shape)
    torch.testing.assert_close(probabilities[0], torch.from_numpy(data[0]), atol=1e-5, rtol=0)


def test_slice_wise_prediction_with_a_2d_residual_unet_and_skipping() -> None:
    torch.manual_seed(0)
    network = ResidualUNet(
        in_channels=2,
        num_classes=2,
        features=(8, 16, 16),
        strides=((1, 1), (2, 2), (2, 2)),
        kernel_sizes=((3, 3),) * 3,
        deep_supervision=True,
    )
    data = torch.randn(2, 30, 18, 4)
    data[:, :, :, 1] = 0  # an empty slice is skipped
    probabilities = predict_slices(network, data, (16, 16), 2, mirror_axes=(1,), batch_size=3)
    assert probabilities.shape == (2, 30, 18, 4)
    assert probabilities[:, :, :, 1].abs().max() == 0 and probabilities[:, :, :, 0].min() > 0


def test_slice_wise_prediction_rejects_a_3d_patch() -> None:
    with pytest.raises(ValueError, match="2-D patch"):
        predict_slices(ProbabilityIdentity(), np.zeros((1, 4, 4, 4)), (4, 4, 4), 2)


# --- (i) test-time mirroring choices: none, lr, all ----------------------------------------------------------------

# Array axes stored as (z, x, y): column j of the row-major matrix is the world direction of axis j, so world x
# (left-right) runs along array axis 1, world y along axis 2 and world z along axis 0.
PERMUTED = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "direction, axis",
    [
        (IDENTITY_DIRECTION, 0),
        (PERMUTED, 1),
        ((0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0), 2),  # x along axis 2, pointing the other way (RAS)
        (OBLIQUE, 0),  # rotated by 30 degrees about z: axis 0 is still the closest to world x
    ],
    ids=["identity", "permuted", "flipped", "oblique"],
)
def test_left_right_axis_comes_from_the_direction_matrix(direction, axis) -> None:
    assert left_right_axis(direction) == axis


def test_tta_mirror_axes_per_choice_and_the_lr_fallback() -> None:
    assert tta_mirror_axes((0, 1, 2), "all") == ((0, 1, 2), None)
    assert tta_mirror_axes((0, 1, 2), "none") == ((), None)
    assert tta_mirror_axes((0, 1, 2), "lr", PERMUTED) == ((1,), None)
    axes, notice = tta_mirror_axes((0, 2), "lr", PERMUTED)  # the left-right axis 1 is not mirrored
    assert axes == () and "array axis 1" in notice and "without mirroring" in notice and "\n" not in notice
    # 2-D: mirror axes are the slice's own axes; slices along z keep (x, y) as (0, 1)
    assert tta_mirror_axes((0, 1), "lr", IDENTITY_DIRECTION, slice_axis=2) == ((0,), None)
    assert tta_mirror_axes((0, 1), "lr", PERMUTED, slice_axis=0) == ((0,), None)  # (x, y) are volume axes 1, 2
    assert tta_mirror_axes((0, 1), "lr", IDENTITY_DIRECTION, slice_axis=0)[0] == ()  # sliced along left-right
    with pytest.raises(ValueError, match="direction"):
        tta_mirror_axes((0, 1, 2), "lr")
    with pytest.raises(ValueError, match="unknown tta"):
        tta_mirror_axes((0, 1, 2), "some")


@pytest.mark.parametrize("tta, passes", [("none", 1), ("lr", 2), ("all", 8)])
def test_forward_passes_per_window_follow_the_tta_choice(atlas_configuration, tta, passes) -> None:
    configuration = dataclasses.replace(atlas_configuration, patch_size=(16, 16, 16), mirror_axes=(0, 1, 2))
    assert passes == (2 ** len(configuration.mirror_axes) if tta == "all" else passes)
    network = Constant(0.3)
    predictor = Predictor(configuration, [network], tta=tta, batch_size=4)
    probabilities = predictor.predict_preprocessed(np.ones((1, 24, 24, 20), np.float32), IDENTITY_DIRECTION)
    windows = len(sliding_window_positions((24, 24, 20), (16, 16, 16), 0.5))
    assert windows == 8 and network.windows == passes * windows and network.calls == passes * 2
    np.testing.assert_allclose(probabilities, 0.3, rtol=1e-5)


def test_no_mirroring_is_the_older_use_mirroring_false(atlas_configuration) -> None:
    assert Predictor(atlas_configuration, [Constant(0.5)], use_mirroring=False).tta == "none"
    assert Predictor(atlas_configuration, [Constant(0.5)], use_mirroring=False, tta="all").tta == "none"
    assert Predictor(atlas_configuration, [Constant(0.5)]).tta == "all"  # validation's default
    assert TTA_CHOICES == ("none", "lr", "all")
    with pytest.raises(ValueError, match="unknown tta"):
        Predictor(atlas_configuration, [Constant(0.5)], tta="some")


def test_lr_flips_the_world_left_right_axis_of_a_permuted_image(atlas_configuration) -> None:
    configuration = dataclasses.replace(
        atlas_configuration, target_spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), mirror_axes=(0, 1, 2)
    )
    shape = (16, 16, 16)
    images = np.random.default_rng(4).uniform(50, 150, (1, *shape)).astype(np.float32)
    geometry = Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), PERMUTED)
    network = Recorder()
    Predictor(configuration, [network], tta="lr").predict_case(images, geometry)
    assert len(network.inputs) == 2  # as is, then flipped along array axis 1 (tensor dim 3)
    plain, flipped = network.inputs
    torch.testing.assert_close(flipped, plain.flip(3), atol=0, rtol=0)
    assert not torch.equal(flipped, plain.flip(2)) and not torch.equal(flipped, plain.flip(4))


def test_lr_without_a_mirrored_left_right_axis_predicts_once_and_says_so(atlas_configuration, capsys) -> None:
    configuration = dataclasses.replace(atlas_configuration, patch_size=(16, 16, 16), mirror_axes=(0, 2))
    network = Constant(0.3)
    predictor = Predictor(configuration, [network], tta="lr")
    for _ in range(2):
        predictor.predict_preprocessed(np.ones((1, 16, 16, 16), np.float32), PERMUTED)
    assert network.windows == 2  # one forward pass per window and case
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "without mirroring" in captured.err
    with pytest.raises(ValueError, match="direction"):
        predictor.predict_preprocessed(np.ones((1, 16, 16, 16), np.float32))


@pytest.mark.parametrize("dimension", [3, 2])
def test_identity_network_gives_the_same_result_with_every_tta_choice(atlas_configuration, dimension) -> None:
    configuration = dataclasses.replace(atlas_configuration, patch_size=(8, 8, 8), mirror_axes=(0, 1, 2))
    if dimension == 2:
        configuration = dataclasses.replace(
            configuration, dimension=2, slice_axis=2, patch_size=(8, 8), mirror_axes=(0, 1)
        )
    data = np.random.default_rng(5).uniform(0.05, 0.95, (1, 13, 11, 9)).astype(np.float32)
    results = {
        tta: Predictor(configuration, [ProbabilityIdentity()], tta=tta).predict_preprocessed(data, PERMUTED)
        for tta in TTA_CHOICES
    }
    for tta in TTA_CHOICES:
        np.testing.assert_allclose(results[tta][0], data[0], atol=1e-5)


# --- (j) CPU speed and memory: memory format, accumulators ---------------------------------------------------------


def test_memory_format_choice_and_the_network_is_restored() -> None:
    cpu = torch.device("cpu")
    assert inference_memory_format(cpu, None) == torch.channels_last_3d
    assert inference_memory_format(cpu, torch.bfloat16) == torch.channels_last_3d
    assert inference_memory_format("cuda", torch.bfloat16) == torch.contiguous_format
    torch.manual_seed(0)
    network = ResidualUNet(
        in_channels=1,
        num_classes=1,
        features=(4, 8, 8),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 3,
        deep_supervision=False,
    )
    data = torch.randn(1, 12, 10, 9)
    results = {}
    for memory_format in (torch.contiguous_format, torch.channels_last_3d):
        results[memory_format] = predict_sliding_window(
            network, data, (8, 8, 8), mirror_axes=(0,), memory_format=memory_format
        )
        assert all(p.is_contiguous() for p in network.parameters())  # converted back afterwards
    torch.testing.assert_close(results[torch.contiguous_format], results[torch.channels_last_3d], atol=1e-5, rtol=0)
    network.to(memory_format=torch.channels_last_3d)  # a channels-last network stays channels-last
    predict_sliding_window(network, data, (8, 8, 8), memory_format=torch.contiguous_format)
    assert not all(p.is_contiguous() for p in network.parameters() if p.ndim == 5)


def test_accumulation_and_restoring_keep_at_most_three_full_size_arrays(atlas_configuration) -> None:
    """Memory of the inference path on the CPU, measured with tracemalloc (the sums are NumPy-backed, so it sees
    them): the sliding window holds two float32 volumes of the input's size (probability and weight sums, plus the
    Gaussian map of one window; the mean is taken in place and returned without a copy), restoring to the input
    grid at most three (the probabilities, their resampled copy and the output), whatever the mirroring."""
    configuration = dataclasses.replace(
        atlas_configuration, target_spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), mirror_axes=(0, 1, 2)
    )
    shape = (64, 60, 48)  # no zero border: the preprocessed volume is as large as the input
    images = np.random.default_rng(6).normal(100, 5, (1, *shape)).astype(np.float32)
    geometry = Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY_DIRECTION)
    data, _, properties = preprocess_arrays(images, None, geometry, configuration)
    assert data.shape == images.shape
    volume = images.nbytes
    Predictor(configuration, [DarkIsLesion()]).predict_preprocessed(data)  # warm-up: first-use imports and caches
    for tta in TTA_CHOICES:
        predictor = Predictor(configuration, [DarkIsLesion()], tta=tta, batch_size=4)
        tracemalloc.start()
        try:
            probabilities = predictor.predict_preprocessed(data, geometry.direction)
            accumulated, accumulation_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            probabilities = restore_probabilities(probabilities, properties)
            restored, restoring_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert probabilities.shape == (1, *shape)
        assert 1.9 * volume <= accumulation_peak <= 2.2 * volume, f"{tta}: {accumulation_peak / volume:.2f} volumes"
        assert accumulated <= 1.1 * volume  # the mean, in the probability sums; the weight sums are freed
        assert restoring_peak <= 3.1 * volume, f"{tta}: {restoring_peak / volume:.2f} volumes"
        assert restored <= 1.1 * volume
