#!/usr/bin/env python3
"""Writes the Grafana dashboard deploy/grafana/hopps.json.

The dashboard is written as code so that every panel's query is in one readable list and the
JSON stays consistent (ids, grid positions, datasource references):

    python3 deploy/tools/dashboard.py          # rewrite deploy/grafana/hopps.json
    python3 deploy/tools/dashboard.py --check  # exit 1 when the JSON is out of date

deploy/test.sh runs the check, then runs every query of the dashboard against a real Prometheus
scraping a real `hopps serve`. Metric names: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
OUT = DEPLOY / "grafana" / "hopps.json"

DS = {"type": "prometheus", "uid": "${datasource}"}

# Label matchers of the dashboard's variables. Node-level series have job and instance;
# model-level series add model; table-level series add table.
NODE = 'job=~"$job", instance=~"$instance"'
MODEL = NODE + ', model=~"$model"'
TABLE = MODEL + ', table=~"$table"'
RATE = "[$__rate_interval]"


def quantile(q: str, metric: str, sel: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}le) (rate({metric}_bucket{{{sel}}}{RATE})))"


# Each section is a row of panels: (title, description, panel type, unit, width, targets,
# extra field settings). A target is (expr, legend). Widths are in Grafana's 24-column grid.
SECTIONS = [
    (
        "Overview",
        [
            ("Nodes up", "hopps nodes Prometheus scrapes successfully.", "stat", "none", 4,
             [(f"sum(up{{{NODE}}})", "up")], {}),
            ("Nodes ready", "Nodes on which every configured model serves (/readyz answers 200).",
             "stat", "none", 4, [(f"sum(hopps_ready{{{NODE}}})", "ready")], {}),
            ("Lookups/s", "Lookup requests per second over the selected models and tables.",
             "stat", "reqps", 4,
             [(f"sum(rate(hopps_lookup_requests_total{{{TABLE}}}{RATE}))", "lookups/s")], {}),
            ("Keys/s", "Keys looked up per second (a lookup request carries a batch of keys).",
             "stat", "short", 4,
             [(f"sum(rate(hopps_lookup_keys_total{{{TABLE}}}{RATE}))", "keys/s")], {}),
            ("p99 lookup latency", "Server-side p99 time of one lookup request, all selected tables.",
             "stat", "s", 4,
             [(quantile("0.99", "hopps_lookup_duration_seconds", TABLE, ""), "p99")],
             {"thresholds": [("green", None), ("orange", 0.002), ("red", 0.005)]}),
            ("Max version lag", "Largest gap, in versions, between the newest committed version "
             "and the version served, over models and nodes. Alert above 2 for 10 minutes.",
             "stat", "none", 4, [(f"max(hopps_model_version_lag{{{MODEL}}})", "lag")],
             {"thresholds": [("green", None), ("orange", 1), ("red", 3)]}),
        ],
    ),
    (
        "Lookups",
        [
            ("Lookups/s by table", "Lookup requests per second, per model and table.",
             "timeseries", "reqps", 12,
             [(f"sum by (model, table) (rate(hopps_lookup_requests_total{{{TABLE}}}{RATE}))",
               "{{model}}/{{table}}")], {}),
            ("Keys/s by table", "Keys looked up per second, per model and table.",
             "timeseries", "short", 12,
             [(f"sum by (model, table) (rate(hopps_lookup_keys_total{{{TABLE}}}{RATE}))",
               "{{model}}/{{table}}")], {}),
            ("Lookup latency", "Server-side time of one lookup request: p50, p99 and p99.9 per "
             "model and table. Alert: p99 above 5 ms for 10 minutes.",
             "timeseries", "s", 12,
             [(quantile("0.5", "hopps_lookup_duration_seconds", TABLE, "model, table, "),
               "p50 {{model}}/{{table}}"),
              (quantile("0.99", "hopps_lookup_duration_seconds", TABLE, "model, table, "),
               "p99 {{model}}/{{table}}"),
              (quantile("0.999", "hopps_lookup_duration_seconds", TABLE, "model, table, "),
               "p99.9 {{model}}/{{table}}")], {}),
            ("Miss rate", "Share of looked-up keys not in the table (served by the table's "
             "missing-key policy). A jump after a new version usually means the version lacks "
             "keys the traffic asks for.",
             "timeseries", "percentunit", 12,
             [(f"sum by (model, table) (rate(hopps_lookup_misses_total{{{TABLE}}}{RATE}))"
               f" / sum by (model, table) (rate(hopps_lookup_keys_total{{{TABLE}}}{RATE}))",
               "{{model}}/{{table}}")], {}),
            ("Lookup errors by code", "Failed lookup requests per second by gRPC code. "
             "invalid_argument and not_found are usually client mistakes (bad keys, unknown "
             "table, a missing key under the `error` policy); resource_exhausted is a request "
             "over the limits; unavailable and internal are the server's.",
             "timeseries", "reqps", 12,
             [(f"sum by (model, table, code) (rate(hopps_lookup_requests_total{{{TABLE}, code!=\"ok\"}}{RATE}))",
               "{{model}}/{{table}} {{code}}")], {}),
            ("Keys per request", "Average batch size of lookup requests.",
             "timeseries", "short", 12,
             [(f"sum by (model, table) (rate(hopps_lookup_keys_total{{{TABLE}}}{RATE}))"
               f" / sum by (model, table) (rate(hopps_lookup_requests_total{{{TABLE}}}{RATE}))",
               "{{model}}/{{table}}")], {}),
        ],
    ),
    (
        "Online writes and WAL",
        [
            ("Writes/s", "Online Upsert, Delete and Push requests per second, by outcome.",
             "timeseries", "reqps", 8,
             [(f"sum by (model, table, op, code) (rate(hopps_write_requests_total{{{TABLE}}}{RATE}))",
               "{{model}}/{{table}} {{op}} {{code}}")], {}),
            ("WAL size", "Write-ahead log on each node's disk; a checkpoint truncates it.",
             "timeseries", "bytes", 8, [(f"hopps_wal_bytes{{{NODE}}}", "{{instance}}")], {}),
            ("WAL fsync latency", "Time of one WAL fsync: online writes are acknowledged after "
             "it. Alert: p99 above 50 ms for 10 minutes.",
             "timeseries", "s", 8,
             [(quantile("0.5", "hopps_wal_fsync_duration_seconds", NODE, "instance, "),
               "p50 {{instance}}"),
              (quantile("0.99", "hopps_wal_fsync_duration_seconds", NODE, "instance, "),
               "p99 {{instance}}")], {}),
        ],
    ),
    (
        "Versions and loads",
        [
            ("Serving and newest version", "Version served by default and the newest version "
             "committed in the repository, per model and node.",
             "timeseries", "none", 12,
             [(f"hopps_model_serving_version{{{MODEL}}}", "serving {{model}} {{instance}}"),
              (f"hopps_model_newest_version{{{MODEL}}}", "newest {{model}} {{instance}}")],
             {"decimals": 0}),
            ("Version lag", "Newest committed minus serving version. 1 for a few seconds after "
             "each commit is normal; a lag that grows means versions are not applied.",
             "timeseries", "none", 12,
             [(f"hopps_model_version_lag{{{MODEL}}}", "{{model}} {{instance}}")],
             {"decimals": 0}),
            ("Load progress", "Share of rows and bytes of the current load done, per model and "
             "node. Empty when nothing loads.",
             "timeseries", "percentunit", 8,
             [(f"hopps_load_rows_done{{{MODEL}}} / (hopps_load_rows_total{{{MODEL}}} > 0)",
               "rows {{model}} {{instance}}"),
              (f"hopps_load_bytes_done{{{MODEL}}} / (hopps_load_bytes_total{{{MODEL}}} > 0)",
               "bytes {{model}} {{instance}}")], {"max": 1}),
            ("Load ETA", "Estimated time left in the current load.",
             "timeseries", "s", 8,
             [(f"hopps_load_eta_seconds{{{MODEL}}} and on (job, instance, model) "
               f"(hopps_load_in_progress{{{MODEL}}} == 1)", "{{model}} {{instance}}")], {}),
            ("Time since load progress", "Seconds since the current load last read anything. "
             "Alert: above 5 minutes for 5 minutes (a stalled load).",
             "timeseries", "s", 8,
             [(f"time() - hopps_load_last_progress_timestamp_seconds{{{MODEL}}} and on (job, instance, model) "
               f"(hopps_load_in_progress{{{MODEL}}} == 1)", "{{model}} {{instance}}")], {}),
            ("Loads in progress", "1 while a version of the model loads on the node.",
             "timeseries", "none", 12,
             [(f"hopps_load_in_progress{{{MODEL}}}", "{{model}} {{instance}}")], {"max": 1}),
            ("Load failures", "Versions that failed to load or apply (the previous version "
             "keeps serving). Each one fires HoppsLoadFailed.",
             "timeseries", "none", 12,
             [(f"sum by (model, instance) (increase(hopps_model_load_failures_total{{{MODEL}}}{RATE}))",
               "{{model}} {{instance}}")], {}),
        ],
    ),
    (
        "Tables and memory",
        [
            ("Load factor", "Rows per slot of each hash table. Bulk loads size tables to "
             "0.90-0.95; alert above 0.97 for 15 minutes.",
             "timeseries", "percentunit", 12,
             [(f"max by (model, table) (hopps_table_load_factor{{{TABLE}}})", "{{model}}/{{table}}")],
             {"thresholds": [("green", None), ("red", 0.97)], "min": 0, "max": 1}),
            ("Bytes per entry", "Memory per row of each table, to compare with the sizing "
             "formula in docs/operations.md.",
             "timeseries", "bytes", 12,
             [(f"max by (model, table) (hopps_table_bytes_per_entry{{{TABLE}}})", "{{model}}/{{table}}")], {}),
            ("Rows and slots", "Rows and hash-table slots (capacity) per table and node; "
             "their ratio is the load factor.", "timeseries", "short", 8,
             [(f"hopps_table_rows{{{TABLE}}}", "rows {{model}}/{{table}} {{instance}}"),
              (f"hopps_table_capacity{{{TABLE}}}", "slots {{model}}/{{table}} {{instance}}")], {}),
            ("Table memory", "Bytes held by each table (per node).", "timeseries", "bytes", 8,
             [(f"hopps_table_bytes{{{TABLE}}}", "{{model}}/{{table}} {{instance}}")], {}),
            ("Model rows", "Rows over all tables of each model, per node.", "timeseries", "short", 8,
             [(f"hopps_model_rows{{{MODEL}}}", "{{model}} {{instance}}")], {}),
            ("Model memory and undo records", "Memory of each model's tables, stages and undo "
             "records, and the part held by undo records (what makes rollback instant).",
             "timeseries", "bytes", 12,
             [(f"hopps_model_memory_bytes{{{MODEL}}}", "total {{model}} {{instance}}"),
              (f"hopps_model_undo_bytes{{{MODEL}}}", "undo {{model}} {{instance}}")], {}),
            ("Node memory and limit", "Memory accounted to models on each node, and the node's "
             "limit (HOPPS_MEMORY_LIMIT; 0 = none). Loads beyond the limit are refused; alert "
             "above 90% for 10 minutes.",
             "timeseries", "bytes", 12,
             [(f"hopps_memory_used_bytes{{{NODE}}}", "used {{instance}}"),
              (f"hopps_memory_limit_bytes{{{NODE}}} > 0", "limit {{instance}}")], {}),
        ],
    ),
    (
        "Nodes",
        [
            ("Up", "1 when Prometheus scraped the node, 0 when the scrape failed. Alert: 0 for 2 minutes.",
             "timeseries", "none", 8, [(f"up{{{NODE}}}", "{{instance}}")], {"max": 1, "min": 0}),
            ("Ready", "1 when every configured model serves on the node.",
             "timeseries", "none", 8, [(f"hopps_ready{{{NODE}}}", "{{instance}}")], {"max": 1, "min": 0}),
            ("Versions of hopps", "The hopps release each node runs.",
             "table", "none", 8, [(f"hopps_build_info{{{NODE}}}", "")], {"instant": True}),
        ],
    ),
    (
        "Cluster",
        [
            ("Controller", "1 on the node that runs the placement controller (cluster mode). "
             "Exactly one node should show 1; none for longer than a lease TTL means no node can "
             "reach etcd.",
             "timeseries", "none", 8, [(f"hopps_cluster_leader{{{NODE}}}", "{{instance}}")],
             {"max": 1, "min": 0}),
            ("Shards placed per node", "Shards of each model the placement puts on each node "
             "(cluster mode). Moves after a node joins, leaves or drains show here.",
             "timeseries", "none", 8,
             [(f"hopps_cluster_placed_shards{{{MODEL}}}", "{{model}} {{instance}}")],
             {"decimals": 0}),
            ("etcd errors/s", "Failed etcd requests of each node's membership and controller. "
             "Nodes keep serving while etcd is away; placement and version switches wait.",
             "timeseries", "reqps", 8,
             [(f"sum by (instance) (rate(hopps_cluster_etcd_errors_total{{{NODE}}}{RATE}))",
               "{{instance}}")], {}),
            ("Shard replicas missing", "Shards with fewer ready replicas than the placement asks "
             "for, and shards with none (lookups of their keys fail), per model; counted by the "
             "controller's node. Under-replication for seconds after a node joins, leaves or "
             "drains is normal. Alerts: HoppsShardsUnavailable, HoppsShardsUnderReplicated.",
             "timeseries", "none", 24,
             [(f"max by (model) (hopps_cluster_shards_under_replicated{{{MODEL}}})",
               "under-replicated {{model}}"),
              (f"max by (model) (hopps_cluster_shards_unavailable{{{MODEL}}})",
               "unavailable {{model}}")], {"decimals": 0, "min": 0}),
        ],
    ),
]


def variable(name: str, label: str, query: str, multi: bool) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "allValue": ".*" if multi else None,
        "current": {},
        "hide": 0,
        "regex": "",
        "skipUrlSync": False,
        "options": [],
    }


def panel(pid: int, title: str, desc: str, kind: str, unit: str, x: int, y: int, w: int,
          targets: list, extra: dict) -> dict:
    h = 4 if kind == "stat" else 8
    defaults: dict = {"unit": unit}
    if "decimals" in extra:
        defaults["decimals"] = extra["decimals"]
    for key in ("min", "max"):
        if key in extra:
            defaults[key] = extra[key]
    steps = extra.get("thresholds", [("green", None)])
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for color, value in steps],
    }
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False}
        if "thresholds" in extra:
            defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
    out = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [],
    }
    instant = extra.get("instant", False)
    for i, (expr, legend) in enumerate(targets):
        target = {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                  "legendFormat": legend or "__auto", "range": not instant, "instant": instant}
        if instant:
            target["format"] = "table"
        out["targets"].append(target)
    if kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    elif kind == "table":
        out["options"] = {"showHeader": True}
        out["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True}}}]
    return out


def build() -> dict:
    panels = []
    pid = 1
    y = 0
    for title, items in SECTIONS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid += 1
        y += 1
        x = 0
        row_h = 0
        for ptitle, desc, kind, unit, w, targets, extra in items:
            if x + w > 24:
                x = 0
                y += row_h
                row_h = 0
            p = panel(pid, ptitle, desc, kind, unit, x, y, w, targets, extra)
            panels.append(p)
            pid += 1
            x += w
            row_h = max(row_h, p["gridPos"]["h"])
        y += row_h
    return {
        "uid": "hopps",
        "title": "hopps",
        "description": "hopps parameter server: traffic, latency, versions and loads, tables, "
                       "memory, WAL and nodes, per model and table. Guide: docs/operations.md.",
        "tags": ["hopps"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "",
        "links": [{"title": "Operator's guide", "type": "link", "icon": "doc", "targetBlank": True,
                   "url": "https://github.com/hopps-rs/hopps/blob/main/docs/operations.md#reading-the-dashboard"}],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "regex": "", "options": [], "refresh": 1, "skipUrlSync": False},
            variable("job", "job", "label_values(hopps_build_info, job)", False),
            variable("instance", "node", 'label_values(hopps_build_info{job=~"$job"}, instance)', True),
            variable("model", "model", 'label_values(hopps_model_serving_version{job=~"$job", instance=~"$instance"}, model)', True),
            variable("table", "table", 'label_values(hopps_table_rows{job=~"$job", instance=~"$instance", model=~"$model"}, table)', True),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail instead of writing")
    args = parser.parse_args()
    want = render()
    have = OUT.read_text() if OUT.exists() else ""
    if args.check:
        if have != want:
            print(f"{OUT.relative_to(DEPLOY.parent)} is out of date: run `python3 deploy/tools/dashboard.py`",
                  file=sys.stderr)
            return 1
        return 0
    if have != want:
        OUT.write_text(want)
        print(f"wrote {OUT.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
