"""Image I/O: (x, y, z) order everywhere, the same voxels whichever reader, one canonical orientation on reading and
the input's own orientation and header on writing, atomic writes, a full disk named, damaged arrays found."""

from __future__ import annotations

import errno
import itertools
import pickle
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HOSTILE_HEADERS

from autoseg.io.checkpoints import load_checkpoint, save_checkpoint
from autoseg.io.files import (
    DamagedArrayError,
    DiskFullError,
    array_damage,
    is_disk_full,
    load_array,
    read_json,
    save_array,
    write_json,
)
from autoseg.io.geometry import (
    CANONICAL_ORIENTATION,
    Geometry,
    GeometryWarning,
    Orientation,
    canonical_geometry,
    obliqueness_degrees,
)
from autoseg.io.headers import IMAGE_ENDINGS, ImageHeaderError, ImageReadError, max_voxels
from autoseg.io.images import (
    companion_files,
    copy_image_file,
    image_files,
    read_header,
    read_image,
    remove_stale_temporaries,
    write_image,
    write_like,
)

OBLIQUE = (0.8660254, -0.5, 0.0, 0.5, 0.8660254, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path: Path, ending: str) -> None:
    array = np.random.default_rng(0).normal(size=(7, 5, 3)).astype(np.float32)
    geometry = Geometry((7, 5, 3), (0.8, 1.2, 3.0), (-10.0, 4.5, 2.0), OBLIQUE)
    write_image(array, geometry, tmp_path / f"image{ending}")
    back, read = read_image(tmp_path / f"image{ending}", canonical=False)
    assert np.array_equal(back, array)
    assert read.differences(geometry) == []


def test_nifti_voxels_match_simpleitk_in_xyz_order(tmp_path: Path) -> None:
    values = np.arange(4 * 3 * 2, dtype=np.int16).reshape(2, 3, 4)  # SimpleITK order (z, y, x)
    image = sitk.GetImageFromArray(values)
    image.SetDirection(OBLIQUE)
    sitk.WriteImage(image, str(tmp_path / "ordered.nii.gz"))
    array, geometry = read_image(tmp_path / "ordered.nii.gz", np.int16, canonical=False)
    assert geometry.shape == (4, 3, 2) and array.shape == (4, 3, 2)
    assert np.array_equal(array, values.transpose(2, 1, 0))


def test_a_truncated_nifti_is_an_error_not_zeros(tmp_path: Path) -> None:
    geometry = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(np.random.default_rng(1).random((40, 40, 40)).astype(np.float32), geometry, tmp_path / "a.nii.gz")
    data = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "a.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="a.nii.gz: truncated"):
        read_image(tmp_path / "a.nii.gz")


@pytest.mark.parametrize("kind", sorted(HOSTILE_HEADERS))
def test_a_hostile_header_is_refused_before_any_voxel_is_read(tmp_path: Path, hostile_image, kind: str) -> None:
    path = hostile_image(tmp_path / f"{kind}.nii.gz", kind)
    read_header(path)  # the header itself parses: what it declares is refused
    with pytest.raises(ImageHeaderError) as error:
        read_image(path)
    assert str(error.value).startswith(f"{path}: ") and HOSTILE_HEADERS[kind] in str(error.value)
    assert "\n" not in str(error.value)


def test_an_uncompressed_nifti_shorter_than_its_header_declares_is_refused(tmp_path: Path, hostile_image) -> None:
    path = tmp_path / "short.nii"
    hostile_image(tmp_path / "short.nii.gz", "cut_short").rename(path)  # gzip bytes: fix that first
    path.write_bytes(__import__("gzip").decompress(path.read_bytes()))
    with pytest.raises(ImageHeaderError, match=r"declares 32,000,352 bytes of voxels and header but the file holds"):
        read_image(path)


