"""BIDS in and out (``autoseg_predict --bids``, ``autoseg.api.bids``).

The selection of cases is tested on generated BIDS trees of empty files (pybids indexes names only); prediction with
the one-file model of ``tests/fixtures/model_2026_12_07`` (one channel, ``T1``), whose two tiny scans are laid out as
BIDS datasets: with and without sessions, a stored orientation other than RAS, an uncompressed ``.nii``, and a subject
without a T1w image. Expectations are computed here independently: the file names from the BIDS templates, the
headers from the source files (nibabel), the masks from a plain ``autoseg_predict -i`` of the same scans.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest

import autoseg
from autoseg.api.bids import predict_bids
from autoseg.api.bids_derivatives import CASE_TABLE_COLUMNS, LESION_TABLE_COLUMNS
from autoseg.api.bids_inputs import (
    BidsDatasetError,
    BidsSelection,
    channel_suffixes,
    find_bids_cases,
    parse_filter,
    participant_labels,
    read_filter_file,
)
from autoseg.api.predict import PredictionOptions
from autoseg.api.predict_models import ModelChoice
from autoseg.api.predict_outputs import CASE_COLUMNS, LESION_COLUMNS
from autoseg.commands.predict import main as predict_main
from autoseg.errors import InvalidFileError, UsageError
from autoseg.infer.lesions import lesion_report
from autoseg.io.files import write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

LEGACY = Path(__file__).parents[1] / "fixtures" / "model_2026_12_07"
MODEL = LEGACY / "model.zip"
QUIET = ["--device", "cpu", "--no-progress", "--no-tta"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dataset(root: Path, files: dict[str, Path | None], name: str = "tiny") -> Path:
    """A BIDS dataset at ``root``: ``dataset_description.json`` and each file (relative path -> a scan to copy, or
    None for an empty file)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": name, "BIDSVersion": "1.9.0"}))
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            path.touch()
        else:
            shutil.copy(source, path)
    return root


def _relative(cases, root: Path) -> list[tuple[str, tuple[str, ...]]]:
    return [(case.identifier, case.relative) for case in cases]


# ---------------------------------------------------------------------------- channels and options
@pytest.mark.parametrize(
    ("channel", "suffixes"),
    [
        ("T1", ("T1w",)),
        ("t1w", ("T1w",)),
        ("FLAIR", ("FLAIR",)),
        ("DWI", ("dwi",)),
        ("ADC", ("ADC", "adc")),
        ("T2", ("T2w",)),
        ("CBF", ("CBF",)),  # no BIDS suffix known: the name itself
    ],
)
def test_a_channel_name_maps_to_its_bids_suffixes(channel: str, suffixes: tuple[str, ...]) -> None:
    assert channel_suffixes(channel) == suffixes


def test_participant_labels_and_filters_as_bids_apps_take_them() -> None:
    assert participant_labels(["01", "sub-02", "sub-01"]) == ("01", "02")
    assert participant_labels(None) is None
    with pytest.raises(UsageError, match="--participant-label sub-0_1: not a BIDS subject label"):
        participant_labels(["sub-0_1"])
    assert parse_filter("session=1") == ("session", "1")
    assert parse_filter("acq=") == ("acq", None)
    assert parse_filter("run=*") == ("run", "*")
    with pytest.raises(UsageError, match="--bids-filter session: expected KEY=VALUE"):
        parse_filter("session")


def test_a_filter_file_holds_filters_for_every_channel_and_per_channel(tmp_path: Path) -> None:
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({"session": "1", "acq": None, "DWI": {"suffix": "dwi", "run": [1, 2]}}))
    assert read_filter_file(path, ("DWI", "ADC")) == (
        {"session": "1", "acq": None},
        {"DWI": {"suffix": "dwi", "run": [1, 2]}},
    )
    path.write_text(json.dumps({"DWI": "dwi"}))
    with pytest.raises(InvalidFileError, match=r"filter.json: DWI: a channel's filters must be an object"):
        read_filter_file(path, ("DWI", "ADC"))
    path.write_text(json.dumps({"run": {"a": 1}}))
    with pytest.raises(InvalidFileError, match=r"filter.json: run: expected a string, a number, a list"):
        read_filter_file(path, ("DWI", "ADC"))
    path.write_text("[1]")
    with pytest.raises(InvalidFileError, match="must hold a JSON object"):
        read_filter_file(path, ("DWI",))


