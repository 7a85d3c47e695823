"""``autoseg_convert``: a public stroke dataset, as downloaded, into a raw dataset in AUTOSEG_RAW."""

from __future__ import annotations

import argparse
from pathlib import Path

from autoseg.commands.common import int_range, run
from autoseg.data.converters import CONVERTERS, convert


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_convert",
        description="Convert a public stroke dataset in its own folder layout into AUTOSEG_RAW/DatasetNNN_NAME "
        "(nnU-Net v2 raw format). Nothing is downloaded; the whole tree is checked before anything "
        "is written. One page per dataset in documentation/datasets/.",
    )
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("source", type=Path, metavar="SRC", help="the release's top folder, as unpacked")
    shared.add_argument("-d", "--dataset", required=True, metavar="NAME", help="dataset name, e.g. ATLAS")
    shared.add_argument(
        "--id",
        type=int_range(0, 999),
        metavar="NNN",
        help="dataset number (default: the lowest free one under AUTOSEG_RAW)",
    )
    shared.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset of that name (once the new one is complete)",
    )
    shared.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="DATASET")
    for name, converter in CONVERTERS.items():
        kind = kinds.add_parser(name, parents=[shared], help=converter.summary, description=converter.summary)
        if name == "isles18":
            kind.add_argument(
                "--slabs",
                type=Path,
                metavar="FILE",
                help="text file pairing cases with the challenge's patient names "
                "(e.g. 'Train_40_A = case 64'), so slabs of one patient form one subject",
            )
        if name == "isles22":
            kind.add_argument(
                "--no-flair",
                action="store_true",
                help="leave FLAIR out (default: FLAIR is rigidly registered onto DWI and resampled onto its grid, "
                "and the dataset declares coregister_channels so prediction does the same to new scans)",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = {}  # the reader's own options
    if args.kind == "isles18":
        options = {"slabs": args.slabs}
    elif args.kind == "isles22":
        options = {"flair": not args.no_flair}

    def action() -> None:
        result = convert(args.kind, args.source, args.dataset, args.id, args.overwrite, not args.no_progress, **options)
        found = result.source
        subjects = len({case.subject for case in found.training})
        print(
            f"wrote {result.folder}: {len(found.training)} training case(s) of {subjects} subject(s), "
            f"{len(found.test)} test case(s); channels {', '.join(found.channel_names)}"
        )
        for note in result.notes():
            print(f"note: {note}")
        print(f"next: autoseg_plan -d {result.folder.name}")

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
