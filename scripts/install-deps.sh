#!/usr/bin/env bash
# Installs what the platform and its tests need on a Debian machine (as root):
# kernel tools, the test image's busybox, the OCI runtimes the benches compare
# with, the aarch64 cross toolchain with QEMU, and the official Python SDK.
# Idempotent; CPH_SKIP_INSTALL=1 skips it.
set -euo pipefail
[ "${CPH_SKIP_INSTALL:-0}" = 1 ] && exit 0

debs=(busybox-static nftables iproute2 btrfs-progs crun runc conntrack file kmod
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static pkg-config)
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

rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r "$(dirname "$0")/../tests/sdk/requirements.txt"