# ---------------------------------------------------------------------------- which images make a case
def test_cases_by_subject_and_session_and_the_subjects_that_give_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": None,
            "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": None,
            "sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii": None,
            "sub-02/ses-2/anat/sub-02_ses-2_run-2_T1w.nii.gz": None,
            "sub-02/ses-3/anat/sub-02_ses-3_FLAIR.nii.gz": None,
            "sub-03/anat/sub-03_FLAIR.nii.gz": None,
            "sub-03/anat/sub-03_T1.nii.gz": None,  # not valid BIDS
            "sub-04/anat/T1w.nii.gz": None,  # nothing valid at all
        },
    )
    cases, missing = find_bids_cases(root, ["T1"])
    assert _relative(cases, root) == [
        ("sub-01", ("sub-01/anat/sub-01_T1w.nii.gz",)),
        ("sub-02_ses-1", ("sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",)),
        ("sub-02_ses-2_run-1", ("sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii",)),
        ("sub-02_ses-2_run-2", ("sub-02/ses-2/anat/sub-02_ses-2_run-2_T1w.nii.gz",)),
    ]
    assert [(case.subject, case.session, case.datatype) for case in cases] == [
        ("01", None, "anat"),
        ("02", "1", "anat"),
        ("02", "2", "anat"),
        ("02", "2", "anat"),
    ]
    assert [problem.line() for problem in missing] == [
        "sub-02_ses-3: not predicted: no image for channel T1 (*_T1w.nii[.gz]); there: FLAIR",
        "sub-03: not predicted: no image for channel T1 (*_T1w.nii[.gz]); there: FLAIR; left out as not "
        "valid BIDS: sub-03/anat/sub-03_T1.nii.gz (--skip-bids-validation reads them)",
        "sub-04: not predicted: no NIfTI image; left out as not valid BIDS: sub-04/anat/T1w.nii.gz",
    ]
    monkeypatch.chdir(tmp_path)  # a relative path to the dataset names the same files
    assert _relative(find_bids_cases("ds", ["T1"])[0], root) == _relative(cases, root)
    cases, missing = find_bids_cases(root, ["T1"], BidsSelection(participants=("03", "99")))
    assert cases == [] and [p.line().split(":")[0] for p in missing] == ["sub-03", "sub-99"]
    assert missing[1].problem == f"no folder sub-99 in {root} (subjects: 01, 02, 03, 04)"


