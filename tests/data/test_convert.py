"""autoseg_convert: tiny fake releases in each public dataset's own layout become raw datasets that pass autoseg's
verification, with the right channels, subjects and 0/1 labels; a malformed tree is reported file by file and
nothing is written."""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pytest
from conftest import grid_points, oblique_geometry, phantom_lesion, rotation_matrix, sample_phantom

from autoseg.commands.convert import main as convert_main
from autoseg.data.converters import common
from autoseg.data.converters.common import binarize
from autoseg.data.coregistration import ChannelFit
from autoseg.data.dataset import find_dataset, new_dataset_folder
from autoseg.data.verify import verify_dataset
from autoseg.io.files import DiskFullError, read_json
from autoseg.io.geometry import Geometry, canonical_geometry
from autoseg.io.images import read_image, write_image
from autoseg.io.typed_json import from_plain
from autoseg.paths import raw_root

SHAPE = (6, 5, 4)
ATLAS_SPACE = "space-MNI152NLin2009aSym"


def nifti(
    path: Path,
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (-3.0, -2.0, -1.0),
) -> Path:
    """Write a NIfTI file as the releases do (nibabel, qform and sform both set)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, affine), str(path))
    return path


def lesion(value: float = 1.0, dtype: type = np.uint8, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype)
    mask[1:3, 1:3, 1:3] = value
    return mask


def image(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, np.float32) + 1.0


# ------------------------------------------------------------------------------------------------
# Fake releases
# ------------------------------------------------------------------------------------------------


def atlas_subject(root: Path, split: str, site: str, subject: str, mask: np.ndarray | None) -> Path:
    anat = root / split / site / f"sub-{subject}" / "ses-1" / "anat"
    stem = f"sub-{subject}_ses-1_{ATLAS_SPACE}"
    t1 = nifti(anat / f"{stem}_T1w.nii.gz", image(len(subject) + ord(subject[-1])))
    if mask is not None:
        nifti(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz", mask)
    return t1


def make_atlas2(root: Path) -> Path:
    """ATLAS R2.0: two sites, three training subjects (masks stored 0/1 uint8, 0/255 and 0/1.0 float), one test."""
    atlas_subject(root, "Training", "R001", "r001s001", lesion())
    atlas_subject(root, "Training", "R001", "r001s002", lesion(255))
    atlas_subject(root, "Training", "R034", "r034s001", lesion(1.0, np.float32))
    atlas_subject(root, "Testing", "R001", "r001s050", None)
    return root


#: ISLES 2022's grids: DWI, ADC and the mask on one (5 x 5 x 8 mm), FLAIR on its own, oblique and finer in-plane.
ISLES22_DWI = oblique_geometry((28, 32, 16), (5.0, 5.0, 8.0), (0, 0, 0), center=(1, -2, 3))
ISLES22_FLAIR = oblique_geometry((40, 44, 18), (3.5, 3.5, 7.0), (-6, 4, 8), center=(-2, 3, -5))


def isles22_motion(number: int) -> tuple[np.ndarray, np.ndarray]:
    """How subject ``number``'s head moved between DWI and FLAIR: ``number`` to ``2·number`` degrees and mm."""
    return rotation_matrix((number, -2.0 * number, 1.5 * number)), np.array([2.0 * number, -number, 1.0])


