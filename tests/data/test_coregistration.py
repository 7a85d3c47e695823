"""Channel co-registration (``autoseg.data.coregistration``): a channel on another grid, moved by a known rigid
transform, is brought back within a voxel; the fit is deterministic; registrations that cannot work fail in one line.

The phantom (``conftest.brain_phantom``) is defined in world millimetres, so each channel is sampled exactly on its
own oblique, anisotropic grid, and the truth is known independently of any registration: the moving channel shows
at voxel ``y`` the phantom at ``Q(y) = R y + t``, so the transform that brings it back is ``Q⁻¹(x) = Rᵀ (x - t)``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import (
    grid_points,
    oblique_geometry,
    phantom_lesion,
    rotation_matrix,
    sample_phantom,
    tiny_configuration,
)

from autoseg.api.plan import plan_and_preprocess
from autoseg.api.predict_inputs import find_input_cases, read_case
from autoseg.commands.plan import main as plan_main
from autoseg.commands.predict import main as predict_main
from autoseg.commands.train import main as train_main
from autoseg.data.coregistration import (
    ChannelFit,
    RegistrationError,
    coregister_channels,
    register_channel,
    resample_channel,
)
from autoseg.data.dataset import DatasetError, find_dataset
from autoseg.data.verify import VerificationError, check_dataset
from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image, write_image
from autoseg.io.typed_json import from_plain, to_plain
from autoseg.plan.fingerprint import Fingerprint
from autoseg.plans import Plans, PlansError
from autoseg.preprocess.cases import load_case
from autoseg.preprocess.preprocessing import preprocess_arrays

#: The reference (DWI-like) grid: 3.5 x 3.5 x 5 mm voxels, tilted by a few degrees; the moving (FLAIR-like) grid:
#: finer, another field of view and another oblique orientation.
REFERENCE = oblique_geometry((40, 46, 24), (3.5, 3.5, 5.0), (4, -3, 6))
MOVING = oblique_geometry((56, 60, 40), (2.5, 2.6, 3.3), (-8, 5, -12), center=(3, -4, 2))
MOTIONS = {
    "7 degrees (3, -4, 5), 7 mm (4, -3, 5)": ((3.0, -4.0, 5.0), (4.0, -3.0, 5.0)),
    "6 degrees about z, 8 mm along x": ((0.0, 0.0, 6.0), (8.0, 0.0, 0.0)),
    "2.7 degrees (-2, 1.5, -1), 2.7 mm (-1, 2, -1.5)": ((-2.0, 1.5, -1.0), (-1.0, 2.0, -1.5)),
}


def moved_channel(degrees, shift, geometry=MOVING):
    """The FLAIR-contrast phantom on ``geometry`` with the head moved by the rigid transform (R, t)."""
    rotation, translation = rotation_matrix(degrees), np.asarray(shift, float)
    return sample_phantom(geometry, "flair", (rotation, translation)), rotation, translation


@pytest.mark.parametrize("motion", MOTIONS)
def test_a_channel_moved_by_a_known_rigid_transform_is_brought_back_within_a_voxel(motion: str) -> None:
    degrees, shift = MOTIONS[motion]
    reference = sample_phantom(REFERENCE, "dwi")
    moving, rotation, translation = moved_channel(degrees, shift)
    fit = register_channel(reference, REFERENCE, moving, MOVING, 1)

    # The fitted transform against the known one, at every brain voxel of the reference grid (computed with numpy).
    points = grid_points(REFERENCE)[reference.ravel() > 0]
    truth = (points - translation) @ rotation  # Q⁻¹(x) = Rᵀ (x - t), row by row
    transform = fit.transform()
    fitted = np.array([transform.TransformPoint(tuple(point)) for point in points[::5]])
    error = np.linalg.norm(fitted - truth[::5], axis=1)
    smallest_voxel = min(REFERENCE.spacing)
    assert error.max() < 1.0 < smallest_voxel, f"{error.max():.2f} mm off"
    # The recorded summary agrees with the truth: the rotation angle of Rᵀ and how far the centre moves.
    true_angle = np.degrees(np.arccos((np.trace(rotation) - 1) / 2))
    center = np.asarray(fit.center)
    assert fit.rotation_degrees == pytest.approx(true_angle, abs=0.5)
    assert fit.shift_mm == pytest.approx(np.linalg.norm((center - translation) @ rotation - center), abs=1.0)
    assert fit.converged and fit.overlap > 0.5 and 0 < fit.iterations < 200 and fit.metric < 0

    # The resampled channel is the FLAIR phantom on the reference grid, as if it had been acquired there.
    resampled = resample_channel(moving, MOVING, fit, REFERENCE)
    expected = sample_phantom(REFERENCE, "flair")
    brain = (reference > 0) & (resampled > 0)
    assert np.corrcoef(resampled[brain], expected[brain])[0, 1] > 0.99
    headers_only = dataclasses.replace(fit, angles=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0))
    by_headers = resample_channel(moving, MOVING, headers_only, REFERENCE)
    registered = np.abs(resampled - expected)[brain].mean()
    unregistered = np.abs(by_headers - expected)[brain].mean()
    assert registered < 0.3 * unregistered, (registered, unregistered)


def test_the_fit_is_the_same_whatever_the_thread_count_and_survives_json() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["7 degrees (3, -4, 5), 7 mm (4, -3, 5)"])
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    fits = []
    try:
        for count in (1, 2, 8):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
            fits.append(register_channel(reference, REFERENCE, moving, MOVING, 1))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    assert fits[1] == fits[0] and fits[2] == fits[0], "bit for bit, every field"
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads
    assert from_plain(ChannelFit, to_plain(fits[0]), "") == fits[0]


def test_channels_on_the_reference_grid_are_kept_and_others_moved() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    adc = sample_phantom(REFERENCE, "adc")
    flair, _, _ = moved_channel(*MOTIONS["2.7 degrees (-2, 1.5, -1), 2.7 mm (-1, 2, -1.5)"])
    images, fits = coregister_channels([reference, adc, flair], [REFERENCE, REFERENCE, MOVING])
    assert images.shape == (3, *REFERENCE.shape) and images.dtype == np.float32
    np.testing.assert_array_equal(images[0], reference)
    np.testing.assert_array_equal(images[1], adc)
    assert [fit.channel for fit in fits] == [2]
    np.testing.assert_array_equal(images[2], resample_channel(flair, MOVING, fits[0], REFERENCE))


def test_a_channel_that_does_not_overlap_the_reference_fails_in_one_line() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["2.7 degrees (-2, 1.5, -1), 2.7 mm (-1, 2, -1.5)"])
    elsewhere = dataclasses.replace(MOVING, origin=tuple(np.asarray(MOVING.origin) + (400.0, 0.0, 0.0)))
    with pytest.raises(RegistrationError) as raised:
        coregister_channels([reference, moving], [REFERENCE, elsewhere], ["in/c_0000.nii.gz", "in/c_0001.nii.gz"])
    message = str(raised.value)
    assert message.startswith("in/c_0001.nii.gz: registration onto c_0000.nii.gz failed: too little overlap")
    assert "covers 0% of channel 0's non-zero region (at least 50% needed)" in message and "\n" not in message
    assert raised.value.file == "in/c_0001.nii.gz"


def test_a_registration_that_does_not_converge_fails_in_one_line() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["7 degrees (3, -4, 5), 7 mm (4, -3, 5)"])
    with pytest.raises(RegistrationError, match=r"^no convergence: the optimizer reached its limit of 3 iterations"):
        register_channel(reference, REFERENCE, moving, MOVING, 1, iterations=3)


def test_nan_voxels_and_an_empty_reference_are_refused() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["2.7 degrees (-2, 1.5, -1), 2.7 mm (-1, 2, -1.5)"])
    moving[0, 0, 0] = np.nan
    with pytest.raises(RegistrationError, match="channel 1 has 1 NaN/Inf voxel"):
        register_channel(reference, REFERENCE, moving, MOVING, 1)
    with pytest.raises(RegistrationError, match="channel 0 is zero everywhere"):
        register_channel(np.zeros_like(reference), REFERENCE, np.nan_to_num(moving), MOVING, 1)


# ------------------------------------------------------------------------------------------------
# A dataset that declares coregister_channels: verification, planning, preprocessing, training, prediction
# ------------------------------------------------------------------------------------------------

#: DWI-like channel 0 and its mask on one grid (5 x 5 x 8 mm), FLAIR-like channel 1 on its own oblique grid.
DWI_GRID = oblique_geometry((28, 32, 16), (5.0, 5.0, 8.0), (2, 0, -3), center=(1, -2, 3))
FLAIR_GRID = oblique_geometry((40, 44, 18), (3.5, 3.5, 7.0), (-6, 4, 8), center=(-2, 3, -5))
NAME = "Dataset940_CoregTiny"


def case_motion(index: int) -> tuple[np.ndarray, np.ndarray]:
    """How case ``index``'s head moved between its two sequences."""
    return rotation_matrix((1.0 + index, -1.5 * index, 2.0)), np.array([3.0 - index, 1.5 * index, -2.0])


