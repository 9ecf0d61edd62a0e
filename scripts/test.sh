#!/usr/bin/env bash
# The test command of README.md: installs what the tests need on a fresh Debian machine with
# the Rust toolchain, then runs every suite. CI (.ci/run) calls exactly this.
#
#   bash scripts/test.sh
#
# Suites, in order (each can also be run alone):
#   cargo test --workspace                 unit, integration and end-to-end tests (real hopps
#                                          processes, a real S3 server inside the tests, real
#                                          etcd and several hopps nodes for the cluster tests)
#   table model checking and fuzz corpus   see "Table" below
#   bash python/test.sh                    Python client (virtualenv, maturin, pytest)
#   bash go/test.sh                        C ABI and Go package
#   bash deploy/test.sh                    Kubernetes manifests, alert rules, dashboard, live Prometheus
#   hopps-bench --quick                    proves the benchmark harness runs (asserts no figures)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

# --- system packages -------------------------------------------------------------------------
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The cluster tests start real etcd servers (crates/cli/tests/cluster.rs and the server's).
command -v etcd >/dev/null 2>&1 || need+=(etcd-server etcd-client)
command -v cc >/dev/null 2>&1 || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Rust ------------------------------------------------------------------------------------
step "cargo test --workspace"
cargo test --workspace --locked

# --- Table: loom models and the differential fuzz driver on stable ---------------------------
step "table: loom models"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p hopps-table --release --locked --lib loom

# --- Clients and operations ------------------------------------------------------------------
step "python client"
bash python/test.sh

step "C ABI and Go package"
bash go/test.sh

step "operations: manifests, rules, dashboard"
bash deploy/test.sh

# --- Benchmark harness (figures are not asserted) --------------------------------------------
step "benchmark harness, quick mode"
# The debug profile keeps CI to one build; the figures in BENCHMARKS.md come from --release.
cargo build -p hopps-cli -p hopps-bench --locked
cargo run -p hopps-bench --locked -- all --quick --json > target/bench-quick.json
echo "benchmark harness: $(wc -l < target/bench-quick.json) configurations measured"

step "all suites passed"
