"""Verification: every problem is named with its case and file, all are reported, nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.commands.plan import main as plan_main
from autoseg.dataset import find_dataset
from autoseg.io import Geometry, read_json, write_image
from autoseg.plan_and_preprocess import plan_and_preprocess
from autoseg.verify import VerificationError, verify_dataset

SHAPE = (12, 10, 8)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def make_dataset(root: Path, cases: int = 3, channels: int = 2) -> Path:
    """A small sound dataset: ``cases`` cases with ``channels`` channels and a lesion each."""
    folder = root / "raw" / "Dataset100_Check"
    names = {str(c): f"MR{c}" for c in range(channels)}
    description = {"channel_names": names, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps(description))
    rng = np.random.default_rng(0)
    geometry = Geometry(SHAPE, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    for index in range(cases):
        for channel in range(channels):
            write_image(rng.random(SHAPE, np.float32) + 1, geometry, folder / "imagesTr" / f"c{index}_{channel:04d}.nii.gz")
        label = np.zeros(SHAPE, np.uint8)
        label[3:6, 3:6, 2:4] = 1
        write_image(label, geometry, folder / "labelsTr" / f"c{index}.nii.gz")
    return folder


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(VerificationError) as error:
        verify_dataset(find_dataset(folder.name))
    return [str(problem) for problem in error.value.problems]


def rewrite(path: Path, array: np.ndarray | None = None, **geometry_changes) -> None:
    """Rewrite a NIfTI file with another array and/or geometry."""
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(array if array is not None else sitk.GetArrayFromImage(image))
    new.CopyInformation(image) if array is None or array.shape == sitk.GetArrayFromImage(image).shape else None
    for name, value in geometry_changes.items():
        getattr(new, f"Set{name}")(value)
    sitk.WriteImage(new, str(path))


def test_a_sound_dataset_passes(data_roots: Path) -> None:
    folder = make_dataset(data_roots)
    assert len(verify_dataset(find_dataset(folder.name))) == 3


CORRUPTIONS = {
    "truncated": (lambda f: _truncate(f / "imagesTr" / "c0_0000.nii.gz"), "c0", "c0_0000.nii.gz", "truncated"),
    "missing channel": (lambda f: (f / "imagesTr" / "c1_0001.nii.gz").unlink(), "c1", "c1_0001.nii.gz", "missing"),
    "label shape": (lambda f: rewrite(f / "labelsTr" / "c2.nii.gz", np.zeros((8, 10, 13), np.uint8)), "c2",
                    "c2.nii.gz", "shape"),
    "label spacing": (lambda f: rewrite(f / "labelsTr" / "c0.nii.gz", Spacing=(1.0, 1.0, 3.0)), "c0", "c0.nii.gz",
                      "spacing"),
    "channel origin": (lambda f: rewrite(f / "imagesTr" / "c1_0001.nii.gz", Origin=(5.0, 0.0, 0.0)), "c1",
                       "c1_0001.nii.gz", "origin"),
    "label direction": (lambda f: rewrite(f / "labelsTr" / "c1.nii.gz", Direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), "c1",
                        "c1.nii.gz", "direction"),
    "label values": (lambda f: rewrite(f / "labelsTr" / "c2.nii.gz", np.full(SHAPE[::-1], 3, np.uint8)), "c2",
                     "c2.nii.gz", "label values 3"),
    "nan": (lambda f: rewrite(f / "imagesTr" / "c0_0001.nii.gz", np.full(SHAPE[::-1], np.nan, np.float32)), "c0",
            "c0_0001.nii.gz", "NaN"),
    "4-D": (lambda f: sitk.WriteImage(sitk.Image([12, 10, 8, 2], sitk.sitkFloat32), str(f / "imagesTr" / "c1_0000.nii.gz")),
            "c1", "c1_0000.nii.gz", "4-D"),
    "2-D": (lambda f: sitk.WriteImage(sitk.Image([12, 10], sitk.sitkUInt8), str(f / "labelsTr" / "c0.nii.gz")),
            "c0", "c0.nii.gz", "2-D"),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_problem_names_case_file_and_what(data_roots: Path, name: str) -> None:
    corrupt, case, file, words = CORRUPTIONS[name]
    folder = make_dataset(data_roots)
    corrupt(folder)
    problems = problems_of(folder)
    assert any(f"case {case}:" in p and file in p and words in p for p in problems), problems


def test_all_problems_are_reported_together(data_roots: Path) -> None:
    folder = make_dataset(data_roots)
    for name in ("truncated", "missing channel", "label values"):
        CORRUPTIONS[name][0](folder)
    problems = problems_of(folder)
    assert {p.split(":")[0] for p in problems} == {"case c0", "case c1", "case c2"}


def test_empty_dataset_and_missing_keys(data_roots: Path) -> None:
    folder = make_dataset(data_roots, cases=0)
    assert "no training cases" in problems_of(folder)[0]
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}}))
    assert plan_main(["-d", folder.name, "--no-progress"]) == 1


def test_plan_exits_non_zero_and_writes_nothing(data_roots: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_dataset(data_roots)
    CORRUPTIONS["nan"][0](folder)
    CORRUPTIONS["label shape"][0](folder)
    assert plan_main(["-d", "Check", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "c0_0001.nii.gz" in error and "c2.nii.gz" in error
    assert not (data_roots / "preprocessed").exists()
    assert plan_main(["-d", "Check", "--verify", "--no-progress"]) == 1


def _erase_lesions(label_files: list[Path]) -> None:
    for path in label_files:
        image = sitk.ReadImage(str(path))
        erased = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
        erased.CopyInformation(image)
        sitk.WriteImage(erased, str(path))


def test_no_lesion_in_any_case_stops_planning_and_writes_nothing(data_roots: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    folder = make_dataset(data_roots)
    _erase_lesions(sorted((folder / "labelsTr").iterdir()))
    expected = "dataset Dataset100_Check: none of its 3 training case(s) contains a lesion"
    for arguments in (["-d", "Check"], ["-d", "Check", "--verify"], ["-d", "Check", "--budget-minutes", "5"]):
        assert plan_main([*arguments, "--no-progress"]) == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and expected in error and str(folder / "labelsTr") in error, error
    assert not (data_roots / "preprocessed").exists()
    assert not (data_roots / "compute_probes").exists(), "no machine probe for a dataset that cannot be planned"


def test_some_lesion_free_cases_are_counted_and_named(tiny_atlas: Path) -> None:
    _erase_lesions([tiny_atlas / "labelsTr" / "atlas_0002.nii.gz"])
    result = plan_and_preprocess("ATLASTiny", progress=False)
    aggregate = read_json(result.fingerprint_path)["aggregate"]
    assert aggregate["cases_without_lesion"] == 1 and aggregate["lesion_free_cases"] == ["atlas_0002"]
    assert len(result.preprocessed["3d_resunet"]) == 4
