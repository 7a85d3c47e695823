"""What :func:`autoseg.api.predict.predict` writes and reports: each case's output files, the check that they never
overwrite an input or one another (:func:`check_outputs`), a failed case's line, the run's summary file and its
lesion tables (:func:`write_lesion_tables`)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.api.predict_inputs import InputCase
from autoseg.errors import UsageError
from autoseg.io.files import OutputPathError, atomic_path, read_json
from autoseg.io.headers import split_ending
from autoseg.io.images import companion_files, image_files

__all__ = [
    "LESION_REPORT_ENDING",
    "SUMMARY_FILE",
    "CaseFailure",
    "CaseOutputs",
    "PredictionSummary",
    "case_failure",
    "check_outputs",
    "count_and_names",
    "output_files",
    "report_rows",
    "summary_path",
    "write_lesion_tables",
]


#: Written by :func:`autoseg.api.predict.predict` into the output folder (``prediction_summary_part{i}of{K}.json``
#: for part i of K).
SUMMARY_FILE = "prediction_summary.json"

#: Each case's lesion report, ``OUTPUT/CASE_lesions.json`` (``autoseg.infer.lesions``, ``autoseg.infer.quality``).
LESION_REPORT_ENDING = "_lesions.json"

#: The run's tables, one row per case and one row per lesion (``_part{i}of{K}`` before ``.csv`` for part i of K).
LESIONS_FILE = "lesions.csv"
LESION_TABLE_FILE = "lesion_table.csv"


@dataclass(frozen=True)
class CaseOutputs:
    """The files one case's prediction writes, in the order they are written: the probability and uncertainty maps
    when asked for, the label file, and the lesion report last, so an existing report means the case is complete."""

    labels: Path
    report: Path
    probabilities: Path | None = None
    uncertainty: Path | None = None

    def named(self) -> list[tuple[str, Path]]:
        """(what, path) of every file, in writing order."""
        kinds = [("probability map", self.probabilities), ("uncertainty map", self.uncertainty)]
        return [*((k, p) for k, p in kinds if p is not None), ("labels", self.labels), ("lesion report", self.report)]

    def paths(self) -> list[Path]:
        return [path for _, path in self.named()]


@dataclass(frozen=True)
class CaseFailure:
    """A case that could not be predicted: its identifier, the file at fault (else all its channel files) and the
    problem, in one line."""

    identifier: str
    files: tuple[str, ...]
    problem: str

    def line(self) -> str:
        """``case ID (FILES): PROBLEM``, the line printed when the case fails."""
        return f"case {self.identifier} ({', '.join(self.files)}): {self.problem}"


@dataclass
class PredictionSummary:
    """What one :func:`autoseg.api.predict.predict` call did with the cases of its part, in input order.

    Attributes:
        written: label files written by this call.
        skipped: identifiers of cases whose outputs were already complete (see ``overwrite``).
        failed: the cases that could not be predicted and why.
        cases: number of cases in this part (after ``case_list``).
        stale_temporaries: temporary files of a killed run that were removed.
        path: the JSON file this summary was written to (None before it is written).
        per_case: written and skipped cases -> ``lesion_count``, ``total_volume_ml``, ``qc_score``, ``review``,
            ``review_reasons`` and ``input_warnings`` (``autoseg.api.input_checks``; an empty list: within every
            training range, or not checked), from their lesion reports.
        input_checks: what the cases were checked against: ``against`` (the file of the training ranges) and
            ``note`` (why nothing was checked), each None when it does not apply; None: not recorded.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[CaseFailure] = field(default_factory=list)
    cases: int = 0
    stale_temporaries: int = 0
    path: Path | None = None
    per_case: dict[str, dict] = field(default_factory=dict)
    input_checks: dict[str, object] | None = None

    @property
    def flagged(self) -> list[str]:
        """Cases flagged for review, in input order."""
        return [case for case, entry in self.per_case.items() if entry.get("review")]

    @property
    def warned(self) -> list[str]:
        """Cases with at least one input warning, in input order."""
        return [case for case, entry in self.per_case.items() if entry.get("input_warnings")]

    def to_json(self) -> dict[str, object]:
        """The summary as written to ``prediction_summary*.json``: counts (``input_warnings``: cases with at least one
        input warning; ``review``: cases flagged for review), then case identifiers per outcome, what the inputs were
        checked against, and per written or skipped case its lesion count, volume, QC score, review flag and input
        warnings."""
        return {
            "cases": self.cases,
            "counts": {
                "written": len(self.written),
                "skipped": len(self.skipped),
                "failed": len(self.failed),
                "input_warnings": len(self.warned),
                "review": len(self.flagged),
            },
            "written": [split_ending(path)[0] for path in self.written],
            "skipped": list(self.skipped),
            "failed": [{"case": f.identifier, "files": list(f.files), "problem": f.problem} for f in self.failed],
            "stale_temporaries_removed": self.stale_temporaries,
            "input_checks": self.input_checks,
            "per_case": self.per_case,
        }

    def line(self, shown: int = 10) -> str:
        """One line: how many cases were written, skipped (already done) and failed, how many had input warnings and
        how many are flagged for review, naming up to ``shown`` of each, and where the summary file is."""
        text = f"wrote {len(self.written)} prediction(s), skipped {len(self.skipped)} already done"
        text += f", {count_and_names([f.identifier for f in self.failed], 'failed', shown)}"
        if self.warned:
            text += f", {count_and_names(self.warned, 'with input warnings', shown)}"
        text += f"; {count_and_names(self.flagged, 'flagged for review', shown)}"
        return f"{text}; summary: {self.path}" if self.path else text


