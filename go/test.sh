#!/usr/bin/env bash
# Tests of the C ABI (libhopps) and the Go package against a real `hopps serve`:
#   1. installs Go (Debian's golang-go) if missing;
#   2. builds libhopps, the hopps binary and the test fixture publisher;
#   3. publishes the fixture into a temporary repository and starts a node on 127.0.0.1:0;
#   4. compiles and runs the C test program (shared libhopps) and the C example (static);
#   5. runs `go test ./...` and the Go example.
# Exits non-zero on any failure. The header drift test and the Rust unit tests of hopps-capi run
# with `cargo test -p hopps-capi`.
#
#   bash go/test.sh                     # debug build (shares the build of cargo test)
#   HOPPS_PROFILE=release bash go/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'go/test.sh: %s\n' "$*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------------------------
if ! command -v go >/dev/null 2>&1; then
  step "installing golang-go"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends golang-go >/dev/null
fi
command -v cc >/dev/null 2>&1 || die "a C compiler (cc) is needed: apt-get install -y gcc"
# Standard library and this repository only: any module download is a bug, so forbid it.
export GOPROXY=off
export GOCACHE="${GOCACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/go-build}"

# --- build ------------------------------------------------------------------------------------
profile="${HOPPS_PROFILE:-debug}"
cargo_profile=()
[ "$profile" = "release" ] && cargo_profile=(--release)
step "cargo build (${profile}): libhopps, hopps, test fixture"
cargo build --locked "${cargo_profile[@]}" -p hopps-capi -p hopps-cli
cargo build --locked "${cargo_profile[@]}" -p hopps-capi --example publish_fixture
target="$root/target/$profile"
for f in libhopps.so libhopps.a hopps examples/publish_fixture; do
  [ -e "$target/$f" ] || die "$target/$f was not built"
done

# --- a node serving the fixture ---------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/hopps-go-test.XXXXXX")"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

step "publishing the fixture and starting hopps serve"
"$target/examples/publish_fixture" "$work/repo"
"$target/hopps" serve --repo "$work/repo" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --data-dir "$work/node" --ready-file "$work/ready.json" >"$work/serve.log" 2>&1 &
server_pid=$!

# Poll with a deadline: first the ready file (the ports), then /readyz (models loaded).
deadline=$((SECONDS + 120))
until [ -s "$work/ready.json" ]; do
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "hopps serve exited before listening"; }
  [ $SECONDS -lt $deadline ] || { cat "$work/serve.log" >&2; die "hopps serve did not listen within 120 s"; }
  sleep 0.1
done
grpc="$(sed -n 's/.*"grpc" *: *"\([^"]*\)".*/\1/p' "$work/ready.json")"
admin="$(sed -n 's/.*"admin" *: *"\([^"]*\)".*/\1/p' "$work/ready.json")"
[ -n "$grpc" ] && [ -n "$admin" ] || die "cannot read the addresses from $(cat "$work/ready.json")"
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
  [ $SECONDS -lt $deadline ] || { cat "$work/serve.log" >&2; die "hopps serve was not ready within 120 s"; }
  sleep 0.1
done
echo "node ready: grpc $grpc, admin $admin"
export HOPPS_TEST_ADDR="$grpc"

# --- C ----------------------------------------------------------------------------------------
cflags=(-std=c11 -O1 -Wall -Wextra -Werror -I "$root/crates/capi/include")
step "C test program (shared libhopps)"
cc "${cflags[@]}" crates/capi/tests/c/hopps_test.c -L"$target" -lhopps -Wl,-rpath,"$target" \
  -lpthread -o "$work/hopps_test"
"$work/hopps_test"

step "C example (static libhopps)"
cc "${cflags[@]}" examples/c/lookup.c "$target/libhopps.a" -lpthread -ldl -lm -o "$work/lookup_c"
"$work/lookup_c" "$grpc" capi user 1 2000 | tee "$work/c_example.out"
grep -qx '1 found \[1, 1.125, 1.25, 1.375\]' "$work/c_example.out" || die "C example: wrong row for key 1"
grep -qx '2000 missing \[0, 0, 0, 0\]' "$work/c_example.out" || die "C example: wrong row for key 2000"
if "$work/lookup_c" "$grpc" no_such_model user 1 2>"$work/c_example.err"; then
  die "C example: an unknown model did not fail"
fi
grep -q 'NOT_FOUND' "$work/c_example.err" || die "C example: unknown model: $(cat "$work/c_example.err")"

# --- Go ---------------------------------------------------------------------------------------
export CGO_ENABLED=1
export CGO_LDFLAGS="-L$target -Wl,-rpath,$target"
step "go vet and go test -race ./... (go/)"
(cd go && go vet ./... && go test -race -count=1 ./...)

step "Go example"
(cd examples/go && go run . -addr "$grpc" -model capi -table item 3 600) | tee "$work/go_example.out"
grep -qx '3 found \[-3 -3.25 -3.5 -3.75 -4 -4.25 -4.5 -4.75\]' "$work/go_example.out" \
  || die "Go example: wrong row for key 3"
grep -qx '600 missing \[0 0 0 0 0 0 0 0\]' "$work/go_example.out" || die "Go example: wrong row for key 600"

kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "hopps serve died during the tests"; }
step "C and Go clients: all passed"
