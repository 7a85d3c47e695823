#!/usr/bin/env bash
# nnU-Net v2 on autoseg's 2 mm ATLAS-like demo at a wall-clock training budget on the CPU, for the side-by-side
# comparison with autoseg at equal wall time: nnU-Net plans and preprocesses the training set with its defaults
# (3d_fullres), trains fold 0 with tools/nnunet_budget_trainer.py (nnU-Net's default trainer, schedule shortened
# to fit MINUTES), predicts the held-out cases and scores them with autoseg_evaluate (same metrics and CIs as
# autoseg's own runs). tools/nnunet_benchmark_summary.py then writes OUT/nnunet_benchmark.json and prints a summary.
#
#   bash tools/nnunet_benchmark.sh [--minutes M] [--autoseg-home DIR] [--out DIR] [--speed-only]
#
# --speed-only: plan and preprocess, then time SPEED_ITERS (default 5) training iterations of nnU-Net's default
# plan (1 epoch, 1 validation batch, no checkpoints) -> OUT/nnunet_speed.json, for "s/iteration at each tool's
# default plan".
#
# Settings (flags win over the environment):
#   AUTOSEG_HOME   folder with raw/Dataset002_ATLAS2mm (training) and raw/Dataset012_ATLAS2mmHeldOut (held-out)
#   MINUTES        training budget in minutes (default 30), counted from the start of nnUNetv2_train
#   OUT            output folder (default $AUTOSEG_HOME/nnunet_benchmark)
#   NNUNET_VENV    nnU-Net's virtual environment (default /work/nnunet_venv)
#   AUTOSEG_BIN    bin folder of autoseg's venv, for autoseg_evaluate (default <repo>/.venv/bin)
#   NP             processes for preprocessing, data augmentation and evaluation (default 2)
#   NNUNET_TTA     1 (default): nnU-Net's mirroring at prediction, as autoseg predicts; 0: --disable_tta
#   NNUNET_ITERS, NNUNET_EPOCHS, NNUNET_MIN_EPOCHS, NNUNET_VAL_ITERS, NNUNET_FINAL_VALIDATION (default 0 here):
#                  passed to the trainer, see tools/nnunet_budget_trainer.py
#   TRAIN_DATASET, HELDOUT_DATASET   dataset folder names (defaults above)
# Re-running continues: planning, a finished training and a finished prediction are kept (an interrupted
# training starts over, since its budget cannot be resumed); evaluation and the summary are redone.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

speed_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --speed-only) speed_only=1 ;;
    --minutes) MINUTES="$2"; shift ;;
    --autoseg-home) AUTOSEG_HOME="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

