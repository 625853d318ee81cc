#!/usr/bin/env bash
# The second command of the README: the whole test suite on this machine.
# As root the privileged tests (namespaces, cgroups, btrfs, nftables, tc) run
# for real; otherwise they print why they are skipped. Then the official-SDK
# tests run against a real `cph up` in a fresh data directory.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step's heading carries the seconds since the start.
step() { echo "== [${SECONDS}s] $*"; }
scripts/install-deps.sh
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
# The official SDK's Python (the signing test and the SDK tests run it).
export PATH="$PWD/target/sdk-venv/bin:$PATH"
image/build-test-image.sh >/dev/null
export CPH_TEST_IMAGE="$PWD/target/images/cph-test-image.tar.gz"
step build
cargo build --bins
step cargo test
RUST_TEST_THREADS="${CPH_TEST_THREADS:-2}" cargo test --workspace --all-targets
# The extractor again as on kernels without openat2 (before 5.6).
step archive tests without openat2
CPH_NO_OPENAT2=1 cargo test --workspace --test archive
# The runtime's container tests on cgroup v2 alone, in a virtual machine.
step cgroup v2 VM
scripts/cgroup-v2-vm.sh
step official SDK tests

# The platform of the README's first command, on ports of its own, its API
# over HTTPS (the official SDK trusts the certificate `cph up --tls` made).
data=$(mktemp -d /tmp/cph-e2e.XXXXXX)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(port); agent=$(port); obs=$(port)
target/debug/cph up --data-dir "$data" --image "$CPH_TEST_IMAGE" --tls --hosts 2 \
    --listen "127.0.0.1:$api" --agent-listen "127.0.0.1:$agent" --obs-listen "127.0.0.1:$obs" \
    >"$data/up.log" 2>&1 &
up_pid=$!
cleanup() {
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
    target/debug/cph phone purge --data-dir "$data" >/dev/null 2>&1 || true
    rm -rf "$data"
}
trap cleanup EXIT
for _ in $(seq 1 120); do
    [ -s "$data/credentials.json" ] && [ -s "$data/agent-2.toml" ] && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$data/up.log"; exit 1; }
    sleep 0.5
done
CPH_CREDENTIALS="$data/credentials.json" python3 -m pytest -q tests/sdk || {
    echo "== cph up log"; cat "$data/up.log"; tail -n 50 "$data"/logs/*.log; exit 1; }
step done
