"""Reading and writing images: the one place that touches SimpleITK's arrays.

The contract every reader and writer here keeps (as nnU-Net's ``imageio/base_reader_writer.py`` fixes its own):

- **Array order**: one image is an array of shape (X, Y, Z); several channels are (C, X, Y, Z). SimpleITK hands arrays
  over as (z, y, x); :func:`array_from_image` and :func:`image_from_array` are where that order is turned around, and
  nothing else in autoseg reverses axes.
- **Spacing** is in mm, in the same (x, y, z) order as the array axes, as are ``origin`` and ``direction``
  (:class:`autoseg.io.geometry.Geometry`).
- **Orientation**: :func:`read_image` hands every image over in ``CANONICAL_ORIENTATION`` (RAS: the array's first axis
  points to the patient's right, the second to the front, the third to the top), whatever order and sign of axes the
  file stores. :func:`write_like` turns an array on that canonical grid back into a source file's own orientation and
  writes it with the source's exact header (for NIfTI: both qform and sform, codes and matrices), so an output overlays
  its input in every viewer.
- **Headers are checked before voxels are read** (:func:`autoseg.io.headers.check_header`, called by :func:`read_image`).
- **Writes are atomic**: images are written under their final names into a private temporary folder beside the
  destination (:func:`atomic_image_path`), so that a header that names a separate data file (``.mhd``, ``.nhdr``:
  :func:`image_files`) names it by its final name; the data file is moved into place first and the header last.

Raises, for every reader: :class:`autoseg.io.headers.ImageReadError` (missing or unparsable file) and
:class:`autoseg.io.headers.ImageHeaderError` (a header autoseg must not act on), each naming the file."""

from __future__ import annotations

import fnmatch
import glob
import gzip
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import DataError
from autoseg.io.files import _first_line, reporting_disk_full
from autoseg.io.geometry import Geometry, Orientation
from autoseg.io.headers import ImageReadError, _is_nifti, _warn_once, check_header, qform_sform_note, split_ending

#: Endings whose header names a separate data file, and the ending SimpleITK gives that file when it writes
#: the header (compressed, uncompressed): ``CASE.mhd`` -> ``CASE.zraw`` (``CASE.raw``), ``CASE.nhdr`` ->
#: ``CASE.raw.gz`` (``CASE.raw``).
DETACHED_DATA_ENDINGS = {".mhd": (".zraw", ".raw"), ".nhdr": (".raw.gz", ".raw")}


def read_header(path: str | Path) -> tuple[Geometry, int, str]:
    """Read only the header: geometry, number of dimensions and pixel type, without the voxels.

    Raises:
        ImageReadError: the file is missing or SimpleITK cannot parse it.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(f"{path}: unreadable image ({_first_line(error)})") from None
    dimension = reader.GetDimension()
    size = tuple(int(v) for v in reader.GetSize())
    geometry = Geometry(
        shape=size,
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        origin=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )
    components = reader.GetNumberOfComponents()
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if components > 1:
        dimension += 1  # a vector image holds one more axis of data than its spatial dimension
    return geometry, dimension, pixel


def read_image(path: str | Path, dtype: type = np.float32, *, canonical: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D image, in ``CANONICAL_ORIENTATION`` unless ``canonical`` is False.

    NIfTI voxels are read with nibabel, everything else with SimpleITK; the geometry always comes
    from SimpleITK (LPS world coordinates; for a NIfTI file whose qform and sform disagree, the one
    ITK chooses: see :func:`qform_sform_note`, which is warned about once per file as a
    :class:`GeometryWarning`). ITK's NIfTI reader silently turns NaN/Inf into 0 and reads a
    truncated ``.nii.gz`` as if the missing voxels were 0, so verification could not see either;
    nibabel keeps NaN/Inf and fails on a truncated file. Both index voxels in the file's (i, j, k)
    order, which is our stored (x, y, z); reorientation then permutes and flips whole axes
    (:class:`Orientation`), so the voxel values themselves are never interpolated.

    Args:
        path: the image file.
        dtype: numpy type of the returned array. Default float32.
        canonical: True (default): array and geometry in the canonical orientation; False: as stored.

    Returns:
        array: voxels in (x, y, z) order, as ``dtype``.
        geometry: its shape, spacing (mm), origin (mm) and direction, in (x, y, z) order.

    Raises:
        ImageReadError: unreadable or truncated file, or an image that is not 3-D single-channel.
        ImageHeaderError: a header autoseg does not act on (:func:`check_header`), found before any voxel is read.
    """
    geometry, dimension, _ = read_header(path)
    if dimension != 3:
        raise ImageReadError(
            f"{path}: expected a 3-D single-channel image, found {dimension}-D with size {list(geometry.shape)}"
        )
    check_header(path, geometry)
    if _is_nifti(path):
        array = _read_nifti_voxels(path)
        _warn_once(path, qform_sform_note(path, geometry))
    else:
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
        except RuntimeError as error:
            raise ImageReadError(f"{path}: unreadable or truncated image ({_first_line(error)})") from None
    if tuple(array.shape) != tuple(geometry.shape):
        raise ImageReadError(
            f"{path}: voxel array {list(array.shape)} disagrees with header size {list(geometry.shape)}"
        )
    if canonical:
        orientation = Orientation.of(geometry.direction)
        array, geometry = orientation.to_canonical(array), orientation.canonical_geometry(geometry)
    return np.ascontiguousarray(array, dtype=dtype), geometry


