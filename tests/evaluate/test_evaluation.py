"""Tests of autoseg.evaluate.evaluation and the autoseg_evaluate command on tiny generated NIfTI folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoseg.commands import evaluate as evaluate_command
from autoseg.evaluate import evaluation
from autoseg.evaluate.evaluation import EvaluationError, bootstrap_ci, evaluate_folders, format_summary_table
from autoseg.evaluate.metrics import evaluate_case
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image, write_image
from autoseg.labels import LabelValueWarning

SHAPE = (16, 14, 10)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
GEOMETRY = Geometry(shape=SHAPE, spacing=(0.9, 1.1, 2.5), origin=(-10.0, 5.0, 2.0), direction=IDENTITY)
CASES = ("case_a", "case_b", "case_c", "case_d", "case_e", "case_f")


def _case_masks(index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label maps (uint8) of growing lesion size; case 0 has an empty prediction."""
    reference = np.zeros(SHAPE, dtype=np.uint8)
    size = 2 + index
    reference[3 : 3 + size, 2 : 2 + size, 2 : 2 + min(size, 6)] = 1
    reference[0, 0, 0] = 2  # another label, ignored with label=1
    prediction = np.zeros_like(reference)
    if index > 0:
        noise = rng.random(SHAPE) < 0.15
        prediction[(reference == 1) ^ (noise & (np.roll(reference, 1, axis=0) == 1))] = 1
    return reference, prediction


@pytest.fixture()
def folders(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {name: tmp_path / name for name in ("ref", "pred", "prob")}
    for index, case in enumerate(CASES):
        reference, prediction = _case_masks(index, rng)
        write_image(reference, GEOMETRY, paths["ref"] / f"{case}.nii.gz")
        ending = ".nii.gz" if index % 2 else ".mha"  # endings may differ between folders
        write_image(prediction, GEOMETRY, paths["pred"] / f"{case}{ending}")
        probabilities = np.clip(prediction * 0.6 + rng.random(SHAPE) * 0.3, 0, 1).astype(np.float32)
        write_image(probabilities, GEOMETRY, paths["prob"] / f"{case}.nii.gz")
    paths["out"] = tmp_path / "out"
    return paths


def test_bootstrap_ci_seeded_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.6, 0.2, 10), rng.normal(0.6, 0.2, 400)
    assert bootstrap_ci(few, 1000, seed=3) == bootstrap_ci(few, 1000, seed=3)
    assert bootstrap_ci(few, 1000, seed=3) != bootstrap_ci(few, 1000, seed=4)
    low, high = bootstrap_ci(few, 1000, seed=3)
    assert low < few.mean() < high
    many_low, many_high = bootstrap_ci(many, 1000, seed=3)
    assert many_low < many.mean() < many_high
    assert many_high - many_low < (high - low) / 2


def test_bootstrap_ci_ignores_nan_and_handles_nothing() -> None:
    values = np.array([0.2, math.nan, 0.4, 0.9])
    assert bootstrap_ci(values, 200, seed=0) == bootstrap_ci(values[~np.isnan(values)], 200, seed=0)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan], 200))
    assert bootstrap_ci([0.5, 0.5, 0.5], 100) == (0.5, 0.5)


def test_evaluate_folders_end_to_end(folders: dict[str, Path]) -> None:
    result = evaluate_folders(folders["ref"], folders["pred"], folders["out"], probabilities_dir=folders["prob"])
    table = pd.read_csv(folders["out"] / "per_case.csv", index_col="case")
    assert list(table.index) == list(CASES)
    for case in CASES:
        reference, geometry = read_image(folders["ref"] / f"{case}.nii.gz")
        prediction_path = next(folders["pred"].glob(f"{case}.*"))
        prediction, _ = read_image(prediction_path)
        probabilities, _ = read_image(folders["prob"] / f"{case}.nii.gz")
        expected = evaluate_case(prediction == 1, reference == 1, geometry.spacing, probabilities)
        assert list(table.columns[:2]) == ["protocol", "lesion_connectivity"]  # what produced the row
        assert set(expected) == set(table.columns[2:])
        assert (table.loc[case, "protocol"], table.loc[case, "lesion_connectivity"]) == ("autoseg", 26)
        np.testing.assert_allclose(table.loc[case, list(expected)].to_numpy(float), list(expected.values()), rtol=1e-12)
    summary = json.loads((folders["out"] / "summary.json").read_text(), parse_constant=_reject_nan)
    assert summary["num_cases"] == len(CASES) and summary["num_empty_prediction"] == 1
    assert summary["metrics"]["hausdorff"]["n_nan"] == 1 and summary["metrics"]["precision"]["n_nan"] == 1
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(table["dice"].mean())
    assert summary["metrics"]["hausdorff"]["mean"] == pytest.approx(table["hausdorff"].mean())  # NaN skipped
    assert "max_dice" in summary["metrics"]
    png = (folders["out"] / "dice_vs_volume.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    quartiles = pd.read_csv(folders["out"] / "quartiles.csv")
    assert list(quartiles["num_cases"]) == [2, 2, 1, 1]
    assert (quartiles["volume_min_mm3"].diff().dropna() > 0).all()
    assert sorted(p.name for p in folders["out"].iterdir()) == sorted(evaluation.OUTPUT_NAMES.values())
    assert result.output_files["summary"] == folders["out"] / "summary.json"


def _reject_nan(constant: str) -> None:
    raise AssertionError(f"summary.json holds {constant}, which is not strict JSON")


def test_micro_dice_and_summary_statistics(folders: dict[str, Path]) -> None:
    result = evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=200, seed=1)
    table = result.per_case
    tp, fp, fn = table["tp_voxels"].sum(), table["fp_voxels"].sum(), table["fn_voxels"].sum()
    assert result.summary["micro_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    dice = result.summary["metrics"]["dice"]
    assert dice["median"] == pytest.approx(table["dice"].median())
    assert dice["std"] == pytest.approx(table["dice"].std(ddof=1))
    assert (dice["ci_low"], dice["ci_high"]) == bootstrap_ci(table["dice"], 200, seed=1)
    assert result.output_files == {}
    assert "max_dice" not in table.columns


def test_results_do_not_depend_on_workers(folders: dict[str, Path]) -> None:
    serial = evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=50)
    parallel = evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=50, num_workers=2)
    pd.testing.assert_frame_equal(serial.per_case, parallel.per_case)


