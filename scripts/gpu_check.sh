#!/usr/bin/env bash
# GPU checks on a host with an NVIDIA GPU: what CI (no GPU) cannot run. Prints a log; exits non-zero on the first
# failed check.
#
#   ORT_DYLIB_PATH=/path/to/onnxruntime-gpu/capi/libonnxruntime.so.1.31.1 scripts/gpu_check.sh OUT_DIR
#
# On a lent GPU machine (device tool; no network there, 64 MiB per call with the working tree): first, on the dev
# machine, `scripts/gpu_libs.sh` (the pinned wheel's libraries, CUDA provider cut to sm_90, xz, in parts under
# .r1/gpu-libs/; it prints the calls), then back-to-back `run` calls, each with `carry` naming the next part(s)
# (`.r1/gpu-libs/onnxruntime-gpu-1.31.1-sm90.tar.xz.sha256` and `.00` in the first) and command `true`, the last one
# with this script as its command: with ORT_DYLIB_PATH unset and an archive under $R1_HOME/gpu-libs, it runs
# `scripts/gpu_libs.sh --unpack ${GPU_LIBS_DIR:-/tmp/r1-onnxruntime-gpu}` (sha256-checked) and uses that library.
#
# ORT_DYLIB_PATH must be the library of the `onnxruntime-gpu` 1.31.1 wheel (CUDA 13 build), with its
# libonnxruntime_providers_{shared,cuda[,tensorrt]}.so beside it, and CUDA 13's cuBLAS / cuDNN 9 / cudart / cuRAND on
# the loader path (LD_LIBRARY_PATH). BIN (default <cargo target dir>/release) holds r1-export, r1-fixture, r1-serve, r1-bench and
# r1-eval; TESTS (default: the newest cargo-built binaries under <cargo target dir>/debug/deps) holds the `golden` and
# `conformance`, `exported_conformance` and `cuda_serving_graph` test binaries. STEPS (default "1 2 3 4 5") picks the checks to run. Checks, in order:
#   1. the GPU is seen (nvidia-smi) and r1-export maps it to its TensorRT target;
#   2. `r1-export --target <that target>` on a golden fixture: builds the TensorRT engine when TensorRT is installed,
#      else fails with the error that names what is missing (both are reported; only a panic or a silent success
#      without an engine fails the check);
#   3. the golden suite (transformers' logits, fp32 and fp16) with ONNX Runtime on the GPU (auto picks CUDA when
#      TensorRT is absent) and tract, and the engine conformance suite;
#   4. arith-r1 through r1-eval on the GPU (accuracy equal to the CPU figure in BENCHMARKS.md);
#   5. r1-serve on the GPU (`--execution-provider cuda`) under r1-bench at concurrency 1 and 16 on the 1.5B shape
#      (random weights from r1-fixture), fp16 exported with `--target <this GPU>` (so, without TensorRT, the CUDA
#      serving graph with the KV pool on the GPU), written to OUT_DIR/bench-*.json; then HF transformers on the same
#      GPU (scripts/hf_gpu_peer.py: static cache, torch.compile) and the batch-1 memory roofline, as one table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME (exported), r1_target_dir
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
BIN="${BIN:-$(r1_target_dir)/release}"
cd "$ROOT"
mkdir -p "$OUT"
if [ -z "${ORT_DYLIB_PATH:-}" ] && compgen -G "$R1_HOME/gpu-libs/*.tar.xz.sha256" >/dev/null; then
  dylib="$(bash scripts/gpu_libs.sh --unpack "${GPU_LIBS_DIR:-/tmp/r1-onnxruntime-gpu}")"
  ORT_DYLIB_PATH="${dylib#ORT_DYLIB_PATH=}"
fi
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the libonnxruntime.so of onnxruntime-gpu (or carry the archive of scripts/gpu_libs.sh)}"
export ORT_DYLIB_PATH
newest() { ls -t "${TESTS:-$(r1_target_dir)/debug/deps}"/"$1"-* 2>/dev/null | grep -v '\.d$' | head -1; }
step() { echo; echo "== $*"; }
want() { [[ " ${STEPS:-1 2 3 4 5} " == *" $1 "* ]]; }
failed=()

step "1. GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
fixture=tests/fixtures/golden/qwen2_gqa2_bf16
case "$gpu" in
  *H100*) target=h100 ;; *H200*) target=h200 ;; *A100*) target=a100 ;; *L40S*) target=l40s ;; *L4*) target=l4 ;;
  *) target=h100 ;;
esac

if want 2; then
step "2. TensorRT build for this GPU (r1-export --target)"
rm -rf "$OUT/trt"
set +e
"$BIN/r1-export" "$fixture" -o "$OUT/trt" --precision fp16 --target "$target" --quiet >"$OUT/trt.log" 2>&1
rc=$?
set -e
cat "$OUT/trt.log"
if [ $rc -eq 0 ] && [ -d "$OUT/trt/engines/$target" ]; then
  echo "TensorRT engine built for $target"
elif grep -q "panicked" "$OUT/trt.log"; then
  echo "gpu_check: r1-export panicked" >&2; exit 1
else
  echo "(exit $rc: no TensorRT on this host, reported above)"
  # Serving with the TensorRT provider asked for by name must fail the same way, naming what is missing.
  rm -rf "$OUT/plain-fp16"
  "$BIN/r1-export" tests/fixtures/arith-r1 -o "$OUT/plain-fp16" --precision fp16 --quiet
  if "$BIN/r1-serve" generate --model "$OUT/plain-fp16" --execution-provider tensorrt --max-tokens 4 "Hi" \
    >"$OUT/trt-serve.log" 2>&1; then
    failed+=("r1-serve --execution-provider tensorrt ran without TensorRT")
  fi
  cat "$OUT/trt-serve.log"
