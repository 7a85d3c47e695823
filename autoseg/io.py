"""Reading and writing images, JSON and arrays. The one place that touches SimpleITK.

Axis order: SimpleITK hands arrays over as (z, y, x). Every array that leaves this module is
turned around to (x, y, z) so that it matches ``spacing``, ``origin`` and ``direction``, which
SimpleITK (and this project) gives in (x, y, z) order. Nothing else in autoseg reverses axes.

Orientation: :func:`read_image` hands every image over in one canonical orientation,
``CANONICAL_ORIENTATION`` (RAS: the array's first axis points to the patient's right, the second to the
front, the third to the top; SimpleITK's ``DICOMOrient`` code, the orientation nibabel calls RAS+), whatever
order and sign of axes the file stores. Fingerprinting, planning, preprocessing and prediction therefore all
see one orientation. :func:`write_like` turns an array on that canonical grid back into a source file's own
orientation and writes it with the source's exact header (for NIfTI: both qform and sform, codes and
matrices), so an output overlays its input in every viewer. :class:`Orientation` is the one place that
knows how stored and canonical axes relate.

Headers are checked before voxels are read (:func:`check_header`, called by :func:`read_image`): a header that
declares more voxels than this machine can hold (:func:`max_voxels`), more voxel bytes than its NIfTI file can
contain, or a voxel size outside [``MIN_SPACING_MM``, ``MAX_SPACING_MM``] raises :class:`ImageHeaderError` naming
the file, so nothing is ever allocated from a hostile or broken header.

Every writer writes to a temporary name in the destination folder and renames it into place, so a
killed process never leaves a half-written file under the final name. Images are written under their final names
into a private temporary folder beside the destination (:func:`atomic_image_path`), so that a header that names a
separate data file (``.mhd``, ``.nhdr``: :func:`image_files`) names it by its final name; the data file is moved
into place first and the header last. A write that fails because the disk
is full raises :class:`DiskFullError` (``no space left on device while writing PATH``), whatever library
did the writing.

Arrays (``.npy``) are written with their size and a CRC-32 of their bytes (:func:`save_array` returns
them), so that damage after writing (a file cut short, changed bytes) is found by :func:`array_damage`;
:func:`load_array` names a damaged file instead of failing inside numpy.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from autoseg.errors import AutosegError, DataError, InvalidFileError

#: The orientation every image is read into (SimpleITK ``DICOMOrient`` code: axes point to the patient's
#: Right, Anterior, Superior). Chosen because most NIfTI files (MNI templates, ATLAS, dcm2niix output)
#: are already stored so: for them reading changes nothing.
CANONICAL_ORIENTATION = "RAS"

#: File endings SimpleITK reads that a dataset may use. Compound endings come first so that
#: ``split_ending`` matches ``.nii.gz`` before ``.gz``.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl", ".tif", ".tiff")

#: Endings whose header names a separate data file, and the ending SimpleITK gives that file when it writes
#: the header (compressed, uncompressed): ``CASE.mhd`` -> ``CASE.zraw`` (``CASE.raw``), ``CASE.nhdr`` ->
#: ``CASE.raw.gz`` (``CASE.raw``).
DETACHED_DATA_ENDINGS = {".mhd": (".zraw", ".raw"), ".nhdr": (".raw.gz", ".raw")}


_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(AutosegError, RuntimeError):
    """An image file could not be read; the message names the file."""


class ImageHeaderError(ImageReadError):
    """An image header declares what autoseg will not read: more voxels than this machine can hold
    (:func:`max_voxels`), more voxel bytes than the file can contain, a voxel size outside
    [``MIN_SPACING_MM``, ``MAX_SPACING_MM``] (zero, negative, NaN), a non-finite origin or direction, or a
    ``.nii.gz`` that is not gzip-compressed. Raised from the header alone, before any voxel is read or allocated;
    the message names the file (``PATH: problem``)."""


class DiskFullError(AutosegError, OSError):
    """A write failed because the file system is full (or the user's quota is used up).

    ``str(error)`` is ``no space left on device while writing PATH``, PATH being the final name of the file.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device while writing {self.filename}"

    def __reduce__(self) -> tuple[type, tuple[str]]:  # raised in worker processes: must survive pickling
        return type(self), (self.filename,)


class OutputPathError(AutosegError, OSError):
    """An output cannot be written where the user asked: a file where a folder is needed, a folder where a file
    is needed, or a folder that cannot be written to; the message names the path and the problem."""


class DamagedArrayError(AutosegError, ValueError):
    """A stored ``.npy`` array is damaged (cut short, or its bytes changed); the message names the file."""


#: What libraries say when a write came up short; short writes to a local file system mean a full disk.
_SHORT_WRITE = re.compile(
    r"\d+ requested and \d+ written|unexpected pos \d+|file write failed|"
    r"no space left on device|disk quota exceeded",
    re.IGNORECASE,
)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) means the disk is full.

    Recognized: ``OSError`` with errno ENOSPC or EDQUOT; numpy's short write (``OSError: 30056 requested and
    16352 written``); torch.save's (``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``,
    ``... file write failed``); and any message saying ``No space left on device`` (e.g. SimpleITK's).
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, (OSError, RuntimeError)) and _SHORT_WRITE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def reporting_disk_full(path: str | Path) -> Iterator[None]:
    """Turn an error that means "disk full" (:func:`is_disk_full`) inside the block into :class:`DiskFullError`
    naming ``path``; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as error:
        if is_disk_full(error):
            raise DiskFullError(path) from error
        raise


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in space, all in (x, y, z) order.

    Attributes:
        shape: voxels per axis (x, y, z).
        spacing: voxel size in mm per axis (x, y, z).
        origin: world position in mm of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major, as SimpleITK gives them.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def to_json(self) -> dict[str, list]:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, data: dict[str, list]) -> Geometry:
        return cls(
            shape=tuple(int(v) for v in data["shape"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    def differences(self, other: Geometry, tolerance: float = 1e-4) -> list[str]:
        """Names and values of the fields in which ``other`` disagrees with this geometry."""
        found = []
        if self.shape != other.shape:
            found.append(f"shape {list(self.shape)} vs {list(other.shape)}")
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = 1.0 if name == "direction" else max(1.0, float(np.abs(mine).max(initial=0.0)))
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=tolerance * scale):
                found.append(f"{name} {_round(mine)} vs {_round(theirs)}")
        return found

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]


class GeometryWarning(UserWarning):
    """A header that contradicts itself (a NIfTI file whose qform and sform disagree); the message names the file."""


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}

#: Files already warned about in this process: one warning per file, however often it is read.
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Orientation:
    """How a stored image's axes map onto the canonical orientation (``CANONICAL_ORIENTATION``).

    Reorienting only permutes and flips whole axes (as SimpleITK's ``DICOMOrient`` does, which the tests
    check): no voxel is interpolated, so going there and back restores the stored array exactly. An
    oblique image is reoriented to the closest axis-aligned orientation and stays oblique.

    Attributes:
        stored: the file's orientation code in SimpleITK's ``DICOMOrient`` convention (``LPS`` for the
            identity direction, ``RAS`` for NIfTI's RAS+, ``ASL`` for a sagittal stack, ...).
        permutation: canonical axis ``c`` is stored axis ``permutation[c]``.
        flips: canonical axis ``c`` runs opposite to stored axis ``permutation[c]``.
    """

    stored: str
    permutation: tuple[int, ...]
    flips: tuple[bool, ...]

    @classmethod
    def of(cls, direction: Sequence[float]) -> Orientation:
        """The orientation of an image with this 3x3 direction matrix (row-major, as SimpleITK gives it).

        Raises:
            ValueError: the matrix names no distinct axis for each of right-left, front-back, top-bottom.
        """
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction])
        permutation, flips = [], []
        for letter in CANONICAL_ORIENTATION:
            axes = [axis for axis, stored in enumerate(code) if stored in (letter, _OPPOSITE[letter])]
            if len(axes) != 1:
                raise ValueError(f"direction {_round(np.asarray(direction))} has no single {letter} axis ('{code}')")
            permutation.append(axes[0])
            flips.append(code[axes[0]] != letter)
        return cls(code, tuple(permutation), tuple(flips))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) in stored order -> (..., X, Y, Z) in canonical order (a view, not a copy)."""
        lead = array.ndim - 3
        array = np.transpose(array, (*range(lead), *(lead + axis for axis in self.permutation)))
        flipped = tuple(lead + c for c in range(3) if self.flips[c])
        return np.flip(array, flipped) if flipped else array

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) in canonical order -> (..., X, Y, Z) in stored order (a view; inverse of ``to_canonical``)."""
        lead = array.ndim - 3
        flipped = tuple(lead + c for c in range(3) if self.flips[c])
        array = np.flip(array, flipped) if flipped else array
        inverse = np.argsort(self.permutation)
        return np.transpose(array, (*range(lead), *(lead + int(c) for c in inverse)))

    def canonical_geometry(self, geometry: Geometry) -> Geometry:
        """The geometry of the canonical array: the same voxels at the same world positions."""
        matrix = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
        origin = np.asarray(geometry.origin, dtype=np.float64)
        columns = []
        for axis, flip in zip(self.permutation, self.flips):
            column = matrix[:, axis]
            if flip:  # the stored axis' last voxel becomes voxel 0
                origin = origin + column * geometry.spacing[axis] * (geometry.shape[axis] - 1)
                column = -column
            columns.append(column)
        direction = np.stack(columns, axis=1)
        return Geometry(
            shape=tuple(int(geometry.shape[axis]) for axis in self.permutation),
            spacing=tuple(float(geometry.spacing[axis]) for axis in self.permutation),
            origin=tuple(float(v) + 0.0 for v in origin),  # + 0.0 turns -0.0 into 0.0
            direction=tuple(float(v) + 0.0 for v in direction.ravel()),
        )


def left_right_axis(direction: Sequence[float]) -> int:
    """The array axis (0, 1 or 2) that runs along the patient's left-right axis.

    ``direction`` is the 3x3 direction matrix, row-major as SimpleITK gives it: column ``j`` is the world direction
    of array axis ``j``. World x is the left-right axis in both LPS and RAS (they differ only in its sign), so the
    answer is the axis whose direction cosine with world x is largest in magnitude; preprocessing keeps the axis
    order, so the answer holds for the preprocessed array too. ``--tta lr`` flips it, and the symmetric channels
    (``autoseg.symmetry``) mirror across it.

    Example:
        >>> left_right_axis((0, 1, 0, 0, 0, 1, 1, 0, 0))  # axes stored as (z, x, y): x runs along array axis 1
        1
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return int(np.argmax(np.abs(matrix[0])))