def test_a_multi_channel_model_takes_one_image_per_channel_in_its_channel_order(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path / "ds",
        {
            "sub-a/ses-1/dwi/sub-a_ses-1_ADC.nii.gz": None,
            "sub-a/ses-1/dwi/sub-a_ses-1_dwi.nii.gz": None,
            "sub-b/dwi/sub-b_dwi.nii.gz": None,  # no ADC
            "sub-c/dwi/sub-c_run-1_dwi.nii.gz": None,
            "sub-c/dwi/sub-c_run-2_dwi.nii.gz": None,
            "sub-c/dwi/sub-c_run-1_ADC.nii.gz": None,
            "sub-d/dwi/sub-d_acq-tra_dwi.nii.gz": None,
            "sub-d/dwi/sub-d_acq-tra_ADC.nii.gz": None,
            "sub-d/anat/sub-d_FLAIR.nii.gz": None,
        },
    )
    cases, missing = find_bids_cases(root, ["DWI", "ADC"])
    assert _relative(cases, root) == [
        ("sub-a_ses-1", ("sub-a/ses-1/dwi/sub-a_ses-1_dwi.nii.gz", "sub-a/ses-1/dwi/sub-a_ses-1_ADC.nii.gz")),
        ("sub-d_acq-tra", ("sub-d/dwi/sub-d_acq-tra_dwi.nii.gz", "sub-d/dwi/sub-d_acq-tra_ADC.nii.gz")),
    ]
    assert cases[0].datatype == "dwi"
    assert [problem.line() for problem in missing] == [
        "sub-b: not predicted: no image for channel ADC (*_ADC.nii[.gz] or *_adc.nii[.gz]); there: dwi",
        "sub-c: not predicted: 2 images match channel DWI (sub-c_run-1_dwi.nii.gz, sub-c_run-2_dwi.nii.gz); choose "
        "one with --bids-filter (e.g. run=1) or per channel with --bids-filter-file",
    ]
    # a filter settles sub-c; the shared entities name the case
    cases, missing = find_bids_cases(root, ["DWI", "ADC"], BidsSelection(participants=("c",), filters={"run": "1"}))
    assert _relative(cases, root) == [
        ("sub-c_run-1", ("sub-c/dwi/sub-c_run-1_dwi.nii.gz", "sub-c/dwi/sub-c_run-1_ADC.nii.gz"))
    ]
    # per channel: the FLAIR of sub-d as the second channel (a suffix replaces the channel's own)
    selection = BidsSelection(participants=("d",), channel_filters={"ADC": {"suffix": "FLAIR"}})
    cases, _ = find_bids_cases(root, ["DWI", "ADC"], selection)
    assert cases[0].identifier == "sub-d" and cases[0].relative[1] == "sub-d/anat/sub-d_FLAIR.nii.gz"


def test_filters_by_entity_absent_present_and_from_a_file(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path / "ds",
        {
            "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": None,
            "sub-01/ses-1/anat/sub-01_ses-1_acq-fast_T1w.nii.gz": None,
            "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz": None,
        },
    )

    def names(**selection) -> list[str]:
        return [case.identifier for case in find_bids_cases(root, ["T1"], BidsSelection(**selection))[0]]

    assert names() == ["sub-01_ses-1", "sub-01_ses-1_acq-fast", "sub-01_ses-2"]
    assert names(filters={"ses": "1"}) == ["sub-01_ses-1", "sub-01_ses-1_acq-fast"]
    assert names(filters={"acquisition": None}) == ["sub-01_ses-1", "sub-01_ses-2"]
    assert names(filters={"acq": "*"}) == ["sub-01_ses-1_acq-fast"]
    (tmp_path / "filter.json").write_text(json.dumps({"session": "2", "T1": {"acquisition": None}}))
    assert names(filter_file=tmp_path / "filter.json") == ["sub-01_ses-2"]
    assert names(filter_file=tmp_path / "filter.json", filters={"session": "1"}) == ["sub-01_ses-1"]
    with pytest.raises(UsageError, match="--bids-filter: unknown BIDS entity 'sesion'; known: .*session"):
        names(filters={"sesion": "1"})
    with pytest.raises(UsageError, match="select subjects with --participant-label, not a filter on 'sub'"):
        names(filters={"sub": "01"})


