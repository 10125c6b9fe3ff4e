#!/usr/bin/env bash
# Decode speed of several artifacts side by side, one after the other in one run: for each, r1-serve is started on
# it and r1-bench measures batch 1 (`-n 4 -c 1`) and batch 8 (`-n 16 -c 8`), 16 prompt tokens, 64 generated,
# greedy, streaming gRPC. Prints one line per artifact.
#
#   bash scripts/bench_ab.sh ART_DIR...      (release binaries: cargo build --release -p r1-serve --bins)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REL="$(r1_target_dir)/release"
port=50951
printf '%-44s %14s %16s\n' artifact "b1 tok/s" "b8 agg tok/s"
for art in "$@"; do
  "$REL/r1-serve" --model "$art" --backend ort --grpc-addr "127.0.0.1:$port" --http-addr "127.0.0.1:$((port + 1))" \
    >/tmp/r1-bench-ab.log 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$((port + 1))/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  b1=$("$REL/r1-bench" --addr "http://127.0.0.1:$port" -n 4 -c 1 --prompt-tokens 16 --max-tokens 64 --json)
  b8=$("$REL/r1-bench" --addr "http://127.0.0.1:$port" -n 16 -c 8 --prompt-tokens 16 --max-tokens 64 --json)
  kill -TERM "$pid"; wait "$pid" || true
  python3 - "$art" "$b1" "$b8" <<'PY'
import json, sys
art, b1, b8 = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
key = "tokens_per_s"
print(f"{art:<44} {b1[key]:>14.2f} {b8[key]:>16.2f}   ({key})")
PY
  port=$((port + 10))
done
