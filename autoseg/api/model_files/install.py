"""``autoseg_import`` and ``autoseg_predict -m``: a checked model file installed into ``AUTOSEG_RESULTS/<dataset>/``
through a locked staging folder (:func:`import_model`; what is checked: :mod:`autoseg.api.model_files`)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from autoseg.api.model_files.archive import check_model_file
from autoseg.api.model_files.contents import check_contents
from autoseg.api.model_files.layout import (
    FOLD_ENTRY,
    TOP_LEVEL_FILES,
    InstalledModel,
    ModelFile,
    ModelFileError,
    same_file,
)
from autoseg.io.files import reporting_disk_full
from autoseg.paths import results_folder

__all__ = ["InstalledModel", "STALE_IMPORT_SECONDS", "import_model", "install_for_prediction"]


#: An import's temporary folder beside ``AUTOSEG_RESULTS/<dataset>`` (``.<dataset>.import-<random>``) that no live
#: import holds locked and that has not changed for this long is left over from a killed import, and removed.
STALE_IMPORT_SECONDS = 60


def import_model(archive: str | Path, overwrite: bool = False) -> InstalledModel:
    """Check a model file and install it into ``AUTOSEG_RESULTS/<dataset>/`` (see the module docstring).

    Before anything is written, the zip's declared sizes and compression ratios are checked against limits
    (:data:`MAX_CHECKPOINT_BYTES`, :data:`MAX_JSON_BYTES`, :data:`MAX_COMPRESSION_RATIO`) and the free space of the
    destination; entries are then extracted with a hard cap at their declared size, plans and post-processing
    validated, each checkpoint's size held to the network its plans describe and its tensors' names, shapes and
    dtypes compared with that network's (built on the meta device: nothing allocated). ``postprocessing.json`` and
    ``model_selection.json`` must concern exactly the zip's members and may not replace an installed one of other
    members. Temporary folders that killed imports left beside the dataset folder are removed first.

    Args:
        archive: the zip written by :func:`export_model`.
        overwrite: replace fold folders and files that exist with other content (a whole fold folder is
            replaced, with its logs and validation outputs). Default False: refuse.

    Returns:
        What was installed, or the identical install found (``reused``; it is checked as a new one would be).

    Raises:
        FileNotFoundError: no file at ``archive``.
        ModelFileError: nothing was written, because the zip is unreadable, has no manifest or one of a newer
            format, has an entry that is a link, absolute, holds ``..`` or is not part of a model, is not listed in
            the manifest or has another SHA-256 or size, declares more bytes than its limit or the disk's free
            space; a checkpoint holds pickled objects, no network, or weights that do not fit the network its plans
            describe; a ``plans.json`` or ``postprocessing.json`` is invalid; a post-processing or model selection
            concerns other members; ``AUTOSEG_RESULTS`` is not a writable folder; or an installed fold folder or
            file differs and ``overwrite`` is False. The message names the zip and the entry.
        DiskFullError: the disk filled up while extracting; nothing is left behind.
    """
    model = check_model_file(Path(archive))
    target = results_folder(model.dataset)
    _prepare_destination(model, target.parent)
    different = [entry for entry in model.entries if not same_file(target / entry, model.manifest["files"][entry])]
    if not different:
        check_contents(model, target, target, extract=None)  # the same bytes as the zip's
        return _installed(model, target, reused=True)
    conflicts = _conflicts(model, target, different)
    if conflicts and not overwrite:
        raise ModelFileError(
            f"{model.path}: already installed in {target} with other content: "
            f"{', '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''} "
            f"({len(conflicts)} conflict(s)); replace them with autoseg_import --overwrite, or, where "
            "the trained model is already here, predict with it (-d) instead of -m"
        )
    _check_free_space(model, target.parent)
    with _staging_folder(model, target.parent) as staging, reporting_disk_full(target):
        check_contents(model, staging, target, extract=lambda entries: _extract(model, staging, entries))
        _move_into_place(model, staging, target)
    return _installed(model, target, reused=False)


def install_for_prediction(archive: str | Path) -> InstalledModel:
    """``autoseg_predict -m``: install the model file into ``AUTOSEG_RESULTS`` like :func:`import_model` (without
    ``overwrite``), or find the identical install there, and say what to predict with.

    Raises:
        FileNotFoundError, ModelFileError: see :func:`import_model`.
    """
    return import_model(archive, overwrite=False)


def _conflicts(model: ModelFile, target: Path, different: Sequence[str]) -> list[str]:
    """Installed fold folders and top-level files that the import would replace with other content."""
    conflicts = []
    for entry in different:
        match = FOLD_ENTRY.match(entry)
        existing = target / (match.group("fold") if match else entry)
        name = existing.relative_to(target).as_posix()
        if existing.exists() and name not in conflicts:
            conflicts.append(name)
    return conflicts


def _prepare_destination(model: ModelFile, root: Path) -> None:
    """Make ``AUTOSEG_RESULTS`` (``root``) if needed, refuse it when it is not a writable folder, and remove the
    temporary folders killed imports left there."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as error:
        raise ModelFileError(
            f"{model.path}: cannot install into AUTOSEG_RESULTS={root}: not a writable folder "
            f"({error.strerror or error}); set AUTOSEG_RESULTS (or AUTOSEG_HOME) to one"
        ) from None
    _remove_stale_imports(root)


