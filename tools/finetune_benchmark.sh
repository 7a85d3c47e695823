#!/usr/bin/env bash
# Fine-tuning from a model a lab already has, against training from scratch on the same few cases at the same budget
# (issue 24; `autoseg_plan --like`, `autoseg_train --init-from`).
#
#   bash tools/finetune_benchmark.sh [--out DIR] [--tiny] [-- EXTRA autoseg_train ARGUMENTS]
#
# 1. Data (generated once into OUT/raw, shared by the three runs; nothing is downloaded):
#    - the source set: ATLAS-like, 2 mm (autoseg.data.demo.atlas, seed 0), SOURCE_CASES cases: Dataset851_FTSource;
#    - the lab's set: ATLAS-like cases of another seed (1) with a different contrast and noise: inside the brain every
#      intensity x (scaled to its 99th percentile) becomes 100 * x^GAMMA, then Rician noise of sigma NOISE is added
#      (the source's is 1.5-4). TARGET_CASES training cases (imagesTr, labelsTr) and TEST_CASES held-out cases
#      (imagesTs, labelsTs): Dataset852_FTLab.
# 2. Source model (OUT/source): planned for SOURCE_MINUTES of training on DEVICE, trained on every case (-f full),
#    exported to OUT/source_model.zip.
# 3. Fine-tune (OUT/finetune): autoseg_plan --like source_model.zip --budget-minutes TARGET_MINUTES, then
#    autoseg_train -f full --init-from source_model.zip. Scratch (OUT/scratch): autoseg_plan --budget-minutes
#    TARGET_MINUTES, then autoseg_train -f full. Each run has an AUTOSEG_HOME of its own (raw data and the probe
#    cache shared by symlink), so the same configuration names do not collide.
# 4. Both predict the held-out cases (-f full) and autoseg_evaluate scores them: mean Dice with its bootstrap 95% CI
#    per run, and the paired difference fine-tune - scratch with a paired bootstrap 95% CI over the held-out cases
#    (autoseg.evaluate.option_effects.paired_differences). Target: fine-tuning ahead by at least 0.05 Dice.
#
# Environment (defaults): SOURCE_CASES=20 TARGET_CASES=8 TEST_CASES=10 SOURCE_MINUTES=15 TARGET_MINUTES=10
# DEVICE=cpu GAMMA=2.5 NOISE=8 VENV=.venv. --tiny makes 3.5 mm tiny cases instead (for checking the script in
# minutes; its numbers mean nothing). Arguments after -- go to every autoseg_train (e.g. --epochs 2
# --iters-per-epoch 5 to check that everything starts). Writes OUT/finetune_benchmark.json and prints a table; a
# re-run skips what is done (datasets, trained models, the exported model). Run it on an otherwise idle machine.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${VENV:-$repo/.venv}/bin"
out="$PWD/finetune_benchmark"
tiny=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --tiny) tiny=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
source_cases="${SOURCE_CASES:-20}" target_cases="${TARGET_CASES:-8}" test_cases="${TEST_CASES:-10}"
source_minutes="${SOURCE_MINUTES:-15}" target_minutes="${TARGET_MINUTES:-10}" device="${DEVICE:-cpu}"
gamma="${GAMMA:-2.5}" noise="${NOISE:-8}"
mkdir -p "$out/raw" "$out/compute_probes"
out="$(cd "$out" && pwd)"
source_name=Dataset851_FTSource
lab_name=Dataset852_FTLab

echo "== data: $source_name ($source_cases cases), $lab_name ($target_cases + $test_cases held out, gamma $gamma, noise $noise)"
AUTOSEG_HOME="$out" "$bin/python" - "$out/raw" "$source_cases" "$target_cases" "$test_cases" "$gamma" "$noise" "$tiny" \
  "$source_name" "$lab_name" <<'PY'
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from autoseg.data.dataset import write_dataset_json
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.io.images import read_image, write_image

