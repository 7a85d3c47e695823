"""Verification: every problem is named with its case and file, all are reported, nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HOSTILE_HEADERS

from autoseg.api.plan import plan_and_preprocess
from autoseg.commands.plan import main as plan_main
from autoseg.data.dataset import DatasetError, find_dataset, load_dataset
from autoseg.data.verify import VerificationError, check_dataset, verify_dataset
from autoseg.io.files import read_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import _read_nifti_voxels, write_image

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
            write_image(
                rng.random(SHAPE, np.float32) + 1, geometry, folder / "imagesTr" / f"c{index}_{channel:04d}.nii.gz"
            )
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
    "label shape": (
        lambda f: rewrite(f / "labelsTr" / "c2.nii.gz", np.zeros((8, 10, 13), np.uint8)),
        "c2",
        "c2.nii.gz",
        "shape",
    ),
    "label spacing": (
        lambda f: rewrite(f / "labelsTr" / "c0.nii.gz", Spacing=(1.0, 1.0, 3.0)),
        "c0",
        "c0.nii.gz",
        "spacing",
    ),
    "channel origin": (
        lambda f: rewrite(f / "imagesTr" / "c1_0001.nii.gz", Origin=(5.0, 0.0, 0.0)),
        "c1",
        "c1_0001.nii.gz",
        "origin",
    ),
    # Rotated by 30 degrees: no reorientation (which only permutes and flips axes) brings it onto the image's grid.
    "label direction": (
        lambda f: rewrite(f / "labelsTr" / "c1.nii.gz", Direction=(0.8660254, -0.5, 0, 0.5, 0.8660254, 0, 0, 0, 1)),
        "c1",
        "c1.nii.gz",
        "direction",
    ),
    "label values": (
        lambda f: rewrite(f / "labelsTr" / "c2.nii.gz", np.full(SHAPE[::-1], 3, np.uint8)),
        "c2",
        "c2.nii.gz",
        "label values 3",
    ),
    "nan": (
        lambda f: rewrite(f / "imagesTr" / "c0_0001.nii.gz", np.full(SHAPE[::-1], np.nan, np.float32)),
        "c0",
        "c0_0001.nii.gz",
        "NaN",
    ),
    "4-D": (
        lambda f: sitk.WriteImage(sitk.Image([12, 10, 8, 2], sitk.sitkFloat32), str(f / "imagesTr" / "c1_0000.nii.gz")),
        "c1",
        "c1_0000.nii.gz",
        "4-D",
    ),
    "2-D": (
        lambda f: sitk.WriteImage(sitk.Image([12, 10], sitk.sitkUInt8), str(f / "labelsTr" / "c0.nii.gz")),
        "c0",
        "c0.nii.gz",
        "2-D",
    ),
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


def test_hostile_headers_are_problems_naming_the_file_found_without_reading_voxels(
    data_roots: Path, hostile_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hostile header (conftest ``HOSTILE_HEADERS``) in a channel or label file is one problem naming its case,
    file and what is wrong; planning stops at verification (nothing is fingerprinted or allocated from them)."""
    folder = make_dataset(data_roots, cases=len(HOSTILE_HEADERS) + 1, channels=1)
    files = [folder / "imagesTr" / f"c{index}_0000.nii.gz" for index in range(len(HOSTILE_HEADERS) - 1)]
    files.append(folder / "labelsTr" / f"c{len(HOSTILE_HEADERS) - 1}.nii.gz")
    for path, kind in zip(files, HOSTILE_HEADERS):
        hostile_image(path, kind)
    problems = problems_of(folder)
    assert len(problems) == len(HOSTILE_HEADERS), problems
    for index, (path, words) in enumerate(zip(files, HOSTILE_HEADERS.values())):
        assert any(p.startswith(f"case c{index}: {path}: ") and words in p for p in problems), (words, problems)
    reads = []
    monkeypatch.setattr(
        "autoseg.io.images._read_nifti_voxels", lambda path: reads.append(path) or _read_nifti_voxels(path)
    )
    problems_of(folder)
    assert reads and not set(reads) & set(files)  # the header alone refused them: no voxel of theirs was read
    assert plan_main(["-d", folder.name, "--no-progress"]) == 1
    assert not (data_roots / "preprocessed" / folder.name / "fingerprint.json").exists()


