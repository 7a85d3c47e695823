"""``autoseg_import``: check a model file from ``autoseg_export`` and install it into ``AUTOSEG_RESULTS``
(see ``autoseg.api.model_files``)."""

from __future__ import annotations

import argparse

from autoseg.api.model_files import import_model
from autoseg.commands.common import run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_import",
        description="Check a model zip written by autoseg_export (manifest version, SHA-256 of every entry, no path "
        "leaving the target folder, checkpoints of tensors only) and install it into "
        "AUTOSEG_RESULTS/<dataset>/; a refused zip leaves nothing behind.",
    )
    p.add_argument("model", help="the zip file written by autoseg_export")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace installed fold folders and files of the same dataset, configuration, trainer and "
        "fold that differ (default: refuse)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def action() -> None:
        installed = import_model(args.model, overwrite=args.overwrite)
        members = " + ".join("/".join(member) for member in installed.members)
        verb = "already installed, identical" if installed.reused else "installed"
        print(
            f"{verb}: {members} of {installed.dataset} in {installed.folder}; predict with "
            f"autoseg_predict -d {installed.dataset} -i INPUT -o OUTPUT (or -m {args.model})"
        )

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
