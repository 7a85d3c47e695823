#!/usr/bin/env bash
# The main job on the demo data, as a new user would run it (about 20 minutes on 2 CPU cores):
# generate the 2 mm ATLAS-like demo and 4 held-out cases, plan for a compute budget of DEMO_MINUTES (15) minutes
# of training on this machine's CPU, train fold 0 within it, predict the held-out cases, evaluate them, draw
# an overlay of one case, and end with the results page (report.html: tables, plot and an overlay of every case).
set -euo pipefail
bin="${VENV:-.venv}/bin"
raw="$AUTOSEG_HOME/raw"
train_set=Dataset002_ATLAS2mm
test_set=Dataset012_ATLAS2mmHeldOut
out="$AUTOSEG_HOME/demo"
# Minutes of training (validation included) for fold 0; the planner fits network, patch and iterations to them.
minutes="${DEMO_MINUTES:-15}"

echo "== 1. demo data in $AUTOSEG_HOME (raw/, preprocessed/, results/)"
[ -d "$raw/$train_set" ] || "$bin/autoseg_demo" atlas --cases 20 --spacing 2 --seed 0
[ -d "$raw/$test_set" ] || "$bin/autoseg_demo" atlas --cases 4 --spacing 2 --seed 1 --name "$test_set"

echo "== 2. verify, fingerprint, plan for $minutes minutes of training on this CPU, and preprocess"
"$bin/autoseg_plan" -d ATLAS2mm -pl CPUPlanner --device cpu --budget-minutes "$minutes" -np 2
plans="$AUTOSEG_HOME/preprocessed/$train_set/plans.json"
# The symmetric configuration (each channel plus its registered mid-sagittal mirror) when the planner found the
# plane, since a lesion shows as an asymmetry: on this demo it lifts fold 0 Dice from 0.48 to 0.85 at the same
# budget (documentation/benchmarks.md); otherwise the plan's default.
configuration=$("$bin/python" -c "
import sys
from autoseg.plans import Plans
plans = Plans.from_json(sys.argv[1])
print('3d_resunet_sym' if '3d_resunet_sym' in plans.configurations else plans.default_configuration)" "$plans")
"$bin/python" - "$plans" "$configuration" <<'PY'
import sys
from autoseg.plans import Plans
plans = Plans.from_json(sys.argv[1])
print(f"  configurations: {', '.join(plans.configurations)}; symmetry: {plans.reasons.get('symmetry')}")
print(f"  {sys.argv[2]}:")
for field, reason in plans.configuration(sys.argv[2]).reasons.items():
    print(f"    {field}: {reason}")
PY

echo "== 3. train fold 0 of $configuration as planned (re-planned after every epoch to end on time: log.txt, deadline.json)"
run="$AUTOSEG_HOME/results/$train_set/$configuration/ZoomInOutTrainer/fold_0"
if [ -f "$run/checkpoint_final.pth" ]; then
  echo "  already trained: $run"
elif [ -f "$run/checkpoint_latest.pth" ]; then
  "$bin/autoseg_train" -d ATLAS2mm -c "$configuration" -f 0 --continue
else
  "$bin/autoseg_train" -d ATLAS2mm -c "$configuration" -f 0
fi

echo "== 4. predict the 4 held-out cases"
"$bin/autoseg_predict" -i "$raw/$test_set/imagesTr" -o "$out/predictions" -d ATLAS2mm -c "$configuration" -f 0

echo "== 5. evaluate against their tracings, and write the results page"
"$bin/autoseg_evaluate" -ref "$raw/$test_set/labelsTr" -pred "$out/predictions" -o "$out/evaluation" \
  --report --images "$raw/$test_set/imagesTr"

first=$(ls "$raw/$test_set/labelsTr" | head -n 1)
case="${first%.nii.gz}"
"$bin/python" -c "
import sys
from pathlib import Path
from autoseg.evaluate.visualization import save_overlay
raw, out, case = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
path = save_overlay(raw / 'imagesTr' / f'{case}_0000.nii.gz', raw / 'labelsTr' / f'{case}.nii.gz',
                    out / 'predictions' / f'{case}.nii.gz', out / 'overlay.png')
print(f'overlay of {case}: {path}')
" "$raw/$test_set" "$out" "$case"
echo "plot of Dice against lesion volume: $out/evaluation/dice_vs_volume.png"
echo "training log and curves: $run/log.txt, $run/progress.png"
echo "results page (open it in a browser; it needs no network): $out/evaluation/report.html"
