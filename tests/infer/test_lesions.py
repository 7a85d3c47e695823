"""The per-case lesion report (``autoseg.infer.lesions``): counts, volumes, centroids, boxes and hemispheres measured
on the written file, checked against SimpleITK and scipy on anisotropic, oblique and reoriented grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoseg.infer.lesions import HEMISPHERE_SHARE, Midline, head_midline, lesion_report, symmetry_midline
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image, write_image, write_like


def _oblique_direction(degrees: float) -> tuple[float, ...]:
    """A rotation about world z by ``degrees`` composed with a flip of the first two axes (stored as LPS-like)."""
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    flips = np.diag([-1.0, 1.0, -1.0])
    return tuple((rotation @ flips).ravel())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A stored (not canonical) anisotropic, oblique image: a bright box (the head) on a dark background."""
    geometry = Geometry((30, 26, 12), (0.9, 1.3, 3.0), (12.0, -40.0, 7.5), _oblique_direction(12.0))
    image = np.zeros(geometry.shape, np.float32)
    image[3:27, 2:24, 1:11] = 100.0
    write_image(image, geometry, tmp_path / "scan.nii.gz")
    return tmp_path / "scan.nii.gz"


def _stored_components(path: Path) -> tuple[np.ndarray, int, sitk.Image]:
    """26-connected components of a written mask, in the file's own (i, j, k) order, by scipy."""
    image = sitk.ReadImage(str(path))
    mask = sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 0
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return labelled, count, image


def test_volumes_centroids_and_boxes_match_an_independent_measurement_of_the_written_file(
    source: Path, tmp_path: Path
) -> None:
    _, canonical = read_image(source)
    classes = np.zeros(canonical.shape, np.uint8)
    classes[5:9, 4:8, 2:5] = 1  # a block of 4 x 4 x 3
    classes[15, 15, 6] = 1  # two voxels touching only at a corner: one lesion under 26-connectivity
    classes[16, 16, 7] = 1
    classes[20:22, 3:5, 8:10] = 2  # a second label
    probability = np.where(classes > 0, 0.8, 0.1).astype(np.float32)
    probability[5, 4, 2] = 0.95
    write_like(classes, canonical, tmp_path / "mask.nii.gz", source)

    report = lesion_report(classes, canonical, source, {"background": 0, "core": 1, "rim": 2}, probability)

    labelled, count, image = _stored_components(tmp_path / "mask.nii.gz")
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    assert report.lesion_count == count == 3
    assert report.voxel_volume_ml == pytest.approx(voxel_ml)
    expected = []
    for index, box in enumerate(ndimage.find_objects(labelled), start=1):
        voxels = np.argwhere(labelled == index)
        centre = voxels.mean(axis=0)
        lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre])
        expected.append((len(voxels), [s.start for s in box], [s.stop for s in box], lps))
    expected.sort(key=lambda e: (-e[0], e[1]))
    for lesion, (voxels, start, stop, lps) in zip(report.lesions, expected):
        assert lesion.voxels == voxels
        assert lesion.volume_ml == pytest.approx(voxels * voxel_ml)
        assert lesion.bounding_box == {"start": start, "stop": stop}
        assert lesion.centroid_lps_mm == pytest.approx(lps, abs=1e-6)
        assert lesion.centroid_ras_mm == pytest.approx((-lps[0], -lps[1], lps[2]), abs=1e-6)
    assert [lesion.index for lesion in report.lesions] == [1, 2, 3]
    assert [lesion.voxels for lesion in report.lesions] == [48, 8, 2]
    assert [lesion.label for lesion in report.lesions] == [1, 2, 1]
    assert report.lesions[0].max_probability == pytest.approx(0.95)
    assert report.lesions[0].mean_probability == pytest.approx((47 * 0.8 + 0.95) / 48)
    assert report.total_volume_ml == pytest.approx(58 * voxel_ml)


def test_an_empty_mask_has_no_lesions_and_zero_volume(source: Path) -> None:
    _, canonical = read_image(source)
    report = lesion_report(np.zeros(canonical.shape, np.uint8), canonical, source, [0, 1])
    assert report.lesion_count == 0 and report.total_volume_ml == 0.0
    assert report.to_json()["lesions"] == [] and "26-connected" in report.to_json()["conventions"]["connectivity"]


def test_hemispheres_follow_the_patients_sides_whatever_the_stored_orientation(tmp_path: Path) -> None:
    """World LPS x grows to the patient's left: a lesion at larger x is on the left, one across the plane midline."""
    geometry = Geometry((40, 20, 20), (1.0, 1.0, 1.0), (20.0, 0.0, 0.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    head = np.zeros(geometry.shape, np.float32)
    head[2:38, 2:18, 2:18] = 50.0
    write_image(head, geometry, tmp_path / "head.nii.gz")
    image, canonical = read_image(tmp_path / "head.nii.gz")
    midline = head_midline(image, canonical)
    # the head spans indices 2..37 along world x = 20 - i (mm), so the midline lies at x ~ 0.5
    assert midline.normal == (1.0, 0.0, 0.0)
    assert midline.point[0] == pytest.approx(0.5, abs=0.6)
    classes = np.zeros(canonical.shape, np.uint8)
    classes[4:8, 5:8, 5:8] = 1  # world x 16..13: the patient's left
    classes[30:34, 5:8, 10:13] = 1  # world x -10..-13: right
    classes[17:23, 12:15, 12:15] = 1  # world x 3..-2: across the plane
    report = lesion_report(classes, canonical, tmp_path / "head.nii.gz", [0, 1], None, midline)
    by_x = sorted(report.lesions, key=lambda lesion: -lesion.centroid_lps_mm[0])
    assert [lesion.hemisphere for lesion in by_x] == ["left", "midline", "right"]
    assert [round(lesion.centroid_lps_mm[0], 1) for lesion in by_x] == [14.5, 0.5, -11.5]
    centre = next(lesion for lesion in report.lesions if lesion.hemisphere == "midline")
    assert 1 - HEMISPHERE_SHARE < centre.left_share < HEMISPHERE_SHARE


def test_a_found_symmetry_fit_gives_the_midline_and_points_it_to_the_left() -> None:
    fit = {"found": True, "plane_normal": [-0.99, 0.1, 0.0], "plane_point": [3.0, 1.0, 2.0]}
    midline = symmetry_midline(fit)
    assert midline.normal[0] > 0 and midline.point == (3.0, 1.0, 2.0) and midline.source == "symmetry fit"
    assert symmetry_midline({**fit, "found": False}) is None and symmetry_midline(None) is None
    plane = Midline((1.0, 0.0, 0.0), (3.0, 0.0, 0.0), "test")
    assert plane.signed_distances(np.array([[5.0, 0, 0], [1.0, 0, 0]])).tolist() == [2.0, -2.0]


def test_arrays_off_the_grid_are_refused(source: Path) -> None:
    _, canonical = read_image(source)
    with pytest.raises(ValueError, match="not on the grid"):
        lesion_report(np.zeros((3, 3, 3), np.uint8), canonical, source, [0, 1])
