"""Preprocessing and its inverse: geometry restored exactly, lesion volume kept, re-runs skip finished cases;
histogram equalization, planned on request, in its own data folder, applied alike at prediction time."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import autoseg.io.files
from autoseg.api.plan import plan_and_preprocess
from autoseg.commands.plan import main as plan_main
from autoseg.data.dataset import find_dataset
from autoseg.infer.predictor import Predictor
from autoseg.io.files import array_damage, load_array, read_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image, write_image, write_like
from autoseg.paths import preprocessed_folder
from autoseg.plans import Normalization, Plans, Resampling
from autoseg.preprocess import preprocessing
from autoseg.preprocess.cases import (
    CASE_PROPERTIES_VERSION,
    CaseProperties,
    CasePropertiesError,
    array_files,
    load_case,
    remove_stale_cases,
)
from autoseg.preprocess.preprocessing import (
    normalize,
    preprocess_arrays,
    preprocess_dataset,
    preprocessing_key,
    restore_labels,
    restore_probabilities,
)

OBLIQUE = tuple(np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]]).ravel().tolist())


def ellipsoid_case(shape, spacing, radius_mm=14.0):
    """A bright brain-like block with a dark ellipsoidal lesion; returns (images (1, X, Y, Z), label)."""
    grid = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    label = (sum((g / r) ** 2 for g, r in zip(grid, (radius_mm, radius_mm * 1.2, radius_mm))) <= 1).astype(np.uint8)
    image = np.zeros(shape, np.float32)
    image[2:-2, 2:-2, 1:-1] = 100 + np.random.default_rng(0).normal(0, 5, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
    image[label > 0] = 30
    return image[None], label


@pytest.mark.parametrize(
    "spacing, direction, target",
    [
        ((1.0, 1.0, 1.0), None, (1.0, 1.0, 1.0)),  # isotropic, nothing to resample
        ((0.8, 0.8, 3.0), None, (1.5, 1.5, 1.5)),  # anisotropic to isotropic
        ((1.0, 1.0, 1.2), OBLIQUE, (1.0, 1.0, 1.0)),  # oblique direction, slightly anisotropic
        ((0.9, 0.9, 5.0), OBLIQUE, (0.8, 0.8, 5.0)),  # CT perfusion slab, in-plane only
    ],
)
def test_inverse_restores_geometry_and_lesion_volume(tiny_atlas, spacing, direction, target) -> None:
    configuration = plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()
    configuration = dataclasses.replace(configuration, target_spacing=target)
    shape = tuple(int(round(56 / s)) for s in spacing)
    images, label = ellipsoid_case(shape, spacing)
    geometry = Geometry(shape, spacing, (-20.0, 13.0, 7.5), direction or (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    data, seg, properties = preprocess_arrays(images, label, geometry, configuration)
    assert data.shape[1:] == seg.shape == properties.resampled_shape
    restored = restore_labels(seg, properties)
    probabilities = restore_probabilities(seg[None].astype(np.float32), properties)
    assert restored.shape == probabilities.shape[1:] == shape
    volume = label.sum() * np.prod(spacing)
    assert abs(restored.sum() * np.prod(spacing) - volume) / volume < 0.02
    assert abs((probabilities[0] >= 0.5).sum() * np.prod(spacing) - volume) / volume < 0.02
    assert abs(seg.sum() * np.prod(target) - volume) / volume < 0.02


def test_restored_prediction_written_with_the_input_geometry(tiny_ctp: Path, tmp_path: Path) -> None:
    result = plan_and_preprocess("CTPTiny", progress=False)
    configuration = result.plans.configuration()
    folder = preprocessed_folder(find_dataset("CTPTiny").name) / configuration.data_identifier
    for case in find_dataset("CTPTiny").cases():
        data, seg, properties = load_case(folder, case.identifier)
        assert data.shape[0] == 5 and data.dtype == np.float32 and seg.dtype == np.uint8
        _, geometry = read_image(case.label, np.uint8)
        assert properties.geometry == geometry
        restored = restore_labels(np.asarray(seg), properties)
        # The CTP demo is stored LPS, not canonical: writing puts the restored labels back into that orientation.
        write_like(restored, geometry, tmp_path / "prediction.nii.gz", case.images[0])
        restored, written = read_image(tmp_path / "prediction.nii.gz", np.uint8, canonical=False)
        original, stored = read_image(case.label, np.uint8, canonical=False)
        assert written.differences(stored) == []
        overlap = 2 * np.logical_and(restored, original).sum() / max(1, restored.sum() + original.sum())
        assert overlap > 0.9, case.identifier


def test_normalization_per_scheme(tiny_ctp: Path, tiny_atlas: Path) -> None:
    atlas = plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()
    folder = preprocessed_folder(find_dataset("ATLASTiny").name) / atlas.data_identifier
    data, _, _ = load_case(folder, find_dataset("ATLASTiny").cases()[0].identifier)
    brain = data[0] != 0
    assert abs(data[0][brain].mean()) < 0.05 and abs(data[0][brain].std() - 1) < 0.05
    ctp = plan_and_preprocess("CTPTiny", progress=False).plans.configuration()
    folder = preprocessed_folder(find_dataset("CTPTiny").name) / ctp.data_identifier
    data, _, _ = load_case(folder, find_dataset("CTPTiny").cases()[0].identifier)
    for channel, scheme in zip(data, ctp.normalization):
        low, high = (np.array(scheme.clip) - scheme.mean) / scheme.std
        assert channel.min() >= low - 1e-4 and channel.max() <= high + 1e-4


def test_rerun_skips_finished_cases_and_redoes_incomplete_ones(tiny_atlas: Path) -> None:
    first = plan_and_preprocess("ATLASTiny", progress=False)
    assert len(first.preprocessed["3d_resunet"]) == 4
    assert plan_and_preprocess("ATLASTiny", progress=False).preprocessed["3d_resunet"] == []
    folder = preprocessed_folder(find_dataset("ATLASTiny").name) / "3d_resunet"
    cases = find_dataset("ATLASTiny").cases()
    (folder / f"{cases[1].identifier}.json").unlink()  # as if killed before the case finished
    configuration = first.plans.configuration()
    assert preprocess_dataset(cases, configuration, folder, progress=False) == [cases[1].identifier]
    changed = dataclasses.replace(configuration, resampling=Resampling(image_order=1))
    assert len(preprocess_dataset(cases, changed, folder, progress=False)) == 4, "new settings redo every case"
    assert not list(folder.glob(".*tmp*")), "no temporary files left behind"


def test_case_json_is_typed_an_older_one_stays_up_to_date_and_an_unreadable_one_is_redone(
    tiny_atlas: Path, tmp_path: Path
) -> None:
    configuration = plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()
    folder = preprocessed_folder(find_dataset("ATLASTiny").name) / configuration.data_identifier
    cases = find_dataset("ATLASTiny").cases()
    older, unknown, wrong = (folder / f"{case.identifier}.json" for case in cases[:3])
    properties = CaseProperties.from_json(older)
    assert isinstance(properties.geometry, Geometry) and properties.case == cases[0].identifier
    assert properties.key == preprocessing_key(configuration) and properties.schema_version == CASE_PROPERTIES_VERSION
    properties.to_json(tmp_path / "copy.json")
    assert CaseProperties.from_json(tmp_path / "copy.json") == properties
    plain = read_json(older)  # as written before CASE.json had a version
    del plain["schema_version"], plain["symmetry"]
    older.write_text(json.dumps(plain))
    unknown.write_text(json.dumps({**read_json(unknown), "spacing": [1, 1, 1]}))
    wrong.write_text(json.dumps({**read_json(wrong), "key": 7}))
    with pytest.raises(CasePropertiesError, match=r"unknown field\(s\) \['spacing'\]; re-run autoseg_plan") as error:
        CaseProperties.from_json(unknown)
    assert str(unknown) in str(error.value)
    with pytest.raises(CasePropertiesError, match="key: expected str, got 7"):
        load_case(folder, cases[2].identifier)
    assert CaseProperties.from_json(older) == properties
    redone = preprocess_dataset(cases, configuration, folder, progress=False)
    assert redone == [cases[1].identifier, cases[2].identifier], "the older CASE.json is still up to date"


def test_a_damaged_array_is_not_up_to_date_and_only_its_case_is_redone(tiny_atlas: Path) -> None:
    first = plan_and_preprocess("ATLASTiny", progress=False)
    folder = preprocessed_folder(find_dataset("ATLASTiny").name) / "3d_resunet"
    cut, flipped = (c.identifier for c in find_dataset("ATLASTiny").cases()[1:3])
    for case in (cut, flipped):
        records = read_json(folder / f"{case}.json")["arrays"]
        assert sorted(records) == [f"{case}.npy", f"{case}_lesion.npy", f"{case}_seg.npy"]
    data = (folder / f"{cut}.npy").read_bytes()
    (folder / f"{cut}.npy").write_bytes(data[: len(data) // 2])  # cut short after planning
    seg = bytearray((folder / f"{flipped}_seg.npy").read_bytes())
    seg[-1] ^= 1  # same size, one changed byte: only the checksum sees it
    (folder / f"{flipped}_seg.npy").write_bytes(bytes(seg))
    again = plan_and_preprocess("ATLASTiny", progress=False)
    assert sorted(again.preprocessed["3d_resunet"]) == sorted([cut, flipped])
    assert again.plans == first.plans
    for case in (cut, flipped):
        records = read_json(folder / f"{case}.json")["arrays"]
        assert all(array_damage(folder / name, record) is None for name, record in records.items())
    assert load_array(folder / f"{cut}.npy").shape[0] == 1


def test_a_full_disk_while_preprocessing_is_one_line_and_leaves_nothing_broken(
    tiny_atlas: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    original, writes = autoseg.io.files._ChecksumWriter.write, []

    def fills_up(self: object, data: bytes) -> int:
        writes.append(len(data))
        if len(writes) == 7:  # in the second case: a .npy half written, then the disk is full
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(autoseg.io.files._ChecksumWriter, "write", fills_up)
    assert plan_main(["-d", "ATLASTiny", "-np", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    folder = preprocessed_folder(find_dataset("ATLASTiny").name) / "3d_resunet"
    assert len(err.splitlines()) == 1 and err.startswith("error: no space left on device while writing "), err
    assert err.removeprefix("error: no space left on device while writing ").startswith(str(folder)), err
    assert not list(folder.glob(".*tmp*")), "no temporary file left"
    for path in folder.glob("*.npy"):  # whatever is under a final name is whole
        assert array_damage(path) is None, path
    monkeypatch.setattr(autoseg.io.files._ChecksumWriter, "write", original)
    assert plan_main(["-d", "ATLASTiny", "-np", "1", "--no-progress"]) == 0  # space freed: the same command finishes
    assert "3 case(s) (re)computed" in capsys.readouterr().out


def test_halving_the_resolution_keeps_lesion_volume_within_five_percent(tiny_atlas) -> None:
    """1 mm -> 2 mm -> 1 mm (CPUPlanner on ATLAS): a 2 mm voxel half inside a lesion is a tie, which
    the one-hot argmax gives to background; a 14 mm lesion loses about 4% of its volume on the way."""
    configuration = plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()
    configuration = dataclasses.replace(configuration, target_spacing=(2.0, 2.0, 2.0))
    images, label = ellipsoid_case((56, 56, 56), (1.0, 1.0, 1.0))
    geometry = Geometry((56, 56, 56), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), OBLIQUE)
    _, seg, properties = preprocess_arrays(images, label, geometry, configuration)
    restored = restore_labels(seg, properties)
    assert restored.shape == label.shape
    assert abs(int(restored.sum()) - int(label.sum())) / label.sum() < 0.05


def test_lesion_voxels_where_the_image_is_zero_are_kept(tiny_atlas: Path) -> None:
    """Skull stripping removed the half of a cortical lesion on one side: every lesion voxel stays in the training
    labels (the crop covers the non-zero region and the label), and the fingerprint counts the cut-off voxels."""
    case = find_dataset("ATLASTiny").cases()[0]
    image, geometry = read_image(case.images[0], canonical=False)
    label, _ = read_image(case.label, np.uint8, canonical=False)
    lesion = np.argwhere(label > 0)
    middle = int(np.median(lesion[:, 0]))
    image[: middle + 1] = 0  # everything up to the lesion's middle along x, lesion included, is "stripped"
    write_image(image, geometry, case.images[0])
    outside = int(np.count_nonzero(label[: middle + 1]))
    assert 0 < outside < int(np.count_nonzero(label))
    result = plan_and_preprocess("ATLASTiny", progress=False)
    configuration = result.plans.configuration()
    fingerprint = json.loads(result.fingerprint_path.read_text())
    assert fingerprint["cases"][case.identifier]["lesion_voxels_outside_nonzero"] == outside
    assert any(
        f"case {case.identifier}:" in note and f"note: {outside} lesion voxel(s)" in note for note in result.notes
    )
    data, seg, properties = load_case(
        preprocessed_folder(find_dataset("ATLASTiny").name) / configuration.data_identifier, case.identifier
    )
    assert tuple(configuration.target_spacing) == tuple(geometry.spacing), "no resampling: voxels counted as they are"
    assert int(np.count_nonzero(seg)) == int(np.count_nonzero(label))
    canonical_label, _ = read_image(case.label, np.uint8)
    assert np.array_equal(restore_labels(np.asarray(seg), properties), canonical_label)


# ---------------------------------------------------------------------------- histogram equalization
def _brain_like(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A skewed (gamma) intensity distribution inside a block, zeros around it: (X, Y, Z) channel and its mask."""
    rng = np.random.default_rng(seed)
    channel = np.zeros((30, 32, 28), np.float32)
    channel[4:26, 3:29, 5:23] = rng.gamma(2.0, 40.0, (22, 26, 18)) + 1.0
    return channel, channel != 0


