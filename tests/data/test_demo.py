"""Tests for the synthetic demonstration datasets (autoseg.data.demo), on tiny cases so they run in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from autoseg.data.dataset import load_dataset
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.data.demo.ctp import CTP_CHANNELS, make_ctp_like
from autoseg.io.files import read_json
from autoseg.io.images import read_image


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("atlas")
    return {
        "first": make_atlas_like(root / "first" / "Dataset001_ATLAS", num_cases=2, seed=0, tiny=True, progress=False),
        "again": make_atlas_like(root / "again" / "Dataset001_ATLAS", num_cases=2, seed=0, tiny=True, progress=False),
        "other": make_atlas_like(root / "other" / "Dataset001_ATLAS", num_cases=2, seed=1, tiny=True, progress=False),
    }


@pytest.fixture(scope="module")
def ctp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ctp")
    return {
        "first": make_ctp_like(root / "first" / "Dataset002_CTP", num_subjects=3, seed=0, tiny=True, progress=False),
        "again": make_ctp_like(root / "again" / "Dataset002_CTP", num_subjects=3, seed=0, tiny=True, progress=False),
        "other": make_ctp_like(root / "other" / "Dataset002_CTP", num_subjects=3, seed=1, tiny=True, progress=False),
    }


@pytest.mark.parametrize("kind", ["atlas", "ctp"])
def test_same_seed_gives_identical_files_and_another_seed_different_images(
    kind: str, request: pytest.FixtureRequest
) -> None:
    folders = request.getfixturevalue(kind)
    first, again, other = (_files(folders[name]) for name in ("first", "again", "other"))
    assert first.keys() == again.keys() == other.keys()
    assert first == again
    images = [name for name in first if name.startswith("imagesTr/")]
    assert images and all(first[name] != other[name] for name in images)


def test_atlas_case_does_not_depend_on_the_number_of_cases_and_stale_cases_are_removed(
    atlas: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "Dataset001_ATLAS"
    shutil.copytree(atlas["first"], folder)
    make_atlas_like(folder, num_cases=1, seed=0, tiny=True, progress=False)
    written = _files(folder)
    assert sorted(written) == ["dataset.json", "imagesTr/atlas_0001_0000.nii.gz", "labelsTr/atlas_0001.nii.gz"]
    original = _files(atlas["first"])
    assert all(written[name] == original[name] for name in written if name != "dataset.json")
    assert read_json(folder / "dataset.json")["numTraining"] == 1


def test_atlas_dataset_json_and_layout(atlas: dict[str, Path]) -> None:
    description = read_json(atlas["first"] / "dataset.json")
    assert description["channel_names"] == {"0": "T1"}
    assert description["labels"] == {"background": 0, "lesion": 1}
    assert description["file_ending"] == ".nii.gz"
    assert description["numTraining"] == 2
    assert "synthetic" in description["description"].lower()
    cases = load_dataset(atlas["first"]).cases()
    assert [case.identifier for case in cases] == ["atlas_0001", "atlas_0002"]
    assert all(path.is_file() for case in cases for path in (*case.images, case.label))


def test_ctp_dataset_json_groups_slabs_by_subject(ctp: dict[str, Path]) -> None:
    description = read_json(ctp["first"] / "dataset.json")
    assert description["channel_names"] == {"0": "CT", "1": "CBF", "2": "CBV", "3": "MTT", "4": "Tmax"}
    assert description["labels"] == {"background": 0, "lesion": 1}
    dataset = load_dataset(ctp["first"])
    cases = dataset.cases()
    assert description["numTraining"] == len(cases) == len(description["subjects"])
    assert dataset.channel_names == CTP_CHANNELS
    by_subject: dict[str, list[str]] = {}
    for case in cases:
        assert case.identifier.startswith(f"ctp_{case.subject}_")
        by_subject.setdefault(case.subject, []).append(case.identifier)
    assert len(by_subject) == 3
    assert any(len(identifiers) == 2 for identifiers in by_subject.values())
    assert all(path.is_file() for case in cases for path in (*case.images, case.label))


def test_atlas_tiny_geometry_and_types(atlas: dict[str, Path]) -> None:
    for case in load_dataset(atlas["first"]).cases():
        image, geometry = read_image(case.images[0])
        label, label_geometry = read_image(case.label, dtype=np.uint8)
        assert all(32 <= side <= 64 for side in geometry.shape), geometry.shape
        assert not geometry.differences(label_geometry)
        assert set(np.unique(label)) <= {0, 1}
        assert image.min() >= 0 and (image == 0).any()  # skull-stripped: zero outside the brain


def test_atlas_lesions_inside_the_brain_and_darker_than_white_matter(atlas: dict[str, Path]) -> None:
    for case in load_dataset(atlas["first"]).cases():
        image, _ = read_image(case.images[0])
        lesion = read_image(case.label, dtype=np.uint8)[0] > 0
        assert lesion.sum() >= 8
        assert (image[lesion] > 0).all()
        surrounding = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (image > 0)
        white_matter_level = np.percentile(image[image > 0], 90)
        assert image[lesion].mean() < image[surrounding].mean()
        assert image[lesion].mean() < 0.75 * white_matter_level


def test_ctp_geometry(ctp: dict[str, Path]) -> None:
    dataset = load_dataset(ctp["first"])
    origins: dict[str, list[float]] = {}
    for case in dataset.cases():
        geometries = [read_image(path)[1] for path in (*case.images, case.label)]
        assert all(not geometries[0].differences(other) for other in geometries[1:])
        shape, spacing = geometries[0].shape, geometries[0].spacing
        assert shape[:2] == (64, 64) and 2 <= shape[2] <= 22
        assert spacing[2] == pytest.approx(5.0) and spacing[0] == pytest.approx(spacing[1])
        origins.setdefault(case.subject, []).append(geometries[0].origin[2])
    two_slabs = [values for values in origins.values() if len(values) == 2]
    assert two_slabs and all(abs(a - b) >= 5.0 for a, b in two_slabs)


def test_ctp_core_is_hypoperfused_and_inside_the_brain(ctp: dict[str, Path]) -> None:
    for case in load_dataset(ctp["first"]).cases():
        maps = {name: read_image(path)[0] for name, path in zip(CTP_CHANNELS, case.images, strict=True)}
        core = read_image(case.label, dtype=np.uint8)[0] > 0
        assert core.any(), case.identifier
        brain = maps["CBF"] > 0
        assert (maps["CT"] != 0).all()
        for name in ("CBF", "CBV", "MTT", "Tmax"):
            assert (maps[name][core] > 0).all() and (maps[name][~brain] == 0).all()
        healthy = brain & ~core
        assert maps["CBF"][core].mean() < 0.5 * maps["CBF"][healthy].mean()
        assert maps["Tmax"][core].mean() > max(6.0, maps["Tmax"][healthy].mean())


def test_atlas_full_resolution_case_has_the_template_geometry(tmp_path: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    datasets = pytest.importorskip("nilearn.datasets")
    folder = make_atlas_like(tmp_path / "Dataset001_ATLAS", num_cases=1, seed=3, spacing_mm=1.0, progress=False)
    image, geometry = read_image(folder / "imagesTr" / "atlas_0001_0000.nii.gz")
    label, _ = read_image(folder / "labelsTr" / "atlas_0001.nii.gz", dtype=np.uint8)
    assert geometry.shape == (197, 233, 189)
    assert geometry.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert label.any() and (image[label > 0] > 0).all()
    written = nibabel.load(str(folder / "imagesTr" / "atlas_0001_0000.nii.gz")).affine
    template = datasets.load_mni152_template(resolution=1).affine
    np.testing.assert_allclose(written, template, atol=1e-5)


def test_demo_command_writes_through_a_staged_folder_and_replaces_only_with_overwrite(
    capsys: pytest.CaptureFixture,
) -> None:
    from autoseg.commands.demo import main as demo_main
    from autoseg.paths import raw_root

    arguments = ["atlas", "--tiny", "--cases", "1", "--name", "Dataset901_T"]
    assert demo_main(arguments) == 0
    assert demo_main(arguments) == 1 and "exists; pass --overwrite" in capsys.readouterr().err
    assert demo_main([*arguments, "--overwrite", "--seed", "1"]) == 0
    assert [path.name for path in raw_root().iterdir()] == ["Dataset901_T"]  # no scratch folder left
    assert load_dataset(raw_root() / "Dataset901_T").channel_names == ("T1",)
