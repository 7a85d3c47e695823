"""Prediction with trained models (``autoseg_predict``) and model selection (``autoseg_find_best``).

One tiny model is trained once for the session (conftest ``tiny_model_home``: 5 tiny ATLAS-like cases, a 3-level U-Net
with 4-16 features, one iteration on folds 0 and 1, with the end-of-fold validation); each test copies it into its own
data roots.
"""

from __future__ import annotations

import dataclasses
import shutil
import tracemalloc
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import HOSTILE_HEADERS

from autoseg.api.predict import PredictionOptions, _choose_device, _ensemble, predict
from autoseg.api.predict_inputs import find_input_cases, read_case_list
from autoseg.api.predict_models import ModelChoice, load_model
from autoseg.api.select import THRESHOLDS, find_best
from autoseg.api.train import TrainingOptions
from autoseg.commands.common import run
from autoseg.commands.find_best import main as find_best_main
from autoseg.commands.predict import main as predict_main
from autoseg.commands.predict import parser as predict_parser
from autoseg.errors import InvalidFileError
from autoseg.infer.postprocessing import postprocess_probabilities
from autoseg.io.checkpoints import load_checkpoint, save_checkpoint
from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry, left_right_axis
from autoseg.io.images import read_image, write_image
from autoseg.networks import AsymmetricResidualUNet
from autoseg.plans import Plans
from trainers import get_trainer

NAME = "Dataset961_ATLASPredict"  # what conftest's tiny_model_home trains, with TRAINER
TRAINER = "ResidualUNetTrainer"
CONFIGURATION = "3d_resunet"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(trained_home: Path) -> Path:
    """This test's AUTOSEG_HOME holding a copy of the session's tiny model (conftest ``tiny_model_home``)."""
    return trained_home


def _images(home: Path) -> Path:
    return home / "raw" / NAME / "imagesTr"


def _geometry(path: Path) -> Geometry:
    return read_image(path)[1]


def _same_geometry(a: Geometry, b: Geometry) -> bool:
    return a.shape == b.shape and not a.differences(b, tolerance=1e-6)


QUIET = dict(device="cpu", progress=False)


# ---------------------------------------------------------------------------- inputs
def _touch_images(folder: Path, *names: str) -> None:
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for name in names:
        write_image(np.zeros((4, 4, 4), np.float32), geometry, folder / name)


def test_input_folder_in_dataset_naming_and_plain_names(tmp_path: Path) -> None:
    _touch_images(tmp_path / "named", "b_0000.nii.gz", "b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz")
    cases = find_input_cases(tmp_path / "named", 2)
    assert [c.identifier for c in cases] == ["a", "b"]
    assert [p.name for p in cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    # one channel: such sets are refused (tests/api/test_input_checks.py); as separate scans, every file is one case,
    # a final _0000 dropped from its name
    assert [c.identifier for c in find_input_cases(tmp_path / "named", 1, one_case_per_file=True)] == [
        "a",
        "a_0001",
        "b",
        "b_0001",
    ]
    with pytest.raises(ValueError, match="4 file\\(s\\) break the naming rule for a model with 3 channel") as error:
        find_input_cases(tmp_path / "named", 3)
    assert "a_0000.nii.gz: case a is incomplete: expected a_0000.nii.gz, a_0001.nii.gz, a_0002.nii.gz" in str(
        error.value
    )
    _touch_images(tmp_path / "plain", "scan.mha", "other.nii")
    cases = find_input_cases(tmp_path / "plain", 1)
    assert [(c.identifier, c.ending) for c in cases] == [("other", ".nii"), ("scan", ".mha")]
    with pytest.raises(ValueError, match="scan.mha: not named CASE_XXXX"):
        find_input_cases(tmp_path / "plain", 2)
    single = find_input_cases(tmp_path / "named" / "b_0000.nii.gz", 2)
    assert [p.name for p in single[0].images] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    assert [c.identifier for c in find_input_cases(tmp_path / "named" / "b_0001.nii.gz", 1)] == ["b_0001"]


def test_plain_names_ending_in_digits_are_one_case_each_for_a_one_channel_model(tmp_path: Path) -> None:
    names = ["sub_0001.nii.gz", "scan_0002.nii.gz", "sub_0003.mha", "CASE_0000.nii.gz", "x_12.nii", "y_00001.nii.gz"]
    _touch_images(tmp_path, *names)
    cases = find_input_cases(tmp_path, 1)
    assert [(c.identifier, c.images[0].name) for c in cases] == [
        ("CASE", "CASE_0000.nii.gz"),
        ("scan_0002", "scan_0002.nii.gz"),
        ("sub_0001", "sub_0001.nii.gz"),
        ("sub_0003", "sub_0003.mha"),
        ("x_12", "x_12.nii"),
        ("y_00001", "y_00001.nii.gz"),
    ]
    assert [c.identifier for c in find_input_cases(tmp_path / "sub_0001.nii.gz", 1)] == ["sub_0001"]
    _touch_images(tmp_path, "CASE.mha")  # would be case CASE as well
    with pytest.raises(ValueError, match="CASE.mha, CASE_0000.nii.gz: the same case CASE more than once"):
        find_input_cases(tmp_path, 1)


def test_files_that_do_not_form_complete_cases_are_listed_for_a_multi_channel_model(tmp_path: Path) -> None:
    _touch_images(tmp_path, "a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz", "b_0001.nii.gz", "sub_7.nii.gz")
    with pytest.raises(ValueError) as error:
        find_input_cases(tmp_path, 2)
    lines = str(error.value).splitlines()
    assert lines[0] == (
        f"{tmp_path}: 3 file(s) break the naming rule for a model with 2 channel(s) (each case is 2 "
        "files CASE_0000 ... CASE_0001, one per channel):"
    )
    assert lines[1:] == [
        "  a_0002.nii.gz: channel 2, but the model's channels are 0-1",
        "  sub_7.nii.gz: not named CASE_XXXX (XXXX the channel, 0000-0001)",
        "  b_0001.nii.gz: case b is incomplete: expected b_0000.nii.gz, b_0001.nii.gz",
    ]


# ---------------------------------------------------------------------------- prediction
def test_predict_folder_keeps_the_input_geometry(home: Path, tmp_path: Path) -> None:
    written = predict(
        _images(home), tmp_path / "out", options=PredictionOptions(**QUIET, save_probabilities=True)
    ).written
    sources = sorted(_images(home).glob("*_0000.nii.gz"))
    assert [p.name for p in written] == [p.name.replace("_0000", "") for p in sources]
    for source, target in zip(sources, written):
        labels, geometry = read_image(target, np.uint8)
        assert _same_geometry(geometry, _geometry(source))
        assert set(np.unique(labels)) <= {0, 1}
        probabilities, geometry = read_image(target.parent / target.name.replace(".nii.gz", "_probabilities.nii.gz"))
        assert _same_geometry(geometry, _geometry(source)) and 0 <= probabilities.min() <= probabilities.max() <= 1


def test_predict_single_plain_oblique_file_keeps_its_geometry(home: Path, tmp_path: Path) -> None:
    array, geometry = read_image(sorted(_images(home).glob("*_0000.nii.gz"))[0])
    angle = np.deg2rad(20)
    oblique = dataclasses.replace(
        geometry,
        origin=(10.0, -5.0, 3.0),
        direction=(np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0),
    )
    write_image(array, oblique, tmp_path / "in" / "patient.mha")
    assert (
        predict_main(
            [
                "-i",
                str(tmp_path / "in" / "patient.mha"),
                "-o",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--no-progress",
                "--no-tta",
            ]
        )
        == 0
    )
    _, written = read_image(tmp_path / "out" / "patient.mha", np.uint8, canonical=False)
    assert _same_geometry(written, oblique)


def test_the_mask_carries_the_inputs_qform_and_sform_and_a_disagreement_is_warned_once(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A scan whose sform a registration tool moved (10, -5, 3) mm from its qform: both outputs keep both transforms,
    codes and matrices, exactly; one warning names the file and the transform used."""
    source = nibabel.load(str(sorted(_images(home).glob("*_0000.nii.gz"))[0]))
    moved = source.affine.copy()
    moved[:3, 3] += (10.0, -5.0, 3.0)
    scan = nibabel.Nifti1Image(np.asarray(source.dataobj), None, source.header.copy())
    scan.set_sform(moved, 1)
    (tmp_path / "in").mkdir()
    nibabel.save(scan, str(tmp_path / "in" / "moved.nii.gz"))
    assert (
        predict_main(
            [
                "-i",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--no-progress",
                "--no-tta",
                "--save-probabilities",
            ]
        )
        == 0
    )
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "moved.nii.gz: qform (code 1, scanner) and sform (code 1, scanner)" in warnings[0]
    assert "predicts with the sform" in warnings[0]
    given = nibabel.load(str(tmp_path / "in" / "moved.nii.gz")).header
    for name in ("moved.nii.gz", "moved_probabilities.nii.gz"):
        written = nibabel.load(str(tmp_path / "out" / name)).header
        for transform in ("get_qform", "get_sform"):
            matrix, code = getattr(written, transform)(coded=True)
            expected, expected_code = getattr(given, transform)(coded=True)
            assert code == expected_code and np.array_equal(matrix, expected), (name, transform)


def test_permuted_and_flipped_copies_of_a_scan_get_the_same_prediction_in_world_space(
    home: Path, tmp_path: Path, reoriented_copy
) -> None:
    """The same scan stored in four orientations: each output is stored like its input, and all four agree voxel for
    voxel once SimpleITK's DICOMOrient puts them side by side (labels and probabilities)."""
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    stored = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        read_image(source, canonical=False)[1].direction
    )
    codes = ("ASL", "LPI", "PIR")
    (tmp_path / "in").mkdir()
    shutil.copy(source, tmp_path / "in" / "scan.nii.gz")
    for code in codes:
        reoriented_copy(source, tmp_path / "in" / f"scan{code}.nii.gz", code)
    predict(tmp_path / "in", tmp_path / "out", options=PredictionOptions(**QUIET, save_probabilities=True))

    def in_stored_orientation(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), stored))

    labels = in_stored_orientation(tmp_path / "out" / "scan.nii.gz")
    probabilities = in_stored_orientation(tmp_path / "out" / "scan_probabilities.nii.gz")
    assert probabilities.max() > 0
    for code in codes:
        _, written = read_image(tmp_path / "out" / f"scan{code}.nii.gz", canonical=False)
        assert _same_geometry(written, read_image(tmp_path / "in" / f"scan{code}.nii.gz", canonical=False)[1])
        assert np.array_equal(in_stored_orientation(tmp_path / "out" / f"scan{code}.nii.gz"), labels), code
        assert np.array_equal(
            in_stored_orientation(tmp_path / "out" / f"scan{code}_probabilities.nii.gz"), probabilities
        ), code