def test_histogram_equalization_is_monotonic_uniform_and_leaves_the_background() -> None:
    channel, mask = _brain_like()
    out = normalize(channel, mask, Normalization(channel="T1", scheme="histogram_equalization"))
    assert out.dtype == np.float32 and out.shape == channel.shape
    assert np.all(out[~mask] == 0)  # background untouched (0, as the z-score schemes leave it)
    values, order = out[mask], np.argsort(channel[mask], kind="stable")
    assert np.all(np.diff(values[order]) >= 0)  # monotonic in the input intensity
    assert values.mean() == pytest.approx(0.0, abs=0.05) and values.std() == pytest.approx(1.0, abs=0.05)
    uniform = np.sort(values / np.sqrt(12) + 0.5)  # back onto [0, 1]
    expected = (np.arange(len(uniform)) + 0.5) / len(uniform)
    assert np.abs(uniform - expected).max() < 0.02  # Kolmogorov distance to the uniform distribution
    skewed = np.sort((channel[mask] - channel[mask].min()) / np.ptp(channel[mask]))
    assert np.abs(skewed - expected).max() > 0.3  # ... which the input was far from
    assert np.all(
        normalize(np.full_like(channel, 5.0) * mask, mask, Normalization(channel="T1", scheme="histogram_equalization"))
        == 0
    )