def isles22_subject(
    root: Path, number: int, rawdata: bool = True, mask: np.ndarray | None = None, flair_grid: Geometry = ISLES22_FLAIR
) -> None:
    """One subject: the phantom's DWI and ADC on the DWI grid, its FLAIR on ``flair_grid`` with the head moved by
    :func:`isles22_motion`, and a float64 0/1 mask of its lesion (which lies a little elsewhere in each subject)."""
    subject = f"sub-strokecase{number:04d}"
    session = (root / "rawdata" if rawdata else root) / subject / "ses-0001"
    lesion_center = (28.0 - 4 * number, -20.0, 15.0)
    for folder, suffix, contrast, grid, motion in (
        ("dwi", "dwi", "dwi", ISLES22_DWI, None),
        ("dwi", "adc", "adc", ISLES22_DWI, None),
        ("anat", "FLAIR", "flair", flair_grid, isles22_motion(number)),
    ):
        image = sample_phantom(grid, contrast, motion, lesion_center)
        write_image(image, grid, session / folder / f"{subject}_ses-0001_{suffix}.nii.gz")
    if mask is None:
        mask = phantom_lesion(grid_points(ISLES22_DWI), lesion_center).reshape(ISLES22_DWI.shape).astype(np.float64)
    write_image(mask, ISLES22_DWI, root / "derivatives" / subject / "ses-0001" / f"{subject}_ses-0001_msk.nii.gz")


def make_isles22(root: Path, rawdata: bool = True) -> Path:
    for number in (1, 2, 3):
        isles22_subject(root, number, rawdata)
    return root


def isles18_case(root: Path, split: str, number: int, first_id: int, masks: bool = True) -> None:
    case = root / split / f"case_{number}"
    spacing, slab = (1.0, 1.0, 5.0), (8, 7, 2)
    modalities = ["CT", "CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax", *(["OT"] if masks else [])]
    for offset, modality in enumerate(modalities):
        name = f"SMIR.Brain.XX.O.{modality}.{first_id + offset}"
        data = lesion(shape=slab) if modality == "OT" else image(first_id + offset, slab) * 40
        nifti(case / name / f"{name}.nii", data, spacing, (0.0, 0.0, 10.0 * number))
    series = f"SMIR.Brain.XX.O.CT_4DPWI.{first_id + 9}"
    nifti(case / series / f"{series}.nii", image(number, (*slab, 5)), spacing)


def make_isles18(root: Path) -> Path:
    for number in (1, 2, 3):
        isles18_case(root, "TRAINING", number, 345000 + 10 * number)
    isles18_case(root, "TESTING", 1, 346000, masks=False)
    return root


def convert(arguments: list[str]) -> int:
    return convert_main([*arguments, "--no-progress"])


def written() -> list[str]:
    """Everything under AUTOSEG_RAW, hidden folders included."""
    root = raw_root()
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")) if root.is_dir() else []


# ------------------------------------------------------------------------------------------------
# Sound releases
# ------------------------------------------------------------------------------------------------


def test_atlas2_becomes_a_verified_t1_dataset_with_subjects_and_test_images(tmp_path: Path) -> None:
    source = make_atlas2(tmp_path / "ATLAS_2")
    assert convert(["atlas2", str(source), "-d", "ATLAS"]) == 0
    dataset = find_dataset("ATLAS")
    assert dataset.name == "Dataset001_ATLAS" and dataset.channel_names == ("T1",)
    cases = verify_dataset(dataset, progress=False)
    assert [case.identifier for case in cases] == ["sub-r001s001_ses-1", "sub-r001s002_ses-1", "sub-r034s001_ses-1"]
    assert dataset.subjects == {case.identifier: case.identifier.removesuffix("_ses-1") for case in cases}
    for case in cases:
        label, _ = read_image(case.label, dtype=np.float64)
        np.testing.assert_array_equal(label, lesion())  # 0/1, 0/255 and 0/1.0 float masks all end as 0/1
    assert [p.name for p in (dataset.folder / "imagesTs").iterdir()] == ["sub-r001s050_ses-1_0000.nii.gz"]
    original = source / "Training/R001/sub-r001s001/ses-1/anat" / f"sub-r001s001_ses-1_{ATLAS_SPACE}_T1w.nii.gz"
    assert (dataset.folder / "imagesTr/sub-r001s001_ses-1_0000.nii.gz").read_bytes() == original.read_bytes()
    assert read_json(dataset.folder / "dataset.json")["numTraining"] == 3


