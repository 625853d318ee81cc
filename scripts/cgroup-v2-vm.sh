#!/usr/bin/env bash
# Runs the runtime's container, network and storage tests, the agent's tests
# of phones, jobs and the encoding server, and the platform's end-to-end test
# on cgroup v2 alone (the unified
# hierarchy of modern distributions), in a virtual machine, since a host's
# controllers are bound to v1 or v2 for the whole kernel (the development
# and CI hosts are v1 hybrid).
#
# The machine boots Debian's stock kernel under QEMU with an initramfs of
# busybox and the 9p modules, mounts this host's root read-write over 9p,
# mounts cgroup2 on /sys/fs/cgroup with the cpuset, cpu, io, memory and pids
# controllers enabled, and runs the tests chrooted there with the binaries
# of this checkout. Fresh proc, sys, dev and /run are the guest's own (and
# TMPDIR is in /run), so nothing the tests do touches the host's kernel state.
#
# Usage: scripts/cgroup-v2-vm.sh [args for each test binary]
# CPH_VM_TESTS="cph-runtime:container" picks the test binaries (PACKAGE:TEST).
# Needs root (9p passthrough of /). On a host other than x86_64, or with
# CPH_SKIP_VM=1, it says so and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ "${CPH_SKIP_VM:-0}" = 1 ] || [ "$(uname -m)" != x86_64 ] || [ "$(id -u)" != 0 ]; then
    echo "SKIPPED cgroup v2 tests: they need root on an x86_64 host (CPH_SKIP_VM unset)"
    exit 0
fi
for p in qemu-system-x86 busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends "$p" >/dev/null
    }
done

work=$repo/target/vm
mkdir -p "$work"
# Debian's current kernel package, unpacked here (not installed on the host).
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
pkg=$(kernel_pkg)
[ -n "$pkg" ] || { apt-get update -qq && pkg=$(kernel_pkg); }
[ -n "$pkg" ] || { echo "no Debian kernel package (linux-image-amd64) is known to apt"; exit 1; }
ver=${pkg#linux-image-}
kdir=$work/$ver
if [ ! -f "$kdir/boot/vmlinuz-$ver" ]; then
    rm -rf "$kdir" "$work"/linux-image-*.deb
    # Lists older than the mirror name a version it no longer has: once
    # more after updating them.
    if ! (cd "$work" && apt-get download -qq "$pkg"); then
        apt-get update -qq
        pkg=$(kernel_pkg)
        ver=${pkg#linux-image-}
        kdir=$work/$ver
        (cd "$work" && apt-get download -qq "$pkg")
    fi
    dpkg-deb -x "$work/${pkg}"_*.deb "$kdir"
fi

# The initramfs: busybox, and the modules of virtio 9p with what they
# depend on, in load order.
init=$work/initramfs
rm -rf "$init"
mkdir -p "$init"/{bin,m,proc,sys,dev,host}
cp /bin/busybox "$init/bin/busybox"
mods=()
add_module() {
    local m=$1 f d
    for d in "${mods[@]}"; do [ "$d" = "$m" ] && return 0; done
    f=$(find "$kdir/lib/modules/$ver" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "module $m not found in $pkg"; exit 1; }
    for d in $(modinfo -F depends "$f" | tr ',' ' '); do add_module "$d"; done
    case $f in
        *.xz) xz -dc "$f" >"$init/m/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$init/m/$m.ko" ;;
        *) cp "$f" "$init/m/$m.ko" ;;
    esac
    mods+=("$m")
}
# 9p over virtio for the root; then what the platform uses that Debian
# builds as modules (loaded up front: the guest's chroot is not where the
# kernel looks for modprobe), the crypto modules btrfs and libcrc32c name as
# soft dependencies first.
for m in virtio_pci 9pnet_virtio 9p \
    crc32c_generic xxhash_generic blake2b_generic \
    bridge veth dummy tun loop btrfs overlay binder_linux \
    nf_tables nft_chain_nat nft_nat nft_masq nft_ct nf_conntrack_netlink nf_nat \
    sch_htb sch_tbf sch_ingress cls_u32 act_mirred ifb tcp_diag udp_diag; do
    add_module "$m"
done
cat >"$init/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in ${mods[*]}; do insmod /m/\$m.ko || echo "insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose host /host
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs run /host/run
mkdir -p /host/run/tmp
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
# The guest kernel's modules where its modprobe looks (veth, bridge...),
# when this host has that directory to mount them on.
[ -d /host/lib/modules ] && mount -o bind /host$kdir/lib/modules /host/lib/modules
echo "+cpuset +cpu +io +memory +pids" >/host/sys/fs/cgroup/cgroup.subtree_control
ip link set lo up
# An uplink, as a host has (the agent takes the server's address from the
# default route): a dummy link, so no traffic leaves the machine.
ip link add uplink0 type dummy && ip link set uplink0 up &&
    ip addr add 10.0.2.15/24 dev uplink0 && ip route add default via 10.0.2.2
