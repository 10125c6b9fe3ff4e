#!/usr/bin/env bash
# INT8 / INT4 accuracy on arith-r1 calibrated the way a user would (BENCHMARKS.md, "calibrated on a user's
# prompts"): each quantized form is exported twice, once calibrated on 64 user-turn-only prompts
# (tests/fixtures/arith-r1/user_eval/prompts.jsonl) and once on the fixture's full conversations
# (tests/fixtures/arith-r1/calibration.jsonl), and scored with its fp32 export on 500 held-out problems from a
# generator and seed no other fixture uses (user_eval/problems.jsonl). The export's --eval-problems scores both the
# fp32 and the quantized artifact (greedy, answer = text after </think>); one line per export is printed.
#
#   bash scripts/study_calibration.sh [OUT_DIR] [-- extra r1-export flags...]
# Uses target/release/r1-export (build it first: cargo build --release -p r1-export).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
OUT="${1:-/tmp/r1-calibration-study}"
shift || true
[ "${1:-}" = "--" ] && shift
EXPORT="${R1_EXPORT_BIN:-$(r1_target_dir)/release/r1-export}"
[ -x "$EXPORT" ] || { echo "error: $EXPORT not found: cargo build --release -p r1-export" >&2; exit 1; }
FIX=tests/fixtures/arith-r1
PROBLEMS=$FIX/user_eval/problems.jsonl
mkdir -p "$OUT"
printf '%-8s %-14s %8s %8s %7s %8s\n' form calibration fp32 quant points seconds
for precision in int8 int8-wo int4-wo; do
  for cal in prompts conversations; do
    data=$FIX/user_eval/prompts.jsonl
    [ "$cal" = conversations ] && data=$FIX/calibration.jsonl
    dir="$OUT/$precision-$cal"
    rm -rf "$dir"
    start=$(date +%s.%N)
    "$EXPORT" "$FIX" -o "$dir" --precision "$precision" --calibration-data "$data" --calibration-samples 64 \
      --eval-problems "$PROBLEMS" --quiet "$@" >"$dir.log" 2>&1 || { cat "$dir.log" >&2; exit 1; }
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    python3 - "$dir" "$precision" "$cal" "$secs" <<'PY'
import json, sys
d, precision, cal, secs = sys.argv[1:]
acc = {r["precision"]: r for r in json.load(open(f"{d}/calibration/report.json"))["accuracy"]}
f, q = acc["fp32"], acc[precision]
pts = 100 * (q["correct"] - f["correct"]) / f["total"]
print(f"{precision:<8} {cal:<14} {f['correct']:>4}/{f['total']} {q['correct']:>4}/{q['total']} {pts:+7.1f} {float(secs):8.1f}")
PY
  done
done
