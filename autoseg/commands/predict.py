"""``autoseg_predict``: segment new scans with trained models (see ``autoseg.api.predict``)."""

from __future__ import annotations

import argparse

from autoseg.api.bids import predict_bids
from autoseg.api.bids_inputs import BidsSelection, parse_filter, participant_labels
from autoseg.api.predict import TTA_CHOICES, PredictionOptions, predict
from autoseg.api.predict_models import ModelChoice
from autoseg.api.predict_report import review_page_path, write_review_page
from autoseg.commands.common import device, fraction, non_negative_int, positive_int, refuse_unused, run
from autoseg.io.files import check_output_file
from autoseg.paths import CHECKPOINT_CHOICES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_predict",
        description="Segment a folder of scans or one file with trained models; writes OUTPUT/CASE<ending> uint8 "
        "labels in the input's geometry. Names: for a one-channel model every file is one case (a final "
        "_0000 is dropped from its name; files X_0000, X_0001, ... are one multi-channel case and refused unless "
        "--one-case-per-file); for C channels the files form complete cases CASE_0000 ... "
        "CASE_{C-1} (documentation/dataset_format.md).",
    )
    p.add_argument("-i", "--input", help="folder of images, or one image file (or --bids)")
    p.add_argument("-o", "--output", required=True, help="folder for the predictions (created if needed)")
    p.add_argument(
        "-m",
        "--model",
        help="a model zip from autoseg_export: installed into AUTOSEG_RESULTS (an identical "
        "install is reused) and predicted with its own members and folds; "
        "no -d, -c, -tr or -f with it",
    )
    p.add_argument("-d", "--dataset", help="trained dataset (name, number or folder); default: the only trained one")
    p.add_argument(
        "-c",
        "--configurations",
        nargs="+",
        help="configurations to ensemble (default: the one(s) autoseg_find_best chose, else the only/default one)",
    )
    p.add_argument(
        "-tr",
        "--trainer",
        nargs="+",
        help="trainer folder(s); several are ensembled (default: the only one of each configuration)",
    )
    p.add_argument("-f", "--folds", nargs="+", help="folds to ensemble (default: every fold with the checkpoint)")
    p.add_argument(
        "--checkpoint",
        default="final",
        choices=CHECKPOINT_CHOICES,
        help="final (default), best, or snapshots (every snapshot of each fold)",
    )
    p.add_argument(
        "--step-size",
        type=fraction,
        default=None,
        help="sliding-window step, fraction of the patch (default: the plans' sliding_window_step, 0.5 as planned)",
    )
    p.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default="all",
        help="test-time mirroring: all (default; every flip of the planned mirror axes, 8 forward passes "
        "per window for 3 axes), lr (only the left-right flip, from the image's direction; 2) or "
        "none (1, fastest)",
    )
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none", help="same as --tta none")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE_probabilities.nii.gz")
    p.add_argument(
        "--save-uncertainty",
        action="store_true",
        help="also write CASE_uncertainty.nii.gz: the predictive entropy (bits, 0-1) of the ensemble's mean "
        "probability over members and mirrorings",
    )
    p.add_argument("--no-postprocessing", action="store_true", help="keep lesions of every size")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists again")
    p.add_argument("--num-parts", type=positive_int, default=1, help="split the sorted cases into this many parts (1)")
    p.add_argument("--part-id", type=non_negative_int, default=0, help="which part this process predicts (0-based)")
    p.add_argument(
        "--list",
        dest="case_list",
        metavar="FILE",
        help="text file of case identifiers to predict, one per line (# comments and blank lines "
        "ignored); split by --num-parts like all cases",
    )
    p.add_argument(
        "--one-case-per-file",
        action="store_true",
        help="every file is a separate scan, also files named like the channels of one case (X_0000, X_0001, ...), "
        "which a one-channel model otherwise refuses",
    )
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--report",
        action="store_true",
        help="also write OUTPUT/report.html (a part: report_part{i}of{K}.html), one self-contained review page: "
        "cases flagged for review first, volumes, QC scores, input warnings, overlays",
    )
    _add_bids_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Predict, print one summary line and return 0, or 1 when a case failed (after every other case was done)."""
    p = parser()
    args = p.parse_args(argv)
    if (args.input is None) == (args.bids is None):
        p.error("give the scans with exactly one of -i/--input and --bids")
    bids_only = ["participant_label", "bids_filter", "bids_filter_file", "skip_bids_validation"]
    refuse_unused(p, args, "input", bids_only, "they select the images of a BIDS dataset (--bids)")
    refuse_unused(p, args, "bids", ["case_list", "num_parts", "part_id"], "select with --participant-label")
    refuse_unused(p, args, "bids", ["report"], "the review page is written for -i runs (a BIDS run has lesions.tsv)")

    def action() -> int:
        choice = ModelChoice(
            dataset=args.dataset,
            configurations=args.configurations,
            trainers=args.trainer,
            folds=args.folds,
            model_file=args.model,
        )
        options = PredictionOptions(
            checkpoint=args.checkpoint,
            step_size=args.step_size,
            tta=args.tta,
            postprocessing=not args.no_postprocessing,
            device=args.device,
            progress=not args.no_progress,
            save_probabilities=args.save_probabilities,
            save_uncertainty=args.save_uncertainty,
            overwrite=args.overwrite,
            num_parts=args.num_parts,
            part_id=args.part_id,
            case_list=args.case_list,
            one_case_per_file=args.one_case_per_file,
        )
        if args.bids:
            return _predict_bids(args, choice, options)
        page = review_page_path(args.output, args.num_parts, args.part_id) if args.report else None
        if page is not None:  # refused before anything is predicted
            check_output_file(page, "review page (--report)")
        summary = predict(args.input, args.output, choice, options)
        print(summary.line())
        if page is not None:
            print(f"review page: {write_review_page(args.output, summary.path, page, progress=not args.no_progress)}")
        return 1 if summary.failed else 0

    return run(action)


def _add_bids_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``--bids`` (BIDS datasets in, BIDS derivatives out; ``autoseg.api.bids``)."""
    bids = p.add_argument_group(
        "BIDS",
        "--bids ROOT reads a BIDS dataset with pybids (each model channel found by its suffix: T1/T1w -> T1w, "
        "FLAIR -> FLAIR, DWI -> dwi, ADC -> ADC, other names as written) and writes a BIDS derivatives dataset to -o "
        "(sub-X[_ses-Y]_space-orig_desc-lesion_mask.nii.gz, JSON sidecars, lesions.tsv, lesion_table.tsv). A subject "
        "that cannot be predicted gets one line; the exit code is 1 only when no mask could be predicted.",
    )
    bids.add_argument("--bids", metavar="ROOT", help="a BIDS dataset (holding dataset_description.json and sub-*)")
    bids.add_argument(
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="subjects to predict, with or without 'sub-' (default: every subject)",
    )
    bids.add_argument(
        "--bids-filter",
        action="append",
        metavar="KEY=VALUE",
        help="keep images whose entity KEY (session, acquisition, run, ... or ses, acq) is VALUE; KEY= for images "
        "without it, KEY=* for images with it; repeat for several",
    )
    bids.add_argument(
        "--bids-filter-file",
        metavar="FILE",
        help='JSON: entity filters for every channel, and per model channel, e.g. {"session": "1", "DWI": '
        '{"suffix": "dwi", "acquisition": "tra"}}; null: entity absent',
    )
    bids.add_argument(
        "--skip-bids-validation",
        action="store_true",
        help="also read files whose names are not valid BIDS (e.g. ISLES 2022's *_adc.nii.gz)",
    )


def _predict_bids(args: argparse.Namespace, choice: ModelChoice, options: PredictionOptions) -> int:
    """``--bids``: predict, print one summary line; 1 when no mask could be predicted, else 0."""
    selection = BidsSelection(
        participants=participant_labels(args.participant_label),
        filters=dict(parse_filter(text) for text in args.bids_filter or []),
        filter_file=args.bids_filter_file,
        validate=not args.skip_bids_validation,
    )
    summary = predict_bids(args.bids, args.output, choice, options, selection)
    print(summary.line())
    return 1 if summary.nothing_predicted else 0


if __name__ == "__main__":
    raise SystemExit(main())