# Into the host's root with switch_root (the initramfs goes), not chroot:
# a chrooted process may not make user namespaces.
exec switch_root /host /bin/sh -c "/bin/sh $work/run.sh; echo cph-vm-exit=\\\$?; /bin/busybox poweroff -f"
EOF
chmod +x "$init/init"
(cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.gz"

# What runs in the guest: test binaries of this checkout, as
# PACKAGE:TEST pairs, run one after another.
tests=(${CPH_VM_TESTS:-cph-runtime:container cph-runtime:net cph-runtime:storage
    cph-agent:lifecycle cph-agent:daemon cph-agent:encoder cph-agent:transfer cph:e2e})
# Every binary the tests run, built here: in the guest the tests take them
# as they are (CPH_BINS_BUILT), as a cargo run that builds nothing takes 5-15 s
# there, once per test.
cargo build -q --workspace --bins
image=${CPH_TEST_IMAGE:-$repo/target/images/cph-test-image.tar.gz}
[ -f "$image" ] || image/build-test-image.sh "$image" >/dev/null
{
    echo "cd $repo"
    # The console's first line carries the firmware's escape codes.
    echo "echo"
    # cargo too: the agent's tests bring cph-shim up to date through it.
    echo "export PATH=$(dirname "$(command -v cargo)"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    # cargo's and rustc's settings as here, so that the build is current.
    # (None set is fine: grep's "no match" is not the script's failure.)
    { env | grep -E '^(CARGO|RUSTUP|RUSTFLAGS|RUSTDOCFLAGS)[A-Z_]*=' || true; } | while IFS= read -r kv; do
        printf 'export %q\n' "$kv"
    done
    echo "export HOME=$HOME CARGO_TERM_COLOR=never"
    # Temporary files on the guest's own tmpfs (the checkout may be in /tmp).
    echo "export TMPDIR=/run/tmp CPH_TEST_IMAGE=$image"
    echo "export CPH_EXPECT_CGROUP_V2=1 CPH_EMULATED_CPU=1 CPH_BINS_BUILT=1 RUST_BACKTRACE=1"
    echo "rc=0"
    for t in "${tests[@]}"; do
        # Over the whole workspace, as the README's tests build them: the
        # same binaries, not ones of one package's features built again.
        bin=$(cargo test -q --workspace --test "${t#*:}" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys,tomllib
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["test"] and m.get("executable"):
        with open(m["manifest_path"], "rb") as f:
            if tomllib.load(f)["package"]["name"] == sys.argv[1]:
                print(m["executable"])' "${t%%:*}")
        [ -n "$bin" ] || { echo "test binary $t not built"; exit 1; }
        echo "echo '== $t'"
        printf '%q ' "$bin" --test-threads=1 --color never "$@"
        echo "|| rc=1"
    done
    echo 'exit $rc'
} >"$work/run.sh"

log=$work/console.log
echo "== cgroup v2: ${tests[*]} in a VM (kernel $ver, TCG; log $log)"
run_vm() {
    # In this shell's process group (--foreground), so a Ctrl-C reaches
    # it, and not reading the terminal (a background group that did would
    # be stopped).
    timeout --foreground 1500 qemu-system-x86_64 -accel tcg -m 3072 -smp 2 -nographic -no-reboot \
        -kernel "$kdir/boot/vmlinuz-$ver" -initrd "$work/initramfs.gz" \
        -append "console=ttyS0 panic=-1 softlockup_panic=1 quiet" \
        -virtfs local,path=/,mount_tag=host,security_model=passthrough,id=host,multidevs=remap \
        </dev/null >"$log" 2>&1 || true
}
run_vm
# Under TCG an emulated CPU has been seen to stop taking interrupts (its
# timer never fired again, RCU stalled) while the other spun in the kernel
# waiting for it: a soft lockup. The guest then panics at once rather than
# hanging for the whole timeout, and, as that is the emulator's failure and
# not a test's, the machine runs once more. A test that fails still fails.
if ! grep -q '^cph-vm-exit=' "$log" && grep -q 'soft lockup' "$log"; then
    mv "$log" "$log.locked-up"
    echo "the VM's emulated CPUs locked up (see $log.locked-up); running it once more"
    run_vm
fi
sed -n '/^== /,$p' "$log" | grep -v '^cph-vm-exit=' || tail -40 "$log"
rc=$(sed -n 's/^cph-vm-exit=\([0-9]*\).*/\1/p' "$log" | tail -1)
if [ -z "$rc" ]; then
    # No exit line: the machine hung or was stopped (1,500 s at most).
    echo "cgroup v2 VM ended without the tests' exit status; the console's end:"
    tail -20 "$log"
    exit 1
fi
[ "$rc" = 0 ] || { echo "cgroup v2 tests failed (exit $rc); see $log"; exit 1; }
# A module that did not load (btrfs, binder) would have the tests needing
# it skip themselves: the run would pass without what it is for.
if grep -q '^insmod .* failed' "$log"; then
    grep '^insmod .* failed' "$log"
    echo "kernel modules failed to load in the cgroup v2 VM; see $log"
    exit 1
fi
