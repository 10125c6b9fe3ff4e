#!/usr/bin/env bash
# ONNX Runtime's GPU libraries for a lent GPU machine (no network there; at most 64 MiB travels per device call,
# the working tree included): the pinned `onnxruntime-gpu` wheel's libraries with the CUDA provider's fat binary cut
# to the kept GPU architectures, compressed and split into parts that each fit beside the working tree.
#
# On this machine (PyPI reachable):
#   scripts/gpu_libs.sh [--sm 90[,80,...]] [--part-mib auto|N] [--max-mib 60] [--keep-wheel]
#     1. downloads onnxruntime-gpu 1.31.1 (the one wheel pinned below; sha256-checked; deleted afterwards unless
#        --keep-wheel, which keeps it in $R1_HOME/cache where a later run finds it);
#     2. extracts libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so, libonnxruntime_providers_cuda.so and
#        libonnxruntime_providers_tensorrt.so (1 MB: r1 asks for the TensorRT provider by name and reports the
#        missing TensorRT libraries through it, so it travels although the machine has no TensorRT);
#     3. zeroes, in the CUDA provider's `.nv_fatbin`, the payload of every entry no GPU of the kept SMs loads
#        (scripts/gpu_libs.py: sizes and offsets unchanged, the ELF intact);
#     4. writes $R1_HOME/gpu-libs/onnxruntime-gpu-1.31.1-sm<SMs>.tar.xz.{00,01,...} (xz -9e, ≤ --max-mib in all)
#        and .tar.xz.sha256 (the whole archive's sha256, then each part's), and prints the device calls that carry
#        them (each call's parts count towards its 64 MiB beside the working tree; --part-mib auto: parts as large
#        as fit beside today's working tree less 3 MiB, so that each call carries one).
#   Default --sm 90: H100 and H200 (57.1 MiB). The 1.31.1 wheel holds cubins for sm_75/80/86/89/90/120 and no PTX;
#   with sm_80 too the archive is 86.8 MiB, over the limit (for an A100: --sm 80 alone).
#
# On the GPU machine (after the calls that carried the parts):
#   scripts/gpu_libs.sh --unpack DEST [--sm 90]   (--sm needed only where several archives were carried)
#     checks every part and the joined archive against the .sha256 list, extracts into DEST, checks each library
#     against the archive's manifest and the GPU (nvidia-smi) against the kept SMs, names the CUDA libraries the
#     loader does not find, and prints ORT_DYLIB_PATH=DEST/libonnxruntime.so.1.31.1 (the only line on stdout).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME (exported)
PY="${PYTHON:-python3}"

ORT_GPU_VERSION="1.31.1"
ORT_GPU_WHEEL="onnxruntime_gpu-${ORT_GPU_VERSION}-cp312-cp312-manylinux_2_28_x86_64.whl"
ORT_GPU_SHA256="05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7"
LIBS="libonnxruntime.so.${ORT_GPU_VERSION},libonnxruntime_providers_shared.so,libonnxruntime_providers_cuda.so,libonnxruntime_providers_tensorrt.so"

say() { printf '[gpu-libs] %s\n' "$*" >&2; }
die() { printf '[gpu-libs] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

sm="90" sm_given="" part_mib="auto" max_mib="60" keep_wheel="" unpack=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sm) sm="${2:?--sm needs a list like 90 or 80,90}"; sm_given=1; shift 2 ;;
    --part-mib) part_mib="${2:?--part-mib needs a number of MiB (0: one part) or auto}"; shift 2 ;;
    --max-mib) max_mib="${2:?--max-mib needs a number of MiB}"; shift 2 ;;
    --keep-wheel) keep_wheel=1; shift ;;
    --unpack) unpack="${2:?--unpack needs the folder to extract into}"; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$sm" =~ ^(sm_)?[0-9]+(,(sm_)?[0-9]+)*$ ]] || die "--sm '$sm': expected compute capabilities like 90 or 80,90"
sms="$(printf '%s\n' "${sm//sm_/}" | tr ',' '\n' | sort -nu | paste -sd, -)"
NAME="onnxruntime-gpu-${ORT_GPU_VERSION}-sm${sms//,/-sm}"
OUT_DIR="$R1_HOME/gpu-libs"
command -v "$PY" >/dev/null || die "python3 is required"

if [ -n "$unpack" ]; then
  if [ -z "$sm_given" ]; then  # the one archive there, whatever its SMs
    shopt -s nullglob
    found=("$OUT_DIR/onnxruntime-gpu-$ORT_GPU_VERSION-sm"*.tar.xz.sha256)
    shopt -u nullglob
    if [ ${#found[@]} -eq 1 ]; then
      NAME="$(basename "${found[0]}" .tar.xz.sha256)"
    elif [ ${#found[@]} -gt 1 ]; then
      die "${#found[@]} archives in $OUT_DIR (${found[*]##*/}): pick one with --sm"
    fi
  fi
  exec "$PY" "$ROOT/scripts/gpu_libs.py" unpack --src "$OUT_DIR" --name "$NAME" --dest "$unpack"
fi

"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing: install it (e.g. 'apt-get install python3-pip') and run again"
mkdir -p "$R1_HOME/cache" "$OUT_DIR"
wheel="$R1_HOME/cache/$ORT_GPU_WHEEL"
if [ -f "$wheel" ] && echo "$ORT_GPU_SHA256  $wheel" | sha256sum -c --status; then
  say "using $wheel"
else
  rm -f "$wheel"
  dl="$(mktemp -d "$R1_HOME/cache/gpu-wheel.XXXXXX")"
  trap 'rm -rf "$dl"' EXIT
  say "downloading onnxruntime-gpu==$ORT_GPU_VERSION from PyPI (about 256 MB)"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$dl" "onnxruntime-gpu==$ORT_GPU_VERSION" \
    || die "pip could not download onnxruntime-gpu==$ORT_GPU_VERSION (is PyPI reachable? a proxy set in PIP_INDEX_URL?)"
  [ -f "$dl/$ORT_GPU_WHEEL" ] || die "pip did not save $ORT_GPU_WHEEL (saved: $(ls "$dl"))"
  got="$(sha256sum "$dl/$ORT_GPU_WHEEL" | cut -d' ' -f1)"
  [ "$got" = "$ORT_GPU_SHA256" ] || die "sha256 mismatch for $ORT_GPU_WHEEL: expected $ORT_GPU_SHA256, got $got"
  if [ -n "$keep_wheel" ]; then mv "$dl/$ORT_GPU_WHEEL" "$wheel"; else wheel="$dl/$ORT_GPU_WHEEL"; fi
fi
say "$ORT_GPU_WHEEL: sha256 $ORT_GPU_SHA256 (checked)"

unpack_cmd="scripts/gpu_libs.sh --unpack /tmp/r1-onnxruntime-gpu (or scripts/gpu_check.sh OUT_DIR, which runs it)"
"$PY" "$ROOT/scripts/gpu_libs.py" build --wheel "$wheel" --out-dir "$OUT_DIR" --name "$NAME" --sm "$sms" \
  --libs "$LIBS" --max-mib "$max_mib" --part-mib "$part_mib" --repo "$ROOT" --unpack-cmd "$unpack_cmd"