@pytest.mark.parametrize("rawdata", [True, False], ids=["rawdata", "subjects-at-top"])
def test_isles22_becomes_a_verified_dataset_with_flair_registered_onto_dwi(
    tmp_path: Path, rawdata: bool, capsys: pytest.CaptureFixture
) -> None:
    source = make_isles22(tmp_path / "ISLES-2022", rawdata)
    assert convert(["isles22", str(source), "-d", "ISLES22"]) == 0
    dataset = find_dataset("ISLES22")
    assert dataset.channel_names == ("DWI", "ADC", "FLAIR") and dataset.coregister_channels
    cases = verify_dataset(dataset, progress=False)
    assert [case.identifier for case in cases] == [f"sub-strokecase000{n}_ses-0001" for n in (1, 2, 3)]
    assert set(dataset.subjects.values()) == {f"sub-strokecase000{n}" for n in (1, 2, 3)}
    raw = source / "rawdata" if rawdata else source
    adc = raw / "sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_adc.nii.gz"
    assert cases[0].images[1].read_bytes() == adc.read_bytes()  # DWI and ADC are copied as released
    label, geometry = read_image(cases[0].label)
    assert not geometry.differences(canonical_geometry(ISLES22_DWI))  # read in RAS, the grid the DWI was written on
    np.testing.assert_array_equal(
        label, phantom_lesion(grid_points(geometry), (24.0, -20.0, 15.0)).reshape(label.shape)
    )
    assert not (dataset.folder / "imagesTs").exists()
    record = read_json(dataset.folder / "coregistration.json")
    assert record["reference_channel"] == 0 and record["channel_names"] == {"0": "DWI", "1": "ADC", "2": "FLAIR"}
    assert sorted(record["cases"]) == [case.identifier for case in cases]
    for number, case in enumerate(cases, start=1):
        # FLAIR now lies on the DWI grid and shows what a FLAIR acquired there would: the motion was undone.
        flair, flair_geometry = read_image(case.images[2])
        assert not flair_geometry.differences(geometry)
        expected = sample_phantom(geometry, "flair", lesion_center=(28.0 - 4 * number, -20.0, 15.0))
        brain = (expected > 0) & (flair > 0)
        assert np.corrcoef(flair[brain], expected[brain])[0, 1] > 0.98
        # The recorded fit is the known motion undone (Q⁻¹(x) = Rᵀ (x - t)), within a millimetre over the brain.
        (fit,) = [from_plain(ChannelFit, plain, "") for plain in record["cases"][case.identifier]]
        assert fit.channel == 2 and fit.converged
        rotation, shift = isles22_motion(number)
        points = grid_points(geometry)[expected.ravel() > 0][::3]
        mapped = np.array([fit.transform().TransformPoint(tuple(p)) for p in points])
        assert np.linalg.norm(mapped - (points - shift) @ rotation, axis=1).max() < 1.0
    printed = capsys.readouterr().out
    assert "channels DWI, ADC, FLAIR" in printed
    assert "note: FLAIR registered rigidly onto DWI and resampled onto its grid in 3 of 3 case(s)" in printed


def test_isles22_without_flair_keeps_dwi_and_adc_as_released(tmp_path: Path) -> None:
    source = make_isles22(tmp_path / "ISLES-2022")
    assert convert(["isles22", str(source), "-d", "ISLES22", "--no-flair"]) == 0
    dataset = find_dataset("ISLES22")
    assert dataset.channel_names == ("DWI", "ADC") and not dataset.coregister_channels
    assert "coregister_channels" not in read_json(dataset.folder / "dataset.json")
    assert not (dataset.folder / "coregistration.json").exists()
    assert len(verify_dataset(dataset, progress=False)) == 3


def test_isles22_flair_that_does_not_overlap_the_dwi_is_named_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = make_isles22(tmp_path / "ISLES-2022")
    elsewhere = dataclasses.replace(ISLES22_FLAIR, origin=tuple(np.asarray(ISLES22_FLAIR.origin) + (0.0, 0.0, 300.0)))
    isles22_subject(source, 2, flair_grid=elsewhere)
    assert convert(["isles22", str(source), "-d", "ISLES22"]) == 1
    error = capsys.readouterr().err
    flair = source / "rawdata/sub-strokecase0002/ses-0001/anat/sub-strokecase0002_ses-0001_FLAIR.nii.gz"
    assert error.startswith(f"error: 1 problem(s) in {source}, nothing was written:\n{flair}: registration onto ")
    assert (
        "sub-strokecase0002_ses-0001_dwi.nii.gz failed: too little overlap: by the headers its field of view " in error
    )
    assert written() == []


