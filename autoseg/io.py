"""Reading and writing images, JSON and arrays. The one place that touches SimpleITK.

Axis order: SimpleITK hands arrays over as (z, y, x). Every array that leaves this module is
turned around to (x, y, z) so that it matches ``spacing``, ``origin`` and ``direction``, which
SimpleITK (and this project) gives in (x, y, z) order. Nothing else in autoseg reverses axes.

Every writer writes to a temporary name in the destination folder and renames it into place, so a
killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: File endings SimpleITK reads that a dataset may use. Compound endings come first so that
#: ``split_ending`` matches ``.nii.gz`` before ``.gz``.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl", ".tif", ".tiff")


_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(RuntimeError):
    """An image file could not be read; the message names the file."""


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


def split_ending(path: str | Path) -> tuple[str, str]:
    """Split a file name into stem and a known image ending: ``CASE_0000.nii.gz`` -> (``CASE_0000``, ``.nii.gz``)."""
    name = Path(path).name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)], name[-len(ending):]
    return Path(name).stem, Path(name).suffix


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


def read_image(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D image.

    NIfTI voxels are read with nibabel, everything else with SimpleITK; the geometry always comes
    from SimpleITK (LPS world coordinates). ITK's NIfTI reader silently turns NaN/Inf into 0 and
    reads a truncated ``.nii.gz`` as if the missing voxels were 0, so verification could not see
    either; nibabel keeps NaN/Inf and fails on a truncated file. Both index voxels in the file's
    (i, j, k) order, which is our (x, y, z).

    Returns:
        array: voxels in (x, y, z) order, as ``dtype``.
        geometry: its shape, spacing (mm), origin (mm) and direction, in (x, y, z) order.

    Raises:
        ImageReadError: unreadable or truncated file, or an image that is not 3-D single-channel.
    """
    geometry, dimension, _ = read_header(path)
    if dimension != 3:
        raise ImageReadError(f"{path}: expected a 3-D single-channel image, found {dimension}-D with size "
                             f"{list(geometry.shape)}")
    if split_ending(path)[1].lower() in (".nii", ".nii.gz"):
        array = _read_nifti_voxels(path)
    else:
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
        except RuntimeError as error:
            raise ImageReadError(f"{path}: unreadable or truncated image ({_first_line(error)})") from None
    if tuple(array.shape) != tuple(geometry.shape):
        raise ImageReadError(f"{path}: voxel array {list(array.shape)} disagrees with header size {list(geometry.shape)}")
    return np.ascontiguousarray(array, dtype=dtype), geometry


def _read_nifti_voxels(path: str | Path) -> np.ndarray:
    import nibabel  # ships with nilearn

    try:
        image = nibabel.load(str(path))
        return np.asarray(image.dataobj).reshape(image.shape[:3])
    except (EOFError, OSError, ValueError, zlib.error) as error:
        raise ImageReadError(f"{path}: truncated or unreadable image ({error})") from None


def count_non_finite(array: np.ndarray) -> int:
    """Number of NaN/Inf voxels."""
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, compress: bool = True) -> None:
    """Write an (x, y, z) array with ``geometry`` atomically; the format follows the file ending.

    Raises:
        ValueError: the array's shape disagrees with ``geometry.shape``.
    """
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: array shape {array.shape} differs from geometry shape {geometry.shape}")
    image = image_from_array(array, geometry)
    stem, ending = split_ending(path)
    with atomic_path(Path(path), suffix=ending) as temporary:
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
    exactly; a ``.nii`` copied to a ``.nii.gz`` name is gzip-compressed on the way (same bytes inside).

    Raises:
        ValueError: the endings differ in another way than ``.nii`` -> ``.nii.gz``.
    """
    source_ending, ending = split_ending(source)[1].lower(), split_ending(path)[1].lower()
    compress = (source_ending, ending) == (".nii", ".nii.gz")
    if source_ending != ending and not compress:
        raise ValueError(f"cannot copy {source} to {path}: a {source_ending} file needs converting, not copying")
    with atomic_path(Path(path), suffix=ending) as temporary:
        with open(source, "rb") as reader, (gzip.open if compress else open)(temporary, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)


def write_nifti_like(array: np.ndarray, source: str | Path, path: str | Path) -> None:
    """Write an (x, y, z) array as a NIfTI file with ``source``'s header, atomically: the same qform and sform
    (codes and matrices) and voxel size, the data type of ``array``, no intensity scaling. ``path`` may end in
    ``.nii`` or ``.nii.gz``.

    Raises:
        ValueError: ``array``'s shape is not ``source``'s.
        ImageReadError: ``source`` is not a readable NIfTI file.
    """
    import nibabel  # ships with nilearn

    try:
        original = nibabel.load(str(source))
    except (OSError, ValueError, zlib.error) as error:
        raise ImageReadError(f"{source}: unreadable NIfTI header ({error})") from None
    if tuple(array.shape) != tuple(original.shape[:3]) or len(original.shape) > 3 and any(
        size != 1 for size in original.shape[3:]
    ):
        raise ValueError(f"{path}: array shape {list(array.shape)} differs from {source}'s {list(original.shape)}")
    header = original.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    image = type(original)(np.ascontiguousarray(array), None, header)  # affine None: qform and sform stay as given
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(Path(path), suffix=split_ending(path)[1]) as temporary:
        nibabel.save(image, str(temporary))


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = _format_json(json.loads(json.dumps(data, default=_json_default))) + "\n"
    with atomic_path(Path(path), suffix=".json") as temporary:
        temporary.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a parse error names the file and the line."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None


def save_array(array: np.ndarray, path: str | Path) -> None:
    """Save an array as ``.npy`` atomically (memory-mappable for fast patch reads)."""
    with atomic_path(Path(path), suffix=".npy") as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, array)


def load_array(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` array, optionally memory-mapped read-only."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


@contextmanager
def atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it to ``path`` on success, delete it on error."""
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


def _format_json(value: Any, level: int = 0) -> str:
    """Indented JSON that keeps short lists of numbers (shapes, spacings, strides) on one line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(key, ensure_ascii=False)}: {_format_json(item, level + 1)}" for key, item in value.items()]
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