: "${AUTOSEG_HOME:?set AUTOSEG_HOME (or --autoseg-home) to the folder holding raw/Dataset002_ATLAS2mm}"
minutes="${MINUTES:-30}"
out="$(mkdir -p "${OUT:-$AUTOSEG_HOME/nnunet_benchmark}" && cd "${OUT:-$AUTOSEG_HOME/nnunet_benchmark}" && pwd)"
venv="${NNUNET_VENV:-/work/nnunet_venv}"
autoseg_bin="${AUTOSEG_BIN:-$repo/.venv/bin}"
np="${NP:-2}"
train_name="${TRAIN_DATASET:-Dataset002_ATLAS2mm}"
heldout_name="${HELDOUT_DATASET:-Dataset012_ATLAS2mmHeldOut}"
train_raw="$AUTOSEG_HOME/raw/$train_name"
heldout_raw="$AUTOSEG_HOME/raw/$heldout_name"
dataset_id=$((10#$(echo "$train_name" | sed -E 's/^Dataset([0-9]{3})_.*/\1/')))
trainer=nnUNetTrainer_WallTime
configuration=3d_fullres

for need in "$train_raw/dataset.json" "$train_raw/imagesTr" "$venv/bin/nnUNetv2_train"; do
  [ -e "$need" ] || { echo "missing: $need" >&2; exit 1; }
done
if [ "$speed_only" = 0 ]; then
  for need in "$heldout_raw/imagesTr" "$heldout_raw/labelsTr" "$autoseg_bin/autoseg_evaluate"; do
    [ -e "$need" ] || { echo "missing: $need" >&2; exit 1; }
  done
fi

export nnUNet_raw="$out/nnUNet_raw" nnUNet_preprocessed="$out/nnUNet_preprocessed"
export nnUNet_results="$out/nnUNet_results"
[ "$speed_only" = 1 ] && nnUNet_results="$out/speed/nnUNet_results"
export nnUNet_compile=f nnUNet_n_proc_DA="$np"
export NNUNET_FINAL_VALIDATION="${NNUNET_FINAL_VALIDATION:-0}"
# the speed mode keeps its own info.json and timings/ (planning, shared, stays in OUT/timings)
meta="$out"
[ "$speed_only" = 1 ] && meta="$out/speed"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$out/logs" "$out/timings" "$meta/timings"
ln -sfn "$train_raw" "$nnUNet_raw/$train_name"

now() { date +%s.%N; }
# record FOLDER NAME START: seconds since START into FOLDER/timings/NAME.s
record() { awk -v end="$(now)" -v start="$3" 'BEGIN { printf "%.1f\n", end - start }' > "$1/timings/$2.s"; }

echo "== nnU-Net v2 in $venv; outputs in $out"
"$venv/bin/python" - "$meta/info.json" "$minutes" "$train_raw" "$heldout_raw" "$speed_only" <<'EOF'
import importlib.metadata as md, json, os, platform, sys, torch
path, minutes, train_raw, heldout_raw, speed_only = sys.argv[1:]
have = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
info = {"nnunetv2_version": md.version("nnunetv2"), "torch_version": torch.__version__,
        "torchvision_installed": "torchvision" in have, "cuda_available": torch.cuda.is_available(),
        "minutes": None if speed_only == "1" else float(minutes), "train_dataset": train_raw,
        "heldout_dataset": None if speed_only == "1" else heldout_raw, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}
json.dump(info, open(path, "w"), indent=2)
print(f"nnunetv2 {info['nnunetv2_version']}, torch {info['torch_version']}, torchvision installed: "
      f"{info['torchvision_installed']}, CUDA available: {info['cuda_available']}")
EOF
echo "   trainer installed at $("$venv/bin/python" "$repo/tools/nnunet_budget_trainer.py" --install)"

echo "== plan and preprocess (nnU-Net defaults, $configuration)"
plans="$nnUNet_preprocessed/$train_name/nnUNetPlans.json"
if [ -f "$out/timings/plan.s" ] && [ -f "$plans" ]; then
  echo "   done before ($(cat "$out/timings/plan.s") s)"
else
  start=$(now)
  "$venv/bin/nnUNetv2_plan_and_preprocess" -d "$dataset_id" -c "$configuration" -np "$np" -npfp "$np" \
    --verify_dataset_integrity > "$out/logs/plan_and_preprocess.log" 2>&1 \
    || { tail -n 30 "$out/logs/plan_and_preprocess.log" >&2; exit 1; }
  record "$out" plan "$start"
  echo "   $(cat "$out/timings/plan.s") s"
fi

fold="$nnUNet_results/$train_name/${trainer}__nnUNetPlans__$configuration/fold_0"
if [ "$speed_only" = 1 ]; then
  echo "== speed: ${SPEED_ITERS:-5} training iterations of the default plan"
  rm -rf "$fold"
  start=$(now)
  NNUNET_EPOCHS=1 NNUNET_ITERS="${SPEED_ITERS:-5}" NNUNET_VAL_ITERS=1 NNUNET_FINAL_VALIDATION=0 \
    NNUNET_BUDGET_MINUTES='' NNUNET_BUDGET_START="$start" \
    "$venv/bin/nnUNetv2_train" "$dataset_id" "$configuration" 0 -tr "$trainer" -device cpu --disable_checkpointing \
    > "$out/logs/speed.log" 2>&1 || { tail -n 30 "$out/logs/speed.log" >&2; exit 1; }
  record "$meta" speed_run "$start"
  "$venv/bin/python" "$repo/tools/nnunet_benchmark_summary.py" "$out" --speed-only
  exit 0
fi

echo "== train fold 0 with $trainer for $minutes min"
if [ -f "$fold/checkpoint_final.pth" ] && [ -f "$fold/walltime_summary.json" ] && [ -f "$out/timings/train.s" ]; then
  done_minutes=$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["budget_minutes"])' \
    "$fold/walltime_summary.json")
  if ! awk -v a="$done_minutes" -v b="$minutes" 'BEGIN { exit !(a == b) }'; then
    echo "$out holds a finished training with a budget of $done_minutes min, not $minutes: choose another --out" \
      "or remove $fold" >&2
    exit 1
  fi
  echo "   done before ($(cat "$out/timings/train.s") s)"
else
  [ -d "$fold" ] && echo "   an unfinished training is started over" && rm -rf "$fold"
  rm -rf "$out/predictions" "$out/timings/predict.s"
  start=$(now)
  NNUNET_BUDGET_MINUTES="$minutes" NNUNET_BUDGET_START="$start" \
    "$venv/bin/nnUNetv2_train" "$dataset_id" "$configuration" 0 -tr "$trainer" -device cpu \
    > "$out/logs/train.log" 2>&1 || { tail -n 30 "$out/logs/train.log" >&2; exit 1; }
  record "$out" train "$start"
  echo "   $(cat "$out/timings/train.s") s; $(grep -c 'Epoch time' "$out/logs/train.log") epochs"
fi

echo "== predict the held-out cases ($(ls "$heldout_raw/imagesTr" | wc -l) images)"
if [ -f "$out/timings/predict.s" ]; then
  echo "   done before ($(cat "$out/timings/predict.s") s)"
else
  rm -rf "$out/predictions"
  tta=()
  [ "${NNUNET_TTA:-1}" = 0 ] && tta=(--disable_tta)
  start=$(now)
  "$venv/bin/nnUNetv2_predict" -i "$heldout_raw/imagesTr" -o "$out/predictions" -d "$dataset_id" \
    -c "$configuration" -tr "$trainer" -f 0 -chk checkpoint_final.pth -device cpu -npp 1 -nps 1 "${tta[@]}" \
    > "$out/logs/predict.log" 2>&1 || { tail -n 30 "$out/logs/predict.log" >&2; exit 1; }
  record "$out" predict "$start"
  echo "   $(cat "$out/timings/predict.s") s"
fi

echo "== evaluate with autoseg_evaluate"
rm -rf "$out/evaluation"
"$autoseg_bin/autoseg_evaluate" -ref "$heldout_raw/labelsTr" -pred "$out/predictions" -o "$out/evaluation" \
  -np "$np" --no-progress > "$out/logs/evaluate.log" 2>&1 || { tail -n 30 "$out/logs/evaluate.log" >&2; exit 1; }

echo "== summary"
"$venv/bin/python" "$repo/tools/nnunet_benchmark_summary.py" "$out"
