#!/usr/bin/env bash
# Benchmark: 1000-key lookups from Go (go/hopps over libhopps) against the Rust client, in one
# run against one `hopps serve` on 127.0.0.1, rounds interleaved; prints a Markdown table of
# medians (the "## go" section of BENCHMARKS.md comes from it).
#
#   bash go/bench.sh                       # release build
#   ROUNDS=7 ITERATIONS=1000 bash go/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
die() { printf 'go/bench.sh: %s\n' "$*" >&2; exit 1; }
command -v go >/dev/null 2>&1 || die "Go is needed: apt-get install -y golang-go (or run go/test.sh once)"
export GOPROXY=off
export GOCACHE="${GOCACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/go-build}"

profile="${HOPPS_PROFILE:-release}"
cargo_profile=()
[ "$profile" = "release" ] && cargo_profile=(--release)
cargo build --locked "${cargo_profile[@]}" -p hopps-capi -p hopps-cli
cargo build --locked "${cargo_profile[@]}" -p hopps-capi --example publish_fixture --example rust_lookup_bench
target="$root/target/$profile"

work="$(mktemp -d "${TMPDIR:-/tmp}/hopps-go-bench.XXXXXX")"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$target/examples/publish_fixture" "$work/repo" --bench-keys "${BENCH_KEYS:-200000}"
"$target/hopps" serve --repo "$work/repo" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --data-dir "$work/node" --ready-file "$work/ready.json" >"$work/serve.log" 2>&1 &
server_pid=$!
deadline=$((SECONDS + 300))
until [ -s "$work/ready.json" ]; do
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "hopps serve exited"; }
  [ $SECONDS -lt $deadline ] || die "hopps serve did not listen within 300 s"
  sleep 0.1
done
grpc="$(sed -n 's/.*"grpc" *: *"\([^"]*\)".*/\1/p' "$work/ready.json")"
admin="$(sed -n 's/.*"admin" *: *"\([^"]*\)".*/\1/p' "$work/ready.json")"
readyz() {
  local code
  exec 3<>"/dev/tcp/${admin%:*}/${admin##*:}" || return 1
  printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$admin" >&3
  read -r _ code _ <&3 || true
  exec 3<&- 3>&-
  [ "$code" = "200" ]
}
until readyz 2>/dev/null; do
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "hopps serve exited while loading"; }
  [ $SECONDS -lt $deadline ] || die "hopps serve was not ready within 300 s"
  sleep 0.1
done

export CGO_ENABLED=1 CGO_LDFLAGS="-L$target -Wl,-rpath,$target"
(cd go && go build -o "$work/lookupbench" ./cmd/lookupbench)
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr); profile $profile"
"$work/lookupbench" -addr "$grpc" -rust "$target/examples/rust_lookup_bench" \
  -rounds "${ROUNDS:-7}" -iterations "${ITERATIONS:-1000}"
