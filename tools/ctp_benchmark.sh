#!/usr/bin/env bash
# The CTP paper's comparison on the CTP-like demo, on a CPU: 2d_pspnet from scratch and with a backbone
# pre-trained on the ATLAS-like demo's axial slices (autoseg_pretrain; ImageNet weights cannot be fetched
# here), each with focal loss (PSPNetTrainer) and class-weighted cross entropy (PSPNetCETrainer), and 3d_aniso;
# every fold of the subject-grouped 5-fold split, folds outermost so a shortened run still compares every
# variant. Then tools/ctp_benchmark_summary.py writes the per-fold table (the paper's Table 1 / Fig. 3).
#
#   AUTOSEG_HOME=/somewhere bash tools/ctp_benchmark.sh      (CTP_EPOCHS, CTP_ITERS, CTP_FOLDS, PRETRAIN_* to change)
# Re-running it continues: finished runs are kept, interrupted ones resumed.
set -euo pipefail
bin="${VENV:-.venv}/bin"
: "${AUTOSEG_HOME:?set AUTOSEG_HOME to a folder for the benchmark data}"
epochs="${CTP_EPOCHS:-8}"
iters="${CTP_ITERS:-20}"
folds="${CTP_FOLDS:-0 1 2 3 4}"
weights="$AUTOSEG_HOME/resnet18_atlas2mm_axial.pth"

echo "== data: CTP-like demo (20 subjects, 27 slabs) and the 2 mm ATLAS-like demo, both planned with CPUPlanner"
[ -d "$AUTOSEG_HOME/raw/Dataset003_CTP" ] || "$bin/autoseg_demo" ctp --seed 0
[ -d "$AUTOSEG_HOME/raw/Dataset002_ATLAS2mm" ] || "$bin/autoseg_demo" atlas --spacing 2 --seed 0
"$bin/autoseg_plan" -d CTP -pl CPUPlanner -np 2
"$bin/autoseg_plan" -d ATLAS2mm -pl CPUPlanner -np 2

echo "== pre-training a ResNet18 on the ATLAS-like axial slices"
if [ ! -f "$weights" ]; then
  resume=()
  [ -f "$AUTOSEG_HOME/results/Dataset002_ATLAS2mm/2d_pspnet_pretraining/PSPNetTrainer/fold_full/checkpoint_latest.pth" ] && resume=(--continue)
  "$bin/autoseg_pretrain" -d ATLAS2mm -o "$weights" --backbone resnet18 \
    --epochs "${PRETRAIN_EPOCHS:-10}" --iters-per-epoch "${PRETRAIN_ITERS:-30}" "${resume[@]}"
fi

# train VARIANT CONFIGURATION TRAINER FOLD [extra flags]: results of each variant in their own AUTOSEG_RESULTS.
train() {
  local variant=$1 configuration=$2 trainer=$3 fold=$4
  shift 4
  local results="$AUTOSEG_HOME/ctp_benchmark/$variant"
  local run="$results/Dataset003_CTP/$configuration/$trainer/fold_$fold"
  local flags=(-d CTP -c "$configuration" -tr "$trainer" -f "$fold" --epochs "$epochs" --iters-per-epoch "$iters"
               --val-iters 4 "$@")
  if [ -f "$run/validation/summary.json" ]; then echo "  done: $run"; return; fi
  [ -f "$run/checkpoint_latest.pth" ] && flags+=(--continue)
  echo "== $variant: $configuration $trainer fold $fold"
  local start=$SECONDS
  AUTOSEG_RESULTS="$results" "$bin/autoseg_train" "${flags[@]}" > "$AUTOSEG_HOME/ctp_benchmark/$variant.$trainer.$configuration.$fold.log" 2>&1
  echo "  $((SECONDS - start)) s; $(tail -n 1 "$run/log.txt")"
}

for fold in $folds; do
  train pretrained 2d_pspnet PSPNetTrainer "$fold" --pretrained "$weights"
  train pretrained 2d_pspnet PSPNetCETrainer "$fold" --pretrained "$weights"
  train scratch 2d_pspnet PSPNetTrainer "$fold"
  train scratch 2d_pspnet PSPNetCETrainer "$fold"
  train scratch 3d_aniso ResidualUNetTrainer "$fold"
done

"$bin/python" tools/ctp_benchmark_summary.py "$AUTOSEG_HOME/ctp_benchmark" --raw "$AUTOSEG_HOME/raw/Dataset003_CTP"
