#!/usr/bin/env bash
# Installs what the platform and its tests need on a Debian machine (as root):
# kernel tools, the test image's busybox, the OCI runtimes the benches compare
# with, the aarch64 cross toolchain with QEMU, Rust (rustup's, when there is
# none: Debian's is older than the workspace's rust-version) with rustfmt and
# clippy, and the official Python SDK in a virtual environment of this
# checkout (target/sdk-venv: a Debian system Python takes no pip installs).
# Idempotent; CPH_SKIP_INSTALL=1 skips it.
set -euo pipefail
[ "${CPH_SKIP_INSTALL:-0}" = 1 ] && exit 0
cd "$(dirname "$0")/.."

debs=(busybox-static nftables iproute2 btrfs-progs crun runc conntrack file kmod
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static pkg-config
      python3 python3-venv curl ca-certificates gcc libc6-dev)
# The cgroup v2 tests' virtual machine (scripts/cgroup-v2-vm.sh).
[ "$(uname -m)" = x86_64 ] && debs+=(qemu-system-x86 cpio)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y -q --profile minimal
fi
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
for c in rustfmt clippy; do
    rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done
rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu

venv=target/sdk-venv
[ -x "$venv/bin/python3" ] || python3 -m venv "$venv"
"$venv/bin/python3" -m pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