def _read_nifti_voxels(path: str | Path) -> np.ndarray:
    import nibabel  # ships with nilearn

    try:
        image = nibabel.load(str(path))
        return np.asarray(image.dataobj).reshape(image.shape[:3])
    except (EOFError, OSError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError) as error:
        raise ImageReadError(f"{path}: truncated or unreadable image ({error})") from None


def count_non_finite(array: np.ndarray) -> int:
    """Number of NaN/Inf voxels."""
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, compress: bool = True) -> None:
    """Write an (x, y, z) array with exactly ``geometry`` (no reorientation) atomically; the format follows the
    file ending. Outputs that belong to an input image are written with :func:`write_like` instead.

    Raises:
        ValueError: the array's shape disagrees with ``geometry.shape``.
    """
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: array shape {array.shape} differs from geometry shape {geometry.shape}")
    image = image_from_array(array, geometry)
    with atomic_image_path(Path(path)) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=compress)


def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of an (x, y, z) array placed as ``geometry`` says (for SimpleITK filters and registration;
    the axes are turned around here, as on reading)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def array_from_image(image: sitk.Image) -> np.ndarray:
    """The voxels of a 3-D SimpleITK image in (x, y, z) order (the inverse of :func:`image_from_array`)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def copy_image_file(source: str | Path, path: str | Path) -> None:
    """Copy an image file byte for byte, atomically, so its header (NIfTI qform and sform included) is kept
    exactly; a ``.nii`` copied to a ``.nii.gz`` name is gzip-compressed on the way (same bytes inside). A header
    that names a separate data file (``.mhd``, ``.nhdr``) cannot be copied so (it would name the source's data
    file): it is rewritten by SimpleITK with its data file beside it, same voxels, geometry and pixel type.

    Raises:
        ValueError: the endings differ in another way than ``.nii`` -> ``.nii.gz``.
    """
    source_ending, ending = split_ending(source)[1].lower(), split_ending(path)[1].lower()
    compress = (source_ending, ending) == (".nii", ".nii.gz")
    if source_ending != ending and not compress:
        raise ValueError(f"cannot copy {source} to {path}: a {source_ending} file needs converting, not copying")
    with atomic_image_path(Path(path)) as temporary:
        if ending in DETACHED_DATA_ENDINGS:
            sitk.WriteImage(sitk.ReadImage(str(source)), str(temporary), useCompression=True)
            return
        with open(source, "rb") as reader, (gzip.open if compress else open)(temporary, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)


def write_like(
    array: np.ndarray, geometry: Geometry, path: str | Path, source: str | Path, compress: bool = True
) -> None:
    """Write a canonical (x, y, z) array in ``source``'s own orientation and with its exact header, atomically.

    The inverse of :func:`read_image`: ``array`` lies on the canonical grid of ``source`` (as
    ``read_image(source)`` gave it); it is turned back into the stored axis order and written so that it
    overlays ``source`` in every viewer. NIfTI source and NIfTI output: written with nibabel from a copy of
    the source's header, so qform and sform (codes and matrices), pixdim, units and orientation are the
    source's byte for byte; the data type is the array's, scaling is reset to 1/0 and the display range
    (cal_min/cal_max) cleared. Otherwise: SimpleITK with the source's stored geometry.

    Args:
        array: (X, Y, Z) voxels on the canonical grid, any numpy type the format holds (uint8 labels,
            float32 probabilities).
        geometry: that canonical grid, checked against the source's.
        path: output file; the format follows its ending.
        source: the image the output belongs to (channel 0 of the case).
        compress: compress formats SimpleITK writes (NIfTI compression follows the ``.gz`` ending).

    Raises:
        ValueError: ``geometry`` or the array's shape is not the canonical grid of ``source``.
        ImageReadError: ``source`` cannot be read.
    """
    stored, _, _ = read_header(source)
    orientation = Orientation.of(stored.direction)
    differences = orientation.canonical_geometry(stored).differences(geometry)
    if differences or tuple(array.shape) != tuple(geometry.shape):
        found = "; ".join(differences) or f"array shape {list(array.shape)} vs {list(geometry.shape)}"
        raise DataError(f"{path}: not on the grid of {source}: {found}")
    data = np.ascontiguousarray(orientation.from_canonical(array))
    if not (_is_nifti(source) and _is_nifti(path)):
        write_image(data, stored, path, compress)
        return
    import nibabel

    loaded = nibabel.load(str(source))
    header = loaded.header.copy()
    header["cal_min"], header["cal_max"] = 0.0, 0.0  # the source's intensity window would hide a mask
    image = type(loaded)(data, None, header)  # affine None: qform and sform stay exactly as in the header
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_image_path(Path(path)) as temporary:
        nibabel.save(image, str(temporary))


@contextmanager
def atomic_image_path(path: Path) -> Iterator[Path]:
    """Yield where an image writer writes ``path``: its final name inside a private temporary folder beside it
    (``.NAME.XXXXXXXX.tmp/NAME``), so that the data file a header names (``.mhd``, ``.nhdr``) gets its final name
    too. On success what was written is moved into place: the data file(s) first, the file ``path`` last, so a
    header under its final name always names finished data (a header being replaced is removed first, and the
    temporary data files an old header named are deleted once it is replaced). On error the folder is deleted.

    Raises:
        DiskFullError: as :func:`atomic_path`; ``path`` itself is untouched.
    """
    with reporting_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            written = folder / path.name
            yield written
            data = sorted(p for p in folder.iterdir() if p != written)
            replaced = [p for p in companion_files(path) if _is_temporary_of(p, path)] if path.exists() else []
            if data:
                path.unlink(missing_ok=True)  # an old header must never name data being replaced under it
            for file in (*data, written):
                os.replace(file, path.parent / file.name)
            for old in replaced:
                old.unlink(missing_ok=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def image_files(path: str | Path, compress: bool = True) -> tuple[Path, ...]:
    """The files that writing the image ``path`` (:func:`write_image`, :func:`write_like`) creates: ``path`` and,
    for a header that names a separate data file (:data:`DETACHED_DATA_ENDINGS`), that data file beside it, named
    after the header (``CASE.mhd`` -> ``CASE.zraw``, ``CASE.raw`` when not ``compress``)."""
    path = Path(path)
    stem, ending = split_ending(path)
    endings = DETACHED_DATA_ENDINGS.get(ending.lower())
    return (path,) if endings is None else (path, path.with_name(stem + endings[0 if compress else 1]))


#: The line of a header that names its data file: MetaImage ``ElementDataFile = NAME``, NRRD ``data file: NAME``.
_DATA_FILE_LINE = re.compile(r"^\s*(?:ElementDataFile\s*=|data\s?file\s*:)\s*(?P<name>\S.*?)\s*$", re.IGNORECASE)


def companion_files(path: str | Path) -> list[Path]:
    """The data files an existing ``.mhd`` or ``.nhdr`` header names, resolved against its folder; empty for other
    endings, a missing or unreadable header, data inside the header (``LOCAL``) and lists or patterns of slices."""
    path = Path(path)
    if split_ending(path)[1].lower() not in DETACHED_DATA_ENDINGS or not path.is_file():
        return []
    try:
        with open(path, encoding="latin-1") as handle:
            lines = handle.read(1 << 16).splitlines()
    except OSError:
        return []
    names = [m.group("name") for line in lines if (m := _DATA_FILE_LINE.match(line))]
    return [path.parent / name for name in names if name.upper() not in ("LOCAL", "LIST") and " " not in name]


def _is_temporary_of(candidate: Path, path: Path) -> bool:
    """Whether ``candidate`` lies beside ``path`` and is named like a temporary of it (``.NAME.XXXXXXXX.tmp...``)."""
    return candidate.parent == path.parent and fnmatch.fnmatchcase(candidate.name, f".{glob.escape(path.name)}.*.tmp*")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files and folders :func:`atomic_path` and :func:`atomic_image_path` left for ``path``
    when a run was killed while writing it (``.NAME.XXXXXXXX.tmp*`` beside it; an orderly error removes its own), and
    return them. A data file that the existing header ``path`` names (:func:`companion_files`) is kept, whatever its
    name. Call it only where no other process is writing ``path`` at the same time."""
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp*")) if path.parent.is_dir() else []
    named = {file.name for file in companion_files(path)}
    stale = [temporary for temporary in stale if temporary.name not in named]
    for temporary in stale:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
    return stale
