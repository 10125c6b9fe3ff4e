#!/usr/bin/env bash
# Entrypoint of both r1 images: finds ONNX Runtime (ORT_DYLIB_PATH: set in the CPU image; in the GPU image taken from
# the onnxruntime-gpu package, which carries the CUDA and TensorRT providers next to it), then runs the command:
#   r1-serve [flags]                                  serve (the default command)
#   r1-export build /models/model --target <target>   build the target's engine into the artifact (see deploy/README.md)
set -euo pipefail
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ORT_DYLIB_PATH="$(python3 -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))[-1])')"
  export ORT_DYLIB_PATH
fi
exec "$@"
