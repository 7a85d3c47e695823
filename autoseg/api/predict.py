"""``autoseg_predict`` as a library: segment new scans with trained models.

A model is ``AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>/`` as training leaves it: the
plans the run was trained with (``plans.json``) and its checkpoints. :func:`predict`:

1. chooses the dataset (``-d``; when omitted, the only trained dataset) and the members and folds, and loads their
   networks (:mod:`autoseg.api.predict_models`: a model file's own members, else ``-c`` times ``-tr``, else what
   ``autoseg_find_best`` chose, else the default configuration; ``-f`` or every fold);
2. takes the post-processing and QC calibration tuned for exactly those members, else the plans' and none;
3. per case: reads the channels (a channel on another grid than channel 0 registered onto it when the plans record
   ``coregister_channels``, ``autoseg.data.coregistration``; else such a case fails), predicts each configuration on its own preprocessing (mean over folds and
   checkpoints), restores every configuration's probabilities to the input grid, averages them, post-processes
   and writes ``OUTPUT/CASE<ending>`` (the labels ``dataset.json`` declared: 0/1, or 0/255, ...; uint8 when every
   declared value fits, else the smallest integer type that holds them, ``autoseg.labels``) and, when asked,
   ``OUTPUT/CASE_probabilities.nii.gz`` (float32 lesion probability). Cases are read in the canonical orientation (``autoseg.io.images.read_image``) and
   both outputs are written back in channel 0's own orientation with its exact header (``autoseg.io.images.write_like``:
   for NIfTI both qform and sform as given), so they overlay the input in every viewer.

The call: ``predict(source, output, ModelChoice(...), PredictionOptions(...))``: :class:`ModelChoice` names the
members (``-d``, ``-c``, ``-tr``, ``-f``, ``-m``), :class:`PredictionOptions` how to predict and what to write (every
other flag of ``autoseg_predict``, one field each).

Speed: ``tta`` chooses the test-time mirroring (``all``: every flip combination of the configuration's mirror
axes, 8 forward passes per window for three axes; ``lr``: the left-right flip only, 2; ``none``: 1). On the CPU
the networks run under bf16 autocast where the CPU computes bf16 natively (``autoseg.machine.choose_precision``)
and in the memory format ``autoseg.infer.sliding_window.inference_memory_format`` chose.

Memory: besides the networks and their activations, a case holds its channels, one float32 probability map per
label on the input grid (the configurations' maps are summed into it in place) and the label map; while a network
predicts, also one float32 map per mirroring on the network's grid (the views the QC score's agreement is measured
on, ``autoseg.infer.quality``: 8 with ``tta="all"`` over three axes) and one boolean mask per network.

Post-processing (threshold, minimum lesion size) comes from ``AUTOSEG_RESULTS/<dataset>/postprocessing.json``
when it was tuned for exactly the members being ensembled, else from the first configuration's plans.

Inputs: a folder of image files, or a single file, named by one rule (:func:`autoseg.data.dataset.cases_from_files`,
``documentation/dataset_format.md``): for a one-channel model every file is one case, named without its ending and
without a final ``_0000``; for a model with C channels the files form complete cases ``CASE_0000`` ...
``CASE_{C-1}``, and any other file set is an error that lists the offending files and the names expected. Files
that form a multi-channel set (``X_0000``, ``X_0001``, ...) given to a one-channel model are refused unless
``one_case_per_file`` says they are separate scans.

Input checks (``autoseg.api.input_checks``): before it is predicted, each case is compared with the model's training
ranges (spacing, size, orientation, foreground intensities per channel, channel names); a case outside them is
predicted all the same, with one line per measure, and its warnings go into the summary (``input_warnings``).

Outputs never overwrite inputs: before anything is written, :func:`check_outputs` refuses a run whose outputs (the
data file of a ``.mhd``/``.nhdr`` label file and the summary included) would be an input file (``-i DIR -o DIR``
with plain-named scans) or would be the same file for two cases (``a``'s probability map is ``a_probabilities``'s
label file).

Cohorts: ``case_list`` (``--list FILE``) restricts the cases to those a text file names (:func:`read_case_list`),
and ``num_parts``/``part_id`` split them into interleaved parts, one per process or array job. Every output is
written under a temporary name and renamed, so a case whose outputs exist is complete and a re-run skips it; the
temporary files a killed run left behind are removed as their case comes up. A case that cannot be read or
predicted (:data:`CASE_ERRORS`: unreadable or truncated file, not 3-D, a header autoseg refuses
(``autoseg.io.headers.check_header``), NaN/Inf voxels, channels on different grids (without co-registration) or a channel whose registration fails,
an empty image, not enough memory) is reported in one line and skipped; the others go on. At the end :func:`predict` writes what it
wrote, skipped and what failed to ``OUTPUT/prediction_summary.json`` (``prediction_summary_part{i}of{K}.json`` for
part i of K) and returns it as a :class:`PredictionSummary`. Nothing of a case is kept once it is written, so
memory stays flat over any number of cases (``documentation/benchmarks.md``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoseg.api.input_checks import InputChecks, TrainingReference
from autoseg.api.predict_inputs import InputCase, find_input_cases, read_case, read_case_list, select_cases
from autoseg.api.predict_models import (
    ModelChoice,
    calibration_for,
    install_model_file,
    load_members,
    postprocessing_for,
)
from autoseg.api.predict_outputs import (
    SUMMARY_FILE,
    CaseFailure,
    CaseOutputs,
    PredictionSummary,
    case_failure,
    check_outputs,
    output_files,
    summary_path,
    write_lesion_tables,
)
from autoseg.errors import AutosegError, UsageError
from autoseg.infer.lesions import head_midline, lesion_report, symmetry_midline
from autoseg.infer.postprocessing import postprocess_probabilities
from autoseg.infer.predictor import Predictor
from autoseg.infer.quality import (
    DEFAULT_REVIEW_THRESHOLD,
    AgreementCounter,
    QCCalibration,
    QualityComponents,
    TrainingVolumes,
    assess,
    predictive_entropy,
    qc_score,
)
from autoseg.infer.sliding_window import TTA_CHOICES
from autoseg.io.files import DiskFullError, check_output_folder, read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import remove_stale_temporaries, write_like
from autoseg.labels import values_from_classes
from autoseg.machine import choose_device, choose_precision
from autoseg.paths import (
    choose_dataset,
)
from autoseg.preprocess.preprocessing import preprocess_arrays, restore_probabilities

__all__ = [
    "CASE_ERRORS",
    "SUMMARY_FILE",
    "TTA_CHOICES",
    "CaseFailure",
    "InputCase",
    "ModelChoice",
    "PredictionOptions",
    "PredictionSummary",
    "check_outputs",
    "find_input_cases",
    "predict",
    "read_case_list",
    "select_cases",
    "summary_path",
]

#: Errors that fail one case and not the run: every user-facing error (:class:`AutosegError`: the input cannot be
#: read (:class:`ImageReadError`, also for a file that is not 3-D), its header declares what autoseg does not read
#: (:class:`autoseg.io.headers.ImageHeaderError`: too many voxels for this machine, more voxel bytes than the file holds, a
#: voxel size outside 0.001-100 mm), or it is not what a model takes (:class:`DataError`: NaN/Inf voxels, channels
#: on different grids, an empty image, too many voxels at the plan's spacing)), a file that went missing or cannot
#: be read (``OSError``) and a case that needs more memory than there is (``MemoryError``: the case's arrays are
#: freed with it, so the next case starts afresh). A full disk (:class:`DiskFullError`) ends the run, and anything
#: else (a bug) surfaces with its traceback.
CASE_ERRORS = (AutosegError, OSError, MemoryError)


def _choose_device(device: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and its autocast dtype: bf16/fp16 on CUDA, bf16 on a CPU with native bf16, else None (fp32)."""
    chosen, _ = choose_device(device)
    return chosen, choose_precision(chosen).autocast_dtype


