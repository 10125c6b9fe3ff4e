"""Structural checks for deploy/ that kubernetes-validate and hadolint do not cover.

- observability/otel-collector.yaml: every pipeline names receivers/processors/exporters that are defined.
- observability/grafana-dashboard.json: valid dashboard JSON, every panel has a PromQL target on an r1_ metric.
- k8s/servicemonitor.yaml: a ServiceMonitor that selects the r1-serve Service and scrapes its `http` port.
- every HPA's custom metric is an r1_ metric.
Exit status 1 with one line per problem.
"""
import json
import pathlib
import re
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
problems = []

collector = yaml.safe_load((DEPLOY / "observability/otel-collector.yaml").read_text())
for name, pipe in collector["service"]["pipelines"].items():
    for kind in ("receivers", "processors", "exporters"):
        for comp in pipe.get(kind, []):
            if comp not in (collector.get(kind) or {}):
                problems.append(f"otel-collector.yaml: pipeline {name} uses {kind[:-1]} {comp!r}, which is not defined")

dash = json.loads((DEPLOY / "observability/grafana-dashboard.json").read_text())
panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
if not panels:
    problems.append("grafana-dashboard.json: no panels")
for p in panels:
    exprs = [t.get("expr", "") for t in p.get("targets", [])]
    if not any(re.search(r"\br1_[a-z_]+", e) for e in exprs):
        problems.append(f"grafana-dashboard.json: panel {p.get('title')!r} has no query on an r1_ metric")

docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s/servicemonitor.yaml").read_text()) if d]
sm = [d for d in docs if d.get("kind") == "ServiceMonitor"]
if len(sm) != 1:
    problems.append("servicemonitor.yaml: expected exactly one ServiceMonitor")
else:
    spec = sm[0]["spec"]
    if spec.get("selector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") != "r1-serve":
        problems.append("servicemonitor.yaml: selector must match app.kubernetes.io/name=r1-serve")
    eps = spec.get("endpoints", [])
    if not any(e.get("port") == "http" and e.get("path") == "/metrics" for e in eps):
        problems.append("servicemonitor.yaml: needs an endpoint on port `http`, path /metrics")

for f in sorted((DEPLOY / "k8s").glob("hpa-*.yaml")):
    for d in yaml.safe_load_all(f.read_text()):
        if d and d.get("kind") == "HorizontalPodAutoscaler":
            for m in d["spec"].get("metrics", []):
                name = m.get("pods", {}).get("metric", {}).get("name", "")
                if not name.startswith("r1_"):
                    problems.append(f"{f.name}: HPA metric {name!r} is not an r1_ metric")

for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
