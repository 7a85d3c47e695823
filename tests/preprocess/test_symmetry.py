"""Symmetric-hemisphere channels (``autoseg.preprocess.symmetry``): the registered mirror, the fingerprint's verdict, the
symmetric configurations in the plans, and training and prediction with them.

The synthetic head is symmetric about a plane that is tilted and shifted against the image grid by a known amount,
so the registration has to find it; its "lesion" sits in one hemisphere only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_configuration
from scipy import ndimage

from autoseg.api.plan import plan_and_preprocess
from autoseg.api.predict_inputs import find_input_cases, read_case
from autoseg.commands.predict import main as predict_main
from autoseg.commands.train import main as train_main
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_header, read_image, write_image
from autoseg.plans import Plans, Symmetry
from autoseg.preprocess.cases import load_case
from autoseg.preprocess.preprocessing import preprocess_arrays
from autoseg.preprocess.symmetry import (
    MIN_CORRELATION,
    MirrorFit,
    add_mirror_channels,
    apply_mirror,
    fit_mirror,
    grid_geometry,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclasses.dataclass
class Head:
    image: np.ndarray  # (X, Y, Z)
    lesion: np.ndarray  # (X, Y, Z) bool
    brain: np.ndarray  # (X, Y, Z) bool
    geometry: Geometry
    normal: np.ndarray  # unit normal of the true mid-sagittal plane (world)
    point: np.ndarray  # a point on it (mm)


def _rotation(about_z: float, about_y: float) -> np.ndarray:
    a, b = np.radians(about_z), np.radians(about_y)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


def synthetic_head(
    spacing: float = 2.0,
    tilt: tuple[float, float] = (7.0, 5.0),
    shift=(6.0, -3.0, 2.0),
    lesion: bool = True,
    seed: int = 0,
) -> Head:
    """A head (128 x 144 x 120 mm, ellipsoid brain) symmetric about the plane through ``shift`` (mm from the grid
    centre) whose normal is world x turned by ``tilt`` degrees about z then y; a dark lesion of radius 7 mm lies
    25 mm to one side of the plane. Intensities: smooth even functions of the distance to the plane, symmetric
    blobs and ventricles, zero outside the brain."""
    shape = tuple(int(round(e / spacing)) for e in (128, 144, 120))
    origin = -(np.array(shape) - 1) / 2 * spacing
    geometry = Geometry(shape, (spacing,) * 3, tuple(float(v) for v in origin), IDENTITY)
    axes = [origin[a] + spacing * np.arange(shape[a]) for a in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    rotation = _rotation(*tilt)
    u = (world - np.array(shift)) @ rotation  # u[..., 0]: signed distance to the plane
    across, along, up = np.abs(u[..., 0]), u[..., 1], u[..., 2]
    brain = (across / 55) ** 2 + (along / 66) ** 2 + (up / 52) ** 2 <= 1
    image = 100 + 15 * np.cos(across / 6) * np.cos(along / 9) + 10 * np.sin(up / 7) + 0.2 * along
    rng = np.random.default_rng(seed)
    for _ in range(10):
        a, b, c, r = rng.uniform(5, 35), rng.uniform(-45, 45), rng.uniform(-35, 35), rng.uniform(4, 9)
        image += rng.uniform(-40, 40) * np.exp(-((across - a) ** 2 + (along - b) ** 2 + (up - c) ** 2) / (2 * r * r))
    image[((across - 8) / 5) ** 2 + ((along - 5) / 20) ** 2 + ((up - 5) / 8) ** 2 <= 1] = 30  # ventricles
    spot = ((u[..., 0] - 25) ** 2 + (along - 10) ** 2 + up**2 <= 7**2) & brain & lesion
    image[spot] = 40
    image[~brain] = 0
    return Head(image.astype(np.float32), spot, brain, geometry, rotation[:, 0], np.array(shift, float))


def _centroid_mm(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    return np.asarray(geometry.origin) + np.argwhere(mask).mean(0) * np.asarray(geometry.spacing)


# ---------------------------------------------------------------------------- the registered mirror
def test_the_mirror_of_a_lesion_lands_on_the_contralateral_side_within_one_voxel() -> None:
    head = synthetic_head()
    fit = fit_mirror(head.image, head.brain, head.geometry)
    assert fit.found and fit.converged and fit.correlation >= MIN_CORRELATION
    mirrored = apply_mirror(head.lesion[None].astype(np.float32), head.geometry, fit)[0] > 0.5
    centre = _centroid_mm(head.lesion, head.geometry)
    expected = centre - 2 * (head.normal @ (centre - head.point)) * head.normal  # reflected across the true plane
    error_voxels = np.abs(_centroid_mm(mirrored, head.geometry) - expected) / np.asarray(head.geometry.spacing)
    assert error_voxels.max() <= 1.0, error_voxels
    assert abs(mirrored.sum() - head.lesion.sum()) <= 0.15 * head.lesion.sum()  # moved, not smeared
    # the plane read off the fit is the true one
    true_tilt = np.degrees(np.arccos(head.normal[0]))
    middle = np.asarray(fit.image_center)
    assert fit.tilt_degrees == pytest.approx(true_tilt, abs=1.0)
    assert fit.shift_mm == pytest.approx(head.normal @ (head.point - middle), abs=1.0)
    assert np.degrees(np.arccos(abs(np.dot(fit.plane_normal, head.normal)))) < 1.0


def test_a_lesion_free_symmetric_phantom_gives_a_difference_near_zero() -> None:
    head = synthetic_head(lesion=False)
    data = head.image[None]
    out, record = add_mirror_channels(data, head.brain, head.geometry, Symmetry(difference=True))
    assert out.shape == (3, *head.image.shape) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], head.image)
    np.testing.assert_allclose(out[2], out[0] - out[1])
    # Inside the brain, two voxels away from the hard edges (brain border, ventricles) that linear interpolation
    # of a tilted grid cannot reproduce, the difference is a small fraction of the brain's contrast ...
    edges = ndimage.binary_dilation(np.abs(head.image - 30) < 1, iterations=2)
    inner = ndimage.binary_erosion(head.brain, iterations=2) & ~edges
    contrast = head.image[head.brain].std()
    registered = np.abs(out[2][inner]).mean() / contrast
    assert registered < 0.03, registered
    # ... and a tenth of what a flip across the grid's centre, without registration, leaves
    flipped = np.abs(head.image - np.flip(head.image, 0))[inner].mean() / contrast
    assert registered < 0.1 * flipped, (registered, flipped)
    assert record["found"]


def test_fits_are_reproducible_and_survive_json() -> None:
    head = synthetic_head(spacing=4.0)
    first, second = (fit_mirror(head.image, head.brain, head.geometry) for _ in range(2))
    assert (first.angles, first.translation, first.center) == (second.angles, second.translation, second.center)
    again = MirrorFit.from_json(read_json_like(first.to_json()))
    np.testing.assert_array_equal(
        apply_mirror(head.image[None], head.geometry, again), apply_mirror(head.image[None], head.geometry, first)
    )


def read_json_like(record: dict) -> dict:
    """The record as it comes back from a JSON file."""
    import json

    return json.loads(json.dumps(record))


@pytest.mark.parametrize("spacing", [2.0, 4.0])
def test_whole_brain_scans_down_to_4mm_find_the_plane(spacing: float) -> None:
    head = synthetic_head(spacing=spacing)
    fit = fit_mirror(head.image, head.brain, head.geometry)
    assert fit.found
    # the fingerprint judges the plane on healthy tissue: leaving the lesion and its mirror image out raises the
    # correlation and leaves the fit as it was
    judged = fit_mirror(head.image, head.brain, head.geometry, ignore=head.lesion)
    assert judged.correlation > fit.correlation and judged.angles == fit.angles


def test_an_asymmetric_random_volume_finds_no_plane() -> None:
    image = _asymmetric_volume(np.random.default_rng(1))
    geometry = Geometry(image.shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    fit = fit_mirror(image, image != 0, geometry)
    assert not fit.found and fit.correlation < MIN_CORRELATION


def test_the_grid_of_cropped_resampled_data_keeps_world_positions() -> None:
    geometry = Geometry((40, 50, 30), (1.0, 1.0, 2.0), (5.0, -3.0, 1.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))
    grid = grid_geometry(geometry, [(4, 24), (10, 50), (0, 30)], (10, 20, 30))
    assert grid.spacing == (2.0, 2.0, 2.0)
    # the first new voxel covers old voxels 4-5 (x) and 10-11 (y): its centre lies half an old voxel beyond 4, 10
    direction = np.asarray(geometry.direction).reshape(3, 3)
    expected = np.asarray(geometry.origin) + direction @ np.array([4.5, 10.5, 0.0])
    np.testing.assert_allclose(grid.origin, expected)


def _asymmetric_volume(rng: np.random.Generator, shape=(40, 48, 40)) -> np.ndarray:
    """Smoothed noise in a box: no mid-sagittal plane."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    noise[:, :, :] += np.linspace(0, 2, shape[0])[:, None, None] * noise.std()  # a left-right ramp
    image = (100 + 50 * noise / noise.std()).astype(np.float32)
    image[:3], image[-3:] = 0, 0
    return image


