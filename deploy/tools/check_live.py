#!/usr/bin/env python3
"""Live test of the dashboard and the alert rules against real hopps nodes and a real Prometheus.

    python3 deploy/tools/check_live.py --hopps target/debug/hopps --kubectl KUBECTL \
        --prometheus /usr/bin/prometheus --grpcurl GRPCURL

What it does, all on 127.0.0.1, in a temporary directory it removes at the end:

1. publishes a small model into a local repository with `hopps model publish`;
2. starts two `hopps serve` nodes with the configuration the trial overlay ships (its config
   file and its environment, rendered by `kubectl kustomize`), except addresses, paths and the
   memory limit of node "a", which is made small so that a big version is refused there;
3. starts Prometheus scraping both nodes every second as job "hopps", with the alert rules of
   deploy/prometheus/hopps-alerts.yaml evaluated every second (their `for:` durations shortened
   to a few seconds, their expressions unchanged);
4. publishes a second model while the nodes run (both must pick it up), then drives lookups
   (hits, misses, errors), online writes and a big load;
5. checks that every dashboard query and variable, every alert expression (and the signal it
   compares with its threshold) and the prometheus-adapter query parse and return a series with
   a value, and that every rule evaluates without error;
6. makes alerts fire for real: a version refused on node "a" (HoppsLoadFailed), deltas piling up
   behind it (HoppsVersionLagHigh), node "b" killed (HoppsNodeDown, HoppsTooFewReadyNodes);
7. compares the sizing formula of docs/operations.md with hopps_table_bytes_per_entry;
8. checks that every `hopps` command docs/operations.md shows exists with its flags, and (with
   --etcd) that the etcd component's flags start a real etcd that passes its probe, and runs a
   third node in cluster mode with its own etcd for the cluster panels and alerts.

Every wait polls with a deadline. Prints one line per check and "N passed, N failed".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
ROOT = DEPLOY.parent
RULES = DEPLOY / "prometheus" / "hopps-alerts.yaml"
ADAPTER = DEPLOY / "prometheus" / "prometheus-adapter.yaml"
DASHBOARD = DEPLOY / "grafana" / "hopps.json"
PROTO_DIR = ROOT / "crates" / "proto" / "proto"
PROTO = "hopps/v1/hopps.proto"

MODEL = "ctr"
TABLE = "user"
DIM = 16
SMALL_ROWS = 20_000
BIG_ROWS = 1_000_000
# Node "a" may hold this much: enough for the small versions, not for the big one.
SMALL_NODE_LIMIT = 32 << 20
RULE_FOR = "2s"
RATE_INTERVAL = "10s"


class CheckFailed(Exception):
    pass


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, fn: Callable[[], object]) -> bool:
        try:
            note = fn()
        except CheckFailed as err:
            self.failed += 1
            print(f"FAIL {name}: {err}", flush=True)
            return False
        except Exception:
            self.failed += 1
            print(f"FAIL {name}: unexpected error\n{traceback.format_exc()}", flush=True)
            return False
        self.passed += 1
        print(f"ok   {name}" + (f" ({note})" if note else ""), flush=True)
        return True


def poll(what: str, fn: Callable[[], object], deadline_s: float, every_s: float = 0.25):
    """Calls fn until it returns something truthy or the deadline passes."""
    end = time.monotonic() + deadline_s
    last_error = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except (OSError, urllib.error.URLError, CheckFailed, KeyError, ValueError) as err:
            last_error = err
        if time.monotonic() > end:
            raise CheckFailed(f"timed out after {deadline_s:.0f}s waiting for {what}"
                              + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# --- the environment -----------------------------------------------------------------------------

class Environment:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.repo = work / "repo"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.nodes: dict[str, dict] = {}
        self.prom_url = ""
        self.started = time.time()

    # hopps CLI ---------------------------------------------------------------------------------
    def hopps(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([self.args.hopps, *args], capture_output=True, text=True, timeout=timeout)
        ensure(proc.returncode == 0, f"hopps {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def publish_csv(self, name: str, keys: range, value: float, delta: bool) -> dict:
        path = self.work / f"{name}.csv"
        with path.open("w") as f:
            row = ",".join([f"{value}"] * DIM)
            for k in keys:
                f.write(f"{k},{row}\n")
        args = ["model", "publish", "--repo", str(self.repo), "--model", MODEL, "--table", TABLE,
                "--dim", str(DIM), "--input", str(path), "--json"]
        if delta:
            args.append("--delta")
        return json.loads(self.hopps(*args))

    def publish_npy(self, name: str, rows: int, value: float) -> dict:
        keys = self.work / f"{name}-keys.npy"
        values = self.work / f"{name}-values.npy"
        write_npy(keys, "<u8", f"({rows},)", b"".join(struct.pack("<Q", k) for k in range(rows)))
        write_npy(values, "<f4", f"({rows}, {DIM})", struct.pack(f"<{DIM}f", *([value] * DIM)) * rows)
        return json.loads(self.hopps("model", "publish", "--repo", str(self.repo), "--model", MODEL,
                                     "--table", TABLE, "--dim", str(DIM), "--input", str(keys),
                                     "--values", str(values), "--json"))

    # processes ---------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def tail(self, name: str, lines: int = 30) -> str:
        log = self.logs.get(name)
        if not log or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def start_node(self, name: str, trial_env: dict[str, str], config_file: Path, extra: list[str]) -> None:
        ready = self.work / f"node-{name}.ready"
        env = dict(os.environ)
        env.update(trial_env)
        argv = [self.args.hopps, "serve", "--config", str(config_file),
                "--repo", str(self.repo), "--data-dir", str(self.work / f"node-{name}"),
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--node-id", f"node-{name}", "--ready-file", str(ready), *extra]
        proc = self.spawn(f"node-{name}", argv, env)

        def bound():
            ensure(proc.poll() is None, f"node {name} exited with {proc.returncode}:\n{self.tail(f'node-{name}')}")
            return ready.exists() and json.loads(ready.read_text())

        self.nodes[name] = poll(f"node {name} to listen", bound, 120)

    def write_prometheus_config(self, rules_file: Path) -> Path:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(rules_file)],
            "scrape_configs": [{
                "job_name": "hopps",
                "static_configs": [{"targets": [n["admin"] for n in self.nodes.values()]}],
            }],
        }
        path = self.work / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def scrape_every_node(self) -> None:
        """Rewrites Prometheus' targets to every node started so far and makes it reload."""
        self.write_prometheus_config(self.rules_file)
        self.procs["prometheus"].send_signal(signal.SIGHUP)

    def start_prometheus(self, rules_file: Path) -> None:
        port = free_port()
        self.rules_file = rules_file
        path = self.write_prometheus_config(rules_file)
        self.spawn("prometheus", [self.args.prometheus, f"--config.file={path}",
                                  f"--storage.tsdb.path={self.work / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{port}"])
        self.prom_url = f"http://127.0.0.1:{port}"
        proc = self.procs["prometheus"]

        def is_ready():
            ensure(proc.poll() is None, f"prometheus exited:\n{self.tail('prometheus')}")
            return http_get(self.prom_url + "/-/ready")[0] == 200

        poll("Prometheus to be ready", is_ready, 60)

    # Prometheus API ----------------------------------------------------------------------------
    def api(self, path: str, params: dict) -> dict:
        url = f"{self.prom_url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        status, body = http_get(url, timeout=30)
        data = json.loads(body)
        ensure(data.get("status") == "success", f"{path} {params}: {data.get('errorType')}: {data.get('error')}")
        return data["data"]

    def query(self, expr: str) -> list:
        return self.api("query", {"query": expr})["result"]

    def query_range(self, expr: str) -> list:
        end = time.time()
        return self.api("query_range", {"query": expr, "start": f"{self.started:.3f}",
                                        "end": f"{end:.3f}", "step": "1s"})["result"]


