"""The checks of a model file as a zip, before anything is read out of it or written: the manifest, every entry's
name, kind and declared size against limits, the members' layout, and every entry's SHA-256 and size."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from autoseg import __version__
from autoseg.api.model_files.layout import (
    FOLD_ENTRY,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    TOP_LEVEL_FILES,
    ModelFile,
    ModelFileError,
)
from autoseg.errors import MissingFileError
from autoseg.infer.postprocessing import MEMBER_PATTERN
from autoseg.networks.factory import NETWORK_OPTIONS_KEY
from autoseg.paths import CHECKPOINT_CHOICES, PLANS_FILE

__all__ = ["MAX_CHECKPOINT_BYTES", "MAX_COMPRESSION_RATIO", "MAX_JSON_BYTES", "check_model_file"]


_FOLDER_NAME = re.compile(r"^\w[\w.-]*$")

# Sizes a zip may declare (``ZipInfo.file_size``), checked before any entry is read or written: a zip's sizes are
# its author's word, and a zip bomb unpacks a few kB into gigabytes.
#: A checkpoint: 1 GiB, about five times the weights of the largest network autoseg plans (a 6-stage U-Net of up to
#: 320 features holds 210 MiB in float32, a PSPNet with a ResNet-50 187 MiB). Each checkpoint is then held to the
#: size of the network its own plans describe (:data:`CHECKPOINT_OVERHEAD_BYTES` more) before it is extracted.
MAX_CHECKPOINT_BYTES = 1 << 30
#: A JSON entry: 16 MiB (plans and post-processing take a few kB, ``model_selection.json`` tens of kB).
MAX_JSON_BYTES = 16 << 20
#: Largest ratio of declared to compressed size, for entries over 1 MiB: weights deflate about 1.1 times and JSON
#: about 10 times; only repetitive filler (a zip bomb) comes near deflate's limit of 1032.
MAX_COMPRESSION_RATIO = 100


def check_model_file(path: Path) -> ModelFile:
    """Read and check a model file without writing anything: manifest, entry names, links, checksums."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such model file")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _read_manifest(path, archive)
            infos = [info for info in archive.infolist() if info.filename != MANIFEST_FILE]
            names = [info.filename for info in infos]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ModelFileError(f"{path}: {twice[0]}: more than one entry of that name; refused")
            for info in infos:
                _check_entry(path, info, manifest)
                _check_size(path, info, manifest)
            files = [info.filename for info in infos if not info.is_dir()]
            missing = sorted(set(manifest["files"]) - set(files))
            if missing:
                raise ModelFileError(f"{path}: {missing[0]}: listed in the manifest but not in the zip")
            _check_layout(path, manifest, files)
            for name in files:
                _check_checksum(path, archive, name, manifest["files"][name])
    except zipfile.BadZipFile as error:
        raise ModelFileError(f"{path}: not a readable zip file ({error})") from None
    return ModelFile(path, manifest, files)


def _read_manifest(path: Path, archive: zipfile.ZipFile) -> dict[str, Any]:
    try:
        manifest = json.loads(archive.read(MANIFEST_FILE))
    except KeyError:
        raise ModelFileError(f"{path}: no {MANIFEST_FILE}: not a model file written by autoseg_export") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: not readable JSON ({error})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: no readable format version (found {version!r})")
    if version > MANIFEST_FORMAT:
        raise ModelFileError(
            f"{path}: manifest format {version} is newer than this autoseg reads ({MANIFEST_FORMAT}); "
            f"written by autoseg {manifest.get('autoseg_version', 'unknown')}, this is {__version__}"
        )
    problems = [
        key
        for key, kind in (("dataset", str), ("members", list), ("folds", dict), ("checkpoint", str), ("files", dict))
        if not isinstance(manifest.get(key), kind)
    ]
    if not isinstance(manifest.get(NETWORK_OPTIONS_KEY, {}), dict):  # absent from model files before it was recorded
        problems.append(NETWORK_OPTIONS_KEY)
    if problems:
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: missing or malformed {', '.join(problems)}")
    odd = [m for m in manifest["members"] if not isinstance(m, str) or not MEMBER_PATTERN.match(m)]
    if odd or not manifest["members"]:
        raise ModelFileError(
            f"{path}: {MANIFEST_FILE}: members must be configuration/trainer names, found {odd or 'none'}"
        )
    if not _FOLDER_NAME.match(manifest["dataset"]):
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: dataset '{manifest['dataset']}' is not a plain folder name")
    if manifest["checkpoint"] not in CHECKPOINT_CHOICES:
        raise ModelFileError(f"{path}: {MANIFEST_FILE}: unknown checkpoint '{manifest['checkpoint']}'")
    return manifest