def test_isles18_groups_slabs_of_one_patient_from_the_slab_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = make_isles18(tmp_path / "ISLES2018")
    table = tmp_path / "slabs.txt"
    table.write_text("case number, training name\nTrain_1 = case 1\nTrain_2_A = case 2\ncase_3,Train_2_B\n")
    assert convert(["isles18", str(source), "-d", "CTP18", "--slabs", str(table)]) == 0
    dataset = find_dataset("CTP18")
    assert dataset.channel_names == ("CT", "CBF", "CBV", "MTT", "Tmax")
    cases = verify_dataset(dataset, progress=False)
    assert dataset.subjects == {"case_1": "Train_1", "case_2": "Train_2", "case_3": "Train_2"}
    ct, _ = read_image(cases[1].images[0])
    np.testing.assert_array_equal(ct, image(345020, (8, 7, 2)) * 40)  # the .nii was compressed, not changed
    cbf_source = source / "TRAINING/case_2/SMIR.Brain.XX.O.CT_CBF.345021/SMIR.Brain.XX.O.CT_CBF.345021.nii"
    assert gzip.decompress(cases[1].images[1].read_bytes()) == cbf_source.read_bytes()
    assert sorted(p.name for p in (dataset.folder / "imagesTs").iterdir()) == [
        f"test_case_1_{channel:04d}.nii.gz" for channel in range(5)
    ]
    assert "2 patient(s)" in capsys.readouterr().out


def test_isles18_without_slab_table_makes_each_case_a_subject_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert convert(["isles18", str(make_isles18(tmp_path / "ISLES2018")), "-d", "CTP18"]) == 0
    assert find_dataset("CTP18").subjects == {f"case_{n}": f"case_{n}" for n in (1, 2, 3)}
    assert "note: ISLES 2018 does not say which cases are slabs of one patient" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Malformed releases: every offending file named, exit 1, nothing written
# ------------------------------------------------------------------------------------------------


def _remove(relative: str) -> Callable[[Path], list[str]]:
    def mutate(root: Path) -> list[str]:
        path = root / relative
        for file in sorted(path.rglob("*"), reverse=True) if path.is_dir() else []:
            file.unlink() if file.is_file() else file.rmdir()
        path.rmdir() if path.is_dir() else path.unlink()
        return [str(path.parent if relative.endswith(".nii") else path)]

    return mutate


def _atlas_missing_mask(root: Path) -> list[str]:
    anat = root / "Training/R001/sub-r001s002/ses-1/anat"
    (anat / f"sub-r001s002_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz").unlink()
    return [str(anat / f"sub-r001s002_ses-1_{ATLAS_SPACE}_T1w.nii.gz"), "no lesion mask"]


def _atlas_subject_without_image(root: Path) -> list[str]:
    folder = root / "Training/R034/sub-r034s002"
    (folder / "ses-1/anat").mkdir(parents=True)
    return [str(folder), "no T1w image"]


def _atlas_mismatched_subject(root: Path) -> list[str]:
    anat = root / "Training/R001/sub-r001s001/ses-1/anat"
    wrong = anat / f"sub-r001s009_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz"
    (anat / f"sub-r001s001_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz").rename(wrong)
    return [str(wrong), "sub-r001s009", "sub-r001s001", str(anat / f"sub-r001s001_ses-1_{ATLAS_SPACE}_T1w.nii.gz")]


def _isles22_missing_mask(root: Path) -> list[str]:
    mask = root / "derivatives/sub-strokecase0002/ses-0001/sub-strokecase0002_ses-0001_msk.nii.gz"
    mask.unlink()
    return ["sub-strokecase0002_ses-0001_dwi.nii.gz", "no lesion mask"]