def test_the_voxel_limit_comes_from_memory_and_holds_for_every_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = tmp_path / "huge.mha"
    huge.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 32767 32767 32767\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(ImageHeaderError, match=r"huge.mha: the header declares 3.52e\+13 voxels \(32767 x 32767"):
        read_image(huge)
    geometry = Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(np.ones((64, 64, 64), np.float32), geometry, tmp_path / "sound.mha")
    assert read_image(tmp_path / "sound.mha")[0].shape == (64, 64, 64)
    monkeypatch.setattr("autoseg.io.headers.physical_memory_bytes", lambda: 4 << 20)  # 4 MiB / 32 bytes: 131,072 voxels
    assert max_voxels() == 131_072
    with pytest.raises(ImageHeaderError, match="2.62e\\+05 voxels \\(64 x 64 x 64\\), more than the 1.31e\\+05"):
        read_image(tmp_path / "sound.mha")


def test_writers_leave_no_temporary_files_and_usual_permissions(tmp_path: Path) -> None:
    write_json({"spacing": [1.0, 2.0]}, tmp_path / "x.json")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert (tmp_path / "x.json").stat().st_mode & 0o044  # readable by group/others as usual
    assert (tmp_path / "x.json").read_text() == '{\n  "spacing": [1.0, 2.0]\n}\n'


# ---------------------------------------------------------------------------- every ending's companion files
def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("ending", IMAGE_ENDINGS)
def test_every_ending_is_written_under_final_names_and_stays_readable_over_reruns(tmp_path: Path, ending: str) -> None:
    """.mhd and .nhdr headers name a separate data file: it must carry its final name (not a temporary's), every
    writer (write_image, write_like, copy_image_file) must leave exactly the files image_files names, and a re-run
    (stale temporaries removed, then the outputs written again) must keep them readable."""
    array = np.random.default_rng(5).integers(0, 200, (6, 5, 4)).astype(np.uint8)
    geometry = Geometry((6, 5, 4), (0.8, 1.2, 3.0), (-10.0, 4.5, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    source, like, copy = (tmp_path / name / f"scan{ending}" for name in ("source", "like", "copy"))
    for _ in range(2):  # the second round writes over finished outputs, as predict --overwrite does
        write_image(array, geometry, source)
        write_like(read_image(source, np.uint8)[0], read_image(source)[1], like, source)
        copy_image_file(source, copy)
        for path in (source, like, copy):
            assert _names(path.parent) == sorted(p.name for p in image_files(path)), path
            assert companion_files(path) == list(image_files(path)[1:])
            assert remove_stale_temporaries(path) == []
            voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
            assert np.array_equal(voxels, array), path
    assert len(image_files(source)) == (2 if ending in (".mhd", ".nhdr") else 1)


def test_a_header_that_names_a_temporary_data_file_keeps_it_until_it_is_replaced(tmp_path: Path) -> None:
    """Outputs of earlier versions: a finished .mhd header naming a hidden temporary data file. Removing stale
    temporaries keeps what the header names and removes the rest (files and folders); writing over it removes
    the old data file."""
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    sitk.WriteImage(image, str(tmp_path / ".scan.mhd.k1ll3d00.tmp.mhd"), useCompression=True)
    (tmp_path / ".scan.mhd.k1ll3d00.tmp.mhd").rename(tmp_path / "scan.mhd")
    assert companion_files(tmp_path / "scan.mhd") == [tmp_path / ".scan.mhd.k1ll3d00.tmp.zraw"]
    (tmp_path / ".scan.mhd.x7y8z9ab.tmp").mkdir()
    (tmp_path / ".scan.mhd.x7y8z9ab.tmp" / "scan.zraw").write_bytes(b"half")
    (tmp_path / ".scan.mhd.q1w2e3r4.tmp.zraw").write_bytes(b"half")
    removed = remove_stale_temporaries(tmp_path / "scan.mhd")
    assert sorted(p.name for p in removed) == [".scan.mhd.q1w2e3r4.tmp.zraw", ".scan.mhd.x7y8z9ab.tmp"]
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scan.mhd"))), np.arange(60).reshape(3, 4, 5)
    )
    write_image(
        np.ones((2, 2, 2), np.uint8),
        Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
        tmp_path / "scan.mhd",
    )
    assert _names(tmp_path) == ["scan.mhd", "scan.zraw"]
    assert read_image(tmp_path / "scan.mhd", np.uint8)[0].sum() == 8


# ---------------------------------------------------------------------------- a full disk
def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__context__ = inner
    return outer


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError("30056 requested and 16352 written"), True),  # numpy's short write
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), True),  # torch.save
        (RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), True),
        (RuntimeError("ITK ERROR: NiftiImageIO: No space left on device"), True),
        (_chained(RuntimeError("writing failed"), OSError(errno.ENOSPC, "No space left on device")), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("No space left on device"), False),  # not a write error
    ],
)
def test_disk_full_is_recognized_whichever_library_wrote(error: BaseException, full: bool) -> None:
    assert is_disk_full(error) is full


