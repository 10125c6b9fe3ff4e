#!/usr/bin/env bash
# CPU speed table of issue 9, side by side in one run: r1's engine (ort and tract) and ONNX Runtime GenAI on the same
# random R1-Distill-Qwen-1.5B-shape checkpoint, same precision class (weight-only int4 block 32, weight-only int8).
#
#   scripts/bench_cpu.sh [--no-build] [WORK_DIR]
#       WORK_DIR defaults to /tmp/r1-bench-cpu; it needs ~25 GB of disk and ~16 GB of RAM once, for GenAI's builder,
#       which loads the checkpoint through torch. --no-build measures with the release binaries already built.
#
# Steps (each skipped when its output exists, so a re-run only re-measures):
#   1. release build of r1-fixture / r1-export and of the decode bench (engine/benches/decode.rs)
#   2. the checkpoint: r1-fixture --preset r1-distill-qwen-1.5b (random bf16 weights) + the R1 tokenizer files
#   3. r1-export --precision int4-wo and int8-wo (--target cpu: the ONNX Runtime-optimized graph ort loads)
#   4. GenAI's model builder at int4 and int8 (scripts/bench_genai.py build; installs its own pinned venv)
#   5. measurements, one after another on an otherwise idle machine: the read bandwidth once (the roofline's
#      numerator), then every (engine, precision) with the same protocol: prompt 16, 1 warm-up step, 32 timed decode
#      steps at batch 1 and 8 (8 for tract), prefill of 128 tokens best of 3
#   6. a markdown table (WORK_DIR/table.md) and the raw JSON lines (WORK_DIR/results.jsonl)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME, r1_target_dir
REL="$(r1_target_dir)/release"
BUILD=1
if [ "${1:-}" = "--no-build" ]; then BUILD=0; shift; fi
WORK="${1:-/tmp/r1-bench-cpu}"
CK="$WORK/ck"
RESULTS="$WORK/results.jsonl"
export CARGO_INCREMENTAL=0
say() { printf '[bench-cpu] %s\n' "$*" >&2; }

cd "$ROOT"
scripts/setup.sh
if [ "$BUILD" = 1 ]; then
  say "building release binaries and the decode bench"
  cargo build --release --workspace --bins --locked --quiet
  cargo bench --workspace --bench decode --no-run --locked --quiet 2>/dev/null
fi
BENCH="$(ls -t "$REL"/deps/decode-* | grep -v '\.d$' | head -1)"

mkdir -p "$WORK"
if [ ! -f "$CK/config.json" ]; then
  say "making the random 1.5B-shape checkpoint"
  "$REL"/r1-fixture --preset r1-distill-qwen-1.5b -o "$CK"
fi
cp -n "$R1_HOME"/tokenizer/tokenizer.json "$R1_HOME"/tokenizer/tokenizer_config.json "$CK/"

for p in int4-wo int8-wo; do
  if [ ! -f "$WORK/r1-$p/manifest.json" ]; then
    say "r1-export --precision $p"
    /usr/bin/time -f "r1-export $p: %e s, peak RSS %M KB" \
      "$REL"/r1-export "$CK" -o "$WORK/r1-$p" --precision "$p" --target cpu --report-samples 2 --quiet
  fi
done
for p in int4 int8; do
  [ -f "$WORK/genai-$p/genai_config.json" ] || python3 scripts/bench_genai.py build "$CK" -o "$WORK" -p "$p"
done

rm -f "$RESULTS"
say "measuring read bandwidth"
BW_LINE="$(R1_BENCH_MODEL="$WORK/r1-int4-wo" R1_BENCH_BACKENDS= "$BENCH" | grep '^read bandwidth')"
echo "$BW_LINE"
BW="$(echo "$BW_LINE" | sed -E 's/^read bandwidth ([0-9.]+) GB\/s.*/\1/')"
run_r1() { # ARTIFACT BACKENDS [DECODE_STEPS]
  R1_BENCH_MODEL="$1" R1_BENCH_BACKENDS="$2" R1_BENCH_STEPS="${3:-32}" R1_BENCH_BANDWIDTH="$BW" R1_BENCH_JSON="$RESULTS" "$BENCH"
}
run_genai() { # MODEL_DIR
  python3 scripts/bench_genai.py run "$1" --json "$WORK/genai.json" && python3 - "$WORK/genai.json" "$RESULTS" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["backend"] = "onnxruntime-genai " + r.get("genai_version", "?")
open(sys.argv[2], "a").write(json.dumps(r) + "\n")
EOF
}
run_r1 "$WORK/r1-int4-wo" ort
run_genai "$WORK/genai-int4"
run_r1 "$WORK/r1-int8-wo" ort
run_genai "$WORK/genai-int8"
# tract (single-threaded, ~0.1 token/s on this shape): 8 timed decode steps instead of 32, to keep the run short.
run_r1 "$WORK/r1-int8-wo" tract 8

python3 - "$RESULTS" "$BW" "$WORK/table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bw = float(sys.argv[2])
out = [f"read bandwidth {bw:.1f} GB/s; roofline = bandwidth / weight bytes read per token", "",
       "| engine | precision | weights read / token | decode b1 (tok/s) | % of roofline | decode b8 aggregate (tok/s) | b8 / b1 | prefill 128 (s) |",
       "|---|---|---|---|---|---|---|---|"]
for r in rows:
    wb = r.get("weight_bytes_per_token")
    roof = bw * 1e9 / wb if wb else None
    share = f"{100 * r['decode_b1_tok_s'] / roof:.0f}%" if roof else "-"
    out.append(f"| {r['backend']} | {r['precision']} | {wb / 1e9:.2f} GB | {r['decode_b1_tok_s']:.2f} | {share} | "
               f"{r['decode_b8_tok_s']:.2f} | {r['decode_b8_tok_s'] / r['decode_b1_tok_s']:.2f} | {r['prefill128_s']:.2f} |"
               if wb else f"| {r['backend']} | {r['precision']} | ? | {r['decode_b1_tok_s']:.2f} | - | {r['decode_b8_tok_s']:.2f} | - | {r['prefill128_s']:.2f} |")
open(sys.argv[3], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