def _isles22_missing_adc(root: Path) -> list[str]:
    (root / "rawdata/sub-strokecase0003/ses-0001/dwi/sub-strokecase0003_ses-0001_adc.nii.gz").unlink()
    return [str(root / "rawdata/sub-strokecase0003/ses-0001"), "no adc image", "(expected dwi/"]


def _isles22_missing_flair(root: Path) -> list[str]:
    (root / "rawdata/sub-strokecase0001/ses-0001/anat/sub-strokecase0001_ses-0001_FLAIR.nii.gz").unlink()
    return [str(root / "rawdata/sub-strokecase0001/ses-0001"), "no flair image", "anat/", "--no-flair"]


def _isles22_mask_without_subject(root: Path) -> list[str]:
    mask = root / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"
    nifti(mask, lesion())
    return [str(mask), "without images"]


def _isles18_missing_ot(root: Path) -> list[str]:
    _remove("TRAINING/case_2/SMIR.Brain.XX.O.OT.345025")(root)
    return [str(root / "TRAINING/case_2"), "no OT image"]


def _isles18_missing_map(root: Path) -> list[str]:
    _remove("TESTING/case_1/SMIR.Brain.XX.O.CT_Tmax.346004")(root)
    return [str(root / "TESTING/case_1"), "no CT_Tmax image"]