@dataclass(frozen=True)
class PredictionOptions:
    """How :func:`predict` predicts and what it writes (flags, never written into the plans).

    Args:
        checkpoint: ``final`` (default), ``best`` or ``snapshots``.
        step_size: sliding-window step as a fraction of the patch; None (default): each configuration's
            ``sliding_window_step`` from its plans.
        tta: test-time mirroring: ``all`` (default; every flip combination of the configuration's mirror axes),
            ``lr`` (only the flip along the image's left-right axis, from its direction matrix; no mirroring, with a
            one-line notice, when the configuration does not mirror that axis) or ``none``.
        use_mirroring: False is the older spelling of ``tta="none"``. Default True.
        postprocessing: remove lesions below the tuned (or planned) minimum size; False keeps every component
            (the threshold still applies). Default True.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar over cases.
        save_probabilities: also write the float32 lesion probability (channel 0; with several labels the
            maximum over them). Default False.
        save_uncertainty: also write ``CASE_uncertainty.nii.gz``, the float32 predictive entropy in bits of the
            ensemble's mean lesion probability (``autoseg.infer.quality``). Default False.
        overwrite: predict cases whose outputs exist again. Default False: a case whose label file (and, with
            ``save_probabilities``, probability map) exists is complete, because both are written atomically, and
            is skipped; so a killed run re-run with the same arguments predicts only what is missing.
        num_parts, part_id: predict only the ``part_id``-th of ``num_parts`` interleaved parts of the sorted cases
            (after ``case_list``), e.g. one part per job of a cluster array job.
        case_list: text file naming the cases to predict, one identifier per line (:func:`select_cases`); None:
            every case of the input.
        one_case_per_file: every input file is a separate scan, also files named like the channels of one case
            (``X_0000``, ``X_0001``, ...), which a one-channel model otherwise refuses (:func:`find_input_cases`).
            Default False.

    Raises:
        UsageError: an unknown ``tta``, or a part that does not exist.
    """

    checkpoint: str = "final"
    step_size: float | None = None
    tta: str = "all"
    use_mirroring: bool = True
    postprocessing: bool = True
    device: str = "auto"
    progress: bool = True
    save_probabilities: bool = False
    save_uncertainty: bool = False
    overwrite: bool = False
    num_parts: int = 1
    part_id: int = 0
    case_list: str | Path | None = None
    one_case_per_file: bool = False

    def __post_init__(self) -> None:
        if self.tta not in TTA_CHOICES:
            raise UsageError(f"unknown --tta '{self.tta}', use one of {list(TTA_CHOICES)}")
        if self.num_parts < 1:
            raise UsageError(f"--num-parts must be at least 1, got {self.num_parts}")
        if not 0 <= self.part_id < self.num_parts:
            raise UsageError(
                f"--part-id must lie in 0..{self.num_parts - 1} for --num-parts {self.num_parts}, got {self.part_id}"
            )