def write_npy(path: Path, descr: str, shape: str, data: bytes) -> None:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    # Magic (6) + version (2) + header length (2) + header, padded to 64 bytes, ending in \n.
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)


# --- what the checks look at ---------------------------------------------------------------------

def rendered_trial(kubectl: str) -> tuple[str, dict[str, str]]:
    """The config file and the environment the trial overlay gives a node."""
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / "trial")],
                          capture_output=True, text=True)
    ensure(proc.returncode == 0, f"kubectl kustomize failed: {proc.stderr}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    sts = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "hopps"][0]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    volume = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"][0]
    config = maps[volume["configMap"]["name"]]["hopps.toml"]
    return config, env


def substitute_dashboard(expr: str) -> str:
    values = {"job": "hopps", "instance": ".*", "model": ".*", "table": ".*",
              "__rate_interval": RATE_INTERVAL, "datasource": "prometheus"}
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def signal_of(expr: str) -> str:
    """The expression without its threshold comparisons: what the alert watches."""
    return re.sub(r"\s*(?:==|!=|>=|<=|>|<)\s*-?[0-9][0-9.e+]*", "", expr)


def has_value(result: list) -> bool:
    for series in result:
        for _, v in series.get("values", []) + ([series["value"]] if "value" in series else []):
            if not math.isnan(float(v)) and not math.isinf(float(v)):
                return True
    return False