def _no_space(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    before = {"json": {"a": 1}, "npy": np.arange(8.0), "image": np.ones((4, 4, 4), np.float32), "pth": {"epoch": 1}}
    paths = {kind: tmp_path / f"x.{'nii.gz' if kind == 'image' else kind}" for kind in before}
    write_json(before["json"], paths["json"])
    save_array(before["npy"], paths["npy"])
    write_image(before["image"], geometry, paths["image"])
    save_checkpoint(before["pth"], paths["pth"])

    def half_then_full(self: object, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_short_write(state: object, handle: object) -> None:
        handle.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    attempts = [
        (
            "npy",
            "autoseg.io.files._ChecksumWriter.write",
            half_then_full,
            lambda: save_array(np.zeros(10**5), paths["npy"]),
        ),
        ("json", "pathlib.Path.write_text", _no_space, lambda: write_json({"b": 2}, paths["json"])),
        (
            "image",
            "SimpleITK.WriteImage",
            lambda *a, **k: (_ for _ in ()).throw(
                RuntimeError("Exception thrown in SimpleITK WriteImage: ... No space left on device")
            ),
            lambda: write_image(np.zeros((4, 4, 4), np.float32), geometry, paths["image"]),
        ),
        ("pth", "os.fsync", _no_space, lambda: save_checkpoint({"epoch": 2}, paths["pth"])),
        ("pth", "torch.save", torch_short_write, lambda: save_checkpoint({"epoch": 2}, paths["pth"])),
    ]
    for kind, target, failure, write in attempts:
        with monkeypatch.context() as patch:
            patch.setattr(target, failure)
            with pytest.raises(DiskFullError) as raised:
                write()
        assert str(raised.value) == f"no space left on device while writing {paths[kind]}", target
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values()), "no temporaries"
    assert read_json(paths["json"]) == before["json"]
    assert np.array_equal(load_array(paths["npy"]), before["npy"])
    assert np.array_equal(read_image(paths["image"])[0], before["image"])
    assert load_checkpoint(paths["pth"]) == before["pth"]
    error = pickle.loads(pickle.dumps(DiskFullError(paths["npy"])))  # crosses from preprocessing workers intact
    assert isinstance(error, DiskFullError) and str(error) == f"no space left on device while writing {paths['npy']}"


# ---------------------------------------------------------------------------- damaged arrays
def test_saved_arrays_record_size_and_checksum_and_damage_is_found(tmp_path: Path) -> None:
    path = tmp_path / "case.npy"
    array = np.random.default_rng(0).random((2, 30, 20, 10)).astype(np.float32)
    record = save_array(array, path)
    assert record["bytes"] == path.stat().st_size and array_damage(path, record) is None
    data = path.read_bytes()
    path.write_bytes(data[:-1000])  # cut short
    assert "cut short" in array_damage(path) and "cut short" in array_damage(path, record)
    for mmap in (True, False):
        with pytest.raises(DamagedArrayError, match="re-run autoseg_plan") as error:
            load_array(path, mmap=mmap)
        assert str(path) in str(error.value) and "cut short" in str(error.value)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed: same size, other bytes
    assert array_damage(path) is None, "the size alone cannot see it"
    assert "CRC-32" in array_damage(path, record)
    path.unlink()
    assert array_damage(path, record) == "the file is missing"


def _signed_permutations() -> list[tuple[float, ...]]:
    """The 48 axis-aligned direction matrices (every order and sign of axes), row-major."""
    found = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(order, signs)):
                matrix[row, column] = sign
            found.append(tuple(matrix.ravel()))
    return found