def _check_free_space(model: ModelFile, root: Path) -> None:
    """Refuse a zip that declares more bytes than the disk of ``root`` has free."""
    needed = sum(int(model.manifest["files"][entry]["bytes"]) for entry in model.entries)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise ModelFileError(
            f"{model.path}: unpacks to {needed:,} bytes, but only {free:,} are free under {root}; nothing was written"
        )


def _remove_stale_imports(root: Path) -> list[Path]:
    """Remove the temporary folders (``.<dataset>.import-*``) of killed imports under ``root``: those no live import
    holds locked (:func:`_staging_folder`) and in which nothing changed for :data:`STALE_IMPORT_SECONDS` (an import
    of an older autoseg held no lock). Returns them."""
    removed = []
    for folder in sorted(root.glob(".*.import-*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            newest = max([folder.lstat().st_mtime, *(p.lstat().st_mtime for p in folder.rglob("*"))])
            if time.time() - newest < STALE_IMPORT_SECONDS:
                continue
            with _locked(folder, blocking=False):
                shutil.rmtree(folder)
        except OSError:  # a live import holds it, another import removed it meanwhile, or it cannot be removed
            continue
        removed.append(folder)
    return removed


@contextmanager
def _locked(folder: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (released when the process ends, however it ends).

    Raises:
        BlockingIOError: ``blocking`` is False and another process holds the lock.
    """
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield
    finally:
        os.close(handle)


@contextmanager
def _staging_folder(model: ModelFile, root: Path) -> Iterator[Path]:
    """A locked temporary folder ``.<dataset>.import-<random>`` in ``root``, removed afterwards (what was moved
    into place out of it stays)."""
    with reporting_disk_full(root / model.dataset):
        staging = Path(tempfile.mkdtemp(prefix=f".{model.dataset}.import-", dir=root))
    try:
        with _locked(staging):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(model: ModelFile, staging: Path, entries: Sequence[str]) -> None:
    """Extract ``entries`` into ``staging``, never more bytes than each declares, and check their checksums again
    as written."""
    with zipfile.ZipFile(model.path) as archive:
        for entry in entries:
            expected = model.manifest["files"][entry]
            destination = staging / entry
            destination.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(entry) as source, open(destination, "wb") as handle:
                while chunk := source.read(min(1 << 20, expected["bytes"] - written + 1)):
                    written += len(chunk)
                    if written > expected["bytes"]:
                        raise ModelFileError(f"{model.path}: {entry}: unpacks to more than it declares; refused")
                    handle.write(chunk)
            if not same_file(destination, expected):
                raise ModelFileError(f"{model.path}: {entry}: changed while it was read; refused")


def _move_into_place(model: ModelFile, staging: Path, target: Path) -> None:
    """Rename the staged dataset folder into place, or, when it exists, each fold folder and top-level file."""
    if not target.exists():
        os.replace(staging, target)
        return
    folds = sorted({m.group("fold") for entry in model.entries if (m := FOLD_ENTRY.match(entry))})
    for fold in folds:
        destination = target / fold
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            old = staging / ".replaced" / fold
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(destination, old)  # removed with the staging folder
        os.replace(staging / fold, destination)
    for entry in model.entries:
        if entry in TOP_LEVEL_FILES:
            os.replace(staging / entry, target / entry)


def _installed(model: ModelFile, target: Path, reused: bool) -> InstalledModel:
    members = [tuple(member.split("/", 1)) for member in model.manifest["members"]]
    folds = {pair: [str(f) for f in model.manifest["folds"].get("/".join(pair), [])] for pair in members}
    return InstalledModel(model.dataset, target, members, folds, model.manifest["checkpoint"], reused)