def describe(result: list) -> str:
    return f"{len(result)} series"


# --- the test ------------------------------------------------------------------------------------

def run(args: argparse.Namespace, env: Environment, runner: Runner) -> None:
    dash = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(RULES.read_text())

    # 0. the commands the operator's guide tells people to run exist, with those flags
    commands = documented_commands()
    ensure(len(commands) >= 8, f"found only {len(commands)} hopps commands in docs/operations.md")
    for command in commands:
        runner.check(f"docs/operations.md: `{command}`", lambda c=command: check_documented_command(args.hopps, c))

    if args.etcd:
        runner.check("the etcd component's flags start a real etcd that passes its probe",
                     lambda: check_etcd_component(env, args.etcd))

    # 1. the model and the nodes
    v1 = env.publish_csv("v1", range(SMALL_ROWS), 0.5, delta=False)
    ensure(v1.get("version"), f"publish printed {v1}")
    config_text, trial_env = rendered_trial(args.kubectl)
    config_file = env.work / "hopps.toml"
    config_file.write_text(config_text)
    # Node "a" gets a small memory limit so that the big version is refused there; node "b"
    # keeps the trial's. Flags override the environment, which overrides the file.
    env.start_node("a", trial_env, config_file, ["--memory-limit", str(SMALL_NODE_LIMIT)])
    env.start_node("b", trial_env, config_file, [])

    # 2. Prometheus with the rules, `for:` shortened
    fast = yaml.safe_load(RULES.read_text())
    for group in fast["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = RULE_FOR
    rules_file = env.work / "hopps-alerts.yaml"
    rules_file.write_text(yaml.safe_dump(fast, sort_keys=False))
    env.start_prometheus(rules_file)

    def both_ready():
        up = env.query('up{job="hopps"} == 1')
        ready = env.query('hopps_ready{job="hopps"} == 1')
        return len(up) == 2 and len(ready) == 2

    runner.check("the trial overlay's config file and environment start two nodes; Prometheus "
              "scrapes both and both become ready", lambda: poll("both nodes up and ready", both_ready, 120))

    # A model published while the nodes run is picked up by both (the trial's first model
    # arrives this way).
    def second_model() -> str:
        path = env.work / "cvr.csv"
        path.write_text("".join(f"{k},{k % 7}.5,1.25\n" for k in range(500)))
        out = json.loads(env.hopps("model", "publish", "--repo", str(env.repo), "--model", "cvr",
                                   "--table", "item", "--dim", "2", "--input", str(path), "--json"))
        poll("both nodes to serve model cvr",
             lambda: len(env.query('hopps_model_serving_version{job="hopps", model="cvr"} == %d' % out["version"])) == 2, 60)
        return f"model cvr version {out['version']}"

    runner.check("a model published while the nodes run is served by both", second_model)

    # 3. traffic: lookups with hits and misses on both nodes, errors, online writes
    grpc = {name: node["grpc"] for name, node in env.nodes.items()}

    def traffic() -> str:
        for name, addr in grpc.items():
            out = env.hopps("bench", "lookup", "--addr", addr, "--model", MODEL, "--table", TABLE,
                            "--batch", "100", "--connections", "1", "--duration", "2s",
                            "--warmup", "0s", "--key-space", str(2 * SMALL_ROWS), "--json")
            ensure("keys" in out, f"bench printed {out[:200]}")
        out = json.loads(env.hopps("lookup", "--addr", grpc["a"], "--model", MODEL, "--table", TABLE,
                                   "--json", "1", str(10 * SMALL_ROWS)))
        found = [r["found"] for r in out["rows"]]
        ensure(found == [True, False], f"lookup of a present and an absent key gave {out}")
        return "bench lookup on both nodes, one CLI lookup"

    runner.check("lookups with hits and misses", traffic)

    def grpcurl(addr: str, method: str, body: dict) -> subprocess.CompletedProcess:
        return subprocess.run([args.grpcurl, "-plaintext", "-import-path", str(PROTO_DIR), "-proto", PROTO,
                               "-d", json.dumps(body), addr, method], capture_output=True, text=True, timeout=30)

    def bad_requests() -> str:
        import base64
        seven = base64.b64encode(b"\x01" * 7).decode()
        for _ in range(20):
            r = grpcurl(grpc["a"], "hopps.v1.Hopps/Lookup", {"model": MODEL, "table": TABLE, "keys": seven})
            ensure(r.returncode != 0 and "InvalidArgument" in (r.stdout + r.stderr),
                   f"a 7-byte key was not refused as InvalidArgument: {r.stdout} {r.stderr}")
        return "20 lookups with a 7-byte key, each refused with InvalidArgument"

    runner.check("lookup errors", bad_requests)

    def writes() -> str:
        import base64
        keys = base64.b64encode(struct.pack("<QQ", 1, 2)).decode()
        values = base64.b64encode(struct.pack(f"<{2 * DIM}f", *([1.0] * (2 * DIM)))).decode()

        def round_of_writes() -> None:
            for _ in range(5):
                r = grpcurl(grpc["b"], "hopps.v1.Hopps/Upsert", {"model": MODEL, "table": TABLE, "keys": keys, "values": values})
                ensure(r.returncode == 0, f"Upsert failed: {r.stdout} {r.stderr}")
            r = grpcurl(grpc["b"], "hopps.v1.Hopps/Delete", {"model": MODEL, "table": TABLE, "keys": keys})
            ensure(r.returncode == 0, f"Delete failed: {r.stdout} {r.stderr}")
            # The table has no optimizer: a push is refused, which the write-error panel and
            # HoppsWriteErrors see.
            r = grpcurl(grpc["b"], "hopps.v1.Hopps/Push", {"model": MODEL, "table": TABLE, "keys": keys, "gradients": values})
            ensure(r.returncode != 0, "a push to a table without an optimizer was accepted")

        # Successful-write counters exist at 0 from the start, but an error code's series
        # appears with its first error; rate() sees increases only after Prometheus has
        # scraped a series once, so write again once the error series has been scraped.
        round_of_writes()
        poll("the write error counter in Prometheus",
             lambda: len(env.query('hopps_write_requests_total{job="hopps", code!="ok"}')) >= 1, 30)
        round_of_writes()
        return "2 rounds of 5 upserts and a delete acknowledged, a push refused"

    runner.check("online writes", writes)

    # 4. a big full version: "b" loads it (load progress), "a" refuses it (memory limit);
    #    then two deltas on top of it, which "a" cannot apply.
    v2 = env.publish_npy("v2", BIG_ROWS, 0.25)
    runner.check("a big version is refused on node a and fires HoppsLoadFailed there",
              lambda: wait_alert(env, "HoppsLoadFailed", {"instance": env.nodes["a"]["admin"]}))

    def b_serves(version: int):
        return lambda: env.query(f'hopps_model_serving_version{{job="hopps", instance="{env.nodes["b"]["admin"]}"}} == {version}')

    runner.check("node b loads the big version", lambda: poll(f"node b to serve {v2['version']}", b_serves(v2["version"]), 300, 1) and None)
    v3 = env.publish_csv("v3", range(0, 1000), 2.0, delta=True)
    v4 = env.publish_csv("v4", range(1000, 2000), 3.0, delta=True)
    ensure([v3["kind"], v4["kind"]] == ["delta", "delta"] and v4["version"] == v3["version"] + 1 == v2["version"] + 2,
           f"the deltas were published as {v3} and {v4} after {v2}")
    runner.check("node b applies the deltas", lambda: poll(f"node b to serve {v4['version']}", b_serves(v4["version"]), 60, 0.5) and None)
    runner.check("node a falls three versions behind and fires HoppsVersionLagHigh",
              lambda: wait_alert(env, "HoppsVersionLagHigh", {"instance": env.nodes["a"]["admin"], "model": MODEL}))

    # 4b. a third node in cluster mode (its own etcd), so the Cluster row of the dashboard and
    # the cluster alerts have series; it leaves before node b is killed below.
    if args.etcd:
        runner.check("a node in cluster mode joins its cluster and exports the cluster metrics",
                     lambda: start_cluster_node(env, args.etcd, trial_env, config_file))

    # 5. every query returns data
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = substitute_dashboard(target["expr"])
            runner.check(f"dashboard panel {panel['title']!r} {target['refId']} returns data",
                      lambda e=expr: expect_data(env, e))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        runner.check(f"dashboard variable ${var['name']} has values", lambda v=var: variable_values(env, v))
    for group in rules["groups"]:
        for rule in group["rules"]:
            runner.check(f"alert {rule['alert']}: the expression parses and its signal returns data",
                      lambda r=rule: alert_signal(env, r))
    runner.check("every rule evaluates without error", lambda: rules_healthy(env))
    runner.check("the prometheus-adapter query returns keys/s per node", lambda: adapter_query(env))
    runner.check("bytes per entry against the sizing formula of docs/operations.md", lambda: sizing(env))

    # 6. a node goes away
    if "node-c" in env.procs:
        env.stop("node-c")
        env.stop("cluster-etcd")
    env.stop("node-b", signal.SIGKILL)
    runner.check("node b killed: HoppsNodeDown fires",
              lambda: wait_alert(env, "HoppsNodeDown", {"instance": env.nodes["b"]["admin"]}))
    runner.check("one of two nodes ready: HoppsTooFewReadyNodes fires",
              lambda: wait_alert(env, "HoppsTooFewReadyNodes", {"job": "hopps"}))


def documented_commands() -> list[str]:
    """The `hopps ...` command lines of docs/operations.md: in indented code blocks (with their
    backslash continuations joined) and in inline code."""
    text = (ROOT / "docs" / "operations.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    commands = re.findall(r"^\s{4,}(?:kubectl .*? -- )?(hopps [^\n#]*)", text, re.M)
    commands += re.findall(r"`(hopps [^`]*)`", text)
    return sorted({c.strip() for c in commands})


def check_documented_command(hopps: str, command: str) -> str:
    words = command.split()[1:]
    path = []
    for w in words:
        if not re.fullmatch(r"[a-z]+", w):
            break
        path.append(w)
    proc = subprocess.run([hopps, *path, "--help"], capture_output=True, text=True, timeout=30)
    ensure(proc.returncode == 0, f"`hopps {' '.join(path)} --help` failed: {proc.stderr.strip()}")
    ensure(not re.search(r"^Commands:", proc.stdout, re.M) or len(path) == len(words),
           f"`hopps {' '.join(path)}` needs a subcommand")
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    missing = [f for f in flags if f != "--help" and not re.search(rf"{re.escape(f)}\b", proc.stdout)]
    ensure(not missing, f"`hopps {' '.join(path)}` has no {', '.join(missing)}")
    return " ".join(path)


def start_cluster_node(env: Environment, etcd: str, trial_env: dict[str, str], config_file: Path) -> str:
    """Starts a single-member etcd and node "c" joined to cluster "live" through it (the trial's
    config and environment, cluster flags on top), adds the node to Prometheus' targets, and
    waits until Prometheus has its cluster gauges: it runs the controller and every shard of the
    model has a ready replica."""
    client, peer = free_port(), free_port()
    proc = env.spawn("cluster-etcd", [
        etcd, "--name", "live", f"--data-dir={env.work / 'cluster-etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{client}",
        f"--advertise-client-urls=http://127.0.0.1:{client}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=live=http://127.0.0.1:{peer}",
    ])

    def etcd_up():
        ensure(proc.poll() is None, f"etcd exited with {proc.returncode}:\n{env.tail('cluster-etcd')}")
        return http_get(f"http://127.0.0.1:{client}/health")[0] == 200

    poll("the cluster's etcd to answer", etcd_up, 60)
    env.start_node("c", trial_env, config_file,
                   ["--etcd", f"127.0.0.1:{client}", "--cluster", "live", "--lease-ttl", "2s"])
    env.scrape_every_node()
    admin = env.nodes["c"]["admin"]
    poll("Prometheus to see node c run the controller",
         lambda: len(env.query('hopps_cluster_leader{job="hopps", instance="%s"} == 1' % admin)) == 1, 60)
    poll("every shard of model %s to have a ready replica" % MODEL,
         lambda: len(env.query('hopps_cluster_shards_unavailable{job="hopps", model="%s"} == 0' % MODEL)) == 1
         and len(env.query('hopps_cluster_placed_shards{job="hopps", model="%s"} > 0' % MODEL)) == 1, 60)
    return f"node c at {admin}, controller of cluster live"


def check_etcd_component(env: Environment, etcd: str) -> str:
    """Starts a real etcd with the flags of deploy/k8s/components/etcd, its addresses moved to
    127.0.0.1 and its data directory to the test's, and waits for its readiness endpoint."""
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "components" / "etcd" / "etcd.yaml").read_text()))
    sts = [d for d in docs if d and d["kind"] == "StatefulSet"][0]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    client, peer = free_port(), free_port()
    data = env.work / "etcd"
    argv = [etcd]
    for arg in container["command"][1:]:
        flag, _, value = arg.partition("=")
        value = re.sub(r"http://[a-z0-9.-]+:2379", f"http://127.0.0.1:{client}", value)
        value = re.sub(r"http://[a-z0-9.-]+:2380", f"http://127.0.0.1:{peer}", value)
        if flag == "--data-dir":
            value = str(data)
        argv.append(f"{flag}={value}")
    proc = env.spawn("etcd", argv)
    probe = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]

    def healthy():
        ensure(proc.poll() is None, f"etcd exited with {proc.returncode}:\n{env.tail('etcd')}")
        status, body = http_get(f"http://127.0.0.1:{client}{probe}")
        return status == 200 and b"true" in body

    poll("etcd to answer its readiness probe", healthy, 60)
    env.stop("etcd")
    return f"{len(argv) - 1} flags, {probe} answered 200"