def test_plain_names_ending_in_digits_on_the_command_line(home: Path, tmp_path: Path) -> None:
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    for name in ("sub_0001.nii.gz", "scan_0002.nii.gz", "sub_0003.nii.gz"):
        shutil.copy(source, tmp_path / name)
    assert (
        predict_main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "--device", "cpu", "--no-progress", "--no-tta"])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [
        "scan_0002.nii.gz",
        "sub_0001.nii.gz",
        "sub_0003.nii.gz",
    ]


def test_incomplete_cases_for_a_multi_channel_model_on_the_command_line(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    one_channel = load_model(NAME, CONFIGURATION)
    two_channels = dataclasses.replace(
        one_channel, plans=dataclasses.replace(one_channel.plans, channels=("T1", "FLAIR"))
    )
    monkeypatch.setattr(
        "autoseg.api.predict_models.load_model", lambda *args, **kwargs: two_channels
    )  # a two-channel model
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    for name in ("x_0000.nii.gz", "x_0001.nii.gz", "y_0000.nii.gz", "sub_0001.nii.gz"):
        shutil.copy(source, tmp_path / name)
    assert predict_main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: 2 file(s) break the naming rule for a model with 2 channel(s)")
    assert "  sub_0001.nii.gz: case sub is incomplete: expected sub_0000.nii.gz, sub_0001.nii.gz" in err
    assert "  y_0000.nii.gz: case y is incomplete: expected y_0000.nii.gz, y_0001.nii.gz" in err
    assert "x_000" not in err and not (tmp_path / "out").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), to show that nothing was written or changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_that_would_overwrite_an_input_are_refused_before_anything_is_written(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Plain-named scans (``scan.nii.gz`` is case ``scan``, whose labels are ``scan.nii.gz``) predicted into their own
    folder, however the folder is spelled, with or without --overwrite and --save-probabilities, and an output that
    is a hard link to an input: refused in one line naming both files; no input is predicted as "already done"."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(sorted(_images(home).glob("*_0000.nii.gz"))[0], scans / "scan.nii.gz")
    write_image(*read_image(scans / "scan.nii.gz", canonical=False), scans / "other.mhd")  # + other.zraw
    (tmp_path / "link").symlink_to(scans)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "scan.nii.gz").hardlink_to(scans / "scan.nii.gz")
    before = _snapshot(tmp_path)
    quiet = ["--device", "cpu", "--no-progress", "--no-tta"]
    attempts = [
        (["-i", str(scans), "-o", str(scans), "--save-probabilities"], scans / "other.mhd"),
        (["-i", str(scans), "-o", str(scans)], scans / "other.mhd"),
        (["-i", str(scans / "scan.nii.gz"), "-o", str(scans), "--overwrite"], scans / "scan.nii.gz"),
        (["-i", str(scans / "other.mhd"), "-o", str(tmp_path / "link"), "--overwrite"], scans / "other.mhd"),
        (["-i", str(scans), "-o", f"{tmp_path}/linked/../scans", "--save-probabilities"], scans / "other.mhd"),
        (["-i", str(scans / "scan.nii.gz"), "-o", str(tmp_path / "linked"), "--overwrite"], scans / "scan.nii.gz"),
    ]
    for arguments, first_input in attempts:
        assert predict_main([*arguments, *quiet]) == 1, arguments
        out, err = capsys.readouterr()
        assert not out and len(err.splitlines()) == 1 and err.startswith("error: output "), err
        assert f"would overwrite the input {first_input}; write the predictions to another folder (-o)" in err, err
        assert _snapshot(tmp_path) == before, arguments