def test_histeq_option_is_planned_with_its_reason_in_its_own_folder_and_prediction_normalizes_alike(
    tiny_atlas, data_roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoseg.commands.plan import main as plan_main

    assert plan_main(["-d", "ATLASTiny", "--no-progress", "-np", "1"]) == 0
    assert plan_main(["-d", "ATLASTiny", "--no-progress", "-np", "1", "--normalization", "histeq"]) == 0
    folder = data_roots / "preprocessed" / "Dataset901_ATLASTiny"
    plans = Plans.from_json(folder / "plans.json")
    # the histeq twins are added beside the z-score configurations, under names of their own; the default stays z-score
    twins = {name: name + "_histeq" for name in plans.configurations if not name.endswith("_histeq")}
    assert sorted(plans.configurations) == sorted([*twins, *twins.values()])
    assert plans.default_configuration == "3d_resunet"
    assert [n.scheme for n in plans.configuration().normalization] == ["zscore_foreground"]
    for name, twin in twins.items():
        zscore_configuration, histeq_configuration = plans.configuration(name), plans.configuration(twin)
        assert histeq_configuration.data_identifier == zscore_configuration.data_identifier + "_histeq"
        assert histeq_configuration.network == zscore_configuration.network
        assert histeq_configuration.schedule == zscore_configuration.schedule
    configuration = plans.configuration("3d_resunet_histeq")
    assert [n.scheme for n in configuration.normalization] == ["histogram_equalization"]
    assert "as asked (--normalization histeq)" in configuration.reasons["normalization"]
    assert "paper 002" in configuration.reasons["normalization"]
    assert configuration.data_identifier == "3d_resunet_histeq"
    zscore, histeq = folder / "3d_resunet", folder / "3d_resunet_histeq"
    case = sorted(p.stem for p in histeq.glob("*.json"))[0]
    assert (zscore / f"{case}.npy").is_file()  # the z-score data are still there, untouched
    assert not np.allclose(load_case(zscore, case)[0], load_case(histeq, case)[0])

    # Prediction normalizes in the same place as preprocessing: the stored case equals the prediction-time arrays.
    raw = find_dataset("ATLASTiny")
    source = next(c for c in raw.cases() if c.identifier == case)
    images, geometry = read_image(source.images[0])
    schemes = []
    real_normalize = preprocessing.normalize

    def recording(channel, foreground, scheme):
        schemes.append(scheme.scheme)
        return real_normalize(channel, foreground, scheme)

    monkeypatch.setattr(preprocessing, "normalize", recording)
    data, _, _ = preprocess_arrays(images[None], None, geometry, configuration)
    assert np.array_equal(data, load_case(histeq, case)[0])
    predictor = Predictor(configuration, [torch.nn.Conv3d(1, 1, 1)])
    predictor.predict_case(images[None], geometry)
    assert schemes == ["histogram_equalization"] * 2

    # a z-score re-plan keeps the histeq configurations (they may have been trained) and says so
    assert plan_main(["-d", "ATLASTiny", "--no-progress", "-np", "1"]) == 0
    replanned = Plans.from_json(folder / "plans.json")
    assert replanned.configurations == plans.configurations
    assert replanned.reasons["kept_configurations"].startswith(", ".join(twins.values()) + ": kept from the previous")


def test_a_hand_edited_histeq_plan_needs_its_own_data_identifier(tiny_atlas, data_roots: Path, capsys) -> None:
    from autoseg.commands.plan import main as plan_main

    assert plan_main(["-d", "ATLASTiny", "--no-progress", "-np", "1"]) == 0
    path = data_roots / "preprocessed" / "Dataset901_ATLASTiny" / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_resunet"]["normalization"] = [{"channel": "T1", "scheme": "histogram_equalization"}]
    path.write_text(json.dumps(plans))
    assert plan_main(["-d", "ATLASTiny", "--preprocess-only", "--no-progress"]) == 1
    assert "3d_resunet.data_identifier: '3d_resunet' is the folder of z-score data" in capsys.readouterr().err
    plans["configurations"]["3d_resunet"]["data_identifier"] = "3d_resunet_histeq"
    path.write_text(json.dumps(plans))
    assert plan_main(["-d", "ATLASTiny", "--preprocess-only", "--no-progress"]) == 1
    assert "3d_resunet.name: a histogram-equalized configuration needs a name of its own" in capsys.readouterr().err
    plans["configurations"]["3d_resunet"]["name"] = "3d_resunet_histeq"
    plans["configurations"]["3d_resunet_histeq"] = plans["configurations"].pop("3d_resunet")
    plans["default_configuration"] = "3d_resunet_histeq"
    path.write_text(json.dumps(plans))
    assert plan_main(["-d", "ATLASTiny", "--preprocess-only", "--no-progress", "-np", "1"]) == 0
    assert any((path.parent / "3d_resunet_histeq").glob("*.npy"))


def test_only_the_files_autoseg_wrote_for_a_removed_case_are_deleted(tmp_path: Path) -> None:
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    properties = CaseProperties(
        geometry=geometry,
        crop_box=((0, 4),) * 3,
        cropped_shape=(4, 4, 4),
        resampled_shape=(4, 4, 4),
        target_spacing=(1.0, 1.0, 1.0),
    )
    for case in ("kept", "gone", "gone_seg"):  # ``gone_seg.npy`` is both gone's labels and case gone_seg's data
        dataclasses.replace(properties, case=case).to_json(tmp_path / f"{case}.json")
        for path in array_files(tmp_path, case):
            np.save(path, np.zeros(2))
    dataclasses.replace(properties, case=None).to_json(tmp_path / "scan.json")  # not a training case's
    (tmp_path / "notes.json").write_text('{"mine": true}')  # the user's
    (tmp_path / "other.npy").write_bytes(b"")
    before = {p.name for p in tmp_path.iterdir()}
    assert remove_stale_cases(tmp_path, ["kept", "gone_seg"]) == ["gone"]
    assert before - {p.name for p in tmp_path.iterdir()} == {"gone.json", "gone.npy", "gone_lesion.npy"}


def _store_lesions_as(folder: Path, lesion: int) -> int:
    """Declare ``{"background": 0, "lesion": lesion}`` and store every lesion voxel of ``folder``'s label files as
    ``lesion`` (uint16 when it needs it); returns the number of such voxels, counted in the files as written."""
    description = read_json(folder / "dataset.json")
    (folder / "dataset.json").write_text(json.dumps({**description, "labels": {"background": 0, "lesion": lesion}}))
    count = 0
    for path in sorted((folder / "labelsTr").iterdir()):
        image = sitk.ReadImage(str(path))
        array = np.where(sitk.GetArrayFromImage(image) > 0, lesion, 0).astype(np.uint8 if lesion < 256 else np.uint16)
        stored = sitk.GetImageFromArray(array)
        stored.CopyInformation(image)
        sitk.WriteImage(stored, str(path))
        count += int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == lesion))
    return count