def expect_data(env: Environment, expr: str) -> str:
    result = env.query_range(expr)
    ensure(has_value(result), f"no series with a value for {expr}")
    return describe(result)


def variable_values(env: Environment, var: dict) -> str:
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
    ensure(m is not None, f"cannot read {var['definition']}")
    selector = substitute_dashboard(m.group(1))
    values = env.api(f"label/{m.group(2)}/values", {"match[]": selector, "start": f"{env.started:.0f}"})
    ensure(values, f"no values of {m.group(2)} for {selector}")
    return ", ".join(values)


def alert_signal(env: Environment, rule: dict) -> str:
    env.query(rule["expr"])  # parses and evaluates now
    sig = signal_of(rule["expr"])
    result = env.query_range(sig)
    ensure(has_value(result), f"the signal {sig!r} returned no value")
    return describe(result)


def rules_healthy(env: Environment) -> str:
    groups = env.api("rules", {})["groups"]
    rules = [r for g in groups for r in g["rules"]]
    want = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    ensure({r["name"] for r in rules} == want, f"Prometheus loaded {sorted(r['name'] for r in rules)}")
    bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r.get("health") != "ok"]
    ensure(not bad, "; ".join(bad))
    return f"{len(rules)} rules"


def adapter_query(env: Environment) -> str:
    rule = yaml.safe_load(ADAPTER.read_text())["rules"][0]
    series = re.match(r"(\w+)", rule["seriesQuery"]).group(1)
    # On Kubernetes the adapter groups by pod; here the nodes are told apart by instance.
    expr = (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'job="hopps"').replace("<<.GroupBy>>", "instance"))
    result = env.query_range(expr)
    ensure(len(result) == len(env.nodes) and has_value(result), f"{expr} gave {describe(result)}")
    return expr


