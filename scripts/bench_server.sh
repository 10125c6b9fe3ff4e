#!/usr/bin/env bash
# Server throughput of issue 6, in one run: the in-process engine (decode bench), then r1-serve under r1-bench at
# several concurrencies, then ONNX Runtime GenAI's batch-8 figure.
#
#   scripts/bench_server.sh ARTIFACT [GENAI_MODEL_DIR]
#       ARTIFACT         an r1-export output (e.g. /tmp/r1-bench-cpu/r1-int8-wo from scripts/bench_cpu.sh)
#       GENAI_MODEL_DIR  optional, a GenAI build (e.g. /tmp/r1-bench-cpu/genai-int4)
#   env: CONCURRENCY="1 8 16" (requests per level: 2 x concurrency, 4 at concurrency 1), MAX_TOKENS=64, PROMPT=16,
#        BANDWIDTH=GB/s (skips the decode bench's bandwidth pass), GRPC_PORT=50151, HTTP_PORT=8181
#
# Uses the release binaries (build them first: cargo build --release --workspace --bins --locked and
# cargo bench --workspace --bench decode --no-run --locked). Prints one JSON report per concurrency level.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME, r1_target_dir
REL="$(r1_target_dir)/release"
ART="${1:?usage: scripts/bench_server.sh ARTIFACT [GENAI_MODEL_DIR]}"
GENAI="${2:-}"
GRPC_PORT="${GRPC_PORT:-50151}"
HTTP_PORT="${HTTP_PORT:-8181}"
cd "$ROOT"
[ -f "$ART/manifest.json" ] || { echo "bench_server: $ART has no manifest.json (not an r1-export output)" >&2; exit 2; }
BENCH="$(ls -t "$REL"/deps/decode-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
[ -x "$REL/r1-serve" ] && [ -x "$REL/r1-bench" ] && [ -n "$BENCH" ] \
  || { echo "bench_server: build the release binaries and the decode bench first (see the header)" >&2; exit 2; }

echo "== in-process engine: $ART"
env R1_BENCH_MODEL="$ART" R1_BENCH_BACKENDS=ort ${BANDWIDTH:+R1_BENCH_BANDWIDTH=$BANDWIDTH} "$BENCH" | tail -2

echo "== r1-serve"
"$REL"/r1-serve --model "$ART" --grpc-addr "127.0.0.1:$GRPC_PORT" --http-addr "127.0.0.1:$HTTP_PORT" \
  --max-batch-size 16 --max-concurrent-requests 64 --skip-integrity-check --log warn &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "bench_server: r1-serve exited while loading" >&2; exit 1; }
  sleep 1
done
for c in ${CONCURRENCY:-1 8 16}; do
  n=$((c * 2)); [ "$c" = 1 ] && n=4
  echo "-- concurrency $c, $n requests, prompt ${PROMPT:-16}, max_tokens ${MAX_TOKENS:-64}"
  "$REL"/r1-bench --addr "http://127.0.0.1:$GRPC_PORT" -n "$n" -c "$c" \
    --prompt-tokens "${PROMPT:-16}" --max-tokens "${MAX_TOKENS:-64}" --json
done
kill -TERM $SERVER && wait $SERVER || true
trap - EXIT

if [ -n "$GENAI" ]; then
  echo "== ONNX Runtime GenAI: $GENAI"
  python3 scripts/bench_genai.py run "$GENAI" | grep -E "decode|prefill"
fi
