"""The BIDS derivatives dataset ``autoseg_predict --bids`` writes: each case's files, their sidecars, the dataset's
description and its tables::

    OUT/dataset_description.json                      DatasetType "derivative", GeneratedBy autoseg and the model
    OUT/sub-01[/ses-1]/anat/sub-01[_ses-1]_space-orig_desc-lesion_mask.nii.gz    binary: 1 lesion, 0 background
    OUT/sub-01[/ses-1]/anat/sub-01[_ses-1]_space-orig_desc-lesion_mask.json      Sources, model, volume, QC
    OUT/sub-01[/ses-1]/anat/sub-01[_ses-1]_space-orig_label-L_probseg.nii.gz     with save_probabilities
    OUT/lesions.tsv, lesions.json                     one row per mask (+ the columns' descriptions)
    OUT/lesion_table.tsv, lesion_table.json           one row per lesion (+ the columns' descriptions)

Names follow the BIDS derivatives conventions for masks (BIDS 1.10, "Imaging data types: Masks"; the names
themselves: :class:`autoseg.api.bids_inputs.BidsCase`): ``space-orig`` because the mask lies on the grid of its
source image (no transformation). Masks and probability maps keep the first channel's exact header
(``autoseg.io.images.write_like``). The probability map of the lesion is a probabilistic segmentation with
``label-L`` (BIDS's common label for lesion). Sidecars name their sources by BIDS URIs (``bids:raw:PATH``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import autoseg
from autoseg.api.bids_inputs import MASK_ENTITIES, UNCERTAINTY_ENTITIES, BidsCase
from autoseg.api.predict import PredictionOptions
from autoseg.api.predict_inputs import InputCase
from autoseg.api.predict_models import ModelDescription
from autoseg.api.predict_outputs import output_files, report_rows
from autoseg.errors import AutosegError, ExistingOutputError
from autoseg.io.files import atomic_path, read_json, write_json
from autoseg.io.headers import split_ending
from autoseg.io.images import read_image, write_like

__all__ = [
    "BIDS_VERSION",
    "CASE_TABLE",
    "CASE_TABLE_COLUMNS",
    "LESION_TABLE",
    "LESION_TABLE_COLUMNS",
    "REPORT_KEYS",
    "check_description",
    "dataset_description",
    "mask_sidecar",
    "model_json",
    "write_bidsignore",
    "write_derivatives",
    "write_tables",
]

#: The BIDS version whose derivatives conventions the output follows (``dataset_description.json``).
BIDS_VERSION = "1.10.0"
#: The name under which the source dataset is linked (``DatasetLinks``) and named in BIDS URIs: ``bids:raw:PATH``.
SOURCE_LINK = "raw"
#: The derivatives dataset's tables (besides ``dataset_description.json``).
CASE_TABLE, LESION_TABLE = "lesions.tsv", "lesion_table.tsv"


def write_derivatives(
    case: BidsCase, predictions: Path, output: Path, model: Mapping[str, Any], options: PredictionOptions
) -> dict[str, Any]:
    """Write one case's mask (binary, the first channel's header), probability and uncertainty maps and sidecar
    (last) from what :func:`autoseg.api.predict.predict` wrote under ``predictions`` (:func:`autoseg.api.predict_outputs.output_files`);
    returns the sidecar."""
    staged = InputCase(case.identifier, case.sources, split_ending(case.sources[0])[1])
    predicted = output_files(predictions, staged, options.save_probabilities, options.save_uncertainty)
    labels, geometry = read_image(predicted.labels)
    write_like((labels != 0).astype(np.uint8), geometry, case.mask(output), case.sources[0])  # 0: background
    # the maps are written by predict with the first channel's header already
    if predicted.probabilities is not None:
        os.replace(predicted.probabilities, case.probseg(output))
    if predicted.uncertainty is not None:
        os.replace(predicted.uncertainty, case.uncertainty(output))
    described = mask_sidecar(case, model, read_json(predicted.report))
    if predicted.uncertainty is not None:
        described["UncertaintyMap"] = case.uncertainty(output).name
    write_json(described, case.sidecar(output))
    return described


def _uri(relative: str) -> str:
    """The BIDS URI of a file of the source dataset: ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``."""
    return f"bids:{SOURCE_LINK}:{relative}"


#: The keys of a lesion report (``CASE_lesions.json``, ``autoseg.infer.lesions``) kept in each mask's sidecar, and
#: their names there; its file names (``case``, ``files``, ``mask``, ...) name the staged files and are left out.
REPORT_KEYS = {
    "lesion_count": "LesionCount",
    "total_volume_ml": "LesionVolumeMl",
    "voxel_volume_ml": "VoxelVolumeMl",
    "qc": "QC",
    "input_warnings": "InputWarnings",
    "midline": "Midline",
    "conventions": "Conventions",
    "lesions": "Lesions",
}


def mask_sidecar(case: BidsCase, model: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """The mask's JSON sidecar: BIDS's mask fields (``Type``, ``Sources``, ``SpatialReference``), the model, and
    the lesion report of :func:`autoseg.api.predict.predict` (:data:`REPORT_KEYS`: volume in ml, lesions, QC)."""
    return {
        "Type": "Lesion",
        "Description": "Lesion mask predicted by autoseg: 1 inside a lesion (any non-background label of the "
        "model), 0 outside, on the grid and with the header of its first source image.",
        "Sources": [_uri(relative) for relative in case.relative],
        "SpatialReference": _uri(case.relative[0]),
        "Manual": False,
        "Model": {**model, "Channels": {name: _uri(path) for name, path in zip(model["Channels"], case.relative)}},
        **{name: report[key] for key, name in REPORT_KEYS.items() if key in report},
    }


def model_json(model: ModelDescription) -> dict[str, Any]:
    """The model as the sidecars and the summary name it (a model file with its SHA-256)."""
    described: dict[str, Any] = {
        "Dataset": model.dataset,
        "Members": list(model.members),
        "Folds": {member: list(folds) for member, folds in model.folds.items()},
        "Checkpoint": model.checkpoint,
        "Channels": list(model.channels),
    }
    if model.model_file is not None:
        described["ModelFile"] = {"Path": str(Path(model.model_file).resolve()), "SHA256": _sha256(model.model_file)}
    return described


def _sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hexadecimal)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_description(root: Path, model: ModelDescription) -> dict[str, Any]:
    """``dataset_description.json`` of the derivatives dataset: derivative, generated by autoseg (version and
    model), the source dataset linked for the sidecars' BIDS URIs."""
    source_name = None
    try:
        source_name = read_json(root / "dataset_description.json").get("Name")
    except (AutosegError, AttributeError):
        pass
    members = ", ".join(f"{m} ({', '.join(model.folds[m])})" for m in model.members)
    origin = f"model file {Path(model.model_file).name}, " if model.model_file else ""
    return {
        "Name": f"autoseg lesion masks{f' of {source_name}' if source_name else ''}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "autoseg",
                "Version": autoseg.__version__,
                "Description": f"autoseg_predict, {origin}dataset {model.dataset}, members {members}, "
                f"{model.checkpoint} checkpoint(s); channels {', '.join(model.channels)}",
            }
        ],
        "SourceDatasets": [{"URL": root.resolve().as_uri()}],
        "DatasetLinks": {SOURCE_LINK: root.resolve().as_uri()},
    }