def predict(
    source: str | Path,
    output: str | Path,
    choice: ModelChoice | None = None,
    options: PredictionOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> PredictionSummary:
    """Segment every case of ``source`` into ``output`` (see the module docstring).

    Args:
        source: folder of images (dataset naming or plain single-channel names) or one image file.
        output: folder for ``CASE<ending>`` (the declared label values) and ``CASE_probabilities.nii.gz``; created if needed.
        choice: the members to ensemble (:class:`ModelChoice`); None: the only trained dataset's default ones.
        options: how to predict and what to write (:class:`PredictionOptions`); None: the defaults.
        log: receives each failed case's line (:meth:`CaseFailure.line`) as it happens; None: printed to stderr.

    Returns:
        What was written, skipped and failed; also written to :func:`summary_path` in ``output``.

    Example:
        >>> predict("scans/", "labels/", ModelChoice(dataset="ATLAS", folds=[0]), PredictionOptions(tta="none"))

    Raises:
        ValueError: see :func:`choose_dataset`, :func:`load_model`, :func:`find_input_cases`, :func:`select_cases`;
            a model file with members named, or refused (:class:`autoseg.api.model_files.ModelFileError`); outputs that
            would overwrite an input or one another (:func:`check_outputs`).
        OutputPathError: ``output`` (or an output file) is a file where a folder is needed or the reverse, or
            read-only (:func:`autoseg.io.files.check_output_folder`). Errors of a single case (:data:`CASE_ERRORS`) are reported and skipped instead.
        DiskFullError: the output's disk is full (the case being written is left without outputs).
    """
    choice, options = choice or ModelChoice(), options or PredictionOptions()
    check_output_folder(output)
    installed = install_model_file(choice, options.checkpoint) if choice.model_file else None
    name = installed.dataset if installed else choose_dataset(choice.dataset)
    torch_device, autocast_dtype = _choose_device(options.device)
    models = load_members(name, installed, choice, options.checkpoint, torch_device)
    channels = models[0].plans.channels
    inputs = find_input_cases(
        source, len(channels), one_case_per_file=options.one_case_per_file, channel_names=channels
    )
    cases = inputs if options.case_list is None else select_cases(inputs, options.case_list)
    summary_file = summary_path(output, options.num_parts, options.part_id)
    check_outputs(inputs, cases, output, options.save_probabilities, summary_file, options.save_uncertainty)
    cases = cases[options.part_id :: options.num_parts]
    threshold, min_lesion_mm3, _ = postprocessing_for(name, models)
    if not options.postprocessing:
        min_lesion_mm3 = 0.0
    coregister = models[0].plans.coregister_channels  # the members agree (load_members)
    checks = InputChecks.load(name, channels, log or _print_to_stderr)  # compared with the training cases, per case
    settings = _CaseSettings(
        threshold, min_lesion_mm3, models[0].plans.labels, calibration_for(name, models), checks, coregister
    )
    predictors = [
        Predictor(
            model.plans.configuration(model.configuration),
            model.networks,
            step_size=options.step_size,
            tta=options.tta,
            use_mirroring=options.use_mirroring,
            device=torch_device,
            autocast_dtype=autocast_dtype,
        )
        for model in models
    ]
    summary = PredictionSummary(cases=len(cases), input_checks=checks.to_json())
    for case in tqdm(cases, desc="predict", unit="case", disable=not options.progress):
        _predict_or_skip(
            case,
            output_files(Path(output), case, options.save_probabilities, options.save_uncertainty),
            predictors,
            settings,
            options.overwrite,
            summary,
            log or _print_to_stderr,
        )
    reports = [output_files(Path(output), case, False).report for case in cases if case.identifier in summary.per_case]
    write_lesion_tables(reports, Path(output), options.num_parts, options.part_id)
    summary.path = summary_file
    run = {
        "input": str(source),
        "list": None if options.case_list is None else str(options.case_list),
        "part": {"id": options.part_id, "of": options.num_parts},
    }
    write_json({**run, **summary.to_json()}, summary.path)
    return summary


@dataclass(frozen=True)
class _CaseSettings:
    """What every case of a run is checked, post-processed and judged by: threshold, minimum lesion size (mm³), the
    declared labels, the QC calibration of exactly the members predicted (None: :data:`DEFAULT_REVIEW_THRESHOLD`),
    the input checks, whose training ranges also hold the training cases' lesion volumes, and whether channels on
    another grid are registered onto channel 0 (the plans' ``coregister_channels``)."""

    threshold: float
    min_lesion_mm3: float
    labels: Mapping[str, int]
    calibration: QCCalibration | None
    checks: InputChecks
    coregister: bool = False

    @property
    def review_threshold(self) -> float:
        return DEFAULT_REVIEW_THRESHOLD if self.calibration is None else self.calibration.threshold

    @property
    def training(self) -> TrainingVolumes | None:
        return training_volumes(self.checks.reference)


def training_volumes(reference: TrainingReference) -> TrainingVolumes | None:
    """The training cases' lesion volumes from what a model knows of them (``autoseg.api.input_checks``); None
    without training ranges."""
    ranges = reference.ranges
    return None if ranges is None else TrainingVolumes.from_ranges(ranges.lesion_count, ranges.lesion_volume_ml)


def _predict_or_skip(
    case: InputCase,
    targets: CaseOutputs,
    predictors: Sequence[Predictor],
    settings: _CaseSettings,
    overwrite: bool,
    summary: PredictionSummary,
    log: Callable[[str], None],
) -> None:
    """Predict one case into ``targets`` and note it in ``summary`` as written, skipped (its outputs exist: they are
    written atomically, the lesion report last, so they are whole) or failed (:data:`CASE_ERRORS`, logged in one
    line); its stale temporaries from a killed run are removed first.

    Raises:
        DiskFullError: the disk is full (the run ends).
    """
    summary.stale_temporaries += sum(len(remove_stale_temporaries(path)) for path in targets.paths())
    if not overwrite and all(path.exists() for path in targets.paths()):
        summary.skipped.append(case.identifier)
        summary.per_case[case.identifier] = _case_entry(read_json(targets.report))
        return
    try:
        report = _predict_case(case, targets, predictors, settings)
    except DiskFullError:
        raise
    except CASE_ERRORS as error:
        failure = case_failure(case, error)
        summary.failed.append(failure)
        log(failure.line())
        return
    summary.written.append(targets.labels)
    summary.per_case[case.identifier] = _case_entry(report)


def _case_entry(report: Mapping[str, Any]) -> dict[str, Any]:
    """A case's entry in ``prediction_summary.json``'s ``per_case``, from its lesion report."""
    qc = report.get("qc", {})
    return {
        "lesion_count": report.get("lesion_count"),
        "total_volume_ml": report.get("total_volume_ml"),
        "qc_score": qc.get("score"),
        "review": qc.get("review"),
        "review_reasons": qc.get("reasons", []),
        "input_warnings": report.get("input_warnings", []),
    }


def _predict_case(
    case: InputCase,
    targets: CaseOutputs,
    predictors: Sequence[Predictor],
    settings: _CaseSettings,
) -> dict[str, Any]:
    """Read, predict, post-process, judge and write one case; returns its lesion report.

    The maps asked for are written first, then the labels, then the lesion report (``CASE_lesions.json``), so an
    existing report means the case is complete. Nothing of the case is kept afterwards. The label file holds the
    declared values of the plans' ``labels`` (``dataset.json``'s), in the smallest integer type that holds them all
    (``autoseg.labels.values_from_classes``). With the plans' ``coregister_channels`` a channel on another grid than
    channel 0 is registered onto it first (:func:`read_case`); outputs lie on channel 0's grid."""
    images, geometry = read_case(case, settings.coregister)
    warnings = settings.checks.check(case, images, geometry)
    agreement = AgreementCounter(settings.threshold)
    probabilities, mirror_fit = _ensemble(predictors, images, geometry, agreement)
    midline = symmetry_midline(mirror_fit) or head_midline(images[0], geometry)
    del images
    classes = postprocess_probabilities(probabilities, geometry.spacing, settings.threshold, settings.min_lesion_mm3)
    lesion = probabilities[0] if len(probabilities) == 1 else probabilities.max(axis=0)
    del probabilities
    entropy = predictive_entropy(lesion)
    if targets.probabilities is not None:
        write_like(lesion, geometry, targets.probabilities, case.images[0])
    if targets.uncertainty is not None:
        write_like(entropy, geometry, targets.uncertainty, case.images[0])
    write_like(values_from_classes(classes, settings.labels), geometry, targets.labels, case.images[0])
    lesions = lesion_report(classes, geometry, case.images[0], settings.labels, lesion, midline)
    components = assess(
        classes > 0,
        entropy,
        lesions.voxel_volume_ml,
        settings.training,
        agreement.member_agreement(),
        agreement.mirroring_agreement(),
        agreement.members,
        agreement.mirrorings,
    )
    del lesion, entropy, classes
    report = {
        "case": case.identifier,
        "files": [str(path.resolve()) for path in case.images],
        "mask": targets.labels.name,
        "probabilities": None if targets.probabilities is None else targets.probabilities.name,
        "uncertainty": None if targets.uncertainty is None else targets.uncertainty.name,
        **lesions.to_json(),
        "qc": _judge(components, lesions.total_volume_ml, lesions.lesion_count, warnings, settings),
        "input_warnings": warnings,
    }
    write_json(report, targets.report)
    return report


def _judge(
    components: QualityComponents, total_ml: float, count: int, warnings: Sequence[str], settings: _CaseSettings
) -> dict[str, Any]:
    """The ``qc`` entry of a lesion report: score, review flag and its reasons, the components, the threshold and
    where it came from, and the expected Dice when calibrated."""
    score = qc_score(components)
    threshold = settings.review_threshold
    reasons = []
    if score < threshold:
        origin = (
            f"calibrated on {settings.calibration.cases} cross-validation cases"
            if settings.calibration
            else "uncalibrated default; run autoseg_find_best to calibrate"
        )
        reasons.append(f"QC score {score:.2f} below the review threshold {threshold:.2f} ({origin})")
    training = settings.training
    if training is not None and components.volume_plausibility is not None and components.volume_plausibility < 1:
        if count == 0:
            reasons.append("no lesion found, but every training case had one")
        else:
            reasons.append(f"total lesion volume {total_ml:.3g} ml outside the training range {training.describe()}")
    if warnings:
        reasons.append(f"input outside the training range ({len(warnings)} measure(s), see input_warnings)")
    return {
        "score": score,
        "review": bool(reasons),
        "reasons": reasons,
        "components": components.to_json(),
        "threshold": threshold,
        "calibrated": settings.calibration is not None,
        "expected_dice": None if settings.calibration is None else settings.calibration.expected(score),
    }


def _print_to_stderr(line: str) -> None:
    """Print a line to stderr without breaking a progress bar."""
    tqdm.write(line, file=sys.stderr)


def _ensemble(
    predictors: Sequence[Predictor], images: np.ndarray, geometry: Geometry, agreement: AgreementCounter
) -> tuple[np.ndarray, Any]:
    """Mean over configurations of their (K, X, Y, Z) float32 probabilities on the input grid, summed in place
    (one full-size map at a time besides the one being restored), and the first symmetry fit found (or None).
    ``agreement`` receives every member's views and every configuration's restored lesion probability."""
    total: np.ndarray | None = None
    mirror_fit = None
    for predictor in predictors:
        data, _, properties = preprocess_arrays(images, None, geometry, predictor.configuration)
        probabilities = predictor.predict_preprocessed(data, geometry.direction, agreement)
        del data
        restored = restore_probabilities(probabilities, properties)
        del probabilities
        mirror_fit = mirror_fit or properties.symmetry
        agreement.end_configuration(restored.max(axis=0) if len(predictors) > 1 else None)
        if total is None:
            total = restored
        else:
            total += restored  # every member is restored to the same input grid
        del restored
    if len(predictors) > 1:
        total /= len(predictors)
    return total, mirror_fit
