"""``autoseg_evaluate``: evaluate a folder of predictions against a folder of references.

Argument parsing only; the work is :func:`autoseg.evaluate.evaluation.evaluate_folders` and, with ``--report``,
:func:`autoseg.evaluate.report.write_report`. Example::

    autoseg_evaluate -ref labelsTs -pred predictions -o predictions/evaluation -np 8 --report --images imagesTs
    autoseg_evaluate -ref labelsTs -pred predictions -o predictions/atlas2 --protocol atlas2   # ATLAS R2.0's scorer
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autoseg.commands.common import non_negative_int, positive_int, run, seed
from autoseg.evaluate.evaluation import OUTPUT_NAMES, evaluate_folders, format_summary_table
from autoseg.evaluate.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from autoseg.evaluate.report import REPORT_NAME, find_case_images, write_report
from autoseg.io.files import check_output_file, check_output_folder

PROGRAM = "autoseg_evaluate"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``autoseg_evaluate``."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Compare predicted lesion masks with reference masks case by case (same file names) and "
        f"write {', '.join(OUTPUT_NAMES.values())} to the output folder.",
    )
    parser.add_argument("-ref", "--reference", required=True, help="folder of reference label maps")
    parser.add_argument("-pred", "--prediction", required=True, help="folder of predicted label maps")
    parser.add_argument("-o", "--output", required=True, help="folder for the report files (created if needed)")
    parser.add_argument(
        "--probabilities", default=None, help="optional folder of lesion probability maps (same names); adds mDSC"
    )
    parser.add_argument(
        "--label",
        type=int,
        default=1,
        help="lesion label; masks are label == LABEL (default 1). A mask whose non-zero values include no LABEL "
        "(e.g. one stored as 0/255) is refused, naming the file and its values",
    )
    parser.add_argument(
        "--binarize",
        action="store_true",
        help="count every non-zero voxel as lesion, whatever its value (e.g. masks stored as 0/255); --label is "
        "then not used",
    )
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="which evaluation to reproduce: autoseg (default: autoseg's metrics, 26-connected lesions, volumes in "
        "mm³), isles22 (the ISLES 2022 challenge's code: Dice, |volume diff.| in ml, |lesion count diff.|, lesion F1, "
        "26-connected lesions) or atlas2 (the ATLAS R2.0 challenge's code: the same metrics with 6-connected lesions "
        "and the volume difference in voxels); see documentation/evaluation.md",
    )
    parser.add_argument(
        "--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)"
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--report",
        action="store_true",
        help=f"also write {REPORT_NAME}: one self-contained page of the results, an overlay per case, worst Dice first",
    )
    parser.add_argument(
        "--images",
        default=None,
        help="with --report: folder of the images (CASE_0000 or CASE, same grid as the "
        "references) drawn behind the outlines; without it they are drawn on black",
    )
    parser.add_argument("-np", "--num-workers", type=positive_int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; print the summary table and output paths. Returns 0, or 1 on an input error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is not None and not args.report:
        parser.error("--images is only used with --report")
    if args.probabilities is not None and PROTOCOLS[args.protocol].is_challenge:
        parser.error(
            f"--probabilities adds mDSC, which is no metric of the {args.protocol} protocol; use --protocol autoseg"
        )

    def action() -> int:
        if args.report:  # fail before anything is written
            check_output_folder(args.output)
            check_output_file(Path(args.output) / REPORT_NAME, "results page (--report)")
            if args.images is not None:
                find_case_images(args.images, args.reference)
        result = evaluate_folders(
            reference_dir=args.reference,
            prediction_dir=args.prediction,
            output_dir=args.output,
            probabilities_dir=args.probabilities,
            label=args.label,
            binarize=args.binarize,
            protocol=args.protocol,
            num_bootstrap=args.bootstrap,
            seed=args.seed,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
        print(format_summary_table(result))
        print()
        for path in result.output_files.values():
            print(f"wrote {path}")
        if args.report:
            page = write_report(
                args.output,
                images_dir=args.images,
                reference_dir=args.reference,
                prediction_dir=args.prediction,
                num_workers=args.num_workers,
                progress=not args.no_progress,
            )
            print(f"wrote {page}  (results page: open it in a browser)")
        return 0

    # EvaluationError is a ValueError: run() prints it as one "error: ..." line and returns 1.
    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
