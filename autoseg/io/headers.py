"""Image headers checked before voxels are read: voxel and spacing limits, NIfTI size checks, qform/sform notes.

A header that declares more voxels than this machine can hold (:func:`max_voxels`), more voxel bytes than its NIfTI
file can contain, or a voxel size outside [``MIN_SPACING_MM``, ``MAX_SPACING_MM``] raises :class:`ImageHeaderError`
naming the file, so nothing is ever allocated from a hostile or broken header."""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io.geometry import Geometry, GeometryWarning, Orientation


class ImageReadError(AutosegError, RuntimeError):
    """An image file could not be read; the message names the file."""


class ImageHeaderError(ImageReadError):
    """An image header declares what autoseg will not read: more voxels than this machine can hold
    (:func:`max_voxels`), more voxel bytes than the file can contain, a voxel size outside
    [``MIN_SPACING_MM``, ``MAX_SPACING_MM``] (zero, negative, NaN), a non-finite origin or direction, or a
    ``.nii.gz`` that is not gzip-compressed. Raised from the header alone, before any voxel is read or allocated;
    the message names the file (``PATH: problem``)."""


#: Files already warned about in this process: one warning per file, however often it is read.
_WARNED: set[str] = set()


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
        _check_nifti_header(Path(path), geometry.shape, components)


def _check_nifti_header(path: Path, shape: Sequence[int], components: int) -> None:
    """Refuse a NIfTI file whose pixdim gives a spatial axis a NaN, infinite or zero voxel size (SimpleITK reads
    such an axis as 1 mm, or takes the sform's instead: either way the header is broken), that cannot hold the
    voxels its header declares, or a ``.nii.gz`` that is not gzip."""
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
    with nibabel.openers.ImageOpener(str(path)) as handle:  # as stored: nibabel.load sets a zero pixdim to 1
        stored = type(header).from_fileobj(handle, check=False)
    pixdim = [float(v) for v in stored["pixdim"][1:4]]
    if not all(np.isfinite(pixdim)) or 0.0 in pixdim:
        raise ImageHeaderError(
            f"{path}: voxel size (pixdim) {', '.join(f'{v:g}' for v in pixdim)} in the NIfTI header: every voxel "
            "size must be a positive number; fix the header's pixdim"
        )
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


def _is_nifti(path: str | Path) -> bool:
    return split_ending(path)[1].lower() in (".nii", ".nii.gz")


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


#: File endings SimpleITK reads that a dataset may use. Compound endings come first so that
#: ``split_ending`` matches ``.nii.gz`` before ``.gz``.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl", ".tif", ".tiff")


def split_ending(path: str | Path) -> tuple[str, str]:
    """Split a file name into stem and a known image ending: ``CASE_0000.nii.gz`` -> (``CASE_0000``, ``.nii.gz``)."""
    name = Path(path).name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)], name[-len(ending) :]
    return Path(name).stem, Path(name).suffix