def canonical_geometry(geometry: Geometry) -> Geometry:
    """``geometry`` (as stored) brought to ``CANONICAL_ORIENTATION``: what :func:`read_image` returns for it."""
    return Orientation.of(geometry.direction).canonical_geometry(geometry)


def split_ending(path: str | Path) -> tuple[str, str]:
    """Split a file name into stem and a known image ending: ``CASE_0000.nii.gz`` -> (``CASE_0000``, ``.nii.gz``)."""
    name = Path(path).name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)], name[-len(ending) :]
    return Path(name).stem, Path(name).suffix


#: The voxel sizes autoseg reads, in mm (per axis): from 1 µm (microscopy, micro-CT) to 10 cm (far beyond any
#: clinical slice thickness). A header outside says something else than a scan: 1e9 mm (an unset field read as
#: metres or garbage) would ask for terabytes once resampled to ~1 mm, and 1e-6 mm makes a brain a single voxel at
#: the plan's spacing, so the mask comes out empty without a word.
MIN_SPACING_MM, MAX_SPACING_MM = 1e-3, 100.0

#: Bytes of memory reckoned per voxel of an input image when deciding how many voxels a machine can take
#: (:func:`max_voxels`): the float32 channel as read, its float64 copy where labels are checked, the float32
#: probabilities and their restored copy on the input grid, and the uint8 mask.
BYTES_PER_VOXEL = 32

