"""The challenge protocols (``autoseg.evaluate.protocols``) against the challenges' own scoring, re-derived here.

The reference functions below follow what the published code computes (sources in ``autoseg/evaluate/protocols.py``),
written independently of autoseg: components with ``scipy.ndimage.label`` (autoseg uses cc3d), one loop per lesion as
the official code does, the ISLES 2022 voxel volume from the determinant of the image's affine (read with SimpleITK),
and the ATLAS R2.0 arrays shaped (batch, channel, X, Y, Z) as its loader gives them to ``batchwise=True``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoseg.commands import evaluate as evaluate_command
from autoseg.errors import UnknownNameError, UsageError
from autoseg.evaluate.evaluation import evaluate_folders, format_summary_table
from autoseg.evaluate.metrics import challenge_case, lesion_wise, score_case
from autoseg.evaluate.protocols import PROTOCOLS, get_protocol
from autoseg.evaluate.report import write_report
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

METRICS = {"isles22": ("dice", "volume_difference_ml", "lesion_count_difference", "lesion_f1"),
           "atlas2": ("dice", "volume_difference_voxels", "lesion_count_difference", "lesion_f1")}  # fmt: skip


# ---------------------------------------------------------------------------- the official scoring, re-derived
def isles22_official(reference: np.ndarray, prediction: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """ISLES 2022 (eval_utils.py / eval_metrics_isles.py): 26-connected lesions, volume difference in ml."""
    truth, predicted = reference.astype(bool), prediction.astype(bool)
    cube = np.ones((3, 3, 3))  # every face, edge and corner neighbour
    truth_lesions, n_truth = ndimage.label(truth, cube)
    predicted_lesions, n_predicted = ndimage.label(predicted, cube)
    found = sum(bool(np.any(predicted[truth_lesions == k])) for k in range(1, n_truth + 1))
    missed = n_truth - found
    false = sum(not np.any(truth[predicted_lesions == k]) for k in range(1, n_predicted + 1))
    total = truth.sum() + predicted.sum()
    return {
        "dice": 1.0 if total == 0 else 2.0 * np.sum(truth & predicted) / total,
        "volume_difference_ml": abs(truth.sum() * voxel_ml - predicted.sum() * voxel_ml),
        "lesion_count_difference": abs(n_truth - n_predicted),
        "lesion_f1": 1.0 if found + false + missed == 0 else found / (found + (false + missed) / 2),
    }


def atlas2_official(reference: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """ATLAS R2.0 (isles/scoring.py, batchwise): float arrays (1, 1, X, Y, Z) clipped to [0, 1], scipy's default
    structure (6-connectivity), volume difference in voxels."""
    truth = np.clip(reference.astype(np.float32)[None, None], 0, 1)
    predicted = np.clip(prediction.astype(np.float32)[None, None], 0, 1)
    flat_truth, flat_predicted = truth.reshape(1, -1), predicted.reshape(1, -1)
    total = flat_truth.sum() + flat_predicted.sum()
    dice = 1.0 if total == 0 else float(2 * (flat_predicted @ flat_truth.T)[0, 0] / total)
    # the count labels the (channel, X, Y, Z) sample: a 4-D cross, whose channel neighbours do not exist
    _, n_predicted = ndimage.label(predicted[0])
    _, n_truth = ndimage.label(truth[0])
    f1 = []
    for channel in range(truth.shape[1]):
        truth3, predicted3 = truth[0, channel], predicted[0, channel]
        truth_lesions, n_lesions = ndimage.label(truth3.astype(bool))
        found = sum(np.max((truth_lesions == k) + predicted3) > 1 for k in range(1, n_lesions + 1))
        predicted_lesions, n_components = ndimage.label(predicted3.astype(bool))
        false = sum(np.max((predicted_lesions == k) + truth3) <= 1 for k in range(1, n_components + 1))
        denominator = found + (false + (n_lesions - found)) / 2
        f1.append(found / denominator if denominator else 1.0)
    return {
        "dice": dice,
        "volume_difference_voxels": float(abs(flat_predicted.sum() - flat_truth.sum())),
        "lesion_count_difference": abs(n_predicted - n_truth),
        "lesion_f1": float(np.mean(f1)),
    }


# ---------------------------------------------------------------------------- generated pairs
def _diagonal_pair() -> tuple[np.ndarray, np.ndarray]:
    """Reference: a 2x2x2 block with a voxel touching it only at a corner and one touching it only at an edge (one
    lesion with 26-connectivity, three with 6); prediction: the block and, apart, a voxel touching a false positive
    only at a corner (one false lesion with 26-connectivity, two with 6)."""
    reference = np.zeros((10, 10, 8), np.uint8)
    reference[2:4, 2:4, 2:4] = 1
    reference[4, 4, 4] = 1  # corner only
    reference[1, 1, 3] = 1  # edge only (x and y differ, z shared)
    prediction = np.zeros_like(reference)
    prediction[2:4, 2:4, 2:4] = 1
    prediction[7, 7, 5] = prediction[8, 8, 6] = 1  # two voxels touching at a corner, far from every lesion
    return reference, prediction


def generated_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, reference, prediction): diagonal-only contacts, sparse random masks (many diagonal contacts), shifted
    blobs, and every empty case."""
    rng = np.random.default_rng(7)
    pairs = [("diagonal", *_diagonal_pair())]
    for index in range(12):
        reference = (rng.random((12, 10, 8)) < 0.07 + 0.01 * index).astype(np.uint8)
        prediction = reference.copy()
        prediction[rng.random(reference.shape) < 0.05] ^= 1
        pairs.append((f"sparse_{index}", reference, prediction))
    x, y, z = np.meshgrid(np.arange(14), np.arange(12), np.arange(9), indexing="ij")
    for index in range(6):
        reference = ((x - 6) ** 2 + (y - 6) ** 2 + 2 * (z - 4) ** 2 < 9 + 3 * index).astype(np.uint8)
        prediction = np.roll(reference, index - 2, axis=index % 3)
        pairs.append((f"blob_{index}", reference, prediction))
    blob = pairs[-1][1]
    empty = np.zeros_like(blob)
    pairs += [("empty_reference", empty, blob), ("empty_prediction", blob, empty.copy()), ("both_empty", empty, empty)]
    return pairs


