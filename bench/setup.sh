#!/usr/bin/env bash
# Installs what the side-by-side benchmarks start besides hopps: redis-server, from the
# distribution's packages (Debian/Ubuntu), when it is not on PATH yet. The harness starts it
# itself on 127.0.0.1 with persistence off; nothing runs as a system service for it.
#
#   bash bench/setup.sh
#   cargo run --release -p hopps-bench -- all --quick --json
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "redis-server: $(redis-server --version)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: redis-server is missing and this is not a Debian/Ubuntu system;" >&2
  echo "       install Redis 7 with your package manager, or pass --redis-bin PATH to the harness" >&2
  exit 1
fi

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
echo "installing redis-server (Debian package)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
# The package starts a system-wide service on port 6379; the benchmarks never use it, and
# stopping it keeps it from competing for the CPU (best effort: containers have no systemd).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
  $SUDO systemctl stop redis-server || true
fi
echo "redis-server: $(redis-server --version)"