# ---------------------------------------------------------------------------- plans
def _write_random_dataset(folder: Path, cases: int = 3) -> None:
    rng = np.random.default_rng(0)
    for index in range(cases):
        image = _asymmetric_volume(rng)
        label = np.zeros(image.shape, np.uint8)
        label[10:16, 20:26, 18:24] = 1
        geometry = Geometry(image.shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
        write_image(image, geometry, folder / "imagesTr" / f"noise_{index:03d}_0000.nii.gz")
        write_image(label, geometry, folder / "labelsTr" / f"noise_{index:03d}.nii.gz")
    write_json(
        {
            "channel_names": {"0": "T1"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": cases,
            "file_ending": ".nii.gz",
        },
        folder / "dataset.json",
    )


def test_brains_get_3d_resunet_sym_with_its_reason_and_the_mirror_is_stored(tiny_atlas: Path) -> None:
    result = plan_and_preprocess("ATLASTiny", progress=False)
    plans = result.plans
    plain, symmetric = plans.configuration("3d_resunet"), plans.configuration("3d_resunet_sym")
    assert plans.default_configuration == "3d_resunet"
    assert symmetric.symmetry == Symmetry(reference_channel=0, difference=False, in_plane=False)
    assert symmetric.input_channels(len(plans.channels)) == 2 * len(plans.channels)
    assert len(symmetric.normalization) == len(plans.channels)  # the mirror is made from the normalized channel
    assert symmetric.data_identifier == "3d_resunet_sym" != plain.data_identifier
    assert "a mid-sagittal plane is found" in plans.reasons["symmetry"]
    assert "4 of 4 cases" in symmetric.reasons["symmetry"] and "2 channels" in symmetric.reasons["symmetry"]
    fingerprint = read_json(result.fingerprint_path)
    assert fingerprint["aggregate"]["symmetry"]["share_found"] == 1.0
    assert all(case["symmetry"]["found"] for case in fingerprint["cases"].values())
    folder = result.plans_path.parent / symmetric.data_identifier
    data, seg, properties = load_case(folder, "atlas_0001", mmap=False)
    plain_data = load_case(result.plans_path.parent / plain.data_identifier, "atlas_0001", mmap=False)[0]
    assert data.shape == (2, *plain_data.shape[1:])
    np.testing.assert_array_equal(data[0], plain_data[0])
    fit = properties.symmetry
    assert fit["found"] and fit["flip_axis"] == 0 and len(fit["plane_normal"]) == 3 and fit["tilt_degrees"] < 5

    # the mirror computed for a new scan at prediction time is the stored one
    case = find_input_cases(tiny_atlas / "imagesTr" / "atlas_0001_0000.nii.gz", 1)[0]
    images, geometry = read_case(case)
    predicted, _, predicted_properties = preprocess_arrays(images, None, geometry, symmetric)
    np.testing.assert_array_equal(predicted, data)
    assert predicted_properties.symmetry["angles"] == fit["angles"]


def test_a_non_brain_asymmetric_dataset_gets_no_symmetric_configuration_and_says_why(data_roots: Path) -> None:
    _write_random_dataset(data_roots / "raw" / "Dataset905_Noise")
    plans = plan_and_preprocess("Noise", progress=False).plans
    assert set(plans.configurations) == {"3d_resunet"}
    reason = plans.reasons["symmetry"]
    assert reason.startswith("no symmetric configuration") and "0 of 3 cases" in reason and "below the 90%" in reason


def test_an_invalid_reference_channel_is_named(tiny_atlas: Path, data_roots: Path) -> None:
    plan_and_preprocess("ATLASTiny", progress=False)
    path = data_roots / "preprocessed" / tiny_atlas.name / "plans.json"
    plans = read_json(path)
    plans["configurations"]["3d_resunet_sym"]["symmetry"]["reference_channel"] = 3
    write_json(plans, path)
    with pytest.raises(ValueError, match="3d_resunet_sym.symmetry.reference_channel: must name one of the 1 channels"):
        Plans.from_json(path)


# ---------------------------------------------------------------------------- train and predict
def test_train_and_predict_with_3d_resunet_sym_write_masks_in_the_input_geometry(
    data_roots: Path, tmp_path: Path
) -> None:
    raw = make_atlas_like(data_roots / "raw" / "Dataset962_ATLASSym", num_cases=5, seed=0, tiny=True, progress=False)
    plan_and_preprocess("ATLASSym", progress=False, configurations=["3d_resunet_sym"])
    path = data_roots / "preprocessed" / raw.name / "plans.json"
    plans = Plans.from_json(path)
    configuration = tiny_configuration(
        plans.configuration("3d_resunet_sym"), (4, 8), (16, 16, 16), 2, iterations_per_epoch=2, mirror_axes=(0,)
    )
    dataclasses.replace(plans, configurations={**plans.configurations, configuration.name: configuration}).to_json(path)
    assert (
        train_main(
            ["-d", "ATLASSym", "-c", "3d_resunet_sym", "-f", "0", "--val-iters", "1", "-np", "0", "--device", "cpu"]
        )
        == 0
    )
    run = data_roots / "results" / raw.name / "3d_resunet_sym" / "ResidualUNetTrainer" / "fold_0"
    assert (run / "checkpoint_final.pth").is_file() and (run / "validation" / "summary.json").is_file()
    source = raw / "imagesTr" / "atlas_0002_0000.nii.gz"
    output = tmp_path / "predicted"
    assert (
        predict_main(
            [
                "-i",
                str(source),
                "-o",
                str(output),
                "-d",
                "ATLASSym",
                "-c",
                "3d_resunet_sym",
                "--tta",
                "none",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    labels, geometry = read_image(output / "atlas_0002.nii.gz", np.uint8)
    assert not geometry.differences(read_header(source)[0]) and set(np.unique(labels)) <= {0, 1}