def test_images_that_would_give_one_mask_name_are_reported(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_space-MNI152NLin2009aSym_T1w.nii.gz": None,
            "sub-01/anat/sub-01_space-native_T1w.nii.gz": None,
            "sub-02/anat/sub-02_space-MNI152NLin2009aSym_T1w.nii.gz": None,
        },
    )
    cases, missing = find_bids_cases(root, ["T1"], BidsSelection(validate=False))
    assert [case.identifier for case in cases] == ["sub-02"]  # space is the source's, not the mask's
    assert (
        missing[0]
        .line()
        .startswith("sub-01: not predicted: 2 images would give the same mask sub-01_space-orig_desc-lesion_mask (")
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "scan.nii.gz").touch(), "not a BIDS dataset: no dataset_description.json"),
        (
            lambda root: (root / "dataset_description.json").write_text('{"Name": "x"}'),
            "not a valid BIDS dataset: Mandatory 'BIDSVersion' field missing",
        ),
        (
            lambda root: (root / "dataset_description.json").write_text('{"Name":'),
            "not a valid BIDS dataset: 'dataset_description.json' is not a valid json file",
        ),
    ],
)
def test_a_folder_that_is_not_bids_is_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, make: Callable[[Path], None], message: str
) -> None:
    root = tmp_path / "scans"
    root.mkdir()
    make(root)
    with pytest.raises(BidsDatasetError, match=message):
        find_bids_cases(root, ["T1"])
    assert predict_main(["-m", str(MODEL), "--bids", str(root), "-o", str(tmp_path / "out"), *QUIET]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --bids {root}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- prediction into a derivatives dataset
def _header_fields(path: Path) -> dict[str, object]:
    """What ``write_like`` keeps of a NIfTI header: geometry, codes, units, dimensions."""
    header = nibabel.load(str(path)).header
    return {
        "dim": header["dim"].tolist(),
        "pixdim": header["pixdim"][1:4].tolist(),
        "qform": header.get_qform().tolist(),
        "sform": header.get_sform().tolist(),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "xyzt_units": int(header["xyzt_units"]),
    }


@pytest.fixture
def bids_root(tmp_path: Path, reoriented_copy: Callable[[Path, Path, str], Path]) -> Path:
    """sub-01 (no session), sub-02 with two sessions (ses-2 stored LPS, ``.nii``), sub-03 with a FLAIR only."""
    scans = LEGACY / "scans"
    root = _dataset(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": scans / "sub-01.nii.gz",
            "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": scans / "sub-02.nii.gz",
            "sub-03/anat/sub-03_FLAIR.nii.gz": scans / "sub-02.nii.gz",
        },
    )
    lps = reoriented_copy(scans / "sub-01.nii.gz", tmp_path / "lps.nii.gz", "LPS")
    target = root / "sub-02/ses-2/anat/sub-02_ses-2_acq-fast_T1w.nii"
    target.parent.mkdir(parents=True)
    nibabel.save(nibabel.load(str(lps)), str(target))
    return root


EXPECTED_MASKS = {
    "sub-01/anat/sub-01_space-orig_desc-lesion_mask.nii.gz": "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-02/ses-1/anat/sub-02_ses-1_space-orig_desc-lesion_mask.nii.gz": "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
    "sub-02/ses-2/anat/sub-02_ses-2_acq-fast_space-orig_desc-lesion_mask.nii.gz": (
        "sub-02/ses-2/anat/sub-02_ses-2_acq-fast_T1w.nii"
    ),
}


