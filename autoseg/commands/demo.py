"""``autoseg_demo``: generate the synthetic demo datasets into AUTOSEG_RAW (nothing is downloaded)."""

from __future__ import annotations

import argparse

from autoseg.commands.common import positive_int, refuse_unused, run, seed
from autoseg.data.dataset import staged_dataset
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.data.demo.ctp import make_ctp_like
from autoseg.paths import raw_folder

#: Default dataset folder per kind and resolution.
DEFAULT_NAMES = {
    ("atlas", 1.0, False): "Dataset001_ATLAS",
    ("atlas", 2.0, False): "Dataset002_ATLAS2mm",
    ("ctp", None, False): "Dataset003_CTP",
    ("atlas", None, True): "Dataset901_ATLASTiny",
    ("ctp", None, True): "Dataset903_CTPTiny",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_demo",
        description="Write a synthetic, deterministic demo dataset in nnU-Net v2 raw format into AUTOSEG_RAW.",
    )
    p.add_argument(
        "kind",
        choices=["atlas", "ctp"],
        help="atlas: chronic stroke T1w on the MNI152 2009 template; ctp: 5-channel CT perfusion slabs",
    )
    p.add_argument("-n", "--cases", type=positive_int, default=20, help="cases (atlas) or subjects (ctp); default 20")
    p.add_argument("--spacing", type=float, default=1.0, choices=[1.0, 2.0], help="atlas voxel size in mm")
    p.add_argument("--tiny", action="store_true", help="tiny volumes (~48 voxels per side) for tests")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--name", help="dataset folder name (default: Dataset001_ATLAS, Dataset002_ATLAS2mm, Dataset003_CTP)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    return p


def default_name(kind: str, spacing: float, tiny: bool) -> str:
    return DEFAULT_NAMES[(kind, None if tiny or kind == "ctp" else spacing, tiny)]


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    refuse_unused(p, args, "tiny", ["spacing"], "tiny cases have 3.5 mm voxels")
    if args.kind == "ctp" and args.spacing != p.get_default("spacing"):
        p.error("--spacing has no effect with ctp: it sets the voxel size of atlas cases")

    def action() -> None:
        target = raw_folder(args.name or default_name(args.kind, args.spacing, args.tiny))
        with staged_dataset(target, args.overwrite) as folder:
            if args.kind == "atlas":
                make_atlas_like(folder, args.cases, args.seed, args.spacing, args.tiny)
            else:
                make_ctp_like(folder, args.cases, args.seed, args.tiny)
        print(f"wrote {target}")
        print(f"next: autoseg_plan -d {target.name}")

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
