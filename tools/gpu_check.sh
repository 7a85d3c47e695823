#!/usr/bin/env bash
# The prepared GPU check: one command, under 5 minutes on a CUDA machine.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else ./gpu_check)
#
# It plans the 1 mm ATLAS-like demo with a GPU compute budget (--device cuda --budget-minutes 3: probe, cost
# model, ladder), trains fold 0 for a few hundred iterations with bf16 autocast and torch.compile, measures the
# loader's augmented samples/s against what the network consumes, predicts one held-out 1 mm case, and writes
# OUT_DIR/gpu_check.json with those figures (plus the training log and the plans). On a machine with several
# GPUs it then times 100 iterations on one GPU and on all of them (autoseg_train --num-gpus, torchrun + DDP, the
# same global batch) into OUT_DIR/ddp_<N>gpu.json, for the scaling efficiency.
#
# Needs: python3 with a CUDA build of torch and autoseg's dependencies importable (pip install -e . where the
# machine has a package index; otherwise wheels on PYTHONPATH). Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-$PWD/gpu_check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export AUTOSEG_HOME="${AUTOSEG_HOME:-/tmp/autoseg_gpu_check}"
minutes="${GPU_CHECK_MINUTES:-3}"
iterations="${GPU_CHECK_ITERATIONS:-300}"
start=$(date +%s)

"$python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: the GPU check needs one"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
PY

run() { "$python" -m "$@"; }
echo "== demo data (1 mm ATLAS-like: 10 training cases, 1 held-out)"
[ -d "$AUTOSEG_HOME/raw/Dataset001_ATLAS" ] || run autoseg.commands.demo atlas --cases 10 --spacing 1 --seed 0
[ -d "$AUTOSEG_HOME/raw/Dataset011_ATLASHeldOut" ] || \
  run autoseg.commands.demo atlas --cases 1 --spacing 1 --seed 1 --name Dataset011_ATLASHeldOut

echo "== plan with a GPU budget of $minutes minutes"
plan_start=$(date +%s.%N)
run autoseg.commands.plan -d ATLAS --device cuda --budget-minutes "$minutes" -np 8 --no-progress | tee "$out/plan.txt"
plan_end=$(date +%s.%N)
cp "$AUTOSEG_HOME/preprocessed/Dataset001_ATLAS/plans.json" "$out/plans.json"

echo "== train fold 0: $iterations iterations, bf16, torch.compile"
folder="$AUTOSEG_HOME/results/Dataset001_ATLAS/3d_resunet"
rm -rf "$folder"
epochs=$(( iterations / 50 ))
train_start=$(date +%s.%N)
run autoseg.commands.train -d ATLAS -f 0 --device cuda --precision bf16 --compile --epochs "$epochs" \
  --iters-per-epoch 50 --val-iters 5 --no-validation
train_end=$(date +%s.%N)
cp "$(ls -d "$folder"/*/fold_0)/log.txt" "$out/train_log.txt"

echo "== loader throughput and prediction of one 1 mm case"
"$python" - "$out" "$plan_start" "$plan_end" "$train_start" "$train_end" "$iterations" <<'PY'
import json, re, sys, time
from pathlib import Path

import torch

from autoseg.train.loading import case_identifiers, make_loader
from autoseg.plans import Plans
from autoseg.paths import preprocessed_root, raw_root, results_root

out, plan_start, plan_end, train_start, train_end, iterations = sys.argv[1:]
out = Path(out)
plans = Plans.from_json(preprocessed_root() / "Dataset001_ATLAS" / "plans.json")
configuration = plans.configuration()
stage = configuration.schedule.stages[-1]
folder = preprocessed_root() / "Dataset001_ATLAS" / configuration.data_identifier
processes = plans.compute_budget.data_processes if plans.compute_budget else 8
with make_loader(folder, case_identifiers(folder), configuration, stage, processes, 0, True) as batches:
    next(batches)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 20:
        count += next(batches)["data"].shape[0]
    samples_per_second = count / (time.perf_counter() - start)

log = (out / "train_log.txt").read_text()
steps = [float(m) for m in re.findall(r"steps ([0-9.]+) s", log)]
waits = [float(m) for m in re.findall(r"loader wait ([0-9.]+) s", log)]
epoch_iterations = 50
# the first epoch includes compilation: report the rest
steady = steps[1:] or steps
seconds_per_iteration = sum(steady) / (len(steady) * epoch_iterations)
consumed = stage.batch_size / seconds_per_iteration

case = sorted((raw_root() / "Dataset011_ATLASHeldOut" / "imagesTr").glob("*_0000.nii.gz"))[0]
from autoseg.api.predict import ModelChoice, PredictionOptions, predict
start = time.perf_counter()
predict(
    case,
    out / "prediction",
    ModelChoice(dataset="ATLAS", folds=[0]),
    PredictionOptions(device="cuda", progress=False, overwrite=True),
)
predict_seconds = time.perf_counter() - start
from autoseg.evaluate.metrics import dice
from autoseg.io.images import read_image
reference, _ = read_image(raw_root() / "Dataset011_ATLASHeldOut" / "labelsTr" / case.name.replace("_0000", ""))
predicted, _ = read_image(out / "prediction" / case.name.replace("_0000", ""))
budget = plans.compute_budget
result = {
    "device": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "plan_seconds": round(float(plan_end) - float(plan_start), 1),
    "compute_budget": None if budget is None else {
        "minutes": budget.minutes, "estimated_minutes": budget.estimated_minutes,
        "seconds_per_iteration": budget.seconds_per_iteration, "iterations": budget.iterations,
        "reasons": budget.reasons},
    "configuration": {"spacing": configuration.target_spacing, "patch": configuration.patch_size,
                      "batch": configuration.batch_size, "features": configuration.network.features},
    "train_seconds": round(float(train_end) - float(train_start), 1),
    "iterations": int(iterations),
    "iterations_per_second": round(1 / seconds_per_iteration, 2),
    "loader_wait_seconds": round(sum(waits), 1),
    "loader_samples_per_second": round(samples_per_second, 1),
    "network_samples_per_second": round(consumed, 1),
    "predict_seconds_1mm_case": round(predict_seconds, 1),
    "predict_dice_after_short_training": round(float(dice(predicted > 0, reference > 0)), 4),
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PY
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
  echo "== data-parallel scaling: 100 iterations on 1 GPU, then on all $gpus (torchrun + DDP, same global batch)"
  for n in 1 "$gpus"; do
    rm -rf "$folder"
    s=$(date +%s.%N)
    run autoseg.commands.train -d ATLAS -f 0 --device cuda --precision bf16 --epochs 2 --iters-per-epoch 50 \
      --val-iters 0 --no-validation --num-gpus "$n" > "$out/ddp_${n}gpu.txt" 2>&1
    e=$(date +%s.%N)
    steps=$(grep -o "steps [0-9.]* s" "$(ls -d "$folder"/*/fold_0)/log.txt" | tail -n 1 | awk '{print $2}')
    echo "{\"gpus\": $n, \"wall_seconds\": $(echo "$e - $s" | bc), \"iterations_per_second_epoch_2\": $(echo "scale=3; 50 / $steps" | bc)}" \
      | tee "$out/ddp_${n}gpu.json"
  done
  echo "scaling efficiency = (iterations/s on $gpus GPUs) / (iterations/s on 1 GPU) / $gpus: ddp_*gpu.json"
fi
echo "gpu check finished in $(( $(date +%s) - start )) s: $out/gpu_check.json"