def write_case(folder: Path, split: str, identifier: str, index: int, flair_grid: Geometry = FLAIR_GRID) -> None:
    """Case ``identifier``: channel 0 (DWI contrast) and its lesion mask on ``DWI_GRID``, channel 1 (FLAIR contrast)
    on ``flair_grid`` with the head moved by :func:`case_motion`; the lesion lies a little elsewhere in each case."""
    lesion_center = (28.0 - 5 * index, -20.0 + 3 * index, 15.0)
    write_image(
        sample_phantom(DWI_GRID, "dwi", None, lesion_center),
        DWI_GRID,
        folder / f"images{split}" / f"{identifier}_0000.nii.gz",
    )
    flair = sample_phantom(flair_grid, "flair", case_motion(index), lesion_center)
    write_image(flair, flair_grid, folder / f"images{split}" / f"{identifier}_0001.nii.gz")
    if split == "Tr":
        lesion = phantom_lesion(grid_points(DWI_GRID), lesion_center).reshape(DWI_GRID.shape).astype(np.uint8)
        write_image(lesion, DWI_GRID, folder / "labelsTr" / f"{identifier}.nii.gz")


def make_coregistered_dataset(root: Path, cases: int = 5, declare: bool | str = True) -> Path:
    """``cases`` training cases (:func:`write_case`) and one test case ``new``, under ``root/raw/NAME``;
    ``dataset.json`` declares ``"coregister_channels": declare`` (left out when False)."""
    folder = root / "raw" / NAME
    for index in range(cases):
        write_case(folder, "Tr", f"case{index}", index)
    write_case(folder, "Ts", "new", cases)
    description = {"channel_names": {"0": "DWI", "1": "FLAIR"}, "labels": {"background": 0, "lesion": 1}}
    description.update(
        file_ending=".nii.gz", numTraining=cases, **({"coregister_channels": declare} if declare else {})
    )
    write_json(description, folder / "dataset.json")
    return folder


