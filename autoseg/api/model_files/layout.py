"""What a model file is made of: its entry names (the manifest, the top-level files, ``CONFIGURATION/TRAINER/fold_K/``
entries), its error, and what export and import return. The format itself: :mod:`autoseg.api.model_files`."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.errors import AutosegError
from autoseg.paths import POSTPROCESSING_FILE, QC_CALIBRATION_FILE, SELECTION_FILE

#: The manifest's entry name, at the root of the zip.
MANIFEST_FILE = "manifest.json"
#: The manifest format this autoseg writes and the newest it reads.
MANIFEST_FORMAT = 1
FINGERPRINT_SUMMARY_FILE = "fingerprint_summary.json"
DATASET_FILE = "dataset.json"
#: Entries a model file may hold at its root, besides the manifest.
TOP_LEVEL_FILES = (POSTPROCESSING_FILE, SELECTION_FILE, QC_CALIBRATION_FILE, FINGERPRINT_SUMMARY_FILE, DATASET_FILE)
#: ``CONFIGURATION/TRAINER/fold_K/plans.json`` or ``.../checkpoint_NAME.pth``: the only other entries.
FOLD_ENTRY = re.compile(r"^(?P<fold>(?P<member>[\w.-]+/[\w.-]+)/fold_\w+)/(plans\.json|checkpoint_\w+\.pth)$")


class ModelFileError(AutosegError, ValueError):
    """A model file (zip) that cannot be installed: unreadable, of an unknown format, tampered with, unsafe, or in
    conflict with an installed model. The message names the zip and the entry."""


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_model` wrote: the zip, its manifest, and its size in bytes."""

    path: Path
    manifest: dict[str, Any]
    bytes: int


@dataclass(frozen=True)
class InstalledModel:
    """A model installed from a zip: its dataset folder, members, folds per member, checkpoint choice, and whether
    an identical install was found (nothing written)."""

    dataset: str
    folder: Path
    members: list[tuple[str, str]]
    folds: dict[tuple[str, str], list[str]]
    checkpoint: str
    reused: bool


@dataclass(frozen=True)
class ModelFile:
    """A checked zip: its path, manifest, and the entries (file names) to install."""

    path: Path
    manifest: dict[str, Any]
    entries: list[str]

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def same_file(path: Path, expected: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != expected["bytes"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == expected["sha256"]