#: deflate (gzip) never compresses better than 1032:1, so a ``.nii.gz`` of N bytes holds at most 1032 N bytes.
_MAX_GZIP_RATIO = 1032


def physical_memory_bytes() -> int:
    """This machine's physical memory in bytes (``os.sysconf``); 16 GiB where the system does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 16 << 30


def max_voxels() -> int:
    """The most voxels (times components) one image may declare: physical memory / ``BYTES_PER_VOXEL``
    (about 4.3e9 voxels with 128 GiB, 5.4e8 with 16 GiB; a 512 x 512 x 1000 CT is 2.6e8)."""
    return physical_memory_bytes() // BYTES_PER_VOXEL


def voxel_count_problem(shape: Sequence[int], components: int = 1) -> str | None:
    """What is wrong with allocating an array of ``shape`` (times ``components``), or None when it fits
    :func:`max_voxels`: ``N voxels (X x Y x Z), more than the LIMIT this machine's M GiB of memory allow``."""
    count = int(np.prod([int(n) for n in shape], dtype=object)) * int(components)  # Python ints: no overflow
    limit = max_voxels()
    if count <= limit:
        return None
    sizes = " x ".join(str(int(n)) for n in shape) + (f" x {components} channels" if components > 1 else "")
    return (
        f"{count:.3g} voxels ({sizes}), more than the {limit:.3g} this machine's "
        f"{physical_memory_bytes() / 2**30:.0f} GiB of memory allow ({BYTES_PER_VOXEL} bytes per voxel)"
    )