PAIRS = generated_pairs()
#: Anisotropic voxels on an oblique grid: 0.9 x 1.1 x 2.5 mm, rotated 30 degrees about z.
SPACING = (0.9, 1.1, 2.5)
_ANGLE = math.radians(30)
DIRECTION = (math.cos(_ANGLE), -math.sin(_ANGLE), 0.0, math.sin(_ANGLE), math.cos(_ANGLE), 0.0, 0.0, 0.0, 1.0)


def _affine_voxel_ml() -> float:
    """|det(affine[:3, :3])| / 1000 as the ISLES 2022 container computes it: direction times spacing."""
    return abs(np.linalg.det(np.array(DIRECTION).reshape(3, 3) @ np.diag(SPACING))) / 1000


# ---------------------------------------------------------------------------- tests: one case
@pytest.mark.parametrize("name, reference, prediction", PAIRS, ids=[p[0] for p in PAIRS])
def test_isles22_protocol_matches_the_official_functions(name: str, reference: np.ndarray, prediction: np.ndarray):
    expected = isles22_official(reference, prediction, _affine_voxel_ml())
    scored = score_case(prediction, reference, SPACING, protocol="isles22")[1]
    for metric, value in expected.items():
        assert scored[metric] == pytest.approx(value, rel=1e-12, abs=1e-12), metric


@pytest.mark.parametrize("name, reference, prediction", PAIRS, ids=[p[0] for p in PAIRS])
def test_atlas2_protocol_matches_the_official_functions(name: str, reference: np.ndarray, prediction: np.ndarray):
    expected = atlas2_official(reference, prediction)
    scored = score_case(prediction, reference, SPACING, protocol="atlas2")[1]
    for metric, value in expected.items():
        # the official code divides in float32 (its loader's dtype): Dice agrees to float32 precision
        assert scored[metric] == pytest.approx(value, rel=1e-7 if metric == "dice" else 1e-12, abs=1e-12), metric


def test_six_and_twenty_six_connectivity_disagree_on_diagonal_contacts() -> None:
    """By hand: with 26-connectivity the reference is one lesion (found) and the prediction has one false lesion:
    F1 = 1 / (1 + 1/2) = 2/3, counts 1 vs 2. With 6-connectivity the reference is three lesions (one found, two
    missed) and the prediction has two false ones: F1 = 1 / (1 + 4/2) = 1/3, counts 3 vs 3."""
    reference, prediction = _diagonal_pair()
    isles = score_case(prediction, reference, SPACING, protocol="isles22")[1]
    atlas = score_case(prediction, reference, SPACING, protocol="atlas2")[1]
    assert (isles["lesion_f1"], isles["lesion_count_difference"]) == (pytest.approx(2 / 3), 1.0)
    assert (isles["lesion_tp"], isles["lesion_fp"], isles["lesion_fn"]) == (1, 1, 0)
    assert (atlas["lesion_f1"], atlas["lesion_count_difference"]) == (pytest.approx(1 / 3), 0.0)
    assert (atlas["lesion_tp"], atlas["lesion_fp"], atlas["lesion_fn"]) == (1, 2, 2)
    assert isles["dice"] == atlas["dice"] == pytest.approx(2 * 8 / (10 + 10))
    # autoseg's own protocol counts as ISLES 2022 does
    assert score_case(prediction, reference, SPACING)[1]["lesion_f1"] == isles["lesion_f1"]
    assert lesion_wise(prediction, reference, 18).num_reference == 2  # the edge joins, the corner does not


