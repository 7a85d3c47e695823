"""Fingerprint: lesion statistics and modalities a planner relies on, the same whatever orientation a case is stored in."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoseg.data.dataset import find_dataset
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image
from autoseg.plan.fingerprint import (
    FINGERPRINT_VERSION,
    DatasetAggregate,
    Fingerprint,
    FingerprintError,
    IntensityStatistics,
    compute_fingerprint,
    lesion_statistics,
    modality_of,
    training_ranges,
)
from planners import get_planner

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def test_components_volumes_and_hemisphere_with_anisotropic_spacing() -> None:
    label = np.zeros((40, 20, 10), np.uint8)
    label[30:34, 5:8, 2:4] = 1  # 24 voxels on the high-x side: patient's left in LPS
    label[34, 8, 4] = 1  # touches the first only diagonally: 26-connected, same lesion
    foreground = np.ones_like(label, bool)
    stats = lesion_statistics(label, foreground, (0.5, 1.0, 2.0), IDENTITY)
    assert stats["lesion_components"] == 1
    assert stats["component_volumes_mm3"] == [25 * 1.0]
    assert stats["hemisphere"] == "left"
    label[2:5, 5:8, 2:4] = 1  # a second lesion on the right
    stats = lesion_statistics(label, foreground, (0.5, 1.0, 2.0), IDENTITY)
    assert stats["lesion_components"] == 2 and stats["hemisphere"] == "bilateral"
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)  # array x runs to the patient's right
    assert lesion_statistics(label[:20], foreground[:20], (0.5, 1.0, 2.0), flipped)["hemisphere"] == "left"


@pytest.mark.parametrize(
    "name, modality",
    [
        ("T1", "MRI"),
        ("FLAIR", "MRI"),
        ("CT", "CT"),
        ("NCCT", "CT"),
        ("CBF", "perfusion"),
        ("Tmax", "perfusion"),
        ("MTT", "perfusion"),
    ],
)
def test_modality_from_channel_name(name: str, modality: str) -> None:
    assert modality_of(name) == modality


def test_fingerprint_of_the_ctp_demo(tiny_ctp: Path) -> None:
    fingerprint = compute_fingerprint(find_dataset("CTPTiny"), progress=False)
    aggregate = fingerprint.aggregate
    assert aggregate.num_cases == len(fingerprint.cases)
    assert aggregate.median_spacing[2] == 5.0 and aggregate.coarse_axis == 2
    assert 2 <= aggregate.slices_along_coarse_axis["min"] <= aggregate.slices_along_coarse_axis["max"] <= 22
    assert [c.modality for c in fingerprint.channels] == ["CT"] + ["perfusion"] * 4
    for case in fingerprint.cases.values():
        assert case.lesion_volume_mm3 == pytest.approx(sum(case.component_volumes_mm3))
        assert 0 < case.lesion_fraction_of_foreground < 1
        assert all(lo < hi for lo, hi in case.nonzero_bbox)
        assert case.intensity[1].p00_5 <= case.intensity[1].p50 <= case.intensity[1].p99_5


def test_training_ranges_of_the_ctp_demo_are_those_of_its_images_read_directly(tiny_ctp: Path) -> None:
    """Each range is the (min, max) over the cases of what SimpleITK, numpy and scipy find in the files themselves:
    the canonical (RAS) grid, the percentiles of each channel where any channel is non-zero, 26-connected lesions."""
    dataset = find_dataset("CTPTiny")
    ranges = training_ranges(compute_fingerprint(dataset, progress=False))
    spacings, sizes, percentiles, counts, volumes = [], [], [], [], []
    for case in dataset.cases():
        images = [sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS") for path in case.images]
        spacings.append(images[0].GetSpacing())
        sizes.append(images[0].GetSize())
        arrays = np.stack([sitk.GetArrayFromImage(image) for image in images])
        foreground = np.any(arrays != 0, axis=0)
        percentiles.append([np.percentile(array[foreground], [0.5, 50, 99.5]) for array in arrays])
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) > 0
        counts.append(ndimage.label(lesion, structure=np.ones((3, 3, 3)))[1])
        volumes.append(lesion.sum() * np.prod(images[0].GetSpacing()) / 1000.0)
    spacings, sizes, percentiles = np.array(spacings), np.array(sizes), np.array(percentiles)  # (cases, C, 3)
    assert ranges.num_cases == len(dataset.cases()) == 5  # 4 subjects, one scanned twice
    assert np.allclose(ranges.spacing_mm, np.stack([spacings.min(axis=0), spacings.max(axis=0)], axis=1))
    assert ranges.shape == tuple(zip(sizes.min(axis=0).tolist(), sizes.max(axis=0).tolist()))
    assert ranges.obliqueness_degrees == (0.0, 0.0)
    assert [c.name for c in ranges.channels] == ["CT", "CBF", "CBV", "MTT", "Tmax"]
    for index, channel in enumerate(ranges.channels):
        for column, key in enumerate(("p00_5", "p50", "p99_5")):
            values = percentiles[:, index, column]
            assert getattr(channel, key) == pytest.approx((values.min(), values.max()), rel=1e-5), (index, key)
        width = np.median(percentiles[:, index, 2] - percentiles[:, index, 0])
        assert channel.typical_width == pytest.approx(width, rel=1e-5)
    assert ranges.lesion_count == (min(counts), max(counts)) and min(counts) >= 1
    assert ranges.lesion_volume_ml == pytest.approx((min(volumes), max(volumes)))


def _thick_slice_dataset(root: Path, permuted: list[bool]) -> Path:
    """A 1 x 1 x 4 mm axial (RAS) dataset; the cases marked in ``permuted`` are stored with their axes permuted and
    flipped (``SAL``: the 4 mm axis first), the same voxels at the same world positions."""
    folder = root / "raw" / "Dataset120_Thick"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"})
    )
    ras = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    for index, permute in enumerate(permuted):
        rng = np.random.default_rng(index)
        image = np.zeros((40, 36, 10), np.float32)
        image[4:-4, 3:-3, 1:-1] = 100 + rng.normal(0, 5, (32, 30, 8))
        label = np.zeros(image.shape, np.uint8)
        label[10 + index : 18 + index, 12:20, 3:6] = 1
        geometry = Geometry((40, 36, 10), (1.0, 1.0, 4.0), (20.0 + index, -18.0, -20.0), ras)
        paths = (folder / "imagesTr" / f"t{index}_0000.nii.gz", folder / "labelsTr" / f"t{index}.nii.gz")
        for array, path in zip((image, label), paths):
            write_image(array, geometry, path)
            if permute:
                sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "SAL"), str(path))
    return folder


def test_a_case_and_its_permuted_and_flipped_copies_have_identical_fingerprints(
    tiny_atlas: Path, reoriented_copy
) -> None:
    case = find_dataset("ATLASTiny").cases()[0]
    for orientation in ("ASL", "LPI", "PIR"):
        reoriented_copy(case.images[0], tiny_atlas / "imagesTr" / f"copy{orientation}_0000.nii.gz", orientation)
        reoriented_copy(case.label, tiny_atlas / "labelsTr" / f"copy{orientation}.nii.gz", orientation)
    fingerprint = compute_fingerprint(find_dataset("ATLASTiny"), progress=False)
    original = fingerprint.cases[case.identifier]
    for orientation in ("ASL", "LPI", "PIR"):
        assert fingerprint.cases[f"copy{orientation}"] == original, orientation
    assert fingerprint.aggregate.canonical_orientation == "RAS"
    assert fingerprint.aggregate.stored_orientations == {"ASL": 1, "LPI": 1, "PIR": 1, "RAS": 4}


def test_thick_slices_stored_in_two_orientations_plan_the_canonical_spacing(data_roots: Path) -> None:
    """Half the cases axial, half with the 4 mm axis first: every case is measured as 1 x 1 x 4 mm, and the plan is
    the plan of the all-axial dataset (before reorientation the median spacing was 2.5 x 1 x 2.5 mm: no case's)."""
    _thick_slice_dataset(data_roots, [False, True, False, True])
    mixed = compute_fingerprint(find_dataset("Thick"), progress=False)
    assert mixed.aggregate.median_spacing == (1.0, 1.0, 4.0) and mixed.aggregate.coarse_axis == 2
    assert mixed.aggregate.stored_orientations == {"RAS": 2, "SAL": 2}
    for summary in mixed.cases.values():
        assert summary.spacing == (1.0, 1.0, 4.0) and summary.shape == (40, 36, 10)
    mixed_plan = get_planner("DefaultPlanner")(mixed, None, None).plan()
    shutil.rmtree(data_roots / "raw")
    _thick_slice_dataset(data_roots, [False, False, False, False])
    axial = compute_fingerprint(find_dataset("Thick"), progress=False)
    axial_plan = get_planner("DefaultPlanner")(axial, None, None).plan()
    for name, configuration in axial_plan.configurations.items():
        assert mixed_plan.configuration(name).target_spacing == configuration.target_spacing, name
        assert configuration.target_spacing[2] > configuration.target_spacing[0], "the 4 mm axis stays the coarse one"


def test_fingerprint_json_round_trips_typed_and_names_unknown_and_wrongly_typed_fields(
    tiny_atlas: Path, tmp_path: Path
) -> None:
    fingerprint = compute_fingerprint(find_dataset("ATLASTiny"), progress=False)
    path = tmp_path / "fingerprint.json"
    fingerprint.to_json(path)
    read = Fingerprint.from_json(path)
    assert read == fingerprint and isinstance(read.aggregate, DatasetAggregate)
    assert isinstance(next(iter(read.cases.values())).intensity[0], IntensityStatistics)
    assert read.aggregate.lesion_component_volumes_mm3["count"] == sum(c.lesion_components for c in read.cases.values())
    plain = json.loads(path.read_text())
    assert list(plain)[:2] == ["schema_version", "dataset"] and plain["schema_version"] == FINGERPRINT_VERSION
    assert isinstance(plain["aggregate"]["lesion_component_volumes_mm3"]["count"], int)  # counts stay integers
    case = next(iter(plain["cases"]))

    def refused(edit, message: str) -> None:
        edited = json.loads(path.read_text())
        edit(edited)
        wrong = tmp_path / "edited.json"
        wrong.write_text(json.dumps(edited))
        with pytest.raises(FingerprintError, match=message) as error:
            Fingerprint.from_json(wrong)
        assert str(wrong) in str(error.value) and "re-run autoseg_plan" in str(error.value)

    refused(
        lambda f: f["aggregate"].update(median_spacing_mm=[1, 1, 1]),
        re.escape("aggregate: unknown field(s) ['median_spacing_mm']"),
    )
    refused(
        lambda f: f["cases"][case].update(lesion_components="two"),
        re.escape(f"cases.{case}.lesion_components: expected int, got 'two'"),
    )
    refused(lambda f: f["channels"][0]["foreground"].pop("p50"), re.escape("channels[0].foreground: missing field(s)"))
    refused(
        lambda f: f.update(schema_version=FINGERPRINT_VERSION + 1),
        f"schema_version: this autoseg reads version {FINGERPRINT_VERSION}, the file has {FINGERPRINT_VERSION + 1}",
    )
    with pytest.raises(FingerprintError, match="no fingerprint found; re-run autoseg_plan"):
        Fingerprint.from_json(tmp_path / "none.json")

    older = json.loads(path.read_text())  # written before fingerprint.json had a version: the same fields
    del older["schema_version"]
    path.write_text(json.dumps(older))
    assert Fingerprint.from_json(path) == fingerprint