def format_mm(values: Sequence[float]) -> str:
    """Sizes in mm for a message: ``[1e+09, 0.5, 3] mm`` (4 significant digits)."""
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "] mm"


def check_header(path: str | Path, geometry: Geometry, components: int = 1) -> None:
    """Refuse a header that autoseg must not act on (see :class:`ImageHeaderError`), before its voxels are read.

    Checked: finite voxel sizes within [``MIN_SPACING_MM``, ``MAX_SPACING_MM``] (a negative NIfTI pixdim is read
    as a negative spacing), finite origin and direction, a direction that names the three patient axes, at most
    :func:`max_voxels` voxels and, for NIfTI, the declared voxel bytes against the file's size (a ``.nii`` must hold
    them; a ``.nii.gz`` can hold at most 1032 times its size, deflate's best ratio) and gzip compression of a
    ``.nii.gz``. Takes microseconds: no voxel is read.

    Args:
        path: the image file.
        geometry: its geometry as stored (:func:`read_header`), (x, y, z) order.
        components: values per voxel.

    Raises:
        ImageHeaderError: what is wrong, naming ``path``.
    """
    spacing = [float(v) for v in geometry.spacing]
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ImageHeaderError(
            f"{path}: voxel size {format_mm(spacing)} in the header: every voxel size must be a "
            "positive number (a negative or zero NIfTI pixdim, or NaN)"
        )
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise ImageHeaderError(
            f"{path}: voxel size {format_mm(spacing)} in the header lies outside the "
            f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm autoseg reads; fix the header's voxel size (pixdim)"
        )
    if not all(np.isfinite(geometry.origin)) or not all(np.isfinite(geometry.direction)):
        raise ImageHeaderError(f"{path}: non-finite origin or direction in the header")
    try:
        if len(geometry.direction) == 9:  # other dimensions are refused by the readers, naming the dimension
            Orientation.of(geometry.direction)
    except ValueError as error:
        raise ImageHeaderError(f"{path}: {error}") from None
    too_many = voxel_count_problem(geometry.shape, components)
    if too_many:
        raise ImageHeaderError(f"{path}: the header declares {too_many}")
    if _is_nifti(path):
        _check_nifti_size(Path(path), geometry.shape, components)


def _check_nifti_size(path: Path, shape: Sequence[int], components: int) -> None:
    """Refuse a NIfTI file that cannot hold the voxels its header declares, or a ``.nii.gz`` that is not gzip."""
    import nibabel

    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    if compressed:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                raise ImageHeaderError(f"{path}: named .nii.gz but not gzip-compressed; rename it to .nii (or gzip it)")
    try:
        header = nibabel.load(str(path)).header  # the header only: nibabel reads voxels lazily
        offset = max(int(header.get_data_offset()), int(getattr(header, "single_vox_offset", 0)))
        itemsize = int(header.get_data_dtype().itemsize)
    except (EOFError, OSError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError) as error:
        raise ImageHeaderError(f"{path}: unreadable NIfTI header ({error})") from None
    declared = offset + int(np.prod([int(n) for n in shape], dtype=object)) * components * itemsize
    if not compressed and size < declared:
        raise ImageHeaderError(
            f"{path}: the header declares {declared:,} bytes of voxels and header but the file holds {size:,}: "
            "it was cut short or its header is wrong"
        )
    if compressed and declared > size * _MAX_GZIP_RATIO:
        raise ImageHeaderError(
            f"{path}: the header declares {declared:,} bytes of voxels and header, more than a {size:,}-byte "
            f"gzip file can hold (at most {_MAX_GZIP_RATIO}:1): it was cut short or its header is wrong"
        )


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


def _is_nifti(path: str | Path) -> bool:
    return split_ending(path)[1].lower() in (".nii", ".nii.gz")


def _read_nifti_voxels(path: str | Path) -> np.ndarray:
    import nibabel  # ships with nilearn

    try:
        image = nibabel.load(str(path))
        return np.asarray(image.dataobj).reshape(image.shape[:3])
    except (EOFError, OSError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError) as error:
        raise ImageReadError(f"{path}: truncated or unreadable image ({error})") from None