@pytest.mark.parametrize("direction", _signed_permutations() + [OBLIQUE])
def test_reorientation_is_simpleitk_dicomorient(direction: tuple[float, ...]) -> None:
    """Orientation permutes and flips exactly as SimpleITK's DICOMOrient to the canonical code, and back."""
    array = np.random.default_rng(2).random((4, 5, 6)).astype(np.float32)
    geometry = Geometry((4, 5, 6), (0.5, 1.0, 3.0), (10.0, -4.0, 7.0), direction)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    expected = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    orientation = Orientation.of(direction)
    canonical = orientation.to_canonical(array)
    assert np.array_equal(canonical, sitk.GetArrayFromImage(expected).transpose(2, 1, 0))
    reference = Geometry(expected.GetSize(), expected.GetSpacing(), expected.GetOrigin(), expected.GetDirection())
    assert orientation.canonical_geometry(geometry).differences(reference, 1e-9) == []
    assert np.array_equal(orientation.from_canonical(canonical), array)
    assert np.array_equal(orientation.from_canonical(canonical[None])[0], array)  # leading channel axes


@pytest.mark.parametrize("tilt", [0.0, 3.0, 20.0, 45.0])
def test_obliqueness_is_the_tilt_of_a_rotated_grid_whatever_its_axis_order(tilt: float) -> None:
    """A grid rotated by ``tilt`` degrees about one world axis, then stored with its axes in any order and sign, is
    ``tilt`` degrees oblique (the angle between the rotated axes and their nearest world axes)."""
    angle = np.radians(tilt)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    for permutation in _signed_permutations():
        direction = rotation @ np.asarray(permutation).reshape(3, 3)
        assert obliqueness_degrees(tuple(direction.ravel())) == pytest.approx(tilt, abs=1e-6)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_read_is_canonical_and_write_like_restores_the_stored_file(tmp_path: Path, ending: str) -> None:
    array = np.random.default_rng(3).integers(0, 3, (7, 5, 3)).astype(np.uint8)
    sagittal = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # axes point P, I, R: stored as "PIR"
    stored = Geometry((7, 5, 3), (0.8, 1.2, 3.0), (-10.0, 4.5, 2.0), sagittal)
    write_image(array, stored, tmp_path / f"source{ending}")
    canonical, geometry = read_image(tmp_path / f"source{ending}", np.uint8)
    assert Orientation.of(geometry.direction).stored == CANONICAL_ORIENTATION == "RAS"
    assert canonical.shape == geometry.shape == (3, 7, 5) and np.allclose(geometry.spacing, (3.0, 0.8, 1.2))
    assert Orientation.of(sagittal).stored == "PIR"
    assert geometry.differences(canonical_geometry(read_header(tmp_path / f"source{ending}")[0])) == []
    write_like(canonical, geometry, tmp_path / f"out{ending}", tmp_path / f"source{ending}")
    back, back_geometry = read_image(tmp_path / f"out{ending}", np.uint8, canonical=False)
    assert np.array_equal(back, array) and back_geometry.differences(stored) == []
    with pytest.raises(ValueError, match="not on the grid of"):
        write_like(canonical, stored, tmp_path / f"wrong{ending}", tmp_path / f"source{ending}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{ending}", f"source{ending}"]


def _nifti_with_moved_sform(path: Path, sform_code: int = 1) -> nibabel.Nifti1Image:
    """A 1 x 1 x 4 mm NIfTI whose sform lies (10, -5, 3) mm from its qform, as registration tools leave them."""
    qform = np.diag([-1.0, 1.0, 4.0, 1.0])
    qform[:3, 3] = (60.0, -70.0, -40.0)
    sform = qform.copy()
    sform[:3, 3] += (10.0, -5.0, 3.0)
    image = nibabel.Nifti1Image(np.random.default_rng(4).random((12, 10, 6)).astype(np.float32), None)
    image.set_qform(qform, 1)
    image.set_sform(sform, sform_code)
    image.header["cal_max"] = 1.0
    nibabel.save(image, str(path))
    return image