raw, source_cases, target_cases, test_cases = Path(sys.argv[1]), *map(int, sys.argv[2:5])
gamma, noise, tiny = float(sys.argv[5]), float(sys.argv[6]), sys.argv[7] == "1"
source, lab = raw / sys.argv[8], raw / sys.argv[9]
spacing = {} if tiny else {"spacing_mm": 2.0}
if not (source / "dataset.json").is_file():
    make_atlas_like(source, num_cases=source_cases, seed=0, tiny=tiny, progress=False, **spacing)
if not (lab / "dataset.json").is_file():
    staging = raw / f".{lab.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    make_atlas_like(staging, num_cases=target_cases + test_cases, seed=1, tiny=tiny, progress=False, **spacing)
    rng = np.random.default_rng(1)
    labels = sorted((staging / "labelsTr").glob("*.nii.gz"))
    for index, label in enumerate(labels):
        split = "Tr" if index < target_cases else "Ts"
        case = label.name.removesuffix(".nii.gz")
        image, geometry = read_image(staging / "imagesTr" / f"{case}_0000.nii.gz", canonical=False)
        brain = image > 0
        scaled = np.clip(image[brain] / np.percentile(image[brain], 99), 0, 1.5)
        values = 100 * scaled**gamma  # another contrast: dark tissue darker, bright tissue spread out
        real = values + noise * rng.standard_normal(values.size)
        imaginary = noise * rng.standard_normal(values.size)
        changed = np.zeros_like(image)
        changed[brain] = np.sqrt(real**2 + imaginary**2)  # Rician noise, as MRI magnitude images have
        write_image(changed.astype(np.float32), geometry, staging / f"images{split}" / f"{case}_0000.nii.gz")
        (staging / f"labels{split}").mkdir(exist_ok=True)
        if split == "Ts":
            label.rename(staging / "labelsTs" / label.name)
            (staging / "imagesTr" / f"{case}_0000.nii.gz").unlink()
    description = json.loads((staging / "dataset.json").read_text())["description"]
    write_dataset_json(
        staging,
        ("T1",),
        target_cases,
        name="ATLAS-like, another contrast and noise",
        description=f"{description} Then x -> 100 x^{gamma:g} inside the brain (x scaled to its 99th percentile) "
        f"and Rician noise of sigma {noise:g}; the last {test_cases} cases held out in imagesTs/labelsTs.",
    )
    staging.rename(lab)
PY

# One AUTOSEG_HOME per run, the raw data and the probe cache shared.
home_of() {
  local home="$out/$1"
  mkdir -p "$home"
  [ -e "$home/raw" ] || ln -s "$out/raw" "$home/raw"
  [ -e "$home/compute_probes" ] || ln -s "$out/compute_probes" "$home/compute_probes"
  echo "$home"
}
# train HOME DATASET [ARGS...]: autoseg_train -f full unless fold_full is finished; its wall time into HOME/train_seconds.txt
train() {
  local home="$1" dataset="$2"; shift 2
  if ls "$home"/results/"$dataset"/*/*/fold_full/checkpoint_final.pth > /dev/null 2>&1; then
    echo "   already trained"; return
  fi
  local start=$SECONDS
  AUTOSEG_HOME="$home" "$bin/autoseg_train" -d "$dataset" -f full --no-validation "$@" ${extra[@]+"${extra[@]}"} \
    > "$home/train.txt" 2>&1 || { tail -n 20 "$home/train.txt" >&2; exit 1; }
  echo $((SECONDS - start)) > "$home/train_seconds.txt"
  grep -E "^(weights:|run length:|stages:|training finished)" "$home/train.txt" | sed 's/^/   /' || true
}
plan() {
  local home="$1"; shift
  AUTOSEG_HOME="$home" "$bin/autoseg_plan" --device "$device" -np 2 --no-progress "$@" > "$home/plan.txt" 2>&1 \
    || { cat "$home/plan.txt" >&2; exit 1; }
  grep -E "^  3d_|^compute budget" "$home/plan.txt" | sed 's/^/   /' || true
}