_XFORM_NAMES = {1: "scanner", 2: "aligned", 3: "Talairach", 4: "MNI", 5: "template"}


def qform_sform_note(path: str | Path, geometry: Geometry) -> str | None:
    """Say so when a NIfTI file's qform and sform (both with a non-zero code) place a voxel more than one
    voxel apart, and which of the two SimpleITK read: autoseg resamples, predicts and measures with that one.

    ITK 5.4 (SimpleITK 2.5) uses the sform when its code is 1 (scanner) or the qform's code is 0, and the
    qform otherwise (sform code 2-5 with a qform); nibabel and FSLeyes prefer the sform whenever its code is
    non-zero. Which one was used is found here by comparing ``geometry`` with both matrices, not assumed.

    Args:
        path: the image file; anything but a 3-D ``.nii``/``.nii.gz`` gives None.
        geometry: the file's geometry as stored, as :func:`read_header` gives it.

    Returns:
        One sentence naming the file, the two codes, the largest disagreement (voxels and mm over the
        image's corners) and the transform used; None when the file is not NIfTI or the two agree.
    """
    if not _is_nifti(path) or len(geometry.shape) != 3:
        return None  # only 3-D images are read; other dimensions are reported elsewhere
    import nibabel

    try:
        header = nibabel.load(str(path)).header
        (qform, qcode), (sform, scode) = header.get_qform(coded=True), header.get_sform(coded=True)
    except (EOFError, OSError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError):
        return None  # reading the voxels reports the file
    if not qcode or not scode:
        return None
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, geometry.shape[0] - 1)
            for j in (0, geometry.shape[1] - 1)
            for k in (0, geometry.shape[2] - 1)
        ]
    ).T
    voxels = np.abs(np.linalg.solve(qform, sform @ corners) - corners)[:3].max()
    if voxels <= 1.0:
        return None
    millimetres = float(np.linalg.norm((sform @ corners - qform @ corners)[:3], axis=0).max())
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    used = np.eye(4)
    used[:3, :3], used[:3, 3] = lps_to_ras @ matrix, lps_to_ras @ np.asarray(geometry.origin)
    which = (
        "sform"
        if np.allclose(used, sform, atol=1e-3)
        else "qform"
        if np.allclose(used, qform, atol=1e-3)
        else "neither (a transform SimpleITK derived itself)"
    )
    return (
        f"{path}: qform (code {int(qcode)}, {_XFORM_NAMES.get(int(qcode), '?')}) and sform (code {int(scode)}, "
        f"{_XFORM_NAMES.get(int(scode), '?')}) disagree: they place a voxel up to {millimetres:.1f} mm apart "
        f"({voxels:.1f} voxels along one axis); "
        f"autoseg resamples and predicts with the {which}, as SimpleITK reads it (nibabel and FSLeyes show the "
        f"sform); outputs keep both as given"
    )


def _warn_once(path: str | Path, note: str | None) -> None:
    key = str(Path(path).resolve())
    if note is not None and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(note, GeometryWarning, stacklevel=3)


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


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = _format_json(json.loads(json.dumps(data, default=_json_default))) + "\n"
    with atomic_path(Path(path), suffix=".json") as temporary:
        temporary.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a parse error names the file and the line, text that is not UTF-8 the file and the byte."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidFileError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise InvalidFileError(
            f"{path}: not UTF-8 text (byte {error.start} cannot be decoded); save it as UTF-8"
        ) from None


ArrayRecord = dict[str, int]
"""What :func:`save_array` wrote: ``{"bytes": file size, "crc32": CRC-32 of the file's bytes}``."""


def save_array(array: np.ndarray, path: str | Path) -> ArrayRecord:
    """Save an array as ``.npy`` atomically (memory-mappable for fast patch reads).

    Returns:
        The file's size in bytes and the CRC-32 of its bytes (header included), computed while writing; keep
        them to check the file later with :func:`array_damage`.

    Raises:
        DiskFullError: the disk filled up; nothing is left under ``path`` (a previous file stays).
    """
    with atomic_path(Path(path), suffix=".npy") as temporary:
        with open(temporary, "wb") as handle:
            writer = _ChecksumWriter(handle)
            np.save(writer, array)
    return {"bytes": writer.size, "crc32": writer.crc32}


