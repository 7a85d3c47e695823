#!/usr/bin/env bash
# Does a compute budget keep its promise? For each budget (minutes): plan the 2 mm ATLAS-like demo with
# --budget-minutes on this machine's CPU, train fold 0 as planned, predict the held-out cases and evaluate them;
# then report the estimate beside the measured time of the fold and the held-out scores.
#
#   bash tools/budget_benchmark.sh [--planner NAME] [--unet-layout LAYOUT] [--out DIR] [--competing] MINUTES [...]
#
# --competing starts one CPU-bound process (a Python busy loop) a third of the budget after training starts and
# stops it two thirds in, so the training's deadline (autoseg.train.deadline) must re-plan to end on time; those
# runs go to OUT/budget_<M>min_competing. --unet-layout plans that U-Net layout (autoseg_plan --unet-layout; runs go to
# OUT/budget_<M>min_<LAYOUT>), to compare layouts at equal budgets. Each run's deadline.json (what was planned, every re-plan, what ran) is
# summarized beside the estimate.
#
# Needs the demo data in $AUTOSEG_HOME/raw (Dataset002_ATLAS2mm, Dataset012_ATLAS2mmHeldOut: `make demo` makes
# them, or autoseg_demo atlas --cases 20 --spacing 2 --seed 0 and --cases 4 --seed 1 --name ...HeldOut). Each
# budget gets its own AUTOSEG_HOME under OUT (default ./budget_benchmark), sharing the raw data by symlink and the
# probe cache, so the runs do not disturb each other's results. Writes OUT/budget_benchmark.json and prints a
# table. Run it on an otherwise idle machine: other load is exactly what the estimate does not include.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${VENV:-$repo/.venv}/bin"
planner=DefaultPlanner
out="$PWD/budget_benchmark"
budgets=()
competing=""
layout=()
suffix=""
while [ $# -gt 0 ]; do
  case "$1" in
    --planner) planner="$2"; shift ;;
    --out) out="$2"; shift ;;
    --competing) competing="_competing" ;;
    --unet-layout) layout=(--unet-layout "$2"); suffix="_$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) budgets+=("$1") ;;
  esac
  shift