def test_predict_a_bids_dataset_into_a_derivatives_dataset(
    bids_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = bids_root / "derivatives" / "autoseg"
    assert predict_main(["-m", str(MODEL), "--bids", str(bids_root), "-o", str(out), *QUIET]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith("wrote 3 mask(s), skipped 0 already done, 0 failed; ")
    assert line.endswith(f"; 1 subject(s)/session(s) not predicted: sub-03; summary: {out / 'prediction_summary.json'}")
    assert "sub-03: not predicted: no image for channel T1 (*_T1w.nii[.gz]); there: FLAIR" in captured.err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    sidecars = [name.replace(".nii.gz", ".json") for name in EXPECTED_MASKS]
    tables = ["lesion_table.json", "lesion_table.tsv", "lesions.json", "lesions.tsv"]
    assert written == sorted(
        [*EXPECTED_MASKS, *sidecars, *tables, ".bidsignore", "dataset_description.json", "prediction_summary.json"]
    )  # the staging folder is gone

    # the masks: binary, the source's exact header, the labels a plain prediction of the same scan gives
    plain = tmp_path / "plain"
    assert predict_main(["-m", str(MODEL), "-i", str(bids_root / "sub-02/ses-2/anat"), "-o", str(plain), *QUIET]) == 0
    assert predict_main(["-m", str(MODEL), "-i", str(bids_root / "sub-01/anat"), "-o", str(plain), *QUIET]) == 0
    plain_labels = {
        "sub-01/anat/sub-01_T1w.nii.gz": plain / "sub-01_T1w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_acq-fast_T1w.nii": plain / "sub-02_ses-2_acq-fast_T1w.nii",
    }
    for mask, source in EXPECTED_MASKS.items():
        image = nibabel.load(str(out / mask))
        assert image.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(image.dataobj))) <= {0, 1}
        assert _header_fields(out / mask) == _header_fields(bids_root / source)
        if source in plain_labels:
            expected = np.asanyarray(nibabel.load(str(plain_labels[source])).dataobj) != 0
            np.testing.assert_array_equal(np.asanyarray(image.dataobj) == 1, expected)
            assert expected.any()

    # the sidecars: BIDS mask fields, the sources as BIDS URIs, the model
    sidecar = json.loads((out / sidecars[2]).read_text())
    uri = "bids:raw:sub-02/ses-2/anat/sub-02_ses-2_acq-fast_T1w.nii"
    assert sidecar["Type"] == "Lesion" and sidecar["Manual"] is False
    assert sidecar["Sources"] == [uri] and sidecar["SpatialReference"] == uri
    model = sidecar["Model"]
    assert model["Members"] == ["3d_resunet/ResidualUNetTrainer"] and model["Channels"] == {"T1": uri}
    assert model["Folds"] == {"3d_resunet/ResidualUNetTrainer": ["fold_0", "fold_1"]}
    assert model["ModelFile"] == {
        "Path": str(MODEL.resolve()),
        "SHA256": hashlib.sha256(MODEL.read_bytes()).hexdigest(),
    }

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] == "1.10.0"
    assert description["DatasetLinks"] == {"raw": bids_root.resolve().as_uri()}
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "autoseg" and generated["Version"] == autoseg.__version__
    assert "model file model.zip" in generated["Description"]
    assert "3d_resunet/ResidualUNetTrainer (fold_0, fold_1)" in generated["Description"]

    # pybids reads it as a derivatives dataset of the source, with the entities meant
    from bids import BIDSLayout

    layout = BIDSLayout(bids_root, derivatives=str(out))
    found = layout.get(scope="autoseg", suffix="mask", desc="lesion", space="orig", extension=".nii.gz")
    assert sorted(Path(f.path).relative_to(out).as_posix() for f in found) == sorted(EXPECTED_MASKS)
    assert {f.get_entities().get("session") for f in found} == {None, "1", "2"}
    assert all(f.get_metadata()["Type"] == "Lesion" for f in found)

    # volumes: an independent count on the written mask times the source's voxel volume
    cases = pd.read_csv(out / "lesions.tsv", sep="\t", keep_default_na=False)
    lesions = pd.read_csv(out / "lesion_table.tsv", sep="\t", keep_default_na=False)
    assert cases[["participant_id", "session_id", "mask"]].values.tolist() == [
        ["sub-01", "n/a", list(EXPECTED_MASKS)[0]],
        ["sub-02", "ses-1", list(EXPECTED_MASKS)[1]],
        ["sub-02", "ses-2", list(EXPECTED_MASKS)[2]],
    ]
    for row, (mask, source) in zip(cases.itertuples(), EXPECTED_MASKS.items()):
        voxels = np.count_nonzero(np.asanyarray(nibabel.load(str(out / mask)).dataobj))
        expected_ml = voxels * np.prod(nibabel.load(str(bids_root / source)).header.get_zooms()[:3]) / 1000
        sidecar = json.loads((out / mask.replace(".nii.gz", ".json")).read_text())
        assert sidecar["LesionVolumeMl"] == pytest.approx(expected_ml, rel=1e-6) and voxels > 0
        assert row.total_volume_ml == pytest.approx(expected_ml, rel=1e-6)
        assert row.lesion_count == sidecar["LesionCount"] == len(sidecar["Lesions"]) == (lesions["mask"] == mask).sum()
        assert lesions[lesions["mask"] == mask]["voxels"].sum() == voxels
        assert 0 <= row.qc_score <= 1 and row.qc_score == sidecar["QC"]["score"]
        assert str(row.review) == str(sidecar["QC"]["review"])
    assert list(json.loads((out / "lesions.json").read_text())) == list(cases.columns)
    assert list(json.loads((out / "lesion_table.json").read_text())) == list(lesions.columns)
    summary = json.loads((out / "prediction_summary.json").read_text())
    counts = summary["counts"]
    assert {key: counts[key] for key in ("written", "skipped", "failed", "not_predicted")} == {
        "written": 3,
        "skipped": 0,
        "failed": 0,
        "not_predicted": 1,
    }
    reviewed = {Path(mask).name.split("_space-")[0] for mask in cases[cases["review"].astype(str) == "True"]["mask"]}
    assert counts["review"] == len(reviewed) and {c for c, e in summary["per_case"].items() if e["review"]} == reviewed
    assert summary["not_predicted"][0]["participant_id"] == "sub-03"

    # the same command again: every mask is complete and kept as it is
    before = {name: (out / name).stat().st_mtime_ns for name in EXPECTED_MASKS}
    assert predict_main(["-m", str(MODEL), "--bids", str(bids_root), "-o", str(out), *QUIET]) == 0
    assert "wrote 0 mask(s), skipped 3 already done" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in EXPECTED_MASKS} == before


