"""Structural checks for deploy/ that kubernetes-validate, helm lint and hadolint do not cover.

- helm/r1-serve/values.yaml: its `targets` are exactly the engine's target table (engine/src/manifest/target_table.rs).
- rendered/*.yaml (the chart's golden renders, one per target): in each,
  - the Deployment's terminationGracePeriodSeconds exceeds preStop sleep + R1_DRAIN_TIMEOUT_SECS, so Kubernetes never
    kills a draining server;
  - the engine-build init container (and the Job, when rendered) runs `r1-export build /models/model --target <t>`
    for the render's own target, with the model volume read-write; the server mounts it read-only;
  - startup, readiness and liveness probes on GET /health of the HTTP port;
  - GPU targets ask for nvidia.com/gpu and pin nvidia.com/gpu.product; cpu asks for neither;
  - the Service, PodDisruptionBudget, HorizontalPodAutoscaler and ServiceMonitor select / target this Deployment's
    pods; every HPA metric is a Pods metric that a prometheus-adapter rule serves.
- prometheus-adapter/values.yaml: every custom rule parses, reads an r1_ series per namespace and pod, and names the
  metric it serves literally (`name.as`).
- docker/Dockerfile.cpu and docker/Dockerfile.gpu: the stages up to `binaries` are the same text.
- observability/otel-collector.yaml: every pipeline names receivers/processors/exporters that are defined.
- observability/grafana-dashboard.json: valid dashboard JSON, every panel has a PromQL target on an r1_ metric.
- no file outside deploy/ points to the removed deploy/k8s/.
Exit status 1 with one line per problem.
"""
import json
import pathlib
import re
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
ROOT = DEPLOY.parent
problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


# ---- collector config and dashboard ---------------------------------------------------------------------------------
collector = yaml.safe_load((DEPLOY / "observability/otel-collector.yaml").read_text())
for name, pipe in collector["service"]["pipelines"].items():
    for kind in ("receivers", "processors", "exporters"):
        for comp in pipe.get(kind, []):
            if comp not in (collector.get(kind) or {}):
                problem("otel-collector.yaml", f"pipeline {name} uses {kind[:-1]} {comp!r}, which is not defined")

dash = json.loads((DEPLOY / "observability/grafana-dashboard.json").read_text())
panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
if not panels:
    problem("grafana-dashboard.json", "no panels")
for p in panels:
    exprs = [t.get("expr", "") for t in p.get("targets", [])]
    if not any(re.search(r"\br1_[a-z_]+", e) for e in exprs):
        problem("grafana-dashboard.json", f"panel {p.get('title')!r} has no query on an r1_ metric")

# ---- chart targets vs the engine's table ----------------------------------------------------------------------------
values = yaml.safe_load((DEPLOY / "helm/r1-serve/values.yaml").read_text())
table = (ROOT / "engine/src/manifest/target_table.rs").read_text()
engine_targets = re.findall(r'Target \{ name: "([a-z0-9]+)"', table)
if not engine_targets:
    problem("target_table.rs", "no `Target { name: \"...\"` rows found; update check_deploy.py's parser")
if sorted(values["targets"]) != sorted(engine_targets):
    problem("helm/r1-serve/values.yaml", f"targets {sorted(values['targets'])} != the engine's {sorted(engine_targets)}")
for t, row in values["targets"].items():
    if (t == "cpu") != (row["gpus"] == 0) or (t == "cpu") != (not row["gpuProducts"]):
        problem("helm/r1-serve/values.yaml", f"target {t}: GPU targets need gpus > 0 and gpuProducts, cpu neither")

# ---- prometheus-adapter rules ---------------------------------------------------------------------------------------
adapter = yaml.safe_load((DEPLOY / "prometheus-adapter/values.yaml").read_text())
served = {}
rules = (adapter.get("rules") or {}).get("custom") or []
if not rules:
    problem("prometheus-adapter/values.yaml", "no rules.custom")
for i, rule in enumerate(rules):
    where = f"prometheus-adapter/values.yaml rules.custom[{i}]"
    series = rule.get("seriesQuery", "")
    m = re.match(r"(r1_[a-z0-9_]+)\{(.*)\}$", series)
    if not m:
        problem(where, f"seriesQuery {series!r} is not `r1_<metric>{{...}}`")
        continue
    if 'namespace!=""' not in m.group(2) or 'pod!=""' not in m.group(2):
        problem(where, 'seriesQuery must keep namespace!="" and pod!="" (per-pod metrics)')
    over = (rule.get("resources") or {}).get("overrides") or {}
    if over.get("namespace", {}).get("resource") != "namespace" or over.get("pod", {}).get("resource") != "pod":
        problem(where, "resources.overrides must map the namespace and pod labels to their resources")
    name = (rule.get("name") or {}).get("as") or m.group(1)
    if not re.fullmatch(r"r1_[a-z0-9_]+", name):
        problem(where, f"name.as {name!r} must be a literal r1_ name (the HPA and the tests look it up)")
    mq = rule.get("metricsQuery", "")
    for tpl in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
        if tpl not in mq:
            problem(where, f"metricsQuery lacks {tpl}")
    served[name] = m.group(1)

# ---- Dockerfiles share their build stages ----------------------------------------------------------------------------
def build_stages(path):
    text = path.read_text()
    start, end = text.find("FROM rust:"), text.find("FROM ${BINARIES} AS binaries")
    return text[start:end] if 0 <= start < end else None


cpu_df, gpu_df = (build_stages(DEPLOY / f"docker/Dockerfile.{k}") for k in ("cpu", "gpu"))
if cpu_df is None or gpu_df is None:
    problem("docker/", "each Dockerfile needs a `FROM rust:` build stage before `FROM ${BINARIES} AS binaries`")