fi
fi

if want 3; then
step "3. golden suite and engine conformance on the GPU"
"$(newest golden)" --test-threads 1 --nocapture 2>&1 | tee "$OUT/golden.log" || failed+=("golden suite")
"$(newest conformance)" --test-threads 1 2>&1 | tee "$OUT/conformance.log" || failed+=("conformance suite")
"$(newest exported_conformance)" --test-threads 1 2>&1 | tee -a "$OUT/conformance.log" || failed+=("exported-artifact conformance")
# The CUDA serving graph with the KV pool in device memory: greedy tokens equal to the CPU provider's.
"$(newest cuda_serving_graph)" --test-threads 1 --nocapture 2>&1 | tee -a "$OUT/conformance.log" \
  || failed+=("CUDA serving graph (device KV pool)")
fi

if want 4; then
step "4. arith-r1 on the GPU (r1-eval)"
rm -rf "$OUT/arith-fp32"
"$BIN/r1-export" tests/fixtures/arith-r1 -o "$OUT/arith-fp32" --precision fp32 --quiet
"$BIN/r1-eval" --model "$OUT/arith-fp32" --data tests/fixtures/arith-r1/heldout.jsonl --execution-provider cuda \
  --json-out "$OUT/arith-eval-cuda.json" 2>&1 | tail -5 || failed+=("arith-r1 eval")
fi

if want 5; then
step "5. r1-serve on the GPU under r1-bench, 1.5B shape (random weights), fp16"
ck="${CHECKPOINT_1_5B:-/tmp/r1-gpu-1.5b-ck}"
[ -f "$ck/config.json" ] || "$BIN/r1-fixture" --preset r1-distill-qwen-1.5b -o "$ck"
# The served artifact needs a tokenizer: the real R1 one (scripts/setup.sh puts it under $R1_HOME/tokenizer).
[ -f "$ck/tokenizer.json" ] || cp "$R1_HOME"/tokenizer/tokenizer.json "$R1_HOME"/tokenizer/tokenizer_config.json "$ck"/
art="${ARTIFACT_1_5B:-/tmp/r1-gpu-1.5b-fp16}"
# `--target <this GPU's target>` without TensorRT writes the CUDA serving graph (targets.<target>.cuda_graph): the
# KV pool on the GPU, appended in place, last-position logits only crossing back.
[ -f "$art/manifest.json" ] || "$BIN/r1-export" "$ck" -o "$art" --precision fp16 --target "$target" --quiet
grep -q '"cuda_graph"' "$art/manifest.json" && echo "the artifact records a CUDA serving graph" \
  || echo "(no CUDA serving graph recorded: TensorRT built instead, or an older artifact)"
"$BIN/r1-serve" --model "$art" --grpc-addr 127.0.0.1:50251 --http-addr 127.0.0.1:8281 --execution-provider cuda \
  --max-batch-size 16 --max-concurrent-requests 64 --skip-integrity-check --log info >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf http://127.0.0.1:8281/health >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "gpu_check: r1-serve exited while loading" >&2; exit 1; }
  sleep 1
done
for c in 1 16; do
  n=$((c * 4))
  echo "-- concurrency $c, $n requests, prompt 16, max_tokens 64"
  "$BIN/r1-bench" --addr http://127.0.0.1:50251 -n "$n" -c "$c" --prompt-tokens 16 --max-tokens 64 --json \
    | tee "$OUT/bench-c$c.json"
done
kill -TERM $server && wait $server || true
trap - EXIT
grep -E "serving graph|KV pool allocated|ort session ready" "$OUT/serve.log" | head -5 || true
echo "-- the peer in the same run: HF transformers, fp16, static cache + torch.compile (scripts/hf_gpu_peer.py)"
timeout "${PEER_TIMEOUT:-240}" python3 scripts/hf_gpu_peer.py "$ck" --batch 1 16 --prompt-tokens 16 --max-tokens 64 \
  | tee "$OUT/peer.jsonl" || echo "(the transformers peer failed or ran out of time: see above)"
python3 - "$OUT" <<'PY' || true
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
r1 = {c: json.loads((out / f"bench-c{c}.json").read_text())["tokens_per_s"] for c in (1, 16)}
peer, roof = {}, {}
for line in (out / "peer.jsonl").read_text().splitlines() if (out / "peer.jsonl").exists() else []:
    d = json.loads(line)
    roof = d.get("roofline", roof)
    if d.get("peer"):
        peer[d["batch"]] = d["tokens_per_s"]
print("| concurrency | r1-serve tok/s | transformers tok/s | r1 / roofline |")
print("|---|---|---|---|")
for c in (1, 16):
    rl = roof.get("roofline_tokens_per_s")
    share = f"{r1[c] / rl:.0%}" if rl and c == 1 else "-"
    p = f"{peer[c]:.1f}" if c in peer else "-"
    print(f"| {c} | {r1[c]:.1f} | {p} | {share} |")
if roof:
    print(f"roofline: {roof}")
print(f"aggregate at 16 / batch 1: {r1[16] / r1[1]:.1f}x")
PY
fi
echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "gpu_check: every check passed"
