#!/usr/bin/env bash
# Sets up and runs the whole r1 test suite (what CI runs: .ci/run calls this script).
#
# 1. scripts/setup.sh --test-tools : ONNX Runtime library (pinned PyPI wheel, sha256-checked), the R1 tokenizer,
#    and a Python venv with the ONNX checker, all under .r1/ (ignored by git)
# 2. cargo test over the whole workspace (golden numerics on ort and tract, export errors, engine, server, ...)
# 3. onnx.checker.check_model(full_check=True) on every golden fixture exported by r1-export
# 4. deploy/ checks (Kubernetes manifests, Dockerfiles) when deploy/check.sh exists
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

command -v cargo >/dev/null || { echo "error: cargo not found: install Rust (https://rustup.rs) and run again" >&2; exit 1; }

bash scripts/setup.sh --test-tools
export R1_HOME="$ROOT/.r1"

echo "== cargo test (workspace)"
cargo test --workspace --locked 2>&1 | tee "$R1_HOME/cargo-test.log"

if [ -f tests/fixtures/check_onnx.py ]; then
  echo "== onnx.checker on exported golden graphs"
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  dirs=()
  for case in tests/fixtures/golden/*/; do
    [ -f "$case/config.json" ] || continue
    name="$(basename "$case")"
    for precision in fp32 fp16; do
      cargo run --quiet --locked -p r1-export --bin r1-export -- "$case" -o "$out/$name-$precision" --precision "$precision" >/dev/null
      dirs+=("$out/$name-$precision")
    done
  done
  "$R1_HOME/venv/bin/python" tests/fixtures/check_onnx.py "${dirs[@]}"
fi

if [ -f deploy/check.sh ]; then
  echo "== deploy checks"
  bash deploy/check.sh
fi