elif cpu_df != gpu_df:
    problem("docker/", "Dockerfile.cpu and Dockerfile.gpu differ before `FROM ${BINARIES} AS binaries`")

# ---- golden renders -------------------------------------------------------------------------------------------------
def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container(spec, name, init=False):
    for c in spec.get("initContainers" if init else "containers", []) or []:
        if c["name"] == name:
            return c
    return None


def model_mount(c):
    return next((m for m in c.get("volumeMounts", []) if m["name"] == "model"), None)


def check_build(where, c, target):
    if c is None:
        problem(where, "no engine-build container")
        return
    if c.get("args", [])[:5] != ["r1-export", "build", "/models/model", "--target", target]:
        problem(where, f"engine build runs {c.get('args')}, not `r1-export build /models/model --target {target}`")
    mount = model_mount(c)
    if not mount or mount.get("readOnly") or mount["mountPath"] != "/models/model":
        problem(where, "engine build needs the model volume read-write at /models/model")


renders = sorted((DEPLOY / "rendered").glob("*.yaml"))
if not renders:
    problem("rendered/", "no golden renders (run deploy/check.sh --update-renders)")
for path in renders:
    f = f"rendered/{path.name}"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"):
        if len(by_kind.get(kind, [])) != 1:
            problem(f, f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    if problems and any(p.startswith(f + ":") for p in problems):
        continue
    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]
    labels, spec = pod["metadata"]["labels"], pod["spec"]
    target = labels.get("r1.dev/target")
    if target not in values["targets"]:
        problem(f, f"pod label r1.dev/target={target!r} is not a target")
        continue
    if not matches(dep["spec"]["selector"]["matchLabels"], labels):
        problem(f, "Deployment selector does not match its pod labels")

    server = container(spec, "r1-serve")
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    drain = float(env.get("R1_DRAIN_TIMEOUT_SECS", 30))  # the server's default
    pre = (server.get("lifecycle") or {}).get("preStop") or {}
    cmd = (pre.get("exec") or {}).get("command") or []
    sleep = float(cmd[-1]) if cmd and cmd[0].endswith("sleep") else float((pre.get("sleep") or {}).get("seconds", 0))
    if not pre:
        problem(f, "the server has no preStop hook (endpoints must drop the pod before SIGTERM)")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not grace > sleep + drain:
        problem(f, f"terminationGracePeriodSeconds {grace} must exceed preStop sleep {sleep:g} + drain {drain:g}")
    mount = model_mount(server)
    if not mount or mount.get("readOnly") is not True:
        problem(f, "the server must mount the model volume read-only")
    check_build(f, container(spec, "engine-build", init=True), target)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (server.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != "/health" or get.get("port") != "http":
            problem(f, f"{probe} must be GET /health on the http port")

    gpus = int((server.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
    affinity = json.dumps(spec.get("affinity") or {})
    if target == "cpu" and (gpus or "nvidia.com/gpu.product" in affinity):
        problem(f, "cpu pods must not ask for a GPU")
    if target != "cpu" and (gpus < 1 or "nvidia.com/gpu.product" not in affinity):
        problem(f, f"{target} pods need an nvidia.com/gpu limit and affinity on nvidia.com/gpu.product")

    svc = by_kind["Service"][0]
    if not matches(svc["spec"]["selector"], labels):
        problem(f, "Service selector does not match the pods")
    if {p["name"] for p in svc["spec"]["ports"]} != {"grpc", "http"}:
        problem(f, "Service needs ports grpc and http")
    pdb = by_kind["PodDisruptionBudget"][0]
    if not matches(pdb["spec"]["selector"]["matchLabels"], labels):
        problem(f, "PodDisruptionBudget selector does not match the pods")
    sm = by_kind["ServiceMonitor"][0]["spec"]
    if not matches(sm["selector"]["matchLabels"], svc["metadata"]["labels"]):
        problem(f, "ServiceMonitor selector does not match the Service")
    if not any(e.get("port") == "http" and e.get("path") == "/metrics" for e in sm.get("endpoints", [])):
        problem(f, "ServiceMonitor needs an endpoint on port `http`, path /metrics")

    hpa = by_kind["HorizontalPodAutoscaler"][0]["spec"]
    ref = hpa["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", dep["metadata"]["name"]):
        problem(f, f"HPA scales {ref['kind']}/{ref['name']}, not this Deployment")
    if "replicas" in dep["spec"]:
        problem(f, "with an HPA the Deployment must not set replicas (every helm upgrade would reset the scale)")
    if not hpa.get("metrics"):
        problem(f, "HPA has no metrics")
    for m in hpa.get("metrics", []):
        name = (m.get("pods") or {}).get("metric", {}).get("name", "")
        if m.get("type") != "Pods" or name not in served:
            problem(f, f"HPA metric {m.get('type')} {name!r} is not a Pods metric served by a prometheus-adapter rule")

    for job in by_kind.get("Job", []):
        hooks = job["metadata"].get("annotations", {}).get("helm.sh/hook", "")
        if "pre-upgrade" not in hooks or "pre-install" not in hooks:
            problem(f, "the engine-build Job must be a pre-install,pre-upgrade hook")
        check_build(f"{f} Job", container(job["spec"]["template"]["spec"], "engine-build"), target)

# ---- no stale pointers to the per-target YAMLs this chart replaced --------------------------------------------------
for p in [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("scripts/*"),
          *ROOT.glob("tests/tests/*.rs")]:
    if p.is_file() and "deploy/k8s" in p.read_text(errors="replace"):
        problem(str(p.relative_to(ROOT)), "refers to deploy/k8s/, which the Helm chart replaced (deploy/helm/r1-serve)")

for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