def check_description(path: Path, description: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse an output that holds another dataset: one not generated by autoseg always, one of another model or
    source (another ``GeneratedBy`` or ``DatasetLinks``) unless ``overwrite``.

    Raises:
        ExistingOutputError: one line naming the file and what differs.
    """
    if not path.is_file():
        return
    existing = read_json(path)
    generated = existing.get("GeneratedBy") if isinstance(existing, dict) else None
    if not (isinstance(generated, list) and generated and generated[0].get("Name") == "autoseg"):
        raise ExistingOutputError(f"{path}: another dataset, not autoseg's derivatives; write to another folder (-o)")
    for key in ("GeneratedBy", "DatasetLinks"):
        if existing.get(key) != description[key] and not overwrite:
            raise ExistingOutputError(
                f"{path}: written by another {'model or autoseg version' if key == 'GeneratedBy' else 'source'} "
                f"({existing.get(key)}); write to another folder (-o), or --overwrite to predict every selected case "
                "again with this one"
            )


#: What locates a row of the BIDS tables, before the columns of ``lesions.csv`` and ``lesion_table.csv``
#: (:data:`autoseg.api.predict_outputs.CASE_COLUMNS`, ``LESION_COLUMNS``, without ``case``).
_ROW_KEYS = {
    "participant_id": {"Description": "Subject label, sub-<label>."},
    "session_id": {"Description": "Session label, ses-<label>; n/a without sessions."},
    "mask": {"Description": "The lesion mask, relative to this dataset."},
}
#: The columns of ``lesions.tsv`` (one row per mask) and their descriptions (``lesions.json``).
CASE_TABLE_COLUMNS = {
    **_ROW_KEYS,
    "lesion_count": {"Description": "Number of lesions: 26-connected components of the mask."},
    "total_volume_ml": {"Description": "Volume of the mask: voxels x the source's voxel volume.", "Units": "mL"},
    "qc_score": {
        "Description": "Quality-control score of the prediction, 0-1, higher is more reliable "
        "(documentation/quality_control.md)."
    },
    "review": {
        "Description": "Whether the case is flagged for review.",
        "Levels": {"True": "check the mask", "False": "not flagged"},
    },
    "review_reasons": {"Description": "Why the case is flagged, '; '-separated."},
    "input_warnings": {"Description": "Input checks against the training data that warned, '; '-separated."},
}
#: The columns of ``lesion_table.tsv`` (one row per lesion) and their descriptions (``lesion_table.json``).
LESION_TABLE_COLUMNS = {
    **_ROW_KEYS,
    "lesion": {"Description": "Lesion index in the mask, 1 the largest."},
    "label": {"Description": "The model's declared label value most of the lesion's voxels carry."},
    "voxels": {"Description": "Voxels of the lesion."},
    "volume_ml": {"Description": "Volume of the lesion: voxels x the source's voxel volume.", "Units": "mL"},
    "hemisphere": {
        "Description": "The patient's side of the mid-sagittal plane holding at least 90% of the lesion.",
        "Levels": {"left": "left", "right": "right", "midline": "across the midline", "unknown": "no midline found"},
    },
    **{
        f"centroid_ras_{axis}_mm": {
            "Description": f"Centroid, world {axis} (RAS: x left to right, y posterior to "
            "anterior, z inferior to superior).",
            "Units": "mm",
        }
        for axis in "xyz"
    },
    "bbox_start": {"Description": "Bounding box start, voxel indices i j k of the mask (inclusive)."},
    "bbox_stop": {"Description": "Bounding box stop, voxel indices i j k of the mask (exclusive)."},
    "mean_probability": {"Description": "Mean lesion probability inside the lesion."},
    "max_probability": {"Description": "Largest lesion probability inside the lesion."},
}


def write_tables(output: Path) -> None:
    """``lesions.tsv`` (one row per mask) and ``lesion_table.tsv`` (one row per lesion) of every mask sidecar in
    ``output`` (the rows of ``lesions.csv`` and ``lesion_table.csv``, :func:`autoseg.api.predict_outputs.report_rows`,
    located by subject, session and mask), with their JSON column descriptions; ``n/a`` where a value is missing
    (BIDS tabular files)."""
    from bids.layout import parse_file_entities

    cases, lesions = [], []
    for sidecar in sorted(output.glob(f"sub-*/**/*_{MASK_ENTITIES}.json")):
        data = read_json(sidecar)
        entities = parse_file_entities(sidecar.as_posix())
        keys = {
            "participant_id": f"sub-{entities['subject']}",
            "session_id": f"ses-{entities['session']}" if "session" in entities else None,
            "mask": sidecar.relative_to(output).as_posix().removesuffix(".json") + ".nii.gz",
        }
        report = {key: data[name] for key, name in REPORT_KEYS.items() if name in data}
        case, rows = report_rows({**report, "case": None})
        cases.append({**keys, **case})
        lesions += [{**keys, **row} for row in rows]
    for name, rows, columns in (
        (CASE_TABLE, cases, CASE_TABLE_COLUMNS),
        (LESION_TABLE, lesions, LESION_TABLE_COLUMNS),
    ):
        with atomic_path(output / name, suffix=".tsv") as temporary:
            pd.DataFrame(rows, columns=list(columns)).to_csv(temporary, sep="\t", index=False, na_rep="n/a")
        write_json(columns, output / name.replace(".tsv", ".json"))


def write_bidsignore(output: Path, also: Sequence[str] = ()) -> None:
    """``.bidsignore``: the uncertainty maps, which are no BIDS files, and the patterns ``also`` (the run's summary,
    its staging folder), for the BIDS validator."""
    path = output / ".bidsignore"
    patterns = [*also, f"*_{UNCERTAINTY_ENTITIES}.nii.gz"]
    with atomic_path(path, suffix=".txt") as temporary:
        temporary.write_text("".join(f"{pattern}\n" for pattern in patterns), encoding="utf-8")
