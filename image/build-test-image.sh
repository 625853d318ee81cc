#!/usr/bin/env bash
# Builds the test phone image: a busybox rootfs from Debian's busybox-static
# with an init that marks readiness, a property store (getprop/setprop) and a
# package tool (pm), packed as a gzip tar. The runtime boots it like any image.
#
# usage: image/build-test-image.sh [OUTPUT.tar.gz]   (default target/images/cph-test-image.tar.gz)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../target/images/cph-test-image.tar.gz"}
busybox=${BUSYBOX:-/bin/busybox}
if ! "$busybox" --list >/dev/null 2>&1 || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    [ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' && busybox=/bin/busybox
fi
if ! "$busybox" --list >/dev/null 2>&1; then
    echo "build-test-image: busybox-static is needed (apt-get install busybox-static)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,data/local/tmp,data/app,data/system,data/property,cache,system/bin,mnt/shared,sdcard,root}
chmod 1777 "$root/tmp" "$root/data/local/tmp"

cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp -a "$here"/rootfs/. "$root"/
chmod 0755 "$root/init" "$root"/system/bin/*
for tool in getprop setprop pm; do ln -sf /system/bin/$tool "$root/bin/$tool"; done

echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
printf 'ro.product.model=cph-test\nro.build.version.release=11\nro.product.brand=cph\n' > "$root/system/build.prop"

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
tar --numeric-owner --owner=0 --group=0 -C "$root" -czf "$tmp" .
mv -f "$tmp" "$out"
echo "$out"
