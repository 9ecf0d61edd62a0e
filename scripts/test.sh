#!/usr/bin/env bash
# The test command of README.md: installs what the tests need on a fresh Debian machine with
# the Rust toolchain, then runs every suite. CI (.ci/run) calls exactly this.
#
#   bash scripts/test.sh            # everything
#   HOPPS_TEST_QUICK=1 bash ...     # skip the slow model-checking runs
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# --- system packages -------------------------------------------------------------------------
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Rust: unit, integration and end-to-end tests ---------------------------------------------
step "cargo test --workspace"
cargo test --workspace --locked

step "done"