def test_outputs_of_two_cases_that_would_be_the_same_file_are_refused_before_predicting(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Case ``a``'s probability map and case ``a_probabilities``'s labels are both ``a_probabilities.nii.gz``."""
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    for name in ("a.nii.gz", "a_probabilities.nii.gz"):
        shutil.copy(source, tmp_path / name)
    output = tmp_path / "out"
    arguments = ["-i", str(tmp_path), "-o", str(output), "--device", "cpu", "--no-progress", "--no-tta"]
    assert predict_main([*arguments, "--save-probabilities"]) == 1
    out, err = capsys.readouterr()
    assert not out and err == (
        f"error: case a's probability map and case a_probabilities's labels would both be written to "
        f"{output / 'a_probabilities.nii.gz'}; rename one of the cases or predict them into separate folders\n"
    )
    assert not output.exists()
    assert predict_main(arguments) == 0  # without probability maps the names are distinct
    assert sorted(p.name for p in output.iterdir()) == [
        "a.nii.gz",
        "a_lesions.json",
        "a_probabilities.nii.gz",
        "a_probabilities_lesions.json",
        "lesion_table.csv",
        "lesions.csv",
        "prediction_summary.json",
    ]
    capsys.readouterr()
    # two --list runs into one folder: the one with probability maps is refused, whichever runs second
    written = (output / "a_probabilities.nii.gz").read_bytes()
    (tmp_path / "only_a.txt").write_text("a\n")
    listed = [*arguments, "--list", str(tmp_path / "only_a.txt"), "--save-probabilities", "--overwrite"]
    assert predict_main(listed) == 1
    assert "case a's probability map and case a_probabilities's labels would both be written" in capsys.readouterr().err
    assert (output / "a_probabilities.nii.gz").read_bytes() == written


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_outputs_with_a_separate_data_file_stay_readable_when_the_run_is_repeated(
    home: Path, tmp_path: Path, ending: str
) -> None:
    """A .mhd/.nhdr label file names its data file by its final name, so the documented re-run (which removes the
    temporary files of a killed run) skips the case and leaves its outputs readable."""
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    write_image(*read_image(source, canonical=False), tmp_path / "in" / f"scan{ending}")
    output = tmp_path / "out"
    arguments = ["-i", str(tmp_path / "in"), "-o", str(output), "--device", "cpu", "--no-progress", "--no-tta"]
    assert predict_main([*arguments, "--save-probabilities"]) == 0
    data = "scan.zraw" if ending == ".mhd" else "scan.raw.gz"
    expected = [data, f"scan{ending}", "scan_probabilities.nii.gz", "prediction_summary.json", "scan_lesions.json"]
    expected += ["lesions.csv", "lesion_table.csv"]
    assert sorted(p.name for p in output.iterdir()) == sorted(expected)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"scan{ending}")))
    assert read_json(output / "prediction_summary.json")["counts"]["written"] == 1
    assert predict_main([*arguments, "--save-probabilities"]) == 0
    assert read_json(output / "prediction_summary.json")["counts"]["skipped"] == 1
    assert predict_main([*arguments, "--overwrite"]) == 0
    assert sorted(p.name for p in output.iterdir()) == sorted(expected)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"scan{ending}"))), labels)


def test_dataset_choice_without_d(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    assert len(predict(source, tmp_path / "a", ModelChoice(dataset="961"), PredictionOptions(**QUIET)).written) == 1
    shutil.rmtree(home / "results")
    assert predict_main(["-i", str(source), "-o", str(tmp_path / "b"), "--device", "cpu"]) == 1
    assert "name the dataset with -d: 0 trained datasets" in capsys.readouterr().err


def test_existing_outputs_are_skipped_unless_overwrite(home: Path, tmp_path: Path) -> None:
    first = predict(_images(home), tmp_path, options=PredictionOptions(**QUIET, use_mirroring=False)).written
    assert len(first) == 5
    write_image(
        np.full((2, 2, 2), 7, np.uint8),
        Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
        first[0],
    )
    assert predict(_images(home), tmp_path, options=PredictionOptions(**QUIET, use_mirroring=False)).written == []
    assert read_image(first[0], np.uint8)[0].shape == (2, 2, 2)
    assert (
        len(
            predict(
                _images(home), tmp_path, options=PredictionOptions(**QUIET, use_mirroring=False, overwrite=True)
            ).written
        )
        == 5
    )
    assert read_image(first[0], np.uint8)[0].shape != (2, 2, 2)


def test_parts_partition_the_cases(home: Path, tmp_path: Path) -> None:
    parts = [
        predict(
            _images(home), tmp_path, options=PredictionOptions(**QUIET, use_mirroring=False, num_parts=2, part_id=k)
        )
        for k in (0, 1)
    ]
    names = [{p.name for p in part.written} for part in parts]
    assert names[0] and names[1] and not names[0] & names[1] and len(names[0] | names[1]) == 5
    with pytest.raises(ValueError, match="part-id"):
        predict(_images(home), tmp_path, options=PredictionOptions(**QUIET, num_parts=2, part_id=2))


def test_fold_ensemble_is_the_mean_of_the_folds(home: Path, tmp_path: Path) -> None:
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    probabilities = {}
    for name, folds in (("both", None), ("f0", [0]), ("f1", [1])):
        predict(source, tmp_path / name, ModelChoice(folds=folds), PredictionOptions(save_probabilities=True, **QUIET))
        probabilities[name] = read_image(tmp_path / name / f"{case}_probabilities.nii.gz")[0]
    assert not np.allclose(probabilities["f0"], probabilities["f1"])
    np.testing.assert_allclose(probabilities["both"], (probabilities["f0"] + probabilities["f1"]) / 2, atol=1e-6)


def test_trainer_ensemble_is_the_mean_of_the_trainers(home: Path, tmp_path: Path) -> None:
    runs = home / "results" / NAME / CONFIGURATION
    shutil.copytree(runs / TRAINER / "fold_1", runs / "ZoomInOutTrainer" / "fold_0")  # same network, other weights
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    probabilities = {}
    for name, folds, trainers in (
        ("both", [0], [TRAINER, "ZoomInOutTrainer"]),
        ("f0", [0], [TRAINER]),
        ("f1", [1], [TRAINER]),
    ):
        predict(
            source,
            tmp_path / name,
            ModelChoice(folds=folds, trainers=trainers),
            PredictionOptions(save_probabilities=True, **QUIET),
        )
        probabilities[name] = read_image(tmp_path / name / f"{case}_probabilities.nii.gz")[0]
    np.testing.assert_allclose(probabilities["both"], (probabilities["f0"] + probabilities["f1"]) / 2, atol=1e-6)


def test_postprocessing_file_sets_the_threshold(home: Path, tmp_path: Path) -> None:
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    predict(source, tmp_path / "a", options=PredictionOptions(save_probabilities=True, **QUIET))
    probabilities = read_image(tmp_path / "a" / f"{case}_probabilities.nii.gz")[0]
    threshold = float(np.quantile(probabilities[probabilities > 0], 0.5))
    write_json(
        {"members": [f"{CONFIGURATION}/{TRAINER}"], "threshold": threshold, "min_lesion_mm3": 0.0},
        home / "results" / NAME / "postprocessing.json",
    )
    predict(source, tmp_path / "b", options=PredictionOptions(**QUIET))
    labels = read_image(tmp_path / "b" / f"{case}.nii.gz", np.uint8)[0]
    np.testing.assert_array_equal(labels, (probabilities >= threshold).astype(np.uint8))


@pytest.mark.parametrize(("lesion", "dtype"), [(255, np.uint8), (300, np.uint16)], ids=["255", "300"])
def test_a_model_of_a_dataset_declared_0_255_writes_masks_of_its_declared_values(
    home: Path, tmp_path: Path, lesion: int, dtype: type
) -> None:
    """The network learns class 1; the mask written holds the value ``dataset.json`` declared for it (255, or 300 in
    uint16, which uint8 would store as 44), voxel for voxel where the probability reaches the threshold."""
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    predict(source, tmp_path / "a", options=PredictionOptions(save_probabilities=True, **QUIET))
    probabilities = read_image(tmp_path / "a" / f"{case}_probabilities.nii.gz")[0]
    threshold = float(np.quantile(probabilities[probabilities > 0], 0.5))  # a mask with both values in it
    write_json(
        {"members": [f"{CONFIGURATION}/{TRAINER}"], "threshold": threshold, "min_lesion_mm3": 0.0},
        home / "results" / NAME / "postprocessing.json",
    )
    for plans_path in (home / "results" / NAME / CONFIGURATION / TRAINER).glob("fold_*/plans.json"):
        plans = Plans.from_json(plans_path)
        dataclasses.replace(plans, labels={"background": 0, "lesion": lesion}).to_json(plans_path)
    predict(source, tmp_path / "b", options=PredictionOptions(**QUIET))
    written = tmp_path / "b" / f"{case}.nii.gz"
    assert nibabel.load(written).get_data_dtype() == dtype
    labels = read_image(written, np.float64)[0]
    expected = np.where(probabilities >= threshold, lesion, 0)
    assert set(np.unique(expected)) == {0, lesion}
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ({"background": 0, "a": 1, "b": 1}, "label value(s) [1] declared under more than one name"),
        ({"background": 0, "lesion": 2**31}, "label value(s) [2147483648] outside"),
    ],
)
def test_a_model_whose_labels_cannot_be_written_is_refused_in_one_line(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, labels: dict[str, int], problem: str
) -> None:
    for plans_path in (home / "results" / NAME / CONFIGURATION / TRAINER).glob("fold_*/plans.json"):
        plain = read_json(plans_path)
        write_json({**plain, "labels": labels}, plans_path)
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    assert predict_main(["-i", str(source), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    # the plans' own format: the file on the first line, then each problem on its own
    assert error[0].startswith("error: ") and error[0].endswith("fold_0/plans.json: invalid plans:")
    assert len(error) == 2 and error[1].strip().startswith(f"labels: {problem}")
    assert not (tmp_path / "out").exists()


def test_validation_saves_probabilities(home: Path) -> None:
    validation = home / "results" / NAME / CONFIGURATION / TRAINER / "fold_0" / "validation"
    summary = read_json(validation / "summary.json")
    for case in summary["cases"]:
        probabilities = np.load(validation / f"{case}_probabilities.npz")["probabilities"]
        labels, geometry = read_image(validation / f"{case}.nii.gz", np.uint8)
        assert probabilities.shape == (1, *geometry.shape)
        # The validation mask is written like its raw image: same stored grid, same qform and sform.
        raw = home / "raw" / NAME / "imagesTr" / f"{case}_0000.nii.gz"
        _, stored = read_image(validation / f"{case}.nii.gz", np.uint8, canonical=False)
        assert _same_geometry(stored, read_image(raw, canonical=False)[1])
        written, given = nibabel.load(str(validation / f"{case}.nii.gz")).header, nibabel.load(str(raw)).header
        assert all(
            np.array_equal(written[key], given[key])
            for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "pixdim")
        )


def _add_configuration_copy(home: Path, spacing: float) -> str:
    """A second 'trained' configuration: fold 0's weights under another name and target spacing."""
    source = home / "results" / NAME / CONFIGURATION / TRAINER / "fold_0"
    target = home / "results" / NAME / "3d_coarse" / TRAINER / "fold_0"
    shutil.copytree(source, target)
    plans = Plans.from_json(source / "plans.json")
    coarse = dataclasses.replace(
        plans.configuration(CONFIGURATION), name="3d_coarse", target_spacing=(spacing,) * 3, data_identifier="3d_coarse"
    )
    dataclasses.replace(plans, configurations={**plans.configurations, "3d_coarse": coarse}).to_json(
        target / "plans.json"
    )
    return "3d_coarse"


def test_configuration_ensemble_is_the_mean_on_the_input_grid(home: Path, tmp_path: Path) -> None:
    other = _add_configuration_copy(home, 5.0)
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    probabilities = {}
    for name, configurations in (("both", [CONFIGURATION, other]), ("a", [CONFIGURATION]), ("b", [other])):
        predict(
            source,
            tmp_path / name,
            ModelChoice(configurations=configurations, folds=[0]),
            PredictionOptions(save_probabilities=True, **QUIET),
        )
        probabilities[name] = read_image(tmp_path / name / f"{case}_probabilities.nii.gz")[0]
    assert not np.allclose(probabilities["a"], probabilities["b"])
    np.testing.assert_allclose(probabilities["both"], (probabilities["a"] + probabilities["b"]) / 2, atol=1e-6)
    # without -c (and no postprocessing.json) the plans' default configuration alone predicts
    predict(source, tmp_path / "c", ModelChoice(folds=[0]), PredictionOptions(save_probabilities=True, **QUIET))
    np.testing.assert_array_equal(read_image(tmp_path / "c" / f"{case}_probabilities.nii.gz")[0], probabilities["a"])


def test_find_best_writes_postprocessing_that_predict_applies(home: Path, tmp_path: Path) -> None:
    assert find_best_main(["--metric", "dice", "--no-progress"]) == 0
    results = home / "results" / NAME
    selection, tuned = read_json(results / "model_selection.json"), read_json(results / "postprocessing.json")
    assert tuned["configurations"] == [CONFIGURATION] and tuned["trainers"] == {CONFIGURATION: [TRAINER]}
    assert tuned["members"] == [f"{CONFIGURATION}/{TRAINER}"]
    assert tuned["threshold"] in THRESHOLDS and selection["cases"] == 2
    assert tuned["score"] == max(entry["score"] for entry in selection["grid"])
    # the candidate's mean Dice, recomputed from the validation files and the raw labels
    values = []
    for path in sorted((results / CONFIGURATION / TRAINER).glob("fold_*/validation/*_probabilities.npz")):
        case = path.name.removesuffix("_probabilities.npz")
        reference = read_image(home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz", np.uint8)[0] > 0
        prediction = np.load(path)["probabilities"][0].astype(np.float32) >= 0.5
        both = prediction.sum() + reference.sum()
        values.append(1.0 if both == 0 else 2 * (prediction & reference).sum() / both)
    assert selection["candidates"][0]["mean_dice"] == pytest.approx(np.mean(values))

    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    predict(source, tmp_path, options=PredictionOptions(save_probabilities=True, **QUIET))
    probabilities, geometry = read_image(tmp_path / f"{case}_probabilities.nii.gz")
    expected = postprocess_probabilities(
        probabilities[None], geometry.spacing, tuned["threshold"], tuned["min_lesion_mm3"]
    )
    np.testing.assert_array_equal(read_image(tmp_path / f"{case}.nii.gz", np.uint8)[0], expected)


def test_find_best_ranks_configuration_ensembles(home: Path) -> None:
    other = _add_configuration_copy(home, 3.5)
    # the copy validated fold 0's case only: the comparison uses the cases both configurations validated
    selection = find_best(metric="dice_hausdorff", progress=False)
    assert [c["configurations"] for c in selection["candidates"]] == [[other], [CONFIGURATION], [other, CONFIGURATION]]
    assert selection["cases"] == 1
    # identical members: every candidate scores the same and the tie goes to the smallest, first one
    assert len({c["mean_dice"] for c in selection["candidates"]}) == 1
    assert selection["chosen"]["configurations"] == [other]


def test_find_best_compares_trainers_and_predict_uses_the_chosen_members(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = home / "results" / NAME / CONFIGURATION
    other = "ZoomInOutTrainer"  # builds the same network: fold 0 and 1 copied as a second trainer's runs
    for fold in sorted((runs / TRAINER).glob("fold_*")):
        shutil.copytree(fold, runs / other / fold.name)
    for path in (runs / other).glob("fold_*/validation/*_probabilities.npz"):  # a less confident second member
        squared = np.load(path)["probabilities"].astype(np.float32) ** 2
        np.savez_compressed(path, probabilities=squared.astype(np.float16))
    assert find_best_main(["-tr", "Nope", "--no-progress"]) == 1
    assert "was trained with ['Nope']" in capsys.readouterr().err
    assert find_best_main(["-tr", TRAINER, "--metric", "dice", "--no-progress"]) == 0  # one trainer only
    selection = read_json(home / "results" / NAME / "model_selection.json")
    assert [c["members"] for c in selection["candidates"]] == [[f"{CONFIGURATION}/{TRAINER}"]]

    assert find_best_main(["--metric", "dice", "--no-progress"]) == 0  # without -tr: every trainer it was run with
    selection = read_json(home / "results" / NAME / "model_selection.json")
    a, b = f"{CONFIGURATION}/{TRAINER}", f"{CONFIGURATION}/{other}"
    assert [c["members"] for c in selection["candidates"]] == [[a], [b], [a, b]]
    values = []  # the ensemble's mean Dice, recomputed from the two members' files
    for path in sorted((runs / TRAINER).glob("fold_*/validation/*_probabilities.npz")):
        case = path.name.removesuffix("_probabilities.npz")
        second = runs / other / path.parent.parent.name / "validation" / path.name
        mean = (
            np.load(path)["probabilities"][0].astype(np.float32)
            + np.load(second)["probabilities"][0].astype(np.float32)
        ) / 2
        reference = read_image(home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz", np.uint8)[0] > 0
        prediction = mean >= 0.5
        both = prediction.sum() + reference.sum()
        values.append(1.0 if both == 0 else 2 * (prediction & reference).sum() / both)
    assert selection["candidates"][2]["mean_dice"] == pytest.approx(np.mean(values))

    chosen = selection["postprocessing"]["members"]
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    predict(
        source, tmp_path / "auto", options=PredictionOptions(save_probabilities=True, **QUIET)
    )  # neither -c nor -tr: the chosen members
    predict(
        source,
        tmp_path / "explicit",
        ModelChoice(configurations=[CONFIGURATION], trainers=[member.split("/")[1] for member in chosen]),
        PredictionOptions(save_probabilities=True, **QUIET),
    )
    for name in (f"{case}_probabilities.nii.gz", f"{case}.nii.gz"):
        np.testing.assert_array_equal(
            read_image(tmp_path / "auto" / name)[0], read_image(tmp_path / "explicit" / name)[0]
        )


def test_find_best_without_validation_probabilities_says_so(home: Path, capsys: pytest.CaptureFixture) -> None:
    for path in (home / "results").rglob("*_probabilities.npz"):
        path.unlink()
    assert find_best_main(["-d", "ATLASPredict"]) == 1
    assert "no validation probabilities" in capsys.readouterr().err


def test_checkpoint_choice_and_snapshots(home: Path) -> None:
    fold = home / "results" / NAME / CONFIGURATION / TRAINER / "fold_1"
    for epoch in (3, 12):
        shutil.copy(fold / "checkpoint_final.pth", fold / f"checkpoint_snapshot_{epoch}.pth")
    model = load_model(NAME, CONFIGURATION, checkpoint="snapshots")
    assert [p.relative_to(fold.parent).as_posix() for p in model.checkpoints] == [
        "fold_0/checkpoint_final.pth",
        "fold_1/checkpoint_snapshot_3.pth",
        "fold_1/checkpoint_snapshot_12.pth",
    ]
    assert len(model.networks) == 3
    with pytest.raises(ValueError, match="no fold_<k> folder has a best checkpoint"):
        load_model(NAME, CONFIGURATION, checkpoint="best")  # trained without per-epoch validation
    with pytest.raises(ValueError, match="fold_7 has no final checkpoint"):
        load_model(NAME, CONFIGURATION, folds=[7])


# ---------------------------------------------------------------------------- cohorts
def _cases(home: Path) -> list[str]:
    return [p.name.removesuffix("_0000.nii.gz") for p in sorted(_images(home).glob("*_0000.nii.gz"))]


def test_a_list_restricts_the_cases_and_its_parts_cover_it(home: Path, tmp_path: Path) -> None:
    cases = _cases(home)
    listing = tmp_path / "cases.txt"
    listing.write_text(
        f"# the cases to predict\n\n{cases[3]}\n  {cases[0]}_0000.nii.gz  # a file name also works\n"
        f"{cases[1]}\n{cases[3]}\n"
    )
    assert read_case_list(listing) == [(3, cases[3]), (4, f"{cases[0]}_0000.nii.gz"), (5, cases[1]), (6, cases[3])]
    parts = [
        predict(
            _images(home),
            tmp_path / "out",
            options=PredictionOptions(**QUIET, tta="none", case_list=listing, num_parts=2, part_id=k),
        )
        for k in (0, 1)
    ]
    # the listed cases in input order, interleaved over the parts: disjoint, and together exactly the list
    assert [[p.name for p in part.written] for part in parts] == [
        [f"{cases[0]}.nii.gz", f"{cases[3]}.nii.gz"],
        [f"{cases[1]}.nii.gz"],
    ]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == sorted(
        f"{case}.nii.gz" for case in (cases[0], cases[1], cases[3])
    )
    for k, part in enumerate(parts):  # one summary per part, so parts running at once keep their own
        assert part.path == tmp_path / "out" / f"prediction_summary_part{k}of2.json"
        written = read_json(part.path)
        assert written["written"] == [p.name.removesuffix(".nii.gz") for p in part.written]
        assert written["part"] == {"id": k, "of": 2} and written["list"] == str(listing)


def test_an_unknown_name_in_the_list_is_an_error_naming_file_and_line(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{_cases(home)[0]}\n# comment\nsub-017\n")
    assert (
        predict_main(
            [
                "-i",
                str(_images(home)),
                "-o",
                str(tmp_path / "out"),
                "--list",
                str(listing),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        f"error: {listing}: 1 listed case(s) not among the 5 input case(s) ({', '.join(_cases(home)[:3])}, ...):" in err
    )
    assert f"  {listing}:3: sub-017" in err and not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no such case list"):
        predict(_images(home), tmp_path / "out", options=PredictionOptions(**QUIET, case_list=tmp_path / "missing.txt"))


def _bad_cases(folder: Path) -> dict[str, str]:
    """Write three cases that cannot be predicted into ``folder``; their identifiers sort before the good ones, so
    the good cases come after a failure. Returns what each one's report line says."""
    (folder / "a_corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b not an image at all")
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(np.full((4, 4, 4), np.nan, np.float32), geometry, folder / "a_nan_0000.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(folder / "a_flat_0000.nii.gz"))
    return {
        "a_corrupt": "unreadable image",
        "a_flat": "expected a 3-D single-channel image, found 2-D",
        "a_nan": "64 NaN/Inf voxel(s)",
    }


def test_bad_cases_are_reported_and_skipped_and_the_summary_lists_every_case(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = Path(shutil.copytree(_images(home), tmp_path / "in"))
    bad = _bad_cases(source)
    output = tmp_path / "out"
    arguments = ["-i", str(source), "-o", str(output), "--device", "cpu", "--no-progress", "--no-tta"]
    assert predict_main(arguments) == 1  # every good case written first
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("case ")]
    assert len(lines) == 3
    for line, (case, problem) in zip(lines, sorted(bad.items())):
        assert line.startswith(f"case {case} ({source / f'{case}_0000.nii.gz'}): ") and problem in line, line
        assert f"): {source}" not in line, line  # the file is named once, not again before the problem
    good = _cases(home)
    assert sorted(p.name for p in output.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in good]
    summary = read_json(output / "prediction_summary.json")
    assert (
        summary["counts"] == {"written": 5, "skipped": 0, "failed": 3, "input_warnings": 0, "review": 5}
        and summary["written"] == good
    )
    assert [(f["case"], f["files"]) for f in summary["failed"]] == [
        (case, [str(source / f"{case}_0000.nii.gz")]) for case in sorted(bad)
    ]
    assert (
        out == f"wrote 5 prediction(s), skipped 0 already done, 3 failed: {', '.join(sorted(bad))}; 5 flagged for "
        f"review: {', '.join(good)}; summary: {output / 'prediction_summary.json'}\n"
    )
    # the same command again: the good cases are done, the bad ones fail again
    assert predict_main(arguments) == 1
    summary = read_json(output / "prediction_summary.json")
    assert (
        summary["counts"] == {"written": 0, "skipped": 5, "failed": 3, "input_warnings": 0, "review": 5}
        and summary["skipped"] == good
    )


def test_hostile_headers_fail_alone_before_any_voxel_is_allocated_and_the_cohort_goes_on(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, hostile_image
) -> None:
    """A header claiming 32767³ voxels in a hundred bytes, plain bytes named .nii.gz, a header promising more voxel
    bytes than its file holds, a 1e9 mm, a negative and a 1e-6 mm voxel: each case fails in one line naming its
    file, found from the header (nothing near its claimed size is allocated), and the good cases are written."""
    source = Path(shutil.copytree(_images(home), tmp_path / "in"))
    bad = {f"a_{kind}": words for kind, words in HOSTILE_HEADERS.items()}
    for case in bad:
        hostile_image(source / f"{case}_0000.nii.gz", case.removeprefix("a_"))
    output = tmp_path / "out"
    arguments = ["-i", str(source), "-o", str(output), "--device", "cpu", "--no-progress", "--tta", "none"]
    tracemalloc.start()
    try:
        assert predict_main(arguments) == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20, f"{peak / 2**20:.0f} MiB allocated at the peak"
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("case ")]
    assert len(lines) == len(bad), err
    for line, (case, words) in zip(lines, sorted(bad.items())):
        assert line.startswith(f"case {case} ({source / f'{case}_0000.nii.gz'}): ") and words in line, line
    good = _cases(home)
    assert sorted(p.name for p in output.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in good]
    summary = read_json(output / "prediction_summary.json")
    assert (
        summary["counts"] == {"written": 5, "skipped": 0, "failed": len(bad), "input_warnings": 0, "review": 5}
        and summary["written"] == good
    )
    assert [f["case"] for f in summary["failed"]] == sorted(bad)
    assert out.startswith(f"wrote 5 prediction(s), skipped 0 already done, {len(bad)} failed: ")


def test_a_case_too_large_at_the_plans_spacing_fails_before_resampling(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sound header (16³ voxels of 100 mm, the largest size accepted) that at the plan's 3.5 mm would hold 457³
    voxels, more than a machine of 1 GiB takes (3.4e7 voxels): the case fails in one line saying so, before anything
    is resampled."""
    monkeypatch.setattr("autoseg.io.headers.physical_memory_bytes", lambda: 1 << 30)
    geometry = Geometry((16, 16, 16), (100.0, 100.0, 100.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = np.random.default_rng(0).random((16, 16, 16), np.float32) + 1
    write_image(image, geometry, tmp_path / "in" / "big.nii.gz")
    summary = predict(
        tmp_path / "in", tmp_path / "out", options=PredictionOptions(**QUIET, tta="none"), log=lambda line: None
    )
    assert not summary.written and len(summary.failed) == 1
    problem = summary.failed[0].problem
    assert "resampled from its voxel size [100, 100, 100] mm to the plan's" in problem and "voxels (" in problem


def test_a_case_that_runs_out_of_memory_fails_alone(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A case whose prediction needs more memory than there is (``MemoryError``, whatever asked for it) fails in one
    line; the next cases are predicted and the summary is written."""
    first, calls = _cases(home)[0], []

    def hungry(predictors, images, geometry, agreement):  # the first case (in sorted order) asks for too much
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("Unable to allocate 54.7 TiB for an array with shape (2, 32767, 32767, 32767)")
        return _ensemble(predictors, images, geometry, agreement)

    lines: list[str] = []
    monkeypatch.setattr("autoseg.api.predict._ensemble", hungry)
    summary = predict(_images(home), tmp_path / "out", options=PredictionOptions(**QUIET, tta="none"), log=lines.append)
    assert [f.identifier for f in summary.failed] == [first] and len(summary.written) == 4
    assert lines == [f"case {first} ({_images(home) / f'{first}_0000.nii.gz'}): Unable to allocate 54.7 TiB for an "
                     "array with shape (2, 32767, 32767, 32767)"]  # fmt: skip
    assert read_json(tmp_path / "out" / "prediction_summary.json")["counts"]["failed"] == 1


def test_a_killed_run_resumes_with_the_cases_it_did_not_finish(home: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = predict(_images(home), output, options=PredictionOptions(**QUIET, tta="none", save_probabilities=True))
    assert len(first.written) == 5 and not first.skipped and not first.failed
    # a kill: one case never written (only a temporary file of its labels left), one killed between its
    # probabilities and its labels, and a temporary file left beside a case that was finished
    a, b, c = _cases(home)[:3]
    (output / f"{a}.nii.gz").unlink()
    (output / f"{a}_probabilities.nii.gz").unlink()
    (output / f".{a}.nii.gz.k1ll3d00.tmp.nii.gz").write_bytes(b"half")
    (output / f"{b}.nii.gz").unlink()
    (output / f".{c}_probabilities.nii.gz.x7y8z9ab.tmp.nii.gz").write_bytes(b"half")
    untouched = (output / f"{c}.nii.gz").stat().st_mtime_ns
    again = predict(_images(home), output, options=PredictionOptions(**QUIET, tta="none", save_probabilities=True))
    assert [p.name for p in again.written] == [f"{a}.nii.gz", f"{b}.nii.gz"]
    assert again.skipped == _cases(home)[2:] and again.stale_temporaries == 2
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]
    assert (output / f"{c}.nii.gz").stat().st_mtime_ns == untouched
    # without --save-probabilities the label file is enough; with it, a case without its map is predicted again
    assert len(predict(_images(home), output, options=PredictionOptions(**QUIET, tta="none")).skipped) == 5
    (output / f"{a}_probabilities.nii.gz").unlink()
    assert [
        p.name
        for p in predict(
            _images(home), output, options=PredictionOptions(**QUIET, tta="none", save_probabilities=True)
        ).written
    ] == [f"{a}.nii.gz"]


# ---------------------------------------------------------------------------- the CPU fast path
def test_tta_choices_on_the_command_line(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert predict_parser().parse_args(["-i", "a", "-o", "b"]).tta == "all"
    assert predict_parser().parse_args(["-i", "a", "-o", "b", "--no-tta"]).tta == "none"
    assert predict_parser().parse_args(["-i", "a", "-o", "b", "--tta", "lr"]).tta == "lr"
    with pytest.raises(SystemExit):
        predict_parser().parse_args(["-i", "a", "-o", "b", "--tta", "some"])
    capsys.readouterr()
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    case = source.name.replace("_0000.nii.gz", "")
    probabilities = {}
    for name, flags in (
        ("no_tta", ["--no-tta"]),
        ("none", ["--tta", "none"]),
        ("lr", ["--tta", "lr"]),
        ("all", ["--tta", "all"]),
        ("default", []),
    ):
        assert (
            predict_main(
                [
                    "-i",
                    str(source),
                    "-o",
                    str(tmp_path / name),
                    "--device",
                    "cpu",
                    "--no-progress",
                    "--save-probabilities",
                    "-f",
                    "0",
                    *flags,
                ]
            )
            == 0
        )
        probabilities[name] = read_image(tmp_path / name / f"{case}_probabilities.nii.gz")[0]
    assert capsys.readouterr().out.count("\n") == 5  # one "wrote ..." line per run, nothing else
    np.testing.assert_array_equal(probabilities["no_tta"], probabilities["none"])
    np.testing.assert_array_equal(probabilities["default"], probabilities["all"])
    assert not np.array_equal(probabilities["none"], probabilities["all"])
    # the model mirrors only axis 0, which is the left-right axis of these images: lr is all of it
    assert left_right_axis(read_image(source)[1].direction) == 0
    np.testing.assert_array_equal(probabilities["lr"], probabilities["all"])
    with pytest.raises(ValueError, match="unknown --tta"):
        predict(source, tmp_path / "x", options=PredictionOptions(tta="some", **QUIET))


def test_cpu_prediction_uses_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _choose_device("cpu") == (torch.device("cpu"), None)  # the suite's CPU has no native bf16
    monkeypatch.setattr("autoseg.machine.cpu_has_fast_bf16", lambda: (True, "AVX512 (faked)"))
    assert _choose_device("cpu") == (torch.device("cpu"), torch.bfloat16)


def test_commands_set_torch_threads_and_put_them_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = []
    before = torch.get_num_threads()
    for requested in ("2", "1"):
        monkeypatch.setenv("OMP_NUM_THREADS", requested)
        assert run(lambda: seen.append(torch.get_num_threads())) == 0
        assert torch.get_num_threads() == before
    assert seen == [2, 1] and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------- networks rebuilt from the run's record
def _acute_run(home: Path) -> Path:
    """``checkpoint_final.pth`` of an (untrained) ``AcuteStrokeTrainer`` run on the tiny model's plans, fold full."""
    plans = Plans.from_json(home / "preprocessed" / NAME / "plans.json")
    trainer = get_trainer("AcuteStrokeTrainer")(
        plans,
        CONFIGURATION,
        "full",
        preprocessed_folder=home / "preprocessed" / NAME,
        output_folder=home / "results" / NAME / CONFIGURATION / "AcuteStrokeTrainer" / "fold_full",
        options=TrainingOptions(num_processes=0, echo=False, device="cpu", precision="fp32"),
    )
    return trainer.setup().save("checkpoint_final.pth")


def test_a_checkpoint_records_its_network_options_and_prediction_needs_no_trainer_class(home: Path) -> None:
    path = _acute_run(home)
    assert load_checkpoint(path)["network_options"] == {"network_class": "AsymmetricResidualUNet"}
    # a run folder whose trainer no registry knows is rebuilt from the record alone
    shutil.copytree(path.parents[1], path.parents[2] / "RenamedTrainer")
    model = load_model(NAME, CONFIGURATION, "RenamedTrainer", folds=["full"])
    assert isinstance(model.networks[0], AsymmetricResidualUNet)
    state = load_checkpoint(path)
    state["network_options"] = {"network_class": 3}
    save_checkpoint(state, path)
    with pytest.raises(InvalidFileError, match=r"checkpoint_final.pth: network_options may hold only network_class"):
        load_model(NAME, CONFIGURATION, "AcuteStrokeTrainer", folds=["full"])


def test_an_acute_stroke_checkpoint_from_before_the_record_predicts_with_the_asymmetric_network(
    home: Path, tmp_path: Path
) -> None:
    path = _acute_run(home)
    state = load_checkpoint(path)
    del state["network_options"]  # as every checkpoint written before runs recorded them
    save_checkpoint(state, path)
    model = load_model(NAME, CONFIGURATION, "AcuteStrokeTrainer", folds=["full"])
    assert isinstance(model.networks[0], AsymmetricResidualUNet)
    source = sorted(_images(home).glob("*_0000.nii.gz"))[0]
    choice = ModelChoice(dataset=NAME, trainers="AcuteStrokeTrainer", folds=["full"])
    summary = predict(source, tmp_path / "out", choice, PredictionOptions(**QUIET, tta="none"))
    assert len(summary.written) == 1 and not summary.failed


# ---------------------------------------------------------------------------- lesion reports and QC
def test_every_case_gets_a_lesion_report_a_qc_score_and_tables_that_match_its_written_files(
    home: Path, tmp_path: Path
) -> None:
    """Volumes are the written mask's voxels times the input's voxel volume; the uncertainty map is the entropy of
    the written probabilities in the input's header; the run's tables and summary repeat the reports."""
    output = tmp_path / "out"
    options = PredictionOptions(**QUIET, save_probabilities=True, save_uncertainty=True)
    summary = predict(_images(home), output, options=options)
    cases = sorted(summary.per_case)
    assert cases == sorted(c.identifier for c in find_input_cases(_images(home), 1)) and len(cases) == 5
    rows = {row["case"]: row for row in _csv(output / "lesions.csv")}
    table = _csv(output / "lesion_table.csv")
    for case in cases:
        report = read_json(output / f"{case}_lesions.json")
        mask = nibabel.load(output / f"{case}.nii.gz")
        source = nibabel.load(_images(home) / f"{case}_0000.nii.gz")
        voxel_ml = float(np.prod(source.header.get_zooms())) / 1000
        assert report["total_volume_ml"] == pytest.approx(np.count_nonzero(mask.get_fdata()) * voxel_ml)
        assert sum(lesion["volume_ml"] for lesion in report["lesions"]) == pytest.approx(report["total_volume_ml"])
        probabilities = nibabel.load(output / f"{case}_probabilities.nii.gz").get_fdata()
        uncertainty = nibabel.load(output / f"{case}_uncertainty.nii.gz")
        assert np.array_equal(uncertainty.affine, source.affine) and uncertainty.shape == source.shape
        p = np.clip(probabilities, 1e-12, 1 - 1e-12)
        entropy = np.where((probabilities <= 0) | (probabilities >= 1), 0, -(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
        assert np.allclose(uncertainty.get_fdata(), entropy, atol=1e-5)
        qc = report["qc"]
        assert 0 <= qc["score"] <= 1 and qc["review"] == bool(qc["reasons"]) and not qc["calibrated"]
        assert (qc["score"] < qc["threshold"]) == any("QC score" in r for r in qc["reasons"])
        plans = Plans.from_json(home / "results" / NAME / CONFIGURATION / TRAINER / "fold_0" / "plans.json")
        mirrorings = 2 ** len(plans.configuration(CONFIGURATION).mirror_axes)
        assert qc["components"]["mirrorings"] == mirrorings > 1 and qc["components"]["members"] == 2  # folds 0, 1
        assert summary.per_case[case]["qc_score"] == qc["score"]
        assert float(rows[case]["total_volume_ml"]) == pytest.approx(report["total_volume_ml"])
        assert int(rows[case]["lesion_count"]) == report["lesion_count"]
        assert len([r for r in table if r["case"] == case]) == report["lesion_count"]
    written = read_json(output / "prediction_summary.json")
    assert written["counts"]["review"] == sum(entry["review"] for entry in written["per_case"].values())
    assert f"{written['counts']['review']} flagged for review" in summary.line()


def test_the_calibration_find_best_wrote_for_these_members_sets_the_review_threshold(
    home: Path, tmp_path: Path
) -> None:
    calibration = {
        "members": [f"{CONFIGURATION}/{TRAINER}"],
        "threshold": 0.0,
        "scores": [0.0, 1.0],
        "expected_dice": [0.2, 0.9],
        "cases": 5,
        "failures": 1,
        "spearman": 0.7,
        "auroc": None,
        "rule": "test",
    }
    write_json(calibration, home / "results" / NAME / "qc_calibration.json")
    summary = predict(_images(home), tmp_path / "out", options=PredictionOptions(**QUIET, tta="none"))
    for case in summary.per_case:
        qc = read_json(tmp_path / "out" / f"{case}_lesions.json")["qc"]
        assert qc["calibrated"] and qc["threshold"] == 0.0
        assert not any("QC score" in reason for reason in qc["reasons"])
        assert qc["expected_dice"] == pytest.approx(0.2 + 0.7 * qc["score"])
    write_json({**calibration, "members": ["other/Trainer"]}, home / "results" / NAME / "qc_calibration.json")
    summary = predict(_images(home), tmp_path / "out2", options=PredictionOptions(**QUIET, tta="none"))
    assert not read_json(tmp_path / "out2" / f"{next(iter(summary.per_case))}_lesions.json")["qc"]["calibrated"]


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_find_best_calibrates_the_qc_score_on_the_cross_validation_and_a_model_file_carries_it(
    home: Path, tmp_path: Path
) -> None:
    """The calibration's points are the QC scores of the validated cases, recomputed here from the validation files,
    the raw labels and the fingerprint; prediction from an exported model uses it."""
    from autoseg.api.model_files import export_model

    assert find_best_main(["--metric", "dice", "--no-progress"]) == 0
    results = home / "results" / NAME
    calibration, tuned = read_json(results / "qc_calibration.json"), read_json(results / "postprocessing.json")
    assert calibration["members"] == tuned["members"] and calibration["cases"] == 2
    assert read_json(results / "model_selection.json")["qc_calibration"] == calibration
    volumes = read_json(home / "preprocessed" / NAME / "fingerprint.json")["aggregate"]["case_lesion_volumes_mm3"]
    expected = []
    for path in sorted((results / CONFIGURATION / TRAINER).glob("fold_*/validation/*_probabilities.npz")):
        case = path.name.removesuffix("_probabilities.npz")
        p = np.load(path)["probabilities"][0].astype(np.float64)
        geometry = read_image(path.parent / f"{case}.nii.gz")[1]
        mask = postprocess_probabilities(p[None], geometry.spacing, tuned["threshold"], tuned["min_lesion_mm3"]) > 0
        q = np.clip(p[mask], 1e-12, 1 - 1e-12)
        confidence = 1 - np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))) if mask.any() else None
        mirroring = read_json(path.parent / "summary.json")["cases"][case]["qc"]["mirroring_agreement"]
        volume = mask.sum() * geometry.voxel_volume_mm3
        plausible = min(1.0, volume / volumes["min"], volumes["max"] / volume) if volume else 0.0  # no lesion-free case
        parts = [v for v in (mirroring, confidence) if v is not None]
        expected.append(np.mean(parts) * plausible)
    assert calibration["scores"] == pytest.approx(sorted(set(expected)))

    model = export_model(tmp_path / "model.zip", NAME).path
    shutil.rmtree(home / "results")
    summary = predict(_images(home), tmp_path / "out", ModelChoice(model_file=model), PredictionOptions(**QUIET))
    qc = read_json(tmp_path / "out" / f"{next(iter(summary.per_case))}_lesions.json")["qc"]
    assert qc["calibrated"] and qc["threshold"] == calibration["threshold"]