def test_planning_refuses_a_case_too_large_at_the_target_spacing_before_resampling_it(
    data_roots: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Sound headers (verification passes), but one case of 16³ voxels of 100 mm among 1 mm cases: at the planned
    ~1 mm it would be 1600 x 1600 x 800 voxels, more than a 1 GiB machine takes; planning fails naming the case in
    one line, before allocating it."""
    monkeypatch.setattr("autoseg.io.headers.physical_memory_bytes", lambda: 1 << 30)
    folder = make_dataset(data_roots, cases=4, channels=1)
    geometry = Geometry((16, 16, 16), (100.0, 100.0, 100.0), (0.0, 0.0, 0.0), IDENTITY)
    image = folder / "imagesTr" / "c3_0000.nii.gz"
    write_image(np.random.default_rng(0).random((16, 16, 16), np.float32) + 1, geometry, image)
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    write_image(label, geometry, folder / "labelsTr" / "c3.nii.gz")
    assert len(verify_dataset(find_dataset(folder.name))) == 4
    assert plan_main(["-d", folder.name, "--no-progress", "-np", "1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: case c3 ({image}): resampled from its voxel size [100, 100, 100] mm to the plan")
    assert "voxels (1600 x 1600 x 800), more than the 3.36e+07 this machine's 1 GiB of memory allow" in error


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


def test_no_lesion_in_any_case_stops_planning_and_writes_nothing(
    data_roots: Path, capsys: pytest.CaptureFixture
) -> None:
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


def test_lesion_voxels_where_the_image_is_zero_are_a_note_per_case(
    data_roots: Path, capsys: pytest.CaptureFixture
) -> None:
    """Skull stripping cut off half of c1's lesion: not an error, but the report says how many voxels, per case."""
    folder = make_dataset(data_roots)
    for channel in (0, 1):
        path = folder / "imagesTr" / f"c1_{channel:04d}.nii.gz"
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (z, y, x); the lesion is x, y 3..5, z 2..3
        array[:, :, :5] = 0  # x < 5: two of the lesion's three columns
        rewrite(path, array)
    report = check_dataset(find_dataset("Check"), progress=False)
    assert len(report.cases) == 3
    assert [str(note) for note in report.notes] == [
        f"case c1: {folder / 'labelsTr' / 'c1.nii.gz'}: note: 12 lesion voxel(s) lie where the image is zero "
        "(outside its non-zero region, e.g. removed by skull stripping); preprocessing keeps them"
    ]
    assert plan_main(["-d", "Check", "--verify", "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "case c1:" in output and "note: 12 lesion voxel(s)" in output and "(1 note(s) above)" in output


def test_a_label_stored_in_another_orientation_of_the_same_grid_is_sound(data_roots: Path, reoriented_copy) -> None:
    folder = make_dataset(data_roots)
    label = folder / "labelsTr" / "c0.nii.gz"
    reoriented_copy(label, label, "ASL")
    assert len(verify_dataset(find_dataset("Check"), progress=False)) == 3


def test_qform_sform_disagreement_is_a_note_of_each_file(data_roots: Path) -> None:
    """Registration moved the sform of every file of c2 by (10, -5, 3) mm: one note per file, saying which is used."""
    import nibabel

    folder = make_dataset(data_roots)
    paths = [
        folder / "imagesTr" / "c2_0000.nii.gz",
        folder / "imagesTr" / "c2_0001.nii.gz",
        folder / "labelsTr" / "c2.nii.gz",
    ]
    for path in paths:
        image = nibabel.load(str(path))
        moved = image.affine.copy()
        moved[:3, 3] += (10.0, -5.0, 3.0)
        image = nibabel.Nifti1Image(np.asarray(image.dataobj), None, image.header)
        image.set_sform(moved, 1)
        nibabel.save(image, str(path))
    notes = [str(note) for note in check_dataset(find_dataset("Check"), progress=False).notes]
    assert len(notes) == 3
    for note, path in zip(notes, paths):
        assert note.startswith(f"case c2: {path}: note: qform (code 1, scanner) and sform (code 1, scanner) disagree")
        assert "autoseg resamples and predicts with the sform" in note


def test_notes_follow_the_problems_they_may_explain(data_roots: Path) -> None:
    """Only c2's image had its sform moved: the label's origin then disagrees with the image (a problem), and the
    qform/sform note that explains it is printed with it rather than held back until the problem is fixed."""
    import nibabel

    folder = make_dataset(data_roots)
    for channel in (0, 1):
        path = folder / "imagesTr" / f"c2_000{channel}.nii.gz"
        image = nibabel.load(str(path))
        moved = image.affine.copy()
        moved[:3, 3] += (10.0, -5.0, 3.0)
        image = nibabel.Nifti1Image(np.asarray(image.dataobj), None, image.header)
        image.set_sform(moved, 1)
        nibabel.save(image, str(path))
    with pytest.raises(VerificationError) as raised:
        check_dataset(find_dataset("Check"), progress=False)
    message = str(raised.value)
    assert "label disagrees with image (image vs label): origin" in message
    assert "note(s):" in message and "c2_0000.nii.gz: note: qform (code 1, scanner) and sform" in message
    assert message.index("problem(s) found") < message.index("note(s):")
    assert len(raised.value.notes) == 2


def _relabel(folder: Path, labels: dict[str, int], lesion: float, dtype: type = np.uint8) -> None:
    """Declare ``labels`` in ``dataset.json`` and store every lesion voxel of the label files as ``lesion``."""
    description = read_json(folder / "dataset.json")
    (folder / "dataset.json").write_text(json.dumps({**description, "labels": labels}))
    for path in sorted((folder / "labelsTr").iterdir()):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        rewrite(path, np.where(array > 0, lesion, 0).astype(dtype))


@pytest.mark.parametrize(
    ("lesion", "dtype"), [(255, np.uint8), (300, np.uint16), (1000, np.int16)], ids=["255", "300", "1000"]
)
def test_declared_label_values_other_than_one_are_sound(data_roots: Path, lesion: int, dtype: type) -> None:
    folder = make_dataset(data_roots)
    _relabel(folder, {"background": 0, "lesion": lesion}, lesion, dtype)
    report = check_dataset(find_dataset(folder.name), progress=False)
    assert len(report.cases) == 3 and report.notes == []


def test_label_values_not_declared_are_named_with_their_file(data_roots: Path) -> None:
    """0/1 label files under ``"lesion": 255``, and 0/255 files under the usual ``"lesion": 1``: each file named with
    the values it holds that ``dataset.json`` does not declare."""
    folder = make_dataset(data_roots)
    description = read_json(folder / "dataset.json")
    (folder / "dataset.json").write_text(json.dumps({**description, "labels": {"background": 0, "lesion": 255}}))
    assert problems_of(folder) == [
        f"case c{i}: {folder / 'labelsTr' / f'c{i}.nii.gz'}: label values 1 not in dataset.json labels [0, 255]"
        for i in range(3)
    ]
    folder = make_dataset(data_roots / "other")
    _relabel(folder, {"background": 0, "lesion": 1}, 255)
    with pytest.raises(VerificationError) as error:
        verify_dataset(load_dataset(folder))
    assert [str(p) for p in error.value.problems][0].endswith(
        "c0.nii.gz: label values 255 not in dataset.json labels [0, 1]"
    )


def test_almost_integer_label_values_are_rounded_with_a_note(data_roots: Path) -> None:
    """A float mask from a resampling tool (0.99999994 for 1) is sound, with a note naming the file; a value far
    from every integer is a problem naming the file and the value."""
    folder = make_dataset(data_roots)
    label = folder / "labelsTr" / "c1.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    rewrite(label, np.where(array > 0, np.float32(0.99999994), 0).astype(np.float32))
    report = check_dataset(find_dataset(folder.name), progress=False)
    assert [str(note) for note in report.notes] == [
        f"case c1: {label}: note: label values 0.99999994 rounded to the nearest integers (a float mask, e.g. from a "
        "resampling tool)"
    ]
    rewrite(label, np.where(array > 0, 0.6, 0).astype(np.float32))
    assert problems_of(folder) == [f"case c1: {label}: label values 0.6 are not integers"]


def test_a_negative_declared_label_is_refused_for_what_it_is(data_roots: Path) -> None:
    """``"lesion": -5`` with int16 label files holding -5: dataset.json's labels are refused as negative, once, not
    each label file as holding values "not in" the very labels it declares."""
    folder = make_dataset(data_roots)
    _relabel(folder, {"background": 0, "lesion": -5}, -5, np.int16)
    with pytest.raises(DatasetError, match=r"label value\(s\) \[-5\] outside 0\.\.2147483647 \(label values are never"):
        load_dataset(folder)
