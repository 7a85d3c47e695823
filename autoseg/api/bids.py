"""``autoseg_predict --bids``: BIDS datasets in, a BIDS derivatives dataset out (pybids).

:func:`predict_bids` finds the cases of a BIDS dataset (:mod:`autoseg.api.bids_inputs`: subjects and sessions, the
model's channels by suffix, filters), stages them under the names :func:`autoseg.api.predict.predict` reads
(symbolic links ``CASE_0000.nii.gz`` ... in a hidden folder of the output), predicts them, and writes a BIDS
derivatives dataset (:mod:`autoseg.api.bids_derivatives`: masks, probability and uncertainty maps, sidecars,
``dataset_description.json``, ``lesions.tsv``, ``lesion_table.tsv``) and ``prediction_summary.json``: what this
run wrote, skipped, and why a subject was not predicted. An interrupted run continues with the same command.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.api.bids_derivatives import (
    check_description,
    dataset_description,
    model_json,
    write_bidsignore,
    write_derivatives,
    write_tables,
)
from autoseg.api.bids_inputs import BidsCase, BidsSelection, NotPredicted, bids_layout, find_bids_cases
from autoseg.api.predict import PredictionOptions, predict
from autoseg.api.predict_models import ModelChoice, describe_model
from autoseg.api.predict_outputs import CaseFailure, count_and_names
from autoseg.errors import UsageError
from autoseg.io.files import check_output_folder, read_json, write_json
from autoseg.io.headers import split_ending

__all__ = ["BidsSummary", "predict_bids"]

#: Hidden folder of the output where the inputs are staged and ``predict`` writes; removed after a run that ends
#: normally, kept after an interrupted one so that the same command continues where it stopped.
STAGING = ".autoseg_staging"
#: The run's summary in the output (not a BIDS file: ``.bidsignore`` lists it).
SUMMARY_FILE = "prediction_summary.json"


@dataclass
class BidsSummary:
    """What :func:`predict_bids` did.

    Attributes:
        written: masks written by this run.
        skipped: masks that were complete already (mask and sidecar exist; see ``overwrite``).
        failed: the cases that could not be read or predicted, naming their BIDS files.
        not_predicted: the subjects (sessions) that gave no case, and why.
        per_case: written and skipped cases (their mask's name before ``_space-orig...``) -> ``review`` and
            ``input_warnings``, from their sidecars.
        path: the summary file (``OUTPUT/prediction_summary.json``).
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[CaseFailure] = field(default_factory=list)
    not_predicted: list[NotPredicted] = field(default_factory=list)
    per_case: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def nothing_predicted(self) -> bool:
        """No mask was written or found complete: the run predicted nothing (exit code 1)."""
        return not self.written and not self.skipped

    def note(self, case: BidsCase, sidecar: Mapping[str, Any]) -> None:
        """Record a written or skipped case's review flag and input warnings from its mask's sidecar."""
        qc = sidecar.get("QC") or {}
        self.per_case[case.identifier] = {
            "review": bool(qc.get("review")),
            "input_warnings": list(sidecar.get("InputWarnings", [])),
        }

    def line(self, shown: int = 10) -> str:
        """One line: masks written, skipped, failed, with input warnings, flagged for review, and subjects (sessions)
        not predicted, naming up to ``shown`` of each, and where the summary is."""
        flagged = [case for case, entry in self.per_case.items() if entry["review"]]
        warned = [case for case, entry in self.per_case.items() if entry["input_warnings"]]
        missing = [problem.line().split(":", 1)[0] for problem in self.not_predicted]
        text = f"wrote {len(self.written)} mask(s), skipped {len(self.skipped)} already done"
        text += f", {count_and_names([failure.identifier for failure in self.failed], 'failed', shown)}"
        if warned:
            text += f", {count_and_names(warned, 'with input warnings', shown)}"
        text += f"; {count_and_names(flagged, 'flagged for review', shown)}"
        text += f"; {count_and_names(missing, 'subject(s)/session(s) not predicted', shown)}"
        return f"{text}; summary: {self.path}" if self.path else text


def predict_bids(
    root: str | Path,
    output: str | Path,
    choice: ModelChoice | None = None,
    options: PredictionOptions | None = None,
    selection: BidsSelection | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> BidsSummary:
    """Predict the cases of the BIDS dataset ``root`` into the BIDS derivatives dataset ``output`` (module docstring).

    Args:
        root: the BIDS dataset (the folder holding ``dataset_description.json`` and ``sub-*``).
        output: the derivatives dataset (created if needed; e.g. ``root/derivatives/autoseg``); not ``root``.
        choice: the model (:class:`autoseg.api.predict.ModelChoice`).
        options: how to predict (:class:`autoseg.api.predict.PredictionOptions`); ``case_list`` and parts are not
            used (select with ``selection``). ``overwrite`` predicts complete cases again and replaces a
            ``dataset_description.json`` of another model.
        selection: subjects, filters and validation (:class:`BidsSelection`).
        log: receives each line about a subject not predicted, and :func:`predict`'s lines (a failed case, input
            checks) with the staged names replaced by the BIDS files; None: printed to stderr.

    Returns:
        What was written, skipped, failed and not predicted; also in ``OUTPUT/prediction_summary.json``.

    Raises:
        BidsDatasetError, MissingFileError, UsageError: see :func:`find_bids_cases`; ``output`` is ``root``; the
            options ask for a ``--list`` or parts.
        ExistingOutputError: ``output`` holds a dataset of another model or not of autoseg (see
            :func:`autoseg.api.bids_derivatives.check_description`).
        OutputPathError, DiskFullError, ValueError: see :func:`autoseg.api.predict.predict`.
    """
    options = options or PredictionOptions()
    log = log or _print_to_stderr
    root, output = Path(root), Path(output)
    if options.case_list is not None or options.num_parts != 1:
        raise UsageError("--bids selects cases with --participant-label and --bids-filter, not --list or parts")
    check_output_folder(output)
    if output.resolve() == root.resolve():
        raise UsageError(
            f"-o {output}: is the BIDS dataset itself; write the derivatives elsewhere, e.g. "
            f"{root / 'derivatives' / 'autoseg'}"
        )
    selection = selection or BidsSelection()
    layout = bids_layout(root, selection.validate)  # before the model is installed: a wrong folder fails at once
    model = describe_model(choice, options.checkpoint)
    cases, not_predicted = find_bids_cases(root, model.channels, selection, layout=layout)
    description = dataset_description(root, model)
    model_record = model_json(model)
    check_description(output / "dataset_description.json", description, options.overwrite)
    summary = BidsSummary(not_predicted=not_predicted)
    for problem in not_predicted:
        log(problem.line())
    to_predict = []
    for case in cases:
        if options.overwrite or not _complete(case, output, options):
            to_predict.append(case)
        else:
            summary.skipped.append(case.mask(output))
            summary.note(case, read_json(case.sidecar(output)))
    write_json(description, output / "dataset_description.json")
    if to_predict:
        _predict_staged(to_predict, output, choice, options, model_record, summary, log)
    write_tables(output)
    write_bidsignore(output, (SUMMARY_FILE, f"{STAGING}/"))
    summary.path = output / SUMMARY_FILE
    write_json(_summary_json(root, selection, model_record, summary), summary.path)
    return summary


def _complete(case: BidsCase, output: Path, options: PredictionOptions) -> bool:
    """Whether a case's derivatives exist: the sidecar is written last, so with it the mask (and maps) are whole."""
    needed = [case.mask(output), case.sidecar(output)]
    needed += [case.probseg(output)] if options.save_probabilities else []
    needed += [case.uncertainty(output)] if options.save_uncertainty else []
    return all(path.is_file() for path in needed)


def _predict_staged(
    cases: Sequence[BidsCase],
    output: Path,
    choice: ModelChoice | None,
    options: PredictionOptions,
    model: Mapping[str, Any],
    summary: BidsSummary,
    log: Callable[[str], None],
) -> None:
    """Link the cases' channel files under the names :func:`predict` reads (``CASE_0000.nii.gz``, ...), predict them
    into the staging folder (where an interrupted run's predictions are found again and skipped), and write each
    predicted case's derivatives."""
    staging = output / STAGING
    inputs, predictions = staging / "inputs", staging / "predictions"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    staged: dict[str, str] = {}
    for case in cases:
        for channel, source in enumerate(case.sources):
            link = inputs / f"{case.identifier}_{channel:04d}{split_ending(source)[1]}"
            link.symlink_to(os.path.abspath(source))
            staged[str(link)] = str(source)

    def source_names(line: str) -> str:
        for link, source in staged.items():
            line = line.replace(link, source)
        return line

    predict_options = dataclasses.replace(options, case_list=None, num_parts=1, part_id=0)
    result = predict(inputs, predictions, choice, predict_options, log=lambda line: log(source_names(line)))
    summary.failed += [
        CaseFailure(f.identifier, tuple(source_names(file) for file in f.files), source_names(f.problem))
        for f in result.failed
    ]
    # predicted now, or by an interrupted run whose predictions were found complete in the staging folder
    predicted = {split_ending(path)[0] for path in result.written} | set(result.skipped)
    for case in cases:
        if case.identifier in predicted:
            summary.note(case, write_derivatives(case, predictions, output, model, options))
            summary.written.append(case.mask(output))
    shutil.rmtree(staging)


def _summary_json(
    root: Path, selection: BidsSelection, model: Mapping[str, Any], summary: BidsSummary
) -> dict[str, Any]:
    """``prediction_summary.json`` of a BIDS run: the dataset, selection and model, then what happened."""
    output = summary.path.parent if summary.path else Path()
    return {
        "bids": str(root),
        "participants": None if selection.participants is None else list(selection.participants),
        "filters": {key: value for key, value in selection.filters.items()},
        "channel_filters": {key: dict(value) for key, value in selection.channel_filters.items()},
        "filter_file": None if selection.filter_file is None else str(selection.filter_file),
        "validate": selection.validate,
        "model": model,
        "counts": {
            "written": len(summary.written),
            "skipped": len(summary.skipped),
            "failed": len(summary.failed),
            "not_predicted": len(summary.not_predicted),
            "input_warnings": sum(bool(entry["input_warnings"]) for entry in summary.per_case.values()),
            "review": sum(entry["review"] for entry in summary.per_case.values()),
        },
        "written": [path.relative_to(output).as_posix() for path in summary.written],
        "skipped": [path.relative_to(output).as_posix() for path in summary.skipped],
        "failed": [{"case": f.identifier, "files": list(f.files), "problem": f.problem} for f in summary.failed],
        "not_predicted": [
            {
                "participant_id": f"sub-{p.subject}",
                "session_id": f"ses-{p.session}" if p.session else None,
                "problem": p.problem,
            }
            for p in summary.not_predicted
        ],
        "per_case": summary.per_case,
    }


def _print_to_stderr(line: str) -> None:
    """Print one line to stderr."""
    print(line, file=sys.stderr)
