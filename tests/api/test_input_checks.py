"""Input checks (``autoseg.api.input_checks``): each case compared with the model's training ranges before it is
predicted, and multi-channel sets refused by a one-channel model (``autoseg.api.predict_inputs.find_input_cases``).

The expectations are written out by hand or computed here with numpy and SimpleITK from the files themselves; the
tiny model is the session's (conftest ``tiny_model_home``: 5 tiny ATLAS-like T1 cases at 3.5 mm).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.api.input_checks import InputChecks, check_case, load_training_ranges
from autoseg.api.model_files import export_model
from autoseg.api.predict_inputs import InputCase, find_input_cases
from autoseg.api.predict_models import load_model
from autoseg.api.predict_outputs import CaseFailure, PredictionSummary
from autoseg.commands.predict import main as predict_main
from autoseg.errors import UsageError
from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image
from autoseg.plan.fingerprint import ChannelRange, TrainingRanges

NAME = "Dataset961_ATLASPredict"  # what conftest's tiny_model_home trains
CONFIGURATION = "3d_resunet"
QUIET = ["--device", "cpu", "--no-progress", "--no-tta"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------------------- one case against hand-made ranges
RANGES = TrainingRanges(
    num_cases=3,
    spacing_mm=((1.0, 1.2),) * 3,
    shape=((40, 50),) * 3,
    obliqueness_degrees=(0.0, 0.0),
    channels=(
        ChannelRange(name="T1", p00_5=(10.0, 20.0), p50=(90.0, 110.0), p99_5=(180.0, 220.0), typical_width=180.0),
    ),
    lesion_count=(1, 3),
    lesion_volume_ml=(0.5, 20.0),
)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _brain(shape: tuple[int, int, int] = (44, 44, 44), scale: float = 1.0) -> np.ndarray:
    """(1, X, Y, Z): a ball of intensities spread evenly over 14-201 (0.5th/50th/99.5th percentiles about 15, 108
    and 200: inside the ranges above), zero outside."""
    grid = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    inside = (grid**2).sum(axis=0) <= (min(shape) / 2 - 2) ** 2
    image = np.zeros(shape, np.float32)
    image[inside] = np.linspace(14.0, 201.0, int(inside.sum()), dtype=np.float32)
    return image[None] * scale


def _tilted(degrees: float) -> tuple[float, ...]:
    """The identity direction rotated by ``degrees`` about the z axis."""
    angle = np.radians(degrees)
    return (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)


def _check(images: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=IDENTITY, name: str = "scan.nii.gz") -> list[str]:
    case = InputCase(name.split(".")[0], (Path(name),), ".nii.gz")
    return check_case(case, images, Geometry(images.shape[1:], spacing, (0.0, 0.0, 0.0), direction), RANGES, ["T1"])


def test_a_case_like_the_training_cases_has_no_warning() -> None:
    assert _check(_brain()) == []
    assert _check(_brain(), spacing=(1.7, 0.7, 1.0)) == []  # within x1.5 of the training spacing
    assert _check(_brain(scale=1.3)) == []  # percentiles within half the typical width (90) of their ranges
    assert _check(_brain(), direction=_tilted(4.0)) == []  # less than 5 degrees more oblique than training
    assert _check(_brain(), name="sub-01_T1w.nii.gz") == []  # T1w is the model's T1


def test_three_times_the_spacing_is_one_warning_naming_the_values_and_the_training_range() -> None:
    assert _check(_brain(), spacing=(3.0, 3.0, 3.0)) == [
        "spacing outside the training range: 3 x 3 x 3 mm vs [1, 1.2] x [1, 1.2] x [1, 1.2] mm"
    ]
    assert _check(_brain(), spacing=(1.0, 1.0, 0.5)) == [  # a finer grid too, on one axis
        "spacing outside the training range: 1 x 1 x 0.5 mm vs [1, 1.2] x [1, 1.2] x [1, 1.2] mm"
    ]


def test_a_channel_scaled_x10_names_each_percentile_outside_its_range() -> None:
    images = _brain(scale=10.0)
    low, median, high = np.percentile(images[0][images[0] != 0], [0.5, 50, 99.5])  # about 150, 1075, 2000
    (line,) = _check(images)
    assert line == (
        "T1 (channel 0) foreground intensity outside the training range: "
        f"0.5th percentile {low:.4g} vs [10, 20]; median {median:.4g} vs [90, 110]; 99.5th percentile {high:.4g} "
        "vs [180, 220]"
    )
    # a tenth: only the 99.5th percentile (about 20) lies below its range by more than half the typical width (90)
    tenth = _brain(scale=0.1)
    high = np.percentile(tenth[0][tenth[0] != 0], 99.5)
    assert _check(tenth) == [
        f"T1 (channel 0) foreground intensity outside the training range: 99.5th percentile {high:.4g} vs [180, 220]"
    ]


def test_size_orientation_and_channel_name_oddities() -> None:
    assert _check(_brain((100, 44, 44))) == [
        "size outside the training range: 100 x 44 x 44 voxels vs [40, 50] x [40, 50] x [40, 50] voxels"
    ]
    assert _check(_brain(), direction=_tilted(20.0)) == [
        "orientation outside the training range: oblique by 20.0 vs [0.0, 0.0] degrees"
    ]
    assert _check(_brain(), name="sub-01_ses-1_FLAIR.nii.gz") == [
        "channel name: sub-01_ses-1_FLAIR.nii.gz names FLAIR, the model's channel 0 is T1"
    ]
    assert _check(_brain(), name="patient_ct.nii.gz") == [
        "channel name: patient_ct.nii.gz names CT, the model's channel 0 is T1"
    ]
    assert _check(np.zeros((1, 44, 44, 44), np.float32)) == []  # no foreground: nothing to compare


def test_the_summary_counts_and_names_the_cases_with_warnings() -> None:
    summary = PredictionSummary(
        written=[Path("a.nii.gz"), Path("b.nii.gz"), Path("c.nii.gz")],
        failed=[CaseFailure("d", ("d.nii.gz",), "unreadable")],
        cases=4,
        per_case={
            "a": {"input_warnings": ["spacing ..."], "review": True},
            "b": {"input_warnings": [], "review": False},
            "c": {"input_warnings": ["size ...", "orientation ..."], "review": True},
        },
        input_checks={"against": "f.json", "note": None},
    )
    assert summary.line() == (
        "wrote 3 prediction(s), skipped 0 already done, 1 failed: d, 2 with input warnings: a, c; "
        "2 flagged for review: a, c"
    )
    plain = summary.to_json()
    assert plain["counts"] == {"written": 3, "skipped": 0, "failed": 1, "input_warnings": 2, "review": 2}
    assert plain["per_case"]["c"]["input_warnings"] == ["size ...", "orientation ..."]
    assert plain["input_checks"] == {"against": "f.json", "note": None}
    one = PredictionSummary(written=[Path("a.nii.gz")], per_case={"a": {"input_warnings": [], "review": False}})
    assert one.line() == "wrote 1 prediction(s), skipped 0 already done, 0 failed; 0 flagged for review"


# ---------------------------------------------------------------------------- what the model knows
def test_without_training_ranges_there_is_one_note_and_no_check(data_roots: Path) -> None:
    lines: list[str] = []
    checks = InputChecks.load("Dataset999_None", ["T1"], lines.append)
    assert checks.reference.ranges is None and len(lines) == 1
    assert lines[0].startswith("input checks skipped: no training fingerprint for Dataset999_None (")
    case = InputCase("a", (Path("a.nii.gz"),), ".nii.gz")
    geometry = Geometry((44, 44, 44), (9.0, 9.0, 9.0), (0.0, 0.0, 0.0), IDENTITY)
    assert checks.check(case, _brain(scale=100.0), geometry) == [] and checks.warnings == {} and len(lines) == 1
    assert checks.to_json() == {"against": None, "note": lines[0].removeprefix("input checks skipped: ")}

    summary = data_roots / "results" / "Dataset999_None" / "fingerprint_summary.json"
    summary.parent.mkdir(parents=True)
    write_json({"dataset": "Dataset999_None", "aggregate": {}}, summary)  # exported before ranges were recorded
    assert load_training_ranges("Dataset999_None").note == (
        f"{summary}: no training ranges (a model file exported before they were recorded)"
    )
    write_json({"training_ranges": {**json.loads(json.dumps(dataclasses.asdict(RANGES))), "shape": "big"}}, summary)
    assert (
        load_training_ranges("Dataset999_None").note == f"{summary}: training_ranges.shape: expected a list, got 'big'"
    )
    summary.write_text("{not json")
    reference = load_training_ranges("Dataset999_None")
    assert reference.ranges is None and reference.note.startswith(str(summary))
    write_json({"training_ranges": dataclasses.asdict(RANGES)}, summary)
    assert load_training_ranges("Dataset999_None").ranges == RANGES
    assert load_training_ranges("Dataset999_None", ["CT"]).note == (
        f"{summary}: describes channels ['T1'], the model takes ['CT']"
    )


def test_a_trained_models_ranges_hold_the_lesion_count_and_volume_of_its_cases(trained_home: Path) -> None:
    """What the lead's QC score compares a prediction's lesion count and volume with: here the 5 training labels
    read with SimpleITK, 26-connected components counted with SimpleITK's own filter."""
    reference = load_training_ranges(NAME, ["T1"])
    assert reference.source == trained_home / "preprocessed" / NAME / "fingerprint.json" and reference.note is None
    counts, volumes = [], []
    for label in sorted((trained_home / "raw" / NAME / "labelsTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(label)) > 0
        counts.append(_components(image))
        volumes.append(sitk.GetArrayFromImage(image).sum() * np.prod(image.GetSpacing()) / 1000.0)
    assert reference.ranges.num_cases == 5
    assert reference.ranges.lesion_count == (min(counts), max(counts))
    assert reference.ranges.lesion_volume_ml == pytest.approx((min(volumes), max(volumes)))


def _components(mask: sitk.Image) -> int:
    """26-connected components of a binary image (SimpleITK: fully connected)."""
    components = sitk.ConnectedComponentImageFilter()
    components.FullyConnectedOn()
    components.Execute(mask)
    return components.GetObjectCount()


# ---------------------------------------------------------------------------- from the command line
def _scans(home: Path, folder: Path) -> Path:
    """Three scans for the tiny T1 model: a training scan as it is, one with 3x its slice thickness (every third
    slice: the same head at 10.5 mm along z) and one with its intensities x10. Returns the training scan the last two
    were made from."""
    folder.mkdir(parents=True)
    sources = sorted((home / "raw" / NAME / "imagesTr").glob("*_0000.nii.gz"))
    shutil.copy(sources[0], folder / "normal.nii.gz")
    image = sitk.ReadImage(str(sources[1]))
    sitk.WriteImage(sitk.Shrink(image, [1, 1, 3]), str(folder / "thick.nii.gz"))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 10.0, str(folder / "bright.nii.gz"))
    return sources[1]


def test_cases_outside_the_training_range_are_predicted_with_one_warning_each(
    trained_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    scans = tmp_path / "scans"
    source = _scans(trained_home, scans)
    assert predict_main(["-i", str(scans), "-o", str(tmp_path / "here"), *QUIET]) == 0
    out, err = capsys.readouterr()
    training = [sitk.ReadImage(str(p)) for p in sorted((trained_home / "raw" / NAME / "imagesTr").glob("*.nii.gz"))]
    assert {image.GetSpacing() for image in training} == {(3.5, 3.5, 3.5)}  # the tiny demo's grid (RAS)
    sizes = np.array([image.GetSize() for image in training])
    size_ranges = " x ".join(f"[{lo}, {hi}]" for lo, hi in zip(sizes.min(axis=0), sizes.max(axis=0)))
    thick = sitk.ReadImage(str(scans / "thick.nii.gz")).GetSize()
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    median = np.percentile(array[array != 0] * np.float32(10), 50)
    lines = err.splitlines()
    assert lines[0].startswith("case bright: T1 (channel 0) foreground intensity outside the training range: ")
    assert f"median {median:.4g} vs [" in lines[0]
    assert lines[1:] == [
        "case thick: spacing outside the training range: 3.5 x 3.5 x 10.5 mm vs [3.5, 3.5] x [3.5, 3.5] x [3.5, 3.5] mm",
        f"case thick: size outside the training range: {' x '.join(map(str, thick))} voxels vs {size_ranges} voxels",
    ]
    assert thick[2] * 1.5 < sizes[:, 2].min()  # a third of the slices: far below the training's
    flagged = [
        c for c, e in read_json(tmp_path / "here" / "prediction_summary.json")["per_case"].items() if e["review"]
    ]
    assert {"bright", "thick"} <= set(flagged)  # outside the training range: flagged for review
    assert out.strip() == (
        "wrote 3 prediction(s), skipped 0 already done, 0 failed, 2 with input warnings: bright, thick; "
        f"{len(flagged)} flagged for review: {', '.join(flagged)}; summary: {tmp_path / 'here' / 'prediction_summary.json'}"
    )
    assert sorted(p.name for p in (tmp_path / "here").glob("*.nii.gz")) == [
        "bright.nii.gz",
        "normal.nii.gz",
        "thick.nii.gz",
    ]
    here = read_json(tmp_path / "here" / "prediction_summary.json")
    assert here["counts"]["input_warnings"] == 2
    assert here["input_checks"] == {
        "against": str(trained_home / "preprocessed" / NAME / "fingerprint.json"),
        "note": None,
    }
    assert {case: entry["input_warnings"] for case, entry in here["per_case"].items()} == {
        "bright": [lines[0].removeprefix("case bright: ")],
        "normal": [],
        "thick": [line.removeprefix("case thick: ") for line in lines[1:]],
    }
    for case in ("bright", "thick"):  # an input outside the training range is flagged for review
        qc = read_json(tmp_path / "here" / f"{case}_lesions.json")["qc"]
        assert qc["review"] and any(reason.startswith("input outside the training range") for reason in qc["reasons"])

    # A model file carries the ranges: the same warnings on a machine without the training data.
    export_model(tmp_path / "model.zip", NAME)
    monkeypatch.setenv("AUTOSEG_HOME", str(tmp_path / "elsewhere"))
    command = ["-m", str(tmp_path / "model.zip"), "-i", str(scans), "-o", str(tmp_path / "there"), *QUIET]
    assert predict_main(command) == 0
    assert capsys.readouterr().err.splitlines() == lines
    there = read_json(tmp_path / "there" / "prediction_summary.json")
    assert [e["input_warnings"] for e in there["per_case"].values()] == [
        e["input_warnings"] for e in here["per_case"].values()
    ]
    assert there["input_checks"]["against"] == str(
        tmp_path / "elsewhere" / "results" / NAME / "fingerprint_summary.json"
    )


# ---------------------------------------------------------------------------- multi-channel sets
def _touch(folder: Path, *names: str) -> None:
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    for name in names:
        write_image(np.ones((4, 4, 4), np.float32), geometry, folder / name)


def test_a_multi_channel_set_is_refused_by_a_one_channel_model_unless_the_files_are_separate_scans(
    tmp_path: Path,
) -> None:
    ctp = [f"ctp_000_{c:04d}.nii.gz" for c in range(5)]
    _touch(tmp_path / "ctp", *ctp)
    with pytest.raises(UsageError) as error:
        find_input_cases(tmp_path / "ctp", 1, channel_names=["T1"])
    assert str(error.value) == (
        f"{tmp_path / 'ctp'}: ctp_000_0000.nii.gz ... ctp_000_0004.nii.gz form one case of 5 channels (ctp_000), but "
        "the model takes 1 channel (T1); predict them with a 5-channel model, or add --one-case-per-file if every "
        "file is a separate scan"
    )
    separate = find_input_cases(tmp_path / "ctp", 1, one_case_per_file=True)
    assert [c.identifier for c in separate] == [
        "ctp_000",
        "ctp_000_0001",
        "ctp_000_0002",
        "ctp_000_0003",
        "ctp_000_0004",
    ]
    assert [c.identifier for c in find_input_cases(tmp_path / "ctp" / "ctp_000_0002.nii.gz", 1)] == ["ctp_000_0002"]
    assert [c.images for c in find_input_cases(tmp_path / "ctp", 5)] == [tuple(tmp_path / "ctp" / n for n in ctp)]

    _touch(tmp_path / "pairs", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "c_0001.nii.gz")
    with pytest.raises(
        UsageError,
        match=re.escape(
            "a_0000.nii.gz ... a_0001.nii.gz form one case of 2 channels (a) (and 1 more such set(s): b), but the model takes 1 channel (0)"
        ),
    ):
        find_input_cases(tmp_path / "pairs", 1)
    # plain scans whose names merely end in digits, and a channel file without its channel 1, keep working
    _touch(tmp_path / "plain", "sub_0001.nii.gz", "sub_0002.nii.gz", "scan_0000.nii.gz", "scan_0002.nii.gz", "x.mha")
    assert [c.identifier for c in find_input_cases(tmp_path / "plain", 1)] == [
        "scan",
        "scan_0002",
        "sub_0001",
        "sub_0002",
        "x",
    ]
    with pytest.raises(
        UsageError,
        match=re.escape("--one-case-per-file is for a one-channel model; this model takes 2 channels (T1, FLAIR)"),
    ):
        find_input_cases(tmp_path / "pairs", 2, one_case_per_file=True, channel_names=["T1", "FLAIR"])


def test_a_ct_perfusion_case_given_to_a_t1_model_on_the_command_line(
    trained_home: Path, tiny_ctp: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's trial: the five channels of a CT perfusion case to a one-channel T1 model are refused (exit 1,
    one line, nothing written); with --one-case-per-file each file is predicted as a scan of its own."""
    scans = tmp_path / "ctp"
    scans.mkdir()
    case = sorted((tiny_ctp / "imagesTr").glob("*_0000.nii.gz"))[0].name.removesuffix("_0000.nii.gz")
    for channel in range(5):
        shutil.copy(tiny_ctp / "imagesTr" / f"{case}_{channel:04d}.nii.gz", scans)
    assert predict_main(["-i", str(scans), "-o", str(tmp_path / "out"), *QUIET]) == 1
    assert capsys.readouterr().err == (
        f"error: {scans}: {case}_0000.nii.gz ... {case}_0004.nii.gz form one case of 5 channels ({case}), but the "
        "model takes 1 channel (T1); predict them with a 5-channel model, or add --one-case-per-file if every file "
        "is a separate scan\n"
    )
    assert not (tmp_path / "out").exists()
    assert predict_main(["-i", str(scans), "-o", str(tmp_path / "out"), "--one-case-per-file", *QUIET]) == 0
    names = [case, *(f"{case}_{c:04d}" for c in range(1, 5))]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [f"{n}.nii.gz" for n in names]
    summary = read_json(tmp_path / "out" / "prediction_summary.json")
    assert sorted(summary["per_case"]) == names
    # CT in Hounsfield units is far below the T1 intensities (its median about -1000 in this synthetic head)
    warnings = summary["per_case"][case]["input_warnings"]
    assert any("foreground intensity outside the training range" in line for line in warnings)


def test_one_case_per_file_with_a_multi_channel_model_is_refused(
    trained_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    one_channel = load_model(NAME, CONFIGURATION)
    two = dataclasses.replace(one_channel, plans=dataclasses.replace(one_channel.plans, channels=("T1", "FLAIR")))
    monkeypatch.setattr("autoseg.api.predict_models.load_model", lambda *args, **kwargs: two)
    _touch(tmp_path / "in", "a_0000.nii.gz", "a_0001.nii.gz")
    assert predict_main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--one-case-per-file", *QUIET]) == 1
    assert capsys.readouterr().err == (
        "error: --one-case-per-file is for a one-channel model; this model takes 2 channels (T1, FLAIR), one file "
        "each: CASE_0000 ... CASE_0001\n"
    )
