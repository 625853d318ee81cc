#!/usr/bin/env bash
# Builds every crate for aarch64-unknown-linux-gnu and runs the tests that do
# not need root under QEMU user emulation. Privileged tests skip themselves
# (CPH_TEST_UNPRIVILEGED): QEMU user mode translates syscalls one by one and
# cannot faithfully emulate namespaces, mounts, cgroups or netlink for a
# foreign architecture. The release binaries for Kunpeng hosts come from
# `cross/test.sh --release-only`; `cross/test.sh --build-only` builds the
# tests without running them (CI builds them while other tests run).
# CARGO_TARGET_DIR is honoured (CI gives the cross build a directory of its
# own, as a cross build also locks the host's build directory).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
out=${CARGO_TARGET_DIR:-target}/$target
cargo_x() { local sub=$1; shift; cargo --config cross/config.toml "$sub" --target "$target" "$@"; }

if [ "${1:-}" = "--release-only" ]; then
    cargo_x build --release --bins
    ls -l "$out/release/cph" "$out/release/cph-agent" "$out/release/cph-shim"
    exit 0
fi
cargo_x build --workspace --bins
file "$out/debug/cph" "$out/debug/cph-agent"
# Tests that start the project's binaries run them through the emulator too.
export CPH_SPAWN_WRAPPER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
if [ "${1:-}" = "--build-only" ]; then
    cargo_x test --workspace --lib --bins --tests --no-run
    exit 0
fi
CPH_TEST_UNPRIVILEGED=1 RUST_TEST_THREADS=2 cargo_x test --workspace --lib --bins --tests
