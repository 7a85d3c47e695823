"""``autoseg_find_best`` compares the planned options (``autoseg.evaluate.option_effects``) on fake cross-validation outputs.

Twelve generated 24³ cases (2 mm) with one or two cube lesions, and the ``validation/CASE_probabilities.npz`` files
training would leave for four members of one histeq plan: ``3d_resunet/ZoomInOutTrainer`` (the baseline: lesions
shifted by one voxel), ``3d_resunet_sym/ZoomInOutTrainer`` (clearly better: the reference itself),
``3d_resunet_histeq/ZoomInOutTrainer`` (clearly worse: shifted by three voxels, plus a false positive) and
``3d_resunet/AcuteStrokeTrainer`` (a little better than the baseline: the small lesions found in place).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from autoseg.api.select import find_best
from autoseg.commands.find_best import main as find_best_main
from autoseg.data.dataset import load_dataset
from autoseg.errors import UsageError
from autoseg.evaluate.option_effects import Pairing, describe_options, find_pairings, paired_differences
from autoseg.io.files import write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image, write_image
from autoseg.plan.fingerprint import compute_fingerprint
from autoseg.plans import Plans
from planners import get_planner

NAME = "Dataset971_Options"
ZOOM, ACUTE = "ZoomInOutTrainer", "AcuteStrokeTrainer"
SPACING = (2.0, 2.0, 2.0)
CASES = [f"case_{k:02d}" for k in range(12)]


@pytest.fixture(scope="module")
def histeq_plans(tiny_sources: dict[str, Path]) -> Plans:
    """The DefaultPlanner's histeq plan of the tiny ATLAS-like data: 3d_resunet, its _sym, _histeq, _sym_histeq."""
    fingerprint = compute_fingerprint(load_dataset(tiny_sources["atlas"]), 1, progress=False)
    plans = get_planner("DefaultPlanner")(fingerprint, normalization="histeq").plan()
    assert sorted(plans.configurations) == [
        "3d_resunet",
        "3d_resunet_histeq",
        "3d_resunet_sym",
        "3d_resunet_sym_histeq",
    ]
    assert plans.configuration().schedule.trainer == ZOOM
    return plans


def _reference(rng: np.random.Generator, index: int) -> np.ndarray:
    label = np.zeros((24, 24, 24), np.uint8)
    side = int(rng.integers(5, 8))
    x, y, z = rng.integers(5, 19 - side, 3)
    label[x : x + side, y : y + side, z : z + side] = 1
    if index % 2:  # a small second lesion, well apart
        label[19:21, 19:21, 19:21] = 1
    return label


def _shifted(mask: np.ndarray, voxels: int, small_too: bool = True) -> np.ndarray:
    moved = np.roll(mask, voxels, axis=0)
    if not small_too:  # the small lesion (x >= 19) found in place
        moved[17:] = mask[17:]
    return moved


