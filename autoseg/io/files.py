"""Files other than images: JSON, checksummed arrays, atomic writes, stale temporaries, a full disk, output paths.

Every writer writes to a temporary name in the destination folder and renames it into place (:func:`atomic_path`), so
a killed process never leaves a half-written file under the final name. A write that fails because the disk is full
raises :class:`DiskFullError` (``no space left on device while writing PATH``), whatever library did the writing.

Arrays (``.npy``) are written with their size and a CRC-32 of their bytes (:func:`save_array` returns them), so that
damage after writing (a file cut short, changed bytes) is found by :func:`array_damage`; :func:`load_array` names a
damaged file instead of failing inside numpy."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import AutosegError, InvalidFileError

_UMASK = os.umask(0)
os.umask(_UMASK)


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