def count_and_names(cases: Sequence[str], what: str, shown: int) -> str:
    """``3 failed: a, b, c`` (up to ``shown`` names, then ``and N more``), or ``0 failed``."""
    if not cases:
        return f"0 {what}"
    more = f" and {len(cases) - shown} more" if len(cases) > shown else ""
    return f"{len(cases)} {what}: {', '.join(cases[:shown])}{more}"


def summary_path(output: str | Path, num_parts: int = 1, part_id: int = 0, name: str = SUMMARY_FILE) -> Path:
    """Where :func:`autoseg.api.predict.predict` writes its summary (or, with ``name``, another run-level file such as
    :data:`LESIONS_FILE`): ``OUTPUT/prediction_summary.json``, or ``OUTPUT/prediction_summary_part{part_id}of{num_parts}.json``
    when the cases are split, so that parts running at the same time each keep their own."""
    if num_parts == 1:
        return Path(output) / name
    stem, ending = name.rsplit(".", 1)
    return Path(output) / f"{stem}_part{part_id}of{num_parts}.{ending}"


#: Columns of :data:`LESIONS_FILE` (one row per case) and :data:`LESION_TABLE_FILE` (one row per lesion).
CASE_COLUMNS = ("case", "lesion_count", "total_volume_ml", "qc_score", "review", "review_reasons", "input_warnings")
LESION_COLUMNS = (
    "case",
    "lesion",
    "label",
    "voxels",
    "volume_ml",
    "hemisphere",
    "centroid_ras_x_mm",
    "centroid_ras_y_mm",
    "centroid_ras_z_mm",
    "bbox_start",
    "bbox_stop",
    "mean_probability",
    "max_probability",
)


