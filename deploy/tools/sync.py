#!/usr/bin/env python3
"""Keep the Prometheus Operator copy of the alert rules in step with the plain rule file.

deploy/prometheus/hopps-alerts.yaml is the source: promtool checks it and any Prometheus loads it.
Clusters with the Prometheus Operator load rules from a PrometheusRule object instead, whose
spec.groups are the same groups. This script writes that object:

    python3 deploy/tools/sync.py          # rewrite deploy/k8s/components/monitoring/prometheusrule.yaml
    python3 deploy/tools/sync.py --check  # exit 1 when it is out of date (deploy/test.sh runs this)

Needs PyYAML.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "hopps-alerts.yaml"
OPERATOR_RULES = DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/hopps-alerts.yaml by deploy/tools/sync.py: edit that file,
# then run `python3 deploy/tools/sync.py`. deploy/test.sh fails when the two differ.
"""


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL expressions) as literal blocks, as a person would."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    source = yaml.safe_load(RULES.read_text())
    if not isinstance(source, dict) or "groups" not in source:
        raise SystemExit(f"{RULES}: expected a mapping with 'groups' (a Prometheus rule file)")
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "hopps"},
        "spec": {"groups": source["groups"]},
    }
    return HEADER + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail instead of writing")
    args = parser.parse_args()
    want = render()
    have = OPERATOR_RULES.read_text() if OPERATOR_RULES.exists() else ""
    if args.check:
        if have != want:
            print(
                f"{OPERATOR_RULES.relative_to(DEPLOY.parent)} is out of date with "
                f"{RULES.relative_to(DEPLOY.parent)}: run `python3 deploy/tools/sync.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    if have != want:
        OPERATOR_RULES.write_text(want)
        print(f"wrote {OPERATOR_RULES.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