def sizing(env: Environment) -> str:
    formula = (8 + DIM * 4) / 0.95
    result = env.query(f'hopps_table_bytes_per_entry{{job="hopps", model="{MODEL}", table="{TABLE}", instance="{env.nodes["b"]["admin"]}"}}')
    ensure(len(result) == 1, f"no bytes per entry from node b: {result}")
    measured = float(result[0]["value"][1])
    rows = float(env.query(f'hopps_table_rows{{instance="{env.nodes["b"]["admin"]}", model="{MODEL}"}}')[0]["value"][1])
    ratio = measured / formula
    ensure(0.9 <= ratio <= 1.3, f"{measured:.1f} bytes per entry measured at {rows:.0f} rows, formula "
                                f"(8 + {DIM}*4)/0.95 = {formula:.1f}: ratio {ratio:.2f} is outside 0.9..1.3")
    return f"{measured:.1f} B measured at {rows:.0f} rows of dim {DIM} f32, formula {formula:.1f} B, ratio {ratio:.3f}"


def wait_alert(env: Environment, name: str, labels: dict[str, str], deadline_s: float = 120) -> str:
    def firing():
        alerts = env.api("alerts", {})["alerts"]
        for a in alerts:
            if a["labels"].get("alertname") == name and a["state"] == "firing" \
                    and all(a["labels"].get(k) == v for k, v in labels.items()):
                return a
        return None

    alert = poll(f"{name} to fire", firing, deadline_s, 0.5)
    ensure(alert["annotations"].get("runbook_url", "").endswith("#" + name.lower()),
           f"{name} fired without its runbook link: {alert['annotations']}")
    return alert["annotations"].get("summary", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hopps", required=True)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--grpcurl", required=True)
    parser.add_argument("--etcd", help="an etcd binary: also start the etcd component's etcd")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    runner = Runner()
    work = Path(tempfile.mkdtemp(prefix="hopps-deploy-live-"))
    env = Environment(args, work)
    try:
        run(args, env, runner)
    except CheckFailed as err:
        runner.failed += 1
        print(f"FAIL live test stopped: {err}", flush=True)
    except Exception:
        runner.failed += 1
        print(f"FAIL live test stopped: unexpected error\n{traceback.format_exc()}", flush=True)
    finally:
        env.stop_all()
        if runner.failed:
            for name in env.logs:
                print(f"--- last lines of {name}.log\n{env.tail(name)}")
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{runner.passed} passed, {runner.failed} failed")
    return 0 if runner.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