def test_label_selects_the_lesion_label(folders: dict[str, Path]) -> None:
    for path in folders["pred"].iterdir():  # one voxel of label 2 in each prediction, away from the reference's
        prediction, _ = read_image(path, np.uint8, canonical=False)
        prediction[-1, -1, -1] = 2
        write_image(prediction, GEOMETRY, path)
    result = evaluate_folders(folders["ref"], folders["pred"], label=2, num_bootstrap=10)
    # Label 2 is one voxel of each reference, and each prediction puts it elsewhere: every prediction misses it.
    np.testing.assert_allclose(result.per_case["volume_reference_mm3"], np.prod(GEOMETRY.spacing))
    assert (result.per_case["dice"] == 0).all()


def _masks_as(folders: dict[str, Path], value: int, dtype: type = np.uint8) -> dict[str, Path]:
    """Copies of the reference and prediction folders with every lesion voxel (label 1) stored as ``value``."""
    copies = {}
    for kind in ("ref", "pred"):
        copies[kind] = folders[kind].parent / f"{kind}_{value}"
        for path in folders[kind].iterdir():
            mask, _ = read_image(path, np.uint8, canonical=False)
            write_image(np.where(mask == 1, value, 0).astype(dtype), GEOMETRY, copies[kind] / path.name)
    return copies


@pytest.mark.parametrize("label", [1, 7])
def test_masks_without_the_evaluated_label_are_refused_naming_file_and_values(
    folders: dict[str, Path], label: int
) -> None:
    """0/255 masks scored for label 1 (or 7) were read as empty: Dice 1.0 for any pair. Now refused."""
    masks = _masks_as(folders, 255)
    with pytest.raises(EvaluationError, match=r"case_a\.nii\.gz: this reference holds the values 0, 255, none of them "
                       rf"the evaluated label {label}"):  # fmt: skip
        evaluate_folders(masks["ref"], masks["pred"], folders["out"], label=label, progress=False)
    assert not folders["out"].exists()
    mixed = evaluate_folders(folders["ref"], folders["pred"], progress=False)  # references 0/1, predictions 0/255
    with pytest.raises(EvaluationError, match=r"case_b\.nii\.gz: this prediction holds the values 0, 255"):
        evaluate_folders(folders["ref"], masks["pred"], progress=False)
    assert mixed.summary["metrics"]["dice"]["mean"] < 1


def test_binarize_scores_any_non_zero_value_as_lesion(folders: dict[str, Path]) -> None:
    """With binarize, 0/255 (and 0/300 uint16) masks score as the same masks stored as 0/1 do."""
    expected = evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=10, progress=False)
    for value, dtype in ((255, np.uint8), (300, np.uint16)):
        masks = _masks_as(folders, value, dtype)
        result = evaluate_folders(masks["ref"], masks["pred"], num_bootstrap=10, progress=False, binarize=True)
        pd.testing.assert_frame_equal(result.per_case, expected.per_case)
        assert result.summary["inputs"]["binarize"] is True
    assert expected.summary["metrics"]["dice"]["mean"] < 1


def test_almost_integer_masks_are_rounded_with_one_warning_per_file(folders: dict[str, Path]) -> None:
    """Float masks from resampling tools (0.99999994 for 1) score as the integer masks, with a warning naming each
    rounded file once; values far from integers are an error naming the file."""
    expected = evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=10, progress=False)
    reference = next(folders["ref"].glob("case_c.*"))
    mask, _ = read_image(reference, np.uint8, canonical=False)
    write_image(np.where(mask == 1, np.float32(0.99999994), mask).astype(np.float32), GEOMETRY, reference)
    assert read_image(reference, np.float64)[0].max() == pytest.approx(2) and 0.99999994 in read_image(reference)[0]
    with pytest.warns(LabelValueWarning) as caught:
        result = evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=10, progress=False)
    assert [str(w.message).split(": ")[0] for w in caught] == [str(reference)]
    pd.testing.assert_frame_equal(result.per_case, expected.per_case)
    write_image(np.where(mask == 1, 0.5, mask).astype(np.float32), GEOMETRY, reference)
    with pytest.raises(EvaluationError, match=r"case_c\.nii\.gz: label values 0\.5 are not integers"):
        evaluate_folders(folders["ref"], folders["pred"], progress=False)


