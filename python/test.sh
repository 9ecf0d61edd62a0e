#!/usr/bin/env bash
# Tests of the Python package: a virtualenv under target/pyenv, the extension built by maturin in
# the dev profile (the profile `cargo test` builds, so dependencies are shared), the `hopps`
# server binary, then pytest. The tests start their own `hopps serve` on 127.0.0.1:0 ports.
#
#   bash python/test.sh              # everything
#   bash python/test.sh -k rollback  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
venv="$root/target/pyenv"
python="${PYTHON:-python3}"

step() { printf '\n==> %s\n' "$*"; }

step "python virtualenv ($venv)"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.16,<2" numpy pytest pandas pyarrow

step "cargo build -p hopps-cli (the server the tests start)"
cargo build -p hopps-cli --locked

step "maturin develop (hopps-python, dev profile)"
(cd python && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --locked)

step "pytest python/tests"
# -rs prints why a test was skipped (the PyTorch example where torch is not installed).
# Any non-zero exit fails the script, including pytest's 5 (no tests collected).
HOPPS_BIN="$root/target/debug/hopps" "$venv/bin/python" -m pytest python/tests -rs -q "$@"