@pytest.mark.parametrize("sform_code, used", [(1, "sform"), (2, "qform")])
def test_qform_and_sform_are_written_as_given_and_a_disagreement_warned_once(
    tmp_path: Path, sform_code: int, used: str
) -> None:
    source = _nifti_with_moved_sform(tmp_path / "scan.nii.gz", sform_code)
    with pytest.warns(GeometryWarning) as caught:
        array, geometry = read_image(tmp_path / "scan.nii.gz")
        read_image(tmp_path / "scan.nii.gz")  # read again: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "scan.nii.gz" in message and f"autoseg resamples and predicts with the {used}" in message
    assert "up to 11.6 mm apart (10.0 voxels along one axis)" in message  # |(10, -5, 3)| mm; 10 voxels of 1 mm along x
    write_like((array > 0.5).astype(np.uint8), geometry, tmp_path / "mask.nii.gz", tmp_path / "scan.nii.gz")
    written = nibabel.load(str(tmp_path / "mask.nii.gz"))
    for coded in ("get_qform", "get_sform"):
        matrix, code = getattr(written.header, coded)(coded=True)
        original, original_code = getattr(source.header, coded)(coded=True)
        assert code == original_code and np.array_equal(matrix, original)
    for field in (
        "quatern_b",
        "quatern_c",
        "quatern_d",
        "qoffset_x",
        "qoffset_y",
        "qoffset_z",
        "pixdim",
        "srow_x",
        "srow_y",
        "srow_z",
    ):
        assert np.array_equal(written.header[field], source.header[field]), field
    assert written.get_data_dtype() == np.uint8 and float(written.header["cal_max"]) == 0.0
    assert np.array_equal(np.asarray(written.dataobj), (np.asarray(source.dataobj) > 0.5).astype(np.uint8))


def test_agreeing_qform_and_sform_are_not_warned_about(tmp_path: Path) -> None:
    image = nibabel.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header["sform_code"] = image.header["qform_code"] = 1
    nibabel.save(image, str(tmp_path / "fine.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        read_image(tmp_path / "fine.nii.gz")


def test_what_killed_writers_left_is_cleared_on_the_next_run(tmp_path: Path) -> None:
    """Hidden temporaries of a killed run: those of a run folder (plot, plans, checkpoints) go, its lock and other
    hidden files stay; a dataset's staging folder goes once it is a minute old, a live one stays."""
    import os
    import time

    from autoseg.data.dataset import STALE_STAGE_SECONDS, staged_dataset
    from autoseg.io.checkpoints import remove_stale_temporaries

    run = tmp_path / "fold_0"
    run.mkdir()
    left = [".progress.png.w39dowj0.tmp.png", ".checkpoint_latest.pth.ab12cd34.tmp.pth", ".plans.json.x1.tmp.json"]
    kept = [".autoseg_run.lock", ".hidden_notes", "progress.png"]
    for name in left + kept:
        (run / name).write_text("x")
    assert sorted(p.name for p in remove_stale_temporaries(run)) == sorted(left)
    assert sorted(p.name for p in run.iterdir()) == sorted(kept)

    raw = tmp_path / "raw"
    stale, live = raw / ".Dataset001_X.o73jg75y", raw / ".Dataset001_X.k2j4h5g6"
    for folder in (stale, live):
        (folder / "Dataset001_X").mkdir(parents=True)
    old = time.time() - STALE_STAGE_SECONDS - 5
    os.utime(stale, (old, old))
    with staged_dataset(raw / "Dataset001_X") as folder:
        (folder / "dataset.json").write_text("{}")
    assert not stale.exists() and live.is_dir() and (raw / "Dataset001_X" / "dataset.json").is_file()
