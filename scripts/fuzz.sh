#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for N seconds each (what a developer or a nightly job runs; the normal test
# suite only replays the committed corpora: tests/tests/fuzz_corpus.rs).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes nightly-only rustc flags; on a stable
# toolchain this script sets RUSTC_BOOTSTRAP=1 to allow them. Builds go to fuzz/target (ignored), release mode with
# debug assertions and overflow checks, no sanitizer (the parsers are safe Rust; set R1_FUZZ_SANITIZER=address for
# ASan). New inputs that grow coverage are added to fuzz/corpus/<target>/; crashes are written to
# fuzz/artifacts/<target>/ and fail the run. Minimize a corpus before committing it:
#   RUSTC_BOOTSTRAP=1 cargo fuzz cmin -s none <target>      (from the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECS="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null || { echo "error: cargo-fuzz not found: cargo install cargo-fuzz --locked" >&2; exit 2; }
export RUSTC_BOOTSTRAP=1
SAN="${R1_FUZZ_SANITIZER:-none}"
if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

echo "== cargo fuzz build (${#targets[@]} targets, sanitizer $SAN)"
t0=$(date +%s)
cargo fuzz build -s "$SAN" --target-dir fuzz/target
echo "built in $(( $(date +%s) - t0 )) s"

failed=()
for t in "${targets[@]}"; do
  echo "== $t: ${SECS} s"
  mkdir -p "fuzz/corpus/$t"
  # -rss_limit_mb: an input that makes a parser allocate GBs is a bug too. -max_len: configs and manifests of
  # real checkpoints are a few KiB.
  rc=0
  cargo fuzz run -s "$SAN" --target-dir fuzz/target "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=16384 -timeout=10 -print_final_stats=1 \
    >"fuzz/target/$t.log" 2>&1 || rc=$?
  grep -E "^#[0-9]+ +DONE|^stat::(number_of_executed_units|new_units_added|peak_rss_mb)|^SUMMARY|panicked at" \
    "fuzz/target/$t.log" | tr '\n' ' '
  echo
  if [ "$rc" != 0 ]; then
    failed+=("$t")
    grep -E "panicked at|^SUMMARY|Test unit written to" "fuzz/target/$t.log" >&2 || true
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/, logs in fuzz/target/<target>.log)" >&2
  exit 1
fi
echo "all ${#targets[@]} targets ran ${SECS} s without a crash"
