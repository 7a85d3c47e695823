"""How well the QC score ranks held-out predictions by their true Dice (documentation/benchmarks.md, "QC score").

A model is trained briefly on the 2 mm ATLAS-like demo (folds 0 and 1, each within a compute budget), calibrated by
``autoseg_find_best`` on its cross-validation, and predicts held-out cases of rising difficulty made from one more
demo set: as generated, with added noise, with noise and a compressed contrast, and with the contrast inverted (a
T2-like image the T1 model never saw). ``autoseg_evaluate`` gives each case's true Dice; the script reports, over
all held-out cases with a lesion, the Spearman correlation of the QC score with Dice and the AUROC of the score for
Dice < 0.5, beside the same for the plain pairwise Dice between the ensemble members (the baseline), the flag's
sensitivity and specificity at the calibrated threshold, and writes ``qc_benchmark.json`` and a scatter plot.

Usage (in a fresh AUTOSEG_HOME; about 40 minutes on 2 cores with the defaults):

    AUTOSEG_HOME=/tmp/qcbench .venv/bin/python tools/qc_benchmark.py --minutes 8 --cases-per-level 6
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from autoseg.infer.quality import FAILURE_DICE, auroc
from autoseg.io.images import read_image, write_like

TRAIN = "Dataset301_QCTrain"
HELD_OUT = "Dataset311_QCHeldOut"
LEVELS = ("as generated", "noise", "noise + low contrast", "inverted contrast")


def _run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def _degrade(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """The held-out image at difficulty ``level`` (see :data:`LEVELS`); the brain is the non-zero region."""
    brain = image > 0
    values = image[brain]
    mean, spread = float(values.mean()), float(values.std())
    out = image.astype(np.float32).copy()
    if level >= 1:
        out[brain] += rng.normal(0.0, (0.35 if level == 1 else 0.6) * spread, brain.sum())
    if level >= 2:
        out[brain] = mean + 0.4 * (out[brain] - mean)
    if level == 3:
        out[brain] = 2 * mean - out[brain]
    out[brain] = np.maximum(out[brain], 1e-3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="compute budget per fold")
    parser.add_argument("--cases-per-level", type=int, default=6)
    parser.add_argument("--train-cases", type=int, default=12)
    arguments = parser.parse_args()
    home = Path(os.environ["AUTOSEG_HOME"])
    binary = Path(sys.executable).parent
    raw = home / "raw"
    if not (raw / TRAIN).is_dir():
        _run(str(binary / "autoseg_demo"), "atlas", "--cases", str(arguments.train_cases), "--spacing", "2",
             "--seed", "0", "--name", TRAIN)  # fmt: skip
    _run(str(binary / "autoseg_plan"), "-d", TRAIN, "-pl", "CPUPlanner", "--device", "cpu",
         "--budget-minutes", str(arguments.minutes), "-np", "2")  # fmt: skip
    for fold in (0, 1):
        if not any((home / "results" / TRAIN).glob(f"*/*/fold_{fold}/checkpoint_final.pth")):
            _run(str(binary / "autoseg_train"), "-d", TRAIN, "-f", str(fold))
    _run(str(binary / "autoseg_find_best"), "-d", TRAIN, "--no-progress")

    source = home / "source"
    if not (source / HELD_OUT).is_dir():
        os.environ["AUTOSEG_RAW"] = str(source)
        _run(str(binary / "autoseg_demo"), "atlas", "--cases", str(arguments.cases_per_level), "--spacing", "2",
             "--seed", "7", "--name", HELD_OUT)  # fmt: skip
        del os.environ["AUTOSEG_RAW"]
    images, labels = home / "heldout" / "images", home / "heldout" / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    level_of = {}
    for path in sorted((source / HELD_OUT / "imagesTr").glob("*_0000.nii.gz")):
        case = path.name.removesuffix("_0000.nii.gz")
        image, geometry = read_image(path)
        for level, name in enumerate(LEVELS):
            target = f"{case}_L{level}"
            level_of[target] = name
            write_like(_degrade(image, level, rng), geometry, images / f"{target}_0000.nii.gz", path)
            (labels / f"{target}.nii.gz").write_bytes((source / HELD_OUT / "labelsTr" / f"{case}.nii.gz").read_bytes())
    predictions, evaluation = home / "heldout" / "predictions", home / "heldout" / "evaluation"
    _run(str(binary / "autoseg_predict"), "-i", str(images), "-o", str(predictions), "-d", TRAIN, "--overwrite",
         "--save-uncertainty")  # fmt: skip
    _run(str(binary / "autoseg_evaluate"), "-ref", str(labels), "-pred", str(predictions), "-o", str(evaluation))

    with open(evaluation / "per_case.csv", newline="") as handle:
        dice = {row["case"]: float(row["dice"]) for row in csv.DictReader(handle)}
    rows = []
    for case in sorted(level_of):
        report = json.loads((predictions / f"{case}_lesions.json").read_text())
        components = report["qc"]["components"]
        rows.append(
            {
                "case": case,
                "level": level_of[case],
                "dice": dice[case],
                "qc_score": report["qc"]["score"],
                "review": report["qc"]["review"],
                "member_agreement": components["member_agreement"],
                "mirroring_agreement": components["mirroring_agreement"],
                "volume_ml": report["total_volume_ml"],
            }
        )
    rows = [row for row in rows if np.isfinite(row["dice"])]
    truth = np.array([row["dice"] for row in rows])
    failed = truth < FAILURE_DICE
    result = {"cases": len(rows), "failures": int(failed.sum()), "levels": {}}
    for name in ("qc_score", "member_agreement", "mirroring_agreement"):
        values = np.array([np.nan if row[name] is None else row[name] for row in rows], dtype=float)
        result[name] = {
            "spearman": float(stats.spearmanr(values, truth).statistic),
            "auroc_for_dice_below_0.5": auroc(values, failed),
        }
    flagged = np.array([row["review"] for row in rows])
    result["review_flag"] = {
        "sensitivity": float(flagged[failed].mean()) if failed.any() else None,
        "specificity": float((~flagged[~failed]).mean()) if (~failed).any() else None,
        "threshold": json.loads((home / "results" / TRAIN / "qc_calibration.json").read_text())["threshold"],
    }
    for name in LEVELS:
        chosen = [row for row in rows if row["level"] == name]
        result["levels"][name] = {
            "mean_dice": float(np.mean([r["dice"] for r in chosen])),
            "mean_qc_score": float(np.mean([r["qc_score"] for r in chosen])),
            "flagged": int(sum(r["review"] for r in chosen)),
            "cases": len(chosen),
        }
    result["per_case"] = rows
    output = home / "heldout" / "qc_benchmark.json"
    output.write_text(json.dumps(result, indent=2))
    _plot(rows, home / "heldout" / "qc_vs_dice.png")
    print(json.dumps({k: v for k, v in result.items() if k != "per_case"}, indent=2))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for name, marker in zip(LEVELS, "osD^"):
        chosen = [row for row in rows if row["level"] == name]
        axis.scatter([r["qc_score"] for r in chosen], [r["dice"] for r in chosen], marker=marker, label=name)
    axis.set_xlabel("QC score")
    axis.set_ylabel("true Dice")
    axis.axhline(FAILURE_DICE, color="grey", lw=0.5)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