def test_participant_labels_select_subjects_and_nothing_predicted_exits_1(
    bids_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["-m", str(MODEL), "--bids", str(bids_root), "-o", str(out), *QUIET, "--save-probabilities"]
    args += ["--save-uncertainty"]
    assert predict_main([*args, "--participant-label", "sub-02", "--bids-filter", "session=1"]) == 0
    assert capsys.readouterr().out.startswith("wrote 1 mask(s)")
    probabilities = out / "sub-02/ses-1/anat/sub-02_ses-1_space-orig_label-L_probseg.nii.gz"
    source = bids_root / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    assert _header_fields(probabilities) == _header_fields(source)
    probability = np.asanyarray(nibabel.load(str(probabilities)).dataobj)
    mask = np.asanyarray(
        nibabel.load(str(out / "sub-02/ses-1/anat/sub-02_ses-1_space-orig_desc-lesion_mask.nii.gz")).dataobj
    )
    assert probability.min() >= 0 and probability.max() <= 1 and mask.any()
    uncertainty = out / "sub-02/ses-1/anat/sub-02_ses-1_space-orig_desc-lesion_uncertainty.nii.gz"
    assert _header_fields(uncertainty) == _header_fields(source)
    entropy = np.asanyarray(nibabel.load(str(uncertainty)).dataobj)
    p = probability.astype(np.float64).clip(1e-12, 1 - 1e-12)
    np.testing.assert_allclose(entropy, -p * np.log2(p) - (1 - p) * np.log2(1 - p), atol=1e-4)
    sidecar = json.loads((out / "sub-02/ses-1/anat/sub-02_ses-1_space-orig_desc-lesion_mask.json").read_text())
    assert sidecar["UncertaintyMap"] == uncertainty.name
    assert "*_space-orig_desc-lesion_uncertainty.nii.gz" in (out / ".bidsignore").read_text().splitlines()
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-02"]

    # a subject without the model's channel alone: nothing to predict, exit code 1
    assert predict_main([*args, "--participant-label", "03"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(
        "wrote 0 mask(s), skipped 0 already done, 0 failed; 0 flagged for review; "
        "1 subject(s)/session(s) not predicted: sub-03;"
    )
    assert captured.err.startswith("sub-03: not predicted:")


def test_a_case_that_fails_is_named_by_its_bids_file_and_the_rest_are_predicted(
    bids_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = bids_root / "sub-01/anat/sub-01_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # cut short
    out = tmp_path / "out"
    assert predict_main(["-m", str(MODEL), "--bids", str(bids_root), "-o", str(out), *QUIET]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote 2 mask(s), skipped 0 already done, 1 failed: sub-01;")
    failed = [line for line in captured.err.splitlines() if line.startswith("case sub-01 ")]
    assert len(failed) == 1 and failed[0].startswith(f"case sub-01 ({broken}): ")
    assert ".autoseg_staging" not in captured.err
    assert not (out / "sub-01").exists()
    (recorded,) = json.loads((out / "prediction_summary.json").read_text())["failed"]
    assert recorded["case"] == "sub-01" and recorded["files"] == [str(broken)]
    assert failed[0] == f"case sub-01 ({broken}): {recorded['problem']}"


def test_an_interrupted_run_continues_with_the_same_command(
    bids_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import autoseg.api.bids as bids_module

    out = tmp_path / "out"
    selection = BidsSelection(participants=("01", "02"))
    options = PredictionOptions(device="cpu", progress=False, tta="none")
    write = bids_module.write_derivatives

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bids_module, "write_derivatives", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_bids(bids_root, out, ModelChoice(model_file=MODEL), options, selection, log=lambda line: None)
    staged = sorted(p.name for p in (out / ".autoseg_staging" / "predictions").glob("*.nii*"))
    assert staged == ["sub-01.nii.gz", "sub-02_ses-1.nii.gz", "sub-02_ses-2_acq-fast.nii"]  # kept for the next run
    monkeypatch.setattr(bids_module, "write_derivatives", write)
    monkeypatch.setattr("autoseg.api.predict._predict_case", interrupted)  # nothing is predicted again
    summary = predict_bids(bids_root, out, ModelChoice(model_file=MODEL), options, selection, log=lambda line: None)
    assert sorted(p.relative_to(out).as_posix() for p in summary.written) == sorted(EXPECTED_MASKS)
    assert not (out / ".autoseg_staging").exists()


def test_outputs_that_are_not_a_derivatives_dataset_of_this_model_are_refused(
    bids_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["-m", str(MODEL), "--bids", str(bids_root), *QUIET, "--participant-label", "01"]
    assert predict_main([*args, "-o", str(bids_root)]) == 1
    assert capsys.readouterr().err.startswith(f"error: -o {bids_root}: is the BIDS dataset itself")
    other = tmp_path / "other"
    _dataset(other, {})
    assert predict_main([*args, "-o", str(other)]) == 1
    assert capsys.readouterr().err == (
        f"error: {other / 'dataset_description.json'}: another dataset, not autoseg's derivatives; write to another "
        "folder (-o)\n"
    )
    out = tmp_path / "out"
    assert predict_main([*args, "-o", str(out)]) == 0
    description = out / "dataset_description.json"
    data = json.loads(description.read_text())
    data["GeneratedBy"][0]["Version"] = "0.0.1"
    description.write_text(json.dumps(data))
    capsys.readouterr()
    assert predict_main([*args, "-o", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {description}: written by another model or autoseg version")
    assert predict_main([*args, "-o", str(out), "--overwrite"]) == 0
    assert "wrote 1 mask(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the scans with exactly one of -i/--input and --bids"),
        (["-i", "x", "--bids", "y"], "give the scans with exactly one of -i/--input and --bids"),
        (["-i", "x", "--participant-label", "01"], "--participant-label has no effect with --input"),
        (["--bids", "y", "--list", "cases.txt"], "--list has no effect with --bids"),
    ],
)
def test_flags_that_do_not_go_together_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        predict_main([*args, "-o", "out"])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_staged_links_form_the_cases_predict_reads_in_channel_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-channel model: the channel files are linked as CASE_0000 (DWI) and CASE_0001 (ADC), so ``predict`` reads
    one case with the channels in the model's order (predict replaced by a stand-in that checks it)."""
    import autoseg.api.bids as bids_module
    from autoseg.api.predict_inputs import find_input_cases
    from autoseg.api.predict_models import ModelDescription
    from autoseg.api.predict_outputs import PredictionSummary

    geometry = Geometry((4, 5, 6), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    root = _dataset(tmp_path / "ds", {})
    for suffix, value in (("dwi", 1.0), ("ADC", 2.0)):
        write_image(np.full((4, 5, 6), value, np.float32), geometry, root / f"sub-a/dwi/sub-a_{suffix}.nii.gz")
    model = ModelDescription("Dataset9_X", ("3d/T",), {"3d/T": ("fold_0",)}, "final", ("DWI", "ADC"), {"lesion": 1})
    monkeypatch.setattr(bids_module, "describe_model", lambda *args: model)

    def stand_in(source, output, choice, options, log):
        (case,) = find_input_cases(source, 2)
        assert [path.resolve() for path in case.images] == [
            root / "sub-a/dwi/sub-a_dwi.nii.gz",
            root / "sub-a/dwi/sub-a_ADC.nii.gz",
        ]
        classes = np.zeros((4, 5, 6), np.uint8)
        classes[1, 2, 3] = 1
        write_image(classes * 255, geometry, Path(output) / f"{case.identifier}.nii.gz")  # declared 0/255
        report = lesion_report(classes, geometry, case.images[0], {"background": 0, "lesion": 255}).to_json()
        write_json(
            {**report, "case": case.identifier, "qc": {"score": 0.5, "review": True}}, output / "sub-a_lesions.json"
        )
        return PredictionSummary(written=[Path(output) / f"{case.identifier}.nii.gz"], cases=1)

    monkeypatch.setattr(bids_module, "predict", stand_in)
    summary = predict_bids(root, tmp_path / "out", options=PredictionOptions(progress=False), log=lambda line: None)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in summary.written] == [
        "sub-a/dwi/sub-a_space-orig_desc-lesion_mask.nii.gz"
    ]
    mask = nibabel.load(str(tmp_path / "out/sub-a/dwi/sub-a_space-orig_desc-lesion_mask.nii.gz"))
    expected = np.zeros((4, 5, 6), np.uint8)
    expected[1, 2, 3] = 1  # BIDS masks are binary
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), expected)
    assert _header_fields(Path(mask.get_filename())) == _header_fields(root / "sub-a/dwi/sub-a_dwi.nii.gz")
    sidecar = json.loads((tmp_path / "out/sub-a/dwi/sub-a_space-orig_desc-lesion_mask.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-a/dwi/sub-a_dwi.nii.gz", "bids:raw:sub-a/dwi/sub-a_ADC.nii.gz"]
    assert sidecar["LesionCount"] == 1 and sidecar["LesionVolumeMl"] == pytest.approx(0.006)  # 1 x 2 x 3 mm³
    assert sidecar["Lesions"][0]["label"] == 255 and sidecar["QC"] == {"score": 0.5, "review": True}
    assert sidecar["Model"]["Channels"] == {
        "DWI": "bids:raw:sub-a/dwi/sub-a_dwi.nii.gz",
        "ADC": "bids:raw:sub-a/dwi/sub-a_ADC.nii.gz",
    }


def test_the_bids_tables_have_the_columns_of_the_lesion_tables_located_by_subject_session_and_mask() -> None:
    located = ["participant_id", "session_id", "mask"]
    assert list(CASE_TABLE_COLUMNS) == located + list(CASE_COLUMNS)[1:]
    assert list(LESION_TABLE_COLUMNS) == located + list(LESION_COLUMNS)[1:]