class _ChecksumWriter:
    """A binary file's ``write`` that keeps the running size and CRC-32 of what went through it."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.size, self.crc32 = handle, 0, 0

    def write(self, data: bytes) -> int:
        written = self.handle.write(data)
        if written != len(data):
            raise OSError(f"{len(data)} requested and {written} written")
        self.size += written
        self.crc32 = zlib.crc32(data, self.crc32)
        return written


def file_crc32(path: str | Path, chunk_bytes: int = 1 << 22) -> int:
    """CRC-32 of a file's bytes, read in ``chunk_bytes`` pieces (about 3 GB/s on one core for cached files)."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return crc


def array_damage(path: str | Path, record: ArrayRecord | None = None) -> str | None:
    """What is wrong with a stored ``.npy`` file, or None when it is sound.

    Checks that the file exists, that its header is readable, that its size is what the header promises (header
    plus shape x item size) and, with ``record`` (from :func:`save_array`), that size and CRC-32 are the ones
    written. Without ``record`` only the header is read (microseconds); with it every byte is (the CRC-32).
    """
    path = Path(path)
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    try:
        expected = _npy_size(path)
    except (ValueError, OSError, EOFError) as error:
        return f"unreadable .npy header ({error})"
    if size != expected:
        return f"the file holds {size:,} bytes but its .npy header promises {expected:,}: it was cut short"
    if record is not None:
        if size != record.get("bytes"):
            return f"the file holds {size:,} bytes, {record.get('bytes')} were written"
        if file_crc32(path) != record.get("crc32"):
            return "its bytes changed since they were written (CRC-32 mismatch)"
    return None


def _npy_size(path: Path) -> int:
    """The size in bytes a ``.npy`` file must have, from its header."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f".npy format version {version} is not one np.save writes for plain arrays")
        shape, _, dtype = readers[version](handle)
        return handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def load_array(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` array, optionally memory-mapped read-only.

    Raises:
        DamagedArrayError: the file is cut short or unreadable; the message names it and says to re-run
            ``autoseg_plan``, which redoes damaged preprocessed cases.
    """
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        problem = array_damage(path) or f"unreadable ({error})"
        raise DamagedArrayError(
            f"{path}: damaged array: {problem}; re-run autoseg_plan for this dataset (it redoes damaged cases)"
        ) from None


@contextmanager
def atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it to ``path`` on success, delete it on error.

    Raises:
        DiskFullError: writing the temporary file failed because the disk is full (:func:`is_disk_full`); the
            message names ``path``, and ``path`` itself is untouched.
    """
    with reporting_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
        try:
            yield temporary
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()


def check_output_folder(folder: str | Path, what: str = "output folder") -> None:
    """Check, before anything is written, that ``folder`` is a folder autoseg can write into, or can be created.

    Args:
        folder: the folder outputs go to (it may not exist yet).
        what: how the message calls it, e.g. ``-o``.

    Raises:
        OutputPathError: ``folder`` or a folder above it is a file, or the nearest existing folder is read-only
            (``os.access``: root may write anywhere but on a read-only file system); one line,
            ``WHAT FOLDER: PROBLEM``.
    """
    problem = _folder_problem(Path(folder), name_it=False)
    if problem:
        raise OutputPathError(f"{what} {folder}: {problem}")


def check_output_file(path: str | Path, what: str = "output") -> None:
    """Check, before anything is written, that the file ``path`` can be written: it is not a folder, and its folder
    can be written into or created (as :func:`check_output_folder`).

    Raises:
        OutputPathError: one line, ``WHAT PATH: PROBLEM``.
    """
    path = Path(path)
    problem = "is a folder, not a file" if path.is_dir() else _folder_problem(path.parent, name_it=True)
    if problem:
        raise OutputPathError(f"{what} {path}: {problem}")


def _folder_problem(folder: Path, name_it: bool) -> str | None:
    """Why nothing can be written into ``folder`` (a file where it or a folder above it should be, or read-only),
    naming the path at fault unless it is ``folder`` and not ``name_it``; None when it can."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    named = f"{existing} " if name_it or existing != folder else ""
    if not existing.is_dir():
        return f"{named}is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{named}is read-only"
    return None


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


def _format_json(value: Any, level: int = 0) -> str:
    """Indented JSON that keeps short lists of numbers (shapes, spacings, strides) on one line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [
            f"{inner}{json.dumps(key, ensure_ascii=False)}: {_format_json(item, level + 1)}"
            for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        flat = json.dumps(value, ensure_ascii=False)
        if len(flat) <= 100 and all(not isinstance(v, dict) for v in value):
            return flat
        return "[\n" + ",\n".join(f"{inner}{_format_json(item, level + 1)}" for item in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK errors start with a source location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__
