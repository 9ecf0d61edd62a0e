#!/usr/bin/env python3
"""Offline checks of everything under deploy/: no cluster, no server needed.

    python3 deploy/tools/check_offline.py --kubectl PATH --promtool PATH

- every overlay renders with `kubectl kustomize`, and every object validates against the
  Kubernetes OpenAPI schemas (strict: unknown fields fail) of the oldest and newest Kubernetes
  versions we support; the Prometheus Operator objects (ServiceMonitor, PrometheusRule) validate
  against models generated from the operator's CRDs, also strictly;
- what a schema cannot see: references between objects (ConfigMaps, Services, ports, selectors,
  the HPA's target and metric), the config file against the container ports, the node's memory
  limit against the container's;
- the alert rules pass `promtool check rules` and their unit tests, and the PrometheusRule
  carries exactly the same groups;
- the dashboard is well formed (ids, grid, variables, datasource), and every metric it or the
  rules name is in docs/metrics.md;
- every runbook link points at a section of docs/operations.md.

Needs PyYAML, kubernetes-validate and cloudcoil.models.prometheus_operator (deploy/test.sh
installs them in a virtualenv). Prints one line per check and "N passed, N failed".
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path
from typing import Callable

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
OVERLAYS = ["trial", "trial-etcd", "production"]
# The oldest Kubernetes the manifests support (preStop sleep is on by default from 1.30) and
# the newest whose schemas the validator ships.
K8S_VERSIONS = ["1.30", "1.37"]
RULES = DEPLOY / "prometheus" / "hopps-alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "hopps-alerts.test.yaml"
ADAPTER = DEPLOY / "prometheus" / "prometheus-adapter.yaml"
DASHBOARD = DEPLOY / "grafana" / "hopps.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
RUNBOOK_PREFIX = "https://github.com/hopps-rs/hopps/blob/main/docs/operations.md#"

# Grafana's built-in variables the dashboard may use besides its own.
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


class CheckFailed(Exception):
    pass


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except CheckFailed as err:
            self.failed += 1
            print(f"FAIL {name}: {err}")
        except Exception:  # a crash in a check is a failure of that check, not of the run
            self.failed += 1
            print(f"FAIL {name}: unexpected error\n{traceback.format_exc()}")
        else:
            self.passed += 1
            print(f"ok   {name}")


# --- rendering ---------------------------------------------------------------------------------

def render(kubectl: str, overlay: str) -> list[dict]:
    path = K8S / "overlays" / overlay
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    ensure(proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed: {proc.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    ensure(len(docs) > 0, f"{overlay} rendered no objects")
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    ensure(len(found) == 1, f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_templates(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, d["spec"]["template"]) for d in docs if d.get("kind") in ("StatefulSet", "Deployment")]


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"]
            for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p}


def env_of(docs: list[dict], container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = one(docs, "ConfigMap", source["configMapRef"]["name"])
            env.update(cm.get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def duration_seconds(value) -> float:
    """A duration as hopps reads it: a number of seconds, or 500ms, 2s, 5m, 1h."""
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|m|min|h|)", str(value).strip())
    ensure(m is not None, f"cannot read the duration {value!r}")
    scale = {"ms": 0.001, "": 1, "s": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
    return float(m.group(1)) * scale


def quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    ensure(m is not None, f"cannot read the quantity {q!r}")
    number, unit = m.groups()
    ensure(unit == "" or unit in units, f"unknown unit in {q!r}")
    return int(number) * units.get(unit, 1)


# --- schema checks -----------------------------------------------------------------------------

def check_schemas(docs: list[dict]) -> None:
    import kubernetes_validate

    errors = []
    for obj in docs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = "/".join(str(p) for p in err.path)
                errors.append(f"{name_of(obj)} (Kubernetes {version}) at {path or '/'}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{name_of(obj)}: no schema for {obj['apiVersion']} in Kubernetes {version}")
    ensure(not errors, "; ".join(errors))


def strip_none(value):
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_none(v) for v in value]
    return value


def check_operator_objects(docs: list[dict]) -> int:
    """Validates ServiceMonitor and PrometheusRule against models generated from the operator's
    CRDs. The models accept unknown fields, so strictness comes from a round trip: whatever the
    model does not know is dropped by it, and the dump then differs from the input."""
    from cloudcoil.models.prometheus_operator import v1

    models = {"ServiceMonitor": v1.ServiceMonitor, "PrometheusRule": v1.PrometheusRule}
    count = 0
    for obj in docs:
        if not obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        ensure(obj["apiVersion"] == "monitoring.coreos.com/v1", f"{name_of(obj)}: unexpected apiVersion")
        model = models.get(obj["kind"])
        ensure(model is not None, f"{name_of(obj)}: no model for this kind")
        parsed = model.model_validate(obj)
        dumped = strip_none(parsed.model_dump(by_alias=True, exclude_none=True, mode="json"))
        ensure(dumped == strip_none(obj),
               f"{name_of(obj)}: fields the CRD does not know or of the wrong type "
               f"(round trip differs):\n  in:  {json.dumps(obj, sort_keys=True)}\n  out: {json.dumps(dumped, sort_keys=True)}")
        count += 1
    return count


# --- references between objects ----------------------------------------------------------------

def check_references(overlay: str, docs: list[dict]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    problems = []

    for workload, template in pod_templates(docs):
        spec = template["spec"]
        labels = template["metadata"].get("labels", {})
        ensure(selects(workload["spec"]["selector"]["matchLabels"], labels),
               f"{name_of(workload)}: selector does not match its pod template")
        for vol in spec.get("volumes", []):
            if "configMap" in vol and ("ConfigMap", vol["configMap"]["name"]) not in names:
                problems.append(f"{name_of(workload)} mounts missing ConfigMap {vol['configMap']['name']}")
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src and ("ConfigMap", src["configMapRef"]["name"]) not in names:
                    problems.append(f"{name_of(workload)} reads missing ConfigMap {src['configMapRef']['name']}")
                if "secretRef" in src and not src["secretRef"].get("optional") \
                        and ("Secret", src["secretRef"]["name"]) not in names:
                    problems.append(f"{name_of(workload)} needs Secret {src['secretRef']['name']}")
            ports = {p["name"] for p in c.get("ports", []) if "name" in p}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append(f"{name_of(workload)} {probe} uses unknown port {port}")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
            for m in mounts - declared:
                problems.append(f"{name_of(workload)} mounts undeclared volume {m}")
        if workload["kind"] == "StatefulSet":
            svc = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == workload["spec"]["serviceName"]]
            if not svc or svc[0]["spec"].get("clusterIP") != "None":
                problems.append(f"{name_of(workload)}: serviceName {workload['spec']['serviceName']} is not a headless Service here")
            elif not selects(svc[0]["spec"]["selector"], labels):
                problems.append(f"{name_of(workload)}: its headless Service does not select its pods")
        anti = spec.get("affinity", {}).get("podAntiAffinity", {})
        terms = [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
        terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution") or []
        for term in terms:
            if not selects(term["labelSelector"]["matchLabels"], labels):
                problems.append(f"{name_of(workload)}: anti-affinity selector does not match its own pods")
        for tsc in spec.get("topologySpreadConstraints", []):
            if not selects(tsc["labelSelector"]["matchLabels"], labels):
                problems.append(f"{name_of(workload)}: topology spread selector does not match its own pods")

    for svc in by_kind(docs, "Service"):
        targets = [(w, t) for w, t in pod_templates(docs) if selects(svc["spec"]["selector"], t["metadata"].get("labels", {}))]
        if not targets:
            problems.append(f"{name_of(svc)} selects no pods")
            continue
        for port in svc["spec"]["ports"]:
            tp = port.get("targetPort")
            if isinstance(tp, str):
                for w, t in targets:
                    if tp not in container_ports(t):
                        problems.append(f"{name_of(svc)} port {port['name']} targets {tp}, which {name_of(w)} does not have")

    client = one(docs, "Service", "hopps")
    if client["spec"].get("publishNotReadyAddresses"):
        problems.append(f"{name_of(client)} would send clients to nodes that are still loading")

    hopps = one(docs, "StatefulSet", "hopps")
    hopps_labels = hopps["spec"]["template"]["metadata"]["labels"]
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        if not selects(pdb["spec"]["selector"]["matchLabels"], hopps_labels):
            problems.append(f"{name_of(pdb)} does not select the hopps pods")

    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in names:
            problems.append(f"{name_of(hpa)} scales missing {ref['kind']} {ref['name']}")
        adapter = yaml.safe_load(ADAPTER.read_text())
        served = {r["name"]["as"] for r in adapter["rules"]}
        for metric in hpa["spec"]["metrics"]:
            m = metric.get("pods", {}).get("metric", {}).get("name")
            if m and m not in served:
                problems.append(f"{name_of(hpa)} uses metric {m}, which {ADAPTER.relative_to(ROOT)} does not serve")
        if hpa["spec"].get("minReplicas", 1) < 2:
            problems.append(f"{name_of(hpa)} may scale below two replicas")

    for sm in by_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in by_kind(docs, "Service") if selects(sel, s["metadata"].get("labels", {}))]
        if len(svcs) != 1:
            problems.append(f"{name_of(sm)} selects {len(svcs)} Services; want exactly the headless one")
            continue
        svc = svcs[0]
        if not svc["spec"].get("publishNotReadyAddresses"):
            problems.append(f"{name_of(sm)} scrapes {name_of(svc)}, which hides loading nodes")
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in port_names:
                problems.append(f"{name_of(sm)} scrapes port {ep.get('port')}, not on {name_of(svc)}")
        job = svc["metadata"].get("labels", {}).get(sm["spec"].get("jobLabel", ""), svc["metadata"]["name"])
        if job != "hopps":
            problems.append(f"{name_of(sm)} makes job={job!r}; the alerts and the dashboard expect job=\"hopps\"")

    for rule in by_kind(docs, "PrometheusRule"):
        source = yaml.safe_load(RULES.read_text())
        if rule["spec"]["groups"] != source["groups"]:
            problems.append(f"{name_of(rule)} differs from {RULES.relative_to(ROOT)}: run python3 deploy/tools/sync.py")

    ensure(not problems, "; ".join(problems))


def check_node_settings(overlay: str, docs: list[dict]) -> None:
    """The config file and the environment against the container: ports, paths, memory."""
    hopps = one(docs, "StatefulSet", "hopps")
    template = hopps["spec"]["template"]
    container = [c for c in template["spec"]["containers"] if c["name"] == "hopps"][0]
    ports = container_ports(template)
    config_mount = [m for m in container["volumeMounts"] if m["name"] == "config"][0]
    config_vol = [v for v in template["spec"]["volumes"] if v["name"] == "config"][0]
    cm = one(docs, "ConfigMap", config_vol["configMap"]["name"])
    args = container["args"]
    ensure("--config" in args, "hopps serve is not given --config")
    config_path = args[args.index("--config") + 1]
    ensure(config_path.startswith(config_mount["mountPath"] + "/"),
           f"--config {config_path} is not under the config mount {config_mount['mountPath']}")
    file_name = config_path[len(config_mount["mountPath"]) + 1:]
    ensure(file_name in cm.get("data", {}), f"ConfigMap {cm['metadata']['name']} has no {file_name}")
    config = tomllib.loads(cm["data"][file_name])
    for key, port_name in (("listen", "grpc"), ("admin_listen", "admin")):
        ensure(key in config, f"{file_name} sets no {key}")
        host, _, port = config[key].rpartition(":")
        ensure(host in ("0.0.0.0", "[::]"), f"{key} = {config[key]} is not reachable from other pods")
        ensure(int(port) == ports.get(port_name),
               f"{key} = {config[key]} but the container port {port_name} is {ports.get(port_name)}")
    env = env_of(docs, container)
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]

    def on_volume(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

    data_dir = env.get("HOPPS_DATA_DIR", config.get("data_dir"))
    ensure(data_dir is not None and on_volume(data_dir), f"data_dir {data_dir} is not on a writable volume")
    repo = env.get("HOPPS_REPO", config.get("repo", ""))
    ensure(repo != "", "no model repository is set (HOPPS_REPO or repo)")
    if "://" not in repo:
        ensure(on_volume(repo), f"the local repository {repo} is not on a writable volume")
        ensure(hopps["spec"].get("replicas", 1) == 1,
               f"{hopps['spec'].get('replicas')} nodes share no repository: a local path ({repo}) "
               "is one node's own volume; use s3:// for more than one node")
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    request = quantity_bytes(container["resources"]["requests"]["memory"])
    ensure(request == limit, "memory request and limit differ; hopps wants Guaranteed memory")
    node_limit = int(env.get("HOPPS_MEMORY_LIMIT", "0"))
    ensure(0.6 * limit <= node_limit <= 0.85 * limit,
           f"HOPPS_MEMORY_LIMIT {node_limit} is not 60..85% of the container limit {limit} "
           "(docs/operations.md, Sizing)")
    grace = template["spec"]["terminationGracePeriodSeconds"]
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    shutdown_s = duration_seconds(env.get("HOPPS_SHUTDOWN_GRACE", config.get("shutdown_grace", "10s")))
    ensure(grace >= pause + shutdown_s + 10,
           f"terminationGracePeriodSeconds {grace} leaves no room after the {pause}s pause and "
           f"the {shutdown_s}s shutdown grace")
    endpoints = [e for e in env.get("HOPPS_ETCD_ENDPOINTS", "").split(",") if e]
    etcd_sets = {s["metadata"]["name"]: s for s in by_kind(docs, "StatefulSet") if s["metadata"]["name"] != "hopps"}
    for endpoint in endpoints:
        m = re.fullmatch(r"https?://([a-z0-9.-]+):(\d+)", endpoint)
        ensure(m is not None, f"HOPPS_ETCD_ENDPOINTS entry {endpoint!r} is not http(s)://host:port")
        host = m.group(1).split(".")
        if len(host) == 2 and host[1] in (s["spec"]["serviceName"] for s in etcd_sets.values()):
            # A member of an etcd StatefulSet in this overlay: pod name and Service must exist.
            sts = [s for s in etcd_sets.values() if s["spec"]["serviceName"] == host[1]][0]
            pod_ordinal = host[0].rsplit("-", 1)
            ensure(pod_ordinal[0] == sts["metadata"]["name"] and int(pod_ordinal[1]) < sts["spec"]["replicas"],
                   f"{endpoint} names no pod of {name_of(sts)}")
            ensure(int(m.group(2)) in container_ports(sts["spec"]["template"]).values(),
                   f"{endpoint}: port not exposed by {name_of(sts)}")
    if overlay == "trial-etcd":
        ensure(len(endpoints) == 1 and "hopps-etcd" in endpoints[0], "trial-etcd does not point at its etcd")
    if overlay == "trial":
        ensure(endpoints == [], "the trial runs embedded, without etcd")


# --- rules, dashboard, docs --------------------------------------------------------------------

def promtool(promtool_bin: str, *args: str) -> None:
    proc = subprocess.run([promtool_bin, *args], capture_output=True, text=True)
    ensure(proc.returncode == 0, f"promtool {' '.join(args)}: {proc.stdout.strip()} {proc.stderr.strip()}")


def check_operator_rules_promtool(promtool_bin: str, docs: list[dict]) -> None:
    for rule in by_kind(docs, "PrometheusRule"):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
            f.flush()
            promtool(promtool_bin, "check", "rules", f.name)


def documented_metrics() -> set[str]:
    text = METRICS_DOC.read_text()
    return set(re.findall(r"`(hopps_[a-z0-9_]+)`", text))


# PromQL words that look like metric names but are functions, keywords or label names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "on", "and", "or", "unless", "rate", "increase",
    "histogram_quantile", "time", "le", "job", "instance", "model", "table", "code", "op",
    "namespace", "ignoring", "without", "group_left", "group_right", "bool", "offset",
}


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_matchers = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_ranges = re.sub(r"\[[^\]]*\]", "[]", no_matchers)
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b", no_ranges))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"[0-9e.]+", w)}


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def check_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    ensure(len(ids) == len(set(ids)), "panel ids repeat")
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        ensure(0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']} leaves the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                ensure((x, y) not in cells, f"panels {cells.get((x, y))} and {p['title']} overlap")
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            ensure(p.get("datasource", {}).get("uid") == "${datasource}",
                   f"panel {p['title']} does not use the datasource variable")
            ensure(p.get("targets"), f"panel {p['title']} has no query")
            ensure(p.get("description"), f"panel {p['title']} has no description")
    variables = {v["name"] for v in dash["templating"]["list"]}
    for title, expr in dashboard_exprs(dash) + [(v["name"], v.get("definition", ""))
                                                 for v in dash["templating"]["list"]]:
        for used in re.findall(r"\$(\w+)", expr):
            ensure(used in variables or used in GRAFANA_BUILTINS,
                   f"{title}: ${used} is not a variable of the dashboard")


def check_metric_contract() -> None:
    documented = documented_metrics()
    ensure(len(documented) > 10, f"found only {len(documented)} metrics in {METRICS_DOC.relative_to(ROOT)}")
    dash = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(RULES.read_text())
    used: dict[str, str] = {}
    for title, expr in dashboard_exprs(dash):
        for m in metric_names(expr):
            used[base_metric(m)] = f"panel {title!r}"
    for v in dash["templating"]["list"]:
        for m in re.findall(r"label_values\((\w+)", v.get("definition", "")):
            used[m] = f"variable {v['name']}"
    for group in rules["groups"]:
        for rule in group["rules"]:
            for m in metric_names(rule["expr"]):
                used[base_metric(m)] = f"alert {rule['alert']}"
    unknown = {m: where for m, where in used.items() if m not in documented and m != "up"}
    ensure(not unknown, "metrics not in docs/metrics.md: " + ", ".join(f"{m} ({w})" for m, w in sorted(unknown.items())))
    shown = {base_metric(m) for _, e in dashboard_exprs(dash) for m in metric_names(e)}
    unshown = sorted(documented - shown)
    ensure(not unshown, "metrics of docs/metrics.md that no panel shows: " + ", ".join(unshown))


def github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def check_runbooks() -> None:
    ensure(OPERATIONS_DOC.exists(), f"{OPERATIONS_DOC.relative_to(ROOT)} is missing")
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.*)$", OPERATIONS_DOC.read_text(), re.M)}
    rules = yaml.safe_load(RULES.read_text())
    problems = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            ann = rule.get("annotations", {})
            url = ann.get("runbook_url", "")
            if not url.startswith(RUNBOOK_PREFIX):
                problems.append(f"{name}: runbook_url does not point into docs/operations.md")
            elif url[len(RUNBOOK_PREFIX):] not in anchors:
                problems.append(f"{name}: docs/operations.md has no section #{url[len(RUNBOOK_PREFIX):]}")
            if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: severity is not warning or critical")
            if not ann.get("summary") or not ann.get("description"):
                problems.append(f"{name}: summary or description missing")
    dash = json.loads(DASHBOARD.read_text())
    for link in dash.get("links", []):
        url = link.get("url", "")
        if url.startswith(RUNBOOK_PREFIX) and url[len(RUNBOOK_PREFIX):] not in anchors:
            problems.append(f"dashboard link: docs/operations.md has no section #{url[len(RUNBOOK_PREFIX):]}")
    ensure(not problems, "; ".join(problems))


def check_documented_scrape_config(promtool_bin: str) -> None:
    """The Prometheus configuration docs/operations.md gives for clusters without the operator
    is valid, loads the rule file, and names the job the alerts select."""
    blocks = re.findall(r"```yaml\n(.*?)```", OPERATIONS_DOC.read_text(), re.S)
    configs = [yaml.safe_load(b) for b in blocks]
    configs = [c for c in configs if isinstance(c, dict) and "scrape_configs" in c]
    ensure(len(configs) == 1, f"expected one Prometheus configuration in docs/operations.md, found {len(configs)}")
    config = configs[0]
    jobs = [j["job_name"] for j in config["scrape_configs"]]
    ensure(jobs == ["hopps"], f"the documented scrape job is {jobs}; the alerts expect job=\"hopps\"")
    ensure(any(Path(r).name == RULES.name for r in config.get("rule_files", [])),
           f"the documented configuration does not load {RULES.name}")
    # The rule file at its documented place is this repository's file.
    config["rule_files"] = [str(RULES)]
    # Debian's Prometheus is built without Kubernetes service discovery, so its promtool does
    # not know kubernetes_sd_configs: check everything else (relabelling included) with a
    # static target in its place, and the discovery block's shape here.
    for job in config["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs", None)
        if sd is not None:
            ensure(isinstance(sd, list) and all(x.get("role") in ("endpoints", "endpointslice", "pod", "service")
                                                for x in sd), f"unexpected kubernetes_sd_configs {sd}")
            job["static_configs"] = [{"targets": ["127.0.0.1:7071"]}]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        promtool(promtool_bin, "check", "config", f.name)


def check_generated(script: str) -> None:
    proc = subprocess.run([sys.executable, str(DEPLOY / "tools" / script), "--check"], capture_output=True, text=True)
    ensure(proc.returncode == 0, proc.stderr.strip() or proc.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--promtool", default="promtool")
    args = parser.parse_args()
    run = Runner()

    rendered: dict[str, list[dict]] = {}

    def do_render(overlay: str) -> None:
        rendered[overlay] = render(args.kubectl, overlay)

    for overlay in OVERLAYS:
        run.check(f"{overlay}: kubectl kustomize renders", lambda o=overlay: do_render(o))
        if overlay not in rendered:
            continue
        docs = rendered[overlay]
        run.check(f"{overlay}: {len(docs)} objects validate against Kubernetes {' and '.join(K8S_VERSIONS)} schemas (strict)",
                  lambda d=docs: check_schemas(d))
        if any(d["apiVersion"].startswith("monitoring.coreos.com/") for d in docs):
            run.check(f"{overlay}: ServiceMonitor and PrometheusRule validate against the operator's CRD models (strict)",
                      lambda d=docs: ensure(check_operator_objects(d) == 2, "expected a ServiceMonitor and a PrometheusRule"))
            run.check(f"{overlay}: the PrometheusRule's groups pass promtool",
                      lambda d=docs: check_operator_rules_promtool(args.promtool, d))
        run.check(f"{overlay}: references between objects resolve", lambda o=overlay, d=docs: check_references(o, d))
        run.check(f"{overlay}: config file, environment and container agree", lambda o=overlay, d=docs: check_node_settings(o, d))

    run.check("promtool check rules deploy/prometheus/hopps-alerts.yaml",
              lambda: promtool(args.promtool, "check", "rules", str(RULES)))
    run.check("promtool test rules deploy/prometheus/hopps-alerts.test.yaml",
              lambda: promtool(args.promtool, "test", "rules", str(RULE_TESTS)))
    run.check("every alert has a unit test", check_every_alert_tested)
    run.check("the PrometheusRule is generated from the current rules", lambda: check_generated("sync.py"))
    run.check("the dashboard JSON is generated from the current panel list", lambda: check_generated("dashboard.py"))
    run.check("dashboard: ids, grid, datasource, variables", check_dashboard_shape)
    run.check("dashboard and rules name only documented metrics; every documented metric has a panel", check_metric_contract)
    run.check("runbook links point at sections of docs/operations.md", check_runbooks)
    run.check("the Prometheus configuration in docs/operations.md passes promtool check config "
              "(Kubernetes discovery checked by shape: Debian's promtool lacks it)",
              lambda: check_documented_scrape_config(args.promtool))

    print(f"{run.passed} passed, {run.failed} failed")
    return 0 if run.failed == 0 else 1


def check_every_alert_tested() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    firing = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    missing = sorted(alerts - firing)
    ensure(not missing, "alerts without a unit test that makes them fire: " + ", ".join(missing))


if __name__ == "__main__":
    sys.exit(main())