MALFORMED = {
    "atlas2-missing-mask": ("atlas2", make_atlas2, _atlas_missing_mask),
    "atlas2-subject-without-image": ("atlas2", make_atlas2, _atlas_subject_without_image),
    "atlas2-mismatched-subject": ("atlas2", make_atlas2, _atlas_mismatched_subject),
    "isles22-missing-mask": ("isles22", make_isles22, _isles22_missing_mask),
    "isles22-missing-adc": ("isles22", make_isles22, _isles22_missing_adc),
    "isles22-missing-flair": ("isles22", make_isles22, _isles22_missing_flair),
    "isles22-mask-without-subject": ("isles22", make_isles22, _isles22_mask_without_subject),
    "isles18-missing-ot": ("isles18", make_isles18, _isles18_missing_ot),
    "isles18-missing-map": ("isles18", make_isles18, _isles18_missing_map),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_release_names_each_offending_file_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    kind, make, damage = MALFORMED[case]
    source = make(tmp_path / "release")
    expected = damage(source)
    assert convert([kind, str(source), "-d", "Broken"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "nothing was written" in error
    for text in expected:
        assert text in error
    assert written() == []


def test_a_slab_table_naming_an_unknown_case_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "slabs.txt"
    table.write_text("Train_1 = case 1\nTrain_7_A = case 64\n")
    assert convert(["isles18", str(make_isles18(tmp_path / "ISLES2018")), "-d", "CTP18", "--slabs", str(table)]) == 1
    assert f"{table}, line 2: case_64 is not a case folder in TRAINING/" in capsys.readouterr().err
    assert written() == []


def test_a_missing_top_folder_says_what_the_source_holds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = make_atlas2(tmp_path / "download")
    assert convert(["isles18", str(source), "-d", "X"]) == 1
    assert "has no TRAINING/ folder" in capsys.readouterr().err and written() == []


@pytest.mark.parametrize(
    "failure",
    [DiskFullError("labelsTr/case.nii.gz"), ValueError("a bug")],
    ids=["full disk: one line, exit 1", "a bug: its traceback"],
)
def test_a_failure_while_writing_leaves_no_dataset_and_no_scratch_folder(
    failure: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    source = make_atlas2(tmp_path / "ATLAS_2")
    calls = []

    def fail_on_second(*arguments: object) -> None:
        calls.append(arguments)
        if len(calls) == 2:
            raise failure
        return original(*arguments)

    original = common.write_like
    monkeypatch.setattr(common, "write_like", fail_on_second)
    if isinstance(failure, DiskFullError):
        assert convert(["atlas2", str(source), "-d", "ATLAS"]) == 1
        assert capsys.readouterr().err.strip() == "error: no space left on device while writing labelsTr/case.nii.gz"
    else:
        with pytest.raises(ValueError, match="a bug"):  # not a user error: the command shows the traceback
            convert(["atlas2", str(source), "-d", "ATLAS"])
    assert written() == []


# ------------------------------------------------------------------------------------------------
# Dataset numbers and names
# ------------------------------------------------------------------------------------------------


def test_numbers_are_the_lowest_free_one_or_given_and_existing_datasets_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = make_isles22(tmp_path / "ISLES-2022")
    (raw_root() / "Dataset001_Other").mkdir(parents=True)
    (raw_root() / "Dataset003_Third").mkdir()
    assert new_dataset_folder("ISLES22").name == "Dataset002_ISLES22"
    assert convert(["isles22", str(source), "-d", "ISLES22", "--id", "7"]) == 0
    assert (raw_root() / "Dataset007_ISLES22" / "dataset.json").is_file()
    before = (raw_root() / "Dataset007_ISLES22" / "dataset.json").stat().st_mtime_ns
    assert convert(["isles22", str(source), "-d", "ISLES22"]) == 1
    assert "Dataset007_ISLES22 exists; pass --overwrite" in capsys.readouterr().err
    assert convert(["isles22", str(source), "-d", "ISLES22", "--id", "3"]) == 1
    assert "Dataset003_Third already has number 3" in capsys.readouterr().err
    assert (raw_root() / "Dataset007_ISLES22" / "dataset.json").stat().st_mtime_ns == before
    assert convert(["isles22", str(source), "-d", "ISLES22", "--overwrite"]) == 0
    assert sorted(p.name for p in raw_root().iterdir()) == [
        "Dataset001_Other",
        "Dataset003_Third",
        "Dataset007_ISLES22",
    ]
    with pytest.raises(ValueError, match="plain name"):
        new_dataset_folder("Dataset009_ISLES22")


# ------------------------------------------------------------------------------------------------
# Mask binarisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 1, 1, 0], [0, 1, 1, 0]),  # already 0/1
        ([0, 255, 255, 0], [0, 1, 1, 0]),  # 0/255
        ([0.0, 1.0, 1.0, 0.0], [0, 1, 1, 0]),  # float 0/1
        ([0, 1, 2, 0], [0, 1, 1, 0]),  # several lesion values: all lesion
        ([0.0, 0.2, 0.6, 1.0], [0, 0, 1, 1]),  # a soft (resampled) mask: from half the largest value on
        ([0.0, np.nan, -1.0, 0.0], [0, 0, 0, 0]),  # NaN and negative values are background
    ],
)
def test_binarize(values: list[float], expected: list[int]) -> None:
    result = binarize(np.array(values, dtype=np.float64))
    assert result.dtype == np.uint8 and result.tolist() == expected


def test_repeated_cases_and_a_training_case_without_mask_are_one_clear_error_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    from autoseg.data.converters.common import ConversionError, SourceCase, SourceDataset, write_dataset
    from autoseg.io.geometry import Geometry
    from autoseg.io.images import write_image

    image = tmp_path / "release" / "a.nii.gz"
    write_image(
        np.ones((4, 4, 4), np.float32), Geometry((4, 4, 4), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1)), image
    )
    twice = SourceDataset(
        ("T1",), (SourceCase("c", "s", (image,), image), SourceCase("c", "s", (image,), image)), (), {}
    )
    with pytest.raises(ConversionError, match=r"case identifier\(s\) c found more than once"):
        write_dataset(twice, tmp_path / "out", release=tmp_path / "release")
    without = SourceDataset(("T1",), (SourceCase("c", "s", (image,)),), (), {})
    with pytest.raises(ConversionError, match=rf"{image}: training case c has no lesion mask"):
        write_dataset(without, tmp_path / "out", release=tmp_path / "release")
    assert not (tmp_path / "out").exists()
