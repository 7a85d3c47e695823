"""Summarize tools/ctp_benchmark.sh: per-fold validation Dice of every variant, plus the focal + cross-entropy
ensemble of the pre-trained PSPNets (mean of their validation probabilities, as ``autoseg_predict -tr A B``).

Usage: python tools/ctp_benchmark_summary.py BENCHMARK_FOLDER --raw RAW_DATASET_FOLDER

Writes BENCHMARK_FOLDER/summary.json and summary.md (a Markdown table shaped like the CTP paper's Table 1:
one row per fold, mean ± standard deviation over folds last) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np

from autoseg.evaluate.metrics import dice
from autoseg.infer.postprocessing import postprocess_probabilities
from autoseg.io.files import atomic_path, write_json
from autoseg.io.images import read_image
from autoseg.plans import Plans

DATASET = "Dataset003_CTP"
#: (column title, variant folder, configuration, trainer)
VARIANTS = (
    ("PSPNet pre-trained, focal", "pretrained", "2d_pspnet", "PSPNetTrainer"),
    ("PSPNet pre-trained, weighted CE", "pretrained", "2d_pspnet", "PSPNetCETrainer"),
    ("PSPNet scratch, focal", "scratch", "2d_pspnet", "PSPNetTrainer"),
    ("PSPNet scratch, weighted CE", "scratch", "2d_pspnet", "PSPNetCETrainer"),
    ("3d_aniso (U-Net)", "scratch", "3d_aniso", "ResidualUNetTrainer"),
)
ENSEMBLE = "pre-trained focal + CE ensemble"
EPOCH_LINE = re.compile(r"^\S+ \S+\s+epoch \d+/\d+ .* ([0-9.]+) s$", re.MULTILINE)


def fold_folder(root: Path, variant: str, configuration: str, trainer: str, fold: int) -> Path:
    return root / variant / DATASET / configuration / trainer / f"fold_{fold}"


def fold_dice(folder: Path) -> float | None:
    """Mean Dice over the fold's validation cases (validation/summary.json), None when the run is missing."""
    summary = folder / "validation" / "summary.json"
    if not summary.is_file():
        return None
    return json.loads(summary.read_text())["mean"]["dice"]


def ensemble_dice(folders: list[Path], labels: Path) -> float | None:
    """Mean Dice over the cases of an ensemble of fold runs: probabilities averaged, then the plans'
    post-processing (threshold, minimum lesion size), as each run's own validation applies it."""
    if not all((f / "validation" / "summary.json").is_file() for f in folders):
        return None
    post = Plans.from_json(folders[0] / "plans.json").configuration("2d_pspnet").postprocessing
    cases = sorted(json.loads((folders[0] / "validation" / "summary.json").read_text())["cases"])
    scores = []
    for case in cases:
        probabilities = []
        for folder in folders:
            with np.load(folder / "validation" / f"{case}_probabilities.npz") as archive:
                probabilities.append(archive["probabilities"].astype(np.float32))
        reference, geometry = read_image(labels / f"{case}.nii.gz", np.uint8)
        mask = postprocess_probabilities(
            np.mean(probabilities, axis=0), geometry.spacing, post.threshold, post.min_lesion_mm3
        )
        scores.append(dice(mask > 0, reference > 0))
    return float(np.mean(scores))


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def training_seconds(folder: Path) -> float | None:
    """Training time of a run: the sum of its epoch times (the last field of log.txt's epoch lines, which
    include the per-epoch validation batches but not the end-of-fold prediction)."""
    log = folder / "log.txt"
    if not log.is_file():
        return None
    return sum(float(match.group(1)) for match in EPOCH_LINE.finditer(log.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--raw", type=Path, required=True, help="the raw CTP dataset folder (labelsTr/)")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    columns = [title for title, *_ in VARIANTS] + [ENSEMBLE]
    table: dict[str, list[float | None]] = {title: [] for title in columns}
    seconds: dict[str, list[float]] = {title: [] for title, *_ in VARIANTS}
    for fold in range(args.folds):
        for title, variant, configuration, trainer in VARIANTS:
            folder = fold_folder(args.folder, variant, configuration, trainer, fold)
            table[title].append(fold_dice(folder))
            spent = training_seconds(folder) if table[title][-1] is not None else None
            if spent is not None:
                seconds[title].append(spent)
        pair = [
            fold_folder(args.folder, "pretrained", "2d_pspnet", t, fold) for t in ("PSPNetTrainer", "PSPNetCETrainer")
        ]
        table[ENSEMBLE].append(ensemble_dice(pair, args.raw / "labelsTr"))
    done = [fold for fold in range(args.folds) if all(table[c][fold] is not None for c in columns)]
    lines = ["| Fold | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for fold in range(args.folds):
        cells = ["–" if table[c][fold] is None else f"{table[c][fold]:.2f}" for c in columns]
        lines.append(f"| {fold + 1} | " + " | ".join(cells) + " |")
    lines.append(
        f"| **Total ({len(done)} folds)** | "
        + " | ".join(f"**{mean_sd([table[c][f] for f in done])}**" for c in columns)
        + " |"
    )
    lines.append(
        "| training time per fold (s) | "
        + " | ".join(f"{statistics.mean(seconds[c]):.0f}" if seconds.get(c) else "–" for c in columns)
        + " |"
    )
    markdown = "\n".join(lines)
    write_json(
        {"folds_complete": done, "dice_per_fold": table, "training_seconds": {c: v for c, v in seconds.items()}},
        args.folder / "summary.json",
    )
    with atomic_path(args.folder / "summary.md", suffix=".md") as temporary:
        Path(temporary).write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