def _members_outputs(reference: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    histeq = _shifted(reference, 3)
    histeq[2:5, 2:5, 19:22] = 1  # a false positive
    masks = {
        ("3d_resunet", ZOOM): _shifted(reference, 1),
        ("3d_resunet_sym", ZOOM): reference,
        ("3d_resunet_histeq", ZOOM): histeq,
        ("3d_resunet", ACUTE): _shifted(reference, 1, small_too=False),
    }
    return {member: (0.1 + 0.8 * mask).astype(np.float32) for member, mask in masks.items()}


@pytest.fixture
def selection_home(histeq_plans: Plans, data_roots: Path) -> Path:
    """Raw labels, the plans, and two folds of validation outputs per member (even cases fold 0, odd fold 1)."""
    raw = data_roots / "raw" / NAME
    write_json(
        {
            "channel_names": {"0": "T1"},
            "labels": {"background": 0, "lesion": 1},
            "file_ending": ".nii.gz",
            "numTraining": len(CASES),
        },
        raw / "dataset.json",
    )
    geometry = Geometry((24, 24, 24), SPACING, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    plans = dataclasses.replace(histeq_plans, dataset=NAME)
    plans.to_json(data_roots / "preprocessed" / NAME / "plans.json")
    rng = np.random.default_rng(0)
    for index, case in enumerate(CASES):
        write_image(np.zeros((24, 24, 24), np.float32), geometry, raw / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(_reference(rng, index), geometry, raw / "labelsTr" / f"{case}.nii.gz")
        reference = read_image(raw / "labelsTr" / f"{case}.nii.gz", np.uint8)[0]  # as find_best reads it
        for (configuration, trainer), probabilities in _members_outputs(reference).items():
            fold = data_roots / "results" / NAME / configuration / trainer / f"fold_{index % 2}"
            (fold / "validation").mkdir(parents=True, exist_ok=True)
            (fold / "checkpoint_final.pth").touch()
            plans.to_json(fold / "plans.json")
            np.savez_compressed(
                fold / "validation" / f"{case}_probabilities.npz", probabilities=probabilities[None].astype(np.float16)
            )
    return data_roots


# ---------------------------------------------------------------------------- an independent computation
def _surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    structure = np.ones((3, 3, 3), bool)
    points = [
        np.argwhere(m & ~ndimage.binary_erosion(m, structure, border_value=0)) * np.array(SPACING) for m in (a, b)
    ]
    distances = cdist(*points)
    return np.concatenate([distances.min(axis=1), distances.min(axis=0)])


def _metrics(prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice, lesion-wise F1 (26-connected components) and HD95 (all pairwise surface distances), brute force."""
    overlap = (prediction & reference).sum()
    predicted, found = (ndimage.label(m, np.ones((3, 3, 3)))[0] for m in (prediction, reference))
    tp = len(set(np.unique(found[prediction & reference])) - {0})
    fp = predicted.max() - len(set(np.unique(predicted[prediction & reference])) - {0})
    fn = found.max() - tp
    return {
        "dice": 2 * overlap / (prediction.sum() + reference.sum()),
        "lesion_f1": 2 * tp / (2 * tp + fp + fn),
        "hausdorff95": float(np.percentile(_surface_distances(prediction, reference), 95)),
    }


def _expected_differences(home: Path, candidate: tuple[str, str], baseline: tuple[str, str]) -> dict[str, float]:
    values = {"dice": [], "lesion_f1": [], "hausdorff95": []}
    for case in CASES:
        reference = read_image(home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz", np.uint8)[0] > 0
        outputs = _members_outputs(reference.astype(np.uint8))
        first, second = (_metrics(outputs[m] >= 0.5, reference) for m in (candidate, baseline))
        for metric in values:
            values[metric].append(first[metric] - second[metric])
    return {metric: float(np.mean(v)) for metric, v in values.items()}


# ---------------------------------------------------------------------------- tests
def test_find_best_keeps_the_better_option_and_drops_the_worse_with_paired_differences(
    selection_home: Path, capsys: pytest.CaptureFixture
) -> None:
    assert find_best_main(["--metric", "dice", "--no-progress"]) == 0  # every trainer of each configuration
    printed = capsys.readouterr().out
    selection = find_best(metric="dice", progress=False)
    assert selection["chosen"]["members"] == [f"3d_resunet_sym/{ZOOM}"]
    assert {tuple(c["members"]) for c in selection["candidates"] if len(c["members"]) == 1} == {
        (f"3d_resunet/{ZOOM}",),
        (f"3d_resunet/{ACUTE}",),
        (f"3d_resunet_sym/{ZOOM}",),
        (f"3d_resunet_histeq/{ZOOM}",),
    }
    options = {(o["option"], o["candidate"], o["baseline"]): o for o in selection["options"]}
    symmetric = options[("symmetric channels", f"3d_resunet_sym/{ZOOM}", f"3d_resunet/{ZOOM}")]
    histeq = options[("histogram equalization", f"3d_resunet_histeq/{ZOOM}", f"3d_resunet/{ZOOM}")]
    trainer = options[("trainer", f"3d_resunet/{ACUTE}", f"3d_resunet/{ZOOM}")]
    for option in (symmetric, histeq, trainer):
        differences = option["differences"]
        assert differences["cases"] == len(CASES)
        expected = _expected_differences(
            selection_home, *(tuple(option[k].split("/")) for k in ("candidate", "baseline"))
        )
        for metric, value in expected.items():
            assert differences[metric]["mean"] == pytest.approx(value, abs=1e-9)
            low, high = differences[metric]["ci95"]
            assert low <= differences[metric]["mean"] <= high
            assert differences[metric]["n"] == len(CASES)

    assert symmetric["verdict"] == "kept" and symmetric["differences"]["dice"]["ci95"][0] > 0
    assert symmetric["reason"].startswith("kept: Dice +0.")
    assert symmetric["reason"].endswith(f"on 12 cases; in the chosen 3d_resunet_sym/{ZOOM}")
    assert histeq["verdict"] == "dropped" and histeq["differences"]["dice"]["ci95"][1] < 0
    assert histeq["differences"]["hausdorff95"]["mean"] > 0 and histeq["differences"]["lesion_f1"]["mean"] < 0
    assert histeq["reason"].startswith("dropped: Dice \u22120.") and histeq["reason"].endswith("on 12 cases")
    assert trainer["verdict"] == "dropped" and trainer["differences"]["dice"]["mean"] > 0
    assert trainer["reason"].endswith(f"but the chosen 3d_resunet_sym/{ZOOM} scored higher")

    # options nobody trained are listed with the command that would train them
    untrained = options[("symmetric channels", f"3d_resunet_sym_histeq/{ZOOM}", f"3d_resunet_histeq/{ZOOM}")]
    assert untrained["verdict"] == "not trained"
    assert untrained["commands"] == [f"autoseg_train -d {NAME} -c 3d_resunet_sym_histeq -f all -tr {ZOOM}"]
    acute_sym = options[("trainer", f"3d_resunet_sym/{ACUTE}", f"3d_resunet_sym/{ZOOM}")]
    assert acute_sym["verdict"] == "not trained" and acute_sym["commands"] == [
        f"autoseg_train -d {NAME} -c 3d_resunet_sym -f all -tr {ACUTE}"
    ]
    assert {o["verdict"] for o in selection["options"]} == {"kept", "dropped", "not trained"}

    # the printed summary says the same
    assert f"symmetric channels: 3d_resunet_sym/{ZOOM} vs 3d_resunet/{ZOOM}: {symmetric['reason']}" in printed
    assert f"histogram equalization: 3d_resunet_histeq/{ZOOM} vs 3d_resunet/{ZOOM}: {histeq['reason']}" in printed
    assert "lesion F1 \u22120." in printed and " mm [" in printed
    assert f"to compare: autoseg_train -d {NAME} -c 3d_resunet_sym -f all -tr {ACUTE}" in printed


def test_options_left_out_by_the_command_line_are_said_to_be(selection_home: Path) -> None:
    selection = find_best(
        configurations=["3d_resunet", "3d_resunet_histeq"], trainers=[ZOOM], metric="dice", progress=False
    )
    assert selection["chosen"]["members"] == [f"3d_resunet/{ZOOM}"]
    verdicts = {(o["option"], o["candidate"]): o["verdict"] for o in selection["options"]}
    assert verdicts[("symmetric channels", f"3d_resunet_sym/{ZOOM}")] == "left out"
    assert verdicts[("trainer", f"3d_resunet/{ACUTE}")] == "left out"
    assert verdicts[("histogram equalization", f"3d_resunet_histeq/{ZOOM}")] == "dropped"


def test_options_that_were_not_planned_say_why_and_how(histeq_plans: Plans) -> None:
    zscore = {name: c for name, c in histeq_plans.configurations.items() if not name.endswith("_histeq")}
    pairings = find_pairings(
        {"3d_resunet": zscore["3d_resunet"]},
        {"3d_resunet": [ZOOM]},
        symmetry_reason="no mid-sagittal plane in 3 of 10 cases",
    )
    assert pairings == [
        Pairing(
            "symmetric channels",
            ("3d_resunet_sym", ZOOM),
            ("3d_resunet", ZOOM),
            "no mid-sagittal plane in 3 of 10 cases",
        ),
        Pairing(
            "histogram equalization",
            ("3d_resunet_histeq", ZOOM),
            ("3d_resunet", ZOOM),
            "3d_resunet_histeq is not in the plans (autoseg_plan --normalization histeq adds it)",
        ),
        Pairing("trainer", ("3d_resunet", ACUTE), ("3d_resunet", ZOOM)),
    ]
    entries = describe_options(pairings, "D", [("3d_resunet", ZOOM)], [("3d_resunet", ZOOM)], {}, [])
    assert [e["verdict"] for e in entries] == ["not trained", "not planned", "not planned"]
    assert entries[0]["commands"] == [f"autoseg_train -d D -c 3d_resunet -f all -tr {ACUTE}"]
    assert (
        entries[1]["reason"] == "not planned: no mid-sagittal plane in 3 of 10 cases" and entries[1]["commands"] == []
    )
    assert entries[2]["commands"] == [
        "autoseg_plan -d D --normalization histeq",
        f"autoseg_train -d D -c 3d_resunet_histeq -f all -tr {ZOOM}",
    ]


def test_paired_differences_use_the_cases_both_validated_and_skip_missing_distances() -> None:
    candidate = {
        "a": {"dice": 0.9, "lesion_f1": 1.0, "hausdorff95": 2.0},
        "b": {"dice": 0.5, "lesion_f1": 0.5, "hausdorff95": float("nan")},
        "c": {"dice": 0.1, "lesion_f1": 0.0, "hausdorff95": 9.0},
    }
    baseline = {
        "a": {"dice": 0.7, "lesion_f1": 1.0, "hausdorff95": 4.0},
        "b": {"dice": 0.6, "lesion_f1": 1.0, "hausdorff95": 3.0},
    }
    result = paired_differences(candidate, baseline)
    assert result["cases"] == 2
    assert result["dice"]["mean"] == pytest.approx(0.05) and result["dice"]["n"] == 2
    assert result["lesion_f1"]["mean"] == pytest.approx(-0.25)
    assert result["hausdorff95"] == {"mean": -2.0, "ci95": [-2.0, -2.0], "n": 1}
    low, high = result["dice"]["ci95"]
    assert -0.1 - 1e-12 <= low <= 0.05 <= high <= 0.2 + 1e-12  # resampled means of {+0.2, -0.1}
    assert paired_differences(candidate, baseline) == result  # fixed seed


def test_a_member_of_the_chosen_ensemble_that_is_worse_alone_says_so() -> None:
    """Kept, since the ensemble uses it, but the reason does not present a loss as a gain."""
    from autoseg.evaluate.option_effects import Pairing, _verdict

    def metrics(dice: float) -> dict[str, float]:
        return {"dice": dice, "lesion_f1": dice, "hausdorff95": 1.0}

    acute, zoom, symmetric = (
        ("3d_resunet", "AcuteStrokeTrainer"),
        ("3d_resunet", "ZoomInOutTrainer"),
        ("3d_resunet_sym", "ZoomInOutTrainer"),
    )
    scores = {acute: {f"c{i}": metrics(0.4) for i in range(4)}, zoom: {f"c{i}": metrics(0.6) for i in range(4)}}
    verdict = _verdict(Pairing("trainer", acute, zoom), scores, [acute, symmetric])
    assert verdict["verdict"] == "kept"
    assert verdict["reason"].startswith(
        "kept as a member of the chosen ensemble 3d_resunet/AcuteStrokeTrainer + "
        "3d_resunet_sym/ZoomInOutTrainer, although alone it scores below its baseline"
    )
    alone = _verdict(Pairing("trainer", acute, zoom), scores, [acute])
    assert alone["reason"].startswith("kept: Dice")


def test_the_grid_leaves_out_minimum_sizes_that_prediction_would_refuse(tmp_path: Path) -> None:
    """With 5 mm voxels (125 mm³), 1000 voxels would be 125 ml, above MAX_MIN_LESION_MM3: the grid stops below it,
    so autoseg_find_best never writes a postprocessing.json that autoseg_predict refuses."""
    from autoseg.api.select import MIN_SIZES_VOXELS, _grid_search
    from autoseg.plans import MAX_MIN_LESION_MM3

    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    geometry = Geometry(
        shape=(8, 8, 8), spacing=(5.0, 5.0, 5.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())
    )
    write_image(label, geometry, tmp_path / "case.nii.gz")
    np.savez_compressed(tmp_path / "case_probabilities.npz", probabilities=label[None].astype(np.float32))
    grid = _grid_search(
        [{"case": tmp_path / "case_probabilities.npz"}],
        ["case"],
        {"case": tmp_path / "case.nii.gz"},
        "dice",
        False,
        {"background": 0, "lesion": 1},
    )
    sizes = sorted({g["min_lesion_voxels"] for g in grid})
    assert (
        sizes == [s for s in MIN_SIZES_VOXELS if s <= 800]
        and max(g["min_lesion_mm3"] for g in grid) <= MAX_MIN_LESION_MM3
    )


# ---------------------------------------------------------------------------- the challenges' protocols
def _atlas2_metrics(prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The ATLAS R2.0 scorer re-derived (6-connected lesions: scipy's default structure; volume in voxels)."""
    predicted, found = (ndimage.label(m)[0] for m in (prediction, reference))
    tp = len(set(np.unique(found[prediction & reference])) - {0})
    fp = predicted.max() - len(set(np.unique(predicted[prediction & reference])) - {0})
    fn = found.max() - tp
    return {
        "dice": 2 * (prediction & reference).sum() / (prediction.sum() + reference.sum()),
        "volume_difference_voxels": abs(int(prediction.sum()) - int(reference.sum())),
        "lesion_count_difference": abs(int(predicted.max()) - int(found.max())),
        "lesion_f1": tp / (tp + (fp + fn) / 2),
    }


def _without_small_lesions(mask: np.ndarray, voxels: int) -> np.ndarray:
    """Post-processing's minimum size, re-derived: 26-connected components of fewer voxels removed."""
    components, count = ndimage.label(mask, np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    return mask & (sizes[components] >= voxels)


def test_find_best_under_the_atlas2_protocol_ranks_the_grid_by_the_challenges_mean_rank(
    selection_home: Path, capsys: pytest.CaptureFixture
) -> None:
    metrics = ["dice", "volume_difference_voxels", "lesion_count_difference", "lesion_f1"]
    assert find_best_main(["--protocol", "atlas2", "-c", "3d_resunet", "-tr", ZOOM, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    selection = json.loads((selection_home / "results" / NAME / "model_selection.json").read_text())
    postprocessing = json.loads((selection_home / "results" / NAME / "postprocessing.json").read_text())
    assert selection["protocol"]["name"] == "atlas2" and selection["protocol"]["lesion_connectivity"] == 6
    assert selection["metric"] == postprocessing["metric"] == "mean_rank" and postprocessing["protocol"] == "atlas2"
    assert printed.startswith("protocol: atlas2 (ATLAS R2.0 grand challenge evaluation): lesions 6-connected")

    # the grid's means, re-derived at two points: the member's masks (baseline: lesions shifted by one voxel)
    # as they are, and without lesions under 10 voxels (which drops the small 2x2x2 lesions)
    points = {(g["threshold"], g["min_lesion_voxels"]): g for g in selection["grid"]}
    for size in (0, 10):
        values = {name: [] for name in metrics}
        for case in CASES:
            reference = read_image(selection_home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz", np.uint8)[0] > 0
            member = _members_outputs(reference.astype(np.uint8))[("3d_resunet", ZOOM)] >= 0.5
            for name, value in _atlas2_metrics(_without_small_lesions(member, size), reference).items():
                values[name].append(value)
        expected = {name: float(np.mean(found)) for name, found in values.items()}
        assert points[(0.5, size)]["means"] == pytest.approx(expected, abs=1e-9)
    assert points[(0.5, 10)]["means"]["lesion_f1"] < points[(0.5, 0)]["means"]["lesion_f1"]

    # the mean rank of every point, re-derived: rank = 1 + points strictly better + half the other tied points
    grid = selection["grid"]
    for point in grid:
        ranks = []
        for name in metrics:
            sign = 1 if name in ("dice", "lesion_f1") else -1
            mine = sign * point["means"][name]
            better = sum(sign * other["means"][name] > mine for other in grid)
            tied = sum(sign * other["means"][name] == mine for other in grid) - 1
            ranks.append(1 + better + tied / 2)
        assert point["score"] == pytest.approx(np.mean(ranks))
    best = min(g["score"] for g in grid)
    # every threshold gives the same masks, so the tie goes to 0.5; removing lesions only loses
    assert postprocessing["score"] == best
    assert (postprocessing["threshold"], postprocessing["min_lesion_voxels"]) == (0.5, 0)
    assert f"mean_rank {best:.4f}" in printed and "its means: dice " in printed


def test_find_best_option_differences_use_the_protocols_metrics(selection_home: Path) -> None:
    selection = find_best(metric="dice", progress=False, protocol="atlas2")
    options = {(o["option"], o["candidate"]): o for o in selection["options"]}
    histeq = options[("histogram equalization", f"3d_resunet_histeq/{ZOOM}")]
    differences = histeq["differences"]
    assert [name for name in differences if name != "cases"] == [
        "dice",
        "volume_difference_voxels",
        "lesion_count_difference",
        "lesion_f1",
    ]
    expected = {name: [] for name in differences if name != "cases"}
    for case in CASES:
        reference = read_image(selection_home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz", np.uint8)[0] > 0
        outputs = _members_outputs(reference.astype(np.uint8))
        candidate, baseline = (
            _atlas2_metrics(outputs[m] >= 0.5, reference) for m in (("3d_resunet_histeq", ZOOM), ("3d_resunet", ZOOM))
        )
        for name in expected:
            expected[name].append(candidate[name] - baseline[name])
    for name, values in expected.items():
        assert differences[name]["mean"] == pytest.approx(np.mean(values), abs=1e-9)
    assert differences["lesion_count_difference"]["mean"] > 0  # the false positive adds a lesion


def test_find_best_refuses_a_metric_the_protocol_has_not(selection_home: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError, match="metric 'dice_hausdorff' is not one of the isles22 protocol's: mean_rank"):
        find_best(metric="dice_hausdorff", progress=False, protocol="isles22")
    assert find_best_main(["--protocol", "autoseg", "--metric", "mean_rank", "--no-progress"]) == 1
    assert "metric 'mean_rank' is not one of the autoseg protocol's: dice_hausdorff, dice" in capsys.readouterr().err
