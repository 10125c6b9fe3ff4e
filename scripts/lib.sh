# Shared by the scripts in scripts/ (sourced, not run). Defines ROOT and R1_HOME (exported), and r1_target_dir.
#
#   ROOT     the repository
#   R1_HOME  the r1 home folder itself, holding lib/ (ONNX Runtime), tokenizer/ and venv/; default $ROOT/.r1.
#            The engine reads the same variable with the same meaning (engine/src/ort_lib.rs).
#   r1_target_dir  prints cargo's target directory for this workspace, as cargo reports it: it honours
#            CARGO_TARGET_DIR and build.target-dir in .cargo/config.toml (binaries: <it>/debug, <it>/release).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
R1_HOME="${R1_HOME:-$ROOT/.r1}"
export R1_HOME

r1_target_dir() {
  local meta
  if ! command -v cargo >/dev/null 2>&1; then
    # A host that runs prebuilt binaries (a GPU host given the build by copy) may have no cargo.
    printf '%s\n' "${CARGO_TARGET_DIR:-$ROOT/target}"
    return 0
  fi
  meta="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null)" || {
    echo "error: 'cargo metadata' failed in $ROOT" >&2
    return 1
  }
  printf '%s' "$meta" | "${PYTHON:-python3}" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