def _check_entry(path: Path, info: zipfile.ZipInfo, manifest: dict[str, Any]) -> None:
    """Refuse an entry that is a link, could land outside the target folder, or is not part of an autoseg model."""
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise ModelFileError(f"{path}: {name}: absolute or Windows path; refused")
    if ".." in parts:
        raise ModelFileError(f"{path}: {name}: path escapes the target folder ('..'); refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ModelFileError(f"{path}: {name}: a symbolic link; refused")
    target = Path("/target")
    if not (target / name).resolve().is_relative_to(target):
        raise ModelFileError(f"{path}: {name}: path escapes the target folder; refused")
    if info.is_dir():
        return
    match = FOLD_ENTRY.match(name)
    if name not in TOP_LEVEL_FILES and not match:
        raise ModelFileError(
            f"{path}: {name}: not part of an autoseg model (plans, checkpoints and the files "
            f"{', '.join(TOP_LEVEL_FILES)}); refused"
        )
    if match and match.group("member") not in manifest["members"]:
        raise ModelFileError(f"{path}: {name}: not in a member the manifest lists ({', '.join(manifest['members'])})")
    if name not in manifest["files"]:
        raise ModelFileError(f"{path}: {name}: not listed in the manifest; refused")


def _check_size(path: Path, info: zipfile.ZipInfo, manifest: dict[str, Any]) -> None:
    """Refuse an entry whose declared size exceeds its kind's limit (:data:`MAX_CHECKPOINT_BYTES`,
    :data:`MAX_JSON_BYTES`), differs from the manifest's, or that would unpack more than
    :data:`MAX_COMPRESSION_RATIO` times its compressed size; nothing is decompressed for this."""
    if info.is_dir():
        return
    name, declared = info.filename, info.file_size
    checkpoint = name.endswith(".pth")
    limit = MAX_CHECKPOINT_BYTES if checkpoint else MAX_JSON_BYTES
    if declared > limit:
        what = "a checkpoint (5 times the largest network autoseg plans)" if checkpoint else "a JSON entry"
        raise ModelFileError(
            f"{path}: {name}: unpacks to {declared:,} bytes, more than {what} may ({limit:,}); refused"
        )
    listed = manifest["files"][name]
    if not isinstance(listed, dict) or listed.get("bytes") != declared:
        raise ModelFileError(
            f"{path}: {name}: the zip declares {declared:,} bytes, the manifest "
            f"{listed.get('bytes') if isinstance(listed, dict) else None}; refused"
        )
    if declared > 1 << 20 and declared > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise ModelFileError(
            f"{path}: {name}: {info.compress_size:,} compressed bytes unpack to {declared:,}, more than "
            f"{MAX_COMPRESSION_RATIO} times (weights compress about 1.1 times): a zip bomb; refused"
        )


def _check_layout(path: Path, manifest: dict[str, Any], files: Sequence[str]) -> None:
    """Every member the manifest names brings at least one checkpoint, every fold with a checkpoint its
    ``plans.json``, and the manifest's folds are those in the zip: so a model file cannot claim a member (and
    with it post-processing or a model selection) whose weights it does not bring."""
    folds: dict[str, set[str]] = {}
    planned = set()
    for name in files:
        if match := FOLD_ENTRY.match(name):
            if name.endswith(".pth"):
                fold = match.group("fold").rsplit("/", 1)[-1].removeprefix("fold_")
                folds.setdefault(match.group("member"), set()).add(fold)
            else:
                planned.add(match.group("fold"))
    for member in manifest["members"]:
        if member not in folds:
            raise ModelFileError(f"{path}: {MANIFEST_FILE}: member {member} has no checkpoint in the zip; refused")
        listed = manifest["folds"].get(member)
        if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(folds[member]):
            raise ModelFileError(
                f"{path}: {MANIFEST_FILE}: folds of {member} are listed as {listed}, the zip holds "
                f"{sorted(folds[member])}; refused"
            )
        unplanned = sorted(f"{member}/fold_{fold}" for fold in folds[member] if f"{member}/fold_{fold}" not in planned)
        if unplanned:
            raise ModelFileError(f"{path}: {unplanned[0]}: a checkpoint without its plans.json; refused")
    weightless = sorted(planned - {f"{m}/fold_{fold}" for m, found in folds.items() for fold in found})
    if weightless:
        raise ModelFileError(f"{path}: {weightless[0]}/{PLANS_FILE}: a plans.json without a checkpoint; refused")


def _check_checksum(path: Path, archive: zipfile.ZipFile, name: str, expected: Any) -> None:
    digest, size = hashlib.sha256(), 0
    with archive.open(name) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    if not isinstance(expected, dict) or digest.hexdigest() != expected.get("sha256") or size != expected.get("bytes"):
        raise ModelFileError(
            f"{path}: {name}: SHA-256 or size differs from the manifest: the file was changed or is damaged; refused"
        )