def test_verification_registers_a_channel_on_another_grid_only_when_the_dataset_declares_it(
    data_roots: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = make_coregistered_dataset(data_roots, cases=2)
    assert plan_main(["-d", NAME, "--verify", "--no-progress"]) == 0
    report = check_dataset(find_dataset(NAME), progress=False)
    assert [case.identifier for case in report.cases] == ["case0", "case1"]

    # A FLAIR that lies 300 mm away from its DWI: the file named, the reason in one line.
    elsewhere = dataclasses.replace(FLAIR_GRID, origin=tuple(np.asarray(FLAIR_GRID.origin) + (0.0, 300.0, 0.0)))
    write_case(folder, "Tr", "case1", 1, flair_grid=elsewhere)
    capsys.readouterr()
    assert plan_main(["-d", NAME, "--verify", "--no-progress"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: 1 problem(s) found:"
    assert lines[1].startswith(
        f"case case1: {folder / 'imagesTr' / 'case1_0001.nii.gz'}: registration onto channel 0 (case1_0000.nii.gz) "
        "failed: too little overlap: by the headers its field of view covers 0% of channel 0's non-zero region"
    )

    # Without the declaration, channels on different grids are a problem as before.
    description = read_json(folder / "dataset.json")
    del description["coregister_channels"]
    write_json(description, folder / "dataset.json")
    problems = [str(p) for p in pytest.raises(VerificationError, check_dataset, find_dataset(NAME)).value.problems]
    assert len(problems) == 2 * 4 and all("disagrees with channel 0 (channel 0 vs this file)" in p for p in problems)


def test_a_declaration_that_is_not_true_or_false_is_refused(data_roots: Path) -> None:
    make_coregistered_dataset(data_roots, cases=1, declare="yes")
    with pytest.raises(
        DatasetError, match=r"dataset.json: 'coregister_channels' must be true or false, found a string"
    ):
        find_dataset(NAME)


@pytest.mark.usefixtures("one_torch_thread")
def test_plan_train_and_predict_register_the_channel_the_same_way(
    data_roots: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = make_coregistered_dataset(data_roots)
    result = plan_and_preprocess(NAME, progress=False, configurations=["3d_aniso"])
    plans = result.plans
    assert plans.coregister_channels
    assert "5 of 5 training cases had a channel moved" in plans.reasons["coregister_channels"]
    fingerprint = Fingerprint.from_json(result.fingerprint_path)
    configuration = plans.configuration("3d_aniso")
    data = data_roots / "preprocessed" / NAME / configuration.data_identifier
    for index in range(5):
        identifier = f"case{index}"
        stored, _, properties = load_case(data, identifier)
        # CASE.json records the fit; it is the fingerprint's (the same code on the same files, bit for bit) and the
        # known motion undone, within a millimetre over the brain.
        (fit,) = properties.coregistration
        assert fingerprint.cases[identifier].coregistration == (fit,)
        rotation, shift = case_motion(index)
        reference, grid = read_image(folder / "imagesTr" / f"{identifier}_0000.nii.gz")
        points = grid_points(grid)[reference.ravel() > 0][::4]
        mapped = np.array([fit.transform().TransformPoint(tuple(p)) for p in points])
        assert np.linalg.norm(mapped - (points - shift) @ rotation, axis=1).max() < 1.0
        # Prediction reads a case with the same code: its preprocessed input is the stored training array.
        images, geometry = read_case(find_input_cases(folder / "imagesTr" / f"{identifier}_0000.nii.gz", 2)[0], True)
        again, _, _ = preprocess_arrays(images, None, geometry, configuration)
        np.testing.assert_array_equal(again, stored)

    # --preprocess-only with plans that disagree with dataset.json is refused.
    description = read_json(folder / "dataset.json")
    write_json({**description, "coregister_channels": False}, folder / "dataset.json")
    with pytest.raises(PlansError, match="coregister_channels is true but .*dataset.json declares false"):
        plan_and_preprocess(NAME, progress=False, preprocess_only=True)
    write_json(description, folder / "dataset.json")

    path = data_roots / "preprocessed" / NAME / "plans.json"
    tiny = tiny_configuration(configuration, (4, 8), (16, 16, 16), 2, mirror_axes=(0,))
    dataclasses.replace(plans, configurations={tiny.name: tiny}, default_configuration=tiny.name).to_json(path)
    training = ["-d", NAME, "-c", "3d_aniso", "-f", "0", "--val-iters", "1", "-np", "0", "--device", "cpu"]
    assert train_main(training) == 0
    new = folder / "imagesTs"
    output = tmp_path / "predicted"
    predicting = ["-i", str(new), "-o", str(output), "-d", NAME, "--tta", "none", "--device", "cpu", "--no-progress"]
    assert predict_main(predicting) == 0
    labels, geometry = read_image(output / "new.nii.gz", np.uint8)
    assert not geometry.differences(read_image(new / "new_0000.nii.gz")[1])  # on channel 0's grid

    # The same model told it was trained without co-registration refuses the case, saying why; beside a member
    # trained with it (a copy under another trainer's name), it is refused as a member.
    trainers = data_roots / "results" / NAME / "3d_aniso"
    shutil.copytree(trainers / "ResidualUNetTrainer", trainers / "AcuteStrokeTrainer")
    run = trainers / "ResidualUNetTrainer" / "fold_0" / "plans.json"
    dataclasses.replace(Plans.from_json(run), coregister_channels=False).to_json(run)
    capsys.readouterr()
    assert predict_main([*predicting, "-tr", "ResidualUNetTrainer", "AcuteStrokeTrainer"]) == 1
    assert (
        "error: members ['3d_aniso/AcuteStrokeTrainer'] were trained with channel co-registration (coregister_channels "
        "in their plans.json), the others without" in capsys.readouterr().err
    )
    shutil.rmtree(trainers / "AcuteStrokeTrainer")
    assert predict_main([*predicting, "--overwrite"]) == 1
    assert "new_0001.nii.gz lies on another grid than new_0000.nii.gz" in capsys.readouterr().err
    assert (
        "trained without channel co-registration"
        in read_json(output / "prediction_summary.json")["failed"][0]["problem"]
    )


def test_what_itk_refuses_is_its_reason_in_one_line() -> None:
    slab = oblique_geometry((40, 46, 2), (3.5, 3.5, 5.0), (0, 0, 0))  # two slices: ITK's smoothing needs four
    moving, _, _ = moved_channel(*MOTIONS["2.7 degrees (-2, 1.5, -1), 2.7 mm (-1, 2, -1.5)"])
    with pytest.raises(RegistrationError) as raised:
        register_channel(sample_phantom(slab, "dwi"), slab, moving, MOVING, 1)
    assert str(raised.value) == (
        "ITK could not register it: The number of pixels along dimension 2 is less than 4. This filter requires a "
        "minimum of four pixels along the dimension to be processed"
    )