def test_empty_masks_take_the_challenges_values() -> None:
    lesion = np.zeros((6, 6, 6), np.uint8)
    lesion[2:4, 2:4, 2:4] = 1
    empty = np.zeros_like(lesion)
    voxel_ml = float(np.prod(SPACING)) / 1000
    for protocol, volume, unit in (
        ("isles22", "volume_difference_ml", voxel_ml),
        ("atlas2", "volume_difference_voxels", 1),
    ):
        both = score_case(empty, empty, SPACING, protocol=protocol)[1]
        assert {m: both[m] for m in METRICS[protocol]} == {m: (1.0 if m in ("dice", "lesion_f1") else 0.0)
                                                           for m in METRICS[protocol]}  # fmt: skip
        for prediction, reference in ((lesion, empty), (empty, lesion)):
            one = score_case(prediction, reference, SPACING, protocol=protocol)[1]
            assert (one["dice"], one["lesion_f1"], one["lesion_count_difference"]) == (0.0, 0.0, 1.0)
            assert one[volume] == pytest.approx(8 * unit)
            assert not any(math.isnan(v) for v in one.values())  # the challenges define every value


def test_challenge_protocols_refuse_what_they_do_not_define() -> None:
    mask = np.ones((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="isles22 protocol has no mDSC"):
        score_case(mask, mask, (1, 1, 1), probabilities=np.ones((1, 4, 4, 4)), protocol="isles22")
    with pytest.raises(ValueError, match="atlas2 protocol scores 3-D masks"):
        score_case(mask[0], mask[0], (1, 1), protocol="atlas2")
    with pytest.raises(ValueError, match="no challenge protocol"):
        challenge_case(mask, mask, (1, 1, 1), "autoseg")
    with pytest.raises(UnknownNameError, match="unknown evaluation protocol 'brats'; known: autoseg, isles22, atlas2"):
        get_protocol("brats")
    with pytest.raises(ValueError, match="connectivity 8 does not fit 3-D masks"):
        lesion_wise(mask, mask, 8)


def test_overlap_only_leaves_out_the_components() -> None:
    reference, prediction = _diagonal_pair()
    full = score_case(prediction, reference, SPACING, protocol="atlas2")[1]
    overlap = score_case(prediction, reference, SPACING, protocol="atlas2", overlap_only=True)[1]
    assert not any(name.startswith("lesion_") for name in overlap)
    assert overlap == {name: value for name, value in full.items() if not name.startswith("lesion_")}


# ---------------------------------------------------------------------------- tests: folders and the command
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated pairs as NIfTI files on the anisotropic oblique grid (masks stored 0/1 uint8)."""
    root = tmp_path_factory.mktemp("protocols")
    paths = {"ref": root / "ref", "pred": root / "pred", "root": root}
    for name, reference, prediction in PAIRS:
        geometry = Geometry(reference.shape, SPACING, (-40.0, 12.0, 3.0), DIRECTION)
        write_image(reference, geometry, paths["ref"] / f"{name}.nii.gz")
        write_image(prediction, geometry, paths["pred"] / f"{name}.nii.gz")
    return paths


def _official_from_files(folders: dict[str, Path], protocol: str) -> pd.DataFrame:
    """Each case read as the ISLES 2022 container reads it (SimpleITK; voxel volume from the affine) and scored by
    the re-derived official functions."""
    rows = {}
    for path in sorted(folders["ref"].glob("*.nii.gz")):
        case = path.name.removesuffix(".nii.gz")
        images = [sitk.ReadImage(str(folder / path.name)) for folder in (folders["ref"], folders["pred"])]
        reference, prediction = (sitk.GetArrayFromImage(image) for image in images)  # (Z, Y, X): order is no matter
        if protocol == "isles22":
            image = images[1]
            affine = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
            rows[case] = isles22_official(reference, prediction, abs(np.linalg.det(affine)) / 1000)
        else:
            rows[case] = atlas2_official(reference, prediction)
    return pd.DataFrame.from_dict(rows, orient="index")


@pytest.mark.parametrize("protocol", ["isles22", "atlas2"])
def test_evaluate_folders_reproduces_the_challenge_per_case_and_mean(folders: dict[str, Path], protocol: str) -> None:
    out = folders["root"] / f"out_{protocol}"
    result = evaluate_folders(folders["ref"], folders["pred"], out, num_bootstrap=50, progress=False, protocol=protocol)
    expected = _official_from_files(folders, protocol)
    table = pd.read_csv(out / "per_case.csv", index_col="case")
    assert sorted(table.index) == sorted(expected.index)
    assert set(table["protocol"]) == {protocol}
    assert set(table["lesion_connectivity"]) == {PROTOCOLS[protocol].lesion_connectivity}
    for metric in METRICS[protocol]:  # rtol: ATLAS R2.0 divides in float32
        np.testing.assert_allclose(table.loc[expected.index, metric], expected[metric], rtol=1e-7, atol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["name"] == protocol and summary["inputs"]["protocol"] == protocol
    assert summary["protocol"]["lesion_connectivity"] == PROTOCOLS[protocol].lesion_connectivity
    assert summary["protocol"]["volume_unit"] == {"isles22": "ml", "atlas2": "voxels"}[protocol]
    assert list(summary["metrics"]) == list(METRICS[protocol])  # the challenge's metrics, nothing else
    for metric in METRICS[protocol]:  # both challenges aggregate with the plain mean and the sample SD
        assert summary["metrics"][metric]["mean"] == pytest.approx(expected[metric].mean(), rel=1e-7)
        assert summary["metrics"][metric]["std"] == pytest.approx(expected[metric].std(ddof=1), rel=1e-7)
        assert summary["metrics"][metric]["n_nan"] == 0
    quartiles = pd.read_csv(out / "quartiles.csv")
    assert {f"{metric}_mean" for metric in METRICS[protocol]} <= set(quartiles.columns)
    assert "hausdorff95_mean" not in quartiles.columns
    first = format_summary_table(result).splitlines()[0]
    connectivity = PROTOCOLS[protocol].lesion_connectivity
    assert first.startswith(f"protocol: {protocol} (") and f"lesions {connectivity}-connected" in first


def test_the_two_protocols_give_different_lesion_f1_on_the_same_files(folders: dict[str, Path]) -> None:
    isles, atlas = (
        evaluate_folders(folders["ref"], folders["pred"], num_bootstrap=0, progress=False, protocol=p).per_case
        for p in ("isles22", "atlas2")
    )
    assert (isles["dice"] == atlas["dice"]).all()
    assert atlas["lesion_f1"].mean() < isles["lesion_f1"].mean()  # the sparse masks fall apart into more lesions
    # NIfTI stores the spacing in float32: the voxel volume read back is 2.475 mm³ to about 1e-7
    np.testing.assert_allclose(
        isles["volume_difference_ml"] * 1000 / np.prod(SPACING), atlas["volume_difference_voxels"], rtol=1e-6
    )


def test_command_protocol_flag_and_results_page(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = folders["root"] / "command_atlas2"
    argv = ["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-o", str(out), "--bootstrap", "20",
            "--no-progress", "--protocol", "atlas2"]  # fmt: skip
    assert evaluate_command.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("protocol: atlas2 (ATLAS R2.0 grand challenge evaluation): lesions 6-connected")
    assert "|Volume diff.| (voxels)" in printed and "HD95" not in printed
    page = write_report(out).read_text()
    assert "atlas2 (ATLAS R2.0 grand challenge evaluation): lesions 6-connected, volume difference in voxels" in page
    assert "npnl/atlas2_grand_challenge isles/scoring.py" in page and "6-connected)" in page
    assert "HD95" not in page and "|Volume diff.| (voxels)" in page


def test_command_refuses_probabilities_with_a_challenge_protocol(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = folders["root"] / "refused"
    argv = ["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-o", str(out), "--protocol", "isles22",
            "--probabilities", str(folders["pred"])]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        evaluate_command.main(argv)
    assert stopped.value.code == 2
    assert "--probabilities adds mDSC, which is no metric of the isles22 protocol" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UsageError, match="no metric of the atlas2 protocol"):
        evaluate_folders(folders["ref"], folders["pred"], out, probabilities_dir=folders["pred"], protocol="atlas2")
    assert not out.exists()
