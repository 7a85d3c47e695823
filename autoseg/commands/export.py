"""``autoseg_export``: write trained models into one zip file (see ``autoseg.api.model_files``)."""

from __future__ import annotations

import argparse

from autoseg.api.model_files import export_model
from autoseg.commands.common import run
from autoseg.paths import CHECKPOINT_CHOICES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_export",
        description="Write a dataset's trained members (plans, weights-only checkpoints, post-processing, a summary "
        "of the fingerprint, channels and labels, and a manifest with the SHA-256 of every file) into one "
        "zip, for autoseg_import or autoseg_predict -m on another machine.",
    )
    p.add_argument("-d", "--dataset", help="trained dataset (name, number or folder); default: the only trained one")
    p.add_argument("-o", "--output", required=True, help="the zip file to write, e.g. model.zip")
    p.add_argument(
        "-c",
        "--configurations",
        nargs="+",
        help="configurations to export (default: the members autoseg_find_best chose, else the plans' default)",
    )
    p.add_argument(
        "-tr", "--trainer", nargs="+", help="trainer folder(s) (default: the only one of each configuration)"
    )
    p.add_argument("-f", "--folds", nargs="+", help="folds to export (default: every fold with the checkpoint)")
    p.add_argument(
        "--checkpoint",
        default="final",
        choices=CHECKPOINT_CHOICES,
        help="final (default), best, or snapshots (every snapshot of each fold)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def action() -> None:
        exported = export_model(
            args.output, args.dataset, args.configurations, args.trainer, args.folds, args.checkpoint
        )
        manifest = exported.manifest
        folds = sum(len(folds) for folds in manifest["folds"].values())
        print(
            f"wrote {exported.path} ({exported.bytes / 1e6:.1f} MB): {manifest['dataset']}, "
            f"{' + '.join(manifest['members'])}, {folds} fold(s), {manifest['checkpoint']} checkpoint(s)"
        )

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
