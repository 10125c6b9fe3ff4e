#!/usr/bin/env bash
# Batch-1 decode speed against context length, through r1-serve, next to ONNX Runtime GenAI in the same run: the
# cache-pool issue's CPU figure (decode at a 4,000-token context vs a 128-token one; r1 vs GenAI int8 at 2,048).
#
#   scripts/bench_long_context.sh [WORK_DIR]
#       WORK_DIR defaults to /tmp/r1-bench-cpu (shared with scripts/bench_cpu.sh: the checkpoint, the r1 int8-wo
#       artifact and GenAI's int8 build are reused when they exist, made otherwise).
#   env: CONTEXTS="128 2048 4000", STEPS=48 (decode tokens timed per context), GRPC_PORT=50161, HTTP_PORT=8191,
#        GENAI=0 to skip GenAI, KV_CACHE_DTYPE=auto (the serving graph's cache: auto = fp16 for this int8-wo
#        artifact; fp32 to compare).
#
# Per context C: r1-bench sends one request of ~C prompt tokens with max_tokens STEPS (through EOS, greedy) at
# concurrency 1, twice; the decode rate is 1000 / (inter-token latency p50 in ms) of the second. GenAI: `bench_genai.py
# run --context C` (prompt of C tokens, then its 32 timed decode steps). One after the other on an idle machine.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME, r1_target_dir
REL="$(r1_target_dir)/release"
WORK="${1:-/tmp/r1-bench-cpu}"
CK="$WORK/ck"
ART="$WORK/r1-int8-wo"
CONTEXTS="${CONTEXTS:-128 2048 4000}"
STEPS="${STEPS:-48}"
GRPC_PORT="${GRPC_PORT:-50161}"
HTTP_PORT="${HTTP_PORT:-8191}"
say() { printf '[bench-long-context] %s\n' "$*" >&2; }
cd "$ROOT"
for b in r1-fixture r1-export r1-serve r1-bench; do
  [ -x "$REL/$b" ] || { say "build the release binaries first: cargo build --release --workspace --bins --locked"; exit 2; }
done
mkdir -p "$WORK"
if [ ! -f "$CK/config.json" ]; then
  say "making the random 1.5B-shape checkpoint"
  "$REL"/r1-fixture --preset r1-distill-qwen-1.5b -o "$CK"
fi
cp -n "$R1_HOME"/tokenizer/tokenizer.json "$R1_HOME"/tokenizer/tokenizer_config.json "$CK/"
if [ ! -f "$ART/manifest.json" ]; then
  say "r1-export --precision int8-wo --target cpu"
  /usr/bin/time -f "r1-export int8-wo: %e s, peak RSS %M KB" \
    "$REL"/r1-export "$CK" -o "$ART" --precision int8-wo --target cpu --report-samples 2 --quiet
fi
# A no-op when the recorded cpu build is current (same graph, cache type, builders); rebuilt otherwise.
"$REL"/r1-export build "$ART" --target cpu --kv-cache-dtype "${KV_CACHE_DTYPE:-auto}"
python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['targets']['cpu']; print('[bench-long-context] cpu graph:', c['graph'], c.get('attention_op'), 'cache', c.get('kv_cache_dtype'))" "$ART/manifest.json" >&2

say "r1-serve on $ART"
"$REL"/r1-serve --model "$ART" --grpc-addr "127.0.0.1:$GRPC_PORT" --http-addr "127.0.0.1:$HTTP_PORT" \
  --max-batch-size 4 --max-batch-tokens 8192 --prefill-chunk 8192 --skip-integrity-check --log warn &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { say "r1-serve exited while loading"; exit 1; }
  sleep 1
done
for c in $CONTEXTS; do
  for run in 1 2; do
    out="$("$REL"/r1-bench --addr "http://127.0.0.1:$GRPC_PORT" -n 1 -c 1 --prompt-tokens "$c" \
      --max-tokens "$STEPS" --json)"
  done
  python3 - "$c" "$out" <<'EOF'
import json, sys
c, r = sys.argv[1], json.loads(sys.argv[2])
itl = r["itl_ms"]["p50"]
print(json.dumps({"engine": "r1-serve", "context": int(c), "prompt_tokens": r["prompt_tokens"],
                  "decode_tok_s": round(1000.0 / itl, 2), "itl_p50_ms": round(itl, 1),
                  "ttft_p50_ms": round(r["ttft_ms"]["p50"], 0), "failed": r["failed"]}))
EOF
done
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E "^r1_kv_(preemptions|cache_capacity)" || true
kill -TERM $SERVER && wait $SERVER || true
trap - EXIT

if [ "${GENAI:-1}" != 0 ]; then
  [ -f "$WORK/genai-int8/genai_config.json" ] || python3 scripts/bench_genai.py build "$CK" -o "$WORK" -p int8
  say "ONNX Runtime GenAI int8"
  # shellcheck disable=SC2086
  python3 scripts/bench_genai.py run "$WORK/genai-int8" --context $CONTEXTS | grep -E "context"
fi