@pytest.mark.parametrize("lesion", [255, 300])
def test_a_dataset_declared_0_255_is_preprocessed_with_every_lesion_voxel_as_class_1(
    tiny_atlas: Path, lesion: int
) -> None:
    """The training target of a dataset whose labels are 0/255 (or 0/300, which uint8 would store as 44) holds
    every lesion voxel of its label files, as class 1 (the class the network's first channel learns); before, it
    held none."""
    expected = _store_lesions_as(tiny_atlas, lesion)
    assert expected > 0
    result = plan_and_preprocess("ATLASTiny", progress=False)
    configuration = result.plans.configuration()
    spacings = {tuple(read_image(path)[1].spacing) for path in sorted((tiny_atlas / "labelsTr").iterdir())}
    assert spacings == {tuple(configuration.target_spacing)}  # not resampled: voxel counts compare one to one
    folder = preprocessed_folder("Dataset901_ATLASTiny") / configuration.data_identifier
    segs = [load_array(path) for path in sorted(folder.glob("*_seg.npy"))]
    assert len(segs) == 4 and all(seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1} for seg in segs)
    assert sum(int(np.count_nonzero(seg == 1)) for seg in segs) == expected
    assert result.plans.labels == {"background": 0, "lesion": lesion}
    key = preprocessing_key(configuration, result.plans.labels)
    assert key != preprocessing_key(configuration), "data preprocessed before as 0/255 must be redone"
    assert preprocessing_key(configuration, {"background": 0, "lesion": 1}) == preprocessing_key(configuration)
