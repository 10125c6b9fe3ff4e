#!/usr/bin/env bash
# Sets up and runs the whole r1 test suite (what CI runs: .ci/run calls this script).
#
# 0. cargo fmt --check; after the build, cargo clippy --workspace --all-targets -D warnings
# 1. scripts/setup.sh --test-tools : ONNX Runtime library (pinned PyPI wheel, sha256-checked), the R1 tokenizer,
#    and a Python venv with the ONNX checker, all under .r1/ (ignored by git)
# 2. build the binaries (in cargo's target directory: CARGO_TARGET_DIR is honoured) and export every golden fixture
#    (fp32 + fp16) with r1-export; then the fresh-machine check: the binaries load ONNX Runtime from $R1_HOME/lib
#    with R1_ORT_PYTHON_FALLBACK=off (the whole suite runs so), from / with R1_HOME set and from the repo without it
# 3. cargo test over the whole workspace (golden numerics on ort and tract, export errors, engine conformance on
#    an exported artifact, arith-r1 end to end, server over real sockets, calibration property tests, ...)
# 4. the OpenAI Python client, a Python gRPC client (stubs from proto/) and a short soak against r1-serve on arith-r1;
#    the unit tests of scripts/gpu_libs.py (the GPU libraries' fat binary trim, on synthetic bytes)
# 5. onnx.checker.check_model(full_check=True) on every exported golden graph
# 6. deploy/ checks: the Helm chart rendered for every target and diffed against deploy/rendered/, kubernetes-validate,
#    helm lint, hadolint, structural cross-checks (grace vs drain, adapter rules vs HPA, collector, dashboard)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME (default $ROOT/.r1), r1_target_dir
cd "$ROOT"

command -v cargo >/dev/null || { echo "error: cargo not found: install Rust (https://rustup.rs) and run again" >&2; exit 1; }

echo "== cargo fmt --check (rustfmt.toml)"
cargo fmt --all --check

bash scripts/setup.sh --test-tools
# The whole suite runs on the project-local ONNX Runtime only: no ORT_DYLIB_PATH, and no fallback to an onnxruntime
# Python package a machine may have lying around (which once hid a broken set-up from CI).
unset ORT_DYLIB_PATH
export R1_ORT_PYTHON_FALLBACK=off
TARGET="$(r1_target_dir)"
BIN="$TARGET/debug"
# Incremental compilation state is only useful to edit-compile loops; in a one-shot run it costs GBs of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "== build (r1-export, r1-fixture, r1-serve, r1-bench, r1-eval and every test binary)"
# One build for binaries and tests: `cargo build --bins` resolves dependency features without the dev-dependencies,
# so it would compile a second copy of every shared dependency (~1 GB of target/ and minutes on 2 cores). Building
# the tests also builds and uplifts each package's binaries to target/debug/ (every package with a binary has
# integration tests), which the export step below uses.
cargo test --workspace --locked --no-run
for bin in r1-export r1-fixture r1-serve r1-bench r1-eval; do
  [ -x "$BIN/$bin" ] || { echo "error: $BIN/$bin was not built by 'cargo test --no-run'" >&2; exit 1; }
done

echo "== cargo clippy (every target, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "== export every golden case at fp32 and fp16 (artifacts for the graph checker and the conformance suite)"
dirs=()
for case in tests/fixtures/golden/*/; do
  [ -f "$case/config.json" ] || continue
  name="$(basename "$case")"
  for precision in fp32 fp16; do
    "$BIN/r1-export" "$case" -o "$out/$name-$precision" --precision "$precision" --quiet
    dirs+=("$out/$name-$precision")
  done
done
# The CPU serving graph of one exported case, built from the command line (the graph checker below reads it too).
"$BIN/r1-export" build "$out/qwen2_gqa2_bf16-fp32" --target cpu

echo "== fresh-machine path: the binaries find \$R1_HOME/lib with the Python fallback off, from any directory"
# R1_HOME set (as the scripts set it), run from / so that no walk up from the current directory can help; then
# R1_HOME unset, run from the repository (the walk finds .r1/lib). Each must load ONNX Runtime and generate.
fresh="$out/arith-r1-fp32"
"$BIN/r1-export" tests/fixtures/arith-r1 -o "$fresh" --quiet
(cd / && "$BIN/r1-serve" generate --model "$fresh" --backend ort --max-tokens 2 "What is 1+1?" >/dev/null) \
  || { echo "error: r1-serve did not find ONNX Runtime under R1_HOME=$R1_HOME (R1_ORT_PYTHON_FALLBACK=off)" >&2; exit 1; }
if [ "$R1_HOME" = "$ROOT/.r1" ]; then
  (unset R1_HOME; "$BIN/r1-serve" generate --model "$fresh" --backend ort --max-tokens 2 "What is 1+1?" >/dev/null) \
    || { echo "error: r1-serve did not find $ROOT/.r1/lib with R1_HOME unset (R1_ORT_PYTHON_FALLBACK=off)" >&2; exit 1; }
fi

echo "== cargo test (workspace)"
cargo test --workspace --locked

echo "== OpenAI Python client (PyPI openai, pinned) against r1-serve on arith-r1"
"$R1_HOME/venv/bin/python" tests/openai_client.py --serve-bin "$BIN/r1-serve" --export-bin "$BIN/r1-export"

echo "== gRPC from Python (grpcio stubs built from proto/, pinned; .r1/grpc-venv) against r1-serve on arith-r1"
python3 tests/grpc_client.py --serve-bin "$BIN/r1-serve" --export-bin "$BIN/r1-export"

echo "== scripts/gpu_libs.py: fat binary trim and GPU-library archive round trip (synthetic ELF; no GPU, no network)"
python3 scripts/test_gpu_libs.py

echo "== soak (short): 64 warm-up + 200 GenerateStream requests at concurrency 16; zero errors, RSS floor flat"
"$R1_HOME/venv/bin/python" scripts/test_soak.py
"$R1_HOME/venv/bin/python" scripts/soak.py --short --serve-bin "$BIN/r1-serve" --export-bin "$BIN/r1-export" --bench-bin "$BIN/r1-bench"

echo "== onnx.checker.check_model(full_check=True) on ${#dirs[@]} exported graphs"
"$R1_HOME/venv/bin/python" tests/fixtures/check_onnx.py "${dirs[@]}"

echo "== deploy checks"
bash deploy/check.sh