source_home="$(home_of source)"
echo "== source model: plan for $source_minutes min, train on every case, export"
plan "$source_home" -d "$source_name" --budget-minutes "$source_minutes"
train "$source_home" "$source_name"
[ -f "$out/source_model.zip" ] || AUTOSEG_HOME="$source_home" "$bin/autoseg_export" -d "$source_name" -f full \
  -o "$out/source_model.zip"

finetune_home="$(home_of finetune)"
echo "== fine-tune: plan --like the source model for $target_minutes min, train from its weights"
plan "$finetune_home" -d "$lab_name" --budget-minutes "$target_minutes" --like "$out/source_model.zip"
train "$finetune_home" "$lab_name" --init-from "$out/source_model.zip"

scratch_home="$(home_of scratch)"
echo "== from scratch: plan for $target_minutes min, train"
plan "$scratch_home" -d "$lab_name" --budget-minutes "$target_minutes"
train "$scratch_home" "$lab_name"

for run in finetune scratch; do
  home="$out/$run"
  echo "== $run: predict and evaluate the $test_cases held-out cases"
  AUTOSEG_HOME="$home" "$bin/autoseg_predict" -i "$out/raw/$lab_name/imagesTs" -o "$home/predictions" -d "$lab_name" \
    -f full --device "$device" --no-progress > "$home/predict.txt"
  AUTOSEG_HOME="$home" "$bin/autoseg_evaluate" -ref "$out/raw/$lab_name/labelsTs" -pred "$home/predictions" \
    -o "$home/evaluation" --no-progress > /dev/null
done

AUTOSEG_HOME="$out" "$bin/python" - "$out" "$lab_name" "$target_minutes" <<'PY'
import json
import sys
from pathlib import Path

import pandas as pd

from autoseg.evaluate.option_effects import paired_differences
from autoseg.plans import Plans

out, lab, minutes = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
runs = {}
for run in ("finetune", "scratch"):
    home = out / run
    plans = Plans.from_json(home / "preprocessed" / lab / "plans.json")
    configuration = plans.configuration()
    summary = json.loads((home / "evaluation" / "summary.json").read_text())
    per_case = pd.read_csv(home / "evaluation" / "per_case.csv", index_col="case")
    seconds = home / "train_seconds.txt"
    runs[run] = {
        "configuration": configuration.name,
        "features": list(configuration.network.features),
        "patch_size": list(configuration.patch_size),
        "spacing_mm": list(configuration.target_spacing),
        "planned_iterations": configuration.schedule.epochs * configuration.schedule.iterations_per_epoch,
        "stages": [stage.name for stage in configuration.schedule.stages],
        "train_minutes": round(int(seconds.read_text()) / 60, 1) if seconds.is_file() else None,
        "dice": summary["metrics"]["dice"],
        "per_case": per_case.to_dict(orient="index"),
    }
difference = paired_differences(runs["finetune"]["per_case"], runs["scratch"]["per_case"])
result = {
    "budget_minutes": minutes,
    "runs": {name: {k: v for k, v in run.items() if k != "per_case"} for name, run in runs.items()},
    "finetune_minus_scratch": difference,
}
(out / "finetune_benchmark.json").write_text(json.dumps(result, indent=2))
print(f"held-out Dice on {difference['cases']} cases, {minutes:g}-minute budget each:")
for name, run in runs.items():
    dice = run["dice"]
    print(
        f"  {name:9s} {dice['mean']:.3f} [{dice['ci_low']:.3f}, {dice['ci_high']:.3f}]  features {run['features']}, "
        f"patch {run['patch_size']}, {run['planned_iterations']} planned iterations, trained {run['train_minutes']} min"
    )
low, high = difference["dice"]["ci95"] or (float("nan"), float("nan"))
print(f"  fine-tune - scratch: {difference['dice']['mean']:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap 95% CI)")
print(f"written: {out / 'finetune_benchmark.json'}")
PY
