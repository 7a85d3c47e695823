#!/usr/bin/env bash
# Time autoseg_predict on one case with each test-time mirroring choice (--tta none, lr, all) and score each
# prediction against the case's reference label with autoseg_evaluate.
#
# Usage: AUTOSEG_HOME=... tools/predict_benchmark.sh [-d DATASET] [-c CASE] [-o OUT] [-m "none lr all"]
#                                                    [-- ARGS FOR autoseg_predict, e.g. -f full --device cpu]
#   -d  trained dataset (name, number or folder; default: the only trained one)
#   -c  case identifier (default: the first case of labelsTs with images in imagesTs, else of labelsTr)
#   -o  output folder (default: $AUTOSEG_HOME/predict_benchmark)
#   -m  tta modes to run, in order (default: "none lr all")
#
# Writes OUT/tta_<mode>/ (the prediction), OUT/evaluation_<mode>/, OUT/results.json and OUT/results.md: per mode
# the wall-clock seconds of the whole autoseg_predict process (start-up and model loading included), its peak
# resident memory (MiB; /usr/bin/time -v when present, else Python's resource.getrusage) and the Dice.
set -euo pipefail
bin="${VENV:-.venv}/bin"
dataset=""
case_id=""
out="${AUTOSEG_HOME:?set AUTOSEG_HOME to a folder with a trained dataset}/predict_benchmark"
modes="none lr all"
while getopts "d:c:o:m:h" option; do
  case "$option" in
    d) dataset="$OPTARG" ;;
    c) case_id="$OPTARG" ;;
    o) out="$OPTARG" ;;
    m) modes="$OPTARG" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
extra=("$@")

# The case: its channel files are linked into OUT/input (autoseg_predict reads a folder), its label into OUT/reference.
mkdir -p "$out"
rm -rf "$out/input" "$out/reference"
read -r dataset case_id < <("$bin/python" - "$dataset" "$case_id" "$out" <<'PY'
import sys
from pathlib import Path
from autoseg.io.images import split_ending
from autoseg.paths import raw_root
from autoseg.paths import choose_dataset

name = choose_dataset(sys.argv[1] or None)
wanted, out = sys.argv[2], Path(sys.argv[3])
raw = raw_root() / name
for images, labels in ((raw / "imagesTs", raw / "labelsTs"), (raw / "imagesTr", raw / "labelsTr")):
    cases = {split_ending(p)[0]: p for p in sorted(labels.glob("*")) if not p.name.startswith(".")} \
        if labels.is_dir() else {}
    chosen = wanted or next((c for c in cases if any(images.glob(f"{c}_[0-9][0-9][0-9][0-9].*"))), "")
    if chosen in cases:
        break
else:
    sys.exit(f"error: no case {wanted or ''} with a label in {raw}/labelsTs or labelsTr")
(out / "input").mkdir(parents=True)
(out / "reference").mkdir(parents=True)
for image in sorted(images.glob(f"{chosen}_[0-9][0-9][0-9][0-9].*")):
    (out / "input" / image.name).symlink_to(image.resolve())
(out / "reference" / cases[chosen].name).symlink_to(cases[chosen].resolve())
print(name, chosen)
PY
)
echo "benchmark: $dataset, case $case_id, modes: $modes; extra autoseg_predict arguments: ${extra[*]:-none}"

# Runs a command; prints "SECONDS PEAK_RSS_MIB" on the last line of FILE.
measure() {
  local file="$1"; shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$file.time" "$@"
    awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i] }
                /Maximum resident set size/ { rss = $2 / 1024 }
                END { printf "%.1f %.0f\n", s, rss }' "$file.time" > "$file"
  else
    "$bin/python" - "$file" "$@" <<'PY'
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
open(sys.argv[1], "w").write(f"{seconds:.1f} {peak:.0f}\n")
sys.exit(code)
PY
  fi
}

for mode in $modes; do
  echo "== --tta $mode"
  rm -rf "$out/tta_$mode" "$out/evaluation_$mode"
  measure "$out/measure_$mode" "$bin/autoseg_predict" -i "$out/input" -o "$out/tta_$mode" -d "$dataset" \
    --tta "$mode" --overwrite --no-progress "${extra[@]}"
  "$bin/autoseg_evaluate" -ref "$out/reference" -pred "$out/tta_$mode" -o "$out/evaluation_$mode" \
    --bootstrap 10 --no-progress > /dev/null
done

"$bin/python" - "$out" "$dataset" "$case_id" $modes <<'PY'
import json, sys
from pathlib import Path
out, dataset, case, modes = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
rows = []
for mode in modes:
    seconds, rss = (out / f"measure_{mode}").read_text().split()
    dice = json.loads((out / f"evaluation_{mode}" / "summary.json").read_text())["metrics"]["dice"]["mean"]
    rows.append({"tta": mode, "seconds": float(seconds), "peak_rss_mib": int(float(rss)), "dice": dice})
(out / "results.json").write_text(json.dumps({"dataset": dataset, "case": case, "runs": rows}, indent=2) + "\n")
lines = [f"Prediction of {case} ({dataset})", "", "| --tta | seconds | peak RSS (MiB) | Dice |", "| --- | ---: | ---: | ---: |"]
lines += [f"| {r['tta']} | {r['seconds']:.1f} | {r['peak_rss_mib']} | {r['dice']:.4f} |" for r in rows]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
PY