def test_command_binarize_flag_and_refusal(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    masks = _masks_as(folders, 255)
    argv = ["-ref", str(masks["ref"]), "-pred", str(masks["pred"]), "-o", str(folders["out"]), "--no-progress"]
    assert evaluate_command.main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds the values 0, 255" in error and "--binarize" in error
    assert evaluate_command.main([*argv, "--bootstrap", "10", "--binarize"]) == 0
    summary = json.loads((folders["out"] / "summary.json").read_text())
    assert summary["inputs"]["binarize"] is True and summary["metrics"]["dice"]["mean"] < 1


def test_missing_prediction_names_the_case_and_writes_nothing(folders: dict[str, Path]) -> None:
    next(folders["pred"].glob("case_c.*")).unlink()
    next(folders["pred"].glob("case_e.*")).unlink()
    with pytest.raises(EvaluationError, match=r"missing prediction for 2 of 6 cases .*: case_c, case_e"):
        evaluate_folders(folders["ref"], folders["pred"], folders["out"])
    assert not folders["out"].exists()


def test_geometry_mismatch_names_the_file(folders: dict[str, Path]) -> None:
    reference, _ = read_image(folders["ref"] / "case_b.nii.gz")
    moved = Geometry(GEOMETRY.shape, (0.9, 1.1, 3.0), GEOMETRY.origin, GEOMETRY.direction)
    write_image(reference, moved, folders["pred"] / "case_b.nii.gz")
    with pytest.raises(EvaluationError, match=r"case_b\.nii\.gz: geometry differs .*spacing"):
        evaluate_folders(folders["ref"], folders["pred"], folders["out"])
    assert not folders["out"].exists()


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="reference folder not found"):
        evaluate_folders(tmp_path / "nothing", tmp_path)


def test_format_summary_table(folders: dict[str, Path]) -> None:
    text = format_summary_table(evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=50))
    protocol, *lines = text.splitlines()
    assert protocol.startswith("protocol: autoseg (") and "lesions 26-connected, volume difference in mm³" in protocol
    assert lines[0].split()[:3] == ["Metric", "Mean", "Median"]
    assert any(line.startswith("Dice ") for line in lines) and any("HD95 (mm)" in line for line in lines)
    assert "micro-Dice" in lines[-1]
    assert len({len(line) for line in lines[:-1] if not line.startswith("-")}) == 1  # aligned columns


def test_command_writes_outputs(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-o", str(folders["out"]), "--bootstrap", "50"]
    assert evaluate_command.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and str(folders["out"] / "summary.json") in printed
    assert (folders["out"] / "per_case.csv").exists()


def _break_missing_folder(paths: dict[str, Path]) -> None:
    paths["pred"].rename(paths["pred"].with_name("moved"))


def _break_missing_prediction(paths: dict[str, Path]) -> None:
    next(paths["pred"].glob("case_d.*")).unlink()


def _break_geometry(paths: dict[str, Path]) -> None:
    shifted = Geometry(GEOMETRY.shape, GEOMETRY.spacing, (0.0, 0.0, 0.0), GEOMETRY.direction)
    write_image(np.zeros(SHAPE, dtype=np.uint8), shifted, paths["pred"] / "case_a.mha")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_break_missing_folder, "prediction folder not found"),
        (_break_missing_prediction, "missing prediction for 1 of 6 cases"),
        (_break_geometry, "case_a.mha: geometry differs"),
    ],
)
def test_command_errors_return_1_with_one_line(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], damage, message: str
) -> None:
    damage(folders)
    argv = ["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-o", str(folders["out"]), "--no-progress"]
    assert evaluate_command.main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert not folders["out"].exists()


def test_predictions_stored_in_another_orientation_are_scored_in_world_space(
    folders: dict[str, Path], tmp_path: Path, reoriented_copy
) -> None:
    """Predictions (and probabilities) rewritten with their axes permuted and flipped cover the same voxels: same
    scores, case by case, as the originals."""
    expected = evaluate_folders(folders["ref"], folders["pred"], probabilities_dir=folders["prob"], progress=False)
    for kind in ("pred", "prob"):
        for index, path in enumerate(sorted(folders[kind].iterdir())):
            reoriented_copy(path, tmp_path / f"{kind}_moved" / path.name, ("ASL", "PIR", "LPI")[index % 3])
    moved = evaluate_folders(
        folders["ref"], tmp_path / "pred_moved", probabilities_dir=tmp_path / "prob_moved", progress=False
    )
    pd.testing.assert_frame_equal(moved.per_case, expected.per_case)