def report_rows(report: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A lesion report's (``CASE_lesions.json``) row of :data:`LESIONS_FILE` and rows of :data:`LESION_TABLE_FILE`,
    by :data:`CASE_COLUMNS` and :data:`LESION_COLUMNS`. Lists (review reasons, input warnings) are joined with
    ``; ``; bounding boxes are written ``i j k``."""
    qc = report.get("qc", {})
    case = {
        "case": report["case"],
        "lesion_count": report["lesion_count"],
        "total_volume_ml": report["total_volume_ml"],
        "qc_score": qc.get("score"),
        "review": qc.get("review"),
        "review_reasons": "; ".join(qc.get("reasons", [])),
        "input_warnings": "; ".join(report.get("input_warnings", [])),
    }
    lesions = []
    for lesion in report["lesions"]:
        ras = lesion["centroid_ras_mm"]
        lesions.append(
            {
                "case": report["case"],
                "lesion": lesion["index"],
                "label": lesion["label"],
                "voxels": lesion["voxels"],
                "volume_ml": lesion["volume_ml"],
                "hemisphere": lesion["hemisphere"],
                "centroid_ras_x_mm": ras[0],
                "centroid_ras_y_mm": ras[1],
                "centroid_ras_z_mm": ras[2],
                "bbox_start": " ".join(str(v) for v in lesion["bounding_box"]["start"]),
                "bbox_stop": " ".join(str(v) for v in lesion["bounding_box"]["stop"]),
                "mean_probability": lesion["mean_probability"],
                "max_probability": lesion["max_probability"],
            }
        )
    return case, lesions


def write_lesion_tables(reports: Sequence[Path], output: Path, num_parts: int = 1, part_id: int = 0) -> list[Path]:
    """Write the run's :data:`LESIONS_FILE` (one row per case) and :data:`LESION_TABLE_FILE` (one row per lesion) from
    the cases' lesion reports (``CASE_lesions.json``, in the order given; rows by :func:`report_rows`), atomically;
    for part ``part_id`` of ``num_parts`` named as :func:`summary_path` names the summary. Returns the two paths."""
    cases, lesions = [], []
    for path in reports:
        case, rows = report_rows(read_json(path))
        cases.append(case)
        lesions += rows
    written = []
    for name, columns, rows in ((LESIONS_FILE, CASE_COLUMNS, cases), (LESION_TABLE_FILE, LESION_COLUMNS, lesions)):
        path = summary_path(output, num_parts, part_id, name)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(path, suffix=".csv") as temporary:
            Path(temporary).write_text(buffer.getvalue(), encoding="utf-8")
        written.append(path)
    return written


def check_outputs(
    inputs: Sequence[InputCase],
    cases: Sequence[InputCase],
    output: str | Path,
    save_probabilities: bool,
    summary: str | Path,
    save_uncertainty: bool = False,
) -> None:
    """Refuse, before anything is written, a run whose outputs would overwrite an input or one another.

    Every file the run may write (each case's label file and lesion report, its probability map with
    ``save_probabilities`` and uncertainty map with ``save_uncertainty``, the data
    file a ``.mhd``/``.nhdr`` header names beside it (:func:`autoseg.io.images.image_files`), and the ``summary`` file) is
    compared with every input file (the channel files of all ``inputs`` and the data files their headers name) by
    resolved path (symbolic links and ``..`` followed) and, where it exists, by inode (hard links); and with every
    output of this run and with the label file of every other input case (other ``--list`` runs and parts share the
    folder) by resolved path. So ``-i DIR -o DIR`` with plain-named scans (``scan.nii.gz`` is case ``scan``, whose
    labels would be ``scan.nii.gz``) is refused, whether or not ``overwrite`` is set, and an input is never taken
    for a finished output; and so is predicting case ``a`` with probability maps beside a case ``a_probabilities``,
    whether or not this run predicts that case too.

    Args:
        inputs: every case of the input (before ``--list`` and parts): none of their files may be written.
        cases: the cases to predict in this run, all parts together (parts share the output folder).
        output: the output folder.
        save_probabilities: whether probability maps are written.
        save_uncertainty: whether uncertainty maps are written.
        summary: this part's summary file (:func:`summary_path`).

    Raises:
        UsageError: one line naming the output and the input it would overwrite, or the two cases (and which of
            their outputs) that would write the same file.
        OutputPathError: an output is a folder.
    """
    protected: dict[str, Path] = {}
    inodes: dict[tuple[int, int], Path] = {}
    for case in inputs:
        for image in case.images:
            for file in (image, *companion_files(image)):
                protected.setdefault(os.path.realpath(file), file)
                if (key := _inode(file)) is not None:
                    inodes.setdefault(key, file)
    planned = _planned_outputs(cases, Path(output), save_probabilities, save_uncertainty)
    for owner, path in [*planned, ("the prediction summary", Path(summary))]:
        if path.is_dir():
            raise OutputPathError(f"output {path} ({owner}): is a folder, not a file")
        real = os.path.realpath(path)
        source = protected.get(real) or inodes.get(_inode(path) or (-1, -1))
        if source is not None:
            raise UsageError(
                f"output {path} ({owner}) would overwrite the input {source}; write the predictions to another "
                "folder (-o)"
            )
    # Other runs (--list, parts) write into the same folder: besides this run's own outputs, every input case's label
    # file is reserved for it (a run with probability maps is refused where one would be another case's labels, so
    # no run ever finds another case's probability map under its own label file's name).
    written: dict[str, tuple[str, Path]] = {}
    this_run = {case.identifier for case in cases}
    others = [case for case in inputs if case.identifier not in this_run]
    for owner, path in [*planned, *(item for item in _planned_outputs(others, Path(output), False))]:
        real = os.path.realpath(path)
        if real in written:
            other, first = written[real]
            raise UsageError(
                f"{other} and {owner} would both be written to {first}; rename one of the cases or predict them "
                "into separate folders"
            )
        written[real] = (owner, path)


def _planned_outputs(
    cases: Sequence[InputCase], output: Path, save_probabilities: bool, save_uncertainty: bool = False
) -> list[tuple[str, Path]]:
    """(whose output, path) of every file predicting ``cases`` into ``output`` writes."""
    return [
        (f"case {case.identifier}'s {kind}", path)
        for case in cases
        for kind, target in output_files(output, case, save_probabilities, save_uncertainty).named()
        for path in image_files(target)
    ]


def _inode(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, else None."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def output_files(
    output: Path, case: InputCase, save_probabilities: bool, save_uncertainty: bool = False
) -> CaseOutputs:
    """The files a case's prediction writes (:class:`CaseOutputs`): ``CASE<ending>``, ``CASE_lesions.json`` and, when
    asked for, ``CASE_probabilities.nii.gz`` and ``CASE_uncertainty.nii.gz``."""
    name = case.identifier
    return CaseOutputs(
        labels=output / f"{name}{case.ending}",
        report=output / f"{name}{LESION_REPORT_ENDING}",
        probabilities=output / f"{name}_probabilities.nii.gz" if save_probabilities else None,
        uncertainty=output / f"{name}_uncertainty.nii.gz" if save_uncertainty else None,
    )


def case_failure(case: InputCase, error: Exception) -> CaseFailure:
    """The failed case with the error's message on one line: a message that starts with one of the case's files
    (``PATH: problem``, as :class:`ImageReadError` says it) blames that file, any other the whole case."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    for path in case.images:
        if message.startswith(f"{path}: "):
            return CaseFailure(case.identifier, (str(path),), message.removeprefix(f"{path}: "))
    files = tuple(str(path) for path in case.images)
    return CaseFailure(case.identifier, files, message.removeprefix(f"case {case.identifier}: "))