done
[ ${#budgets[@]} -gt 0 ] || { echo "give at least one budget in minutes (see --help)" >&2; exit 2; }
: "${AUTOSEG_HOME:?set AUTOSEG_HOME to the folder holding raw/Dataset002_ATLAS2mm}"
source_home="$(cd "$AUTOSEG_HOME" && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# Train fold 0 of the plan; with --competing, a CPU-bound process from a third of the budget to two thirds.
train_fold() {
  local minutes="$1" home="$2"
  if [ -z "$competing" ]; then
    "$bin/autoseg_train" -d ATLAS2mm -f 0
    return
  fi
  "$bin/autoseg_train" -d ATLAS2mm -f 0 &
  local trainer=$! third
  third="$("$bin/python" -c "print(60 * float('$minutes') / 3)")"
  sleep "$third"
  "$bin/python" -c "while True: pass" &
  local busy=$!
  echo "competing process $busy started $(date -u +%H:%M:%S)" >> "$home/competing.txt"
  sleep "$third"
  kill "$busy"
  echo "competing process $busy stopped $(date -u +%H:%M:%S)" >> "$home/competing.txt"
  wait "$trainer"
}

for minutes in "${budgets[@]}"; do
  home="$out/budget_${minutes}min${suffix}${competing}"
  mkdir -p "$home" "$source_home/compute_probes"
  [ -e "$home/raw" ] || ln -s "$source_home/raw" "$home/raw"
  [ -e "$home/compute_probes" ] || ln -s "$source_home/compute_probes" "$home/compute_probes"
  export AUTOSEG_HOME="$home"
  echo "== $minutes minutes: plan ($planner)"
  "$bin/autoseg_plan" -d ATLAS2mm -pl "$planner" --device cpu --budget-minutes "$minutes" -np 2 --no-progress "${layout[@]}" \
    | tee "$home/plan.txt"
  run="$(ls -d "$home"/results/Dataset002_ATLAS2mm/3d_resunet/*/fold_0 2>/dev/null | head -n 1 || true)"
  if [ -n "$run" ] && [ -f "$run/checkpoint_final.pth" ] && [ -f "$run/validation/summary.json" ]; then
    echo "   already trained: $run"
  else
    echo "== $minutes minutes: train fold 0"
    start_seconds=$(date +%s.%N)
    train_fold "$minutes" "$home" > "$home/train.txt" 2>&1
    "$bin/python" -c "import time; print(round(time.time() - $start_seconds, 1))" > "$home/train_seconds.txt"
  fi
  echo "== $minutes minutes: predict and evaluate the held-out cases"
  "$bin/autoseg_predict" -i "$home/raw/Dataset012_ATLAS2mmHeldOut/imagesTr" -o "$home/predictions" -d ATLAS2mm \
    -f 0 --no-progress
  "$bin/autoseg_evaluate" -ref "$home/raw/Dataset012_ATLAS2mmHeldOut/labelsTr" -pred "$home/predictions" \
    -o "$home/evaluation" > /dev/null
done

"$bin/python" - "$out" "$suffix$competing" "${budgets[@]}" <<'PY'
import json, re, sys
from pathlib import Path

from autoseg.plans import Plans

out, competing, budgets = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = []
for minutes in budgets:
    home = out / f"budget_{minutes}min{competing}"
    plans = Plans.from_json(home / "preprocessed" / "Dataset002_ATLAS2mm" / "plans.json")
    configuration, budget = plans.configuration(), plans.compute_budget
    run = next((home / "results" / "Dataset002_ATLAS2mm" / "3d_resunet").glob("*/fold_0"))
    log = (run / "log.txt").read_text()
    epochs = [float(m) for m in re.findall(r"time: epoch ([0-9.]+) s", log)]
    fold = re.findall(r"whole fold: measured ([0-9.]+) (s|min), estimated ([0-9.]+) (s|min)", log)
    measured = float(fold[-1][0]) * (60 if fold[-1][1] == "min" else 1) if fold else None
    summary = json.loads((home / "evaluation" / "summary.json").read_text())["metrics"]
    wall = (home / "train_seconds.txt").read_text().strip() if (home / "train_seconds.txt").is_file() else None
    deadline = json.loads((run / "deadline.json").read_text()) if (run / "deadline.json").is_file() else {}
    rows.append({
        "budget_minutes": float(minutes),
        "estimated_minutes": budget.estimated_minutes,
        "measured_fold_minutes": None if measured is None else round(measured / 60, 2),
        "ratio": None if measured is None else round(measured / 60 / budget.estimated_minutes, 3),
        "command_wall_minutes": None if wall is None else round(float(wall) / 60, 2),
        "iterations": budget.iterations,
        "estimated_seconds_per_iteration": budget.seconds_per_iteration,
        "epochs_measured_seconds": epochs,
        "plan": {"spacing": configuration.target_spacing, "features": configuration.network.features,
                 "layout": configuration.network.layout,
                 "patch": configuration.patch_size, "batch": configuration.batch_size,
                 "reason": budget.reasons.get(configuration.name)},
        "held_out": {name: summary[name] for name in ("dice", "lesion_f1", "hausdorff95") if name in summary},
        "competing_process": bool(competing),
        "deadline": {
            "fold_minutes": deadline.get("ran", {}).get("fold_minutes"),
            "of_budget": deadline.get("ran", {}).get("of_budget"),
            "iterations_planned": deadline.get("planned", {}).get("iterations"),
            "iterations_ran": deadline.get("ran", {}).get("iterations"),
            "replans": len(deadline.get("replans", [])),
            "epoch_speeds": [e["speed"] for e in deadline.get("epochs", [])],
        },
    })
(out / f"budget_benchmark{competing}.json").write_text(json.dumps(rows, indent=2))
print(f"{'budget':>7} {'estimate':>9} {'measured':>9} {'of budget':>9} {'iterations':>15} {'re-plans':>8}  "
      "held-out Dice  lesion F1")
for row in rows:
    dice, f1, d = row["held_out"].get("dice", {}), row["held_out"].get("lesion_f1", {}), row["deadline"]
    print(f"{row['budget_minutes']:>7g} {row['estimated_minutes']:>9.1f} {row['measured_fold_minutes'] or float('nan'):>9.1f} "
          f"{d['of_budget'] or float('nan'):>9.2f} {str(d['iterations_ran']) + ' of ' + str(d['iterations_planned']):>15} "
          f"{d['replans']:>8}  {dice.get('mean', float('nan')):.3f}          {f1.get('mean', float('nan')):.3f}")
PY
