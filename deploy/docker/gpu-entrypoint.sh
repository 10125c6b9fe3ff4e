#!/usr/bin/env bash
# Builds the TensorRT engine for $R1_TARGET on first start (unless prebuilt), then execs r1-serve.
set -euo pipefail
: "${R1_MODEL:?set R1_MODEL to the artifact directory}"
: "${R1_TARGET:?set R1_TARGET to the GPU target (a100, h100, l4, ...)}"
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))[-1])')}"
export ORT_DYLIB_PATH
if [ ! -d "$R1_MODEL/engines/$R1_TARGET" ] || [ -z "$(ls -A "$R1_MODEL/engines/$R1_TARGET" 2>/dev/null)" ]; then
  echo "[entrypoint] no prebuilt engine for $R1_TARGET in $R1_MODEL/engines/: building it now (minutes)" >&2
  r1-export build "$R1_MODEL" --target "$R1_TARGET"
fi
exec r1-serve "$@"
